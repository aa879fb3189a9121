"""C++ kernels for CPU training, built on first use and called through ctypes (formers/csrc).

One kernel so far: causal softmax attention in float32 (the baseline mixer, Vaswani et al. 2017:
y = softmax(q k^T * scale + M) v, M = -inf above the diagonal; `formers/csrc/causal_attention.cpp`), which
`formers.nn.attention.BlockCausalAttention` runs in place of its PyTorch body when it is available. It computes the
same row blocks, but one (batch, head) pair at a time per thread, so that a pair's q, k, v, scores and gradients stay
in that core's L2 cache between its matrix products; the PyTorch body streams every pair through the cache once per
batched matmul. Measured on a 2-core Xeon VM, forward + backward of one layer of the speed benchmark's LM (batch 8,
4 heads, 256 tokens, Dh 64): 5.2 ms against 7.8 ms for the PyTorch body and 9.3 ms for SDPA's flash kernel.

The kernel is compiled with the system's C++ compiler (`$CXX`, else g++ or c++: `-O3 -march=native -fopenmp`, about
a second) into `$FORMERS_KERNEL_CACHE` (default `$XDG_CACHE_HOME/formers/kernels`, else `~/.cache/formers/kernels`;
where that cannot be written, `<tmp>/formers-kernels-<uid>` if it is this user's alone, else a directory of this
process, removed once the library is loaded: then a build per process), named by a hash of its source, the compiler,
the flags, torch's version and the CPU's feature flags, written to a temporary file and renamed. A cache directory
that others may write would let them plant a library there: point FORMERS_KERNEL_CACHE at your own. It links against
torch's own libtorch_cpu (whose MKL gives it `sgemm_` and `vsExp`) and libgomp (so that its OpenMP threads are
torch's). Where any of that is missing (no compiler, another OS or CPU, a torch without MKL), `causal_attention()`
returns None after one warning, and with `FORMERS_CPU_KERNELS=0` silently; causal CPU training then runs SDPA or the
PyTorch body: the kernels speed formers up, they are never required. tests/test_cpu_kernels.py checks values and
gradients against a naive masked softmax and against the PyTorch body.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parent.parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_ABI = 2  # what formers_causal_attention_abi() must return
_LOCK = threading.Lock()
_LOADED: dict[str, CausalAttentionKernel | None] = {}  # filled once per name (after `reset`): the warning goes with it
_TRANSIENT: set[Path] = set()  # build directories of this process alone (`_private_dir`'s mkdtemp)


def _torch_lib() -> Path:
    return Path(torch.__file__).resolve().parent / "lib"


def _cache_dir() -> Path:
    env = os.environ.get("FORMERS_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "formers" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _why_not() -> str | None:
    """Why the kernels cannot be built here, or None."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for Linux on x86-64 only, this is {sys.platform} on {platform.machine()}"
    lib = _torch_lib() / "libtorch_cpu.so"
    try:
        torch_cpu = ctypes.CDLL(str(lib))
    except OSError as e:
        return f"cannot open {lib}: {e}"
    for sym in ("sgemm_", "vsExp"):
        if not hasattr(torch_cpu, sym):
            return f"this torch build has no MKL ({sym} is not in libtorch_cpu)"
    return None


def _compiler() -> list[str] | None:
    """The compiler command: `$CXX` split as a shell would (a wrapper such as "ccache g++" or added flags), else
    g++ or c++ on the PATH; None where there is none."""
    cxx = shlex.split(os.environ.get("CXX", ""))
    if cxx:
        exe = shutil.which(cxx[0]) or (cxx[0] if Path(cxx[0]).is_file() else None)
        return None if exe is None else [exe, *cxx[1:]]
    exe = shutil.which("g++") or shutil.which("c++")
    return None if exe is None else [exe]


def _private_dir(path: Path) -> Path:
    """`path` made (mode 0700) or found as a real directory owned by this user that no one else may write; else a
    fresh private directory of this process. A shared temporary directory must not let another user plant a library
    that this process would load."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="formers-kernels-"))


def _build(name: str) -> Path:
    """Compile csrc/<name>.cpp (once per source, compiler, flags, torch version and CPU) and return the library."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    src = _SRC / f"{name}.cpp"
    key = hashlib.sha256()
    for part in (src.read_bytes(), " ".join(cxx).encode(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                 _cpu_flags().encode()):
        key.update(part)
    out_dir = _cache_dir()
    out = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(out_dir)
    except OSError:  # a read-only home: the system's temporary directory, per user
        shared = Path(tempfile.gettempdir()) / f"formers-kernels-{os.getuid()}"
        out_dir = _private_dir(shared)
        if out_dir != shared:  # this process's own: removed once the library is loaded (`_load`)
            _TRANSIENT.add(out_dir)
        out = out_dir / out.name
        if out.is_file():
            return out
    lib = _torch_lib()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [*cxx, *_FLAGS, "-o", tmp, str(src), f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{Path(cxx[0]).name} failed on {src.name}: {last}")
        os.replace(tmp, out)  # whole or not at all: another process may be loading it
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def heads_last(like: torch.Tensor, B: int, H: int, N: int, D: int) -> torch.Tensor:
    """A fresh (B, H, N, D) tensor laid out as (B, N, H, D), so that merging the heads afterwards is a view; no view
    itself, so that it may be changed in place. The attention's outputs and gradients, in C++ and in PyTorch."""
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=like.dtype, device=like.device)


_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float


class CausalAttentionKernel:
    """The loaded causal-attention library: `forward` and `backward` on float32 CPU tensors (B, H, N, Dh)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.formers_causal_attention_abi.restype = _I
        if lib.formers_causal_attention_abi() != _ABI:
            raise RuntimeError("stale library (ABI mismatch)")
        lib.formers_causal_attention_fwd.argtypes = [_I, _I, _I, _I, _F, _I, _I] + [_P] * 5 + [_P]
        lib.formers_causal_attention_fwd.restype = _I
        lib.formers_causal_attention_bwd.argtypes = [_I, _I, _I, _I, _F, _I, _I] + [_P] * 8 + [_P]
        lib.formers_causal_attention_bwd.restype = _I

    @staticmethod
    def _strides(*ts: torch.Tensor):
        """The element strides of B, H and N of each tensor; a single row's N stride (free in torch's eyes) as its
        row length, which is all the BLAS asks of a leading dimension there."""
        s = []
        for t in ts:
            b, h, n = t.stride()[:3]
            s += [b, h, n if t.shape[2] > 1 else t.shape[3]]
        return (ctypes.c_int64 * len(s))(*s)

    @staticmethod
    def _blas_ready(t: torch.Tensor) -> torch.Tensor:
        """t itself where its rows are BLAS rows (unit stride along Dh, a row stride of at least Dh that fits 32 bits),
        else a contiguous copy: an expanded or otherwise overlapping tensor (stride 0 along N, e.g. the gradient of
        a sum over tokens) would be refused by the BLAS, which then leaves its output unwritten."""
        n, d = t.shape[-2], t.shape[-1]
        ok = (t.stride(-1) == 1 or d <= 1) and (n <= 1 or d <= t.stride(-2) < 2 ** 31)
        return t if ok else t.contiguous()

    @staticmethod
    def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the kernel computes this call: q, k, v of one 4-D shape (grouped key/value heads repeated), all
        float32 in CPU memory."""
        return (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype == torch.float32
                and q.device.type == k.device.type == v.device.type == "cpu")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                block: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """y = softmax(scale q k^T + causal mask) v, (B, H, N, Dh) laid out as (B, N, H, Dh); P, the
        probabilities (B * H, N, N) for `backward` (row r is written in columns 0..r and zero to the end of its
        block); the q, k, v it read (a copy only where the last dimension was not contiguous)."""
        q, k, v = (self._blas_ready(t) for t in (q, k, v))
        B, H, N, D = q.shape
        y = heads_last(q, B, H, N, D)
        P = q.new_empty(B * H, N, N)
        self.lib.formers_causal_attention_fwd(
            B, H, N, D, scale, block, torch.get_num_threads(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
            y.data_ptr(), P.data_ptr(), self._strides(q, k, v, y))
        return y, P, (q, k, v)

    def backward(self, dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: torch.Tensor,
                 scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv (B, H, N, Dh), each laid out as (B, N, H, Dh)."""
        dy = self._blas_ready(dy)
        B, H, N, D = q.shape
        dq, dk, dv = (heads_last(q, B, H, N, D) for _ in range(3))
        failed = self.lib.formers_causal_attention_bwd(
            B, H, N, D, scale, block, torch.get_num_threads(), dy.data_ptr(), q.data_ptr(), k.data_ptr(),
            v.data_ptr(), P.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            self._strides(dy, q, k, v, dq, dk, dv))
        if failed:
            raise MemoryError(f"causal attention backward: no memory for a {min(block, N)} x {N} float32 workspace "
                              "per thread")
        return dq, dk, dv


def _load(name: str) -> CausalAttentionKernel:
    """Build (or find) and load the library; a cached one that does not load (corrupt, or stale) is deleted and
    built again, once. Build directories of this process alone are removed afterwards (a loaded library stays
    mapped)."""
    try:
        path = _build(name)
        try:
            return CausalAttentionKernel(ctypes.CDLL(str(path)))
        except (OSError, RuntimeError, AttributeError):
            path.unlink(missing_ok=True)
        fresh = _build(name)
        # loaded from a name of its own: the dynamic loader hands back a library it already holds under the old name
        fd, alias = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=fresh.parent)
        os.close(fd)
        try:
            shutil.copyfile(fresh, alias)
            return CausalAttentionKernel(ctypes.CDLL(alias))
        finally:
            os.unlink(alias)
    finally:
        for d in _TRANSIENT:
            shutil.rmtree(d, ignore_errors=True)
        _TRANSIENT.clear()


def causal_attention() -> CausalAttentionKernel | None:
    """The causal-attention kernel, built and loaded on the first call; None (after one warning) where it cannot
    be. Checked on every call for FORMERS_CPU_KERNELS=0, so that a test or a user can turn it off at any time."""
    if os.environ.get("FORMERS_CPU_KERNELS", "1") == "0":
        return None
    name = "causal_attention"
    if name in _LOADED:
        return _LOADED[name]
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        kern = None
        why = _why_not()
        if why is None:
            try:
                kern = _load(name)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                why = str(e)
        if why is not None:
            warnings.warn(f"formers: the C++ causal-attention kernel is not in use ({why}); causal CPU training "
                          "runs SDPA or the PyTorch block path, a little slower", RuntimeWarning, stacklevel=3)
        _LOADED[name] = kern
        return kern


def reset() -> None:
    """Forget loaded kernels and warnings, so that the next call builds (or refuses) again; for tests."""
    with _LOCK:
        _LOADED.clear()
