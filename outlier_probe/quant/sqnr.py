"""Signal-to-quantization-noise ratio of every activation quantizer during evaluation, and the per-site
rows of `quantize` (SQNR next to the float statistics of the same activation)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from outlier_probe import arch, distributed
from outlier_probe.config import ObserverConfig, SiteKind, StatsConfig
from outlier_probe.data import Batches
from outlier_probe.loading import LoadedModel
from outlier_probe.quant.modules import ActQuantizer
from outlier_probe.quant.recipes import QuantSite
from outlier_probe.stats.run import measure_sites

if TYPE_CHECKING:
    from outlier_probe.quant.run import QuantizeConfig


class SQNRMeter:
    """Signal-to-quantization-noise ratio of each activation quantizer during evaluation (no host sync)."""

    def __init__(self, sites: list[QuantSite]) -> None:
        self.sites = sites
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> SQNRMeter:
        for site in self.sites:
            self.handles.append(site.quantizer.register_forward_hook(self._hook(site.name)))
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: ActQuantizer, args: tuple, out: torch.Tensor) -> None:
            # One fused norm pass in float32 per tensor (decibels need ~5 digits), float64 across batches:
            # float64 copies of every activation cost more than the quantized forward itself on a CPU.
            x = args[0].float()
            s = torch.linalg.vector_norm(x).double().square()
            n = torch.linalg.vector_norm(x - out.float()).double().square()
            self.signal[name] = self.signal[name] + s if name in self.signal else s
            self.noise[name] = self.noise[name] + n if name in self.noise else n

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def merge(self) -> None:
        """Sum signal and noise power over the ranks of a data-parallel run (a no-op otherwise)."""
        if not distributed.is_active():
            return
        names = [s.name for s in self.sites]
        zero = torch.zeros((), dtype=torch.float64)
        signal = distributed.all_sum([float(self.signal.get(n, zero)) for n in names])
        noise = distributed.all_sum([float(self.noise.get(n, zero)) for n in names])
        seen = distributed.all_sum([float(n in self.signal) for n in names])
        for n, s, e, k in zip(names, signal, noise, seen):
            if k:
                self.signal[n], self.noise[n] = torch.tensor(s, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)

    def sqnr_db(self, name: str) -> float:
        if name not in self.signal:
            return math.nan
        s, n = float(self.signal[name]), float(self.noise[name])
        return math.inf if n == 0 else 10.0 * math.log10(max(s, 1e-300) / n)


def stats_sites(model: nn.Module, qsites: list[QuantSite]) -> list[arch.Site]:
    """Float-model sites matching the quantizers that have a stats counterpart."""
    out, seen = [], set()
    for q in qsites:
        if not q.stats_site or q.stats_site in seen:
            continue
        seen.add(q.stats_site)
        capture = "input" if q.stats_site.endswith(":input") else "output"
        module_name = q.stats_site.removesuffix(":input")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        # the kind is not read downstream: these sites are looked up by name for the SQNR table
        out.append(arch.Site(q.stats_site, SiteKind.linear_output, q.layer, module, capture, module_name))
    return out


def sqnr_site_rows(cfg: QuantizeConfig, loaded: LoadedModel, batches: Batches, qsites: list[QuantSite],
                   meter: SQNRMeter, site_stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per quantized site, lowest SQNR first, next to the float statistics of its activation.

    `site_stats` (site name -> observer result) is completed in place with the sites it lacks.
    """
    missing = [s for s in stats_sites(loaded.model, qsites) if s.name not in site_stats]
    if cfg.site_stats and missing:
        found = measure_sites(loaded, batches, StatsConfig(load=cfg.load, observer=ObserverConfig()), sites=missing)
        site_stats.update({r.site.name: r.stats for r in found})
    rows = []
    for q in qsites:
        st = site_stats.get(q.stats_site or "")
        rows.append({
            "site": q.name, "kind": q.kind, "layer": q.layer, "sqnr_db": meter.sqnr_db(q.name),
            "paper_kurtosis": st.paper_kurtosis if st else math.nan,
            "paper_inf_norm": st.paper_inf_norm if st else math.nan,
            "range_min": float(q.quantizer.min_val), "range_max": float(q.quantizer.max_val),
        })
    rows.sort(key=lambda r: (math.inf if math.isnan(r["sqnr_db"]) else r["sqnr_db"]))
    return rows
