"""Per layer and head attention statistics, streamed: O(layers x heads + vocabulary) state, no stored maps.

For each query (padding queries excluded) of each head:
  first      p[0], the mass on the first token
  special    sum of p over special tokens (BOS / [CLS] / [SEP] / pad ...: the tokenizer's special ids)
  delimiter  sum of p over delimiter tokens ('.', ',', newline: every vocabulary entry that decodes to one)
  entropy    -sum p log p (nats) of the probabilities as computed (softmax_1 rows sum to < 1)
  sink       1 if p[0] > 0.3 (the softpick paper's sink rate), else 0
  null       1 - sum p: the mass that goes nowhere (softmax_1; ~0 for softmax)
and, for gated attention, the closed gate 1 - sigmoid(G(x)) per token and head. Figures are means
over queries. The categories may overlap ([CLS] is both the first and a special token).
Per layer, every key token id also accumulates the mass it receives, to name the token heads sink onto.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINK_THRESHOLD = 0.3
FIELDS = ("first", "special", "delimiter", "entropy", "sink", "null")


@dataclass
class BatchContext:
    """What the observer must know about the batch in flight (all (B, T) tensors on the model's device)."""

    input_ids: torch.Tensor
    special: torch.Tensor  # bool
    delimiter: torch.Tensor  # bool
    valid: torch.Tensor  # bool: not padding


@dataclass(frozen=True)
class HeadStats:
    layer: int
    head: int
    queries: int
    first: float
    special: float
    delimiter: float
    entropy: float
    sink: float  # sink rate
    null: float
    gate_closed: float  # NaN unless gated


class AttentionObserver:
    """Feed it `update(layer, probs)` (and `update_gate`) with `context` set to the batch in flight."""

    def __init__(self, layers: int, vocab_size: int) -> None:
        self.layers, self.vocab = layers, vocab_size
        self.context: BatchContext | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.queries: torch.Tensor | None = None  # (L,) valid queries seen (per head, the same)
        self.gate_sum: torch.Tensor | None = None  # (L, H)
        self.gate_count: torch.Tensor | None = None  # (L,)
        self.received: torch.Tensor | None = None  # (L, V) mass received by each key token id
        self.occurrences: torch.Tensor | None = None  # (V,) key token occurrences (summed over layer 0 calls)
        self.sequences = 0  # a plain count: known on the host without a sync

    def _alloc(self, heads: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = {f: torch.zeros(self.layers, heads, **f64) for f in FIELDS}
        self.queries = torch.zeros(self.layers, **f64)
        self.received = torch.zeros(self.layers, self.vocab, **f64)
        self.occurrences = torch.zeros(self.vocab, **f64)

    @torch.no_grad()
    def update(self, layer: int, probs: torch.Tensor) -> None:
        ctx = self.context
        assert ctx is not None, "set observer.context before each forward"
        b, h, tq, tk = probs.shape  # (B, H, Tq, Tk)
        if not self.sums:
            self._alloc(h, probs.device)
        p = probs.float()
        q_valid = ctx.valid[:, -tq:].to(p.dtype)[:, None, :]  # (B, 1, Tq)
        special = ctx.special[:, :tk].to(p.dtype)[:, None, :, None]  # (B, 1, Tk, 1)
        delimiter = ctx.delimiter[:, :tk].to(p.dtype)[:, None, :, None]
        first = p[..., 0]  # (B, H, Tq)
        per_query = {
            "first": first,
            "special": (p @ special).squeeze(-1),  # (B, H, Tq)
            "delimiter": (p @ delimiter).squeeze(-1),
            "entropy": torch.special.entr(p).sum(-1),
            "sink": (first > SINK_THRESHOLD).to(p.dtype),
            "null": 1.0 - p.sum(-1),
        }
        for name, value in per_query.items():
            self.sums[name][layer] += (value * q_valid).sum(dim=(0, 2)).double()
        self.queries[layer] += q_valid.sum().double()
        # mass each key receives (summed over heads and valid queries), by token id
        to_key = (p * q_valid[..., None]).sum(dim=(1, 2)).double()  # (B, Tk)
        ids = ctx.input_ids[:, :tk]
        self.received[layer].index_add_(0, ids.reshape(-1), to_key.reshape(-1))
        if layer == 0:
            self.sequences += b
            self.occurrences.index_add_(0, ids.reshape(-1), ctx.valid[:, :tk].reshape(-1).double())

    @torch.no_grad()
    def update_gate(self, layer: int, gate: torch.Tensor) -> None:
        """gate: (B, T, H) values of sigmoid(G(x)) in [0, 1]."""
        ctx = self.context
        assert ctx is not None
        valid = ctx.valid[:, -gate.shape[1]:].to(gate.dtype)[..., None]  # (B, T, 1)
        if self.gate_sum is None:
            self.gate_sum = torch.zeros(self.layers, gate.shape[-1], dtype=torch.float64, device=gate.device)
            self.gate_count = torch.zeros(self.layers, dtype=torch.float64, device=gate.device)
        self.gate_sum[layer] += ((1.0 - gate) * valid).sum(dim=(0, 1)).double()
        self.gate_count[layer] += valid.sum().double()

    def result(self) -> list[HeadStats]:
        """Host values (one sync); layers x heads, in order."""
        if not self.sums:
            return []
        n = self.queries.clamp(min=1).cpu()
        sums = {k: (v.cpu() / n[:, None]) for k, v in self.sums.items()}
        gate = (self.gate_sum.cpu() / self.gate_count.clamp(min=1).cpu()[:, None]) if self.gate_sum is not None else None
        out = []
        for layer in range(self.layers):
            for head in range(sums["first"].shape[1]):
                out.append(HeadStats(layer, head, int(self.queries[layer]), *(float(sums[f][layer, head]) for f in FIELDS),
                                     float(gate[layer, head]) if gate is not None else float("nan")))
        return out

    def sink_tokens(self, min_occurrences: int) -> list[tuple[int, float]]:
        """Per layer (token id, mean mass one occurrence receives from one query, summed over heads) of the
        token id that receives the most mass per occurrence, among ids seen at least `min_occurrences` times."""
        if self.received is None:
            return []
        occ = self.occurrences.cpu()
        ok = occ >= min_occurrences
        heads = next(iter(self.sums.values())).shape[1]
        queries_per_sequence = self.queries.cpu()[:, None] / max(self.sequences, 1)  # (L, 1)
        per = self.received.cpu() / (occ.clamp(min=1) * queries_per_sequence * heads)  # (L, V)
        per[:, ~ok] = -1.0
        best = per.argmax(dim=1)
        return [(int(i), float(per[layer, i])) for layer, i in enumerate(best)]
