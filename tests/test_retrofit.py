"""retrofit: near-vanilla starts, objectives against hand / train references, identical batches per twin, presets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, Device, LoadConfig
from outlier_probe.errors import UsageError
from outlier_probe.loading import load_model
from outlier_probe.retrofit import make_twin, run_retrofit
from outlier_probe.retrofit_config import PRESETS, RetrofitConfig
from outlier_probe.retrofit_objective import Objective, objective_loss, resolve_objective


def tiny_cfg(ckpt: Path, data: Path, **kw: Any) -> RetrofitConfig:
    base = dict(source=str(ckpt), data=data, steps=2, batch_size=2, seq_len=32, eval_every=1, eval_samples=4, threads=1,
                device=Device.cpu, warmup=0, lr=1e-3)
    return RetrofitConfig(**{**base, **kw})


def test_objective_resolution() -> None:
    assert resolve_objective(arch.Task.causal_lm, Objective.auto) is Objective.lm
    assert resolve_objective(arch.Task.masked_lm, Objective.auto) is Objective.mlm
    assert resolve_objective(arch.Task.encoder, Objective.auto) is Objective.distill  # MiniLM: no head
    assert resolve_objective(arch.Task.causal_lm, Objective.distill) is Objective.distill
    with pytest.raises(UsageError, match="needs a masked-LM head"):
        resolve_objective(arch.Task.encoder, Objective.mlm)
    with pytest.raises(UsageError, match="needs a causal LM head"):
        resolve_objective(arch.Task.masked_lm, Objective.lm)


def test_presets_and_validation(text_file: Path) -> None:
    gpu = RetrofitConfig(source="x", preset="gpu", data=text_file)
    assert (gpu.steps, gpu.batch_size, gpu.seq_len) == (PRESETS["gpu"].steps, 64, 256)
    assert RetrofitConfig(source="x", preset="gpu", steps=3).steps == 3  # overrides win
    assert RetrofitConfig(source="x", variants=("softmax", "gated", "gated")).variants == (AttentionVariant.gated,)
    for bad in (dict(variants=("nope",)), dict(variants=("softmax",)), dict(preset="tpu"), dict(seeds=(1, 1)), dict(gate_init=1.0)):
        with pytest.raises(UsageError):
            RetrofitConfig(source="x", **bad)


def test_starts(tiny_checkpoint: Callable[..., Path]) -> None:
    original = load_model(LoadConfig(source=str(tiny_checkpoint("gpt2"))))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = original.model(input_ids=ids).logits
    control = make_twin(original, AttentionVariant.softmax, {})
    torch.testing.assert_close(control.model(input_ids=ids).logits, ref)  # the control is the original
    gated = make_twin(original, AttentionVariant.gated, {"gate_init": 0.95})
    gates = [m.op_gate for _, m in arch.attention_modules(gated.model)]
    assert gates and all(float(g.weight.detach().abs().max()) == 0.0 for g in gates)
    assert all(torch.allclose(torch.sigmoid(g.bias), torch.tensor(0.95)) for g in gates)  # gates nearly open
    assert all(p.requires_grad for p in gated.model.parameters())
    assert not hasattr(arch.attention_modules(original.model)[0][1], "op_gate")  # the original is untouched


def test_objective_losses_match_references(tiny_checkpoint: Callable[..., Path]) -> None:
    from outlier_probe.train.batches import _loss

    model = load_model(LoadConfig(source=str(tiny_checkpoint("gpt2")))).model
    batch = {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))}
    ours = objective_loss(model, batch, Objective.lm)
    ref, _ = _loss(model, batch, arch.Task.causal_lm)  # train's causal LM loss
    torch.testing.assert_close(ours, ref)
    h = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1].detach()
    assert float(objective_loss(model, batch, Objective.distill, (h, h.mean(1)))) == pytest.approx(0.0, abs=1e-10)
    th = 2 * h  # hand value: |h - 2h|^2 / |2h|^2 = 1/4 for the tokens and for the pooled embedding
    assert float(objective_loss(model, batch, Objective.distill, (th, th.mean(1)))) == pytest.approx(0.5, rel=1e-5)


def test_run_lm_twins_share_batches(tiny_checkpoint: Callable[..., Path], text_file: Path) -> None:
    cfg = tiny_cfg(tiny_checkpoint("gpt2"), text_file, variants=("softmax1",), seeds=(0, 1))
    result = run_retrofit(cfg)
    assert result.objective is Objective.lm and [(t.variant.value, t.seed) for t in result.twins] == [
        ("softmax", 0), ("softmax1", 0), ("softmax", 1), ("softmax1", 1)]
    again = run_retrofit(replace_seeds(cfg, (0,)))
    for a, b in zip(again.twins[0].curve, result.twins[0].curve, strict=True):  # deterministic for a fixed seed
        assert a == pytest.approx(b, rel=1e-6, nan_ok=True)
    control, twin = result.twins[0], result.twins[1]
    assert [r["step"] for r in control.curve] == [0, 1, 2]
    assert control.before.hidden_cosine == pytest.approx(1.0, abs=1e-6)  # the control starts as the original
    assert control.before.objective_metric == pytest.approx(result.original.objective_metric, rel=1e-6)
    assert twin.before.null_mass > 0 and control.before.null_mass == pytest.approx(0.0, abs=1e-6)
    assert result.twins[1].before == result.twins[3].before  # one start per variant, whatever the seed
    assert result.twins[0].after != result.twins[2].after  # seeds change the batch order
    for t in result.twins:
        assert math.isfinite(t.after.w8a8_loss) and t.after.metric == "perplexity" and t.step_s > 0


def replace_seeds(cfg: RetrofitConfig, seeds: tuple[int, ...]) -> RetrofitConfig:
    from dataclasses import replace

    return replace(cfg, seeds=seeds, variants=(AttentionVariant.softmax1,))


@pytest.mark.parametrize("objective", ["mlm", "distill"])
def test_run_bert_objectives(tiny_checkpoint: Callable[..., Path], text_file: Path, objective: str) -> None:
    result = run_retrofit(tiny_cfg(tiny_checkpoint("bert"), text_file, variants=("clipped",), objective=objective, steps=1))
    metric = {"mlm": "mlm_perplexity", "distill": "mlm_perplexity"}[objective]
    assert result.objective.value == objective and result.original.metric == metric
    if objective == "distill":
        assert result.original.objective_metric == pytest.approx(0.0, abs=1e-9)  # distance of the original to itself
    clipped = result.twins[1]
    assert clipped.params["gamma"] == -0.001 and clipped.before.hidden_cosine < 1.0


def test_data_too_short(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a few words only. " * 20)
    with pytest.raises(UsageError, match="fewer than one batch"):
        run_retrofit(tiny_cfg(tiny_checkpoint("gpt2"), short, variants=("gated",)))


@pytest.mark.parametrize("family", ["llama", "gguf"])
def test_llama_family_and_gguf_start(tiny_checkpoint: Callable[..., Path], tiny_gguf: tuple[Path, Any], text_file: Path,
                                     family: str) -> None:
    source = tiny_gguf[0] if family == "gguf" else tiny_checkpoint("llama")
    result = run_retrofit(tiny_cfg(source, text_file, variants=("softmax1", "gated"), steps=1))
    assert result.objective is Objective.lm and [t.variant.value for t in result.twins] == ["softmax", "softmax1", "gated"]
    assert all(math.isfinite(t.after.w8a8_loss) and t.after.metric == "perplexity" for t in result.twins)


def test_one_held_out_pass_equals_the_separate_passes(tiny_checkpoint: Callable[..., Path], text_file: Path) -> None:
    """The shared pass gives what `stats`, `attention`, the fidelity pass and the objective's own pass give apart."""
    from outlier_probe.config import DataConfig, StatsConfig
    from outlier_probe.data import text_batches
    from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention
    from outlier_probe.retrofit_objective import held_out_metric, teacher_targets
    from outlier_probe.retrofit_measure import held_out_pass
    from outlier_probe.stats.run import measure_sites

    loaded = load_model(LoadConfig(source=str(tiny_checkpoint("gpt2"))))
    data = DataConfig(path=text_file, samples=4, seq_len=32, batch_size=2)
    held = text_batches(loaded.processor, data, loaded.info.max_positions)
    ref = [teacher_targets(loaded.model, b["input_ids"]) for b in held.batches]
    ref = [(2 * h, 2 * p) for h, p in ref]  # a reference at twice the scale: cosine 1, distillation loss 1/4 + 1/4
    for objective in (Objective.distill, Objective.lm):
        scorer = held_out_metric(loaded, held.batches, objective, ref)
        one = held_out_pass(loaded, held, ref, data, scorer)
        assert one.objective_metric == pytest.approx(scorer(loaded.model), rel=1e-6)
    assert one.objective_metric == pytest.approx(held_out_metric(loaded, held.batches, Objective.lm)(loaded.model), rel=1e-6)
    assert held_out_pass(loaded, held, ref, data, held_out_metric(loaded, held.batches, Objective.distill, ref)).objective_metric == \
        pytest.approx(0.5, rel=1e-5)
    assert one.hidden_cosine == pytest.approx(1.0, abs=1e-6) and one.embedding_cosine == pytest.approx(1.0, abs=1e-6)
    apart = [r.row() for r in measure_sites(loaded, held, StatsConfig(load=LoadConfig(source=loaded.source)))]
    assert [r["site"] for r in one.rows] == [r["site"] for r in apart]
    for a, b in zip(one.rows, apart):
        assert a["paper_kurtosis"] == pytest.approx(b["paper_kurtosis"], rel=1e-9) and a["paper_inf_norm"] == b["paper_inf_norm"]
    att = run_attention(AttentionConfig(load=LoadConfig(source=loaded.source), data=data), loaded=loaded).summary()
    for key in ("sink_rate", "first_token_mass", "null_mass", "massive_ratio"):
        assert one.attention[key] == pytest.approx(att[key], rel=1e-9, nan_ok=True)
