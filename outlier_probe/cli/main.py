"""Entry point. Signal handling comes first; the command modules (typer, torch, ...) are imported after.

Importing this module is instant (stdlib only): `app` is built on first access, so Ctrl-C or SIGTERM
during the heavy imports is already one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

from outlier_probe import interrupts
from outlier_probe.errors import Interrupted

COMMANDS = ("stats", "quantize", "sensitivity", "attention", "compare", "gate", "train", "reproduce", "retrofit")


def _load_app() -> Any:
    """The Typer app with every command module imported (importing registers the command)."""
    import importlib

    from outlier_probe.cli.app import app

    for name in COMMANDS:
        try:
            importlib.import_module(f"outlier_probe.cli.{name}")
        except ModuleNotFoundError as err:  # a command not written yet
            if err.name != f"outlier_probe.cli.{name}":
                raise
    return app


def __getattr__(name: str) -> Any:  # PEP 562: `from outlier_probe.cli.main import app` still works
    if name == "app":
        return _load_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console script: like `app()`, but every failure is one plain line on stderr and an exit code.

    Bad option: exit 2, not a boxed panel; Ctrl-C: exit 130; SIGTERM: exit 143, at any moment.
    """
    interrupts.install()
    try:
        code = _run()
    except (Interrupted, KeyboardInterrupt) as err:
        interrupts.exit_interrupted(err)
    except Exception:  # a library turned the signal into its own error outside a command (an import)
        if interrupts.received() is None:
            raise
        code = 1
    signum = interrupts.received()
    if signum is not None:  # whatever the code path made of it, a signal is the one line and 128 + signum
        interrupts.exit_interrupted(Interrupted(signum))
    sys.exit(code)


def _run() -> int:
    # A signal is held until the imports are done: raised inside torch's C++ start-up it can abort the
    # interpreter (SIGABRT and a stack dump) instead of unwinding; held, it costs at most those seconds.
    with interrupts.deferred():
        import typer

        app = _load_app()
    # typer vendors click: find its UsageError (base of BadParameter, NoSuchOption, MissingParameter, ...)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False, prog_name="outlier-probe")
    except usage_error as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # no arguments at all: the help, on stdout
            print(err.format_message())
            return 2
        message = " ".join(err.format_message().replace("Value error, ", "").split())
        if not message:
            return 2
        ctx = getattr(err, "ctx", None)
        hint = "" if ctx is None else f" (see: {ctx.command_path} --help)"
        print(f"outlier-probe: error: {message}{hint}", file=sys.stderr)
        return 2
    except typer.Abort:  # click's answer to a KeyboardInterrupt raised outside our handlers (e.g. EOF at a prompt)
        print("outlier-probe: error: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
