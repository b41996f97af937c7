"""The collectives that merge what every rank measured so that each rank holds the result of all the data
(see `distributed.py` for how a data-parallel run shards its batches):

- observers (`merge_observers`): SUM of the counters and histogram counts (int64) and of the per-sequence
  sums (float64), MAX of the extremes (max |x| and the per-channel absmax, from which the top-k channels
  are then re-selected: exactly the single-process top-k), and all_gather of the float64 central moments
  (count, mean, M2, M3, M4), combined in rank order with the same pairwise update as batches (adding raw
  power sums would lose precision when |mean| >> std).
- calibration ranges (`merge_calibration`): every estimator keeps the (min, max) of each batch it saw;
  these are all_gathered and replayed in the global batch order, so min-max, running min-max (EMA,
  momentum 0.9), percentile and MSE ranges are bit-identical to a single-process calibration (an EMA
  depends on the order of the batches, so neither a SUM nor a MIN/MAX of the ranks' ranges would do).

Both are no-ops outside a data-parallel run.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from outlier_probe.distributed import all_reduce, is_active, world_size


def merge_observers(observers: dict[str, Any]) -> None:
    """Merge every rank's OutlierObserver states in place: afterwards each rank holds the statistics
    of all ranks' data. `observers`: {site name: observer}, the same names in the same order on every
    rank (observers shared by several sites are merged once)."""
    if not is_active():
        return
    from outlier_probe.stats.moments import combine_moments

    unique = list({id(o): o for o in observers.values()}.values())
    channels = torch.tensor([o._channels or 0 for o in unique], dtype=torch.int64)
    all_reduce(channels, "MAX")  # a site no batch of this rank reached still gets its state
    for obs, c in zip(unique, channels.tolist()):
        obs._flush()
        if obs._channels is None and c:
            obs._init_state(c, obs.hist_edges.device)
    live = [o for o in unique if o._channels is not None]
    if not live:
        return
    device = live[0].hist_edges.device
    sum_f = ("paper_kurtosis_sum", "paper_inf_norm_sum")
    sum_i = ("n_gt_threshold", "n_gt_ksigma", "n_nonfinite", "hist_counts")
    maxes = ("max_abs", "channel_absmax")
    for names, dtype, op in ((sum_f, torch.float64, "SUM"), (sum_i, torch.int64, "SUM"), (maxes, torch.float64, "MAX")):
        parts = [o._s[n].reshape(-1) for o in live for n in names]
        flat = all_reduce(torch.cat(parts).to(device, dtype), op)
        for part, piece in zip(parts, flat.split([p.numel() for p in parts])):
            part.copy_(piece)  # the observers' own tensors (views of the state): updated in place
    seqs = all_reduce(torch.tensor([o.n_sequences for o in live], dtype=torch.int64), "SUM").tolist()
    # central moments: gather (count, mean, M2, M3, M4) of every rank, combine in rank order
    mine = torch.stack([_moments_row(o, device) for o in live])  # (S, 5)
    import torch.distributed as dist

    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    for i, (obs, n) in enumerate(zip(live, seqs)):
        obs.n_sequences = int(n)
        acc = None
        for rows in gathered:
            block = tuple(rows[i].unbind())
            if float(block[0]) == 0:
                continue
            acc = block if acc is None else combine_moments(acc, block)
        obs.moments.set_state(acc)


def _moments_row(obs: Any, device: torch.device) -> torch.Tensor:
    state = obs.moments.state_dict()
    if not state:
        return torch.zeros(5, dtype=torch.float64, device=device)
    return torch.stack([state[k].to(device, torch.float64) for k in ("count", "mean", "m2", "m3", "m4")])


def merge_calibration(quantizers: Sequence[Any], indices: Sequence[int], marks: Sequence[Sequence[int]], total: int) -> None:
    """Replay every activation estimator on all ranks' per-batch ranges, in the global batch order.

    `quantizers`: the ActQuantizers, in the same (module) order on every rank; `indices`: the global
    numbers of the calibration batches this rank ran, in that order; `marks[j][k]`: the length of
    quantizer k's estimator history after local batch j; `total`: calibration batches of the run.
    """
    if not is_active():
        return
    import torch.distributed as dist

    local: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for j, g in enumerate(indices):
        local[g] = []
        for k, q in enumerate(quantizers):
            start = marks[j - 1][k] if j else 0
            local[g].append([(lo.cpu(), hi.cpu()) for lo, hi in q.estimator.history[start : marks[j][k]]])
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    by_batch = {g: v for part in gathered for g, v in part.items()}
    if sorted(by_batch) != list(range(total)):
        raise RuntimeError(f"calibration merge got batches {sorted(by_batch)[:8]}..., expected 0..{total - 1}")
    for k, q in enumerate(quantizers):
        device = q.scale.device
        q.estimator.reset()
        for g in range(total):
            for lo, hi in by_batch[g][k]:
                q.estimator.fold(lo.to(device), hi.to(device))
