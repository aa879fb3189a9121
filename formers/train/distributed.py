"""Several processes (and GPUs) for one run: torch.distributed set up from torchrun's environment.

The trainer (formers/train/trainer.py) calls these; a recipe does not change to run on N processes.

- `setup(tc)`: device (`train.device=auto|cpu|cuda`) and precision (`train.precision=auto|fp32|bf16|fp16`) checks,
  the process group (NCCL on CUDA, gloo on CPU, `train.dist_timeout` seconds before a stuck collective fails),
  one CPU thread per rank unless `train.threads` says otherwise. Returns a `Dist` describing this process.
- `wrap(model, dist, parallel)`: `ddp` (DistributedDataParallel) or `fsdp` (FSDP2 `fully_shard`: every block its
  own unit, then the root), or the model itself in a single process.
- `local_rows(batch, dist, batch_size)`: the data-parallel sampler. Every rank draws the same GLOBAL batch from the same
  generator (its state is checkpointed) and keeps its contiguous slice of rows, so rank r of W gets exactly the rows
  a single process would get for that global batch and a run resumes exactly in any number of processes.
  `train.batch_size` is the global batch (summed over ranks).
- `grad_sync(net, dist, last)`: gradient accumulation without communication until the last micro-batch
  (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`).
- `broadcast_object`: rank 0's Python object (an evaluation's metrics) on every rank, so all ranks branch alike.
- `autocast`/`grad_scaler`/`bridge_device`: mixed precision, and moving data to the model's device while a task's
  own code (evaluation, sampling) calls the model.
- `launch(argv, nproc)`: `formers train ... --nproc N` runs `formers ARGV` in N processes through torch's launcher
  (the code behind torchrun), in this process.

Checkpoints gather sharded parameters and optimizer state with torch.distributed.checkpoint.state_dict
(formers/train/checkpoint.py), so a checkpoint is the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
from torch import nn
from torch.utils._pytree import keystr, tree_map, tree_map_with_path

from formers.registry import FormersError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Dist:
    """Where this process stands: rank of world, its device, the precision it computes in, how it is wrapped."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    parallel: str = "none"        # none (one process) | ddp | fsdp
    owns_group: bool = False      # this module created the process group (and destroys it)

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder, the log and the progress bar."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must live for collectives (NCCL needs CUDA tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------------------- device and precision

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` (a name TrainConfig accepted): auto = CUDA when torch sees a GPU, else CPU. A request that
    cannot be met is an error."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FormersError(f"train.device=cuda: torch {torch.__version__} sees no CUDA GPU here; use train.device=auto "
                           "or train.device=cpu")
    if local_rank >= torch.cuda.device_count():
        raise FormersError(f"train.device=cuda: local rank {local_rank} needs a GPU of its own but this node has "
                           f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank)


def resolve_precision(name: str, device: torch.device) -> str:
    """`train.precision`: auto = bf16 autocast on a CUDA GPU that runs bf16, else fp32. bf16/fp16 only on CUDA:
    the CPUs formers targets have no fast half-precision matrix units, so fp32 is the only sensible choice there.
    `name` is one TrainConfig accepted."""
    cuda = device.type == "cuda"
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name in ("bf16", "fp16") and not cuda:
        raise FormersError(f"train.precision={name} runs fast only on a CUDA GPU and this run is on {device.type}; "
                           "use train.precision=fp32 (or auto)")
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise FormersError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} does not run bf16; use "
                           "train.precision=fp16 or fp32")
    return name


def check_batch(batch_size: int, nproc: int) -> None:
    if nproc > 1 and batch_size % nproc:
        raise FormersError(f"train.batch_size={batch_size} is the global batch and must divide evenly over "
                           f"{nproc} processes; use a multiple of {nproc}")


def check_request(device: str, precision: str, nproc: int, batch_size: int) -> None:
    """What `--nproc N` checks before it starts N processes on this node (the options themselves were checked by
    TrainConfig): the batch divides over them, they find a GPU each, the precision runs there."""
    check_batch(batch_size, nproc)
    dev = resolve_device(device)
    if dev.type == "cuda" and nproc > torch.cuda.device_count():
        raise FormersError(f"{nproc} processes on this node need {nproc} GPUs, it has {torch.cuda.device_count()}; "
                           "start fewer processes per node or use train.device=cpu")
    resolve_precision(precision, dev)


# ------------------------------------------------------------------------------------------------- process group

def setup(tc) -> Dist:
    """Prepare this process for training with TrainConfig `tc`; joins the process group under torchrun."""
    rank, world, local_rank = env_ranks()
    device = resolve_device(tc.device, local_rank)
    precision = resolve_precision(tc.precision, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    elif world > 1 and device.type == "cpu":
        torch.set_num_threads(1)  # ranks share the cores; one thread each unless train.threads says otherwise
    d = Dist(rank, world, local_rank, device, precision)
    if world == 1:
        return d
    check_batch(tc.batch_size, world)  # a GPU per local rank: resolve_device checked it
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not td.is_initialized():
        kw = {"device_id": device} if device.type == "cuda" else {}
        td.init_process_group("nccl" if device.type == "cuda" else "gloo",
                              timeout=timedelta(seconds=tc.dist_timeout), **kw)
        d.owns_group = True
    d.parallel = tc.parallel
    return d


def teardown(d: Dist) -> None:
    if d.owns_group and td.is_initialized():
        td.destroy_process_group()
        d.owns_group = False


def barrier(d: Dist) -> None:
    if d.world > 1:
        td.barrier()


def mean_over_ranks(value: torch.Tensor | float, d: Dist) -> float:
    """The mean of a scalar over the ranks (all of them must call it)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
    if d.world == 1:
        return float(t)
    t = t.to(d.comm_device)
    td.all_reduce(t)
    return float(t) / d.world


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` (picklable) on every rank (all of them must call it; the others' `obj` is ignored)."""
    if d.world == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, 0, device=d.comm_device)
    return box[0]


# ------------------------------------------------------------------------------------------------------ the model

class _DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that lets tasks reach the model's own attributes (`model.max_len`, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: each element of the outermost ModuleLists (the blocks), or a
    whole weight-sharing stack (looped, learngene, shared: its blocks use one set of weights, so they must be
    gathered together). Units never nest."""
    from formers.blocks import PlainStack, Stack

    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, Stack) and type(child) is not PlainStack:
                units.append(child)
            elif isinstance(child, nn.ModuleList):
                units.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(model)
    owner: dict[int, int] = {}
    for i, u in enumerate(units):
        for p in u.parameters():
            if owner.setdefault(id(p), i) != i:
                return []  # a parameter shared across units: keep the whole model one unit
    return units


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """Move the model to its device and wrap it for data parallelism; returns the module to call when training.
    FSDP2 shards `model` in place (it stays the same object); DDP returns a wrapper around it."""
    model.to(d.device)
    if d.world == 1:
        return model
    if d.parallel == "ddp":
        # every parameter must get a gradient in every step (formers' MoE keeps its experts in stacked tensors, so
        # an expert without tokens still gets a zero gradient); no find_unused_parameters graph walk
        return _DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for unit in _fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(net: nn.Module, d: Dist, last: bool):
    """Gradient accumulation: communicate only on the last micro-batch of a step."""
    if d.parallel == "ddp" and not last:
        with net.no_sync():
            yield
    elif d.parallel == "fsdp":
        net.set_requires_gradient_sync(last)
        yield
    else:
        yield


def local_rows(batch: Any, d: Dist, batch_size: int) -> Any:
    """This rank's contiguous share of a global batch: rows [r*B/W, (r+1)*B/W) of every tensor in it (0-dim
    tensors, which have no rows, stay whole). A tensor whose first dimension is not the batch is an error: a task's
    batch holds one row per example. Moves the result to the training device."""
    if d.world > 1:
        n = batch_size // d.world
        lo = d.rank * n

        def cut(path, t):
            if not isinstance(t, torch.Tensor) or not t.dim():
                return t
            if t.shape[0] != batch_size:
                raise FormersError(f"the task's training batch{keystr(path)} has shape {tuple(t.shape)}, not "
                                   f"{batch_size} rows first; with several processes every tensor of a batch "
                                   "must hold one row per example (each rank keeps its slice of the rows)")
            return t[lo:lo + n]

        batch = tree_map_with_path(cut, batch)
    if d.device.type != "cpu":
        batch = tree_map(lambda t: t.to(d.device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)
    return batch


@contextlib.contextmanager
def bridge_device(model: nn.Module, d: Dist):
    """While it is open, code that knows nothing of devices (a task's evaluate, generation) may call a model that
    lives on a GPU: tensors handed to the model move to its device, and its outputs come back to the device they
    came from. Nothing on the CPU; the hooks are removed on exit, so training steps do not run them."""
    if d.device.type == "cpu":
        yield
        return
    origins: list[torch.device | None] = []

    def device_of(tree) -> torch.device | None:
        found: list[torch.device] = []
        tree_map(lambda t: found.append(t.device) if isinstance(t, torch.Tensor) else None, tree)
        return found[0] if found else None

    def pre(module, args, kwargs):
        dev = next((p.device for p in module.parameters()), None)
        origins.append(device_of((args, kwargs)))
        if dev is None:
            return None
        move = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return tree_map(move, args), tree_map(move, kwargs)

    def post(module, args, kwargs, out):
        origin = origins.pop() if origins else None
        if origin is None:
            return None
        return tree_map(lambda t: t.to(origin) if isinstance(t, torch.Tensor) else t, out)

    # first of the pre-forward hooks: FSDP's own moves the inputs too, and `pre` must see where they came from
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def autocast(d: Dist):
    """bf16/fp16 autocast on CUDA; nothing in fp32."""
    if d.precision in DTYPES:
        return torch.autocast(d.device.type, dtype=DTYPES[d.precision])
    return contextlib.nullcontext()


def grad_scaler(d: Dist):
    """fp16 needs loss scaling (bf16 and fp32 do not): a GradScaler, or None."""
    return torch.amp.GradScaler(d.device.type) if d.precision == "fp16" else None


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# -------------------------------------------------------------------------------------------------------- launcher

def failure_message(e) -> str:
    """One line naming the rank that failed, from the launcher's ChildFailedError, and what to do. Its first
    failure (by time stamp, to the second) is not always the cause: when a rank is killed its peers fail within
    milliseconds (a closed connection in a collective, exit code 1) and may be noticed in the same poll; a rank
    killed by a signal other than the launcher's own SIGTERM is the cause, so it is named first."""
    killed = sorted(r for r, f in e.failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM)
    rank = killed[0] if killed else e.get_first_failure()[0]
    f = e.failures[rank]
    how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
    return (f"distributed training failed: rank {rank} {how}; the launcher stopped the other ranks. The failed "
            "rank's own error, if it printed one, is above; continue with --resume")


def launch(argv: list[str], nproc: int) -> int:
    """Run `formers ARGV` in `nproc` processes on this node through torch's launcher (torch.distributed.run, the
    code behind torchrun, here in this process): it starts the workers, watches them and, when one dies, stops the
    others. Returns 0, or 1 after printing which rank failed; Ctrl-C stops the workers and raises
    KeyboardInterrupt. The launcher's signal handlers and its environment settings are undone on return."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set (and announce); train.threads applies
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "formers", *argv]))
        return 0
    except ChildFailedError as e:
        print(f"error: {failure_message(e)}", file=sys.stderr)
        return 1
    except SignalException as e:  # the launcher's handlers turn SIGINT/SIGTERM into this once the workers stopped
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        print(f"error: distributed training stopped by {signal.Signals(e.sigval).name}; continue with --resume",
              file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update(env)


__all__ = ["Dist", "setup", "teardown", "wrap", "grad_sync", "local_rows", "broadcast_object", "bridge_device",
           "launch", "resolve_device", "resolve_precision", "check_request"]
