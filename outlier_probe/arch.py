"""Architecture adapter: the ONLY module that knows how each model family names its internals.

Every other module asks this one for sites (what to hook), attention modules (where to swap the
softmax), head modules (what stays in float) and the model's shape facts.
"""

from __future__ import annotations

import enum
import functools
import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from outlier_probe import arch_stanhop
from outlier_probe.config import SiteKind, SiteSelection
from outlier_probe.errors import UsageError


class Family(str, enum.Enum):
    bert = "bert"  # BERT, RoBERTa, XLM-R, Electra, ... (post-LN encoders)
    distilbert = "distilbert"
    gpt2 = "gpt2"
    opt = "opt"
    llama = "llama"  # Llama, Mistral, Qwen2/3, SmolLM, ... (pre-RMSNorm decoders)
    vit = "vit"
    stanhop = "stanhop"  # STanHop-Net forecaster (not a transformers model): names in arch_stanhop.py
    generic = "generic"


class Task(str, enum.Enum):
    causal_lm = "causal_lm"
    masked_lm = "masked_lm"
    image_classification = "image_classification"
    encoder = "encoder"  # no head we can score: hidden-state fidelity only
    forecasting = "forecasting"  # multivariate time-series forecaster (stanhop)


@dataclass(frozen=True)
class FamilySpec:
    """Module names inside one layer, relative to the layer, and around the layer stack."""

    layers: tuple[str, ...]  # suffixes of the ModuleList holding the blocks
    attention: str  # the module whose forward calls transformers' attention interface
    attn_output: tuple[str, ...]
    ffn_output: tuple[str, ...]
    norms: tuple[str, ...]  # norms inside a block
    residual_norms: tuple[str, ...]  # norms whose INPUT is a residual sum
    final_norm: tuple[str, ...] = ()  # relative to the parent of the layer stack
    embeddings: tuple[str, ...] = ()  # relative to the parent of the layer stack's parent
    embedding_sum_norm: str | None = None  # norm whose input is the embedding sum (BERT-style)
    pre_norm: bool = True


_SPECS: dict[Family, FamilySpec] = {
    Family.bert: FamilySpec(
        layers=("encoder.layer",),
        attention="attention.self",
        attn_output=("attention.output.dense",),
        ffn_output=("output.dense",),
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
        residual_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        embeddings=("embeddings",),
        embedding_sum_norm="embeddings.LayerNorm",
        pre_norm=False,
    ),
    Family.distilbert: FamilySpec(
        layers=("transformer.layer",),
        attention="attention",
        attn_output=("attention.out_lin",),
        ffn_output=("ffn.lin2",),
        norms=("sa_layer_norm", "output_layer_norm"),
        residual_norms=("sa_layer_norm", "output_layer_norm"),
        embeddings=("embeddings",),
        embedding_sum_norm="embeddings.LayerNorm",
        pre_norm=False,
    ),
    Family.gpt2: FamilySpec(
        layers=("h",),
        attention="attn",
        attn_output=("attn.c_proj",),
        ffn_output=("mlp.c_proj",),
        norms=("ln_1", "ln_2"),
        residual_norms=("ln_2",),
        final_norm=("ln_f",),
    ),
    Family.opt: FamilySpec(
        layers=("decoder.layers",),
        attention="self_attn",
        attn_output=("self_attn.out_proj",),
        ffn_output=("fc2",),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        residual_norms=("final_layer_norm",),
        final_norm=("final_layer_norm",),
    ),
    Family.llama: FamilySpec(
        layers=("layers",),
        attention="self_attn",
        attn_output=("self_attn.o_proj",),
        ffn_output=("mlp.down_proj",),
        norms=("input_layernorm", "post_attention_layernorm"),
        residual_norms=("post_attention_layernorm",),
        final_norm=("norm",),
    ),
    Family.vit: FamilySpec(
        layers=("layers", "encoder.layer"),
        attention="attention",
        attn_output=("attention.o_proj", "attention.output.dense"),
        ffn_output=("mlp.fc2", "output.dense"),
        norms=("layernorm_before", "layernorm_after"),
        residual_norms=("layernorm_after",),
        final_norm=("layernorm",),
    ),
}

_MODEL_TYPES: dict[str, Family] = {
    **{t: Family.bert for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet")},
    "distilbert": Family.distilbert,
    "gpt2": Family.gpt2,
    "opt": Family.opt,
    **{t: Family.llama for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2", "granite")},
    **{t: Family.vit for t in ("vit", "deit")},
}

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True, eq=False)
class Site:
    """One hooked activation: a module and which side of it is observed."""

    name: str  # module path; "<path>:input" when the input is observed
    kind: SiteKind
    layer: int | None
    module: nn.Module
    capture: Literal["output", "input"] = "output"
    module_name: str = ""  # plain module path (without ":input")
    # Name of a site that sees the very same tensor, earlier in the same forward (a post-norm block
    # returns its last norm's output): when both are hooked the statistics are computed once.
    same_as: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    family: Family
    task: Task
    model_type: str
    hidden_size: int | None
    num_heads: int | None
    num_layers: int
    max_positions: int | None
    vocab_size: int | None
    is_causal: bool
    is_vision: bool


def family_of(model: nn.Module) -> Family:
    """The family adapter for a model: by config.model_type, else the generic fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    if model_type == arch_stanhop.MODEL_TYPE:
        return Family.stanhop
    family = _MODEL_TYPES.get(model_type, Family.generic)
    if family is not Family.generic and _find_layer_stack(model, _SPECS[family]) is None:
        return Family.generic  # a relative with different internals: hook generically rather than fail
    return family


def task_of(model: nn.Module) -> Task:
    name = type(model).__name__
    if arch_stanhop.is_stanhop(model):
        return Task.forecasting
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return Task.causal_lm
    if name.endswith("ForMaskedLM"):
        return Task.masked_lm
    if name.endswith("ForImageClassification"):
        return Task.image_classification
    return Task.encoder


def model_info(model: nn.Module) -> ModelInfo:
    cfg = model.config
    family = family_of(model)
    if family is Family.stanhop:
        return ModelInfo(family, Task.forecasting, cfg.model_type, cfg.d_model, cfg.n_heads, len(arch_stanhop.blocks(model)),
                         cfg.in_len, None, False, False)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names: str) -> int | None:
        for n in names:
            value = getattr(text_cfg, n, None)
            if isinstance(value, int):
                return value
        return None

    layers = len(layer_modules(model)) if family is not Family.generic else (first("num_hidden_layers", "n_layer") or 0)
    is_vision = family is Family.vit or hasattr(cfg, "image_size") or getattr(model, "main_input_name", "") == "pixel_values"
    return ModelInfo(
        family=family,
        task=task_of(model),
        model_type=getattr(cfg, "model_type", "") or "",
        hidden_size=first("hidden_size", "n_embd", "dim", "d_model"),
        num_heads=first("num_attention_heads", "n_head", "n_heads"),
        num_layers=layers,
        max_positions=_max_positions(text_cfg, first("max_position_embeddings", "n_positions", "n_ctx")),
        vocab_size=first("vocab_size"),
        is_causal=task_of(model) is Task.causal_lm or family in (Family.gpt2, Family.opt, Family.llama),
        is_vision=is_vision,
    )


def _max_positions(cfg: object, value: int | None) -> int | None:
    # RoBERTa-style position ids start after the padding index, so two slots are never usable
    if value is not None and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        return value - (getattr(cfg, "pad_token_id", 1) or 1) - 1
    return value


def _find_layer_stack(model: nn.Module, spec: FamilySpec) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(name == s or name.endswith("." + s) for s in spec.layers):
            return name
    return None


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each transformer block, in order; empty for the generic fallback."""
    family = family_of(model)
    if family is Family.generic:
        return []
    if family is Family.stanhop:
        return arch_stanhop.blocks(model)
    stack = _find_layer_stack(model, _SPECS[family])
    assert stack is not None
    return [(f"{stack}.{i}", block) for i, block in enumerate(model.get_submodule(stack))]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention module of each block: the one whose forward calls the attention interface."""
    family = family_of(model)
    if family is Family.generic:
        raise UsageError(
            f"attention variants need a known family (bert, distilbert, gpt2, opt, llama, vit); "
            f"model type {getattr(model.config, 'model_type', '?')!r} is only supported with --attention softmax"
        )
    rel = _SPECS[family].attention
    return [(f"{name}.{rel}", block.get_submodule(rel)) for name, block in layer_modules(model)]


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the backbone (LM / MLM / classifier heads): kept in float by the recipes."""
    if arch_stanhop.is_stanhop(model):
        return []  # its heads sit inside the decoder blocks: arch_stanhop.is_head
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", model) is model:
        # a bare backbone (BertModel, LlamaModel, MiniLM): only its pooler (a classification head) is a head
        return [n for n, _ in model.named_children() if n == "pooler"]
    # a backbone under `base_model_prefix` plus heads: every other top-level child is a head
    return [n for n, _ in model.named_children() if n != prefix]


def layer_of_module(model: nn.Module, name: str) -> int | None:
    """The block a module belongs to: by the layer stack, or for the generic fallback by the first `.N.` in its name."""
    blocks = layer_modules(model)
    if blocks:
        return next((i for i, (b, _) in enumerate(blocks) if name == b or name.startswith(b + ".")), None)
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def linear_module_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(Linear modules outside the heads, Linear modules inside the heads), by module name."""
    heads = tuple(head_module_names(model))
    body, head = [], []
    for name, module in model.named_modules():
        if name and _is_linear(module):
            (head if name in heads or name.startswith(tuple(h + "." for h in heads)) else body).append(name)
    return body, head


def embedding_module_names(model: nn.Module) -> list[str]:
    """Modules that build the input embeddings: every nn.Embedding / patch Conv2d outside the blocks and
    heads, or the `...embeddings` container holding them (BERT's also holds the embedding LayerNorm)."""
    blocks = tuple(n + "." for n, _ in layer_modules(model))
    heads = tuple(h + "." for h in head_module_names(model))
    out: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(blocks + heads) or not isinstance(module, (nn.Embedding, nn.Conv2d)):
            continue
        parts = name.split(".")
        container = next((".".join(parts[:i]) for i in range(1, len(parts)) if parts[i - 1].endswith("embeddings")), None)
        out.append(container or name)
    return list(dict.fromkeys(out))


def residual_stream_sites(model: nn.Module) -> list[Site]:
    """Per layer, where the residual stream leaving the block is seen un-normalised: the block output of a
    pre-norm block; for a post-norm block (BERT-style) the residual sum entering its last norm."""
    family = family_of(model)
    if family is Family.generic or _SPECS[family].pre_norm:
        return find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))
    last = {}
    for site in find_sites(model, SiteSelection(kinds=(SiteKind.residual,))):
        last[site.layer] = site  # sites come in model order: the last residual norm of each block wins
    return list(last.values())


def embedding_sum_site(model: nn.Module) -> Site | None:
    """Where the token + position embedding sum can be observed (input of the embedding norm or block 0)."""
    family = family_of(model)
    if family is Family.generic:
        return None
    spec = _SPECS[family]
    blocks = layer_modules(model)
    if spec.embedding_sum_norm:
        base = _stack_parent(model, spec, levels=2)
        name = _join(base, spec.embedding_sum_norm)
        return Site(f"{name}:input", SiteKind.residual, None, model.get_submodule(name), "input", name)
    name, block = blocks[0]
    return Site(f"{name}:input", SiteKind.residual, 0, block, "input", name)


def _stack_parent(model: nn.Module, spec: FamilySpec, levels: int) -> str:
    stack = _find_layer_stack(model, spec)
    assert stack is not None
    suffix = next(s for s in spec.layers if stack == s or stack.endswith("." + s))
    base = stack[: -len(suffix)].rstrip(".")
    if levels == 1:  # parent of the ModuleList itself (e.g. "model.decoder" for OPT)
        parts = stack.split(".")
        return ".".join(parts[:-1])
    return base


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _try_get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in cls and hasattr(module, "weight")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_sites(model: nn.Module, selection: SiteSelection = SiteSelection()) -> list[Site]:
    """Every site of the selected kinds, in model order, filtered by include/exclude fnmatch patterns."""
    family = family_of(model)
    if family is Family.stanhop:
        sites = [Site(n if c == "output" else f"{n}:input", k, layer, model.get_submodule(n), c, n)
                 for n, k, layer, c in arch_stanhop.site_specs(model) if k in selection.kinds]
    elif family is Family.generic:
        sites = _generic_sites(model, selection.kinds)
    else:
        sites = _family_sites(model, family, selection.kinds)
    out = []
    for site in sites:
        name = site.module_name or site.name
        if selection.include and not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(site.name, p) for p in selection.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(site.name, p) for p in selection.exclude):
            continue
        out.append(site)
    return out


def _family_sites(model: nn.Module, family: Family, kinds: tuple[SiteKind, ...]) -> list[Site]:
    spec = _SPECS[family]
    sites: list[Site] = []

    def add(name: str, kind: SiteKind, layer: int | None, capture: Literal["output", "input"] = "output",
            same_as: str | None = None) -> None:
        module = _try_get(model, name)
        if module is None:
            return
        label = name if capture == "output" else f"{name}:input"
        sites.append(Site(label, kind, layer, module, capture, name, same_as))

    for i, (block_name, _) in enumerate(layer_modules(model)):
        if SiteKind.residual in kinds:
            for rel in spec.residual_norms:
                add(_join(block_name, rel), SiteKind.residual, i, "input")
        if SiteKind.attn_output in kinds:
            for rel in spec.attn_output:
                add(_join(block_name, rel), SiteKind.attn_output, i)
        if SiteKind.ffn_output in kinds:
            for rel in spec.ffn_output:
                add(_join(block_name, rel), SiteKind.ffn_output, i)
        if SiteKind.norm in kinds:
            for rel in spec.norms:
                add(_join(block_name, rel), SiteKind.norm, i)
        if SiteKind.block_output in kinds:
            # post-norm blocks (BERT, DistilBERT) return their last norm's output tensor itself
            last_norm = None if spec.pre_norm else _join(block_name, spec.norms[-1])
            add(block_name, SiteKind.block_output, i, same_as=last_norm)
        if SiteKind.linear_input in kinds:
            block = model.get_submodule(block_name)
            for rel, module in block.named_modules():
                if rel and _is_linear(module):
                    add(_join(block_name, rel), SiteKind.linear_input, i, "input")
    if SiteKind.norm in kinds:
        parent = _stack_parent(model, spec, levels=1)
        for rel in spec.final_norm:
            add(_join(parent, rel), SiteKind.norm, None)
    return sites


def _generic_sites(model: nn.Module, kinds: tuple[SiteKind, ...]) -> list[Site]:
    """Fallback for unknown architectures: every Linear output and every norm output."""
    heads = tuple(head_module_names(model))
    sites: list[Site] = []
    for name, module in model.named_modules():
        if not name or name.startswith(heads):
            continue
        match = _LAYER_INDEX.search(name)
        layer = int(match.group(1)) if match else None
        if _is_linear(module):
            if SiteKind.linear_output in kinds:
                sites.append(Site(name, SiteKind.linear_output, layer, module, "output", name))
            if SiteKind.linear_input in kinds:
                sites.append(Site(f"{name}:input", SiteKind.linear_input, layer, module, "input", name))
        elif _is_norm(module) and SiteKind.norm in kinds:
            sites.append(Site(name, SiteKind.norm, layer, module, "output", name))
    return sites


def parse_site_kinds(values: list[str] | tuple[str, ...]) -> tuple[SiteKind, ...]:
    """`--sites block_output,ffn_output` -> kinds; unknown names are a usage error listing the valid ones."""
    kinds: list[SiteKind] = []
    valid = ", ".join(k.value for k in SiteKind)
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                return tuple(SiteKind)
            try:
                kinds.append(SiteKind(part))
            except ValueError:
                raise UsageError(f"unknown site kind {part!r} in --sites; valid: {valid}, all") from None
    if not kinds:
        raise UsageError(f"--sites is empty; valid: {valid}, all")
    return tuple(dict.fromkeys(kinds))


# ------------------------------------------------------------------ mitigations (quant/mitigations/)


@dataclass(frozen=True)
class LinearRoles:
    """Which Linears of a block read from / write to what, relative to the block (smoothing, rotation)."""

    attn_in: tuple[str, ...]  # q/k/v (or fused qkv): read the attention norm's output
    attn_norm: str | None  # norm feeding attn_in inside the block (None: post-norm, the previous block's)
    ffn_in: tuple[str, ...]  # FFN up / gate: read the FFN norm's output
    ffn_norm: str
    value: str | None = None  # value projection whose output channels are the out projection's inputs
    out: str | None = None  # attention output projection (writes the residual stream)
    up: str | None = None  # SwiGLU up projection: its output multiplies the down projection's input
    down: str | None = None  # FFN down projection (writes the residual stream)
    embeddings: str | None = None  # token embedding, relative to the layer stack's parent


_ROLES: dict[Family, LinearRoles] = {
    Family.bert: LinearRoles(("attention.self.query", "attention.self.key", "attention.self.value"), None,
                             ("intermediate.dense",), "attention.output.LayerNorm",
                             value="attention.self.value", out="attention.output.dense", down="output.dense"),
    Family.distilbert: LinearRoles(("attention.q_lin", "attention.k_lin", "attention.v_lin"), None, ("ffn.lin1",),
                                   "sa_layer_norm", value="attention.v_lin", out="attention.out_lin", down="ffn.lin2"),
    Family.gpt2: LinearRoles(("attn.c_attn",), "ln_1", ("mlp.c_fc",), "ln_2", out="attn.c_proj", down="mlp.c_proj"),
    Family.opt: LinearRoles(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm",
                            ("fc1",), "final_layer_norm", value="self_attn.v_proj", out="self_attn.out_proj", down="fc2"),
    Family.llama: LinearRoles(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
                              ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", value="self_attn.v_proj",
                              out="self_attn.o_proj", up="mlp.up_proj", down="mlp.down_proj", embeddings="embed_tokens"),
}


@dataclass(frozen=True)
class SmoothGroup:
    """Linears reading one tensor (consumers) and where their input scale can be folded (source).

    fold: "norm" (divide the norm's weight and bias), "rows" (divide the source Linear's output rows),
    or "online" (post-norm blocks: the norm's output also feeds the residual stream, so the scale is
    applied at each consumer's input instead; also their FFN down input, behind a GELU).
    """

    consumers: tuple[str, ...]
    source: str | None
    fold: Literal["norm", "rows", "online"]


def _unsupported(model: nn.Module, what: str, family: Family) -> UsageError:
    return UsageError(f"{what} is not supported for the {family.value} family "
                      f"(model type {getattr(model.config, 'model_type', '?')!r}); supported: "
                      f"{', '.join(f.value for f in _ROLES)}")


def smoothing_groups(model: nn.Module) -> list[SmoothGroup]:
    """SmoothQuant's (norm -> q/k/v), (norm -> FFN in), (v -> out) and, SwiGLU, (up -> down) pairs, in model order."""
    family = family_of(model)
    if family not in _ROLES:
        raise _unsupported(model, "--smoothquant", family)
    roles, pre = _ROLES[family], _SPECS[family].pre_norm
    groups: list[SmoothGroup] = []
    for name, block in layer_modules(model):
        j = functools.partial(_join, name)
        if pre and roles.attn_norm:
            groups.append(SmoothGroup(tuple(map(j, roles.attn_in)), j(roles.attn_norm), "norm"))
        else:
            groups.append(SmoothGroup(tuple(map(j, roles.attn_in)), None, "online"))
        groups.append(SmoothGroup(tuple(map(j, roles.ffn_in)), j(roles.ffn_norm), "norm" if pre else "online"))
        if roles.value and roles.out:
            v, o = block.get_submodule(roles.value), block.get_submodule(roles.out)
            if v.weight.shape[0] == o.weight.shape[1]:  # grouped-query attention shares v rows: no fold
                groups.append(SmoothGroup((j(roles.out),), j(roles.value), "rows"))
        if roles.up and roles.down:
            groups.append(SmoothGroup((j(roles.down),), j(roles.up), "rows"))
        elif not pre and roles.down:
            # post-norm encoders already scale online; the FFN down input (after GELU, no fold) is scaled
            # the same way, as a deployment would in the activation kernel that quantizes it
            groups.append(SmoothGroup((j(roles.down),), None, "online"))
    return groups


@dataclass(frozen=True)
class RotationLayout:
    """Where a residual-stream rotation is fused (QuaRot): names are full module paths."""

    embeddings: str
    readers: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, Linears reading its output) per norm
    writers: tuple[str, ...]  # Linears writing into the residual stream (out and down projections)
    downs: tuple[str, ...]  # down projections (online rotation of their input)
    final_norm: str
    head: str


def rotation_layout(model: nn.Module) -> RotationLayout:
    """The layout for `--rotate`, or a usage error saying why this model's norms cannot be folded."""
    family = family_of(model)
    model_type = getattr(model.config, "model_type", "?")
    if family is not Family.llama:
        why = ("post-norm blocks put the LayerNorm's scale on the residual stream itself"
               if family in (Family.bert, Family.distilbert) else
               "its LayerNorm subtracts the mean, which does not commute with a rotation of the residual stream")
        raise UsageError(f"--rotate needs pre-RMSNorm blocks (llama family); {family.value} ({model_type!r}) cannot "
                         f"be rotated: {why}")
    roles = _ROLES[family]
    blocks = layer_modules(model)
    norm_cls = type(blocks[0][1].get_submodule(roles.ffn_norm)).__name__ if blocks else ""
    if "RMSNorm" not in norm_cls or model_type in ("olmo2", "gemma", "gemma2", "gemma3"):
        raise UsageError(f"--rotate needs pre-RMSNorm blocks with a plain scale; {model_type!r} uses {norm_cls}")
    head = next((h for h in head_module_names(model) if _is_linear(_try_get(model, h) or nn.Identity())), None)
    if head is None:
        raise UsageError("--rotate folds the final norm into the LM head; this checkpoint has no LM head "
                         "(load it as a causal LM)")
    spec = _SPECS[family]
    parent = _stack_parent(model, spec, levels=1)
    readers, writers, downs = [], [], []
    for name, _ in blocks:
        j = functools.partial(_join, name)
        readers.append((j(roles.attn_norm or ""), tuple(map(j, roles.attn_in))))
        readers.append((j(roles.ffn_norm), tuple(map(j, roles.ffn_in))))
        writers += [j(roles.out or ""), j(roles.down or "")]
        downs.append(j(roles.down or ""))
    return RotationLayout(_join(parent, roles.embeddings or ""), tuple(readers), tuple(writers), tuple(downs),
                          _join(parent, spec.final_norm[0]), head)
