"""Model configs by architecture and size preset: what `train` builds and what the tests use.

Presets go from CPU-minutes `tiny` up to the paper shapes (`base`: OPT-125m / BERT-base / ViT-S-ish).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Any

from torch import nn

from outlier_probe.errors import UsageError


class Arch(str, enum.Enum):
    opt = "opt"
    bert = "bert"
    gpt2 = "gpt2"
    llama = "llama"
    vit = "vit"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn_mult: int = 4


PRESETS: dict[str, Shape] = {
    "micro": Shape(2, 32, 2),  # unit tests
    "tiny": Shape(4, 128, 4),  # CPU minutes
    "small": Shape(6, 256, 4),  # the 2-core CPU reproduction
    "medium": Shape(6, 512, 8),  # the GPU preset
    "base": Shape(12, 768, 12),  # OPT-125m / BERT-base shapes
}


def shape_for(size: str | None, layers: int | None = None, hidden: int | None = None, heads: int | None = None) -> Shape:
    if size is not None and size not in PRESETS:
        raise UsageError(f"unknown --size {size!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[size or "tiny"]
    shape = Shape(layers or base.layers, hidden or base.hidden, heads or base.heads, base.ffn_mult)
    if shape.hidden % shape.heads:
        raise UsageError(f"hidden size {shape.hidden} is not divisible by {shape.heads} heads")
    return shape


def build_config(arch: Arch, shape: Shape, *, vocab_size: int = 4096, max_positions: int = 512, image_size: int = 28,
                 patch_size: int = 4, num_labels: int = 10, num_channels: int = 3, special_ids: dict[str, int] | None = None) -> Any:
    """A transformers config of the given family and shape (dropout off: measurements are deterministic)."""
    import transformers as T

    ids = special_ids or {}
    ffn = shape.hidden * shape.ffn_mult
    if arch is Arch.opt:
        return T.OPTConfig(vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                           num_attention_heads=shape.heads, ffn_dim=ffn, word_embed_proj_dim=shape.hidden,
                           max_position_embeddings=max_positions, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=ids.get("pad", 1), bos_token_id=ids.get("bos", 0), eos_token_id=ids.get("eos", 0),
                           architectures=["OPTForCausalLM"])
    if arch is Arch.gpt2:
        return T.GPT2Config(vocab_size=vocab_size, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                            n_inner=ffn, n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=ids.get("bos", 0), eos_token_id=ids.get("eos", 0), architectures=["GPT2LMHeadModel"])
    if arch is Arch.llama:
        return T.LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=max(1, shape.heads // 2),
                             intermediate_size=ffn * 2 // 3, max_position_embeddings=max_positions,
                             pad_token_id=ids.get("pad"), bos_token_id=ids.get("bos", 0), eos_token_id=ids.get("eos", 0),
                             architectures=["LlamaForCausalLM"])
    if arch is Arch.bert:
        return T.BertConfig(vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                            num_attention_heads=shape.heads, intermediate_size=ffn, max_position_embeddings=max_positions,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=ids.get("pad", 0),
                            architectures=["BertForMaskedLM"])
    if arch is Arch.vit:
        return T.ViTConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                           intermediate_size=ffn, image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                           num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           architectures=["ViTForImageClassification"])
    raise UsageError(f"unknown --arch {arch}")


def build_model(config: Any, seed: int = 0) -> nn.Module:
    """A randomly initialised model for `config` (deep-copied: _from_config mutates its argument)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    return cls._from_config(copy.deepcopy(config))
