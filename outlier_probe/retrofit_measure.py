"""What `retrofit` measures on one model (the original, a twin's start, a twin after fine-tuning).

Every figure comes from the library code of the command that owns it: `stats` (its observers, site_results +
summarize), `quantize` (run_quantize, the paper's W8A8 recipe), `attention` (AttentionPass, as run_attention);
"kept" compares the model's last hidden states and mean-pooled sentence embeddings with the original's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from outlier_probe import arch
from outlier_probe.config import DataConfig, LoadConfig, SiteKind, StatsConfig
from outlier_probe.data import Batches
from outlier_probe.loading import LoadedModel
from outlier_probe.retrofit_objective import HeldOut

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


PROBE_KINDS = (SiteKind.ffn_output, SiteKind.attn_output, SiteKind.residual, SiteKind.block_output)  # curve groups


def probe(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The curves' point: avg kurtosis and max inf-norm over every default site (what the before / after tables
    report), and the max inf-norm of each site group, on one fixed batch. One forward, observers on, one sync."""
    from outlier_probe.stats.run import measure_sites
    from outlier_probe.stats.summary import summarize

    loaded.model.eval()
    rows = [r.row() for r in measure_sites(loaded, Batches([batch], "probe batch"), StatsConfig(load=LoadConfig(source=loaded.source)))]
    s = summarize(rows)
    out = {"avg_kurtosis": s["avg_kurtosis"], "max_inf_norm": s["max_inf_norm"]}
    for kind in PROBE_KINDS:
        group = [r for r in rows if r["kind"] == kind.value]
        out[f"max_inf_{kind.value}"] = max((r["paper_inf_norm"] for r in group), default=math.nan)
        out[f"avg_kurt_{kind.value}"] = sum(r["paper_kurtosis"] for r in group) / len(group) if group else math.nan
    return out


def _cosines(hidden: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(sum of per-token cosines, sum of sentence-embedding cosines) of one batch, on the device."""
    h = hidden.float()
    return torch.stack([F.cosine_similarity(h, ref[0], dim=-1).double().sum(), F.cosine_similarity(h.mean(1), ref[1], dim=-1).double().sum()])


@dataclass(frozen=True)
class HeldOutPass:
    rows: list[dict[str, Any]]  # stats rows of every default site
    attention: dict[str, Any]  # the `attention` summary
    hidden_cosine: float
    embedding_cosine: float
    objective_metric: float


def held_out_pass(loaded: LoadedModel, held: Batches, reference: list[tuple[torch.Tensor, torch.Tensor]], eval_cfg: DataConfig,
                  scorer: HeldOut, head: torch.nn.Module | None = None) -> HeldOutPass:
    """One forward per held-out batch feeds the `stats` observers, the `attention` observers, the fidelity to the
    original and (lm, distill) the objective's metric; the masked objectives (mlm, mlm-head) score a masked copy
    of the batches in a pass of their own. No host sync inside the loop."""
    from outlier_probe.diagnose.attention_run import AttentionConfig, AttentionPass
    from outlier_probe.stats.hooks import observe
    from outlier_probe.stats.observer import OutlierObserver
    from outlier_probe.stats.run import site_results

    model, dev = loaded.model, loaded.device
    model.eval()
    stats_cfg = StatsConfig(load=LoadConfig(source=loaded.source))
    sites = arch.find_sites(model, stats_cfg.sites)
    attention = AttentionPass(AttentionConfig(load=stats_cfg.load, data=eval_cfg), loaded)
    cos, losses, n_tok, n_emb = torch.zeros(2, dtype=torch.float64, device=dev), [], 0, 0
    with torch.inference_mode(), observe(sites, lambda _s: OutlierObserver(stats_cfg.observer)) as observers, attention.hooked():
        for i, (batch, ref) in enumerate(zip(held.batches, reference)):
            attention.before(batch)
            observers.batch_size = len(batch["input_ids"])
            out = model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
            hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
            cos += _cosines(hidden, ref)
            n_tok, n_emb = n_tok + hidden.shape[0] * hidden.shape[1], n_emb + hidden.shape[0]
            if not scorer.masked:
                losses.append(scorer.batch_loss(out, i))
            del out, hidden
    rows = [r.row() for r in site_results(sites, observers)]
    hidden_cos, emb_cos = (float(x) for x in cos.cpu())
    return HeldOutPass(rows, attention.result(held).summary(), hidden_cos / n_tok, emb_cos / n_emb,
                       scorer(model, head) if scorer.masked else scorer.finish(losses))


def measure(loaded: LoadedModel, held: Batches, reference: list[tuple[torch.Tensor, torch.Tensor]], eval_cfg: DataConfig,
            scorer: HeldOut, head: torch.nn.Module | None = None) -> Measurement:
    """Every figure of one model: the shared held-out pass, then W8A8 (`quantize`: calibration, float and quantized
    evaluations), which is necessarily separate."""
    from outlier_probe.quant.run import QuantizeConfig, run_quantize
    from outlier_probe.stats.summary import summarize

    p = held_out_pass(loaded, held, reference, eval_cfg, scorer, head)
    s = summarize(p.rows)
    blocks = summarize([r for r in p.rows if r["kind"] == SiteKind.block_output.value])
    worst = next(r for r in p.rows if r["site"] == s["max_inf_norm_site"])
    top = ";".join(str(worst["top_channels"]).split(";")[:TOP_CHANNELS])
    q = run_quantize(QuantizeConfig(load=LoadConfig(source=loaded.source), data=eval_cfg, site_stats=False), loaded=loaded).rows()[0]
    higher, att = bool(q["higher_is_better"]), p.attention
    return Measurement(
        avg_kurtosis=s["avg_kurtosis"], max_inf_norm=s["max_inf_norm"], max_inf_norm_site=s["max_inf_norm_site"] or "",
        top_channels=top, block_avg_kurtosis=blocks["avg_kurtosis"], block_max_inf_norm=blocks["max_inf_norm"],
        metric=q["metric"], float_score=q["float"], w8a8_score=q["quantized"],
        w8a8_loss=(q["float"] - q["quantized"]) if higher else (q["quantized"] - q["float"]),
        objective_metric=p.objective_metric, hidden_cosine=p.hidden_cosine, embedding_cosine=p.embedding_cosine,
        sink_rate=_f(att["sink_rate"]), first_token_mass=_f(att["first_token_mass"]), null_mass=_f(att["null_mass"]),
        massive_ratio=_f(att["massive_ratio"]),
    )


def _f(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan
