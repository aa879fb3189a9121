"""The C++ causal-attention kernel (formers/csrc/causal_attention.cpp, loaded by formers.nn.cpu_kernels): values and
gradients against a naive masked softmax in float64 and against the PyTorch body of `BlockCausalAttention`, across
layouts, ragged blocks, thread counts and head sizes; the fallbacks (turned off, no compiler, a corrupt cached
library, batched gradients) and that CPU training at the benchmark's length takes it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import formers
from formers.nn import attention, cpu_kernels

KERNEL = cpu_kernels.causal_attention()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the C++ kernel cannot be built here (no g++, or a torch "
                                  "without MKL; formers then runs the PyTorch path, tested in test_fast_paths.py)")


def naive_causal(q, k, v, scale):
    n = q.shape[-2]
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _qkv(shape, layout, seed=0):
    """q, k, v (B, H, N, D) float32 leaves: contiguous, or strided views of one fused (B, N, 3 H D) projection as
    the attention makes them in training, or with a non-unit last stride (the kernel copies those)."""
    B, H, N, D = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":
        qkv = torch.randn(B, N, 3 * H, D, generator=g).requires_grad_()
        return qkv, [t.transpose(1, 2) for t in qkv.split([H, H, H], dim=2)]
    if layout == "last_strided":
        base = torch.randn(3, B, H, D, N, generator=g).requires_grad_()
        return base, list(base.transpose(-1, -2).unbind(0))
    ts = [torch.randn(*shape, generator=g).requires_grad_() for _ in range(3)]
    return None, ts


@needs_kernel
@pytest.mark.parametrize("shape,block,layout", [
    ((8, 4, 256, 64), 64, "fused"),  # the speed benchmark's layer
    ((2, 3, 37, 8), 8, "contiguous"),  # a ragged last block (37 = 4 x 8 + 5)
    ((1, 1, 5, 3), 2, "contiguous"),  # one pair, odd head size
    ((2, 2, 40, 8), 64, "fused"),  # one block longer than N
    ((3, 1, 24, 8), 1, "last_strided"),  # one query per block, copied inputs
    ((1, 2, 300, 16), 128, "fused"),
])
def test_kernel_equals_naive_attention(shape, block, layout):
    """Output and q, k, v gradients equal a naive masked softmax computed in float64 from the same float32 values,
    to float32 rounding."""
    base, (q, k, v) = _qkv(shape, layout)
    scale = shape[-1] ** -0.5
    y = attention.BlockCausalAttention.apply(q, k, v, scale, block)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_causal(q64, k64, v64, scale)
    want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)
    for a, b, n in zip(got, want, "qkv"):
        torch.testing.assert_close(a.double(), b, atol=5e-6, rtol=1e-5, msg=f"d{n}")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_equals_the_pytorch_body(threads, monkeypatch):
    """With the kernel and with FORMERS_CPU_KERNELS=0 (the PyTorch body) the same inputs give the same output and
    gradients to float32 rounding, at 1, 2 and 3 threads (3 > pairs per thread on two cores, and one more thread
    than pairs of one batch row)."""
    shape = (1, 2, 129, 32)
    _, (q, k, v) = _qkv(shape, "fused")
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = attention.BlockCausalAttention.apply(q, k, v, 0.2, 64)
        got = torch.autograd.grad(y, (q, k, v), g)
        monkeypatch.setenv("FORMERS_CPU_KERNELS", "0")
        y2 = attention.BlockCausalAttention.apply(q, k, v, 0.2, 64)
        want = torch.autograd.grad(y2, (q, k, v), g)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_output_is_its_own_tensor_and_inplace_inputs_are_caught():
    """The output can be changed in place (it is no view of anything autograd keeps), and an input changed in
    place after the forward makes the backward raise, as for any saved tensor."""
    _, (q, k, v) = _qkv((1, 2, 16, 4), "contiguous")
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    y.mul_(2)
    y.sum().backward()
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    torch.testing.assert_close(y.detach(), 2 * naive_causal(q2, k2, v2, 0.5), atol=2e-6, rtol=1e-5)
    x = torch.randn(1, 2, 16, 4, requires_grad=True)
    qq = x * 1  # a non-leaf we can write
    y = attention.BlockCausalAttention.apply(qq, k, v, 0.5, 4)
    with torch.no_grad():
        qq.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_kernel
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_kernel_batched_gradients_equal_a_loop():
    """`is_grads_batched=True` runs the backward under vmap, where the kernel has no data pointer: the same
    formulas in PyTorch ops from its kept probabilities give each vector's gradient."""
    _, (q, k, v) = _qkv((2, 2, 12, 4), "fused")
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
    gs = torch.randn(3, *y.shape, generator=torch.Generator().manual_seed(3))
    batched = torch.autograd.grad(y, (q, k, v), gs, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        for a, b in zip(batched, torch.autograd.grad(y, (q, k, v), gs[i], retain_graph=True)):
            torch.testing.assert_close(a[i], b, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_lm_training_at_the_benchmark_length_takes_the_kernel(monkeypatch):
    """A float32 LM forward and backward at 256 tokens runs the C++ kernel in every layer, and its loss and
    gradients equal those of the same step through SDPA (the block path turned off) to float32 rounding."""
    calls = []
    real = cpu_kernels.CausalAttentionKernel.forward
    monkeypatch.setattr(cpu_kernels.CausalAttentionKernel, "forward", lambda *a: calls.append(1) or real(*a))

    def step(blocks):
        monkeypatch.setattr(attention, "CAUSAL_BLOCKS_LEN", (256, 768) if blocks else (0, -1))
        torch.manual_seed(0)
        lm = formers.create_model("lm", vocab=64, dim=32, depth=2, max_len=256,
                                  block={"mixer": {"name": "softmax", "heads": 2}}).train()
        ids = torch.randint(0, 64, (2, 257))
        loss = torch.nn.functional.cross_entropy(lm(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in lm.named_parameters()}

    l1, g1 = step(True)
    assert len(calls) == 2
    l2, g2 = step(False)
    assert len(calls) == 2
    assert abs(l1 - l2) < 1e-5
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded kernel; restored afterwards."""
    monkeypatch.setenv("FORMERS_KERNEL_CACHE", str(tmp_path / "kernels"))
    saved = dict(cpu_kernels._LOADED)
    cpu_kernels.reset()
    yield tmp_path / "kernels"
    cpu_kernels.reset()
    cpu_kernels._LOADED.update(saved)


def _attention_equals_naive(kernel: bool | None = None):
    """The block attention of a small fused-layout call equals the naive one, with no warning; `kernel`: whether
    the C++ kernel must (True) or must not (False) be the one loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kernel is not None:
            assert (cpu_kernels.causal_attention() is not None) is kernel
        _, (q, k, v) = _qkv((1, 2, 20, 4), "fused")
        y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 8)
    torch.testing.assert_close(y, naive_causal(q, k, v, 0.5), atol=2e-6, rtol=1e-5)


def test_turned_off_gives_the_pytorch_path(monkeypatch):
    """FORMERS_CPU_KERNELS=0 turns the kernel off at any time, with no warning, and the attention still equals the
    naive one."""
    monkeypatch.setenv("FORMERS_CPU_KERNELS", "0")
    _attention_equals_naive(kernel=False)


def test_no_compiler_warns_once_and_falls_back(fresh_kernels, monkeypatch):
    """With a compiler that does not exist the kernel is None after one RuntimeWarning naming the cause, nothing
    is left in the cache, and training still runs (the PyTorch path)."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.warns(RuntimeWarning, match="not in use") as rec:
        assert cpu_kernels.causal_attention() is None
    if cpu_kernels._why_not() is None:
        assert "no C++ compiler" in str(rec[0].message)
    _attention_equals_naive(kernel=False)  # the warning came once
    assert not fresh_kernels.exists() or not any(fresh_kernels.iterdir())


@needs_kernel
def test_a_corrupt_cached_library_is_rebuilt(fresh_kernels):
    """A cached library that is not one (truncated, overwritten) is replaced by a fresh build, not loaded or kept;
    a failed compilation leaves no partial file."""
    path = cpu_kernels._build("causal_attention")
    path.write_bytes(b"not a shared library")
    cpu_kernels.reset()
    kern = cpu_kernels.causal_attention()
    assert kern is not None
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert [p.name for p in fresh_kernels.iterdir()] == [path.name]


def test_build_failure_leaves_nothing(fresh_kernels, monkeypatch, tmp_path):
    """A compiler that fails raises a one-line error naming it and leaves no file in the cache."""
    fake = tmp_path / "bad-cxx"
    fake.write_text("#!/bin/sh\necho 'error: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(RuntimeError, match="bad-cxx failed on causal_attention.cpp: error: something broke"):
        cpu_kernels._build("causal_attention")
    assert not any(fresh_kernels.iterdir())


@needs_kernel
def test_where_training_takes_the_kernel(monkeypatch):
    """With the kernel, float32 causal training takes the block path from CAUSAL_KERNEL_FROM tokens (the PyTorch
    body, float64, only from CAUSAL_BLOCKS_LEN's start) up to the same end, and only with at least one (batch, head)
    pair per thread; else SDPA."""
    lo, hi = attention.CAUSAL_BLOCKS_LEN
    k_lo = attention.CAUSAL_KERNEL_FROM
    assert k_lo < lo

    def takes(b, h, n, dtype=torch.float32):
        q = torch.randn(b, h, n, 8, dtype=dtype, requires_grad=True)
        return attention._takes_causal_blocks(q, q, q, 0.0)

    assert takes(2, 2, k_lo) and takes(2, 2, hi) and not takes(2, 2, k_lo - 1) and not takes(2, 2, hi + 1)
    assert takes(2, 2, lo, torch.float64) and not takes(2, 2, k_lo, torch.float64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert takes(1, 4, k_lo) and not takes(1, 3, k_lo)
    monkeypatch.setenv("FORMERS_CPU_KERNELS", "0")
    assert not takes(2, 2, k_lo) and takes(2, 2, lo)


@needs_kernel
def test_an_unwritable_cache_falls_back_to_a_temporary_directory(fresh_kernels, monkeypatch, tmp_path):
    """A cache path that cannot be made (here: under a file) builds into a per-user temporary directory instead."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FORMERS_KERNEL_CACHE", str(blocker / "kernels"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = cpu_kernels._build("causal_attention")
    assert path.parent == tmp_path / "tmp" / f"formers-kernels-{os.getuid()}"
    assert cpu_kernels.causal_attention() is not None


@needs_kernel
def test_overlapping_layouts_are_copied_not_misread(capfd):
    """Layouts the BLAS refuses as rows (a stride along N below Dh: an expanded tensor, or the gradient of a sum
    over tokens, stride 0 along N) are copied first: values and gradients equal the naive attention, and MKL
    prints no parameter error (it skipped the product and left the output unwritten before)."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 20, 8, requires_grad=True)
    k_row = torch.randn(2, 2, 1, 8, requires_grad=True)
    v = torch.randn(2, 2, 20, 8, requires_grad=True)
    k = k_row.expand(2, 2, 20, 8)  # stride 0 along N
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 8)
    y.sum(dim=2).pow(2).sum().backward()  # dy is expanded along N
    got = [t.grad.clone() for t in (q, k_row, v)]
    for t in (q, k_row, v):
        t.grad = None
    ref = naive_causal(q.double(), k_row.double().expand(2, 2, 20, 8), v.double(), 0.5)
    ref.sum(dim=2).pow(2).sum().backward()
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)
    for a, t in zip(got, (q, k_row, v)):
        torch.testing.assert_close(a, t.grad, atol=5e-5, rtol=1e-4)
    assert "MKL ERROR" not in capfd.readouterr().out


def test_block_must_be_positive_and_may_exceed_the_length():
    """A block of 0 or fewer query rows is refused with a ValueError (the C++ loop would never end; the PyTorch
    body returned an unwritten output for a negative one); a block longer than the sequence is one block."""
    _, (q, k, v) = _qkv((1, 2, 10, 4), "contiguous")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="block must be a positive"):
            attention.BlockCausalAttention.apply(q, k, v, 0.5, bad)
    y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 10 ** 6)
    g = torch.autograd.grad(y.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = naive_causal(q2, k2, v2, 0.5)
    torch.testing.assert_close(y, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(g, torch.autograd.grad(ref.sum(), (q2, k2, v2))):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_mismatched_inputs_never_reach_the_kernel():
    """k or v of another dtype, fewer heads (grouped heads not repeated) or fewer tokens than q go to the PyTorch
    body, which raises, instead of the kernel reading past their ends or their float64 bits as float32."""
    _, (q, k, v) = _qkv((1, 4, 16, 4), "contiguous")
    assert cpu_kernels.CausalAttentionKernel.usable(q, k, v)
    for kk in (k.double(), k[:, :2], k[:, :, :8]):
        assert not cpu_kernels.CausalAttentionKernel.usable(q, kk, v)
        with pytest.raises(RuntimeError):
            attention.BlockCausalAttention.apply(q, kk, v, 0.5, 4)


@needs_kernel
def test_empty_inputs_give_empty_outputs(capfd):
    """Zero tokens or a zero batch: empty outputs and gradients, and no BLAS call (MKL printed parameter errors for
    a leading dimension of 0)."""
    for shape in ((1, 2, 0, 4), (0, 2, 8, 4)):
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        y = attention.BlockCausalAttention.apply(q, k, v, 0.5, 4)
        assert y.shape == shape
        assert all(g.shape == shape for g in torch.autograd.grad(y.sum(), (q, k, v), allow_unused=True))
    assert "MKL ERROR" not in capfd.readouterr().out


@needs_kernel
def test_a_stale_cached_library_is_replaced_and_the_new_one_loaded(fresh_kernels, tmp_path):
    """A cached library from an older kernel (it loads, but its ABI number is another) is deleted and rebuilt, and
    the rebuilt one is what runs, although the dynamic loader already holds a library under that file name."""
    path = cpu_kernels._build("causal_attention")
    stale = tmp_path / "stale.cpp"
    stale.write_text('extern "C" int formers_causal_attention_abi() { return -1; }\n')
    cpu_kernels.subprocess.run([cpu_kernels._compiler()[0], "-shared", "-fPIC", "-o", str(path), str(stale)],
                               check=True)
    cpu_kernels.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kern = cpu_kernels.causal_attention()
    assert kern is not None and kern.lib.formers_causal_attention_abi() == cpu_kernels._ABI
    _attention_equals_naive(kernel=True)


def test_a_shared_temporary_directory_is_used_only_if_private(tmp_path):
    """The temporary-directory fallback takes `<tmp>/formers-kernels-<uid>` only as a directory of this user that
    no one else may write (made 0700); one that others may write (another user could plant a library there) is
    passed over for a fresh private directory."""
    mine = cpu_kernels._private_dir(tmp_path / "mine")
    assert mine == tmp_path / "mine" and (mine.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    other = cpu_kernels._private_dir(shared)
    assert other != shared and other.is_dir() and (other.stat().st_mode & 0o077) == 0
    other.rmdir()


@needs_kernel
def test_cxx_may_carry_arguments(fresh_kernels, monkeypatch):
    """CXX is split as a shell would, so a wrapper or extra flags ("g++ -g") build the kernel too."""
    monkeypatch.setenv("CXX", f"{cpu_kernels._compiler()[0]} -g")
    assert cpu_kernels._compiler()[1:] == ["-g"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.causal_attention() is not None


def test_the_kernel_is_looked_up_only_where_it_would_run(monkeypatch):
    """Training looks the kernel up (which builds it, or warns once where it cannot be built) only for float32 at
    CAUSAL_KERNEL_FROM-768 tokens with at least one (batch, head) pair per thread: not at 64 tokens, not with too
    few pairs, not in float64, not without autograd."""
    calls = []
    real = cpu_kernels.causal_attention
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda: calls.append(1) or real())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    k_lo, (_, hi) = attention.CAUSAL_KERNEL_FROM, attention.CAUSAL_BLOCKS_LEN

    def look(b, h, n, dtype=torch.float32, grad=True):
        q = torch.randn(b, h, n, 4, dtype=dtype, requires_grad=grad)
        calls.clear()
        attention._takes_causal_blocks(q, q, q, 0.0)
        return len(calls)

    assert look(1, 2, k_lo) == 1 and look(2, 1, hi) == 1
    assert look(1, 2, k_lo - 1) == 0 and look(1, 2, hi + 1) == 0
    assert look(1, 1, k_lo) == 0  # one pair, two threads: SDPA
    assert look(1, 2, k_lo, torch.float64) == 0 and look(1, 2, k_lo, grad=False) == 0


@needs_kernel
def test_a_process_own_build_directory_is_removed_after_loading(fresh_kernels, monkeypatch, tmp_path):
    """Where the cache cannot be written and the shared per-user temporary directory is not private, the library is
    built in a directory of this process and that directory is removed once the library is loaded (it stays
    mapped): nothing is left behind per process."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FORMERS_KERNEL_CACHE", str(blocker / "kernels"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp))
    shared = tmp / f"formers-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # another user could write here
    kern = cpu_kernels.causal_attention()
    assert kern is not None
    assert sorted(p.name for p in tmp.iterdir()) == [shared.name] and not any(shared.iterdir())
    _attention_equals_naive(kernel=True)
