"""train(): every family and attention variant trains, saves, reloads bitwise; resume, determinism, budget, errors.

Everything runs on the `micro` preset (2 layers, hidden 32), one CPU thread, a few steps on a tiny corpus.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from outlier_probe.config import AttentionVariant, LoadConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import load_model
from outlier_probe.train import LOG_COLUMNS, LOG_FILE, STATE_FILE, Schedule, TrainConfig, TrainingInterrupted, build_tokenizer, lr_factor, train

CORPUS_CHARS = 2_500  # ~20 packed sequences of 32 tokens: 20 steps of 4 revisit every sequence several times
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from outlier_probe.data import builtin_text

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(builtin_text()[0][:CORPUS_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Pre-trained BPE tokenizer folders (causal and masked), so each run skips tokenizer training."""
    from outlier_probe.data import builtin_text
    from outlier_probe.tokenization import train_bpe_tokenizer

    text = builtin_text()[0][:20_000]
    out = {}
    for kind in ("causal", "masked"):
        folder = tmp_path_factory.mktemp(f"tok-{kind}")
        train_bpe_tokenizer([text], vocab_size=300, masked=kind == "masked").save_pretrained(str(folder))
        out[kind] = str(folder)
    return out


def micro(out: Path, corpus: Path | None, tokenizers: dict[str, str] | None, arch: str = "opt", **kw: Any) -> TrainConfig:
    """A micro-preset config: 20 steps of 4 x 32 tokens, lr 1e-2, no warmup, one thread, no plots."""
    tok = None if tokenizers is None or arch == "vit" else tokenizers["masked" if arch == "bert" else "causal"]
    base: dict[str, Any] = dict(arch=arch, size="micro", data=corpus, tokenizer=tok, seq_len=32, batch_size=4, steps=20,
                                lr=1e-2, warmup=0, eval_every=5, eval_samples=4, log_every=5, threads=1, out=out, plots=False)
    if arch == "vit":
        base.update(seq_len=32, image_size=None)
    base.update(kw)
    return TrainConfig(**base)


def _inputs(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if arch == "vit":
        cfg = model.config
        return {"pixel_values": torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)}
    return {"input_ids": torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)}


def _assert_log(out: Path, steps: list[int]) -> pd.DataFrame:
    log = pd.read_csv(out / LOG_FILE)
    assert tuple(log.columns) == LOG_COLUMNS
    assert log["step"].tolist() == steps
    numeric = log.drop(columns=["run"])
    assert numeric.map(lambda v: math.isfinite(v)).all().all(), log
    assert (log["tokens_per_s"] > 0).all() and (log["max_inf_norm"] > 0).all()
    return log


CASES = [(a, v) for a in ("opt", "bert", "gpt2", "llama", "vit") for v in AttentionVariant]  # every variant on every family


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v.value}" for a, v in CASES])
def test_trains_saves_and_reloads_bitwise(arch: str, variant: AttentionVariant, corpus: Path, tokenizers: dict[str, str],
                                          image_folder: Path, tmp_path: Path) -> None:
    data = image_folder if arch == "vit" else corpus
    result = train(micro(tmp_path / "run", data, tokenizers, arch, attention=variant))
    assert result.steps == 20 and result.stopped_by == "steps"
    log = _assert_log(result.out, [5, 10, 15, 20])
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0], log  # 20 steps on a few repeated sequences
    assert math.isfinite(result.final_eval_loss) and result.final_eval_loss == log["eval_loss"].iloc[-1]

    loaded = load_model(LoadConfig(source=str(result.out)))
    assert loaded.attention is variant
    inputs = _inputs(result.model, arch)
    with torch.no_grad():
        expected, got = result.model(**inputs).logits, loaded.model(**inputs).logits
    assert torch.equal(expected, got)
    if variant is AttentionVariant.gated:
        gates = {k: v for k, v in result.model.state_dict().items() if "op_gate" in k}
        assert gates and all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in gates.items())
        assert any(k.endswith("weight") and v.abs().sum() > 0 for k, v in gates.items())  # gates were trained
    if arch == "vit":
        assert loaded.processor is not None  # an image processor is saved with the checkpoint
    else:
        assert len(loaded.processor) == len(result.processor)


def test_same_seed_gives_identical_weights(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    a = train(micro(tmp_path / "a", corpus, tokenizers, steps=6, attention="softmax1"))
    b = train(micro(tmp_path / "b", corpus, tokenizers, steps=6, attention="softmax1"))
    c = train(micro(tmp_path / "c", corpus, tokenizers, steps=6, attention="softmax1", seed=1))
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_interrupted_run_resumes_to_the_uninterrupted_weights(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    kw = dict(arch="bert", attention="gated", steps=6, eval_every=2, log_every=1)  # MLM masks and gates must resume too
    straight = train(micro(tmp_path / "straight", corpus, tokenizers, **kw))

    def stop_at_3(status: Any) -> None:
        if status.step == 3:
            raise KeyboardInterrupt

    cfg = micro(tmp_path / "resumed", corpus, tokenizers, **kw)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3.*--resume"):
        train(cfg, progress=stop_at_3)
    assert (tmp_path / "resumed" / STATE_FILE).is_file()
    state = torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    resumed = train(replace(cfg, resume=True))
    assert resumed.steps == 6 and resumed.tokens == straight.tokens
    _assert_log(resumed.out, [2, 4, 6])
    s1, s2 = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_sigterm_finishes_the_step_saves_and_exits_143(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    import os
    import signal

    def term_at_2(status: Any) -> None:
        if status.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does before it kills the job

    cfg = micro(tmp_path / "term", corpus, tokenizers, steps=6, log_every=1)
    with pytest.raises(TrainingInterrupted, match="terminated at step 2.*--resume") as err:
        train(cfg, progress=term_at_2)
    assert err.value.exit_code == 143
    assert torch.load(tmp_path / "term" / STATE_FILE, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after the run


def test_resume_continues_the_step_count_and_checks_settings(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    first = train(micro(tmp_path / "r", corpus, tokenizers, steps=4, eval_every=2))
    again = train(micro(tmp_path / "r", corpus, tokenizers, steps=8, eval_every=2, resume=True))
    assert (first.steps, again.steps) == (4, 8) and again.tokens == 2 * first.tokens
    _assert_log(again.out, [2, 4, 6, 8])
    done = train(micro(tmp_path / "r", corpus, tokenizers, steps=8, eval_every=2, resume=True))
    assert done.stopped_by == "already_done" and done.steps == 8
    with pytest.raises(UsageError, match="--attention"):
        train(micro(tmp_path / "r", corpus, tokenizers, steps=10, resume=True, attention="softmax1"))
    with pytest.raises(ProbeError, match="nothing to resume"):
        train(micro(tmp_path / "empty", corpus, tokenizers, resume=True))
    with pytest.raises(UsageError, match="already holds a checkpoint"):
        train(micro(tmp_path / "r", corpus, tokenizers))


def test_time_budget_stops_early(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    result = train(micro(tmp_path / "t", corpus, tokenizers, steps=1_000_000, time_budget=1.0, eval_every=1000))
    assert result.stopped_by == "time_budget" and 0 < result.steps < 1_000_000
    _assert_log(result.out, [result.steps])  # the final row is always written
    assert result.rows[-1]["elapsed_s"] >= 1.0


def test_default_tokenizer_is_trained_on_the_data_and_saved(corpus: Path, tmp_path: Path) -> None:
    result = train(micro(tmp_path / "bpe", corpus, None, steps=2, vocab_size=280, plots=True))
    assert (result.out / "tokenizer.json").is_file() and (result.out / "outliers.png").is_file()
    assert len(result.processor) == result.model.config.vocab_size <= 280
    # the same tokenizer, fitted once and shared (what twins of one comparison do): the same run
    cfg = micro(tmp_path / "shared", corpus, None, steps=2, vocab_size=280)
    build_tokenizer(cfg).save_pretrained(str(tmp_path / "tok"))
    shared = train(replace(cfg, tokenizer=str(tmp_path / "tok")))
    s1, s2 = result.model.state_dict(), shared.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fine_tune_from_checkpoint_with_the_variant_swapped(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    base = train(micro(tmp_path / "base", corpus, tokenizers, arch="gpt2", steps=2))
    tuned = train(TrainConfig(init_from=str(base.out), attention="softmax1", data=corpus, seq_len=32, batch_size=4, steps=3,
                              warmup=0, eval_every=3, eval_samples=4, threads=1, out=tmp_path / "tuned", plots=False))
    assert tuned.steps == 3 and tuned.settings["source"] == str(base.out)
    loaded = load_model(LoadConfig(source=str(tuned.out)))
    assert loaded.attention is AttentionVariant.softmax1 and loaded.info.family.value == "gpt2"
    with pytest.raises(UsageError, match="cannot be combined with --from"):
        TrainConfig(init_from=str(base.out), size="micro")


def test_vit_on_mnist_idx_files_one_channel(tmp_path: Path) -> None:
    if not MNIST.is_dir():
        pytest.skip(f"MNIST idx files not found at {MNIST}")
    result = train(micro(tmp_path / "mnist", MNIST, None, arch="vit", channels=1, patch_size=7, steps=3, eval_every=3))
    cfg = result.model.config
    assert (cfg.num_channels, cfg.image_size, cfg.patch_size, cfg.num_labels) == (1, 28, 7, 10)
    assert result.tokens == 3 * 4 * (16 + 1)  # images x (patches + CLS)
    _assert_log(result.out, [3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "t5"}, "unknown --arch 't5'"),
        ({"size": "huge"}, "unknown --size 'huge'"),
        ({"hidden": 30, "heads": 4}, "not divisible by 4 heads"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"attention": "relu"}, "unknown --attention"),
        ({"time_budget": 0}, "--time-budget must be > 0"),
        ({"attention": "clipped", "gamma": 0.1}, "gamma <= 0"),
        ({"channels": 2}, "--channels must be 1 or 3"),
        ({"image_size": 30, "patch_size": 4}, "not divisible by --patch-size"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs)


def test_vit_needs_image_data(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--arch vit needs --data"):
        train(micro(tmp_path / "v", None, None, arch="vit"))


def test_steps_default_only_without_a_time_budget() -> None:
    assert TrainConfig().steps == 1000
    assert TrainConfig(time_budget=60).steps is None


def test_lr_schedule_warmup_and_decay() -> None:
    cfg = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 500, 0.5) == pytest.approx(0.55)
    assert lr_factor(cfg, 999, 1.0) == pytest.approx(0.1)
    linear = TrainConfig(warmup=0, schedule=Schedule.linear, min_lr_ratio=0.0)
    assert lr_factor(linear, 5, 0.25) == pytest.approx(0.75)
    assert lr_factor(TrainConfig(warmup=0, schedule="constant"), 5, 0.9) == 1.0


def test_bf16_autocast_on_cpu(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:
    result = train(micro(tmp_path / "bf16", corpus, tokenizers, attention="softmax1", precision="bf16", steps=4, eval_every=4))
    _assert_log(result.out, [4])
    assert next(result.model.parameters()).dtype == torch.float32  # autocast: float32 weights and optimizer state
