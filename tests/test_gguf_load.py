"""GGUF loading parses the file once per load and leaves gguf / transformers as it found them."""

from __future__ import annotations

import pytest
import torch

from outlier_probe.config import LoadConfig
from outlier_probe.loading import load_model


def test_one_parse_per_load_and_originals_restored(tiny_gguf, monkeypatch) -> None:
    gguf = pytest.importorskip("gguf")
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    path, reference = tiny_gguf
    before = (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint)
    parses = []
    original = gguf.GGUFReader

    class Counting(original):  # counts the real parses behind the memoized reader
        def __init__(self, *args, **kwargs) -> None:
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    loaded = load_model(LoadConfig(source=str(path)))
    assert len(parses) == 1, parses  # config, weights and tokenizer: one parse (4 without the cache)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint) == (Counting, *before[1:])
    assert loaded.processor is not None
    ids = torch.randint(5, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
