"""Signal-to-quantization-noise ratio of every activation quantizer during evaluation, and the per-site
rows of `quantize` (SQNR next to the float statistics of the same activation)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outlier_probe import arch, distributed
from outlier_probe.config import ObserverConfig, SiteKind, StatsConfig
from outlier_probe.data import Batches
from outlier_probe.loading import LoadedModel
from outlier_probe.quant.recipes import QuantSite
from outlier_probe.stats.run import measure_sites

if TYPE_CHECKING:
    from outlier_probe.quant.run import QuantizeConfig


class SQNRMeter:
    """Signal-to-quantization-noise ratio of each activation quantizer during evaluation (no host sync).

    Inside the `with`, every quantizer adds its input's power and the power of its quantization error to
    its own float64 sums (ActQuantizer.sqnr): no forward hook, so the quantizers keep their in-place path
    (quantize_owned). The numba kernels (float32 CPU activations, per-tensor and per-token) sum in float64 as
    they quantize; other paths (per-channel, accelerators, autograd) sum float32 norms of each tensor.
    """

    def __init__(self, sites: list[QuantSite]) -> None:
        self.sites = sites
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}

    def __enter__(self) -> SQNRMeter:
        for site in self.sites:
            q = site.quantizer
            if q.sqnr is None:  # a site sharing its quantizer with another shares its sums
                q.sqnr = torch.zeros(3, dtype=torch.float64, device=q.scale.device)
            self._sums[site.name] = q.sqnr
        return self

    def __exit__(self, *exc: object) -> None:
        for site in self.sites:
            site.quantizer.sqnr = None
        for name, sums in self._sums.items():
            if bool(sums[2] > 0):  # one host sync per site, after the evaluation
                self.signal[name] = self.signal[name] + sums[0] if name in self.signal else sums[0]
                self.noise[name] = self.noise[name] + sums[1] if name in self.noise else sums[1]
        self._sums.clear()

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
