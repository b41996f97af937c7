"""The architecture adapter: which modules each family hooks, swaps and keeps in float."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from outlier_probe import arch
from outlier_probe.arch import Family, Task
from outlier_probe.config import DEFAULT_SITE_KINDS, SiteKind, SiteSelection
from outlier_probe.errors import UsageError
from tests.conftest import EXPECTED_FAMILY, FAMILIES, HEADS, HIDDEN, LAYERS, POSITIONS, make_model

# Per family: layer stack, then per site kind the names relative to one block (":input" = input side),
# then the final norm (None: post-LN encoders have none).
_BERT = {
    SiteKind.attn_output: ["attention.output.dense"],
    SiteKind.ffn_output: ["output.dense"],
    SiteKind.norm: ["attention.output.LayerNorm", "output.LayerNorm"],
    SiteKind.residual: ["attention.output.LayerNorm:input", "output.LayerNorm:input"],
}
_LLAMA = {
    SiteKind.attn_output: ["self_attn.o_proj"],
    SiteKind.ffn_output: ["mlp.down_proj"],
    SiteKind.norm: ["input_layernorm", "post_attention_layernorm"],
    SiteKind.residual: ["post_attention_layernorm:input"],
}
EXPECTED: dict[str, tuple[str, dict[SiteKind, list[str]], str | None]] = {
    "bert": ("bert.encoder.layer", _BERT, None),
    "roberta": ("roberta.encoder.layer", _BERT, None),
    "distilbert": ("distilbert.transformer.layer", {
        SiteKind.attn_output: ["attention.out_lin"],
        SiteKind.ffn_output: ["ffn.lin2"],
        SiteKind.norm: ["sa_layer_norm", "output_layer_norm"],
        SiteKind.residual: ["sa_layer_norm:input", "output_layer_norm:input"],
    }, None),
    "gpt2": ("transformer.h", {
        SiteKind.attn_output: ["attn.c_proj"],
        SiteKind.ffn_output: ["mlp.c_proj"],
        SiteKind.norm: ["ln_1", "ln_2"],
        SiteKind.residual: ["ln_2:input"],
    }, "transformer.ln_f"),
    # DESIGN.md's OPT reference: layer output, fc2, final_layer_norm, self_attn.out_proj, self_attn_layer_norm
    "opt": ("model.decoder.layers", {
        SiteKind.attn_output: ["self_attn.out_proj"],
        SiteKind.ffn_output: ["fc2"],
        SiteKind.norm: ["self_attn_layer_norm", "final_layer_norm"],
        SiteKind.residual: ["final_layer_norm:input"],
    }, "model.decoder.final_layer_norm"),
    "llama": ("model.layers", _LLAMA, "model.norm"),
    "mistral": ("model.layers", _LLAMA, "model.norm"),
    "qwen2": ("model.layers", _LLAMA, "model.norm"),
    "vit": ("vit.layers", {  # transformers >= 5 layout
        SiteKind.attn_output: ["attention.o_proj"],
        SiteKind.ffn_output: ["mlp.fc2"],
        SiteKind.norm: ["layernorm_before", "layernorm_after"],
        SiteKind.residual: ["layernorm_after:input"],
    }, "vit.layernorm"),
}
KNOWN = [f for f in FAMILIES if f != "generic"]
ATTENTION_CLASS = {"bert": "BertSelfAttention", "roberta": "RobertaSelfAttention", "distilbert": "DistilBertSelfAttention",
                   "gpt2": "GPT2Attention", "opt": "OPTAttention", "llama": "LlamaAttention", "mistral": "MistralAttention",
                   "qwen2": "Qwen2Attention", "vit": "ViTAttention"}
HEADS_OF = {"bert": {"cls"}, "roberta": {"lm_head"}, "gpt2": {"lm_head"}, "opt": {"lm_head"}, "llama": {"lm_head"},
            "mistral": {"lm_head"}, "qwen2": {"lm_head"}, "vit": {"classifier"}, "generic": {"lm_head"}}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {f: make_model(f) for f in FAMILIES}


def _by_layer(sites: list[arch.Site]) -> dict[int | None, dict[SiteKind, list[str]]]:
    out: dict[int | None, dict[SiteKind, list[str]]] = {}
    for s in sites:
        out.setdefault(s.layer, {}).setdefault(s.kind, []).append(s.name)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detection_and_model_info(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    info = arch.model_info(model)
    assert arch.family_of(model) is EXPECTED_FAMILY[family]
    assert info.family is EXPECTED_FAMILY[family]
    assert (info.hidden_size, info.num_heads, info.num_layers) == (HIDDEN, HEADS, LAYERS)
    expected_task = {"bert": Task.masked_lm, "roberta": Task.masked_lm, "distilbert": Task.masked_lm,
                     "vit": Task.image_classification}.get(family, Task.causal_lm)
    assert info.task is expected_task
    assert info.is_causal is (expected_task is Task.causal_lm)
    assert info.is_vision is (family == "vit")
    # RoBERTa has 130 position slots, two of them unusable; Bloom (ALiBi) and ViT have no token limit
    assert info.max_positions == (None if family in ("vit", "generic") else POSITIONS)


def test_known_model_type_with_unknown_internals_falls_back_to_generic() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(model_type="llama")
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    assert arch.family_of(Odd()) is Family.generic


@pytest.mark.parametrize("family", KNOWN)
def test_default_sites_per_layer(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    stack, per_block, final = EXPECTED[family]
    sites = arch.find_sites(model)
    by_layer = _by_layer(sites)
    assert set(by_layer) == set(range(LAYERS)) | ({None} if final else set())
    for i in range(LAYERS):
        block = f"{stack}.{i}"
        expected = {kind: sorted(f"{block}.{rel}" for rel in rels) for kind, rels in per_block.items()}
        expected[SiteKind.block_output] = [block]
        assert {k: sorted(v) for k, v in by_layer[i].items()} == expected
    if final:
        assert by_layer[None] == {SiteKind.norm: [final]}
    for s in sites:  # every site points at a module that exists under its plain name
        assert s.module is model.get_submodule(s.module_name)
        assert s.capture == ("input" if s.name.endswith(":input") else "output")
        assert s.name == s.module_name + (":input" if s.capture == "input" else "")
    assert len({s.name for s in sites}) == len(sites)


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_kind_selection(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    stack = EXPECTED[family][0]
    blocks = arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))
    assert [(s.name, s.layer, s.kind) for s in blocks] == [(f"{stack}.{i}", i, SiteKind.block_output) for i in range(LAYERS)]
    ffn = arch.find_sites(model, SiteSelection(kinds=(SiteKind.ffn_output, SiteKind.residual)))
    assert {s.kind for s in ffn} == {SiteKind.ffn_output, SiteKind.residual}
    assert all((s.capture == "input") is (s.kind is SiteKind.residual) for s in ffn)


def test_include_exclude_patterns(models: dict[str, nn.Module]) -> None:
    model = models["opt"]
    only_l1 = arch.find_sites(model, SiteSelection(include=("*.layers.1*",)))
    assert only_l1 and {s.layer for s in only_l1} == {1}
    assert len(only_l1) == 6  # residual, attn, ffn, 2 norms, block
    no_fc2 = arch.find_sites(model, SiteSelection(exclude=("*fc2",)))
    assert not any(s.name.endswith("fc2") for s in no_fc2)
    assert len(no_fc2) == len(arch.find_sites(model)) - LAYERS
    inputs = arch.find_sites(model, SiteSelection(include=("*:input",)))  # patterns also see the ":input" label
    assert [s.name for s in inputs] == [f"model.decoder.layers.{i}.final_layer_norm:input" for i in range(LAYERS)]
    both = arch.find_sites(model, SiteSelection(include=("*.layers.0.*",), exclude=("*norm*",)))
    assert sorted(s.name for s in both) == ["model.decoder.layers.0.fc2", "model.decoder.layers.0.self_attn.out_proj"]
    assert arch.find_sites(model, SiteSelection(include=("nothing*",))) == []


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_linear_inputs(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    sites = arch.find_sites(model, SiteSelection(kinds=(SiteKind.linear_input,)))
    stack = EXPECTED[family][0]
    expected = []
    for i in range(LAYERS):
        block = model.get_submodule(f"{stack}.{i}")
        expected += [f"{stack}.{i}.{n}:input" for n, m in block.named_modules()
                     if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert [s.name for s in sites] == expected
    assert len(expected) == LAYERS * (6 if family == "opt" else 4)  # q k v out fc1 fc2 / c_attn c_proj c_fc c_proj
    assert all(s.capture == "input" and s.kind is SiteKind.linear_input for s in sites)


def test_generic_fallback_hooks_linears_and_norms_by_layer(models: dict[str, nn.Module]) -> None:
    model = models["generic"]
    sites = arch.find_sites(model)
    assert {s.kind for s in sites} == {SiteKind.linear_output, SiteKind.norm}
    by_layer = _by_layer(sites)
    for i in range(LAYERS):
        p = f"transformer.h.{i}"
        assert sorted(by_layer[i][SiteKind.linear_output]) == sorted(
            f"{p}.{r}" for r in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
        assert sorted(by_layer[i][SiteKind.norm]) == [f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
    assert sorted(by_layer[None][SiteKind.norm]) == ["transformer.ln_f", "transformer.word_embeddings_layernorm"]
    assert SiteKind.linear_output not in by_layer[None]
    assert not any(s.name.startswith("lm_head") for s in sites)  # the head is not part of the backbone
    assert all(s.module is model.get_submodule(s.name) for s in sites)
    # the family kinds do not exist for an unknown architecture
    assert arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output, SiteKind.ffn_output))) == []
    lin_in = arch.find_sites(model, SiteSelection(kinds=(SiteKind.linear_input,)))
    assert len(lin_in) == 4 * LAYERS and all(s.capture == "input" for s in lin_in)


def test_family_sites_never_emit_linear_output(models: dict[str, nn.Module]) -> None:
    assert SiteKind.linear_output in DEFAULT_SITE_KINDS
    assert not any(s.kind is SiteKind.linear_output for s in arch.find_sites(models["llama"]))


def test_parse_site_kinds() -> None:
    assert arch.parse_site_kinds(["block_output,ffn_output"]) == (SiteKind.block_output, SiteKind.ffn_output)
    assert arch.parse_site_kinds([" norm ", "norm,residual", ""]) == (SiteKind.norm, SiteKind.residual)
    assert arch.parse_site_kinds(["all"]) == tuple(SiteKind)
    with pytest.raises(UsageError, match=r"unknown site kind 'bogus'.*valid: block_output, .*linear_output, all"):
        arch.parse_site_kinds(["block_output,bogus"])
    with pytest.raises(UsageError, match="--sites is empty"):
        arch.parse_site_kinds([" , "])


@pytest.mark.parametrize("family", KNOWN)
def test_attention_modules(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    mods = arch.attention_modules(model)
    stack = EXPECTED[family][0]
    assert len(mods) == LAYERS
    for i, (name, module) in enumerate(mods):
        assert name.startswith(f"{stack}.{i}.")
        assert module is model.get_submodule(name)
        assert type(module).__name__ == ATTENTION_CLASS[family]


def test_attention_modules_need_a_known_family(models: dict[str, nn.Module]) -> None:
    with pytest.raises(UsageError, match="'bloom' is only supported with --attention softmax"):
        arch.attention_modules(models["generic"])


@pytest.mark.parametrize("family", FAMILIES)
def test_head_module_names(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    heads = set(arch.head_module_names(model))
    children = dict(model.named_children())
    assert heads <= set(children)
    if family == "distilbert":
        assert {"vocab_transform", "vocab_layer_norm", "vocab_projector"} <= heads
    else:
        assert heads == HEADS_OF[family]
    backbone = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "vit": "vit"}.get(family)
    backbone = backbone or ("model" if family in ("opt", "llama", "mistral", "qwen2") else "transformer")
    assert backbone not in heads
    # every parameter is either in the backbone or in a head
    params = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert params <= heads | {backbone}


def test_embedding_sum_site(models: dict[str, nn.Module]) -> None:
    bert = arch.embedding_sum_site(models["bert"])
    assert (bert.name, bert.capture, bert.layer) == ("bert.embeddings.LayerNorm:input", "input", None)
    assert bert.module is models["bert"].get_submodule("bert.embeddings.LayerNorm")
    llama = arch.embedding_sum_site(models["llama"])
    assert (llama.name, llama.capture, llama.layer) == ("model.layers.0:input", "input", 0)
    assert arch.embedding_sum_site(models["generic"]) is None


def test_layer_modules_are_the_blocks_in_order(models: dict[str, nn.Module]) -> None:
    blocks = arch.layer_modules(models["gpt2"])
    assert [n for n, _ in blocks] == ["transformer.h.0", "transformer.h.1"]
    assert all(type(b).__name__ == "GPT2Block" for _, b in blocks)
    assert arch.layer_modules(models["generic"]) == []
