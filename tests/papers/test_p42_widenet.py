"""P42 WideNet shared stack: one token mixer and one (MoE) channel mixer for all layers, per-layer norms. Exact
parameter arithmetic from independently built modules, shared storage, the layer equation and gradients against a
plain stack of copies, per-layer norms that matter, aux losses summed over the L applications of the shared MoE,
training, and a save/load round trip through formers.fit / formers.load_run."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import formers
from formers.blocks import PlainStack
from formers.nn.moe import MoE, balance_loss, z_loss
from formers.registry import FormersError
from formers.stacks import SharedStack

VOCAB, DIM, MAX_LEN = 11, 8, 32
MIXER = {"name": "softmax", "heads": 2}
FFN = {"name": "moe", "experts": 4, "k": 2, "capacity_factor": None, "eval_capacity_factor": None}


def widenet(depth=3, ffn=FFN, **kw):
    return formers.create_model("lm", vocab=VOCAB, dim=DIM, depth=depth, max_len=MAX_LEN, stack="shared",
                                block={"mixer": MIXER, "ffn": ffn, **kw.pop("block", {})}, **kw).double()


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("placement,norms_per_layer", [("pre", 2), ("peri", 4)])
def test_parameter_count_is_one_mixer_one_ffn_and_per_layer_norms(depth, placement, norms_per_layer):
    model = widenet(depth, block={"placement": placement})
    embed = count(nn.Embedding(VOCAB, DIM)) + count(formers.build("position", "learned", dim=DIM, max_len=MAX_LEN))
    head = count(nn.Linear(DIM, VOCAB, bias=False))
    mixer = count(formers.build("mixer", MIXER, dim=DIM, causal=True))
    ffn = count(formers.build("ffn", FFN, dim=DIM))
    norm = count(nn.LayerNorm(DIM))
    want = embed + head + mixer + ffn + depth * norms_per_layer * norm + norm  # + the final norm
    assert model.num_params() == want
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(list(model.buffers()))
    plain = formers.create_model("lm", vocab=VOCAB, dim=DIM, depth=depth, max_len=MAX_LEN,
                                 block={"mixer": MIXER, "ffn": FFN, "placement": placement})
    assert plain.num_params() - model.num_params() == (depth - 1) * (mixer + ffn)


def test_shared_tensors_have_one_storage_and_are_stored_once(tmp_path):
    model = widenet(depth=4)
    stack = model.stack
    assert isinstance(stack, SharedStack) and stack.num_applications == 4
    mixer_ptrs = {n: p.data_ptr() for n, p in stack.mixer.named_parameters()}
    ffn_ptrs = {n: p.data_ptr() for n, p in stack.ffn.named_parameters()}
    norm_ptrs = []
    for block in stack.blocks:
        assert {n: p.data_ptr() for n, p in block.attn.fn.named_parameters()} == mixer_ptrs
        assert {n: p.data_ptr() for n, p in block.ffn.fn.named_parameters()} == ffn_ptrs
        norm_ptrs += [p.data_ptr() for p in block.parameters()]  # only its own norms
    assert len(norm_ptrs) == len(set(norm_ptrs)) == 4 * 4
    ptrs = [v.data_ptr() for v in model.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))  # no aliases: safetensors can write it
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert sum(1 for k in load_file(str(tmp_path / "w.safetensors")) if ".experts.w1" in k) == 1


def test_layer_equation_and_gradients_equal_a_plain_stack_of_copies():
    stack = widenet(depth=3).stack
    # a plain stack of independent deep copies (made before any forward: stored aux losses are graph tensors)
    copies = [copy.deepcopy(b) for b in stack.blocks]
    for c in copies:
        c.attn.fn, c.ffn.fn = copy.deepcopy(stack.mixer), copy.deepcopy(stack.ffn)  # registered, independent
    ref = PlainStack(3, lambda i: copies[i])
    x = torch.randn(2, 6, DIM, dtype=torch.float64, requires_grad=True)
    y = stack(x)
    # the paper's layer, written out: x' = x + A(LN1_l(x)), x = x' + M(LN2_l(x')) with shared A, M
    h = x
    for block in stack.blocks:
        h = h + stack.mixer(block.attn.norm(h))
        h = h + stack.ffn(block.ffn.norm(h))
    torch.testing.assert_close(y, h, atol=1e-12, rtol=1e-12)
    # the copies give the same values; the shared gradient is the sum of theirs
    y_ref = ref(x)
    torch.testing.assert_close(y_ref, y, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for shared, attr in ((stack.mixer, "attn"), (stack.ffn, "ffn")):
        for name, p in shared.named_parameters():
            parts = [dict(getattr(c, attr).fn.named_parameters())[name].grad for c in copies]
            torch.testing.assert_close(p.grad, sum(parts), atol=1e-12, rtol=1e-10, msg=name)
    for b, c in zip(stack.blocks, copies):
        torch.testing.assert_close(b.attn.norm.weight.grad, c.attn.norm.weight.grad, atol=1e-12, rtol=1e-10)


def test_changing_one_layers_norm_changes_the_output_and_keeps_weights_tied():
    model = widenet(depth=3).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    y = model(ids)
    with torch.no_grad():
        model.stack.blocks[1].ffn.norm.weight.mul_(1.5)
    y2 = model(ids)
    assert not torch.allclose(y, y2)
    assert all(b.attn.fn is model.stack.mixer and b.ffn.fn is model.stack.ffn for b in model.stack.blocks)
    assert model.stack.blocks[0].ffn.norm.weight.eq(1).all()  # the other layers' norms are their own


def test_aux_losses_of_the_shared_moe_add_up_over_layers():
    model = widenet(depth=3, ffn={**FFN, "balance_weight": 0.5, "z_weight": 0.1})
    with torch.no_grad():
        model.stack.ffn.router.net.weight.normal_(std=1.0)
    seen = []
    handle = model.stack.ffn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    model(torch.randint(0, VOCAB, (2, 9)))
    handle.remove()
    aux = formers.aux_losses(model)
    assert len(seen) == 3  # one call per layer, each on that layer's normalised input
    W = model.stack.ffn.router.net.weight.detach()
    bal, z = [], []
    for h in seen:
        logits = h.reshape(-1, DIM) @ W.t()
        probs = torch.softmax(logits, -1)
        bal.append(0.5 * balance_loss(probs, logits.topk(2, dim=-1).indices).item())
        z.append(0.1 * z_loss(logits).item())
    assert len(set(bal)) == 3  # the layers see different inputs, so the sum is not 3 x one value
    assert aux["moe_balance"].item() == pytest.approx(sum(bal), rel=1e-6)
    assert aux["moe_z"].item() == pytest.approx(sum(z), rel=1e-6)


def test_trains_with_a_shared_moe():
    torch.manual_seed(0)
    model = widenet(depth=2, ffn={**FFN, "capacity_factor": 1.25, "eval_capacity_factor": 2.0}).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 16))
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        aux = formers.aux_losses(model)
        assert set(aux) == {"moe_balance", "moe_z"}
        (loss + sum(aux.values())).backward()
        assert model.stack.ffn.experts.w1.grad.abs().sum() > 0 and model.stack.mixer.q.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fit_save_and_load_round_trip(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    result = formers.fit(tiny_recipe, ["model.stack=shared", "model.block.ffn.name=moe", "train.steps=4",
                                       "train.ckpt_every=2", "train.eval_every=100", "train.sample=false",
                                       "task.held_out=[textwrap]"], out=out)  # a small val set: fast evals
    model = formers.load_run(out)
    assert isinstance(model.stack, SharedStack)
    assert all(isinstance(b.ffn.fn, MoE) and b.ffn.fn is model.stack.ffn for b in model.stack.blocks)
    keys = list(load_file(str(out / "model.safetensors")))
    assert sum(1 for k in keys if k.endswith("experts.w1")) == 1 and "stack.mixer.q.weight" in keys
    # the loaded model scores exactly what the trained model scored at the end of fit
    ev = formers.get("task", "lm_bytes").obj(corpus="stdlib", seq_len=32, held_out=["textwrap"]).evaluate(model)
    assert ev["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)
    # the step-4 checkpoint (optimizer state and all) holds the same weights: identical logits
    from formers.train.checkpoint import list_checkpoints, load_checkpoint
    again = formers.load_run(out)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    load_checkpoint(list_checkpoints(out)[-1], again)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_per_layer_norm_overrides_are_allowed_but_mixer_or_ffn_overrides_raise():
    model = widenet(depth=3, layers={"1": {"norm": "rmsnorm"}})
    assert type(model.stack.blocks[1].attn.norm).__name__ != type(model.stack.blocks[0].attn.norm).__name__
    assert model.stack.blocks[1].attn.fn is model.stack.mixer
    with pytest.raises(FormersError, match="layer 2's mixer"):
        widenet(depth=3, layers={"2": {"mixer": {"heads": 4}}})
    with pytest.raises(FormersError, match="layer 1's ffn"):
        widenet(depth=3, layers={"1": {"ffn": {"experts": 8}}})
    with pytest.raises(FormersError, match="layer 1's ffn"):
        widenet(depth=3, layers={"1-2": {"ffn": "none"}})
    with pytest.raises(FormersError, match="depth"):
        SharedStack(0, lambda i: None)


def test_cached_generation_equals_recomputation():
    model = widenet(depth=3).eval()
    ids = torch.randint(0, VOCAB, (2, 3))
    assert torch.equal(model.generate(ids, 5, greedy=True), model.generate(ids, 5, greedy=True, use_cache=False))
