"""Atomic file writes: a report folder never holds a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from outlier_probe.errors import ProbeError


def check_out_dir(path: Path) -> Path:
    """Fail early when `path` cannot be created or written, without creating it (a failed run leaves nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProbeError(f"--out {path} is a file; choose a folder")
    probe = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ProbeError(f"cannot create output folder {path}: its parent is not a writable folder; choose another --out")
    return path


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) and check that files can be written there; clear error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ProbeError(f"cannot create output folder {path}: {err.strerror or err}; choose another --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ProbeError(f"output folder {path} is not writable; choose another --out")
    return path


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ProbeError(f"cannot write {path}: {err.strerror or err}; choose another --out") from None
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: Path, frame: "Any") -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False)
    return Path(path)


def write_figure(path: Path, figure: Any, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure, atomically."""
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):  # enums
        return obj.value
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
