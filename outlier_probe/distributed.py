"""Data-parallel runs under torchrun: which rank this is, its shard of the batches, the process group's
session and the small collectives (barrier, float SUM of host numbers).

    torchrun --nproc-per-node 4 -m outlier_probe stats CKPT --samples 1024

Every rank loads the model and builds the same batches; rank r runs batches r, r + N, r + 2N, ...
(whole batches, so each forward is the very forward a single process runs), then the states are
merged so that every rank holds the statistics of all the data and rank 0 alone writes the reports.
Observer states and calibration ranges are merged by `distributed_merge.py`; evaluation sums (NLL and
token counts, correct predictions, cosine / error sums) are SUMmed here (`all_sum`) and the score is
recomputed from the sums. The SQNR meter sums signal and noise power the same way.

gloo carries CPU tensors and nccl CUDA ones. A rank that fails (error, Ctrl-C) posts its message in
the process group's store; a watchdog thread on every other rank prints it as one line and exits
non-zero, so no rank waits in a collective that will never complete and no report is written.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch

from outlier_probe.errors import UsageError

T = TypeVar("T")
COMMANDS = ("stats", "quantize", "compare", "gate")  # the commands that shard their data
_FAILED, _NFAILED, _ACKS = "outlier_probe/failed", "outlier_probe/nfailed", "outlier_probe/acks"
_TIMEOUT_MIN = float(os.environ.get("OUTLIER_PROBE_DIST_TIMEOUT_MIN", "30"))  # a rank stuck this long fails the run


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the one rank that writes reports and prints."""
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# ----------------------------------------------------------------------------------------- session


class _Watchdog(threading.Thread):
    """Polls the store for another rank's failure; prints it and ends this process (it may be blocked
    in a collective that cannot complete)."""

    def __init__(self, store: Any, me: int) -> None:
        super().__init__(daemon=True, name="outlier-probe-watchdog")
        self.store, self.me = store, me
        self.stop = threading.Event()
        self.failed_here = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                if not self.store.check([_FAILED]):
                    continue
                message = self.store.get(_FAILED).decode()
            except Exception:  # noqa: BLE001 - the store went away: the run is ending anyway
                return
            if self.failed_here.is_set() or self.stop.is_set():
                return
            print(f"outlier-probe: error: {message}; rank {self.me} stopped, no report written", file=sys.stderr, flush=True)
            try:
                self.store.add(_ACKS, 1)
            finally:
                os._exit(1)


def _publish_failure(store: Any, me: int, err: BaseException, size: int) -> None:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        text = "interrupted"
    try:
        if store.add(_NFAILED, 1) == 1:
            store.set(_FAILED, f"rank {me} failed: {text[:300]}")
        deadline = time.monotonic() + 10.0  # let the other ranks print their line before torchrun stops them
        while time.monotonic() < deadline:
            if store.add(_ACKS, 0) + store.add(_NFAILED, 0) - 1 >= size - 1:
                break
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - best effort: the other ranks also time out in their collective
        pass


BACKENDS = ("gloo", "nccl", "cpu:gloo,cuda:nccl")


def run_device(device: Any = None, device_map: str | None = None) -> str:
    """'cuda' when the command's model runs on a GPU (--device cuda / auto with one, or --device-map cuda / auto
    with one), else 'cpu'."""
    cuda = torch.cuda.is_available()
    if device_map is not None:
        return "cuda" if device_map in ("cuda", "auto") and cuda else "cpu"
    value = getattr(device, "value", device) or "cpu"
    return "cuda" if value in ("cuda", "auto") and cuda else "cpu"


def backend_for(device: str, environ: Any = os.environ) -> str:
    """The process group's backend: gloo for a CPU run; for a CUDA run nccl carries the CUDA tensors (observer
    states, calibration ranges) and gloo the host numbers (evaluation sums). OUTLIER_PROBE_DIST_BACKEND overrides."""
    forced = environ.get("OUTLIER_PROBE_DIST_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise UsageError(f"OUTLIER_PROBE_DIST_BACKEND={forced!r}; choose from {', '.join(BACKENDS)}")
        return forced
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def bind_device(device: str, environ: Any = os.environ) -> int | None:
    """A CUDA run: this rank's GPU is torchrun's LOCAL_RANK (checked against the GPUs there are); None on CPU."""
    if device != "cuda":
        return None
    local = int(environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise UsageError(f"this is local rank {local} but the node has {count} GPU(s); use --nproc-per-node {count} "
                         "or --device cpu")
    torch.cuda.set_device(local)
    return local


@contextmanager
def session(command: str, device: Any = None, device_map: str | None = None) -> Iterator[None]:
    """Join the torchrun process group for one command (a no-op outside torchrun), and leave it.

    torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT) is read by the default
    env:// rendezvous; the backend follows the device the command's model runs on (`backend_for`).
    """
    if not launched():
        yield
        return
    if command not in COMMANDS:
        raise UsageError(f"`{command}` does not run under torchrun; data-parallel runs: {', '.join(COMMANDS)}")
    import torch.distributed as dist

    where = run_device(device, device_map)
    backend = backend_for(where)
    bind_device(where)
    dist.init_process_group(backend, timeout=timedelta(minutes=_TIMEOUT_MIN))
    store = dist.distributed_c10d._get_default_store()
    watchdog = _Watchdog(store, dist.get_rank())
    watchdog.start()
    try:
        yield
    except BaseException as err:
        if type(err).__name__ != "Exit":  # typer.Exit: every rank reaches the same exit (e.g. a gate's verdict)
            watchdog.failed_here.set()
            _publish_failure(store, dist.get_rank(), err, dist.get_world_size())
        raise
    finally:
        watchdog.stop.set()
        if not watchdog.failed_here.is_set():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ shards


class Shard(Sequence[T]):
    """Items rank, rank + world, ... of a sequence (lazy: the items are read when asked for)."""

    def __init__(self, items: Sequence[T], rank: int, world: int) -> None:
        self.items, self.indices = items, range(rank, len(items), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> T:  # type: ignore[override]
        return self.items[self.indices[i]]


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's batches; the sequence itself outside a data-parallel run."""
    size = world_size()
    if os.environ.get("OUTLIER_PROBE_FAIL_RANK") == str(rank()) and size > 1:  # fault injection for the tests
        from outlier_probe.errors import ProbeError

        raise ProbeError(f"injected failure on rank {rank()} (OUTLIER_PROBE_FAIL_RANK)")
    if size == 1:
        return items
    if len(items) < size:
        raise UsageError(f"{len(items)} batches cannot be shared by {size} processes; use more --samples "
                         f"or a smaller --batch-size (every process needs at least one batch)")
    return Shard(items, rank(), size)


def global_indices(items: Sequence[Any]) -> range:
    return items.indices if isinstance(items, Shard) else range(len(items))


# ------------------------------------------------------------------------------------- collectives


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """`tensor` reduced in place over ranks with torch.distributed's ReduceOp `op` ("SUM", "MAX", ...); -> tensor."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def barrier() -> None:
    """Wait for every rank (a no-op outside a data-parallel run)."""
    if is_active():
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise float64 SUM of host numbers over ranks (identity outside a data-parallel run)."""
    if not is_active():
        return list(values)
    return all_reduce(torch.tensor(list(values), dtype=torch.float64), "SUM").tolist()
