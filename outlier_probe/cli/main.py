"""Entry point: importing the command modules registers them on the app."""

from __future__ import annotations

import importlib

from outlier_probe.cli.app import app

for _name in ("stats", "quantize", "compare", "gate", "train", "reproduce"):
    try:
        importlib.import_module(f"outlier_probe.cli.{_name}")
    except ModuleNotFoundError as err:  # a command not written yet
        if err.name != f"outlier_probe.cli.{_name}":
            raise

__all__ = ["app"]

if __name__ == "__main__":
    app()
