"""Synthesizer, Reformer and Sinkhorn attention (LRA baselines, P29) against naive loop references written here.

Every reference re-derives the mechanism from its definition (explicit bucket ids, sort orders, chunk rules,
Sinkhorn sweeps, per-row softmax) in float64 and is compared on values and input gradients."""

import math

import pytest
import torch

import formers
from formers.nn.attention import KVCache
from formers.nn.lra_baselines import sinkhorn
from formers.nn.position import alibi_slopes

D, H = 16, 4
DH = D // H


def build(name, causal=False, **kw):
    return formers.build("mixer", name, dim=D, heads=H, causal=causal, **kw).double()


def grads(y, ref, x, x2):
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    (gr,) = torch.autograd.grad((ref * g).sum(), x2)
    return gx, gr


def pair(*shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return x, x.detach().clone().requires_grad_(True)


def softmax_rows(logits, keys, values):
    """out[i] = sum_{j in keys[i]} softmax_j(logits[i, j]) values[j]; zeros when keys[i] is empty."""
    N = logits.shape[0]
    out = torch.zeros(N, values.shape[1], dtype=values.dtype)
    rows = []
    for i in range(N):
        js = keys[i]
        if not js:
            rows.append(out[i])
            continue
        p = torch.softmax(torch.stack([logits[i, j] for j in js]), 0)
        rows.append(sum(p[a] * values[j] for a, j in enumerate(js)))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------- synthesizer


def naive_synthesizer(m, x, causal=False, key_mask=None, bias=None):
    """Logits per head written out from the paper's formulas, looping over batch, heads and query rows."""
    B, N, _ = x.shape
    v = x @ m.v.weight.T
    out = torch.zeros(B, N, D, dtype=x.dtype)
    for b in range(B):
        hidden = torch.relu(x[b] @ m.w1.weight.T + m.w1.bias) if m.kind == "dense" else None
        if m.vanilla:
            qk = x[b] @ m.qk.weight.T
        for h in range(H):
            sl = slice(h * DH, (h + 1) * DH)
            logits = torch.zeros(N, N, dtype=x.dtype)
            for i in range(N):
                for j in range(N):
                    if m.kind == "dense":
                        s = hidden[i, sl] @ m.w2[h, :, j] + m.b2[h, j]
                    elif m.kind == "random":
                        s = m.r[h, i, j]
                    else:
                        s = (m.r1[h, i] * m.r2[h, j]).sum()
                    if m.vanilla:
                        s = s + qk[i, sl] @ qk[j, D + h * DH:D + (h + 1) * DH] / math.sqrt(DH)
                    if bias is not None:
                        s = s + bias[h, i, j]
                    logits[i, j] = s
            keys = [[j for j in range(N) if not (causal and j > i) and (key_mask is None or key_mask[b, j])]
                    for i in range(N)]
            out[b, :, sl] = softmax_rows(logits, keys, v[b, :, sl])
    return out @ m.out.weight.T


SYNTH_KINDS = [dict(kind="dense"), dict(kind="random"), dict(kind="factorized_random", rank=3),
               dict(kind="random", vanilla=True, trainable=False)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", SYNTH_KINDS)
def test_synthesizer_matches_naive(causal, opts):
    m = build("synthesizer", causal, max_len=9, **opts)  # N = 6 < max_len: the top-left block is used
    if m.kind == "dense":
        with torch.no_grad():
            m.b2.normal_()  # initialised to zero; make it count
    x, x2 = pair(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[0, 0] = False  # with causal, query 0 of batch 0 sees no key: zeros, never NaN
    y = m(x, mask=mask)
    ref = naive_synthesizer(m, x2, causal, mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*grads(y, ref, x, x2), atol=1e-10, rtol=1e-10)
    if causal:
        assert (y[0, 0] == 0).all()


def test_synthesizer_alibi_bias_matches_naive():
    m = build("synthesizer", True, max_len=8, kind="random")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    i = torch.arange(7)
    bias = -alibi_slopes(H).double()[:, None, None] * (i[:, None] - i[None, :]).abs()
    alibi = formers.build("position", "alibi", dim=D)
    torch.testing.assert_close(m(x, positions=alibi), naive_synthesizer(m, x, True, bias=bias),
                               atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("opts", SYNTH_KINDS)
def test_synthesizer_cache_equals_full_and_no_leak(opts):
    m = build("synthesizer", True, max_len=12, **opts)
    rope = formers.build("position", "rope", dim=D) if opts.get("vanilla") else None
    x = torch.randn(2, 10, D, dtype=torch.float64)
    full = m(x, positions=rope)
    cache = KVCache()
    parts = [m(x[:, a:b], positions=rope, cache=cache) for a, b in [(0, 3), (3, 4), (4, 9), (9, 10)]]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=1e-10)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, D, dtype=torch.float64)
    y2 = m(x2, positions=rope)
    assert torch.equal(y2[:, :6], full[:, :6]) and not torch.allclose(y2[:, 6:], full[:, 6:])


def test_synthesizer_fixed_random_is_a_buffer_and_lengths_are_checked():
    m = build("synthesizer", max_len=8, kind="random", trainable=False)
    assert "r" in m.state_dict() and all(p is not m.r for p in m.parameters())
    assert build("synthesizer", max_len=8, kind="random").r.requires_grad
    with pytest.raises(formers.FormersError, match="max_len=8"):
        m(torch.randn(1, 9, D, dtype=torch.float64))
    c = build("synthesizer", True, max_len=8)
    cache = KVCache()
    c(torch.randn(1, 6, D, dtype=torch.float64), cache=cache)
    with pytest.raises(formers.FormersError, match="max_len=8"):
        c(torch.randn(1, 3, D, dtype=torch.float64), cache=cache)
    with pytest.raises(formers.FormersError, match="kind"):
        formers.build("mixer", {"name": "synthesizer", "kind": "dense_random"}, dim=D, max_len=8)
    with pytest.raises(formers.FormersError, match="context"):
        m(torch.randn(1, 4, D, dtype=torch.float64), context=torch.randn(1, 4, D, dtype=torch.float64))


def test_synthesizer_lm_generation_cached_equals_uncached():
    model = formers.create_model("lm", vocab=30, dim=32, depth=1, max_len=32, position="rope",
                                 block={"mixer": {"name": "synthesizer", "heads": 4, "vanilla": True}}).eval()
    prompt = torch.randint(0, 30, (2, 4))
    assert torch.equal(model.generate(prompt, 8, greedy=True), model.generate(prompt, 8, greedy=True,
                                                                                use_cache=False))


# ---------------------------------------------------------------------------------------------------- reformer


def naive_reformer(m, x, key_mask=None):
    """The LSH attention definition, explicitly: bucket ids by argmax over [xR, -xR]; slots from a sorted list of
    (bucket, position) (causal: every bucket starts a new chunk); allowed keys per round = same bucket, key's
    chunk is the query's or the one before, real, and j <= i when causal; union over rounds; self excluded
    unless it is the only key; one softmax over the union."""
    B, N, _ = x.shape
    R, nb, m_ = m.hashes, m.buckets, m.chunk
    qk_all, v_all = x @ m.qk.weight.T, x @ m.v.weight.T
    out = torch.zeros(B, N, D, dtype=x.dtype)
    for b in range(B):
        real = [key_mask is None or bool(key_mask[b, j]) for j in range(N)]
        for h in range(H):
            sl = slice(h * DH, (h + 1) * DH)
            q = qk_all[b, :, sl]
            k = q / q.norm(dim=-1, keepdim=True)
            keys = [set() for _ in range(N)]
            for r in range(R):
                rot = m.rotations[h, r]
                bucket = [int(torch.cat([q[i] @ rot, -(q[i] @ rot)]).argmax()) if real[i] else nb
                          for i in range(N)]
                order = sorted(range(N), key=lambda i: (bucket[i], i))
                slot, nxt = {}, 0
                for idx, i in enumerate(order):
                    if m.causal and (idx == 0 or bucket[order[idx - 1]] != bucket[i]):
                        nxt = -(-nxt // m_) * m_  # a new bucket starts at a chunk boundary
                    slot[i] = nxt
                    nxt += 1
                for i in range(N):
                    for j in range(N):
                        if (real[j] and bucket[i] == bucket[j] and slot[i] // m_ - slot[j] // m_ in (0, 1)
                                and not (m.causal and j > i)):
                            keys[i].add(j)
            scores = q @ k.T / math.sqrt(DH)
            rows = [sorted(ks - {i}) or sorted(ks) for i, ks in enumerate(keys)]
            out[b, :, sl] = softmax_rows(scores, rows, v_all[b, :, sl])
    return out @ m.out.weight.T


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hashes", [1, 3])
def test_reformer_matches_naive_lsh_definition(causal, hashes):
    m = build("reformer", causal, buckets=4, chunk=3, hashes=hashes, seed=1)
    x, x2 = pair(2, 13, D)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    mask[1, 2] = False
    y = m(x, mask=mask)
    ref = naive_reformer(m, x2, mask)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*grads(y, ref, x, x2), atol=1e-10, rtol=1e-10)
    assert (y[1, 9:] == 0).all() and (y[1, 2] == 0).all()  # padded queries see no real key in their bucket


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hashes", [1, 2])
def test_reformer_one_bucket_one_chunk_is_shared_qk_attention(causal, hashes):
    """Zero rotations put every token in bucket 0; chunk >= N gives one chunk: full shared-QK attention where
    q_i . q_j / (|q_j| sqrt(Dh)) is softmaxed over every other (earlier, if causal) token, and a query with no
    other key attends to itself."""
    m = build("reformer", causal, chunk=16, hashes=hashes)
    m.rotations.zero_()
    x, x2 = pair(2, 9, D)
    y = m(x)
    q = (x2 @ m.qk.weight.T).view(2, 9, H, DH).transpose(1, 2)  # (B, H, N, Dh)
    k = q / q.norm(dim=-1, keepdim=True)
    s = q @ k.transpose(-1, -2) / math.sqrt(DH)
    eye = torch.eye(9, dtype=torch.bool)
    allowed = ~eye & (torch.ones(9, 9).tril().bool() if causal else True)
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))
    attn = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    v = (x2 @ m.v.weight.T).view(2, 9, H, DH).transpose(1, 2)
    ref = (attn @ v).transpose(1, 2).reshape(2, 9, D) @ m.out.weight.T
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*grads(y, ref, x, x2), atol=1e-10, rtol=1e-10)


def test_reformer_bidirectional_is_permutation_equivariant():
    """With one chunk the allowed sets are 'same bucket in some round', which does not depend on order."""
    m = build("reformer", buckets=4, chunk=16, hashes=2, seed=3)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    perm = torch.randperm(11)
    y = m(x)
    torch.testing.assert_close(m(x[:, perm]), y[:, perm], atol=1e-12, rtol=1e-12)
    # the hashing is not trivial here: several buckets are in use
    ids = m.hash((x @ m.qk.weight.T).view(2, 11, H, DH).transpose(1, 2), torch.ones(2, 11, dtype=torch.bool))
    assert len(ids.unique()) > 1


def test_reformer_causal_does_not_leak():
    m = build("reformer", True, buckets=4, chunk=3, hashes=2, seed=2)
    x = torch.randn(2, 20, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 11:] = torch.randn(2, 9, D, dtype=torch.float64)
    y2 = m(x2)
    assert torch.equal(y2[:, :11], y[:, :11].detach()) and not torch.allclose(y2[:, 11:], y[:, 11:])
    y[:, 7].sum().backward()
    assert x.grad[:, 8:].abs().max() == 0 and x.grad[:, :8].abs().max() > 0
    # the same holds for prefixes: the first n outputs do not depend on the sequence length
    torch.testing.assert_close(m(x2[:, :11]), y2[:, :11], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_padded_keys_do_not_influence(causal):
    m = build("reformer", causal, buckets=4, chunk=3, hashes=2)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 3] = mask[0, 8:] = False
    x2 = x.clone()
    x2[~mask] = 100 * torch.randn(int((~mask).sum()), D, dtype=torch.float64)
    torch.testing.assert_close(m(x2, mask=mask)[mask], m(x, mask=mask)[mask], atol=1e-12, rtol=1e-12)


def test_reformer_rotations_fixed_or_redrawn():
    x = torch.randn(1, 24, D, dtype=torch.float64)
    fixed = build("reformer", buckets=8, chunk=4).train()
    assert torch.equal(fixed(x), fixed(x))
    assert torch.equal(build("reformer", seed=5).rotations, build("reformer", seed=5).rotations)
    redraw = build("reformer", buckets=8, chunk=4, redraw=True).train()
    assert not torch.allclose(redraw(x), redraw(x))
    redraw.eval()
    assert torch.equal(redraw(x), redraw(x))


def test_reformer_errors():
    m = build("reformer", True)
    x = torch.randn(1, 4, D, dtype=torch.float64)
    assert m.supports_cache is False
    with pytest.raises(formers.FormersError, match="cache"):
        m(x, cache=KVCache())
    with pytest.raises(formers.FormersError, match="alibi"):
        m(x, positions=formers.build("position", "alibi", dim=D))
    with pytest.raises(formers.FormersError, match="even"):
        build("reformer", buckets=5)


# ---------------------------------------------------------------------------------------------------- sinkhorn


def naive_sinkhorn_balance(logits, iters, temperature):
    """Exp-space Sinkhorn: S = exp(R / t); repeat: divide each row by its sum, then each column by its sum."""
    S = torch.exp(logits / temperature)
    n = S.shape[0]
    for _ in range(iters):
        S = torch.stack([S[i] / S[i].sum() for i in range(n)])
        S = torch.stack([S[:, j] / S[:, j].sum() for j in range(n)], dim=1)
    return S


def test_sinkhorn_operator_is_doubly_stochastic_and_matches_exp_space():
    logits = torch.randn(3, 7, 7, dtype=torch.float64) * 2
    P = sinkhorn(logits, 50, 0.75)
    torch.testing.assert_close(P.sum(-1), torch.ones(3, 7, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(P.sum(-2), torch.ones(3, 7, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (P > 0).all()
    one = sinkhorn(logits, 1, 0.75)  # after one sweep columns are normalised, rows not yet
    torch.testing.assert_close(one.sum(-2), torch.ones(3, 7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (one.sum(-1) - 1).abs().max() > 1e-3
    for b in range(3):
        torch.testing.assert_close(sinkhorn(logits[b], 4, 0.5), naive_sinkhorn_balance(logits[b], 4, 0.5),
                                   atol=1e-12, rtol=1e-12)


def naive_sinkhorn_attention(m, x, key_mask=None):
    """Blocks of size b; SortNet on summed keys; exp-space Sinkhorn; sorted blocks as explicit sums; each query
    softmaxes over its own block's real keys and the sorted block's slots that hold some real key."""
    B, N, _ = x.shape
    b = m.block
    NB = -(-N // b)
    q_all, kv = x @ m.q.weight.T, x @ m.kv.weight.T
    out = torch.zeros(B, N, D, dtype=x.dtype)
    for bt in range(B):
        real = [j < N and (key_mask is None or bool(key_mask[bt, j])) for j in range(NB * b)]
        for h in range(H):
            sl = slice(h * DH, (h + 1) * DH)
            zero = torch.zeros(DH, dtype=x.dtype)
            k = [kv[bt, j, sl] if real[j] else zero for j in range(NB * b)]
            v = [kv[bt, j, D + h * DH:D + (h + 1) * DH] if real[j] else zero for j in range(NB * b)]
            logits = torch.zeros(NB, NB, dtype=x.dtype)
            for i in range(NB):
                s = sum(k[i * b + t] for t in range(b))
                hidden = torch.relu(m.sort_hidden.weight @ s + m.sort_hidden.bias)
                logits[i] = torch.relu(m.sort_out.weight[:NB] @ hidden + m.sort_out.bias[:NB])
            P = naive_sinkhorn_balance(logits, m.iters, m.temperature)
            for i in range(N):
                blk = i // b
                keys, vals = [], []
                for t in range(b):
                    if real[blk * b + t]:
                        keys.append(k[blk * b + t])
                        vals.append(v[blk * b + t])
                for t in range(b):
                    if any(real[j * b + t] for j in range(NB)):
                        keys.append(sum(P[blk, j] * k[j * b + t] for j in range(NB)))
                        vals.append(sum(P[blk, j] * v[j * b + t] for j in range(NB)))
                scores = torch.stack([q_all[bt, i, sl] @ kk for kk in keys]) / math.sqrt(DH)
                p = torch.softmax(scores, 0)
                out[bt, i, sl] = sum(p[a] * vals[a] for a in range(len(keys)))
    return out @ m.out.weight.T


def test_sinkhorn_attention_matches_naive():
    m = build("sinkhorn", max_len=16, block=3, iters=3)
    with torch.no_grad():  # spread the sort logits so the permutation is far from uniform
        m.sort_out.bias.uniform_(0.0, 2.0)
    x, x2 = pair(2, 11, D)  # 4 blocks, the last one padded
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[1, 1] = False
    y = m(x, mask=mask)
    ref = naive_sinkhorn_attention(m, x2, mask)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*grads(y, ref, x, x2), atol=1e-10, rtol=1e-10)


def test_sinkhorn_one_block_is_full_softmax_attention():
    m = build("sinkhorn", max_len=16, block=16)
    x, x2 = pair(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    y = m(x, mask=mask)
    q = (x2 @ m.q.weight.T).view(2, 10, H, DH).transpose(1, 2)  # (B, H, N, Dh)
    k, v = (x2 @ m.kv.weight.T).view(2, 10, 2, H, DH).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-1, -2) / math.sqrt(DH)).masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, D) @ m.out.weight.T
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*grads(y, ref, x, x2), atol=1e-10, rtol=1e-10)


def test_sinkhorn_padded_keys_do_not_influence_and_errors():
    m = build("sinkhorn", max_len=16, block=4)
    x = torch.randn(2, 14, D, dtype=torch.float64)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 2] = mask[0, 9:] = False
    x2 = x.clone()
    x2[~mask] = 100 * torch.randn(int((~mask).sum()), D, dtype=torch.float64)
    torch.testing.assert_close(m(x2, mask=mask)[mask], m(x, mask=mask)[mask], atol=1e-12, rtol=1e-12)
    with pytest.raises(formers.FormersError, match="max_len=16"):
        m(torch.randn(1, 17, D, dtype=torch.float64))
    with pytest.raises(formers.FormersError, match="bidirectional"):
        build("sinkhorn", True, max_len=16)
    with pytest.raises(formers.FormersError, match="alibi"):
        m(x, positions=formers.build("position", "alibi", dim=D))
    with pytest.raises(formers.FormersError, match="cannot be causal"):
        formers.create_model("lm", vocab=10, dim=16, depth=1, max_len=16,
                             block={"mixer": {"name": "sinkhorn", "heads": 4}})


@pytest.mark.parametrize("name", ["synthesizer", "reformer", "sinkhorn"])
def test_encoder_with_only_heads_given_backpropagates_into_every_mixer_parameter(name):
    model = formers.create_model("encoder", vocab=20, dim=32, depth=2, max_len=32,
                                 block={"mixer": {"name": name, "heads": 4}})
    ids = torch.randint(1, 20, (3, 32))
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[2, 20:] = False
    model(ids, mask=mask).logsumexp(-1).sum().backward()
    mixers = [blk.attn.fn for blk in model.stack.blocks]
    for mixer in mixers:
        for pname, p in mixer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
