"""Data: packing text into seeded sequences with the tokenizer's special tokens, folders, images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from outlier_probe.config import DataConfig
from outlier_probe.data import (
    _tokenize,
    batches_for_model,
    builtin_text,
    image_batches,
    read_text,
    special_tokens,
    text_batches,
)
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import load_model
from outlier_probe.config import LoadConfig
from tests.conftest import IMAGE_SIZE, TEXT_FAMILIES, tokenizer_kind


def _ids(b) -> torch.Tensor:
    return torch.cat([x["input_ids"] for x in b.batches])


def test_bert_packing_has_cls_and_sep_and_exact_shape(tiny_tokenizer: Callable[[str], Any]) -> None:
    tok = tiny_tokenizer("bert")
    b = text_batches(tok, DataConfig(samples=5, seq_len=32, batch_size=2))
    assert [tuple(x["input_ids"].shape) for x in b.batches] == [(2, 32), (2, 32), (1, 32)]
    ids = _ids(b)
    cls, sep = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
    assert (ids[:, 0] == cls).all() and (ids[:, -1] == sep).all()
    assert not ((ids[:, 1:-1] == cls) | (ids[:, 1:-1] == sep)).any()  # packed text in between, no delimiters
    assert all(torch.equal(x["attention_mask"], torch.ones_like(x["input_ids"])) for x in b.batches)
    assert (b.num_sequences, b.num_tokens) == (5, 5 * 32)
    assert b.describe()["seq_len"] == 32 and b.describe()["description"].startswith("built-in")


def test_causal_packing_takes_contiguous_non_overlapping_chunks(tiny_tokenizer: Callable[[str], Any], text_file: Path) -> None:
    tok = tiny_tokenizer("causal")
    cfg = DataConfig(path=text_file, samples=6, seq_len=16, batch_size=4)
    ids = _ids(text_batches(tok, cfg))
    assert ids.shape == (6, 16)
    corpus = torch.tensor(_tokenize(tok, read_text(cfg, max_chars=1_000_000)[0]))
    chunks = corpus[: len(corpus) // 16 * 16].view(-1, 16)
    matches = [int(torch.nonzero((chunks == row).all(dim=1))[0]) for row in ids]  # each row is one whole chunk
    assert matches == sorted(set(matches))  # distinct chunks, in corpus order


@pytest.mark.parametrize("kind,prefix,suffix", [("bert", ["[CLS]"], ["[SEP]"]), ("roberta", ["<s>"], ["</s>"]),
                                                ("causal_bos", ["<|endoftext|>"], []), ("causal", [], [])])
def test_special_tokens_of_each_tokenizer(tiny_tokenizer: Callable[[str], Any], text_file: Path, kind: str, prefix: list[str], suffix: list[str]) -> None:
    tok = tiny_tokenizer(kind)
    assert special_tokens(tok) == (tok.convert_tokens_to_ids(prefix), tok.convert_tokens_to_ids(suffix))
    ids = _ids(text_batches(tok, DataConfig(path=text_file, samples=2, seq_len=12)))
    assert ids.shape == (2, 12)
    body = ids[:, len(prefix) : 12 - len(suffix)]
    assert ids[:, : len(prefix)].tolist() == [tok.convert_tokens_to_ids(prefix)] * 2
    assert ids[:, 12 - len(suffix) :].tolist() == [tok.convert_tokens_to_ids(suffix)] * 2
    assert not torch.isin(body, torch.tensor(tok.all_special_ids)).any()


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_tokenizers_saved_in_checkpoints_keep_their_special_tokens(tiny_checkpoint, tiny_tokenizer, family: str) -> None:
    loaded = load_model(LoadConfig(str(tiny_checkpoint(family))))
    assert special_tokens(loaded.processor) == special_tokens(tiny_tokenizer(tokenizer_kind(family)))


def test_real_bert_tokenizer_adds_cls_and_sep(minilm_path: Path, text_file: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path))
    assert special_tokens(tok) == ([tok.cls_token_id], [tok.sep_token_id]) == ([101], [102])
    ids = _ids(text_batches(tok, DataConfig(path=text_file, samples=3, seq_len=20)))
    assert ids[:, 0].tolist() == [101] * 3 and ids[:, -1].tolist() == [102] * 3


def test_same_seed_same_ids_other_seed_other_ids(tiny_tokenizer: Callable[[str], Any], text_file: Path) -> None:
    tok = tiny_tokenizer("causal")
    a = _ids(text_batches(tok, DataConfig(path=text_file, samples=4, seq_len=16, seed=3)))
    b = _ids(text_batches(tok, DataConfig(path=text_file, samples=4, seq_len=16, seed=3)))
    c = _ids(text_batches(tok, DataConfig(path=text_file, samples=4, seq_len=16, seed=4)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_offset_gives_disjoint_sequences(tiny_tokenizer: Callable[[str], Any], text_file: Path) -> None:
    tok = tiny_tokenizer("causal")
    first = _ids(text_batches(tok, DataConfig(path=text_file, samples=8, seq_len=16, seed=1)))
    later = _ids(text_batches(tok, DataConfig(path=text_file, samples=8, seq_len=16, seed=1, offset=8)))
    assert {tuple(r) for r in first.tolist()}.isdisjoint({tuple(r) for r in later.tolist()})
    both = _ids(text_batches(tok, DataConfig(path=text_file, samples=16, seq_len=16, seed=1)))  # offset splits one permutation
    assert {tuple(r) for r in both.tolist()} == {tuple(r) for r in torch.cat([first, later]).tolist()}


@pytest.mark.parametrize("content", ["", "  \n\n\t \n"])
def test_empty_text_file(tiny_tokenizer: Callable[[str], Any], tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ProbeError, match=r"data .*empty.txt contains no text"):
        text_batches(tiny_tokenizer("causal"), DataConfig(path=path, samples=1, seq_len=8))


def test_missing_data_path(tiny_tokenizer: Callable[[str], Any], tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match=r"data path .*nope.txt does not exist"):
        text_batches(tiny_tokenizer("causal"), DataConfig(path=tmp_path / "nope.txt", samples=1, seq_len=8))


def test_folder_is_read_recursively_with_the_include_glob(tmp_path: Path) -> None:
    text = builtin_text()[0]
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha " + text[:2000])
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("bravo " + text[2000:4000])
    (tmp_path / "sub" / "c.md").write_text("charlie " + text[4000:5000])
    (tmp_path / "sub" / "empty.txt").write_text("")
    got, desc, comp = read_text(DataConfig(path=tmp_path))  # default include: *.txt
    assert "alpha" in got and "bravo" in got and "charlie" not in got
    assert comp["files"] == 2 and set(comp["characters_by_suffix"]) == {".txt"}
    assert "(2 files" in desc
    md, _, comp_md = read_text(DataConfig(path=tmp_path, include="*.md"))
    assert md.startswith("charlie") and comp_md["files"] == 1
    with pytest.raises(ProbeError, match=r"no files matching '\*.json'.*set --include-files"):
        read_text(DataConfig(path=tmp_path, include="*.json"))


def test_seq_len_beyond_max_positions(tiny_tokenizer: Callable[[str], Any]) -> None:
    with pytest.raises(UsageError, match=r"--seq-len 129 is longer than the model's 128 positions; use --seq-len 128"):
        text_batches(tiny_tokenizer("causal"), DataConfig(samples=1, seq_len=129), max_positions=128)


def test_roberta_can_use_every_position_it_reports(tiny_checkpoint, text_file: Path) -> None:
    loaded = load_model(LoadConfig(str(tiny_checkpoint("roberta"))))
    assert loaded.info.max_positions == 128  # 130 slots minus padding_idx + 1
    batches = batches_for_model(loaded.processor, loaded.info, DataConfig(path=text_file, samples=2, seq_len=128))
    with torch.no_grad():
        out = loaded.model(**batches.batches[0])  # an index past the position table would raise here
    assert out.logits.shape[:2] == (2, 128)
    with pytest.raises(UsageError, match="longer than the model's 128 positions"):
        batches_for_model(loaded.processor, loaded.info, DataConfig(samples=2, seq_len=129))


def test_seq_len_without_room_for_text(tiny_tokenizer: Callable[[str], Any]) -> None:
    with pytest.raises(UsageError, match="--seq-len 2 leaves no room next to the tokenizer's 2 special tokens"):
        text_batches(tiny_tokenizer("bert"), DataConfig(samples=1, seq_len=2))


def test_too_little_text_for_the_samples(tiny_tokenizer: Callable[[str], Any], tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("just a few words of text here")
    with pytest.raises(ProbeError, match=r"room for \d+ sequences of 8 tokens, but --samples 50"):
        text_batches(tiny_tokenizer("causal"), DataConfig(path=path, samples=50, seq_len=8))


def test_no_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="no tokenizer; pass --tokenizer"):
        text_batches(None, DataConfig(samples=1, seq_len=8))


def test_config_validation() -> None:
    with pytest.raises(UsageError, match="--samples must be >= 1, got 0"):
        DataConfig(samples=0)
    with pytest.raises(UsageError, match="either --data or --dataset"):
        DataConfig(path=Path("x"), dataset="y")


def test_image_folder_batches(image_folder: Path, tiny_checkpoint) -> None:
    loaded = load_model(LoadConfig(str(tiny_checkpoint("vit"))))
    cfg = DataConfig(path=image_folder, samples=7, batch_size=3, seed=2)
    b = batches_for_model(loaded.processor, loaded.info, cfg, IMAGE_SIZE)
    assert [tuple(x["pixel_values"].shape) for x in b.batches] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    labels = torch.cat([x["labels"] for x in b.batches])
    assert labels.shape == (7,) and set(labels.tolist()) <= {0, 1, 2}
    assert b.composition["classes"] == ["cat", "dog", "fox"]
    again = batches_for_model(loaded.processor, loaded.info, cfg, IMAGE_SIZE)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(b.batches, again.batches))
    with torch.no_grad():
        assert loaded.model(pixel_values=b.batches[0]["pixel_values"]).logits.shape == (3, 3)
    # without an image processor: resized and scaled to [-1, 1]
    raw = image_batches(None, DataConfig(path=image_folder, samples=12, batch_size=12), image_size=8).batches[0]
    assert raw["pixel_values"].shape == (12, 3, 8, 8)
    assert raw["pixel_values"].min() >= -1 and raw["pixel_values"].max() <= 1
    assert raw["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # all 12 images, sorted selection


def test_image_errors(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="has 12 images; --samples 13"):
        image_batches(None, DataConfig(path=image_folder, samples=13))
    with pytest.raises(ProbeError, match="has no class sub-folders"):
        image_batches(None, DataConfig(path=tmp_path, samples=1))
    with pytest.raises(UsageError, match="vision models need --data"):
        image_batches(None, DataConfig(samples=1))
