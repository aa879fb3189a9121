"""Measure one point in a fresh subprocess: peak memory above a baseline taken just before the call, then the
median time of repeated calls. Peak memory uses Linux's resettable high-water mark (/proc/self/clear_refs = 5,
then VmHWM), so the process's earlier peaks (imports, set-up) do not count."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MEMORY_LIMIT_GIB = 12.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def minor_faults() -> int:
    """This process's minor page faults so far (pages the kernel mapped and zeroed for it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_memory_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory (MiB) of `fn()` above the resident memory just before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) / 1024
    except OSError:  # not Linux: fall back to the lifetime peak (an over-estimate of nothing, a lower bound)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def time_calls(fn: Callable[[], Any], reps: int = 3, budget_s: float = 20.0) -> float:
    """Median seconds of `fn()`; fewer repetitions when one call is slow."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if sum(times) > budget_s:
            break
    return statistics.median(times)


def device_sync(device: torch.device) -> Callable[[], Any] | None:
    """What a timing calls after each timed call on `device`: CUDA's synchronize (kernels run asynchronously), else
    nothing (None)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def machine_peak_gflops(device: torch.device | str | None = None) -> float:
    """Median of 10 runs of torch.mm on preallocated 2048x2048 fp32 tensors after 3 warm-up runs (DESIGN §5), on
    `device` (default the CPU; on a GPU each run is synchronised, so the time is the kernel's)."""
    dev = torch.device(device or "cpu")
    a, b = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
    c = torch.empty(2048, 2048, device=dev)
    sync = device_sync(dev) or (lambda: None)
    for _ in range(3):  # warm-up: thread pool, page faults, clocks; a cold first run under-states the peak
        torch.mm(a, b, out=c)
    sync()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / statistics.median(times) / 1e9


def run_point(module: str, func: str, kwargs: dict[str, Any], timeout_s: float = 300.0,
              memory_limit_gib: float = MEMORY_LIMIT_GIB) -> dict[str, Any]:
    """Run `module.func(**kwargs)` in a fresh Python with an address-space limit; it must print one JSON line.

    Returns that record, or {"skipped": reason} on out-of-memory, timeout or crash."""
    code = (
        "import json, resource, sys\n"
        f"lim = int({memory_limit_gib} * 2**30) + 4 * 2**30  # + room for libraries' address space\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
        f"from {module} import {func} as f\n"
        "try:\n"
        f"    rec = f(**json.loads(sys.argv[1]))\n"
        "except (RuntimeError, MemoryError) as e:\n"
        "    msg = str(e).lower()\n"
        "    if 'memory' in msg or 'alloc' in msg:\n"
        "        rec = {'skipped': 'needs more than the memory limit'}\n"
        "    else:\n"
        "        raise\n"
        "print('RESULT ' + json.dumps(rec))\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"slower than {timeout_s:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    if "memory" in tail.lower() or r.returncode in (-9, 137):
        return {"skipped": "needs more than the memory limit"}
    return {"skipped": f"failed: {tail[:200]}"}


def meta(command: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """A results file's header; the matmul peak is measured on `device` (default the CPU), which a GPU run also
    names (`device`)."""
    dev = torch.device(device or "cpu")
    m = {"machine": platform.machine(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
         "torch": torch.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": command, "peak_mm_gflops": round(machine_peak_gflops(dev), 1)}
    if dev.type != "cpu":
        m["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    return m


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PROVENANCE = ("cpu", "threads", "torch", "date", "command", "peak_mm_gflops")


def _provenance(meta_: dict[str, Any]) -> dict[str, Any]:
    return {k: meta_[k] for k in PROVENANCE if k in meta_}


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file, each stamped (`measured`) with the machine, date and command of the run that
    measured it: a resumed or partial rerun rewrites the file's `meta`, and must not relabel older rows."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    for r in rows:  # rows of a file without meta: unknown, not this run's (save would otherwise stamp them)
        if isinstance(r, dict) and "measured" not in r:
            r["measured"] = _provenance(data["meta"]) if data.get("meta") else {"unknown": True}
    return rows


def save(path: Path, meta_: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write results atomically (temp file + rename). `meta_` describes this run; rows without a `measured` stamp
    (the ones this run made) get it from `meta_`, older rows keep theirs: a caller that re-measures a loaded row in
    place drops its stamp first (`row.pop("measured")`)."""
    for r in rows:
        if isinstance(r, dict) and "measured" not in r:
            r["measured"] = _provenance(meta_)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"meta": meta_, "rows": rows}, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_row(path: Path, meta_: dict[str, Any], row: dict[str, Any], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Add or replace one row of a results file, re-reading it under an exclusive lock first, so that several
    processes working on disjoint rows (e.g. `formers bench lra --tasks listops` beside `--tasks image`) never
    drop each other's results. Returns the rows now on disk."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ident = tuple(row[k] for k in key)
            rows = [r for r in load_rows(path) if tuple(r.get(k) for k in key) != ident] + [row]
            save(path, meta_, rows)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return rows


def check_names(given, known, prog: str, what: str) -> None:
    """A one-line FormersError for the first of `given` that is not in `known` (a benchmark's rows, oracles, ...),
    listing the known ones; checked before any timing."""
    from formers.registry import FormersError

    for n in given:
        if n not in known:
            raise FormersError(f"{prog}: unknown {what} '{n}'; {what}s: {', '.join(known)}")


def out_path(arg: str, name: str, prog: str) -> Path:
    """A benchmark's `--out`: a .json file, or a folder (existing, or named without a suffix) that gets `name`.
    Refused in one line before any timing: another suffix, or a parent that is a file."""
    from formers.registry import FormersError

    p = Path(arg)
    if p.is_dir() or not p.suffix:
        return p / name
    if p.suffix != ".json":
        raise FormersError(f"{prog}: --out {arg} must be a .json file or a folder (the results are JSON)")
    if p.parent.exists() and not p.parent.is_dir():
        raise FormersError(f"{prog}: --out {arg}: {p.parent} is a file, not a folder")
    return p


def _section(start: str, end: str, body: str) -> str:
    return start + "\n" + body.strip("\n") + "\n" + end


def section_is_current(path: Path, start: str, end: str, body: str) -> bool:
    """Whether the file holds exactly `body` between the markers, as `replace_section` writes it: what the tests
    check for every README section generated from committed results."""
    return _section(start, end, body) in path.read_text()


def replace_section(path: Path, start: str, end: str, body: str) -> bool:
    """Replace the text between the `start` and `end` markers of a file (the README's generated sections),
    atomically; False when the markers are missing."""
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    new = head + _section(start, end, body) + rest.split(end, 1)[1]
    if new != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(new)
        tmp.replace(path)
    return True
