"""Atomic file writes: a report folder never holds a half-written file, and a command writes all or none.

Each file is written to a temporary name and renamed into place (`atomic_open`). Inside
`all_or_nothing()` every rename is also logged, so that an error or a signal before the block ends
undoes them all: new files are deleted, overwritten ones restored, created folders removed. Files stay
readable at their final paths inside the block (gate reads the reports it has just measured).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from outlier_probe.errors import Interrupted, ProbeError
from outlier_probe.interrupts import deferred, forget_held, received


def check_out_dir(path: Path) -> Path:
    """Fail early when `path` cannot be created or written, without creating it (a failed run leaves nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProbeError(f"--out {path} is a file; choose a folder")
    probe = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ProbeError(f"cannot create output folder {path}: its parent is not a writable folder; choose another --out")
    return path


def check_out_file(path: Path, option: str = "--out") -> Path:
    """Fail early when the file `path` could not be written (its folder is created only when results exist)."""
    path = Path(path)
    if path.is_dir():
        raise ProbeError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ProbeError(f"{option} {path} is not writable; choose another path")
    folder = path.parent
    probe = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ProbeError(f"cannot write {option} {path}: {probe if probe is not None else folder} is not a writable folder; choose another path")
    return path


@dataclass
class _Undo:
    """What `all_or_nothing` must undo: files renamed into place (with the backup of what they replaced), folders made."""

    files: list[tuple[Path, Path | None]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def rollback(self) -> None:
        for path, backup in reversed(self.files):
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        for folder in reversed(self.folders):  # deepest last made, first removed; only when empty
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def commit(self) -> None:
        for _path, backup in self.files:
            if backup is not None:
                try:
                    os.unlink(backup)
                except OSError:
                    pass


_UNDO: ContextVar[_Undo | None] = ContextVar("outlier_probe_undo", default=None)


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Every file written inside appears for good only if the block ends normally; errors and signals undo them all."""
    if _UNDO.get() is not None:  # nested: the outermost block decides
        yield
        return
    undo = _Undo()
    token = _UNDO.set(undo)
    try:
        yield
    except BaseException:
        with deferred():
            undo.rollback()
        raise
    else:
        with deferred():
            signum = received()
            if signum is not None:  # a signal that a library swallowed on the way: still no reports
                undo.rollback()
                raise Interrupted(signum)
            undo.commit()
            forget_held()  # one that arrives during the commit is too late: the reports are complete
    finally:
        _UNDO.reset(token)


@contextmanager
def no_empty_folders_on_error(*paths: Path) -> Iterator[None]:
    """For commands that keep what they finished (train's checkpoints, reproduce's twins): when they fail,
    remove each of `paths` that they created and left without a single file."""
    # the outermost folder of each path that does not exist yet: `runs/` too when it makes `runs/x/`
    fresh = [next(a for a in reversed((Path(p), *Path(p).parents)) if not a.exists())
             for p in paths if not Path(p).exists()]
    try:
        yield
    except BaseException:
        for path in fresh:
            if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
                shutil.rmtree(path, ignore_errors=True)
        raise


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) and check that files can be written there; clear error otherwise."""
    path = Path(path)
    undo = _UNDO.get()
    if undo is not None:  # remember the folders this creates, outermost first
        missing = [p for p in (path, *path.parents) if not p.exists()]
        undo.folders.extend(reversed(missing))
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
        _move_into_place(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):  # disk full, quota, permissions: one line naming the file
            raise ProbeError(f"cannot write {path}: {err.strerror or err}; free space or choose another --out") from None
        raise


def _move_into_place(tmp: str, path: Path) -> None:
    undo = _UNDO.get()
    if undo is None:
        os.replace(tmp, path)
        return
    backup = None
    if path.exists():  # keep what is replaced until the block ends
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
        os.close(fd)
        backup = Path(name)
        shutil.copy2(path, backup)
    with deferred():  # the rename and its log entry go together
        os.replace(tmp, path)
        undo.files.append((path, backup))


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


def write_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Save named tensors as safetensors (with string metadata), atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
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
