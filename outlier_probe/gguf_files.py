"""GGUF checkpoints: the optional `gguf` package, and a quiet de-quantization."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from outlier_probe.errors import ProbeError


def require_gguf() -> None:
    """GGUF files are read with the `gguf` package, an optional extra: say how to install it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ProbeError("reading .gguf checkpoints needs the gguf package: pip install 'outlier-probe[gguf]'") from None


@contextmanager
def no_gguf_progress_bar() -> Iterator[None]:
    """transformers de-quantizes GGUF tensors under a bare tqdm bar (not its own switchable one): silence it."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
