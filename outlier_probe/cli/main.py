"""Entry point: importing the command modules registers them on the app."""

from __future__ import annotations

import importlib
import sys

import typer

from outlier_probe.cli.app import app

for _name in ("stats", "quantize", "sensitivity", "attention", "compare", "gate", "train", "reproduce", "retrofit"):
    try:
        importlib.import_module(f"outlier_probe.cli.{_name}")
    except ModuleNotFoundError as err:  # a command not written yet
        if err.name != f"outlier_probe.cli.{_name}":
            raise

# typer vendors click: find its UsageError (base of BadParameter, NoSuchOption, MissingParameter, ...)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main() -> None:
    """Console script: like `app()`, but a bad option is one plain line on stderr (exit 2), not a boxed panel."""
    try:
        code = app(standalone_mode=False)
    except _UsageError as err:
        hint = f" (see: outlier-probe {err.ctx.info_name} --help)" if getattr(err, "ctx", None) and err.ctx.info_name else ""
        print(f"outlier-probe: error: {' '.join(err.format_message().replace('Value error, ', '').split())}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("outlier-probe: error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
