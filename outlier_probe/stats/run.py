"""`stats`: load -> data -> observers on hooked sites -> per-site results and a model summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from outlier_probe import arch, distributed, distributed_merge
from outlier_probe.config import StatsConfig
from outlier_probe.data import Batches, batches_for_model
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.stats.heap import release_free_memory
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver, SiteStats
from outlier_probe.stats.summary import summarize

Progress = Callable[[int, int], None]  # (batches done, batches total)


@dataclass
class SiteResult:
    site: arch.Site
    stats: SiteStats

    def row(self) -> dict[str, Any]:
        return {"site": self.site.name, "kind": self.site.kind.value, "layer": self.site.layer, **self.stats.to_row()}


@dataclass
class StatsResult:
    model: dict[str, Any]
    data: dict[str, Any]
    sites: list[SiteResult]
    summary: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.sites]


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> Any:
    """One forward pass on a batch (labels are not passed: loss is computed by the evaluators)."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    return model(**inputs)


def measure_sites(loaded: LoadedModel, batches: Batches, cfg: StatsConfig, progress: Progress | None = None,
                  sites: list[arch.Site] | None = None) -> list[SiteResult]:
    """Hook the selected sites (or the `sites` given), run every batch once, return per-site statistics."""
    sites = arch.find_sites(loaded.model, cfg.sites) if sites is None else sites
    if not sites:
        kinds = ", ".join(k.value for k in cfg.sites.kinds)
        raise UsageError(f"no {loaded.info.family.value} sites match --sites {kinds} with the include/exclude patterns given")
    device = loaded.device
    mine = distributed.shard(batches.batches)  # all of them outside a data-parallel run
    total = len(mine)
    with torch.inference_mode(), observe(sites, lambda _s: OutlierObserver(cfg.observer)) as observers:
        for i, batch in enumerate(mine):
            observers.batch_size = len(next(iter(batch.values())))
            forward(loaded.model, batch, device)
            release_free_memory()  # peak memory flat in the number of batches (stats/heap.py)
            if progress is not None:
                progress(i + 1, total)
    distributed_merge.merge_observers(observers)  # every rank now holds the statistics of all the data
    return site_results(sites, observers)


def site_results(sites: list[arch.Site], observers: Any) -> list[SiteResult]:
    """Per-site results of observers fed by a pass (the sites that saw activations); errors on none or non-finite."""
    results = [SiteResult(site, observers[site.name].result()) for site in sites]
    seen = [r for r in results if r.stats.count > 0]
    if not seen:
        raise ProbeError("no hooked site saw any activation; the model's forward skipped every hooked module")
    bad = [r for r in seen if r.stats.n_nonfinite]
    if bad:
        first = bad[0]
        raise ProbeError(
            f"non-finite activations (NaN/Inf) at {len(bad)} sites, first {first.site.name} "
            f"({first.stats.n_nonfinite} values); check the checkpoint or use --dtype float32"
        )
    return seen


def run_stats(cfg: StatsConfig, progress: Progress | None = None, loaded: LoadedModel | None = None) -> StatsResult:
    """The whole `stats` job; the CLI renders and writes what this returns."""
    loaded = loaded or load_model(cfg.load)
    if loaded.info.family is arch.Family.stanhop:
        from outlier_probe.forecast.run import run_forecast_stats

        return run_forecast_stats(cfg, None, progress)  # every test window of the --data CSV
    torch.manual_seed(cfg.data.seed)
    batches = batches_for_model(loaded.processor, loaded.info, cfg.data, _image_size(loaded))
    results = measure_sites(loaded, batches, cfg, progress)
    return StatsResult(
        model=loaded.describe(),
        data=batches.describe(),
        sites=results,
        summary=summarize([r.row() for r in results]),
        settings=settings_of(cfg),
    )


def _image_size(loaded: LoadedModel) -> int | None:
    return getattr(loaded.model.config, "image_size", None)


def settings_of(cfg: Any) -> dict[str, Any]:
    """Resolved settings of a frozen config dataclass as plain JSON values."""
    import dataclasses
    import enum
    from pathlib import Path

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)
