"""On a CUDA GPU (each test skips without one; CI has none, so these run where a GPU is lent).

- Every registered mixer, norm, FFN, activation, residual, placement, stack and 1-D position inside `lm` (or
  `encoder` for a mixer that cannot be causal), and every `_tiny` vision model: the GPU computes what the CPU
  computes. Both run in float64, so the only difference is the device: outputs, input and parameter gradients to
  1e-9 of their scale. A tensor made on the CPU inside a forward, or a device-specific kernel that computes something
  else, fails here.
- The training fast paths (fused QKV, the GELU+fc2 node, the residual added inside the matmul) in float32 on the GPU
  against the same model in float64 on the CPU.
- Cached generation on the GPU gives the tokens of recomputing the whole prefix at every step.
- The lean inference blocks on the GPU give the CPU's module-path logits.
- The trainer on the GPU: bf16 autocast ends within 5% of float32's validation bits per byte on the same data, and
  its weights load on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.vision.base import VisionModel
from formers.registry import entries

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI)")
CUDA = torch.device("cuda")


def _lm(**opts):
    opts = {"vocab": 256, "dim": 32, "depth": 2, "max_len": 64, **opts}
    block = {"mixer": {"name": "softmax", "heads": 4}, **opts.pop("block", {})}
    return formers.create_model("lm", block=block, **opts)


def _encoder(mixer):
    return formers.create_model("encoder", vocab=16, dim=32, depth=2, max_len=64, pool="mean", num_classes=4,
                                block={"mixer": {"name": mixer, "heads": 4}})


def _cases():
    for e in entries("mixer"):
        if e.causal_ok:
            yield f"mixer-{e.name}", lambda n=e.name: _lm(block={"mixer": {"name": n, "heads": 4}}), "lm"
        else:
            yield f"mixer-{e.name}", lambda n=e.name: _encoder(n), "encoder"
    for fam, key in (("norm", "norm"), ("residual", "residual"), ("ffn", "ffn"), ("placement", "placement")):
        for e in entries(fam):
            yield f"{fam}-{e.name}", lambda k=key, n=e.name: _lm(block={k: n}), "lm"
    for e in entries("act"):
        yield f"act-{e.name}", lambda n=e.name: _lm(block={"ffn": {"name": "mlp", "act": n}}), "lm"
    for e in entries("stack"):
        spec, depth = ({"name": "looped", "pre": 1, "loops": 2, "post": 1}, 3) if e.name == "looped" else (e.name, 2)
        yield f"stack-{e.name}", lambda s=spec, d=depth: _lm(stack=s, depth=d), "lm"
    for name in ("alibi", "learned", "none", "rope", "sinusoidal"):
        yield f"position-{name}", lambda n=name: _lm(position=n), "lm"


def _run(model, args, kind, dev):
    """Outputs, and the gradients of a loss of them with respect to every parameter and every float input. `args`
    is a tuple of positional inputs or a dict of keyword ones; `kind` "lm" is next-token cross-entropy on the first
    input, anything else a fixed weighted sum of the outputs."""
    torch.manual_seed(0)  # Informer's ProbSparse draws from the global generator (the CPU's on every device)
    model.zero_grad(set_to_none=True)
    named = dict(enumerate(args)) if isinstance(args, tuple) else dict(args)
    named = {k: (v.to(dev).requires_grad_(True) if v.is_floating_point() else v.to(dev)) for k, v in named.items()}
    out = model(*named.values()) if isinstance(args, tuple) else model(**named)
    if kind == "lm":
        ids = named[0]
        loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        loss = (out * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)).sum()
    loss = loss + sum(formers.aux_losses(model).values(), torch.zeros((), device=out.device, dtype=out.dtype))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"<input {k}>": v.grad for k, v in named.items() if v.is_floating_point()})
    return out.detach(), grads


def _differs(a_out, a_grads, b_out, b_grads, tol):
    """A message when two runs differ by more than tol of their scale, else None. A gradient's scale is its own
    largest value, but at least 1e-4 of the largest gradient of the model: a gradient that is zero in exact
    arithmetic (a key bias under softmax, a norm's bias before `pool(x) - x`) is rounding residue on both
    devices, different residue on each."""
    def far(a, b, floor=0.0):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        return (a - b).abs().max().item() > tol * max(a.abs().max().item(), floor, 1e-300)

    if a_out.shape != b_out.shape or far(a_out, b_out):
        return "outputs differ"
    if a_grads.keys() != b_grads.keys():
        return f"different parameters got gradients: {sorted(a_grads.keys() ^ b_grads.keys())[:4]}"
    floor = 1e-4 * max(g.abs().max().item() for g in a_grads.values())
    bad = [n for n in a_grads if far(a_grads[n], b_grads[n], floor)]
    return f"gradients differ: {bad[:4]}" if bad else None


def _same_on_both(make, args, kind="sum", tol=1e-9):
    """A message when `make()` computes other outputs or gradients on the GPU than on the CPU (both float64), else
    None."""
    torch.manual_seed(0)
    cpu = make().double().eval()  # eval: no dropout masks to match; gradients still flow
    gpu = copy.deepcopy(cpu).to(CUDA)
    return _differs(*_run(cpu, args, kind, torch.device("cpu")), *_run(gpu, args, kind, CUDA), tol)


def test_every_component_computes_the_same_on_the_gpu_as_on_the_cpu():
    ids_lm = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ids_enc = torch.randint(0, 16, (2, 40), generator=torch.Generator().manual_seed(0))
    failures = []
    cases = list(_cases())
    for name, make, kind in cases:
        try:
            msg = _same_on_both(make, (ids_lm if kind == "lm" else ids_enc,), kind)
        except Exception as e:  # a crash on the GPU is a failure too; name it and go on to the next
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if msg:
            failures.append(f"{name}: {msg}")
    assert len(cases) > 50
    assert not failures, "\n".join(failures)


def test_every_tiny_vision_model_computes_the_same_on_the_gpu_as_on_the_cpu():
    names = [e.name for e in entries("model") if e.name.endswith("_tiny")]
    failures, checked = [], 0
    for name in names:
        try:
            torch.manual_seed(0)
            model = formers.create_model(name)
            if not isinstance(model, VisionModel):
                continue
            checked += 1
            x = torch.randn(2, model.in_chans, model.img_size, model.img_size,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            msg = _same_on_both(lambda m=model: m, (x,))
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if msg:
            failures.append(f"{name}: {msg}")
    assert checked >= 10
    assert not failures, "\n".join(failures)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def test_training_fast_paths_in_float32_on_the_gpu_match_float64_on_the_cpu():
    torch.manual_seed(0)
    block = {"placement": "pre", "norm": {"name": "layernorm", "bias": False}, "mixer": {"name": "softmax", "heads": 4},
             "ffn": {"name": "mlp", "act": "gelu", "mult": 4}}
    ref = formers.create_model("lm", vocab=256, dim=64, depth=2, max_len=128, position="learned", block=block)
    gpu = copy.deepcopy(ref).to(CUDA).train()
    ref = ref.double().train()
    ids = torch.randint(0, 256, (4, 129), generator=torch.Generator().manual_seed(0))

    def step(model, x):
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))

    loss_ref, loss_gpu = step(ref, ids), step(gpu, ids.to(CUDA))
    assert "_GeluLinearFnBackward" in _graph_names(loss_gpu)  # the fused GELU+fc2 node ran on the GPU
    loss_ref.backward()
    loss_gpu.backward()
    assert abs(loss_gpu.item() - loss_ref.item()) <= 1e-5 * loss_ref.item()
    for (n, a), b in zip(ref.named_parameters(), gpu.parameters()):
        scale = a.grad.abs().max().item()
        assert (b.grad.double().cpu() - a.grad).abs().max().item() <= 1e-4 * scale + 1e-7, n


def test_cached_generation_on_the_gpu_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    model = formers.create_model("lm", vocab=256, dim=64, depth=2, max_len=96,
                                 block={"mixer": {"name": "softmax", "heads": 4}}).double().to(CUDA).eval()
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        out = model.generate(prompt, 48, greedy=True)
        ref = prompt
        for _ in range(48):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.device.type == "cuda"
    assert torch.equal(out, ref)


def test_lean_inference_blocks_on_the_gpu_equal_the_cpu_module_path(monkeypatch):
    """ViT-Tiny's stack in inference on the GPU runs its blocks from their plans (`lean_block`), float32, and gives
    the logits of the same model in float64 on the CPU through its modules (the lean path switched off)."""
    from unittest import mock

    from formers import blocks

    torch.manual_seed(0)
    cpu = formers.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = []
    real = blocks.lean_block
    monkeypatch.setattr(blocks, "lean_block", lambda p, h, masks=None: calls.append(1) or real(p, h, masks))
    with torch.no_grad():
        y = gpu(x.to(CUDA))
        assert len(calls) == 11  # every block but the last, which computes the class token's row alone
        with mock.patch.object(blocks.PlainStack, "lean_plans", lambda self, h, b, **k: None):
            ref = cpu.double()(x.double())
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_trainer_on_the_gpu_bf16_tracks_float32_and_its_weights_load_on_the_cpu(tmp_path):
    def fit(precision):
        torch.manual_seed(0)
        return formers.fit({
            "name": f"gpu_{precision}",
            "model": {"name": "lm", "dim": 64, "depth": 2},
            "task": {"name": "lm_bytes", "corpus": "stdlib", "seq_len": 64, "eval_limit": 4096},
            "train": {"steps": 150, "batch_size": 16, "lr": 3e-3, "eval_every": 1000, "ckpt_every": 1000,
                      "progress": False, "sample": False, "device": "cuda", "precision": precision},
        }, out=tmp_path / precision)

    fp32, bf16 = fit("fp32"), fit("bf16")
    assert fp32["val_bpb"] < 5.0  # it learned (8 bits per byte is uniform over bytes)
    assert abs(bf16["val_bpb"] - fp32["val_bpb"]) <= 0.05 * fp32["val_bpb"], (fp32["val_bpb"], bf16["val_bpb"])
    model = formers.load_run(fp32["run_dir"])
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 32)))).all()


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_on_the_gpu_matches_a_loop_over_the_sequences(causal, monkeypatch):
    """Not causal: the jagged one-call path; causal: the bucket loop. Against plain softmax attention per sequence in
    float64 on the CPU; values and gradients."""
    from formers.nn import packed
    from formers.nn.packed import lengths_to_seqlens, varlen_attention

    jagged = []
    real = packed._jagged_attention
    monkeypatch.setattr(packed, "_jagged_attention", lambda *a, **k: jagged.append(1) or real(*a, **k))

    lengths = [37, 1, 200, 64, 64, 5, 129]
    H, T, D = 4, sum(lengths), 64
    g = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(H, T, D, generator=g, dtype=torch.float64) for _ in range(4))

    def ref_one(q, k, v):
        s = q @ k.transpose(-1, -2) / D ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    ref = torch.cat([ref_one(*(t[:, a:b] for t in leaves)) for a, b in zip([0, *ends[:-1]], ends)], dim=1)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    gpu = [t.float().to(CUDA).requires_grad_(True) for t in (q, k, v)]
    y = varlen_attention(*gpu, lengths_to_seqlens(lengths), D ** -0.5, causal)  # CPU offsets are accepted too
    assert bool(jagged) == (not causal)  # the path this case is about ran
    grads = torch.autograd.grad(y, gpu, dy.float().to(CUDA))
    assert (y.double().cpu() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    for a, b in zip(grads, ref_grads):
        assert (a.double().cpu() - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_packed_encoder_on_the_gpu_equals_padded():
    from formers.nn.packed import pack

    torch.manual_seed(0)
    model = formers.create_model("encoder", vocab=64, dim=64, depth=2, max_len=256, position="learned", pool="mean",
                                 block={"mixer": {"name": "softmax", "heads": 4}}).to(CUDA).eval()
    lengths = torch.tensor([3, 250, 17, 64, 1, 99])
    idx = torch.randint(0, 64, (6, 250), generator=torch.Generator().manual_seed(1)).to(CUDA)
    mask = (torch.arange(250)[None] < lengths[:, None]).to(CUDA)
    ids, seqlens = pack(idx, mask)
    with torch.no_grad():
        padded = model.forward_features(idx, mask=mask)[mask]
        packed = model.forward_features_packed(ids, seqlens).reshape(-1, 64)
    assert (packed - padded).abs().max().item() <= 1e-4 * padded.abs().max().item()


def test_forecasting_and_encoder_models_compute_the_same_on_the_gpu_as_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    x_enc, mark_enc = torch.randn(2, 24, 3, generator=g, dtype=torch.float64), torch.rand(2, 24, 4, generator=g)
    x_dec = torch.cat([torch.randn(2, 12, 3, generator=g), torch.zeros(2, 4, 3)], 1).double()
    mark_dec = torch.rand(2, 16, 4, generator=g).double()
    informer_args = (x_enc, mark_enc.double() - 0.5, x_dec, mark_dec - 0.5)
    small = dict(enc_in=3, dec_in=3, c_out=3, pred_len=4, mark_dim=4, d_model=16, heads=2, d_ff=24, dropout=0.0)
    ids = torch.randint(0, 50, (2, 20), generator=g)
    mask = torch.arange(20)[None] < torch.tensor([[20], [7]])
    cases = {name: (lambda n=name: formers.create_model(n, **small), informer_args)
             for name in ("informer", "informer_full", "informer_stack")}
    cases["dlinear"] = (lambda: formers.create_model("dlinear", seq_len=24, pred_len=4, enc_in=3, c_out=3), (x_enc,))
    cases["dual_encoder"] = (lambda: formers.create_model("dual_encoder", vocab=50, dim=32, depth=2, max_len=40,
                                                          num_classes=3),
                             (torch.randint(0, 50, (2, 2, 10), generator=g),))
    cases["encoder_masked"] = (lambda: formers.create_model("encoder", vocab=50, dim=32, depth=2, max_len=40,
                                                            pool="mean", num_classes=3),
                               {"idx": ids, "mask": mask})
    failures = []
    for name, (make, args) in cases.items():
        try:
            msg = _same_on_both(make, args)
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if msg:
            failures.append(f"{name}: {msg}")
    assert not failures, "\n".join(failures)
