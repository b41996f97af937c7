"""STanHop-Net (Wu et al., 2024) as in the OutEffHop paper's time-series experiments.

x [B, in_len, D] -> pad (repeat the first step) to a multiple of seg_len -> segments -> patch
embedding Linear(seg_len -> d_model) + learned position embedding -> LayerNorm -> encoder of
`e_layers` blocks (segment merging with window `win` before every block but the first, none at
win = 1; then one STHM layer) -> decoder of e_layers + 1 blocks, block i attending to encoder output
i (the embedding is output 0); each decoder block predicts every output segment with
Linear(d_model -> seg_len) and the predictions are summed -> [B, horizon, D].

STHM layer: cross-time Hopfield self-attention over the segments of each series + MLP, then the
cross-series stage: `factor` learned queries pool the series (Hopfield pooling), the series retrieve
from the pooled patterns (broadcast back); residual + LayerNorm after each of the four sub-layers as
in Crossformer, whose TSA layer STanHop's code is built on (its norm1/2/4 are commented out there,
which leaves 11 stacked blocks without normalisation on the cross-time path).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.forecast.hopfield import Hopfield, HopfieldPooling, HopfieldVariant, parse_variant

MODEL_TYPE = "stanhop"


@dataclass(frozen=True)
class StanhopConfig:
    data_dim: int = 7
    in_len: int = 168
    horizon: int = 24
    seg_len: int = 6
    win: int = 1
    factor: int = 10
    d_model: int = 256
    d_ff: int = 512
    n_heads: int = 4
    e_layers: int = 11
    dropout: float = 0.5
    attention: HopfieldVariant = HopfieldVariant.softmax
    columns: tuple[str, ...] = ()  # the CSV's numeric columns the model was trained on

    model_type = MODEL_TYPE  # class attribute: what arch.family_of reads

    def __post_init__(self) -> None:
        for name in ("data_dim", "in_len", "horizon", "seg_len", "win", "factor", "d_model", "d_ff", "n_heads", "e_layers"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model {self.d_model} is not divisible by {self.n_heads} heads")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")

    @property
    def in_segments(self) -> int:
        return math.ceil(self.in_len / self.seg_len)

    @property
    def out_segments(self) -> int:
        return math.ceil(self.horizon / self.seg_len)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attention"] = self.attention.value
        d["columns"] = list(self.columns)
        return {"model_type": MODEL_TYPE, "architectures": ["STanHopNet"], **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StanhopConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["attention"] = parse_variant(kwargs.get("attention", "softmax"))
        kwargs["columns"] = tuple(kwargs.get("columns", ()))
        return cls(**kwargs)


class STHMLayer(nn.Module):
    """One STanHop block on [B, D, segments, d_model]."""

    def __init__(self, cfg: StanhopConfig) -> None:
        super().__init__()
        d, h, v, p = cfg.d_model, cfg.n_heads, cfg.attention, cfg.dropout
        self.cross_time = Hopfield(d, h, v, p)
        self.MLP1 = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.cross_series = HopfieldPooling(d, h, cfg.factor, v, p)
        self.hopfield = Hopfield(d, h, v, p)  # the series retrieve from the pooled patterns
        self.MLP2 = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(d) for _ in range(4))
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, L, d = x.shape
        t = x.reshape(B * D, L, d)
        t = self.norm1(t + self.dropout(self.cross_time(t, t, t)))
        t = self.norm2(t + self.dropout(self.MLP1(t)))
        s = t.reshape(B, D, L, d).transpose(1, 2).reshape(B * L, D, d)
        pooled = self.cross_series(s)  # (B*L, factor, d)
        # the public code added the retrieval to the pooled patterns (shape factor, not D) and relied
        # on the ignored `values` argument to make shapes agree; the residual is the series itself here
        s = self.norm3(s + self.dropout(self.hopfield(s, pooled, pooled)))
        s = self.norm4(s + self.dropout(self.MLP2(s)))
        return s.reshape(B, L, D, d).transpose(1, 2).contiguous()


class SegMerging(nn.Module):
    """Merge `win` adjacent segments (padding by repeating the last ones): coarser scale."""

    def __init__(self, d_model: int, win: int) -> None:
        super().__init__()
        self.win = win
        self.norm = nn.LayerNorm(win * d_model)
        self.linear_trans = nn.Linear(win * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (-x.shape[2]) % self.win
        if pad:
            x = torch.cat((x, x[:, :, -pad:, :]), dim=2)
        x = torch.cat([x[:, :, i::self.win, :] for i in range(self.win)], dim=-1)
        return self.linear_trans(self.norm(x))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: StanhopConfig, merge: bool) -> None:
        super().__init__()
        self.merge_layer = SegMerging(cfg.d_model, cfg.win) if merge and cfg.win > 1 else None
        self.sthm = STHMLayer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge_layer is not None:
            x = self.merge_layer(x)
        return self.sthm(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: StanhopConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.sthm = STHMLayer(cfg)
        self.hopfield = Hopfield(d, cfg.n_heads, cfg.attention, cfg.dropout)  # cross-attention to the encoder
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.MLP1 = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.linear_pred = nn.Linear(d, cfg.seg_len)

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sthm(x)
        B, D, L, d = x.shape
        q, kv = x.reshape(B * D, L, d), cross.reshape(B * D, cross.shape[2], d)
        q = self.norm1(q + self.dropout(self.hopfield(q, kv, kv)))
        out = self.norm2(q + self.MLP1(q)).reshape(B, D, L, d)
        return out, self.linear_pred(out)  # prediction (B, D, L, seg_len)


class STanHopNet(nn.Module):
    """Forward: normalised window [B, in_len, D] -> forecast [B, horizon, D]."""

    def __init__(self, cfg: StanhopConfig) -> None:
        super().__init__()
        self.config = cfg
        self.pad = cfg.in_segments * cfg.seg_len - cfg.in_len
        self.enc_emb = nn.Linear(cfg.seg_len, cfg.d_model)  # patch embedding
        self.enc_pos = nn.Parameter(torch.randn(1, cfg.data_dim, cfg.in_segments, cfg.d_model))
        self.pre_norm = nn.LayerNorm(cfg.d_model)
        self.encoder = nn.ModuleList(EncoderBlock(cfg, merge=i > 0) for i in range(cfg.e_layers))
        self.dec_pos = nn.Parameter(torch.randn(1, cfg.data_dim, cfg.out_segments, cfg.d_model))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.e_layers + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, T, D = x.shape
        if T != cfg.in_len or D != cfg.data_dim:
            raise ProbeError(f"the model takes windows of {cfg.in_len} steps x {cfg.data_dim} series, got {T} x {D}")
        if self.pad:
            x = torch.cat((x[:, :1, :].expand(-1, self.pad, -1), x), dim=1)
        seg = x.transpose(1, 2).reshape(B, D, cfg.in_segments, cfg.seg_len)
        h = self.pre_norm(self.enc_emb(seg) + self.enc_pos)
        encoded = [h]
        for block in self.encoder:
            h = block(h)
            encoded.append(h)
        y = self.dec_pos.expand(B, -1, -1, -1)
        pred = None
        for layer, cross in zip(self.decoder, encoded):
            y, p = layer(y, cross)
            pred = p if pred is None else pred + p
        pred = pred.reshape(B, D, cfg.out_segments * cfg.seg_len)[:, :, : cfg.horizon]
        return pred.transpose(1, 2)


def build(cfg: StanhopConfig, seed: int = 0) -> STanHopNet:
    torch.manual_seed(seed)
    return STanHopNet(cfg)


def is_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def save(model: STanHopNet, out: Path) -> Path:
    from safetensors.torch import save_file

    from outlier_probe.report.io import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "model.safetensors")
    write_json(out / "config.json", model.config.to_dict())
    return out


def load(folder: Path, attention: HopfieldVariant | None = None) -> STanHopNet:
    """A checkpoint folder -> model in eval mode; a different --attention is a usage error (new weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = StanhopConfig.from_dict(json.loads((folder / "config.json").read_text()))
        state = load_file(str(folder / "model.safetensors"))
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is one clear line
        raise ProbeError(f"cannot load the stanhop checkpoint {folder}: {type(err).__name__}: {str(err)[:200]}") from None
    if attention is not None and attention is not cfg.attention:
        raise UsageError(f"{folder} was trained with --attention {cfg.attention.value}; the stanhop family cannot "
                         f"switch a trained model to {attention.value} (its gates / parameters differ): retrain")
    model = STanHopNet(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ProbeError(f"{folder}/model.safetensors does not match its config.json: {str(err).splitlines()[0]}") from None
    return model.eval()
