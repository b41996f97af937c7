"""SQNRMeter: the quantizers' own signal / noise sums against a float64 numpy recomputation, per-tensor
and per-token, kernel and torch paths, called and quantize_owned (in place); the meter must leave the
in-place path on."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

from outlier_probe.quant import kernels
from outlier_probe.quant.mitigations.per_token import TokenActQuantizer
from outlier_probe.quant.modules import ActMode, ActQuantizer
from outlier_probe.quant.quantizer import QuantSpec
from outlier_probe.quant.recipes import QuantConfig, QuantSite, Recipe, quantize_model
from outlier_probe.quant.sqnr import SQNRMeter

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 64, generator=g) ** 3 for _ in range(3)]


def _quantizer(per_token: bool) -> ActQuantizer:
    q = (TokenActQuantizer if per_token else ActQuantizer)(QuantSpec(8, symmetric=False))
    for x in _batches():
        q(x)
    q.freeze()
    return q


def _reference_db(xs: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    signal = sum(float((x.double().numpy() ** 2).sum()) for x in xs)
    noise = sum(float(((x.double().numpy() - o.double().numpy()) ** 2).sum()) for x, o in zip(xs, outs))
    return 10.0 * math.log10(signal / noise)


def _metered(q: ActQuantizer, owned: bool) -> tuple[float, float, list[bool]]:
    """(meter's dB, reference dB, whether each output is its input's storage)."""
    xs, outs, same = _batches(), [], []
    with SQNRMeter([QuantSite("s", "k", 0, q)]) as meter:
        for x in xs:
            y = x.clone()
            out = q.quantize_owned(y) if owned else q(y)
            same.append(out.data_ptr() == y.data_ptr())
            outs.append(out.clone())
    return meter.sqnr_db("s"), _reference_db(xs, outs), same


# the kernels sum in float64 (to the last bits); the torch paths sum float32 norms (~1e-6 dB here)
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("owned", [False, True])
def test_meter_matches_a_float64_recomputation(kernel: bool, per_token: bool, owned: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel and not kernels.available(torch.zeros(1)):
        pytest.skip("numba is not importable here")
    if not kernel:
        monkeypatch.setenv("OUTLIER_PROBE_KERNEL", "torch")
    got, ref, same = _metered(_quantizer(per_token), owned)
    assert 20.0 < ref < 60.0 and got == pytest.approx(ref, abs=1e-9 if kernel else 1e-4)
    # quantize_owned writes into its input while the meter is on (the kernels can); a plain call never does
    assert same == [owned and kernel] * 3


@pytest.mark.skipif(not kernels.available(torch.zeros(1)), reason="numba is not importable here")
def test_kernel_sums_inf_rows_as_torch_does() -> None:
    """A row holding an inf takes the torch path; its signal power is inf, so the site's SQNR is not finite."""
    q, x = _quantizer(per_token=True), _batches()[0]
    x[1, 2, 3] = math.inf
    with SQNRMeter([QuantSite("s", "k", 0, q)]) as meter:
        q.quantize_owned(x)
    assert not math.isfinite(meter.sqnr_db("s"))


def test_meter_leaves_no_hook_and_clears_its_sums() -> None:
    q = _quantizer(per_token=False)
    silent = _quantizer(per_token=False)
    with SQNRMeter([QuantSite("s", "k", 0, q), QuantSite("never", "k", 0, silent)]) as meter:
        assert not q._forward_hooks and q._may_overwrite(torch.zeros(3))
        q(_batches()[0])
    assert q.sqnr is None and silent.sqnr is None
    assert math.isfinite(meter.sqnr_db("s")) and math.isnan(meter.sqnr_db("never"))


def test_calibrating_and_off_modes_count_as_noiseless() -> None:
    q = ActQuantizer(QuantSpec(8, symmetric=False))
    with SQNRMeter([QuantSite("s", "k", 0, q)]) as meter:
        q(_batches()[0])
        q.mode = ActMode.off
        q(_batches()[1])
    assert meter.sqnr_db("s") == math.inf


@pytest.mark.skipif(not kernels.available(torch.zeros(1)), reason="numba is not importable here")
@pytest.mark.parametrize("per_token", [False, True])
def test_a_metered_model_overwrites_its_linear_outputs(per_token: bool, tiny_model: Callable[[str], nn.Module]) -> None:
    """Through a whole model (per-tensor or per-token): the metered forward takes the in-place path (the
    output quantizer returns the Linear's own output storage) and gives the unmetered logits bit for bit."""
    model = tiny_model("bert")
    x = {"input_ids": torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))}
    qmodel, qsites = quantize_model(model, QuantConfig(recipe=Recipe.paper, per_token=per_token))
    with torch.inference_mode():
        qmodel(**x)
    for site in qsites:
        site.quantizer.freeze()
    linear = next(m for m in qmodel.modules() if getattr(m, "output_quantizer", None) is not None
                  and hasattr(m, "in_features"))
    seen: list[bool] = []
    inner = linear.output_quantizer.quantize_owned

    def spy(y: torch.Tensor) -> torch.Tensor:
        out = inner(y)
        seen.append(out.data_ptr() == y.data_ptr())
        return out

    linear.output_quantizer.quantize_owned = spy
    with torch.inference_mode():
        plain = qmodel(**x).logits
        with SQNRMeter(qsites) as meter:
            metered = qmodel(**x).logits
    assert seen == [True, True] and torch.equal(plain, metered)
    # every site was reached (a post-norm block output re-quantizes its norm's quantized output: inf dB)
    assert not any(math.isnan(meter.sqnr_db(s.name)) for s in qsites)
