"""`reproduce`: train vanilla / softmax_1 / clipped / gated twins per family, compare them, write a report.

Scales:
- `smoke`     seconds; for tests of the pipeline itself (numbers mean nothing).
- `cpu-small` under an hour on 2 CPU cores: small OPT-style causal LM and BERT-style MLM on text,
              a tiny ViT on (Fashion-)MNIST; as many tokens as the budget allows.
- `gpu`       about ten minutes of one modern GPU: 6-layer d=512 models, bf16, fused attention, on a
              corpus of 10^8+ tokens (the Python installation's own source code plus prose).
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig, Placement
from outlier_probe.errors import UsageError
from outlier_probe.models import Arch
from outlier_probe.report.io import ensure_writable_dir, no_empty_folders_on_error, write_text
from outlier_probe.report.meta import versions

VARIANTS = (AttentionVariant.softmax, AttentionVariant.softmax1, AttentionVariant.clipped, AttentionVariant.gated)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class FamilyPlan:
    arch: Arch
    size: str
    time_budget: float  # seconds of training per model
    steps: int | None
    seq_len: int
    batch_size: int
    eval_samples: int  # sequences / images for the compare pass
    eval_every: int
    # clipped twin: gamma = -alpha / T. None keeps --gamma's default (-0.025, alpha = 3.2 at T = 128);
    # ViT's 50 tokens need alpha < 1, or the near-uniform attention of a fresh model is clipped to
    # zero everywhere and the CLS token never sees the image (what the first cpu-small run showed)
    clip_alpha: float | None = None


@dataclass(frozen=True)
class Scale:
    name: str
    families: tuple[FamilyPlan, ...]
    vocab_size: int
    device: str
    text: str  # "prose" (built-in text) or "code+prose"
    variants: tuple[AttentionVariant, ...] = VARIANTS  # default twins (softmax first: the baseline)
    max_chars: int | None = None  # cap on the text read (tokenizer fitting and tokenizing stay quick)


SCALES: dict[str, Scale] = {
    "smoke": Scale("smoke", (
        FamilyPlan(Arch.opt, "micro", 1e9, 6, 32, 4, 8, 3),
        FamilyPlan(Arch.bert, "micro", 1e9, 6, 32, 4, 8, 3),
    ), vocab_size=300, device="cpu", text="prose"),
    # Twins train for the same number of steps (same data order, same schedule); the time budget is
    # only a safety cap (twice the expected time on 2 cores at ~3,500 tokens/s), reported if hit.
    "cpu-small": Scale("cpu-small", (
        FamilyPlan(Arch.opt, "small", 900, 600, 128, 16, 32, 100),
        FamilyPlan(Arch.bert, "small", 500, 300, 128, 16, 32, 100),
        FamilyPlan(Arch.vit, "tiny", 240, 300, 0, 64, 512, 100, clip_alpha=0.5),
    ), vocab_size=4096, device="cpu", text="prose"),
    # One ten-minute GPU run: outliers need ~10^8 tokens (H200 sizing: ~850k tokens/s per 6x512 model
    # in bf16), so only the decisive pair is trained by default: vanilla and softmax_1, 131M tokens each.
    "gpu": Scale("gpu", (
        FamilyPlan(Arch.opt, "medium", 240, 4000, 256, 128, 64, 500),
        FamilyPlan(Arch.bert, "medium", 90, 1500, 256, 128, 64, 500),
        FamilyPlan(Arch.vit, "tiny", 30, 1000, 0, 256, 1024, 200, clip_alpha=0.5),
    ), vocab_size=8192, device="auto", text="code+prose",
        variants=(AttentionVariant.softmax, AttentionVariant.softmax1), max_chars=100_000_000),
}


@dataclass(frozen=True)
class ReproduceConfig:
    scale: str = "cpu-small"
    out: Path = Path("reports/reproduction-cpu-small")
    data: Path | None = None  # text corpus; default by scale (built-in prose, or stdlib source + prose)
    image_data: Path | None = None  # (Fashion-)MNIST idx folder; default: Debian's fashion-mnist, else none
    families: tuple[Arch, ...] | None = None  # subset of the scale's families
    variants: tuple[AttentionVariant, ...] | None = None  # None: the scale's default twins
    seed: int = 0
    time_scale: float = 1.0  # multiply every training budget (e.g. 0.5 for a quicker, weaker run)
    work: Path | None = None  # where checkpoints go; default runs/<out folder name>/
    placement: Placement = field(default_factory=Placement)  # how the trained twins are loaded to be compared

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise UsageError(f"unknown --scale {self.scale!r}; choose from {', '.join(SCALES)}")
        if self.variants is not None and AttentionVariant.softmax not in self.variants:
            raise UsageError("the reproduction needs the vanilla softmax model as the baseline")
        if self.time_scale <= 0:
            raise UsageError("--time-scale must be > 0")


def _text_source(cfg: ReproduceConfig, scale: Scale, work: Path) -> tuple[Path | None, str, str]:
    """(data path for train/compare, include glob, description)."""
    if cfg.data is not None:
        return cfg.data, "*", f"{cfg.data}"
    if scale.text == "prose":
        return None, "*.txt", "built-in prose (Python language reference, pydoc_data.topics)"
    # code + prose: the Python installation's stdlib sources next to the built-in prose, in one folder
    from outlier_probe.data import builtin_text

    corpus = ensure_writable_dir(work / "corpus")
    text, _ = builtin_text()
    (corpus / "prose.txt").write_text(text, encoding="utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    link = corpus / "stdlib"
    if not link.exists():
        link.symlink_to(stdlib, target_is_directory=True)
    return corpus, "*.py,*.txt", f"Python stdlib source ({stdlib}, *.py) + built-in prose"


def _image_source(cfg: ReproduceConfig) -> Path | None:
    if cfg.image_data is not None:
        return cfg.image_data
    return FASHION_MNIST if FASHION_MNIST.exists() else None


def run_reproduction(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every (family, variant), compare per family, write README.md + reports under cfg.out."""
    scale = SCALES[cfg.scale]
    work = cfg.work or Path("runs") / Path(cfg.out).name  # checkpoints stay out of the committed report
    with no_empty_folders_on_error(cfg.out, work):  # finished twins are kept (resume); empty folders are not
        return _reproduce(cfg, scale, ensure_writable_dir(cfg.out), ensure_writable_dir(work), log)


def _reproduce(cfg: ReproduceConfig, scale: Any, out: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from outlier_probe.compare import CompareConfig, CompareEntry, run_compare
    from outlier_probe.report import plots
    from outlier_probe.report.compare_report import compare_markdown, compare_document, write_compare_report
    from outlier_probe.train import TrainConfig, train

    text_path, include, text_desc = _text_source(cfg, scale, work)
    image_path = _image_source(cfg)
    sections: list[str] = []
    all_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for plan in scale.families:
        if cfg.families and plan.arch not in cfg.families:
            continue
        if plan.arch is Arch.vit and image_path is None:
            sections.append(f"## {plan.arch.value}\n\nSkipped: no image data (install Debian's `dataset-fashion-mnist` or pass --image-data).\n")
            continue
        data_path = image_path if plan.arch is Arch.vit else text_path
        tokenizer_dir = _shared_tokenizer(plan, data_path, include, scale, work)
        entries = []
        train_rows: list[dict[str, Any]] = []
        for variant in cfg.variants or scale.variants:
            run = f"{plan.arch.value}-{variant.value}"
            log(f"training {run} ({plan.size}, {plan.steps} steps, cap {plan.time_budget * cfg.time_scale:.0f} s)")
            result = train(TrainConfig(
                arch=plan.arch, size=plan.size, attention=variant,
                alpha=plan.clip_alpha if variant is AttentionVariant.clipped else None, data=data_path, include=include, tokenizer=tokenizer_dir,
                max_chars=scale.max_chars if plan.arch is not Arch.vit else None,
                vocab_size=scale.vocab_size, seq_len=plan.seq_len or 128, batch_size=plan.batch_size,
                steps=plan.steps, time_budget=plan.time_budget * cfg.time_scale, eval_every=plan.eval_every,
                seed=cfg.seed, device=_device(scale), out=work / run, run_name=run, plots=False,
                # a finished or interrupted twin in `work` is resumed (step-based, so deterministic), not retrained
                resume=(work / run / "training_state.pt").is_file(), overwrite=True,
            ))
            train_rows += list(result.rows)
            entries.append(CompareEntry(variant.value, cfg.placement.apply(LoadConfig(source=str(result.out)))))
            summary.setdefault(plan.arch.value, {})[variant.value] = {
                "steps": result.steps, "tokens": result.tokens,
                "tokens_per_s": _logged_speed(result.rows),
                "final_eval_loss": result.final_eval_loss, "stopped_by": result.stopped_by,
            }
        family_out = ensure_writable_dir(out / plan.arch.value)
        data_cfg = DataConfig(path=data_path, include=include, samples=plan.eval_samples,
                              seq_len=plan.seq_len or 128, batch_size=min(plan.batch_size, 16), seed=cfg.seed)
        log(f"comparing {plan.arch.value} variants")
        compared = run_compare(CompareConfig(entries=tuple(entries), data=data_cfg))
        write_compare_report(compared, family_out)
        plots.training_curves(train_rows, family_out / "training.png", title=f"{plan.arch.value}: outliers during training")
        all_rows += train_rows
        doc = compare_document(compared)
        sections.append(_family_section(plan, compared, compare_markdown(compared, doc), summary[plan.arch.value]))
    readme = _readme(cfg, scale, text_desc, image_path, sections)
    write_text(out / "README.md", readme)
    return summary


def _shared_tokenizer(plan: FamilyPlan, data_path: Path | None, include: str, scale: Scale, work: Path) -> str | None:
    """One BPE tokenizer per text family, fitted once and shared by every twin."""
    if plan.arch is Arch.vit:
        return None
    from outlier_probe.train import TrainConfig, build_tokenizer

    folder = work / f"tokenizer-{plan.arch.value}"
    build_tokenizer(TrainConfig(arch=plan.arch, data=data_path, include=include, vocab_size=scale.vocab_size,
                                max_chars=scale.max_chars)).save_pretrained(str(folder))
    return str(folder)


def _logged_speed(rows: tuple[dict[str, Any], ...]) -> float:
    """Training tokens/s of a run that was already finished: total tokens over total training seconds logged."""
    if not rows:
        return math.nan
    last = rows[-1]
    return float(last["tokens"]) / float(last["elapsed_s"]) if float(last["elapsed_s"]) > 0 else math.nan


def _device(scale: Scale) -> Any:
    from outlier_probe.config import Device

    return Device(scale.device)


def _family_section(plan: FamilyPlan, compared: Any, table_md: str, trained: dict[str, Any]) -> str:
    rows = compared.rows()
    table_md = table_md.replace("# outlier-probe compare:", "### compare:", 1)
    lines = [f"## {plan.arch.value} ({plan.size})", "", table_md, "",
             "| variant | steps | training tokens | tokens/s (wall, incl. evals) | final eval loss | stopped by |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, t in trained.items():
        lines.append(f"| {name} | {t['steps']} | {t['tokens']:,} | {t['tokens_per_s']:,.0f} | {t['final_eval_loss']:.3f} | {t['stopped_by']} |")
    lines += ["", f"![layers]({plan.arch.value}/layers.png)", f"![training]({plan.arch.value}/training.png)", ""]
    base = rows[0]
    lines.append("Measured against the vanilla (softmax) baseline:")
    lines.append("")
    for r in rows[1:]:
        parts = []
        for key, label in (("avg_kurtosis", "average kurtosis"), ("max_inf_norm_block_output", "max inf-norm (block outputs)")):
            rel = r.get(f"{key}_vs_baseline", math.nan)
            parts.append(f"{label} {r[key]:.2f} vs {base[key]:.2f} ({100 * rel:+.1f}%)" if math.isfinite(rel) else f"{label} n/a")
        deg, bdeg = r.get("degradation", math.nan), base.get("degradation", math.nan)
        if math.isfinite(deg) and math.isfinite(bdeg):
            parts.append(f"W8A8 degradation {deg:+.3f} vs {bdeg:+.3f} {r.get('metric')}")
        lines.append(f"- **{r['name']}**: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def _readme(cfg: ReproduceConfig, scale: Scale, text_desc: str, image_path: Path | None, sections: list[str]) -> str:
    v = versions()
    cmd = f"outlier-probe reproduce --scale {cfg.scale} --out {cfg.out}"
    if cfg.time_scale != 1.0:
        cmd += f" --time-scale {cfg.time_scale}"
    head = [
        f"# Reproduction: vanilla vs OutEffHop (softmax_1), clipped softmax and gated attention, scale `{cfg.scale}`",
        "",
        "Regenerate with:",
        "",
        f"    {cmd}",
        "",
        f"Text corpus: {text_desc}. Images: {image_path or 'none'}. Seed {cfg.seed}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Every number below was measured in the run that wrote this file; kurtosis and inf-norm use the",
        "papers' definitions (see the project README). Evaluation sequences are drawn from the training",
        "corpus with the compare seed (in-distribution), calibration sequences follow them.",
        "",
    ]
    return "\n".join(head + sections)
