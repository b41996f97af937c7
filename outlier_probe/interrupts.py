"""Signals -> one line and an exit code, from the first instruction of `main()` on.

Installed before typer, torch or transformers are imported, so Ctrl-C during the imports or the model
load is the same `outlier-probe: error: interrupted` (exit 130) as later; SIGTERM gives
`outlier-probe: error: terminated` (exit 143). Stdlib only: importing this module must stay instant.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from outlier_probe.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


_received: list[int] = []  # the signal that arrived, if any
_held: list[int] = []  # one that arrived inside `deferred()`, to raise when the region ends
_deferring = 0  # depth of `deferred()` regions


def _raise(signum: int, frame: Any) -> None:
    for sig in SIGNALS:  # the first signal wins: a second Ctrl-C must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    if _deferring:
        _held.append(signum)
        return
    raise Interrupted(signum)


def received() -> int | None:
    """The signal that interrupted this run, or None.

    A library may catch the Interrupted raised inside its code and raise its own error instead
    (transformers' lazy imports do); the CLI asks this to still report the interruption.
    """
    return _received[0] if _received else None


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread (no-op elsewhere).

    A signal the parent set to be ignored stays ignored (`nohup`, `cmd &` in a script), as Python does.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, _raise)
        if sys.unraisablehook is not _unraisable:
            global _next_unraisable
            _next_unraisable = sys.unraisablehook
            sys.unraisablehook = _unraisable


_next_unraisable = sys.unraisablehook


def _unraisable(info: Any) -> None:
    """A signal that arrived inside a finalizer (`__del__`, a weakref callback) cannot interrupt it: Python
    prints "Exception ignored in ..." and carries on. Print nothing and deliver the signal again, so the
    run stops with its one line at the next instruction of ordinary code."""
    if not isinstance(info.exc_value, Interrupted):
        _next_unraisable(info)
        return
    signum = info.exc_value.signum
    if _received and _received[-1] == signum:
        _received.pop()
    # A timer delivers it a millisecond later, after this hook has returned (raising here, or waiting for a
    # thread, would land inside the finalizer again); if it lands in one again, this hook re-arms it.
    signal.signal(signal.SIGALRM, lambda _s, frame: _raise(signum, frame))
    signal.setitimer(signal.ITIMER_REAL, 0.001)


def exit_interrupted(err: Interrupted | KeyboardInterrupt) -> None:
    """Print the one line and exit 128 + signal number."""
    code = err.exit_code if isinstance(err, Interrupted) else 130
    message = err.message if isinstance(err, Interrupted) else "interrupted"
    try:
        print(f"outlier-probe: error: {message}", file=sys.stderr, flush=True)
    finally:
        raise SystemExit(code)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold the CLI's SIGINT / SIGTERM until the block ends, then raise it (files moved or rolled back as a unit).

    Python runs signal handlers in the main thread whichever thread the signal reached, so a flag the
    handler reads works where a thread's signal mask would not (torch's threads take the signal).
    """
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _held:  # reached only when the block ended without an exception
        signum = _held[0]
        _held.clear()
        raise Interrupted(signum)


def forget_held() -> None:
    """A signal held back while the run's outputs were committed came too late to stop it: the run is complete."""
    if _held:
        _held.clear()
        _received.clear()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, _raise)
