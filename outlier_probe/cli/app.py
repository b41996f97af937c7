"""The Typer application and the one place that turns errors into exit codes."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer

from outlier_probe import interrupts
from outlier_probe.errors import Interrupted, ProbeError

class _Group(typer.core.TyperGroup):
    """Lists each command with its whole first sentence, wrapped to the width (click would cut it with '...')."""

    def format_commands(self, ctx, formatter) -> None:  # noqa: ANN001 - click's signature
        rows = [(name, cmd.get_short_help_str(limit=10**6)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="outlier-probe",
    cls=_Group,
    help="Measure activation outliers of transformer checkpoints, their W8A8 quantization loss, and gate CI on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a traceback must never print whole tensors
    rich_markup_mode=None,  # plain click help: wraps option names and defaults at 80 columns, never cuts them
)

F = TypeVar("F", bound=Callable[..., object])


@app.callback()
def _main() -> None:
    """Measure activation outliers of transformer checkpoints, their W8A8 quantization loss, and gate CI on them."""
    # an explicit callback keeps `outlier-probe COMMAND` a group even if only one command is registered


def fail(message: str, code: int) -> typer.Exit:
    """Print one line on stderr and return the Exit to raise."""
    first_line = " ".join(str(message).split())  # one line, always
    print(f"outlier-probe: error: {first_line}", file=sys.stderr)
    return typer.Exit(code)


def guarded(fn: F) -> F:
    """Run a command body; ProbeError -> its exit code, anything else -> exit 1, one line, no traceback.

    Set OUTLIER_PROBE_DEBUG=1 to see the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from outlier_probe.distributed import session

        try:
            # joins the torchrun process group when launched by torchrun (nccl + gloo on a GPU, gloo on a CPU)
            with session(fn.__name__, kwargs.get("device"), kwargs.get("device_map")):
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as err:  # noqa: BLE001 - the CLI promise: no traceback
            signum = interrupts.received()
            if signum is not None:  # a library turned our Interrupted into its own error: report the signal
                raise Interrupted(signum) from None
            if os.environ.get("OUTLIER_PROBE_DEBUG"):
                raise
            if isinstance(err, ProbeError):
                raise fail(str(err), err.exit_code) from None
            raise fail(f"{type(err).__name__}: {err} (set OUTLIER_PROBE_DEBUG=1 for the traceback)", 1) from None

    return wrapper  # type: ignore[return-value]
