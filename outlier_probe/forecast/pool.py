"""`reproduce --jobs N`: the reproduction's independent runs in N worker processes, one torch thread each.

Each run seeds itself and writes its own run folder, so the results do not depend on N or on the order in
which the workers finish; they come back in the order of `calls`. Workers are spawned (no fork of a
process that holds torch threads) and ignore SIGINT: Ctrl-C / SIGTERM reach the parent, which stops them.
An error in a worker stops the others and is raised in the parent (the CLI prints it on one line).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

Call = tuple[Callable[..., Any], tuple[Any, ...]]


def stderr_log(message: str) -> None:
    """A worker's log line (the parent's console cannot be pickled)."""
    print(message, file=sys.stderr, flush=True)


def _init_worker(threads: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    torch.set_num_threads(threads)


def run_calls(calls: Sequence[Call], jobs: int, labels: Sequence[str], threads: int = 1) -> list[Any]:
    """fn(*args) for every call, in `jobs` processes when jobs > 1; results in the order of `calls`."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(*args) for fn, args in calls]
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from outlier_probe.errors import ProbeError

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        with _sigint_ignored():  # spawned now: the workers start with SIGINT ignored (no traceback from their imports)
            futures = [pool.submit(fn, *args) for fn, args in calls]
            # CPython 3.11 spawns workers on demand and wakes its manager thread BEFORE spawning the new one, so
            # the manager can be left watching the earlier workers only: a later worker's death then goes unseen
            # until some other worker returns (seen: 120 s). One more submit wakes it after every spawn.
            pool.submit(int)
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f in done and f.exception() is not None]
        if any(isinstance(err, BrokenProcessPool) for err in failed):  # every unfinished call fails with it
            unfinished = [label for f, label in zip(futures, labels) if f not in done or f.exception() is not None]
            raise ProbeError(f"a --jobs worker process died (out of memory or killed?); unfinished: {', '.join(unfinished)}")
        if failed:
            raise failed[0]
        results = [f.result() for f in futures]
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return results


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the workers are started (a signal in these milliseconds is lost); main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(pool: Any) -> None:
    """Cancel what has not started and end the running workers now (shutdown alone would wait for them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # Python < 3.14 has no terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
