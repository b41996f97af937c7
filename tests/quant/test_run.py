"""`run_quantize` end to end on tiny checkpoints: transparency at 16 bits, degradation growing as bits
shrink, real calibration, injected outliers, the bitsandbytes backend and the result rows."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from outlier_probe.config import DataConfig, LoadConfig, StatsConfig
from outlier_probe.data import batches_for_model, builtin_text
from outlier_probe.evaluation import Evaluator, MetricName
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.quant.modules import ActMode, iter_act_quantizers
from outlier_probe.quant.quantizer import Estimator
from outlier_probe.quant.recipes import Backend, QuantConfig, Recipe, quantize_model
from outlier_probe.quant.calibration import calibrate, calibration_config
from outlier_probe.quant.run import QuantizeConfig, QuantizeResult, run_quantize
from outlier_probe.report.quant_report import RUN_COLUMNS, SITE_COLUMNS
from outlier_probe.stats.run import run_stats

DATA = DataConfig(samples=16, seq_len=64, batch_size=8)
SMALL = DataConfig(samples=8, seq_len=32, batch_size=4)
OUTLIER_CHANNEL = 5
OUTLIER_FACTOR = 100.0  # the injected value is 100x the largest entry of the embedding table
PERCENTILE = 99.9


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_opt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Callable[[str], Any]) -> Path:
    """The tiny OPT (2 layers, hidden 32) trained for 250 steps on the built-in text (ppl ~33 instead of
    the vocabulary size), with untied embeddings so an injected embedding outlier does not touch lm_head."""
    from tests.conftest import make_config

    from outlier_probe.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = tiny_tokenizer("causal")
    config = make_config("opt", vocab_size=len(tok))
    config.tie_word_embeddings = False
    model = build_model(config, seed=0).train()
    ids = torch.tensor(tok(builtin_text()[0][:60_000], add_special_tokens=False)["input_ids"])
    data = ids[: len(ids) // 64 * 64].view(-1, 64)  # (N, 64)
    gen = torch.Generator().manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(250):
        batch = data[torch.randint(len(data), (8,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
        optim.zero_grad()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("trained-opt")
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _load(path: Path) -> LoadedModel:
    return load_model(LoadConfig(source=str(path)))


def _run(loaded: LoadedModel, *recipes: QuantConfig, data: DataConfig = DATA, **kwargs: Any) -> QuantizeResult:
    cfg = QuantizeConfig(load=LoadConfig(source=loaded.source), data=data, recipes=recipes, **kwargs)
    return run_quantize(cfg, loaded=loaded)


def _rel(run: Any) -> float:
    return (run.quant_score.value - run.float_score.value) / run.float_score.value


def test_degradation_is_zero_at_16_bits_and_grows_as_bits_shrink(trained_opt: Path) -> None:
    loaded = _load(trained_opt)
    bits = (16, 8, 4, 2)
    result = _run(loaded, *(QuantConfig(w_bits=b, a_bits=b) for b in bits), site_stats=False)
    ppl = {b: r.quant_score.value for b, r in zip(bits, result.runs)}
    float_ppl = result.runs[0].float_score.value
    print(f"\ntrained tiny OPT: float ppl {float_ppl:.3f}, " + ", ".join(f"W{b}A{b} {p:.3f}" for b, p in ppl.items()))
    assert result.runs[0].float_score.metric is MetricName.perplexity
    assert 5 < float_ppl < 100, "the fixture is trained: far below the vocabulary size (320)"
    assert abs(ppl[16] - float_ppl) <= 1e-3 * float_ppl
    assert math.isfinite(ppl[8]) and abs(ppl[8] - float_ppl) / float_ppl < 0.02  # noise: either sign
    assert ppl[4] > ppl[8] and ppl[2] > ppl[4]
    assert [r.run for r in result.runs] == [f"paper-w{b}a{b}-pt-running_minmax" for b in bits]


def test_masked_lm_perplexity_is_unchanged_at_16_bits(tiny_checkpoint: Callable[..., Path]) -> None:
    loaded = _load(tiny_checkpoint("bert"))
    result = _run(loaded, QuantConfig(w_bits=16, a_bits=16), QuantConfig(), data=SMALL, site_stats=False)
    sixteen, eight = result.runs
    assert sixteen.float_score.metric is MetricName.mlm_perplexity
    assert sixteen.float_score.extra["masked_tokens"] > 0
    assert abs(_rel(sixteen)) <= 1e-3
    assert math.isfinite(eight.quant_score.value) and abs(_rel(eight)) < 0.05


def test_hidden_cosine_of_minilm_is_one_at_16_bits(minilm_path: Path) -> None:
    loaded = _load(minilm_path)
    result = _run(loaded, QuantConfig(w_bits=16, a_bits=16), QuantConfig(), data=SMALL, site_stats=False)
    sixteen, eight = result.runs
    assert sixteen.float_score.metric is MetricName.hidden_cosine
    assert sixteen.float_score.value == pytest.approx(1.0, abs=1e-6)  # the float model is its own reference
    assert abs(_rel(sixteen)) <= 1e-3
    # not ~1e-5: what remains at 16 bits is clipping, evaluation batches exceed the EMA-calibrated ranges
    assert sixteen.quant_score.extra["relative_error"] < 0.05
    print(f"\nMiniLM hidden cosine: W16A16 {sixteen.quant_score.value:.5f}, W8A8 paper {eight.quant_score.value:.4f}")
    assert 0.0 < eight.quant_score.value < sixteen.quant_score.value  # real degradation, finite


def test_calibration_sets_ranges_that_evaluation_does_not_move(tiny_checkpoint: Callable[..., Path]) -> None:
    loaded = _load(tiny_checkpoint("opt"))
    recipe = QuantConfig(calib_batches=3)
    calib_cfg = calibration_config(SMALL, recipe)
    assert calib_cfg.offset == SMALL.samples and calib_cfg.samples == 3 * SMALL.batch_size
    evaluation = batches_for_model(loaded.processor, loaded.info, SMALL)
    calib = batches_for_model(loaded.processor, loaded.info, calib_cfg)
    seen = {tuple(row.tolist()) for b in evaluation.batches for row in b["input_ids"]}
    assert not seen & {tuple(row.tolist()) for b in calib.batches for row in b["input_ids"]}, "disjoint sequences"

    qmodel, sites = quantize_model(loaded.model, recipe, loaded.attention, loaded.attention_params)
    quantizers = [q for _, q in iter_act_quantizers(qmodel)]
    assert all(q.min_val == math.inf and q.max_val == -math.inf and not q.has_qparams for q in quantizers)
    assert all(q.mode is ActMode.calibrating for q in quantizers)
    calibrate(qmodel, calib)
    for q in quantizers:
        assert q.mode is ActMode.frozen and q.has_qparams
        assert q.estimator.num_batches == 3  # every quantizer saw every calibration batch once
        assert math.isfinite(q.min_val) and math.isfinite(q.max_val) and q.min_val < q.max_val
    frozen = [(q.min_val.clone(), q.max_val.clone(), q.scale.clone(), q.zero_point.clone()) for q in quantizers]
    ranges = [q.estimator.range() for q in quantizers]

    evaluator = Evaluator(loaded.info.task, evaluation.batches, loaded.processor)
    assert math.isfinite(evaluator(qmodel).value)
    for q, before, (lo, hi) in zip(quantizers, frozen, ranges):
        after = (q.min_val, q.max_val, q.scale, q.zero_point)
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert q.estimator.num_batches == 3 and torch.equal(q.estimator.range()[0], lo)


def _frequent_token(loaded: LoadedModel) -> int:
    """A token making up ~1.5% of the evaluation tokens: in most sequences, yet its outlier values are
    only ~0.05% of a residual tensor (1.5% of tokens x 1 of 32 channels), under the 0.1% a 99.9 percentile clips."""
    batches = batches_for_model(loaded.processor, loaded.info, DATA)
    ids = torch.cat([b["input_ids"].flatten() for b in batches.batches])
    freq = torch.bincount(ids, minlength=loaded.info.vocab_size).double() / ids.numel()
    return int((freq - 0.015).abs().argmin())


def _inject_outlier(loaded: LoadedModel) -> tuple[int, float]:
    """One residual-stream channel of one frequent token carries 100x the largest embedding value.

    Like the outliers of real OPT / BERT checkpoints it sits in one channel of a few tokens; it enters the
    residual stream at the embedding and is carried through every block by the residual connections.
    """
    token = _frequent_token(loaded)
    table = loaded.model.get_input_embeddings().weight
    with torch.no_grad():
        value = OUTLIER_FACTOR * float(table.abs().max())
        table[token, OUTLIER_CHANNEL] = value
    return token, value


def test_injected_outliers_hurt_per_tensor_w8a8_and_finer_recipes_recover(trained_opt: Path) -> None:
    pt = QuantConfig()
    pc = QuantConfig(per_channel=True)
    pct = QuantConfig(a_estimator=Estimator.percentile, percentile=PERCENTILE)
    pc_pct = QuantConfig(per_channel=True, a_estimator=Estimator.percentile, percentile=PERCENTILE)
    a8 = QuantConfig(w_bits=16)
    a8_pct = QuantConfig(w_bits=16, a_estimator=Estimator.percentile, percentile=PERCENTILE)
    names = ("W8A8 per-tensor", "W8A8 per-channel", f"W8A8 percentile {PERCENTILE}", "W8A8 per-channel + percentile",
             "W16A8 min-max", f"W16A8 percentile {PERCENTILE}")
    stats_cfg = StatsConfig(load=LoadConfig(source=str(trained_opt)), data=DATA)

    plain = _load(trained_opt)
    plain_stats = run_stats(stats_cfg, loaded=plain).summary
    plain_runs = _run(plain, pt, pc, pct, site_stats=False).runs
    injected = _load(trained_opt)
    token, value = _inject_outlier(injected)
    injected_stats = run_stats(stats_cfg, loaded=injected).summary
    plain_inf, injected_inf = plain_stats["max_inf_norm"], injected_stats["max_inf_norm"]
    runs = _run(injected, pt, pc, pct, pc_pct, a8, a8_pct, site_stats=False).runs

    print(f"\ninjected outlier: token {token} ({injected.processor.decode([token])!r}), channel {OUTLIER_CHANNEL}, "
          f"value {value:.1f}; stats max inf-norm {plain_inf:.2f} -> {injected_inf:.2f}, "
          f"max |x| {plain_stats['max_abs']:.2f} -> {injected_stats['max_abs']:.2f}")
    for label, model_runs in (("plain", plain_runs), ("injected", runs)):
        print(f"{label}: float ppl {model_runs[0].float_score.value:.2f}; " + "; ".join(
            f"{n} {r.quant_score.value:.2f} ({100 * _rel(r):+.1f}%)" for n, r in zip(names, model_runs)))

    assert injected_inf > 4 * plain_inf, "the injection produces real outliers"
    assert injected_stats["max_abs"] > 5 * plain_stats["max_abs"]
    ppl = {n: r.quant_score.value for n, r in zip(names, runs)}
    # the float model is barely changed; per-tensor W8A8 loses far more than on the plain model
    assert runs[0].float_score.value < 1.2 * plain_runs[0].float_score.value
    assert _rel(runs[0]) > 0.2 and _rel(runs[0]) > 20 * max(_rel(plain_runs[0]), 1e-3)
    # per-channel weights recover the embedding table (one scale per token row) ...
    assert ppl["W8A8 per-channel"] < ppl["W8A8 per-tensor"]
    # ... and a percentile range recovers the activations once the weights are fine
    assert ppl["W8A8 per-channel + percentile"] < ppl["W8A8 per-channel"]
    assert ppl[f"W16A8 percentile {PERCENTILE}"] < ppl["W16A8 min-max"]
    assert _rel(runs[4]) > 5 * max(_rel(plain_runs[0]), 1e-3), "activation outliers alone cost accuracy"


@pytest.mark.parametrize("which", ["opt", "minilm"])
def test_bnb_int8_backend_runs_on_cpu(which: str, tiny_checkpoint: Callable[..., Path], request: pytest.FixtureRequest,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    for package in ("bitsandbytes", "accelerate"):
        if importlib.util.find_spec(package) is None:  # not importorskip: importing bitsandbytes first would log
            pytest.skip(f"{package} is not installed")
    path = tiny_checkpoint("opt") if which == "opt" else request.getfixturevalue("minilm_path")
    loaded = _load(path)
    result = _run(loaded, data=SMALL, backends=(Backend.bnb_int8,))
    (run,) = result.runs
    assert run.run == "bnb-int8" and run.recipe is None
    assert math.isfinite(run.quant_score.value) and run.quant_score.value != run.float_score.value
    assert abs(_rel(run)) < 0.05  # LLM.int8 keeps outlier columns in fp16: a small loss
    linear = "encoder.layer.0.attention.self.query" if which == "minilm" else "model.decoder.layers.0.fc1"
    assert type(loaded.model.get_submodule(linear)) is torch.nn.Linear, "the float model is not converted"
    row = run.row()
    assert list(row) == RUN_COLUMNS and row["w_estimator"] == "llm.int8"
    assert "MatMul8bitLt" not in capfd.readouterr().err, "bitsandbytes' per-call log lines are kept off stderr"


def test_result_rows_and_site_rows(tiny_checkpoint: Callable[..., Path]) -> None:
    loaded = _load(tiny_checkpoint("opt"))
    result = _run(loaded, QuantConfig(), QuantConfig(recipe=Recipe.linear), data=SMALL)
    assert [r.run for r in result.runs] == ["paper", "linear"]
    rows = result.rows()
    assert all(list(r) == RUN_COLUMNS for r in rows)
    assert rows[0]["rel_change"] == pytest.approx((rows[0]["quantized"] - rows[0]["float"]) / rows[0]["float"])
    sites = result.site_rows()
    assert sites and all(set(SITE_COLUMNS) == set(s) for s in sites)
    paper_sites = [s for s in sites if s["run"] == "paper"]
    assert all(math.isfinite(s["sqnr_db"]) and s["range_min"] <= s["range_max"] for s in sites)
    sqnr = [s["sqnr_db"] for s in paper_sites]
    assert sqnr == sorted(sqnr), "worst (lowest SQNR) first"
    # sites with a stats counterpart carry its kurtosis / inf-norm
    measured = [s for s in paper_sites if s["kind"] in ("linear_output", "norm", "block_output")]
    assert measured and all(math.isfinite(s["paper_inf_norm"]) and s["paper_inf_norm"] > 0 for s in measured)
    assert {s["kind"] for s in sites if s["run"] == "linear"} == {"linear_input"}
    assert result.settings["recipes"][0]["recipe"] == "paper" and result.calibration["batches"] == 4
    assert result.site_summary is not None
