"""Forecast metrics, control baselines, and the paper's time-series outlier summary.

MSE / MAE: mean over every test window, step and column of the standardised values (what the
papers report). Baselines on the same windows: persistence (the last observed value repeated) and a
least-squares linear forecast (one map in_len -> horizon shared by the columns, fitted on the
training windows, as DLinear's linear layer).

Paper summary (STanHop's `test` with hooks on every module): for every module output x and every
sample b, x_b flattened; kurtosis k_b = mean((x_b - mean)^4) / (std(x_b)^4 + 1e-6) (std unbiased) and
inf-norm max|x_b|; each averaged over samples; "average kurtosis" = mean over modules, "max inf-norm"
= max over modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import weakref

import numpy as np
import torch
from torch import nn

SUMMARY_DEFINITION = (
    "every module output (all submodules, as in STanHop's test code) flattened per sample b; "
    "k_b = mean((x_b - mean x_b)^4) / (std(x_b)^4 + 1e-6) with the unbiased std, inf_b = max |x_b|; "
    "per module the mean over test samples; average kurtosis = mean over modules, max inf-norm = max over modules"
)


@dataclass(frozen=True)
class ForecastScore:
    mse: float
    mae: float
    windows: int


def errors(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of absolute errors) in float64."""
    d = (pred.double() - target.double())
    return (d * d).sum(), d.abs().sum()


def score(pred: torch.Tensor, target: torch.Tensor) -> ForecastScore:
    se, ae = errors(pred, target)
    return ForecastScore(float(se) / target.numel(), float(ae) / target.numel(), target.shape[0])


def persistence(x: torch.Tensor, horizon: int) -> torch.Tensor:
    return x[:, -1:, :].expand(-1, horizon, -1)


def fit_linear(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y_c = W x_c + b, shared over columns c: (W [horizon, in_len], b [horizon])."""
    X = x.transpose(1, 2).reshape(-1, x.shape[1]).double().numpy()
    Y = y.transpose(1, 2).reshape(-1, y.shape[1]).double().numpy()
    A = np.hstack([X, np.ones((X.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    return coef[:-1].T, coef[-1]


def linear_forecast(x: torch.Tensor, w: np.ndarray, b: np.ndarray) -> torch.Tensor:
    out = np.einsum("nti,hi->nth", x.transpose(1, 2).double().numpy(), w) + b  # (N, D, h)
    return torch.from_numpy(out).transpose(1, 2).float()


class PaperSummary:
    """Forward hooks on every submodule accumulating per-sample kurtosis and inf-norm (tensors only)."""

    def __init__(self, model: nn.Module, skip: Callable[[str, nn.Module], bool] = lambda n, m: False) -> None:
        self.names: list[str] = []
        self.kurt: dict[str, torch.Tensor] = {}
        self.inf: dict[str, torch.Tensor] = {}
        self.count = 0
        self._batch = 0
        self._handles = []
        for name, module in model.named_modules():
            if name and not skip(name, module):
                self.names.append(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, tuple):
                out = out[0]
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            # a module returning the very tensor another already returned (Dropout in eval, Sequential,
            # a Hopfield layer and its out_projection) has the same figures: computed once per forward
            hit = self._seen.get(id(out))
            if hit is not None and hit[0]() is out:
                k, inf = hit[1], hit[2]
            else:
                # every reshape in the model keeps the batch outermost: rows of one sample are contiguous
                x = out.detach().reshape(self._batch, -1).float()  # float32: standardised-scale values
                d = x - x.mean(dim=1, keepdim=True)
                d2 = d * d
                var = d2.sum(dim=1) / (x.shape[1] - 1)  # unbiased, as STanHop's torch.std
                k = ((d2 * d2).mean(dim=1) / (var * var + 1e-6)).double().sum()
                inf = x.abs().amax(dim=1).double().sum()
                self._seen[id(out)] = (weakref.ref(out), k, inf)
            self.kurt[name] = self.kurt.get(name, 0) + k
            self.inf[name] = self.inf.get(name, 0) + inf
        return hook

    def batch(self, n: int) -> None:
        self._seen: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._batch = n
        self.count += n

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def per_module(self) -> list[dict[str, Any]]:
        return [{"module": n, "kurtosis": float(self.kurt[n]) / self.count, "inf_norm": float(self.inf[n]) / self.count}
                for n in self.names if n in self.kurt]

    def summary(self) -> dict[str, Any]:
        rows = self.per_module()
        worst = max(rows, key=lambda r: r["inf_norm"])
        return {"avg_kurtosis": float(np.mean([r["kurtosis"] for r in rows])), "max_inf_norm": worst["inf_norm"],
                "max_inf_norm_module": worst["module"], "modules": len(rows), "samples": self.count}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             summary: PaperSummary | None = None) -> ForecastScore:
    """Forecast MSE / MAE over every window of (x, y); model in eval mode."""
    model.eval()
    se = ae = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if summary is not None:
            summary.batch(xb.shape[0])
        s, a = errors(model(xb), yb)
        se, ae = se + s, ae + a
    return ForecastScore(float(se) / y.numel(), float(ae) / y.numel(), y.shape[0])
