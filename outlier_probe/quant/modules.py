"""Fake-quant module wrappers, built from float modules by `from_module` classmethods.

Weights are fake-quantized once at construction (the float module is left untouched); activations
go through `ActQuantizer`s that calibrate a range, then freeze it.
"""

from __future__ import annotations

import contextlib
import copy
import enum
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.quant import kernels
from outlier_probe.quant.estimators import RangeEstimator, fresh_copy, make_estimator
from outlier_probe.quant.quantizer import Estimator, QuantSpec, compute_qparams, fake_quantize


class ActMode(str, enum.Enum):
    calibrating = "calibrating"  # forward updates the range estimator, returns x unchanged
    frozen = "frozen"  # forward fake-quantizes with the frozen scale / zero point
    off = "off"  # identity


def _as_estimator(estimator: Estimator | str | RangeEstimator, spec: QuantSpec) -> RangeEstimator:
    if isinstance(estimator, RangeEstimator):
        if (estimator.axis is None) != (spec.axis is None):
            est_kind = "per-tensor" if estimator.axis is None else "per-channel"
            spec_kind = "per-tensor" if spec.axis is None else "per-channel"
            raise UsageError(
                f"a {est_kind} range estimator was given for a {spec_kind} spec; make their granularity match"
            )
        return estimator
    return make_estimator(estimator, spec=spec)


class ActQuantizer(nn.Module):
    """Activation fake-quantizer: calibrate a range, `freeze()` it, then quantize with it.

    Starts in `calibrating` mode. The frozen `min_val`, `max_val`, `scale`, `zero_point` are
    buffers (0-d per-tensor, (C,) per-channel), so they move with the model and are saved in the
    state dict; before the first `freeze()` they hold placeholders (+inf / -inf range).
    """

    def __init__(
        self,
        spec: QuantSpec,
        estimator: Estimator | str | RangeEstimator = Estimator.running_minmax,
        *,
        mode: ActMode | str = ActMode.calibrating,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.estimator = _as_estimator(estimator, spec)
        self.mode = ActMode(mode)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.has_qparams = False  # set by freeze(); a plain flag so forward needs no host sync
        # (signal power, noise power, calls), float64 on the quantizer's device, added to by every forward
        # while an SQNR meter (quant/sqnr.py) is on; None otherwise. Measured here, not by a hook, so the
        # meter leaves quantize_owned its in-place path.
        self.sqnr: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is ActMode.frozen:
            if not self.has_qparams:
                raise ProbeError(
                    "ActQuantizer is in frozen mode but has no range: run calibration batches, "
                    "then call freeze() (or freeze_all(model)) before evaluating"
                )
            return self._fake_quantize(x, in_place=False)
        if self.mode is ActMode.calibrating:
            self.estimator.update(x)
        if self.sqnr is not None:
            add_noise_power(self.sqnr, x, x)
        return x

    def _fake_quantize(self, x: Tensor, *, in_place: bool) -> Tensor:
        """The frozen quantization of x, its signal and noise power added to self.sqnr when set; in_place:
        x may be overwritten. A per-tensor float32 CPU tensor outside autograd takes the fused kernel
        (quant/kernels.py: fake_quantize's bits in one pass, the powers summed in float64 as it goes)."""
        if (self.spec.axis is None and kernels.available(x) and self.scale.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            return kernels.per_tensor_fused(x, self.scale, self.zero_point, self.spec.quant_min, self.spec.quant_max,
                                            in_place=in_place, sums=self.sqnr)
        out = fake_quantize(x, self.scale, self.zero_point, self.spec)
        if self.sqnr is not None:
            add_noise_power(self.sqnr, x, out)
        return out

    def quantize_owned(self, x: Tensor) -> Tensor:
        """self(x) for a tensor its caller owns and drops (a linear layer's fresh output, attention
        scores or probabilities): a quantizer may overwrite it instead of allocating its output."""
        if self.mode is ActMode.frozen and self.has_qparams and self._may_overwrite(x):
            return self._fake_quantize(x, in_place=True)
        return self(x)

    def _may_overwrite(self, x: Tensor) -> bool:
        """Whether quantize_owned may bypass __call__ and write into x: no hook could see x afterwards
        (forward hooks get the input too, e.g. the SQNR meter) or replace it (pre-hooks), and no autograd
        graph may hold x (softmax saves its output for the backward)."""
        registry = nn.modules.module  # torch's global hook registries
        return not (x.requires_grad or self._forward_hooks or self._forward_pre_hooks
                    or registry._global_forward_hooks or registry._global_forward_pre_hooks)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute scale / zero point once from the estimator's range and switch to frozen mode."""
        if not self.estimator.initialized:
            raise ProbeError(
                "ActQuantizer saw no data during calibration, so it has no range to freeze; "
                "check that calibration batches reach this module"
            )
        lo, hi = self.estimator.range()
        scale, zero_point = compute_qparams(lo, hi, self.spec)
        device = self.scale.device
        self.min_val, self.max_val = lo.to(device), hi.to(device)
        self.scale, self.zero_point = scale.to(device), zero_point.to(device)
        self.has_qparams = True
        self.mode = ActMode.frozen

    def reset(self) -> None:
        """Forget the calibration and the frozen range; back to calibrating mode."""
        self.estimator.reset()
        device = self.scale.device
        self.min_val = torch.tensor(float("inf"), device=device)
        self.max_val = torch.tensor(float("-inf"), device=device)
        self.scale = torch.tensor(1.0, device=device)
        self.zero_point = torch.tensor(0, dtype=torch.int32, device=device)
        self.has_qparams = False
        self.mode = ActMode.calibrating

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Per-channel buffers only get their shape at freeze(); adopt the saved shapes first.
        for name in ("min_val", "max_val", "scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if (prefix + "scale") in state_dict:
            self.has_qparams = True

    def extra_repr(self) -> str:
        if self.has_qparams:
            lo, hi = self.min_val.min().item(), self.max_val.max().item()
            channels = "" if self.spec.axis is None else f" over {self.min_val.numel()} channels"
            rng = f"range=[{lo:.4f}, {hi:.4f}]{channels}"
        else:
            rng = "range=uncalibrated"
        return f"{self.spec.label('a')} {self.estimator.describe()} {rng} mode={self.mode.value}"


def add_noise_power(sums: Tensor, x: Tensor, out: Tensor) -> None:
    """sums += (||x||^2, ||x - out||^2, 1): one fused float32 norm pass per tensor (decibels need ~5
    digits), float64 across calls; float64 copies of every activation would cost more than the quantized
    forward itself on a CPU. No host sync."""
    xf = x.detach().float()
    signal = torch.linalg.vector_norm(xf).double().square()
    noise = torch.linalg.vector_norm(xf - out.detach().float()).double().square()
    sums.add_(torch.stack((signal, noise, signal.new_ones(()))).to(sums.device))  # a no-op on one device


def map_input(x: Tensor, input_map: Tensor) -> Tensor:
    """x * m for a (in,) scale vector, x @ m for an (in, in) matrix (quant/mitigations' online maps)."""
    return x * input_map.to(x.dtype) if input_map.ndim == 1 else x @ input_map.to(x.dtype)


def quantize_weight(
    weight: Tensor, spec: QuantSpec, estimator: Estimator | str | RangeEstimator = Estimator.minmax
) -> tuple[Tensor, Tensor, Tensor]:
    """(fake-quantized weight, scale, zero point); `weight` and `estimator` are left untouched."""
    est = fresh_copy(_as_estimator(estimator, spec))
    w = weight.detach()
    est.update(w)
    lo, hi = est.range()
    scale, zero_point = compute_qparams(lo, hi, spec)
    return fake_quantize(w, scale, zero_point, spec), scale, zero_point


@contextlib.contextmanager
def _materialized(module: nn.Module) -> Iterator[None]:
    """The module's own weights on its execution device while inside, when accelerate offloaded them
    (they are "meta" between forwards); nothing to do for an ordinary module."""
    if getattr(module, "_hf_hook", None) is None:
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def _unhooked(module: nn.Module) -> nn.Module:
    """A copy made from an offloaded module holds real weights: drop accelerate's hook, which would
    reload the float weights over them at every forward."""
    if getattr(module, "_hf_hook", None) is not None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module)
    return module


def _weight_repr(spec: QuantSpec | None, estimator: str) -> str:
    return "weight=float" if spec is None else f"{spec.label('w')} {estimator}"


class _Delegating(nn.Module):
    """Attributes the wrapper lacks are read from the wrapped module, so model code that reads
    e.g. `layer.attention_type` or `norm.eps` keeps working after the swap."""

    _inner_name = "module"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # via __dict__: during unpickling / before Module.__init__ there is no _modules yet
            inner = self.__dict__.get("_modules", {}).get(self._inner_name)
            if inner is None:
                raise
            return getattr(inner, name)


def _copy_with_weight(module: nn.Module, new_weight: Tensor | None) -> nn.Module:
    """A deep copy of `module` whose `weight` is `new_weight`, without copying the old weight
    (embeddings are large) and without the original's hooks."""
    memo: dict[int, Any] = {}
    old = getattr(module, "weight", None)
    if new_weight is not None and isinstance(old, Tensor):
        memo[id(old)] = nn.Parameter(new_weight, requires_grad=False) if isinstance(old, nn.Parameter) else new_weight
    for name, value in vars(module).items():
        if "hook" in name and isinstance(value, dict):
            memo[id(value)] = type(value)()  # hooks belong to the float module, not the copy
    return copy.deepcopy(module, memo)


class QuantLinear(nn.Module):
    """Linear (or GPT-2 Conv1D) with a fake-quantized weight and optional input / output quantizers.

    The weight is stored in nn.Linear layout (out, in) for both; the bias stays float.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        w_spec: QuantSpec | None,
        w_estimator: str,
        w_scale: Tensor | None,
        w_zero_point: Tensor | None,
        input_quantizer: ActQuantizer | None = None,
        output_quantizer: ActQuantizer | None = None,
        input_map: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("w_scale", None if w_scale is None else w_scale.to(weight.device))
        self.register_buffer("w_zero_point", None if w_zero_point is None else w_zero_point.to(weight.device))
        self.w_spec, self._w_estimator = w_spec, w_estimator
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        # a fixed map applied before the input quantizer (online smoothing / rotation, quant/mitigations)
        self.register_buffer("input_map", None if input_map is None else input_map.detach().clone())

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        w_spec: QuantSpec | None,
        w_estimator: Estimator | str | RangeEstimator = Estimator.minmax,
        input_quantizer: ActQuantizer | None = None,
        output_quantizer: ActQuantizer | None = None,
    ) -> QuantLinear:
        """Wrap an nn.Linear or transformers Conv1D; per-channel axis 0 means output channels for both.

        w_spec None keeps the weight in float (a copy); only the activation quantizers act then.
        """
        from transformers.pytorch_utils import Conv1D  # lazy: transformers is slow to import

        if not isinstance(module, (Conv1D, nn.Linear)):
            raise TypeError(f"QuantLinear wraps nn.Linear or transformers Conv1D, got {type(module).__name__}")
        with _materialized(module):  # an offloaded module: its weights, loaded for the copy
            weight = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()  # Conv1D: (in, out)
            input_map = getattr(module, "input_map", None)
            if w_spec is None:
                return cls(weight.clone().contiguous(), module.bias, w_spec=None, w_estimator="", w_scale=None,
                           w_zero_point=None, input_quantizer=input_quantizer, output_quantizer=output_quantizer,
                           input_map=input_map)
            est = _as_estimator(w_estimator, w_spec)
            wq, scale, zero_point = quantize_weight(weight, w_spec, est)
            return cls(
                wq.contiguous(),
                module.bias,
                w_spec=w_spec,
                w_estimator=est.describe(),
                w_scale=scale,
                w_zero_point=zero_point,
                input_quantizer=input_quantizer,
                output_quantizer=output_quantizer,
                input_map=input_map,
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.input_map is not None:
            x = map_input(x, self.input_map)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.weight, self.bias)
        return y if self.output_quantizer is None else self.output_quantizer.quantize_owned(y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {_weight_repr(self.w_spec, self._w_estimator)}"
        )


_W = TypeVar("_W", bound="_WeightCopyWrapper")


class _WeightCopyWrapper(_Delegating):
    """Runs a copy of a module whose `weight` is fake-quantized; optional output quantizer."""

    def __init__(
        self,
        module: nn.Module,
        *,
        w_spec: QuantSpec | None,
        w_estimator: str,
        w_scale: Tensor | None,
        w_zero_point: Tensor | None,
        output_quantizer: ActQuantizer | None,
    ) -> None:
        super().__init__()
        self.module = module
        self.w_spec, self._w_estimator = w_spec, w_estimator
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("w_zero_point", w_zero_point)
        self.output_quantizer = output_quantizer

    @classmethod
    def from_module(
        cls: type[_W],
        module: nn.Module,
        *,
        w_spec: QuantSpec | None,
        w_estimator: Estimator | str | RangeEstimator = Estimator.minmax,
        output_quantizer: ActQuantizer | None = None,
    ) -> _W:
        """Wrap `module` (left untouched); a module whose weight is None (or w_spec None: weight kept in
        float) only gets the output quantizer."""
        if not hasattr(module, "weight"):
            raise UsageError(
                f"{type(module).__name__} has no `weight` to quantize; wrap it with OutputQuantized instead"
            )
        with _materialized(module):  # an offloaded module: its weights, loaded for the copy
            weight = module.weight
            if isinstance(weight, Tensor) and w_spec is not None:
                est = _as_estimator(w_estimator, w_spec)
                wq, scale, zero_point = quantize_weight(weight, w_spec, est)
                inner = _unhooked(_copy_with_weight(module, wq))
                return cls(inner, w_spec=w_spec, w_estimator=est.describe(), w_scale=scale,
                           w_zero_point=zero_point, output_quantizer=output_quantizer)
            # weight is None (e.g. LayerNorm(elementwise_affine=False)) or kept float: nothing to quantize.
            return cls(_unhooked(_copy_with_weight(module, None)), w_spec=None, w_estimator="",
                       w_scale=None, w_zero_point=None, output_quantizer=output_quantizer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.module(*args, **kwargs)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def extra_repr(self) -> str:
        return _weight_repr(self.w_spec, self._w_estimator)


class QuantNorm(_WeightCopyWrapper):
    """Any norm with a `weight` (LayerNorm, RMSNorm variants, T5-style): runs a copy of it with the
    weight fake-quantized, so norm classes never seen before work unchanged."""


class QuantEmbedding(_WeightCopyWrapper):
    """An embedding with a fake-quantized table. Runs a copy of the module, so subclasses with their
    own forward (e.g. scaled word embeddings) keep their behaviour."""


class OutputQuantized(_Delegating):
    """Fake-quantizes the output of any module (the first element of a tuple / ModelOutput)."""

    def __init__(self, module: nn.Module, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = quantizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        q = self.output_quantizer
        if isinstance(out, Tensor):
            return q(out)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            first = q(out[0])
            return type(out)._make((first, *out[1:])) if hasattr(out, "_make") else (first, *out[1:])
        if isinstance(out, list) and out and isinstance(out[0], Tensor):
            return [q(out[0]), *out[1:]]
        if isinstance(out, Mapping) and out:
            key = next(iter(out.keys()))
            out[key] = q(out[key])  # a fresh output object of the wrapped module (e.g. ModelOutput)
            return out
        raise TypeError(f"OutputQuantized cannot find a tensor in the output of {type(self.module).__name__}")


def iter_act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """(qualified name, quantizer) for every ActQuantizer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            yield name, module


def set_mode(model: nn.Module, mode: ActMode | str) -> None:
    """Switch every ActQuantizer of the model to `mode`."""
    try:
        mode = ActMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in ActMode)
        raise UsageError(f"unknown quantizer mode {mode!r}; choose one of {choices}") from None
    for _, q in iter_act_quantizers(model):
        q.mode = mode


def freeze_all(model: nn.Module) -> None:
    """Freeze every ActQuantizer; fails listing those that saw no calibration data."""
    quantizers = list(iter_act_quantizers(model))
    missing = [name for name, q in quantizers if not q.estimator.initialized]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ProbeError(
            f"{len(missing)} activation quantizer(s) saw no calibration data ({shown}); "
            "check that calibration batches reach them or leave those modules unquantized"
        )
    for _, q in quantizers:
        q.freeze()


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """`with calibrating(model): model(batch)`: estimators update inside, ranges freeze on exit.

    On an exception the previous modes are restored and nothing is frozen.
    """
    previous = {name: q.mode for name, q in iter_act_quantizers(model)}
    set_mode(model, ActMode.calibrating)
    try:
        yield model
    except BaseException:
        for name, q in iter_act_quantizers(model):
            q.mode = previous.get(name, q.mode)
        raise
    freeze_all(model)
