"""Fast paths of softmax attention and cached decoding (issue 10), each against the plain computation.

- fused QKV (one matmul with the stacked [W_q; W_kv]) against two separate projections and a naive attention
  written here: outputs and every parameter gradient, float64, with GQA and biases;
- the static KV cache: no reallocation during `generate`, doubling growth keeps the contents, autograd through a
  cache, and a segment memory shared by `_copy_cache` is never written into;
- the decode fast path (one causal query, no mask): cached greedy generation equals uncached generation token for
  token, and the cached logits equal a full forward of the final sequence.
"""

import contextlib

import pytest
import torch

import formers
from formers.nn import attention
from formers.nn.attention import KVCache


def make(dim=24, heads=6, kv_heads=None, bias=False, causal=True, **kw):
    return formers.build("mixer", "softmax", dim=dim, heads=heads, kv_heads=kv_heads, bias=bias, causal=causal,
                         **kw).double()


def two_projection_attention(m, x):
    """Causal softmax attention from two separate projections q = x W_q^T + b_q, kv = x W_kv^T + b_kv, the
    scores materialised and masked explicitly; GQA by repeating each key/value head."""
    B, N, _ = x.shape
    H, Hkv, Dh = m.heads, m.kv_heads, m.head_dim
    q = x @ m.q.weight.T + (m.q.bias if m.q.bias is not None else 0)
    kv = x @ m.kv.weight.T + (m.kv.bias if m.kv.bias is not None else 0)
    q = q.reshape(B, N, H, Dh).permute(0, 2, 1, 3)
    k = kv[..., : Hkv * Dh].reshape(B, N, Hkv, Dh).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, 1)
    v = kv[..., Hkv * Dh:].reshape(B, N, Hkv, Dh).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) * Dh ** -0.5
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, N, H * Dh)
    return y @ m.out.weight.T + (m.out.bias if m.out.bias is not None else 0)


def grads(m, x, fn):
    """Output and the gradients of <output, g> w.r.t. x and every parameter of m."""
    m.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kv_heads,bias", [(6, False), (2, True), (1, False), (3, "q_only")])
def test_fused_qkv_equals_two_projections(kv_heads, bias):
    m = make(kv_heads=kv_heads, bias=bool(bias))
    if bias == "q_only":  # a folded norm (P54) can give q a bias and leave kv without one
        m.kv.register_parameter("bias", None)
    assert m._fusable()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    y, gx, gp = grads(m, x, m)
    y_ref, gx_ref, gp_ref = grads(m, x, lambda t: two_projection_attention(m, t))
    m._fusable = lambda: False  # the plain path: `project` (two nn.Linear calls)
    y_plain, gx_plain, gp_plain = grads(m, x, m)
    for got in ((y, gx, gp), (y_plain, gx_plain, gp_plain)):
        torch.testing.assert_close(got[0], y_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], gx_ref, atol=1e-10, rtol=1e-10)
        assert got[2].keys() == gp_ref.keys()
        for name in gp_ref:
            torch.testing.assert_close(got[2][name], gp_ref[name], atol=1e-10, rtol=1e-10, msg=name)
    del m._fusable  # back to the class method
    with torch.no_grad():  # inference takes two matmuls (no weight stacking): the same values
        torch.testing.assert_close(m(x), y_ref, atol=1e-10, rtol=1e-10)


def test_fusion_only_when_projection_is_plain():
    from formers.models.vision.vit_options import capture_attention

    m = make()
    assert m._fusable()
    with capture_attention(m) as store:  # shadows `project` on the instance: must be called, not bypassed
        assert not m._fusable()
        m(torch.randn(1, 4, 24, dtype=torch.float64))
    assert store["kv"].shape == (1, 4, 2 * 24)
    assert m._fusable()
    assert not formers.build("mixer", "mdha", dim=24, heads=6, causal=True)._fusable()  # overrides project
    m.q.register_forward_hook(lambda mod, inp, out: out)
    assert not m._fusable()


def test_kv_cache_doubles_and_keeps_contents():
    c = KVCache(capacity=4)
    chunks = [torch.randn(2, 3, n, 5) for n in (3, 1, 2, 5, 1)]
    caps = []
    with torch.no_grad():
        for t in chunks:
            k, v = c.update(t, 2 * t)
            caps.append(c._k.shape[2])
    ref = torch.cat(chunks, 2)
    assert caps == [4, 4, 8, 16, 16]  # capacity, then doubled (or grown to fit) only when full
    assert torch.equal(k, ref) and torch.equal(v, 2 * ref) and torch.equal(c.k, ref) and c.length == 12
    c.k, c.v = ref[:, :, :7], ref[:, :, :7]  # plain assignment still works: a shorter cache, no spare room
    assert c.k.shape[2] == 7 and torch.equal(c.v, ref[:, :, :7])
    with torch.no_grad():
        c.update(ref[:, :, 7:], ref[:, :, 7:])
    assert torch.equal(c.k, ref) and c.length == 12


def test_kv_cache_with_autograd_matches_full_pass():
    """With autograd recording the cache concatenates (no in-place writes): gradients through a chunked pass equal
    those of one full pass."""
    model = formers.create_model("lm", vocab=30, dim=24, depth=2, max_len=32, position="rope",
                                 block={"mixer": {"name": "softmax", "heads": 6, "kv_heads": 2}}).double()
    ids = torch.randint(0, 30, (2, 10))
    w = torch.randn(2, 10, 30, dtype=torch.float64)
    (model(ids) * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cache = model.new_cache()
    out = torch.cat([model(ids[:, a:b], cache=cache) for a, b in [(0, 4), (4, 5), (5, 10)]], 1)
    (out * w).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-10, rtol=1e-10, msg=n)


def tiny_lm(position, **kw):
    return formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=64, position=position,
                                block={"mixer": {"name": "softmax", "heads": 4, **kw}}).eval()


@pytest.mark.parametrize("position,kv_heads", [("learned", None), ("rope", 2), ("alibi", None)])
def test_cached_greedy_generation_equals_uncached(position, kv_heads, monkeypatch):
    model = tiny_lm(position, kv_heads=kv_heads)
    prompt = torch.randint(0, 40, (2, 6))
    masks = []
    real_mask = attention.attention_mask
    monkeypatch.setattr(attention, "attention_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))
    a = model.generate(prompt, 24, greedy=True)
    if position != "alibi":  # no mask tensor at all: is_causal for the prompt, nothing to mask when decoding
        assert not masks
    monkeypatch.undo()
    b = model.generate(prompt, 24, greedy=True, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 30) and torch.equal(a[:, :6], prompt)
    # every cached step's logits (one query, no mask) equal those of a full causal pass over the final sequence
    with torch.no_grad():
        full = model(a[:, :-1])
        cache = model.new_cache(capacity=29)
        steps = [model(a[:, :6], cache=cache)] + [model(a[:, t:t + 1], cache=cache) for t in range(6, 29)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_generate_allocates_the_cache_once(monkeypatch):
    model = tiny_lm("learned")
    made, moved = [], []
    new_cache = model.new_cache

    def spy_new_cache(capacity=0):
        made.append(new_cache(capacity=capacity))
        return made[-1]

    real_moved = KVCache._moved

    def spy_moved(self, buf, new, room):
        moved.append(room)
        return real_moved(self, buf, new, room)

    monkeypatch.setattr(model, "new_cache", spy_new_cache)
    monkeypatch.setattr(KVCache, "_moved", spy_moved)
    prompt = torch.randint(0, 40, (1, 5))
    out = model.generate(prompt, 20, greedy=True)
    assert out.shape == (1, 25)
    # one buffer each for keys and values per layer, sized for the prompt and every fed token, never regrown
    assert moved == [24] * (2 * model.depth)
    for c in made[0]:
        assert c.length == 24 and c._k.shape[2] == 24 and c._v.shape[2] == 24


def test_segment_memory_is_not_written_into():
    """Under no_grad the cache writes in place; memory handed to forward_segment (shallow-copied) stays intact."""
    model = formers.create_model("lm", vocab=30, dim=24, depth=2, max_len=64, position="rope", mem_len=8,
                                 block={"mixer": {"name": "softmax", "heads": 6}}).double().eval()
    ids = torch.randint(0, 30, (2, 14))
    with torch.no_grad():
        _, mem = model.forward_segment(ids[:, :5])
        before = [(m.k.clone(), m.v.clone(), m.length) for m in mem]
        a, mem_a = model.forward_segment(ids[:, 5:9], mem)
        b, _ = model.forward_segment(ids[:, 5:9], mem)
        c, _ = model.forward_segment(ids[:, 9:], mem_a)
        d, _ = model.forward_segment(ids[:, 9:], mem_a)
    assert torch.equal(a, b) and torch.equal(c, d)
    for m, (k, v, n) in zip(mem, before):
        assert torch.equal(m.k, k) and torch.equal(m.v, v) and m.length == n
    # and the no_grad segments equal the autograd ones (the concatenating path)
    _, mem_g = model.forward_segment(ids[:, :5])
    a_g, _ = model.forward_segment(ids[:, 5:9], mem_g)
    torch.testing.assert_close(a_g.detach(), a, atol=1e-12, rtol=1e-12)


def test_single_query_decode_with_key_mask_uses_the_mask():
    """The no-mask fast path must not swallow a padding mask: a masked cached key changes nothing but itself."""
    m = make(causal=True).eval()
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, True]])
    with torch.no_grad():
        full = m(x, mask=mask)
        cache = KVCache()
        m(x[:, :4], cache=cache, mask=mask[:, :4])
        last = m(x[:, 4:], cache=cache, mask=mask)
        x2 = x.clone()
        x2[:, 1] += 1.0  # the masked key's token
        cache2 = KVCache()
        m(x2[:, :4], cache=cache2, mask=mask[:, :4])
        last2 = m(x2[:, 4:], cache=cache2, mask=mask)
    torch.testing.assert_close(last, full[:, 4:], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(last2, last, atol=1e-12, rtol=1e-12)


def test_fusion_is_off_when_q_or_kv_has_any_hook():
    """The fused path never calls q/kv, so a backward hook (or a global module hook) must keep the plain path."""
    a = attention.SoftmaxAttention(16, heads=4).train()
    assert a._fusable()
    fired = []
    h = a.q.register_full_backward_hook(lambda *args: fired.append(1))
    assert not a._fusable()
    a(torch.randn(2, 5, 16)).sum().backward()
    assert fired
    h.remove()
    g = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not a._fusable()
    finally:
        g.remove()
    assert a._fusable()


def test_generate_refuses_negative_new_tokens():
    from formers.registry import FormersError

    m = formers.create_model("lm", vocab=16, dim=16, depth=1, max_len=32)
    with pytest.raises(FormersError, match="max_new_tokens must be >= 0"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), -1)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_inference_gelu_in_place_equals_plain(monkeypatch, approximate, bias):
    """Without autograd the MLP applies GELU in place on fc1's output: equal to the plain W2 GELU(W1 x + b1) + b2
    written here, on a 3-D input; with autograd, or with a hook on fc1 (which keeps fc1's output unchanged), the
    plain path."""
    from formers.nn import ffn

    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=48, mult=4, bias=bias, act={"name": "gelu", "approximate": approximate}).eval()
    x = torch.randn(3, 17, 48)
    b1 = m.fc1.bias if bias else 0
    b2 = m.fc2.bias if bias else 0
    ref = torch.nn.functional.gelu(x @ m.fc1.weight.T + b1, approximate=approximate) @ m.fc2.weight.T + b2
    calls = []
    real = torch.ops.aten.gelu_
    monkeypatch.setattr(torch.ops.aten, "gelu_", lambda *a, **k: calls.append(1) or real(*a, **k), raising=False)
    with torch.no_grad():
        y_small = m(x)  # 3 * 17 * 192 values: below IN_PLACE_MIN, the out-of-place GELU
        assert not calls
        monkeypatch.setattr(ffn, "IN_PLACE_MIN", 3 * 17 * 192)
        y = m(x)
    torch.testing.assert_close(y_small, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    assert calls == [1]
    calls.clear()
    y2 = m(x)  # autograd on: the plain path, and it trains
    y2.sum().backward()
    assert not calls and m.fc1.weight.grad is not None
    kept = []
    h = m.fc1.register_forward_hook(lambda mod, inp, out: kept.append(out))
    with torch.no_grad():
        y3 = m(x)
    h.remove()
    assert not calls and len(kept) == 1  # a hook on fc1 is honoured, and what it kept is fc1's output
    torch.testing.assert_close(kept[0], (x @ m.fc1.weight.T + b1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y3, ref.detach(), atol=1e-5, rtol=1e-5)


def test_mlp_in_place_gelu_honours_dropout_hooks_and_patched_forward():
    """Hooks on the MLP's dropout modules fire and a forward replaced on fc1's instance is used under no_grad too:
    the fast path is off for both, and the output equals the autograd (plain) path."""
    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=8, mult=4, hidden_dropout=0.1).eval()
    x = torch.randn(2, 5, 8)
    seen = []
    m.hidden_drop.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        m(x)
    assert seen == [1]
    m2 = formers.build("ffn", "mlp", dim=8, mult=4).eval()
    fc1 = m2.fc1
    fc1.forward = lambda t: torch.nn.functional.linear(t, fc1.weight, fc1.bias) * 2.0
    with torch.no_grad():
        y = m2(x)
    torch.testing.assert_close(y, m2(x).detach())


# ------------------------------------------------------------------ ViT: only the class token's row of the last block

def _vit(**kw):
    from formers.models.vision.vit import ViT

    torch.manual_seed(0)
    m = ViT(img_size=16, patch_size=4, in_chans=3, num_classes=5, dim=24, depth=2, heads=2, **kw)
    with torch.no_grad():  # non-zero biases and class token, so that a row mix-up cannot hide behind zeros
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _naive_vit_logits(m, x):
    """The ViT of the plain formulas, every token through every block (eq. 1-4, pre-LN, token pooling); written
    here from the model's weights, for the default block (layernorm, softmax attention, GELU MLP, add)."""
    B = x.shape[0]
    p = m.patch_size
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)
    z = patches @ m.patch_embed.proj.weight.reshape(m.dim, -1).T + m.patch_embed.proj.bias
    z = torch.cat([m.cls_token.expand(B, -1, -1), z], 1) + m.pos.emb
    for blk in m.stack.blocks:
        a = blk.attn.fn
        h = torch.nn.functional.layer_norm(z, (m.dim,), blk.attn.norm.weight, blk.attn.norm.bias, 1e-6)
        q = (h @ a.q.weight.T + a.q.bias).view(B, -1, a.heads, a.head_dim).transpose(1, 2)
        k, v = (h @ a.kv.weight.T + a.kv.bias).view(B, -1, 2, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * a.head_dim ** -0.5).softmax(-1) @ v
        z = z + att.transpose(1, 2).reshape(B, -1, m.dim) @ a.out.weight.T + a.out.bias
        f = blk.ffn.fn
        h = torch.nn.functional.layer_norm(z, (m.dim,), blk.ffn.norm.weight, blk.ffn.norm.bias, 1e-6)
        z = z + torch.nn.functional.gelu(h @ f.fc1.weight.T + f.fc1.bias) @ f.fc2.weight.T + f.fc2.bias
    z = torch.nn.functional.layer_norm(z, (m.dim,), m.norm.weight, m.norm.bias, 1e-6)
    return z[:, 0] @ m.head.weight.T + m.head.bias


def test_vit_class_token_only_last_block_equals_naive_vit(monkeypatch):
    """In evaluation with token pooling, ViT.forward computes only the class token's row of the last block: the
    logits equal the naive all-token ViT written above, and the prefix path really ran."""
    from formers.blocks import Block

    m = _vit()
    calls = []
    real = Block.forward_prefix
    monkeypatch.setattr(Block, "forward_prefix", lambda self, x, n, mask=None: calls.append(x.shape) or
                        real(self, x, n, mask=mask))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        y = m(x)
    assert calls == [(3, 17, 24)]  # the last block got all 1 + 16 tokens and returned one row
    torch.testing.assert_close(y, _naive_vit_logits(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    {"layer_scale": 0.1, "drop_path": 0.2},  # eval: drop-path is the identity, layer-scale per channel
    {"block": {"ffn": {"name": "glu"}, "norm": "rmsnorm"}},
    {"block": {"residual": "gru_gate", "mixer": {"explicit": True, "kv_heads": 1}}},
    {"block": {"norm": "crmsnorm"}, "layers": {"1": {"ffn": "none"}}},
])
def test_vit_class_token_only_equals_all_tokens(kw):
    """Other row-wise block parts take the same path, equal to every token through the whole stack."""
    m = _vit(**kw)
    assert m._class_token_only()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = m.forward_head(m.forward_features(x))
        torch.testing.assert_close(m(x), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("why", ["train", "avg", "rope", "hook", "moe", "temperature", "post", "prepbn", "norm_hook",
                                 "head_subclass", "mlp_subclass", "patched_forward", "submodule_train",
                                 "instance_pool", "instance_head", "class_pool", "block_class_patch", "norm_train"])
def test_vit_class_token_only_is_off_where_it_would_differ(why, monkeypatch):
    """The full stack runs in training, with average pooling, rotary positions, a hook on any module of the last
    block or on the final norm, a token-routing FFN (capacity depends on the token count), a softmax subclass, a
    Post-LN block, a batch-statistics norm, a subclass with its own forward_head, an MLP subclass (the row-wise
    flag is not inherited), a forward replaced on an instance, or one submodule left in training mode; the logits
    still equal the all-token forward."""
    from formers.blocks import Block
    from formers.models.vision.vit import ViT

    kw = {"avg": {"global_pool": "avg"}, "rope": {"pos_embed": "rope"},
          "moe": {"block": {"ffn": {"name": "moe", "experts": 2}}},
          "temperature": {"block": {"mixer": {"name": "temperature"}}},
          "post": {"block": {"placement": "post"}}, "prepbn": {"block": {"norm": "prepbn"}}}.get(why, {})
    m = _vit(**kw)
    last = m.stack.blocks[-1]
    if why == "train":
        m.train()
    elif why == "submodule_train":
        last.attn.fn.train()
    elif why == "head_subclass":  # a probe on [class token; mean of the patch tokens] needs every row
        class MeanProbe(ViT):
            def forward_head(self, x, pre_logits=False):
                return torch.cat([x[:, 0], x[:, 1:].mean(1)], -1)[:, :5]

        m.__class__ = MeanProbe
    elif why == "mlp_subclass":
        from formers.nn.ffn import MLP

        last.ffn.fn.__class__ = type("TokenMixingMLP", (MLP,), {})
    elif why == "patched_forward":
        fc2 = last.ffn.fn.fc2
        fc2.forward = lambda t: torch.nn.functional.linear(t, fc2.weight, fc2.bias)
    elif why == "instance_pool":  # a probe on the mean of the patch tokens, set on the instance
        m.pool = lambda t: t[:, 1:].mean(1)
    elif why == "instance_head":
        m.forward_head = lambda t, pre_logits=False: t[:, 1:].mean(1)[:, :5]
    elif why == "class_pool":  # ViT.pool itself patched (the check once compared the patch with itself)
        monkeypatch.setattr(ViT, "pool", lambda self, t: t[:, 1:].mean(1))
    elif why == "block_class_patch":  # Block.forward patched on the class: it must run for the last block too
        real_forward = Block.forward
        monkeypatch.setattr(Block, "forward", lambda self, x, **k: real_forward(self, x, **k) * 1.5)
    elif why == "norm_train":  # the final norm left in training mode (batch statistics would see one row)
        m.norm.train()
    seen = []
    if why == "hook":
        last.ffn.fn.fc2.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    elif why == "norm_hook":
        m.norm.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    monkeypatch.setattr(Block, "forward_prefix", lambda *a: pytest.fail("prefix path taken"))
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    full = m.forward_head(m.forward_features(x))
    torch.testing.assert_close(y, full)
    if why in ("hook", "norm_hook"):
        assert seen == [(2, 17, 24), (2, 17, 24)]


# ------------------------------------------------------------------------------- LM: the lean decoding step

LEAN_CONFIGS = {
    "default": {},
    "gpt2": {"block": {"norm": {"name": "layernorm", "eps": 1e-5},
                       "mixer": {"name": "softmax", "heads": 4, "bias": True},
                       "ffn": {"name": "mlp", "act": {"name": "gelu", "approximate": "tanh"}}},
             "tie_embeddings": True},
    "gqa_rms_glu": {"block": {"norm": "rmsnorm", "mixer": {"name": "softmax", "heads": 4, "kv_heads": 1},
                              "ffn": {"name": "glu"}}},
    "crms_relu_no_ffn_last": {"block": {"norm": "crmsnorm", "ffn": {"name": "mlp", "act": "relu"}},
                              "layers": {"1": {"ffn": "none"}}},
    "rope": {"position": "rope"},
    "rope_partial_gqa_bias": {"position": {"name": "rope", "fraction": 0.5},
                              "block": {"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2, "bias": True}}},
    "alibi_gqa": {"position": "alibi", "block": {"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2}}},
}


@pytest.mark.parametrize("name", list(LEAN_CONFIGS))
def test_lean_decode_step_equals_the_module_forward(name):
    """decode_step (weights read once, no module calls) gives the module path's logits and cache on every step:
    for the standard block and for blocks whose norm or feed-forward it calls as modules (RMSNorm inlined,
    CRMSNorm, GLU, ReLU and a layer without feed-forward called), with GQA and tied embeddings."""
    from formers.models.lm import decode_plan, decode_step

    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=64, **LEAN_CONFIGS[name]).eval()
    with torch.no_grad():  # biases and norm gains off their init, so that a dropped term shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan = decode_plan(model)
    assert plan is not None
    ids = torch.randint(0, 40, (3, 12))
    with torch.no_grad():
        lean, mod = model.new_cache(capacity=12), model.new_cache(capacity=12)
        model(ids[:, :5], cache=lean), model(ids[:, :5], cache=mod)
        for t in range(5, 12):
            a = decode_step(model, plan, ids[:, t:t + 1], lean)
            b = model(ids[:, t:t + 1], cache=mod)[:, -1]
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        full = model(ids)[:, -1]  # and the last step against a full causal pass without a cache
    torch.testing.assert_close(a, full, atol=1e-5, rtol=1e-5)
    for c1, c2 in zip(lean, mod):
        assert c1.length == c2.length == 12
        torch.testing.assert_close(c1.k, c2.k, rtol=0, atol=0)
        torch.testing.assert_close(c1.v, c2.v, rtol=0, atol=0)


def test_generate_takes_the_lean_step_and_equals_uncached(monkeypatch):
    from formers.models import lm

    model = tiny_lm("learned")
    calls = []
    real = lm.decode_step
    monkeypatch.setattr(lm, "decode_step", lambda *a: calls.append(1) or real(*a))
    prompt = torch.randint(0, 40, (2, 6))
    a = model.generate(prompt, 24, greedy=True)
    assert len(calls) == 23  # every new token but the last is fed back through the lean step
    assert torch.equal(a, model.generate(prompt, 24, greedy=True, use_cache=False))


@pytest.mark.parametrize("why", ["hook", "looped", "post", "explicit", "lns", "gru_gate", "train",
                                 "out_subclass", "embed_subclass", "patched_forward", "class_patch",
                                 "embed_max_norm"])
def test_lean_decode_is_off_where_it_does_not_apply(why, monkeypatch):
    """A hook anywhere, a looped stack, Post-LN / LNS placements, an explicit-score mixer, a gated residual, an
    adapted (subclassed) output projection or embedding, or a forward replaced on an instance keep the module path
    (and cached generation still equals the uncached one)."""
    from formers.models import lm

    block = {"mixer": {"name": "softmax", "heads": 4}}
    kw = {"looped": {"stack": {"name": "looped", "pre": 1, "loops": 2}},
          "post": {"block": {**block, "placement": "post"}},
          "explicit": {"block": {"mixer": {"name": "softmax", "heads": 4, "explicit": True}}},
          "lns": {"block": {**block, "placement": "lns"}},
          "gru_gate": {"block": {**block, "residual": "gru_gate"}}}.get(why, {})
    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=64, **kw).eval()
    if why == "hook":
        model.stack.blocks[1].ffn.fn.fc1.register_forward_hook(lambda *a: None)
    elif why == "out_subclass":  # e.g. a low-rank adapter on the output projection: W x + B A x
        class Adapted(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) + 0.5 * x.flip(-1)

        model.stack.blocks[0].attn.fn.out.__class__ = Adapted
    elif why == "embed_subclass":
        class Scaled(torch.nn.Embedding):
            def forward(self, idx):
                return super().forward(idx) * 3.0

        model.embed.__class__ = Scaled
    elif why == "patched_forward":
        out = model.stack.blocks[0].attn.fn.out
        out.forward = lambda t: torch.nn.functional.linear(t, out.weight) * 2.0
    elif why == "embed_max_norm":  # nn.Embedding renormalises the rows it looks up: the lean step reads the table
        model.embed.max_norm = 0.5
    elif why == "class_patch":  # a method of a class the plan stands in for, patched (to record attention, say)
        from formers.nn.attention import SoftmaxAttention

        real_split = SoftmaxAttention.forward_split
        monkeypatch.setattr(SoftmaxAttention, "forward_split", lambda self, h, **k: real_split(self, h, **k))
    if why == "train":
        model.train()
        assert lm.decode_plan(model) is None
        return
    assert lm.decode_plan(model) is None
    monkeypatch.setattr(lm, "decode_step", lambda *a: pytest.fail("lean step taken"))
    prompt = torch.randint(0, 40, (2, 6))
    assert torch.equal(model.generate(prompt, 10, greedy=True), model.generate(prompt, 10, greedy=True,
                                                                                use_cache=False))


@pytest.mark.parametrize("cls", [torch.nn.LayerNorm, torch.nn.Linear, torch.nn.GELU, torch.nn.Embedding])
def test_a_class_level_patch_of_an_inlined_torch_module_is_honoured(cls, monkeypatch):
    """The fast paths compute LayerNorm, Linear, GELU and the embedding lookup from the modules' weights; with the
    torch class's forward replaced (a quantization or logging wrapper) every path calls the modules: the inference
    forward equals the one with autograd, both differ from the unpatched model, and cached generation takes the
    module path (a plan may still call the patched module itself) and equals the uncached one. A replacement made
    before formers was imported turns them off too."""
    from formers.models import lm
    from formers.nn import hooks

    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=64,
                                 block={"mixer": {"name": "softmax", "heads": 4}}).eval()
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        plain = model(x)
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: real(self, *a, **k) * 1.5)
    with torch.no_grad():
        lean = model(x)
    torch.testing.assert_close(lean, model(x).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lean, plain, atol=1e-3)
    assert torch.equal(model.generate(x, 6, greedy=True), model.generate(x, 6, greedy=True, use_cache=False))
    monkeypatch.setattr(cls, "forward", real)
    assert hooks.forward_unpatched(*model.modules()) and lm.decode_plan(model) is not None
    monkeypatch.setattr(hooks, "_TORCH_AS_DEFINED", False)  # as if patched before the import
    assert not hooks.forward_unpatched(*model.modules()) and hooks.torch_forward(cls) is not real


def test_generate_restores_every_modules_mode_also_after_an_error():
    """generate runs in evaluation mode and gives each module its own mode back: a norm frozen in evaluation inside
    a training model, a dropout left training (MC dropout) inside an evaluating one, and after a failed call."""

    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=16).train()
    model.stack.blocks[0].attn.norm.eval()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 4)
    assert model.training and not model.stack.blocks[0].attn.norm.training
    model.eval()
    model.drop.train()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 4)
    assert not model.training and model.drop.training
    model.train()
    with pytest.raises(IndexError):  # an id outside the vocabulary fails inside the embedding
        model.generate(torch.full((1, 3), 99), 2)
    assert all(m.training for m in model.modules())


def test_generate_length_limits_and_edge_settings():
    """Learned positions hold the tokens the model is fed: the prompt and every generated token but the last (a
    64-token prompt still gets one more token at max_len 64); sinusoids have no end (generation past max_len
    equals the uncached one); an empty prompt is a one-line error; a tiny temperature samples the argmax instead
    of failing on inf - inf."""
    from formers.registry import FormersError

    torch.manual_seed(0)
    learned = formers.create_model("lm", vocab=40, dim=32, depth=1, max_len=16).eval()
    x = torch.randint(0, 40, (1, 16))
    assert learned.generate(x, 1).shape == (1, 17)
    with pytest.raises(FormersError, match="learned positions"):
        learned.generate(x, 2)
    sines = formers.create_model("lm", vocab=40, dim=32, depth=1, max_len=16, position="sinusoidal").eval()
    assert torch.equal(sines.generate(x, 8, greedy=True), sines.generate(x, 8, greedy=True, use_cache=False))
    with pytest.raises(FormersError, match="length >= 1"):
        learned.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    m64 = learned.double()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m64.generate(x[:, :8], 5, temperature=1e-40, generator=g), m64.generate(x[:, :8], 5,
                                                                                                greedy=True))


def _plain_mlp(m, x):
    return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, m.fc1.weight, m.fc1.bias)),
                                      m.fc2.weight, m.fc2.bias)


def test_training_fast_path_outputs_take_in_place_changes():
    """The MLP's and a Pre-LN block's outputs in training (the fused GELU + fc2 node) are tensors of their own, not
    views out of a custom Function: a user's in-place change, or a forward hook patching rows of the block's output
    (activation patching), works and back-propagates as on the plain path."""
    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=8).double().train()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.mul_(2)
    (g,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad((2 * _plain_mlp(m, x2)).sum(), x2)[0], atol=1e-12, rtol=0)
    lm = formers.create_model("lm", vocab=20, dim=16, depth=2, max_len=8).double().train()
    ids = torch.randint(0, 20, (2, 8))
    want = lm(ids).detach()
    h = lm.stack.blocks[0].register_forward_hook(lambda mod, a, out: out.__setitem__((slice(None), 0), 0.0))
    patched = lm(ids)
    patched.sum().backward()  # through the in-place write
    h.remove()
    assert not torch.allclose(patched[:, 1:], want[:, 1:])  # the patch reached the later positions


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback
def test_fused_mlp_node_under_forward_ad_and_batched_gradients():
    """The fused GELU + fc2 node has no jvp: under forward-mode AD the MLP takes the plain path (the tangent equals
    the plain formula's); batched gradients (is_grads_batched, vmap over the backward) equal one backward each."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=8).double().train()
    x, t = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
        ref = fwAD.unpack_dual(_plain_mlp(m, fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    xg = x.clone().requires_grad_()
    y = m(xg)
    gs = torch.randn(4, *y.shape, dtype=torch.float64)
    (batched,) = torch.autograd.grad(y, xg, gs, is_grads_batched=True, retain_graph=True)
    for i in range(4):
        torch.testing.assert_close(batched[i], torch.autograd.grad(y, xg, gs[i], retain_graph=True)[0], atol=1e-12,
                                   rtol=0)


@pytest.mark.parametrize("grad", [True, False])
def test_a_hooked_dropout_at_p0_is_called(grad):
    """A dropout at p = 0 is skipped as the identity only while nothing is attached to it: a forward hook (or a
    replaced forward) on the MLP's output dropout or a block's sublayer dropout runs, with and without autograd."""
    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=8).eval()
    x = torch.randn(2, 3, 8)
    m.drop.register_forward_hook(lambda mod, a, out: torch.zeros_like(out))
    with torch.set_grad_enabled(grad):
        assert not m(x).any()
    lm = formers.create_model("lm", vocab=20, dim=16, depth=1, max_len=8).eval()
    pre = lm.stack.blocks[0].ffn
    h = torch.randn(2, 8, 16)
    pre.drop.forward = lambda u: torch.zeros_like(u)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(pre(h), h)  # the sublayer's update dropped whole: x + 0


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback
def test_vmap_over_feed_forward_weights_only_without_autograd():
    """torch.func.vmap over a batch of fc2 weights with one unbatched input, without autograd: the residual (not
    batched) is not written in place by the batched update; each member equals its own forward."""
    from torch.func import functional_call, vmap

    torch.manual_seed(0)
    lm = formers.create_model("lm", vocab=40, dim=32, depth=1, max_len=64).eval()
    x = torch.randn(2, 5, 32)
    p = {k: v.detach() for k, v in lm.stack.named_parameters()}
    names = ["blocks.0.ffn.fn.fc2.weight", "blocks.0.ffn.fn.fc2.bias"]
    batched = {k: p[k] + 0.01 * torch.randn(3, *p[k].shape) for k in names}
    with torch.no_grad():
        y = vmap(lambda q, x: functional_call(lm.stack, q, (x,)), in_dims=(0, None))(batched, x)
        for i in range(3):
            torch.testing.assert_close(y[i], functional_call(lm.stack, {k: v[i] for k, v in batched.items()}, (x,)),
                                       atol=1e-5, rtol=1e-5)


def _attention_calling_modules(m, x, mask=None):
    """Self-attention computed by calling m.q, m.kv and m.out as modules (so a replaced forward runs), masks
    explicit; a query row with no allowed key gives 0 before the output projection."""
    B, N, _ = x.shape
    H, Hkv, Dh = m.heads, m.kv_heads, m.head_dim
    q = m.q(x).reshape(B, N, H, Dh).transpose(1, 2)
    kv = m.kv(x)
    k = kv[..., : Hkv * Dh].reshape(B, N, Hkv, Dh).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = kv[..., Hkv * Dh:].reshape(B, N, Hkv, Dh).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) * Dh ** -0.5
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if m.causal:
        allowed = allowed & ~torch.ones(N, N, dtype=torch.bool).triu(1)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return m.out((p @ v).transpose(1, 2).reshape(B, N, H * Dh))


@pytest.mark.parametrize("where", ["instance_q", "instance_kv", "class_linear"])
@pytest.mark.parametrize("grad", [True, False])
def test_attention_runs_a_replaced_projection_forward(where, grad, monkeypatch):
    """The fused q/kv projection reads the weights; a forward replaced on q or kv (or on nn.Linear itself) makes it
    call the modules: the output equals attention computed through them, with and without autograd."""
    torch.manual_seed(0)
    m = make(bias=True).eval()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    if where == "class_linear":
        real = torch.nn.Linear.forward
        monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, t: real(self, t) * 1.5)
    else:
        lin = m.q if where == "instance_q" else m.kv
        lin.forward = lambda t: torch.nn.functional.linear(t, lin.weight, lin.bias) * 1.5
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(m(x), _attention_calling_modules(m, x), atol=1e-10, rtol=1e-10)


def test_attention_mask_and_explicit_path_edge_cases(monkeypatch):
    """A per-instance score_mod is honoured without explicit=True; ALiBi on the explicit path runs in bfloat16
    (its float32 bias cast to the scores' dtype); vmap over per-sample key masks (no host read of the empty rows)
    equals a loop; a key mask given as a list, or a float mask that is not 0/1 (an additive one, which would read
    inverted), is a one-line error."""
    from torch.func import vmap

    from formers.registry import FormersError

    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    base = m(x)
    m.score_mod = lambda s: s * 0.0  # uniform attention over the allowed keys
    assert not torch.allclose(m(x), base)
    del m.score_mod
    lm = formers.create_model("lm", vocab=40, dim=32, depth=1, max_len=16, position="alibi",
                              block={"mixer": {"name": "softmax", "heads": 4, "explicit": True}})
    ids = torch.randint(0, 40, (2, 9))
    ref = lm(ids).detach()
    torch.testing.assert_close(lm.to(torch.bfloat16)(ids).float(), ref, atol=0.1, rtol=0.05)
    masks = torch.ones(3, 2, 5, dtype=torch.bool)
    masks[1, 0, 3:] = False
    masks[2, 1, :] = False  # a batch item with no key at all
    mb = make(causal=False).eval()
    with torch.no_grad():
        y = vmap(lambda mk: mb(x, mask=mk))(masks)
        for i in range(3):
            torch.testing.assert_close(y[i], mb(x, mask=masks[i]), atol=1e-12, rtol=0)
    with pytest.raises(FormersError, match="must be a tensor"):
        mb(x, mask=[[1] * 5] * 2)
    additive = torch.zeros(2, 5, dtype=torch.float64)
    additive[0, 3:] = float("-inf")
    with pytest.raises(FormersError, match="additive mask"):
        mb(x, mask=additive)
    torch.testing.assert_close(mb(x, mask=(additive == 0).double()), mb(x, mask=additive == 0))


def test_model_key_mask_during_chunked_prefill_may_cover_the_chunk_only():
    """With a cache, the model's mask check takes a mask over the new keys alone or over every key, and leaves the
    choice to the mixers: linear attention takes either (the cached keys are folded into its state), equal when the
    cached part of the full mask is all True."""
    torch.manual_seed(0)
    lm = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32, block={"mixer": {"name": "linear"}}).eval()
    ids = torch.randint(0, 40, (2, 8))
    chunk = torch.ones(2, 4, dtype=torch.bool)
    chunk[1, 3] = False
    outs = []
    for mask in (chunk, torch.cat([torch.ones(2, 4, dtype=torch.bool), chunk], 1)):
        cache = lm.new_cache()
        with torch.no_grad():
            lm(ids[:, :4], cache=cache)
            outs.append(lm(ids[:, 4:], cache=cache, mask=mask))
    torch.testing.assert_close(outs[0], outs[1])


# ------------------------------------------------------------- encoder: only the cls token's row of the last block

def _encoder(**kw):
    torch.manual_seed(0)
    m = formers.create_model("encoder", vocab=50, dim=32, depth=3, max_len=40, num_classes=3,
                             **{"block": {"mixer": {"name": "softmax", "heads": 4}}, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_encoder_cls_only_last_block_equals_all_tokens(monkeypatch):
    """With cls pooling in evaluation the encoder's last block computes the cls row alone, its keys masked like
    the full stack's: logits equal every token through every block, with and without padding (a row with one
    valid token included)."""
    from formers.blocks import Block

    m = _encoder()
    calls = []
    real = Block.forward_prefix
    monkeypatch.setattr(Block, "forward_prefix", lambda self, x, n, mask=None: calls.append(x.shape) or
                        real(self, x, n, mask=mask))
    idx = torch.randint(0, 50, (4, 20))
    mask = torch.arange(20)[None] < torch.tensor([20, 5, 12, 1])[:, None]
    with torch.no_grad():
        for mk in (None, mask):
            full = m.forward_head(m.forward_features(idx, mask=mk), mask=mk)
            torch.testing.assert_close(m(idx, mask=mk), full, atol=1e-6, rtol=1e-6)
        padded = m(idx, mask=mask)
        torch.testing.assert_close(padded[3], m(idx[3:4, :1])[0], atol=1e-5, rtol=1e-5)  # padding is not seen
    assert calls == [(4, 21, 32)] * 3 + [(1, 2, 32)]  # cls + 20 tokens; cls + 1 token


@pytest.mark.parametrize("why", ["train", "mean", "rope", "alibi", "dual", "norm_hook", "instance_head",
                                 "instance_features", "norm_train"])
def test_encoder_cls_only_is_off_where_it_does_not_apply(why, monkeypatch):
    from formers.blocks import Block

    kw = {"mean": {"pool": "mean"}, "rope": {"position": "rope"}, "alibi": {"position": "alibi"}}.get(why, {})
    if why == "dual":
        torch.manual_seed(0)
        m = formers.create_model("dual_encoder", vocab=50, dim=32, depth=2, max_len=40, num_classes=3).eval()
        idx = torch.randint(0, 50, (2, 2, 10))
    else:
        m = _encoder(**kw)
        idx = torch.randint(0, 50, (2, 10))
    if why == "train":
        m.train()
    elif why == "instance_head":  # a probe on the mean of every token, set on the instance
        m.forward_head = lambda t, pre_logits=False, mask=None: t.mean(1)[:, :3]
    elif why == "instance_features":  # a wrapper that does not take the shortcut's keyword
        real = m.forward_features
        m.forward_features = lambda idx, mask=None: real(idx, mask=mask) * 2.0
    elif why == "norm_train":
        m.norm.train()
    seen = []
    if why == "norm_hook":
        m.norm.register_forward_hook(lambda *a: seen.append(1))
    monkeypatch.setattr(Block, "forward_prefix", lambda *a, **k: pytest.fail("prefix path taken"))
    assert not m._cls_only()
    y = m(idx)
    torch.testing.assert_close(y, m.forward_head(m.forward_features(idx)))
    assert seen == ([1, 1] if why == "norm_hook" else [])


# --------------------------------------------------- inference: the last linear layer adds into the residual stream

def _block(spec, dim=24, causal=False):
    from formers.blocks import Block

    torch.manual_seed(0)
    b = Block(dim, causal, spec)
    with torch.no_grad():  # non-zero biases, so that a dropped or doubled bias shows
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return b.eval()


def _naive_block(b, x, approximate="none"):
    """x + Wo attn(LN(x)) + bo, then + W2 GELU(W1 LN(.) + b1) + b2: the default block's formulas, written here
    (a missing bias adds nothing)."""
    a, f = b.attn.fn, b.ffn.fn
    B, N, D = x.shape

    def lin(t, m):
        return t @ m.weight.T + (m.bias if m.bias is not None else 0)

    h = torch.nn.functional.layer_norm(x, (D,), b.attn.norm.weight, b.attn.norm.bias, b.attn.norm.eps)
    q = lin(h, a.q).view(B, N, a.heads, a.head_dim).transpose(1, 2)
    k, v = lin(h, a.kv).view(B, N, 2, a.kv_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(a.heads // a.kv_heads, 1), v.repeat_interleave(a.heads // a.kv_heads, 1)
    att = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1) @ v
    z = x + lin(att.transpose(1, 2).reshape(B, N, -1), a.out)
    h = torch.nn.functional.layer_norm(z, (D,), b.ffn.norm.weight, b.ffn.norm.bias, b.ffn.norm.eps)
    return z + lin(torch.nn.functional.gelu(lin(h, f.fc1), approximate=approximate), f.fc2)


def _fusion_off():
    """The fused residual switched off on every PreNorm: the plain path (each sublayer's module output, then
    `x + u`)."""
    from unittest import mock

    from formers.blocks import PreNorm

    return mock.patch.object(PreNorm, "_fuses_residual", lambda self, whole=False: False)


def _plain(fn, *args):
    """fn(*args) with autograd on and the fused residual switched off: the plain path."""
    with _fusion_off():
        return fn(*args).detach()


def _count_add_matmul(monkeypatch) -> list:
    """A list that grows by one at each call of the fused residual's matmul (`blocks.add_matmul`, or
    `GeluLinear.add`, the MLP's GELU and fc2 in one node in training)."""
    from formers import blocks
    from formers.nn.ffn import GeluLinear

    calls = []
    real = blocks.add_matmul
    monkeypatch.setattr(blocks, "add_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_add = GeluLinear.add
    monkeypatch.setattr(GeluLinear, "add", lambda *a, **k: calls.append(1) or real_add(*a, **k))
    return calls


def test_fused_residual_block_equals_naive_block_and_leaves_input_alone(monkeypatch):
    """Without autograd, a Pre-LN block adds its attention output projection and fc2 straight into the stream
    (`linear_add`; fc2 into the attention sublayer's fresh output): equal to the block's formulas written here and
    to the plain path; the caller's input is not written into; both sublayers took the fused path."""
    b = _block({"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2, "bias": True}, "ffn": {"name": "mlp"},
                "dropout": 0.1})  # dropout is the identity in evaluation
    x = torch.randn(3, 11, 24)
    x0 = x.clone()
    calls = _count_add_matmul(monkeypatch)
    with torch.no_grad():
        y = b(x)
    assert len(calls) == 2  # the attention projection, then fc2
    assert torch.equal(x, x0)
    torch.testing.assert_close(y, _naive_block(b, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, _plain(b, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", [
    {"ffn": {"name": "glu"}},  # no forward_split: attention fused, the GLU added as a module output
    {"ffn": "none"},
    {"mixer": {"name": "softmax", "heads": 4, "explicit": True}, "norm": "rmsnorm"},
    {"mixer": {"name": "gated", "heads": 4}},  # output_mod: still split before the projection
    {"mixer": {"name": "mdha", "heads": 4}, "causal": True},  # its own forward: not split
    {"placement": "lns"}, {"placement": "peri"}, {"residual": "gru_gate"},
])
def test_fused_residual_other_blocks_equal_plain_path(spec):
    """Other blocks give the plain path's output under no_grad, fused where their parts allow it."""
    spec = dict(spec)
    causal = spec.pop("causal", False)
    b = _block(spec, causal=causal)
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        y = b(x)
    torch.testing.assert_close(y, _plain(b, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("why", ["out_hook", "fc2_hook", "ffn_hook", "attn_hook", "patched_fc2", "adapted_out",
                                 "train_dropout", "own_forward"])
def test_fused_residual_is_off_where_it_would_differ(why):
    """A hook on the output projection or fc2 sees their output; a hook on the feed-forward sublayer sees an input,
    and one on the attention sublayer an output, that nothing writes into afterwards; a forward replaced on fc2,
    an output projection of another type (an adapter), active dropout and a mixer subclass with its own forward
    (not described by the inherited forward_split) are honoured: each equals the plain path."""
    from formers.nn.attention import SoftmaxAttention

    torch.manual_seed(0)
    b = _block({"dropout": 0.5} if why == "train_dropout" else {})
    x = torch.randn(2, 9, 24)
    seen = []
    if why == "out_hook":
        b.attn.fn.out.register_forward_hook(lambda mod, i, o: seen.append(o))
    elif why == "fc2_hook":
        b.ffn.fn.fc2.register_forward_hook(lambda mod, i, o: seen.append(o))
    elif why == "ffn_hook":
        b.ffn.register_forward_pre_hook(lambda mod, i: seen.append(i[0]))
    elif why == "attn_hook":
        b.attn.register_forward_hook(lambda mod, i, o: seen.append(o))
    elif why == "patched_fc2":
        fc2 = b.ffn.fn.fc2
        fc2.forward = lambda t: torch.nn.functional.linear(t, fc2.weight, fc2.bias) * 2.0
    elif why == "adapted_out":
        class Scaled(torch.nn.Linear):
            def forward(self, t):
                return super().forward(t) * 0.5

        old = b.attn.fn.out
        b.attn.fn.out = Scaled(old.in_features, old.out_features, bias=old.bias is not None)
        b.attn.fn.out.load_state_dict(old.state_dict())
    elif why == "train_dropout":
        b.train()
    elif why == "own_forward":
        b.attn.fn.__class__ = type("Doubled", (SoftmaxAttention,),
                                   {"forward": lambda self, t, **kw: 2 * SoftmaxAttention.forward(self, t, **kw)})
    torch.manual_seed(1)
    with torch.no_grad():
        y = b(x)
    assert len(seen) == (1 if why.endswith("hook") else 0)
    torch.manual_seed(1)
    ref = _plain(b, x)  # the plain path, which writes into nothing
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    if why.endswith("hook"):  # what the hook got under no_grad was that tensor, and nothing overwrote it later
        torch.testing.assert_close(seen[0], seen[1].detach(), atol=1e-6, rtol=1e-6)


def test_fused_residual_models_equal_plain_path():
    """Whole models in evaluation: LM logits and ViT logits under no_grad equal their plain-path values."""
    torch.manual_seed(0)
    lm = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32).eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        a = lm(ids)
    torch.testing.assert_close(a, _plain(lm, ids), atol=1e-5, rtol=1e-5)
    vit = _vit()
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = vit.forward_head(vit.forward_features(img))
    torch.testing.assert_close(a, _plain(lambda t: vit.forward_head(vit.forward_features(t)), img), atol=1e-5,
                               rtol=1e-5)


def test_fused_residual_trains_like_the_plain_path(monkeypatch):
    """In training (autograd on, no active dropout) each Pre-LN sublayer's last linear layer adds into the stream out
    of place, `(x + b) += y W^T`: the output, the input gradient and every parameter gradient equal the block's
    formulas written here and the plain path (float64); both sublayers took the fused path; a second-order gradient
    (a gradient penalty on the input) equals the plain path's; with dropout active the block does not fuse."""
    b = _block({"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2, "bias": True}, "ffn": {"name": "mlp"}})
    b = b.double().train()
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    calls = _count_add_matmul(monkeypatch)
    y, gx, gp = grads(b, x, b)
    assert len(calls) == 2  # the attention projection, then fc2
    with _fusion_off():
        plain = grads(b, x, b)
    naive = grads(b, x, lambda t: _naive_block(b, t))
    for ref in (plain, naive):
        torch.testing.assert_close(y, ref[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gx, ref[1], atol=1e-10, rtol=1e-10)
        for n in gp:
            torch.testing.assert_close(gp[n], ref[2][n], atol=1e-10, rtol=1e-10, msg=n)

    # torch has no double backward of its flash kernel: the second-order check uses the explicit softmax
    b = _block({"mixer": {"name": "softmax", "heads": 4, "bias": True, "explicit": True}}).double().train()

    def penalty():  # d/dtheta |d<y, w>/dx|^2
        b.zero_grad()
        t = x.clone().requires_grad_(True)
        out = b(t)
        (g,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                   t, create_graph=True)
        (g ** 2).sum().backward()
        return {n: p.grad for n, p in b.named_parameters() if p.grad is not None}  # biases after x have none

    calls.clear()
    second = penalty()
    assert len(calls) == 2
    with _fusion_off():
        second_plain = penalty()
    assert second.keys() == second_plain.keys() and len(second) > 10
    for n in second:
        torch.testing.assert_close(second[n], second_plain[n], atol=1e-10, rtol=1e-10, msg=n)

    d = _block({"dropout": 0.5}).train()
    calls.clear()
    d(torch.randn(2, 9, 24)).sum().backward()
    assert calls == []


def test_fused_residual_lm_training_step_equals_plain_path(monkeypatch):
    """A whole LM training step (cross-entropy, backward, AdamW) through the fused residual (both sublayers of both
    blocks took it) gives the plain path's loss, gradients and updated weights."""
    calls = _count_add_matmul(monkeypatch)

    def step(fused):
        torch.manual_seed(0)
        lm = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32).double().train()
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        ids = torch.randint(0, 40, (2, 13))
        with contextlib.nullcontext() if fused else _fusion_off():
            loss = torch.nn.functional.cross_entropy(lm(ids[:, :-1]).reshape(-1, 40), ids[:, 1:].reshape(-1))
            loss.backward()
        g = {n: p.grad.clone() for n, p in lm.named_parameters()}
        opt.step()
        return loss.item(), g, {n: p.detach().clone() for n, p in lm.named_parameters()}

    l1, g1, w1 = step(True)
    assert len(calls) == 4
    l2, g2, w2 = step(False)
    assert len(calls) == 4
    assert abs(l1 - l2) < 1e-12
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-10, rtol=1e-10, msg=n)
        torch.testing.assert_close(w1[n], w2[n], atol=1e-10, rtol=1e-10, msg=n)


def test_add_into_on_a_placement_with_its_own_forward_calls_it():
    """`PreNorm.add_into` on a subclass with its own forward (LayerNorm Scaling, P61) runs that forward."""
    b = _block({"placement": "lns"})
    b.ffn.scale = 0.25  # as if the block were deeper: the scaled norm output must reach the feed-forward
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = b.ffn(x)
        torch.testing.assert_close(b.ffn.add_into(x.clone()), ref, atol=1e-6, rtol=1e-6)


def test_kv_bias_fold_runs_and_equals_plain_attention(monkeypatch):
    """Inference without a mask, positions or cache: the key/value projection runs without its bias (softmax ignores
    q . b_k, the same for every key of a row; b_v passes whole through weights that sum to 1) and W_o b_v joins the
    output bias, with grouped key/value heads; equal to the autograd path and to a naive attention written here."""
    from formers.nn import attention as A

    torch.manual_seed(0)
    m = make(dim=24, heads=6, kv_heads=2, bias=True, causal=False).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # large biases, so that a dropped b_v or a wrong head mapping shows
    x = torch.randn(2, 40, 24, dtype=torch.float64)  # 80 rows: FOLD_MIN_ROWS
    folds = []
    real = A.Affine.__init__
    monkeypatch.setattr(A.Affine, "__init__", lambda self, w, b: folds.append(1) or real(self, w, b))
    with torch.no_grad():
        y = m(x)
    assert folds == [1]
    q = (x @ m.q.weight.T + m.q.bias).view(2, 40, 6, 4).transpose(1, 2)
    k, v = (x @ m.kv.weight.T + m.kv.bias).view(2, 40, 2, 2, 4).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    naive = (((q @ k.transpose(-1, -2)) * 0.5).softmax(-1) @ v).transpose(1, 2).reshape(2, 40, 24)
    torch.testing.assert_close(y, (naive @ m.out.weight.T + m.out.bias).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, m(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["empty_row_mask", "rope", "cache", "gated", "few_rows"])
def test_kv_bias_fold_is_off_where_it_would_differ(why, monkeypatch):
    """A key mask that leaves a row with no key (its output is zero, not b_v), rotary positions (q . R b_k depends
    on the key), a KV cache (its keys must stay whole) and an output_mod (a gate scales b_v too): no fold, and the
    output equals the autograd path. Nor below FOLD_MIN_ROWS rows, where the fold costs more than the bias."""
    from formers.nn import attention as A

    monkeypatch.setattr(A.Affine, "__init__", lambda *a: pytest.fail("kv bias folded"))
    torch.manual_seed(0)
    if why == "gated":
        m = formers.build("mixer", "gated", dim=24, heads=6, bias=True).double()
    else:
        m = make(dim=24, heads=6, bias=True, causal=why in ("rope", "cache"))
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 9 if why == "few_rows" else 40, 24, dtype=torch.float64)
    kw = {}
    if why == "empty_row_mask":
        kw["mask"] = torch.tensor([[True] * 40, [False] * 40])
    elif why == "rope":
        kw["positions"] = formers.build("position", "rope", dim=4, max_len=32)
    c1, c2 = KVCache(), KVCache()
    with torch.no_grad():
        y = m(x, cache=c1, **kw) if why == "cache" else m(x, **kw)
    ref = m(x, cache=c2, **kw) if why == "cache" else m(x, **kw)
    torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)
    if why == "cache":  # the cached keys and values are whole, for whichever path reads them next
        torch.testing.assert_close(c1.k, c2.k.detach()), torch.testing.assert_close(c1.v, c2.v.detach())


def test_generate_under_autocast_takes_the_plain_sum():
    """Under autocast the accumulated matmul would mix dtypes: the lean decoding step and the blocks add
    `F.linear`'s autocast output instead, and cached generation still equals uncached."""
    torch.manual_seed(0)
    m = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32).eval()
    prompt = torch.randint(0, 40, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = m.generate(prompt, 4, greedy=True)
        b = m.generate(prompt, 4, greedy=True, use_cache=False)
    assert a.shape == (2, 9) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)


def test_mc_dropout_in_an_eval_model_still_drops():
    """MC dropout (the model in eval, single Dropout modules switched back to training) keeps dropping: in the MLP's
    output dropout with and without autograd, and in a block's residual dropout under no_grad."""
    from formers.blocks import Block
    from formers.nn.ffn import MLP

    torch.manual_seed(0)
    m = MLP(8, act="relu", dropout=0.5).eval()
    m.drop.train()
    x = torch.randn(1, 64, 8)
    with torch.no_grad():
        assert (m(x) == 0).sum() > 50
    assert (m(x) == 0).sum() > 50
    b = Block(24, False, {"mixer": {"name": "softmax", "heads": 4}, "dropout": 0.5}).eval()
    b.attn.drop.train()
    b.ffn.fn.hidden_drop = torch.nn.Dropout(0.5)  # and the MLP's hidden dropout, switched on alone
    b.ffn.fn.hidden_drop.train()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        assert not torch.equal(b(x), b(x))


@pytest.mark.parametrize("where", ["norm", "identity_norm_fc1"])
def test_add_into_leaves_tensors_held_by_hooks_alone(where):
    """A hook anywhere in the feed-forward sublayer may keep the tensor that add_into would write into (the norm
    gets it; so does fc1 when the norm is an identity, as after folding RepBN): then nothing is written in place,
    and the kept tensor still holds its value from hook time."""
    b = _block({})
    kept, at_hook = [], []
    if where == "norm":
        target = b.ffn.norm
    else:
        b.ffn.norm = torch.nn.Identity()
        target = b.ffn.fn.fc1
    target.register_forward_pre_hook(lambda mod, i: kept.append(i[0]) or at_hook.append(i[0].clone()))
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        y = b(x)
    assert torch.equal(kept[0], at_hook[0])
    torch.testing.assert_close(y, _plain(b, x), atol=1e-6, rtol=1e-6)


def test_generate_refuses_meaningless_sampling_settings():
    from formers.registry import FormersError

    model = formers.create_model("lm", vocab=16, dim=16, depth=1, max_len=32, block={"mixer": {"heads": 2}})
    idx = torch.zeros(1, 3, dtype=torch.long)
    for kw, msg in (({"temperature": -0.5}, "temperature must be >= 0"), ({"top_k": 0}, "top_k must be >= 1"),
                    ({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in")):
        with pytest.raises(FormersError, match=msg):
            model.generate(idx, 4, **kw)
    assert model.generate(idx, 4, top_k=100, top_p=1.0).shape == (1, 7)  # top_k above the vocabulary: no cut


def naive_causal(q, k, v, scale):
    """softmax(q k^T * scale, causal mask) v with the scores materialised, per (batch, head)."""
    n = q.shape[-2]
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("shape,block", [((2, 3, 37, 8), 8), ((2, 2, 64, 16), 32), ((1, 1, 5, 4), 2),
                                         ((2, 2, 40, 8), 64), ((3, 1, 24, 8), 1)])
def test_block_causal_attention_equals_naive_attention(shape, block):
    """Values and q/k/v gradients of the block-causal kernel equal a naive masked softmax, float64: blocks that
    divide N, a ragged last block (37 = 4 x 8 + 5), one block (64 >= 40) and one query per block."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(*shape, dtype=torch.float64)
    y = attention.BlockCausalAttention.apply(q, k, v, 0.3, block)
    ours = torch.autograd.grad(y, (q, k, v), g)
    ref = naive_causal(q, k, v, 0.3)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    for a, b, n in zip(ours, theirs, "qkv"):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"d{n}")


def _count_blocks(monkeypatch):
    calls = []
    real = attention.BlockCausalAttention.apply
    monkeypatch.setattr(attention.BlockCausalAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_block_causal_lm_training_step_equals_sdpa(kv_heads, monkeypatch):
    """A whole LM training step (cross-entropy, backward, AdamW) through the block-causal path (taken by both
    layers) gives SDPA's loss, gradients and updated weights, with as many key/value heads as query heads, grouped
    (GQA: the key/value heads repeated for the kernel) and one (MQA); with the length outside CAUSAL_BLOCKS_LEN, or
    in evaluation without autograd, SDPA runs."""
    calls = _count_blocks(monkeypatch)

    def step(lo, hi):
        monkeypatch.setattr(attention, "CAUSAL_BLOCKS_LEN", (lo, hi))
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", 5)
        torch.manual_seed(0)
        lm = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32,
                                  block={"mixer": {"name": "softmax", "heads": 4, "kv_heads": kv_heads}}
                                  ).double().train()
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        ids = torch.randint(0, 40, (3, 24))
        loss = torch.nn.functional.cross_entropy(lm(ids[:, :-1]).reshape(-1, 40), ids[:, 1:].reshape(-1))
        loss.backward()
        g = {n: p.grad.clone() for n, p in lm.named_parameters()}
        opt.step()
        return loss.item(), g, {n: p.detach().clone() for n, p in lm.named_parameters()}

    l1, g1, w1 = step(10, 30)
    assert calls == [(3, 4, 23, 8)] * 2  # q's shape: the key/value heads reach the kernel repeated
    l2, g2, w2 = step(24, 30)  # 23 tokens: below the range
    assert len(calls) == 2
    assert abs(l1 - l2) < 1e-12
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-10, rtol=1e-10, msg=n)
        torch.testing.assert_close(w1[n], w2[n], atol=1e-10, rtol=1e-10, msg=n)
    lm = formers.create_model("lm", vocab=40, dim=32, depth=2, max_len=32,
                              block={"mixer": {"name": "softmax", "heads": 4, "kv_heads": kv_heads}}).double()
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_LEN", (10, 30))
    with torch.no_grad():
        lm(torch.randint(0, 40, (2, 20)))
    assert len(calls) == 2


@pytest.mark.parametrize("why", ["dropout", "mask", "bidirectional", "math_backend", "autocast", "functorch"])
def test_block_causal_is_off_where_it_does_not_apply(why, monkeypatch):
    """Attention dropout, a key-padding mask and bidirectional attention keep SDPA (the block kernel has none of
    them), and so do a user's choice of SDPA's math backend (which has a double backward,
    checked here), autocast (the kernel computes in its inputs' dtype) and torch.func transforms (it has no
    functorch rules; torch.func.grad then gives the plain gradient); the output still equals the naive reference
    where it is deterministic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = _count_blocks(monkeypatch)
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_LEN", (8, 64))
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
    kw = {"dropout": {"dropout": 0.1}, "bidirectional": {"causal": False}}.get(why, {})
    torch.manual_seed(0)
    m = make(**kw).train()
    x = torch.randn(2, 16, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool) if why == "mask" else None
    if why == "functorch":
        g = torch.func.grad(lambda t: m(t).sum())(x)
        torch.testing.assert_close(g, torch.autograd.grad(two_projection_attention(m, x).sum(), x)[0], atol=1e-10,
                                   rtol=1e-10)
        assert calls == []
        return
    if why == "autocast":  # float32 q, k, v under autocast (a mixer may promote them back, as mdha's convolution)
        q = torch.randn(2, 6, 16, 4, requires_grad=True)
        assert attention._takes_causal_blocks(q, q, q, 0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not attention._takes_causal_blocks(q, q, q, 0.0)
        return
    with sdpa_kernel(SDPBackend.MATH) if why == "math_backend" else contextlib.nullcontext():
        y = m(x, mask=mask)
        if why == "math_backend":  # a gradient penalty: the double backward SDPA's math kernel has
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            (g ** 2).sum().backward()
        else:
            y.sum().backward()
    assert calls == []
    if why in ("mask", "math_backend"):
        torch.testing.assert_close(y, two_projection_attention(m, x), atol=1e-10, rtol=1e-10)


def test_block_causal_block_size_follows_the_length(monkeypatch):
    """Training takes blocks of CAUSAL_BLOCK queries below CAUSAL_BLOCK_WIDE_FROM tokens and twice that from there,
    and either gives the naive attention's output and gradients."""
    calls = []
    real = attention.BlockCausalAttention.apply
    monkeypatch.setattr(attention.BlockCausalAttention, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_LEN", (8, 64))
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(attention, "CAUSAL_BLOCK_WIDE_FROM", 20)
    torch.manual_seed(0)
    m = make().train()
    for n, block in ((16, 4), (19, 4), (20, 8), (33, 8)):
        x = torch.randn(2, n, 24, dtype=torch.float64, requires_grad=True)
        y = m(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert calls[-1] == block
        x2 = x.detach().requires_grad_()
        ref = two_projection_attention(m, x2)
        torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), x2)[0], atol=1e-10, rtol=1e-10)
    assert len(calls) == 4


def test_block_causal_mask_ignores_the_default_device():
    """The kernel's cached causal mask is made on its inputs' device: a first call under a `torch.device("meta")`
    default (as when a model is sized on meta) neither fails nor leaves a meta mask for later calls."""
    attention._MASKS.clear()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    with torch.device("meta"):
        y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, naive_causal(q, k, v, 0.5), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attention.BlockCausalAttention.apply(q, k, v, 0.5, 4), naive_causal(q, k, v, 0.5),
                               atol=1e-12, rtol=1e-12)
    assert all(t.device.type == "cpu" for t in attention._MASKS.values())


def test_block_causal_is_not_traced_by_torch_compile(monkeypatch):
    """Under torch.compile the kernel stands aside for SDPA, which inductor compiles itself (tracing the kernel,
    whose mask cache is written inside it, failed on a first compiled call; tests/test_compile.py runs it)."""
    q = torch.randn(1, 2, 256, 8, requires_grad=True)
    assert attention._takes_causal_blocks(q, q, q, 0.0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attention._takes_causal_blocks(q, q, q, 0.0)


def test_block_causal_higher_order_gradients_raise():
    """A gradient taken with create_graph=True through the kernel raises (as SDPA's flash kernel does) instead of
    silently dropping the attention's second-order terms; first-order gradients are unchanged."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.pow(2).sum(), q, create_graph=True)
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    (g,) = torch.autograd.grad(y.pow(2).sum(), q)
    torch.testing.assert_close(g, torch.autograd.grad(naive_causal(q, k, v, 0.5).pow(2).sum(), q)[0], atol=1e-12,
                               rtol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback
def test_block_causal_batched_gradients_equal_a_loop():
    """`is_grads_batched=True` (vmap over the backward: what `jacobian(vectorize=True)` uses) through the kernel gives
    each vector's gradient, as one backward per vector does."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    gs = torch.randn(3, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, (q, k, v), gs, is_grads_batched=True, retain_graph=True)
    ref = naive_causal(q, k, v, 0.5)
    for i in range(3):
        for a, b in zip(batched, torch.autograd.grad(ref, (q, k, v), gs[i], retain_graph=True)):
            torch.testing.assert_close(a[i], b, atol=1e-12, rtol=1e-12)


def _count_gelu_linear(monkeypatch) -> list:
    from formers.nn import ffn

    calls = []
    real = ffn._GeluLinearFn.apply
    monkeypatch.setattr(ffn._GeluLinearFn, "apply", lambda *a: calls.append(a[3] is not None) or real(*a))
    return calls


@pytest.mark.parametrize("approximate,bias", [("none", True), ("tanh", False)])
def test_gelu_linear_trains_like_naive_mlp(approximate, bias, monkeypatch):
    """In training, MLP's GELU and fc2 run as one autograd node whose backward overwrites fc2's input gradient with
    GELU's: output, input gradient and every parameter gradient equal the MLP formula written here (float64), as a
    module (fc2 alone) and inside a Pre-LN block (fc2 adding into the stream; against the block's formulas written
    here); the node ran both times."""
    calls = _count_gelu_linear(monkeypatch)
    torch.manual_seed(0)
    m = formers.build("ffn", "mlp", dim=12, mult=3, act={"name": "gelu", "approximate": approximate},
                      bias=bias).double().train()
    x = torch.randn(2, 7, 12, dtype=torch.float64)

    def naive(t):
        b1 = m.fc1.bias if bias else 0
        b2 = m.fc2.bias if bias else 0
        return torch.nn.functional.gelu(t @ m.fc1.weight.T + b1, approximate=approximate) @ m.fc2.weight.T + b2

    ours, ref = grads(m, x, m), grads(m, x, naive)
    assert calls == [False]
    torch.testing.assert_close(ours[0], ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-12, rtol=1e-12)
    for n in ours[2]:
        torch.testing.assert_close(ours[2][n], ref[2][n], atol=1e-12, rtol=1e-12, msg=n)

    blk = _block({"ffn": {"name": "mlp", "act": {"name": "gelu", "approximate": approximate}, "bias": bias}})
    blk = blk.double().train()
    calls.clear()
    xb = torch.randn(2, 7, 24, dtype=torch.float64)
    y, gx, gp = grads(blk, xb, blk)
    assert calls == [True]
    plain = grads(blk, xb, lambda t: _naive_block(blk, t, approximate))
    torch.testing.assert_close(y, plain[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, plain[1], atol=1e-12, rtol=1e-12)
    for n in gp:
        torch.testing.assert_close(gp[n], plain[2][n], atol=1e-12, rtol=1e-12, msg=n)


@pytest.mark.parametrize("why", ["fc2_hook", "act_hook", "hidden_dropout", "dropout", "relu", "no_grad", "autocast",
                                 "functorch"])
def test_gelu_linear_is_off_where_it_does_not_apply(why, monkeypatch):
    """A hook on fc2 or the activation (they must be called), active hidden or output dropout, another activation,
    autocast (the node computes in its input's dtype), torch.func transforms (no functorch rules) and inference keep
    the plain modules; with output dropout active, training drops (zeros in the output)."""
    calls = _count_gelu_linear(monkeypatch)
    kw = {"hidden_dropout": {"hidden_dropout": 0.5}, "dropout": {"dropout": 0.5}, "relu": {"act": "relu"}}
    m = formers.build("ffn", "mlp", dim=12, **kw.get(why, {})).train()
    if why == "functorch":
        x = torch.randn(2, 5, 12)
        g = torch.func.grad(lambda t: m(t).sum())(x)
        torch.testing.assert_close(g, torch.autograd.grad(m.fc2(m.act(m.fc1(x.requires_grad_()))).sum(), x)[0])
        assert calls == []
        return
    if why == "dropout":
        assert (m(torch.randn(4, 50, 12)) == 0).float().mean() > 0.3
        assert calls == []
        return
    seen = []
    if why == "fc2_hook":
        m.fc2.register_forward_hook(lambda mod, i, o: seen.append(1))
    if why == "act_hook":
        m.act.register_forward_hook(lambda mod, i, o: seen.append(1))
    ctx = {"no_grad": torch.no_grad(), "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}
    with ctx.get(why, contextlib.nullcontext()):
        m(torch.randn(2, 5, 12))
    assert calls == []
    assert seen == ([1] if why.endswith("hook") else [])


def test_gelu_linear_double_backward_and_odd_residuals():
    """The node's backward is differentiable where autograd asks for it (create_graph): gradgradcheck in float64
    through a, W, b and the residual; a residual the node cannot start from (its last dimension broadcasts) gives
    res + fc2(GELU(a)) as plain ops do."""
    from formers.nn.ffn import GeluLinear, _GeluLinearFn

    torch.manual_seed(0)
    a = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradgradcheck(lambda *t, ap=approximate: _GeluLinearFn.apply(*t, ap), (a, w, b, r))
        assert torch.autograd.gradgradcheck(lambda *t, ap=approximate: _GeluLinearFn.apply(*t, None, ap), (a, w, b))
    fc2 = torch.nn.Linear(5, 4).double()
    res = torch.randn(2, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(GeluLinear(fc2, "none").add(res, a), res + fc2(torch.nn.functional.gelu(a)))


# ------------------------------------------------- inference: lean blocks (one check per block, no module calls)

def _lean_off():
    """The stack's lean inference switched off: every block runs through its modules (and their fused paths)."""
    from unittest import mock

    from formers.blocks import PlainStack

    return mock.patch.object(PlainStack, "lean_plans", lambda self, x, blocks, **k: None)


def _count_lean(monkeypatch) -> list:
    from formers import blocks

    calls = []
    real = blocks.lean_block
    monkeypatch.setattr(blocks, "lean_block", lambda p, x, masks=None, **k: calls.append(x.shape) or
                        real(p, x, masks, **k))
    return calls


def _lm(**kw):
    torch.manual_seed(0)
    m = formers.create_model("lm", vocab=40, dim=32, depth=3, max_len=256, **kw).eval()
    with torch.no_grad():  # biases and norm gains off their init, so that a dropped or doubled term shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


LEAN_MODELS = {  # name: (model, input, blocks that run lean)
    "vit_token": (lambda: _vit(), lambda: torch.randn(3, 3, 16, 16), 1),  # the last block: class-token row only
    "vit_avg": (lambda: _vit(global_pool="avg"), lambda: torch.randn(3, 3, 16, 16), 2),
    "vit_rope_2d": (lambda: _vit(pos_embed="rope"), lambda: torch.randn(3, 3, 16, 16), 2),  # axial rotary (GridRotary)
    "encoder_bias_gqa": (lambda: _encoder(pool="mean", block={"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2,
                                                                          "bias": True}}),
                         lambda: torch.randint(0, 50, (3, 30)), 3),  # 93 rows: the value bias folded
    # 4 x 200 rows x 128 hidden: fc1's output takes the in-place GELU (IN_PLACE_MIN)
    "lm_gpt2_in_place_gelu": (lambda: _lm(block=LEAN_CONFIGS["gpt2"]["block"], tie_embeddings=True),
                              lambda: torch.randint(0, 40, (4, 200)), 3),
    "lm_rms_glu_relu": (lambda: _lm(block={"norm": "rmsnorm", "mixer": {"name": "softmax", "heads": 4},
                                           "ffn": {"name": "glu"}},
                                    layers={"1": {"ffn": {"name": "mlp", "act": "relu"}}, "2": {"ffn": "none"}}),
                        lambda: torch.randint(0, 40, (2, 9)), 3),
    "lm_one_explicit_layer": (lambda: _lm(block={"mixer": {"name": "softmax", "heads": 4}},
                                          layers={"1": {"mixer": {"name": "softmax", "heads": 4, "explicit": True}}}),
                              lambda: torch.randint(0, 40, (2, 9)), 2),
    # key masks: a row with one valid token and a row with none (its attention output is zeroed)
    "encoder_mask_mean": (lambda: _encoder(pool="mean", block={"mixer": {"name": "softmax", "heads": 4,
                                                                           "bias": True}}),
                          lambda: (torch.randint(0, 50, (4, 30)), _key_mask([30, 1, 17, 0])), 3),
    "encoder_mask_cls": (lambda: _encoder(), lambda: (torch.randint(0, 50, (3, 20)), _key_mask([20, 3, 11])), 2),
    "lm_mask": (lambda: _lm(), lambda: (torch.randint(0, 40, (3, 12)), _key_mask([12, 5, 1])), 3),
    # rotary positions (the value bias not folded: rows >= FOLD_MIN_ROWS), partial rotary with GQA, and with a mask
    "lm_rope_bias": (lambda: _lm(position="rope", block={"mixer": {"name": "softmax", "heads": 4, "bias": True}}),
                     lambda: torch.randint(0, 40, (3, 30)), 3),
    "lm_rope_partial_gqa": (lambda: _lm(position={"name": "rope", "fraction": 0.5},
                                        block={"mixer": {"name": "softmax", "heads": 4, "kv_heads": 2}}),
                            lambda: torch.randint(0, 40, (2, 9)), 3),
    "lm_rope_mask": (lambda: _lm(position="rope"), lambda: (torch.randint(0, 40, (3, 12)), _key_mask([12, 5, 1])), 3),
    # ALiBi's score bias: causal, with a key mask, and bidirectional (an encoder, 6 heads: not a power of two)
    "lm_alibi": (lambda: _lm(position="alibi"), lambda: torch.randint(0, 40, (2, 9)), 3),
    "lm_alibi_mask": (lambda: _lm(position="alibi"), lambda: (torch.randint(0, 40, (3, 12)), _key_mask([12, 5, 1])),
                      3),
    "encoder_alibi_mask": (lambda: _encoder(pool="mean", position="alibi",
                                            block={"mixer": {"name": "softmax", "heads": 6, "head_dim": 4}}),
                           lambda: (torch.randint(0, 50, (3, 20)), _key_mask([20, 0, 7])), 3),
}


def _key_mask(lengths: list[int]) -> torch.Tensor:
    return torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("name", list(LEAN_MODELS))
def test_lean_blocks_equal_the_module_path_bit_for_bit(name, monkeypatch):
    """In inference the stack runs its standard blocks from one plan each (`block_plan`, `lean_block`): the output is
    the module path's to the bit (the same ops in the same order), with GQA, biases (the folded value bias), tanh and
    in-place GELU, RMSNorm, GLU, ReLU, a layer without feed-forward, a layer left to its modules and key masks (an
    encoder's, with an all-padding row; an LM's, causal); and close to the plain path (fused residuals off, every
    sublayer's module output added)."""
    make, inp, n_lean = LEAN_MODELS[name]
    m, x = make(), inp()
    x, kw = (x, {}) if isinstance(x, torch.Tensor) else (x[0], {"mask": x[1]})
    calls = _count_lean(monkeypatch)
    with torch.no_grad():
        y = m(x, **kw)
        assert len(calls) == n_lean
        with _lean_off():
            ref = m(x, **kw)
        with _lean_off(), _fusion_off():
            plain = m(x, **kw)
    assert len(calls) == n_lean
    assert torch.equal(y, ref)
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    if kw:  # every token's features too: pooling or a loss may ignore the rows that padding leaves empty
        with torch.no_grad():
            h = m.forward_features(x, **kw)
            with _lean_off():
                assert torch.equal(h, m.forward_features(x, **kw))


def test_lean_vit_equals_the_naive_vit_and_leaves_its_input_alone(monkeypatch):
    """Every token through every block against the ViT of the plain formulas written above (class-token logits from
    the whole stack's output); the stack's input is not written into."""
    m = _vit()
    x = torch.randn(2, 3, 16, 16)
    calls = _count_lean(monkeypatch)
    with torch.no_grad():
        h = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x)], 1)
        h = m.pos(h, grid=m.patch_embed.grid(16, 16))
        before = h.clone()
        out = m.stack(h)
        logits = m.norm(out)[:, 0] @ m.head.weight.T + m.head.bias
    assert len(calls) == 2 and torch.equal(h, before)
    torch.testing.assert_close(logits, _naive_vit_logits(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["grad", "train", "dropout_training", "hook", "global_hook", "patched_forward",
                                 "output_mod", "out_subclass", "moe_mask", "autocast", "post", "lns",
                                 "stack_run", "run_on_instance", "split_on_instance", "class_patch"])
def test_lean_blocks_are_off_where_they_would_differ(why, monkeypatch):
    """Autograd, training mode (the whole model or one dropout), a hook on a module or a global one, a forward or
    `output_mod` replaced on an instance, an adapted output projection, a key mask with an MoE feed-forward (which
    takes it), autocast,
    Post-LN / LNS placements, a stack with its own `run` (in its class or on the instance) or a method patched on a
    class keep the affected blocks on the module path, and the output is the module path's (hooks fire, replacements
    run). An MLP whose `forward_split` is replaced on the instance stays lean but is called, as the module path
    calls it."""
    kw = {"post": {"block": {"placement": "post"}}, "lns": {"block": {"placement": "lns"}}}.get(why, {})
    if why == "moe_mask":  # MoE capacity takes the key mask, which the module path hands it
        kw = {"block": {"mixer": {"name": "softmax", "heads": 4}, "ffn": {"name": "moe", "experts": 4}}}
    m = _encoder(pool="mean", **kw) if why == "moe_mask" else _lm(**kw)
    x = torch.randint(0, 50 if why == "moe_mask" else 40, (2, 9))
    fkw = {"mask": torch.arange(9)[None] < torch.tensor([9, 4])[:, None]} if why == "moe_mask" else {}
    expect = 0  # blocks that may still run lean
    seen = []
    blk = m.stack.blocks[0]
    if why == "train":
        m.train()
    elif why == "dropout_training":
        blk.ffn.fn.drop.p = 0.5
        blk.ffn.fn.drop.train()
        expect = 2
    elif why == "hook":
        blk.ffn.fn.fc1.register_forward_hook(lambda *a: seen.append(1))
        expect = 2
    elif why == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(1)
                                                                       if mod is blk.ffn.fn.fc1 else None)
    elif why == "patched_forward":
        out = blk.attn.fn.out
        out.forward = lambda t: torch.nn.functional.linear(t, out.weight) * 2.0
        expect = 2
    elif why == "output_mod":
        blk.attn.fn.output_mod = lambda y, x: y * 0.5
        expect = 2
    elif why == "out_subclass":
        class Adapted(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) + 0.5 * x.flip(-1)

        blk.attn.fn.out.__class__ = Adapted
        expect = 2
    elif why == "stack_run":
        from formers.blocks import PlainStack

        class Logged(PlainStack):
            def run(self, block, x, **k):
                seen.append(1)
                return super().run(block, x, **k)

        m.stack.__class__ = Logged
    elif why == "run_on_instance":
        real_run = m.stack.run
        m.stack.run = lambda block, h, **k: seen.append(1) or real_run(block, h, **k)
    elif why == "split_on_instance":
        mlp = blk.ffn.fn
        real_split = mlp.forward_split
        mlp.forward_split = lambda h: seen.append(1) or (lambda y, out: (y * 0.5, out))(*real_split(h))
        expect = 3
    elif why == "class_patch":  # e.g. a user's wrapper that records what attention computes
        from formers.nn.attention import SoftmaxAttention

        real_split = SoftmaxAttention.forward_split
        monkeypatch.setattr(SoftmaxAttention, "forward_split", lambda self, h, **k: seen.append(1) or
                            real_split(self, h, **k))
    calls = _count_lean(monkeypatch)
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if why == "autocast" else
           torch.enable_grad() if why == "grad" else contextlib.nullcontext())
    try:
        with torch.no_grad(), ctx:
            torch.manual_seed(1)
            y = m(x, **fkw)
            n = len(calls)
            with _lean_off():
                torch.manual_seed(1)
                ref = m(x, **fkw)
    finally:
        if why == "global_hook":
            handle.remove()
    assert n == expect
    if why != "dropout_training":  # two dropout draws differ; the mask is what shows it stayed on the module path
        assert torch.equal(y, ref)
    if why in ("hook", "global_hook"):
        assert seen == [1, 1]
    if why in ("stack_run", "run_on_instance", "class_patch"):
        assert len(seen) == 2 * 3  # three blocks, two forwards
    if why == "split_on_instance":
        assert seen == [1, 1]


@pytest.mark.parametrize("replaced", ["rotate", "bias"])
def test_lean_blocks_call_the_positions_as_the_attention_does(replaced, monkeypatch):
    """Relative positions are called, not copied: a rotary encoding whose `rotate` or `bias` is replaced on the
    instance runs lean with the replacement (called once per block, as the module path calls it), to the bit; and
    so does generation's decode step."""
    from formers.models import lm

    m = _lm(position="rope")
    seen = []
    pos = m.position
    if replaced == "rotate":
        real = pos.rotate
        pos.rotate = lambda q, k, qp, kp: seen.append(1) or tuple(t * 0.5 for t in real(q, k, qp, kp))
    else:
        pos.bias = lambda qp, kp, heads: seen.append(1) or -0.1 * (qp[:, None] - kp[None, :]).abs().float().expand(
            heads, -1, -1)
    calls = _count_lean(monkeypatch)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        y = m(x)
        with _lean_off():
            ref = m(x)
    assert len(calls) == 3 and len(seen) == 6 and torch.equal(y, ref)
    assert lm.decode_plan(m) is not None
    prompt = torch.randint(0, 40, (2, 5))
    assert torch.equal(m.generate(prompt, 8, greedy=True), m.generate(prompt, 8, greedy=True, use_cache=False))


@pytest.mark.parametrize("act", ["gelu", "relu"])  # the inlined MLP; through forward_split
def test_lean_blocks_on_a_non_contiguous_input_equal_the_module_path(act, monkeypatch):
    """A stack input that is a transposed view (as a patch embedding's output can be at batch 1) makes the attention
    sublayer's output non-contiguous: the module path then adds the feed-forward out of place, and so must a plan
    (in place it would round differently)."""
    m = _lm(block={"mixer": {"name": "softmax", "heads": 4, "bias": True}, "ffn": {"name": "mlp", "act": act}})
    calls = _count_lean(monkeypatch)
    for x in (torch.randn(1, 32, 24).transpose(1, 2), torch.randn(5, 32).unsqueeze(1)):  # (1, 24, 32), (5, 1, 32)
        with torch.no_grad():
            y = m.stack(x)
            with _lean_off():
                ref = m.stack(x)
        assert torch.equal(y, ref)
    assert len(calls) == 2 * 3


def test_lean_blocks_leave_a_key_mask_of_the_wrong_shape_to_the_module_path():
    """The module path's one-line error, not a lean one."""
    m = _encoder(pool="mean")
    with torch.no_grad(), pytest.raises(formers.registry.FormersError, match="attention mask must have shape"):
        m.stack(torch.randn(2, 9, 32), mask=torch.ones(2, 10, dtype=torch.bool))  # the lean stack, called directly
    with torch.no_grad(), pytest.raises(formers.registry.FormersError, match="mask must have shape"):
        m.forward_features(torch.randint(0, 50, (2, 9)), mask=torch.ones(2, 10, dtype=torch.bool))  # the model's
