"""What every report records: the tool, the time, the package versions."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from typing import Any

from outlier_probe import __version__

_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "pandas", "numba", "bitsandbytes", "accelerate")


def versions() -> dict[str, str]:
    out = {"outlier-probe": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def header(command: str) -> dict[str, Any]:
    return {
        "tool": "outlier-probe",
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "platform": platform.platform(),
        "observers": observer_path(),
    }


def observer_path() -> str:
    """Which implementation computed the statistics (they agree; the last bits of float sums may not)."""
    from outlier_probe.stats import kernels

    if kernels.available():
        return "fused numba kernel for CPU tensors (stats/kernels.py), torch elsewhere"
    return "torch (OUTLIER_PROBE_KERNEL=torch or numba unavailable)"
