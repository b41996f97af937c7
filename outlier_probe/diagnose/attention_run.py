"""`attention`: per-head sink statistics and per-layer massive activations in one streamed pass.

load -> data -> capture attention probabilities through the attention interface + hook block outputs
(massive activations and `stats`' outlier observer for the top channels) -> plain results.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from outlier_probe import arch
from outlier_probe.attention_capture import capture_attention
from outlier_probe.config import DataConfig, LoadConfig, ObserverConfig
from outlier_probe.data import batches_for_model
from outlier_probe.diagnose.attention_stats import SINK_THRESHOLD, AttentionObserver, BatchContext, HeadStats
from outlier_probe.diagnose.massive import MIN_ABS, MIN_RATIO, MassiveObserver, MassiveStats, is_massive
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver
from outlier_probe.stats.run import forward, settings_of

Progress = Callable[[int, int], None]
DELIMITERS = (".", ",")


@dataclass(frozen=True)
class AttentionConfig:
    load: LoadConfig
    data: DataConfig = field(default_factory=DataConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)  # top_k: stats' outlier channels
    min_abs: float = MIN_ABS
    min_ratio: float = MIN_RATIO

    def __post_init__(self) -> None:
        if self.min_abs <= 0 or self.min_ratio <= 0:
            raise UsageError("--massive-abs and --massive-ratio must be > 0")


@dataclass(frozen=True)
class LayerFinding:
    massive: MassiveStats
    token: str  # text of the token carrying the top |x|
    category: str  # first / special / delimiter / other
    is_massive: bool
    sink_token: str  # token the layer's heads give the most mass per occurrence
    sink_token_mass: float  # that mass per occurrence and query (mean over heads)
    on_sink: bool  # the massive token is a token later heads sink onto
    top_channels: tuple[int, ...]  # stats' top outlier channels of this block output
    in_top_channels: bool


@dataclass
class AttentionResult:
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    variant: str
    heads: list[HeadStats]
    layers: list[LayerFinding]

    def summary(self) -> dict[str, Any]:
        """The figures `compare` and `gate` read: mean sink rate, null mass, largest massive ratio."""
        def mean(xs: list[float]) -> float:
            xs = [x for x in xs if not math.isnan(x)]
            return sum(xs) / len(xs) if xs else math.nan

        top = max(self.layers, key=lambda f: f.massive.ratio, default=None)
        massive = [f for f in self.layers if f.is_massive]
        return {
            "variant": self.variant,
            "sink_rate": mean([h.sink for h in self.heads]),
            "max_head_sink_rate": max((h.sink for h in self.heads), default=math.nan),
            # Gu et al. 2024's head-level form: fraction of heads whose mean first-token mass > 0.3
            "sink_heads": mean([float(h.first > SINK_THRESHOLD) for h in self.heads]),
            "first_token_mass": mean([h.first for h in self.heads]),
            "null_mass": mean([h.null for h in self.heads]),
            "gate_closed": mean([h.gate_closed for h in self.heads]),
            "entropy": mean([h.entropy for h in self.heads]),
            "massive_ratio": top.massive.ratio if top else math.nan,
            "massive_abs": top.massive.top_abs if top else math.nan,
            "massive_layer": top.massive.layer if top else None,
            "massive_token": top.token if top else None,
            "massive_channel": top.massive.channel if top else None,
            "massive_on_sink": top.on_sink if top else None,  # for the largest ratio, massive or not
            "massive_in_top_channels": top.in_top_channels if top else None,
            "massive_layers": len(massive),
            "massive_layers_on_sink": sum(f.on_sink for f in massive),
            "massive_layers_in_top_channels": sum(f.in_top_channels for f in massive),
        }


def token_classes(tokenizer: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(special, delimiter) bool masks over token ids, as the tokenizer tells: its special ids, and every
    vocabulary entry that decodes to '.', ',' or only whitespace with a newline."""
    special = torch.zeros(vocab, dtype=torch.bool)
    delimiter = torch.zeros(vocab, dtype=torch.bool)
    if tokenizer is None:
        return special, delimiter
    ids = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab]
    special[ids] = True
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
    for i, text in enumerate(texts):
        stripped = text.strip()
        if stripped in DELIMITERS or ("\n" in text and not stripped):
            delimiter[i] = not special[i]
    return special, delimiter


class AttentionPass:
    """The observers of one `attention` pass, fed by forwards the caller runs: `run_attention` below, or retrofit's
    single measurement pass (stats + attention + fidelity on the same forwards). Use: `with p.hooked(): p.before(batch);
    forward(...)`, then `p.result(batches)`."""

    def __init__(self, cfg: AttentionConfig, loaded: LoadedModel) -> None:
        info = loaded.info
        if info.family is arch.Family.generic:
            raise UsageError(f"`attention` needs a known family (bert, distilbert, gpt2, opt, llama, vit) to find the "
                             f"attention modules; model type {info.model_type!r} is not one")
        self.cfg, self.loaded = cfg, loaded
        self.modules = arch.attention_modules(loaded.model)
        self.sites = arch.residual_stream_sites(loaded.model)
        self.text = not info.is_vision
        vocab = (info.vocab_size or len(loaded.processor)) if self.text else 1
        self.special_ids, self.delimiter_ids = token_classes(loaded.processor if self.text else None, vocab)
        self.heads_obs = AttentionObserver(len(self.modules), vocab)
        self.massive = {s.name: MassiveObserver(s.layer) for s in self.sites}
        self.ctx: dict[str, torch.Tensor] = {}
        self.observers: Any = None
        self.variant: Any = None

    @contextmanager
    def hooked(self) -> Iterator["AttentionPass"]:
        cfg, massive, ctx = self.cfg, self.massive, self.ctx

        class _Both:  # stats' observer (top channels, exactly as `stats`) and the massive-activation tracker
            def __init__(self, site: arch.Site) -> None:
                self.stats, self.massive = OutlierObserver(cfg.observer), massive[site.name]

            def update(self, x: torch.Tensor) -> None:
                self.stats.update(x)
                self.massive.update(x, ctx["ids"])

        with observe(self.sites, _Both) as observers, \
                capture_attention(self.loaded.model, self.modules, self.heads_obs.update, self.heads_obs.update_gate) as variant:
            self.observers, self.variant = observers, variant
            yield self

    def before(self, batch: dict[str, torch.Tensor]) -> None:
        """Set the context of the next forward: token ids and classes, validity, batch size."""
        model, device = self.loaded.model, self.loaded.device
        b = len(next(iter(batch.values())))
        if self.text:
            ids = batch["input_ids"].to(device)
            valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device).bool()
        else:
            t = (model.config.image_size // model.config.patch_size) ** 2 + 1  # patches + [CLS]
            ids = torch.zeros(b, t, dtype=torch.long, device=device)
            valid = torch.ones(b, t, dtype=torch.bool, device=device)
        sp, dl = self.special_ids.to(device)[ids], self.delimiter_ids.to(device)[ids]
        if not self.text:
            sp[:, 0] = True  # ViT's [CLS]
        self.ctx["ids"] = ids
        self.heads_obs.context = BatchContext(ids, sp, dl, valid)
        self.observers.batch_size = b

    def result(self, batches: Any) -> AttentionResult:
        heads = self.heads_obs.result()
        if not heads:
            raise ProbeError("no attention probabilities were captured; this model's attention does not go through "
                             "transformers' AttentionInterface")
        if any(math.isnan(h.first) or math.isnan(h.entropy) for h in heads):
            raise ProbeError("non-finite attention probabilities (NaN); check the checkpoint or use --dtype float32")
        layers = _findings(self.cfg, self.loaded, self.heads_obs, heads, self.massive, self.observers, self.sites,
                           self.special_ids, self.delimiter_ids, batches.num_sequences)
        return AttentionResult(self.loaded.describe(), batches.describe(), settings_of(self.cfg), self.variant.value, heads, layers)


def run_attention(cfg: AttentionConfig, progress: Progress | None = None, loaded: LoadedModel | None = None) -> AttentionResult:
    loaded = loaded or load_model(cfg.load)
    passing = AttentionPass(cfg, loaded)
    model, info = loaded.model, loaded.info
    torch.manual_seed(cfg.data.seed)
    batches = batches_for_model(loaded.processor, info, cfg.data, getattr(model.config, "image_size", None))
    total = len(batches.batches)
    with torch.inference_mode(), passing.hooked():
        for i, batch in enumerate(batches.batches):
            passing.before(batch)
            forward(model, batch, loaded.device)
            if progress is not None:
                progress(i + 1, total)
    return passing.result(batches)


def _findings(cfg: AttentionConfig, loaded: LoadedModel, heads_obs: AttentionObserver, heads: list[HeadStats],
              massive: dict[str, MassiveObserver], observers: Any, sites: list[arch.Site],
              special_ids: torch.Tensor, delimiter_ids: torch.Tensor, sequences: int) -> list[LayerFinding]:
    tok = loaded.processor if not loaded.info.is_vision else None

    def text_of(token_id: int, position: int) -> str:
        if tok is None:
            return "[CLS]" if position == 0 else f"patch {position - 1}"
        return str(tok.convert_ids_to_tokens(token_id))

    sinks = heads_obs.sink_tokens(min_occurrences=max(2, min(5, sequences)))
    first_mass = {}
    for h in heads:
        first_mass.setdefault(h.layer, []).append(h.first)
    first_sink = {layer: sum(v) / len(v) > SINK_THRESHOLD for layer, v in first_mass.items()}
    out = []
    for site in sites:
        stats = massive[site.name].result()
        if stats is None:
            continue
        layer = stats.layer
        later = [i for i in range(layer + 1, len(sinks))] or [layer]  # heads after the layer read its output
        on_sink = any(sinks[i][0] == stats.token_id for i in later) or (stats.position == 0 and any(first_sink.get(i) for i in later))
        category = ("first" if stats.position == 0 else "special" if special_ids[stats.token_id] else
                    "delimiter" if delimiter_ids[stats.token_id] else "other") if tok is not None or stats.position == 0 else "other"
        top = tuple(c for c, _ in observers[site.name].stats.result().top_channels)
        sink_id, sink_mass = sinks[layer] if layer < len(sinks) else (0, math.nan)
        out.append(LayerFinding(stats, text_of(stats.token_id, stats.position), category,
                                is_massive(stats, cfg.min_abs, cfg.min_ratio), text_of(sink_id, 1 if tok is None else -1),
                                sink_mass, on_sink, top, stats.channel in top))
    return out
