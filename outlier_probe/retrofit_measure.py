"""What `retrofit` measures on one model (the original, a twin's start, a twin after fine-tuning).

Every figure comes from the library function of the command that owns it: `stats` (measure_sites +
summarize), `quantize` (run_quantize, the paper's W8A8 recipe), `attention` (run_attention's summary);
"kept" compares the model's last hidden states and mean-pooled sentence embeddings with the original's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from outlier_probe import arch
from outlier_probe.config import DataConfig, LoadConfig, SiteKind, SiteSelection, StatsConfig
from outlier_probe.data import Batches
from outlier_probe.loading import LoadedModel

TOP_CHANNELS = 3  # outlier channels reported for the site with the largest inf-norm


@dataclass(frozen=True)
class Measurement:
    avg_kurtosis: float  # stats: mean paper kurtosis over every default site
    max_inf_norm: float  # stats: max paper inf-norm over every default site
    max_inf_norm_site: str
    top_channels: str  # "channel:absmax;..." at that site
    block_avg_kurtosis: float  # the same two over the block outputs only (what the training curves probe)
    block_max_inf_norm: float
    metric: str  # quantize's metric (perplexity, mlm_perplexity, hidden_cosine)
    float_score: float
    w8a8_score: float
    w8a8_loss: float  # quantized - float (perplexity), float - quantized (hidden cosine, = 1 - cosine)
    objective_metric: float  # held-out perplexity (lm, mlm) or distillation loss (distill)
    hidden_cosine: float  # mean per-token cosine of the last hidden state to the original's
    embedding_cosine: float  # mean cosine of the mean-pooled sentence embedding to the original's
    sink_rate: float  # attention: mean sink rate over heads
    first_token_mass: float
    null_mass: float  # softmax1's unused mass (0 for the others)
    massive_ratio: float  # largest massive activation / median, over layers

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _block_sites(model: torch.nn.Module) -> list[arch.Site]:
    return arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))


def probe(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average kurtosis and max inf-norm over the block outputs on one fixed batch (as train's outlier probe)."""
    from outlier_probe.stats.run import measure_sites
    from outlier_probe.stats.summary import summarize

    loaded.model.eval()
    results = measure_sites(loaded, Batches([batch], "probe batch"), StatsConfig(load=LoadConfig(source=loaded.source)),
                            sites=_block_sites(loaded.model))
    s = summarize([r.row() for r in results])
    return {"avg_kurtosis": s["avg_kurtosis"], "max_inf_norm": s["max_inf_norm"]}


@torch.no_grad()
def kept(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], reference: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(mean per-token cosine of the last hidden state, mean sentence-embedding cosine) to the reference's."""
    from outlier_probe.retrofit_objective import teacher_targets

    dev = next(model.parameters()).device
    model.eval()
    tok, emb, n_tok, n_emb = 0.0, 0.0, 0, 0
    for batch, (rh, rp) in zip(batches, reference):
        h, p = teacher_targets(model, batch["input_ids"].to(dev))
        tok += float(F.cosine_similarity(h, rh, dim=-1).double().sum())
        emb += float(F.cosine_similarity(p, rp, dim=-1).double().sum())
        n_tok, n_emb = n_tok + h.shape[0] * h.shape[1], n_emb + h.shape[0]
    return tok / n_tok, emb / n_emb


def measure(loaded: LoadedModel, held: Batches, reference: list[tuple[torch.Tensor, torch.Tensor]], eval_cfg: DataConfig,
            evaluate: Callable[[torch.nn.Module], float]) -> Measurement:
    from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention
    from outlier_probe.quant.run import QuantizeConfig, run_quantize
    from outlier_probe.stats.run import measure_sites
    from outlier_probe.stats.summary import summarize

    load = LoadConfig(source=loaded.source)
    loaded.model.eval()
    rows = [r.row() for r in measure_sites(loaded, held, StatsConfig(load=load))]
    s = summarize(rows)
    blocks = summarize([r for r in rows if r["kind"] == SiteKind.block_output.value])
    worst = next(r for r in rows if r["site"] == s["max_inf_norm_site"])
    top = ";".join(str(worst["top_channels"]).split(";")[:TOP_CHANNELS])
    q = run_quantize(QuantizeConfig(load=load, data=eval_cfg, site_stats=False), loaded=loaded).rows()[0]
    higher = bool(q["higher_is_better"])
    att = run_attention(AttentionConfig(load=load, data=eval_cfg), loaded=loaded).summary()
    hidden_cos, emb_cos = kept(loaded.model, held.batches, reference)
    return Measurement(
        avg_kurtosis=s["avg_kurtosis"], max_inf_norm=s["max_inf_norm"], max_inf_norm_site=s["max_inf_norm_site"] or "",
        top_channels=top, block_avg_kurtosis=blocks["avg_kurtosis"], block_max_inf_norm=blocks["max_inf_norm"],
        metric=q["metric"], float_score=q["float"], w8a8_score=q["quantized"],
        w8a8_loss=(q["float"] - q["quantized"]) if higher else (q["quantized"] - q["float"]),
        objective_metric=evaluate(loaded.model), hidden_cosine=hidden_cos, embedding_cosine=emb_cos,
        sink_rate=_f(att["sink_rate"]), first_token_mass=_f(att["first_token_mass"]), null_mass=_f(att["null_mass"]),
        massive_ratio=_f(att["massive_ratio"]),
    )


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan
