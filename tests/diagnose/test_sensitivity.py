"""sensitivity: groups, divergence, ranking and plans on tiny models with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig
from outlier_probe.diagnose.divergence import OutputDivergence
from outlier_probe.diagnose.groups import GroupBy, group_points, select_groups
from outlier_probe.diagnose.sensitivity import SensitivityConfig, run_sensitivity
from outlier_probe.diagnose.plan import Budget
from outlier_probe.errors import UsageError
from outlier_probe.evaluation import Evaluator
from outlier_probe.loading import LoadedModel
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.recipes import QuantConfig, quant_points, quantize_model
from tests.conftest import make_model
from tests.diagnose.conftest import FRAGILE_LAYER, fragile_encoder

SMALL = dict(samples=8, seq_len=32, batch_size=4)


def _loaded(model: torch.nn.Module, tok) -> LoadedModel:  # noqa: ANN001
    return LoadedModel(model, tok, arch.model_info(model), "tiny", "tiny", AttentionVariant.softmax, {})


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
def test_layer_groups_partition_every_point(family: str, one_thread: None) -> None:
    model = make_model(family)
    qmodel, sites = quantize_model(model, QuantConfig())
    points = [p.name for p in quant_points(qmodel, sites)]
    groups = group_points(model, quant_points(qmodel, sites), GroupBy.layer)
    members = [p for pts in groups.values() for p in pts]
    assert sorted(members) == sorted(points) and len(set(members)) == len(members)
    assert [g for g in groups if g.startswith("layer.")] == ["layer.0", "layer.1"]
    assert "embeddings" in groups
    emb = groups["embeddings"]
    assert any(p.endswith(":weight") for p in emb) and any(p.endswith(":in") for p in emb), emb  # table + sum
    if family != "bert":  # decoders: the final norm follows the last block
        assert groups["head"] and all("norm" in p or "ln_f" in p for p in groups["head"])
    assert group_points(model, quant_points(qmodel, sites), GroupBy.site).keys() == set(points)


def test_keep_float_leaves_exactly_those_points(one_thread: None) -> None:
    model = make_model("gpt2")
    full, full_sites = quantize_model(model, QuantConfig())
    every = {p.name for p in quant_points(full, full_sites)}
    keep = KeepFloat(patterns=("transformer.h.1",))  # a block name keeps everything inside it
    q, sites = quantize_model(model, QuantConfig(), keep_float=keep)
    left = {p.name for p in quant_points(q, sites)}
    assert left == {p for p in every if not p.startswith("transformer.h.1.") and not p.startswith("transformer.h.1:")}
    assert keep.unmatched(sorted(every)) == []
    assert KeepFloat(patterns=("nothing.*",)).unmatched(sorted(every)) == ["nothing.*"]


def test_output_divergence_is_kl_against_float(tiny_tokenizer, text_file: Path, one_thread: None) -> None:  # noqa: ANN001
    from outlier_probe.data import text_batches

    tok = tiny_tokenizer("causal")
    model = make_model("gpt2", vocab_size=len(tok))
    batches = text_batches(tok, DataConfig(path=text_file, **SMALL)).batches
    ev = Evaluator(arch.Task.causal_lm, batches)
    with OutputDivergence(ev, model) as rec:
        ref_score = ev.reference_score(model)
    other = make_model("gpt2", vocab_size=len(tok), seed=1)
    with OutputDivergence(ev, model, rec.reference) as same:
        s = ev(model)
    assert s.value == ref_score.value and same.divergence(s) == pytest.approx(0.0, abs=1e-7)
    with OutputDivergence(ev, other, rec.reference) as meter:
        s2 = ev(other)
    with torch.no_grad():  # reference: torch's kl_div over the same next-token positions
        kls = []
        for b in batches:
            p = F.log_softmax(model(**b).logits[:, :-1].float(), -1).reshape(-1, len(tok))
            q = F.log_softmax(other(**b).logits[:, :-1].float(), -1).reshape(-1, len(tok))
            kls.append(F.kl_div(q, p, log_target=True, reduction="sum") / p.shape[0])
    assert meter.divergence(s2) == pytest.approx(float(sum(kls) / len(kls)), rel=1e-5)


@pytest.fixture(scope="module")
def fragile_result(tiny_tokenizer, text_file: Path):  # noqa: ANN001, ANN201
    torch.set_num_threads(1)
    tok = tiny_tokenizer("bert")
    cfg = SensitivityConfig(load=LoadConfig(source="tiny"), data=DataConfig(path=text_file, **SMALL),
                            recipe=QuantConfig(calib_batches=1), budget=Budget.parse("0.1%"))
    return run_sensitivity(cfg, loaded=_loaded(fragile_encoder(len(tok)), tok))


def test_fragile_layer_ranks_first_and_the_plan_keeps_exactly_it(fragile_result) -> None:  # noqa: ANN001
    r = fragile_result
    assert [g.name for g in r.groups][0] == f"layer.{FRAGILE_LAYER}"
    first, second = r.groups[0], r.groups[1]
    assert first.only.divergence > 10 * second.only.divergence  # not a close call
    assert first.all_but.value > max(g.all_but.value for g in r.groups[1:])  # keeping it float helps most
    plan = r.plan
    assert plan.met and plan.final.kept == (f"layer.{FRAGILE_LAYER}",)
    assert [s.step for s in plan.steps] == [0, 1] and not plan.steps[0].meets
    assert plan.steps[0].value == r.quantized.value
    assert plan.final.value == first.all_but.value  # step 1 is the measured run "all but the fragile layer"
    assert r.runs == 1 + 2 * len(r.groups)  # float once (not counted), all-quantized once, 2 per group
    assert r.divergence == "1-cos" and r.float_value == 1.0
    assert r.ignore_list(plan.final.kept) == sorted(
        m for m in r.linear_modules if m.startswith(f"encoder.layer.{FRAGILE_LAYER}."))


def test_unmeetable_budget_reports_the_best_plan(tiny_tokenizer, text_file: Path, one_thread: None) -> None:  # noqa: ANN001
    tok = tiny_tokenizer("bert")
    cfg = SensitivityConfig(load=LoadConfig(source="tiny"), data=DataConfig(path=text_file, **SMALL),
                            recipe=QuantConfig(calib_batches=1), budget=Budget.parse("0"), max_float=1,
                            groups=("layer.*",))
    r = run_sensitivity(cfg, loaded=_loaded(fragile_encoder(len(tok)), tok))
    assert [g.name for g in r.groups] == ["layer.1", "layer.0"]  # --groups: embeddings not ranked
    assert not r.plan.met and len(r.plan.steps) == 2
    assert r.plan.final.kept == ("layer.1",) and r.plan.final.loss == min(s.loss for s in r.plan.steps)


def test_group_selection_and_budget_errors() -> None:
    groups = {"embeddings": ("a:weight",), "layer.0": ("b:out",)}
    assert select_groups(groups, ("layer.*",)) == {"layer.0": ("b:out",)}
    with pytest.raises(UsageError, match="selects no group"):
        select_groups(groups, ("block.*",))
    assert Budget.parse("1%") == Budget(0.01, True) and Budget.parse("0.5") == Budget(0.5, False)
    for bad in ("abc", "-1%", "nan"):
        with pytest.raises(UsageError):
            Budget.parse(bad)
    b = Budget.parse("1%")
    assert b.allows(10.0, 10.09, higher_is_better=False) and not b.allows(10.0, 10.11, higher_is_better=False)
    assert Budget(0.02, False).allows(0.90, 0.885, higher_is_better=True)
    assert not Budget(0.02, False).allows(0.90, 0.87, higher_is_better=True)
    assert not b.allows(10.0, math.inf, higher_is_better=False)


@pytest.mark.parametrize("family", ["bert", "opt"])  # masked LM (KL over masked positions), causal LM
def test_group_runs_are_what_quantize_keep_float_measures(family: str, tiny_tokenizer, text_file: Path,  # noqa: ANN001
                                                          one_thread: None) -> None:
    from outlier_probe.quant.run import QuantizeConfig, run_quantize
    from tests.conftest import tokenizer_kind

    tok = tiny_tokenizer(tokenizer_kind(family))
    loaded = _loaded(make_model(family, vocab_size=len(tok)), tok)
    data, recipe = DataConfig(path=text_file, **SMALL), QuantConfig(calib_batches=1)
    r = run_sensitivity(SensitivityConfig(load=LoadConfig(source="tiny"), data=data, recipe=recipe), loaded=loaded)
    assert r.divergence == "kl" and r.plan is None
    assert all(g.only.divergence >= 0 and g.all_but.divergence >= 0 for g in r.groups)
    every = frozenset(p for pts in r.group_points.values() for p in pts)
    g = r.groups[0]
    for keep, expected in ((frozenset(g.points), g.all_but), (every - frozenset(g.points), g.only), (frozenset(), r.quantized)):
        q = run_quantize(QuantizeConfig(load=LoadConfig(source="tiny"), data=data, recipes=(recipe,),
                                        keep_float=KeepFloat(keep), site_stats=False), loaded=loaded)
        assert q.runs[0].quant_score.value == expected.value  # bit for bit
        assert q.runs[0].float_score.value == r.float_value
