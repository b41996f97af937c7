"""Text files, folders, HF datasets and image folders -> seeded, packed batches.

A text batch is {"input_ids": (B, T) long, "attention_mask": (B, T) long}; an image batch is
{"pixel_values": (B, C, H, W) float, "labels": (B,) long}. Batches live on the CPU; consumers move them.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from outlier_probe.config import DataConfig
from outlier_probe.errors import ProbeError, UsageError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_CHARS_PER_TOKEN_BOUND = 12  # generous: read at most this many characters per needed token


class PackedText(Sequence[dict[str, torch.Tensor]]):
    """Text batches built on demand from the token ids of the corpus: nothing per batch is kept.

    The corpus is held once as int32 (4 bytes a token, not a Python list of ints), with the ids of
    the chosen rows; batch i is cut, wrapped in the special tokens and copied only when asked for, so
    the memory of a run does not grow with the number of sequences beyond those indices.
    """

    def __init__(self, corpus: torch.Tensor, rows: torch.Tensor, body: int, prefix: list[int], suffix: list[int],
                 batch_size: int) -> None:
        self.corpus, self.rows, self.body, self.batch_size = corpus, rows, body, batch_size
        self.prefix = torch.tensor(prefix, dtype=torch.long)
        self.suffix = torch.tensor(suffix, dtype=torch.long)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def sizes(self) -> list[int]:
        return [len(c) for c in self.rows.split(self.batch_size)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rows = self.rows[i * self.batch_size : (i + 1) * self.batch_size]
        body = self.corpus.view(-1, self.body)[rows].long()  # (b, body)
        b = len(rows)
        ids = torch.cat([self.prefix.expand(b, -1), body, self.suffix.expand(b, -1)], dim=1)  # (b, seq_len)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class Batches:
    """Evaluation / calibration batches and what they are. `batches` is any sequence of batch dicts:
    a list, or a PackedText that builds each batch when it is read."""

    batches: Sequence[dict[str, torch.Tensor]]
    description: str
    composition: dict[str, Any] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        if isinstance(self.batches, PackedText):
            return len(self.batches.rows)
        return sum(len(next(iter(b.values()))) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        if isinstance(self.batches, PackedText):  # every position is a token (the mask is all ones)
            return len(self.batches.rows) * (self.batches.body + len(self.batches.prefix) + len(self.batches.suffix))
        return sum(int(b["attention_mask"].sum()) for b in self.batches if "attention_mask" in b)

    def describe(self) -> dict[str, Any]:
        return {"description": self.description, "sequences": self.num_sequences, "tokens": self.num_tokens, **self.composition}


def builtin_text() -> tuple[str, str]:
    """Real English prose that ships with every Python: the language reference topics (~465 KB)."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text, f"built-in: Python language reference (pydoc_data.topics, {len(text):,} characters)"


def read_text(cfg: DataConfig, max_chars: int | None = None) -> tuple[str, str, dict[str, Any]]:
    """The text named by cfg (file, folder, dataset or the built-in default) -> (text, description, composition)."""
    if cfg.dataset:
        return _read_dataset(cfg.dataset, max_chars)
    if cfg.path is None:
        text, desc = builtin_text()
        return text, desc, {}
    path = Path(cfg.path)
    if not path.exists():
        raise ProbeError(f"data path {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = _find_files(path, cfg.include)
        if not files:
            raise ProbeError(f"no files matching {cfg.include!r} under {path}; set --include-files")
    parts: list[str] = []
    by_suffix: dict[str, int] = {}
    total = 0
    for file in files:
        try:
            chunk = file.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise ProbeError(f"cannot read {file}: {err.strerror or err}") from None
        if not chunk.strip():
            continue
        parts.append(chunk)
        by_suffix[file.suffix or "(none)"] = by_suffix.get(file.suffix or "(none)", 0) + len(chunk)
        total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    if not text.strip():
        raise ProbeError(f"data {path} contains no text")
    desc = f"{path} ({len(parts)} file{'s' if len(parts) != 1 else ''}, {total:,} characters)"
    return text, desc, {"files": len(parts), "characters_by_suffix": by_suffix}


def _find_files(root: Path, include: str) -> list[Path]:
    """Files under root (recursively, following links to folders) matching any comma-separated glob."""
    import fnmatch
    import os

    patterns = [p.strip() for p in include.split(",") if p.strip()]
    found = []
    for folder, _dirs, names in os.walk(root, followlinks=True):
        found += [Path(folder) / n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return sorted(p for p in found if p.is_file())


def _read_dataset(spec: str, max_chars: int | None) -> tuple[str, str, dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset needs the `datasets` package: pip install 'outlier-probe[hub]'") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "validation")
    except Exception as err:  # noqa: BLE001 - offline or unknown dataset: one clear line
        raise ProbeError(f"could not load dataset {spec!r} ({str(err).splitlines()[0][:160]}); use --data with a local file") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    parts, total = [], 0
    for row in ds[column]:
        if row and str(row).strip():
            parts.append(str(row))
            total += len(parts[-1])
            if max_chars is not None and total >= max_chars:
                break
    if not parts:
        raise ProbeError(f"dataset {spec!r} has no text in column {column!r}")
    return "\n".join(parts), f"dataset {spec} ({total:,} characters)", {}


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around one sequence: ([CLS], [SEP]), ([BOS], []), ...

    Found by encoding a probe text with and without special tokens (transformers 5 tokenizers have
    no `build_inputs_with_special_tokens`; this works for the Rust and the Python ones alike).
    """
    try:
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe adds nothing we can know
        return [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def special_overhead(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds around one sequence ([CLS]/[SEP], BOS, ...)."""
    prefix, suffix = special_tokens(tokenizer)
    return len(prefix) + len(suffix)


def text_batches(tokenizer: Any, cfg: DataConfig, max_positions: int | None = None) -> Batches:
    """Tokenize, pack into non-overlapping sequences of cfg.seq_len tokens, pick cfg.samples of them (seeded)."""
    if tokenizer is None:
        raise ProbeError("this checkpoint has no tokenizer; pass --tokenizer DIR")
    if max_positions is not None and cfg.seq_len > max_positions:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's {max_positions} positions; use --seq-len {max_positions} or less")
    prefix, suffix = special_tokens(tokenizer)
    extra = len(prefix) + len(suffix)
    body = cfg.seq_len - extra
    if body < 1:
        raise UsageError(f"--seq-len {cfg.seq_len} leaves no room next to the tokenizer's {extra} special tokens")
    needed = (cfg.samples + cfg.offset) * body
    text, desc, composition = read_text(cfg, max_chars=max(needed * _CHARS_PER_TOKEN_BOUND, 1_000_000))
    corpus = _token_array(tokenizer, text)  # int32; the text itself is freed when this returns
    del text
    available = len(corpus) // body
    if available < cfg.samples + cfg.offset:
        raise ProbeError(
            f"data has {len(corpus):,} tokens: room for {available} sequences of {body} tokens, but "
            f"--samples {cfg.samples} (+ offset {cfg.offset}) were asked for; use fewer --samples or a shorter --seq-len"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(cfg.seed))
    chosen = order[cfg.offset : cfg.offset + cfg.samples].sort().values
    packed = PackedText(corpus[: available * body], chosen, body, prefix, suffix, cfg.batch_size)
    composition = {**composition, "seq_len": cfg.seq_len, "seed": cfg.seed, "offset": cfg.offset, "corpus_tokens": len(corpus)}
    return Batches(packed, desc, composition)


def _token_array(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of `text` (no special tokens) as one int32 tensor, converted block by block so that no
    Python list of the whole corpus (~36 bytes a token) is ever held."""
    blocks, parts = text.split("\n\n"), []
    step = 200
    for i in range(0, len(blocks), step):
        piece = "\n\n".join(blocks[i : i + step])
        if i + step < len(blocks):
            piece += "\n\n"
        parts.append(torch.tensor(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int32))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` (no special tokens) as a list: the same blocks as _token_array."""
    return _token_array(tokenizer, text).tolist()


# --------------------------------------------------------------------------------------------- images


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise ProbeError(f"{path}: only unsigned-byte idx files are supported")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*shape)


def load_images(path: Path) -> tuple[list[Any], torch.Tensor, list[str], str]:
    """An image folder (class sub-folders) or an idx pair (MNIST-style *-images-idx3-ubyte[.gz])."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise ProbeError(f"image data {path} does not exist")
    idx_images = sorted(path.glob("*images-idx3-ubyte*")) if path.is_dir() else ([path] if "idx3" in path.name else [])
    if idx_images:
        image_file = next((p for p in idx_images if "t10k" in p.name), idx_images[0])
        label_file = Path(str(image_file).replace("images-idx3", "labels-idx1"))
        if not label_file.exists():
            raise ProbeError(f"labels file {label_file.name} missing next to {image_file.name}")
        pixels, labels = _read_idx(image_file), _read_idx(label_file).long()
        images = [Image.fromarray(p.numpy()).convert("RGB") for p in pixels]
        classes = [str(i) for i in range(int(labels.max()) + 1)]
        return images, labels, classes, f"{image_file} ({len(images):,} images)"
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ProbeError(f"{path} has no class sub-folders of images")
    images, labels = [], []
    for idx, cls in enumerate(classes):
        for file in sorted((path / cls).iterdir()):
            if file.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(Image.open(file).convert("RGB"))
                labels.append(idx)
    if not images:
        raise ProbeError(f"no images under {path}")
    return images, torch.tensor(labels), classes, f"{path} ({len(images):,} images, {len(classes)} classes)"


def image_batches(processor: Any, cfg: DataConfig, image_size: int | None = None) -> Batches:
    """Seeded sample of cfg.samples images, preprocessed by the checkpoint's image processor."""
    if cfg.path is None:
        raise UsageError("vision models need --data: an image folder with one sub-folder per class, or MNIST-style idx files")
    images, labels, classes, desc = load_images(cfg.path)
    if len(images) < cfg.samples + cfg.offset:
        raise ProbeError(f"{cfg.path} has {len(images)} images; --samples {cfg.samples} (+ offset {cfg.offset}) asked for more")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = order[cfg.offset : cfg.offset + cfg.samples].sort().values.tolist()
    pixels = _preprocess([images[i] for i in chosen], processor, image_size)
    picked = labels[chosen]
    batches = [
        {"pixel_values": p, "labels": y}
        for p, y in zip(pixels.split(cfg.batch_size), picked.split(cfg.batch_size))
    ]
    return Batches(batches, desc, {"classes": classes, "seed": cfg.seed, "offset": cfg.offset})


def _preprocess(images: list[Any], processor: Any, image_size: int | None) -> torch.Tensor:
    if processor is not None and hasattr(processor, "__call__") and not hasattr(processor, "encode"):
        return processor(images=images, return_tensors="pt")["pixel_values"]
    # no image processor saved: resize and scale to [-1, 1] (the ViT default normalisation)
    size = image_size or 224
    out = torch.stack(
        [torch.frombuffer(bytearray(im.resize((size, size)).tobytes()), dtype=torch.uint8).view(size, size, 3) for im in images]
    )
    return out.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W)


def batches_for_model(processor: Any, info: Any, cfg: DataConfig, image_size: int | None = None) -> Batches:
    """Text batches for language models, image batches for vision models (info: arch.ModelInfo)."""
    if info.is_vision:
        return image_batches(processor, cfg, image_size)
    return text_batches(processor, cfg, info.max_positions)


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (tokenized in paragraph blocks)."""
    return _tokenize(tokenizer, text)


def read_idx_images(path: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST-style idx images as tensors: (uint8 (N, H, W), labels (N,), description).

    `path`: an idx images file or a folder holding them. In a folder, every *-images-idx3-ubyte[.gz]
    file is used, training files first, then test files (t10k), so the last items are test images.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*images-idx3-ubyte*"), key=lambda p: ("t10k" in p.name, p.name))
    else:
        files = [path] if "idx3" in path.name else []
    if not files:
        raise ProbeError(f"no *-images-idx3-ubyte[.gz] files in {path}")
    pixels, labels = [], []
    for image_file in files:
        label_file = image_file.with_name(image_file.name.replace("images-idx3", "labels-idx1"))
        if not label_file.exists():
            raise ProbeError(f"labels file {label_file.name} missing next to {image_file.name}")
        pixels.append(_read_idx(image_file))
        labels.append(_read_idx(label_file).long())
    images, targets = torch.cat(pixels), torch.cat(labels)
    if images.dim() != 3 or len(images) != len(targets):
        raise ProbeError(f"{path}: expected (N, H, W) images and N labels, got {tuple(images.shape)} and {len(targets)}")
    names = ", ".join(f.name for f in files)
    return images, targets, f"{path} ({names}: {len(images):,} images {images.shape[1]}x{images.shape[2]})"
