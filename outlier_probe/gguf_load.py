"""Faster GGUF loading through transformers: parse the file once, build gguf's name map once.

`from_pretrained(gguf_file=...)` and the GGUF tokenizer each call transformers'
`load_gguf_checkpoint`, which parses the whole file with `gguf.GGUFReader` (4 times per load: the
config twice, the weights, the tokenizer; the 49k-token vocabulary alone takes seconds a parse), and
`get_gguf_hf_weights_map` rebuilds `gguf.get_tensor_name_map` for every module it recurses into (~400
times for a 30-layer Llama). While `cached()` is on, the reader, the metadata (config, tokenizer) and the name map are memoized; `release()` drops the cache
(the readers hold memory maps of the file) and restores the originals. Measured in
benchmarks/bench.py gguf.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

_ORIGINALS: dict[str, Any] = {}
_READERS: dict[tuple[str, int, int, str], Any] = {}


def cached() -> None:
    """Memoize gguf.GGUFReader (per file, size and mtime) and gguf.get_tensor_name_map until release()."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        return
    if _ORIGINALS:
        return
    _ORIGINALS.update(reader=gguf.GGUFReader, name_map=gguf.get_tensor_name_map)
    original_reader = gguf.GGUFReader

    def reader(path: Any, mode: str = "r") -> Any:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, mode)
        if key not in _READERS:
            _READERS[key] = original_reader(path, mode)
        return _READERS[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(_ORIGINALS["name_map"])

    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    _ORIGINALS["checkpoint"] = original_checkpoint = hf_gguf.load_gguf_checkpoint
    metadata: dict[str, Any] = {}

    def load_gguf_checkpoint(path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
        if return_tensors or args or kwargs:
            return original_checkpoint(path, return_tensors, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in metadata:  # config and tokenizer both ask for the metadata: parse it once
            metadata[key] = original_checkpoint(path, False)
        return copy.deepcopy(metadata[key])  # callers pop keys from what they get

    hf_gguf.load_gguf_checkpoint = load_gguf_checkpoint


def release() -> None:
    """Restore gguf's own functions and drop the parsed files."""
    if not _ORIGINALS:
        return
    import gguf

    gguf.GGUFReader = _ORIGINALS.pop("reader")
    gguf.get_tensor_name_map = _ORIGINALS.pop("name_map")
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    hf_gguf.load_gguf_checkpoint = _ORIGINALS.pop("checkpoint")
    _READERS.clear()
