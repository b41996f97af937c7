"""Hooks: always removed, never change the forward, and keep per-sequence statistics per sequence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.arch import Site
from outlier_probe.config import SiteKind, SiteSelection
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver
from tests.conftest import HIDDEN, make_model

ALL_KINDS = SiteSelection(kinds=tuple(SiteKind))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Recorder:
    """An observer that keeps what it was given."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.seen.append(x.clone())


def _ids(batch: int = 3, tokens: int = 10) -> torch.Tensor:
    return torch.randint(5, 300, (batch, tokens), generator=torch.Generator().manual_seed(0))


def test_hooks_are_removed_after_exit() -> None:
    model = make_model("opt")
    sites = arch.find_sites(model, ALL_KINDS)
    before = _hook_count(model)
    with observe(sites, lambda s: Recorder()) as obs:
        assert _hook_count(model) == before + len(sites)
        obs.batch_size = 3
        model(_ids())
    assert _hook_count(model) == before
    assert all(o.seen for o in obs.values())  # every site fired


def test_hooks_are_removed_after_an_exception_inside() -> None:
    model = make_model("bert")
    sites = arch.find_sites(model, ALL_KINDS)
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with observe(sites, lambda s: Recorder()):
            assert _hook_count(model) == before + len(sites)
            raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_hooks_are_removed_when_building_an_observer_fails() -> None:
    model = make_model("llama")
    sites = arch.find_sites(model)
    before = _hook_count(model)
    made = []

    def make(site: Site) -> Recorder:
        if len(made) == 3:
            raise ValueError("observer factory failed")
        made.append(site)
        return Recorder()

    with pytest.raises(ValueError, match="observer factory failed"):
        with observe(sites, make):
            pass  # never reached
    assert len(made) == 3 and _hook_count(model) == before


@pytest.mark.parametrize("family", ["opt", "gpt2", "bert", "llama"])
def test_hooks_do_not_change_the_forward(family: str) -> None:
    model = make_model(family)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        with observe(arch.find_sites(model, ALL_KINDS), lambda s: OutlierObserver()) as obs:
            obs.batch_size = ids.shape[0]
            hooked = model(ids).logits
    assert torch.equal(plain, hooked)


def test_opt_flattened_ffn_is_restored_to_sequences() -> None:
    model = make_model("opt")
    batch, tokens = 3, 10
    ids = _ids(batch, tokens)
    sites = arch.find_sites(model, ALL_KINDS)
    # what OPT itself hands to the hooks: fc2 output and the FFN norm are (B*T, d) inside the block
    raw: dict[str, torch.Tensor] = {}
    fc2 = model.get_submodule("model.decoder.layers.0.fc2")
    handle = fc2.register_forward_hook(lambda m, a, out: raw.__setitem__("fc2", out.detach().clone()))
    with torch.no_grad(), observe(sites, lambda s: OutlierObserver()) as obs:
        obs.batch_size = batch
        model(ids)
    handle.remove()
    assert raw["fc2"].shape == (batch * tokens, HIDDEN)  # the flattening this test is about
    for site in sites:
        stats = obs[site.name].result()
        assert stats.n_sequences == batch, site.name
        channels = site.module.in_features if site.kind is SiteKind.linear_input else HIDDEN
        assert stats.count == batch * tokens * channels, site.name
    # the per-sequence statistics are those of each sequence's (T, d) slice
    x = raw["fc2"].double().view(batch, tokens * HIDDEN)
    inf_norm = x.abs().amax(dim=1).mean().item()
    assert obs["model.decoder.layers.0.fc2"].result().paper_inf_norm == pytest.approx(inf_norm, rel=1e-12)


def test_without_the_batch_size_opt_sites_would_count_tokens_as_sequences() -> None:
    model = make_model("opt")
    site = next(s for s in arch.find_sites(model) if s.name.endswith("layers.0.fc2"))
    with torch.no_grad(), observe([site], lambda s: OutlierObserver()) as obs:
        model(_ids(3, 10))  # batch_size not set
    assert obs[site.name].result().n_sequences == 30  # why measure_sites sets it before every forward


def test_input_side_hook_reads_keyword_hidden_states() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.norm(hidden_states)

    block = Block()
    x = torch.randn(2, 5, 4)
    site = Site("norm:input", SiteKind.residual, 0, block, "input", "norm")
    with observe([site], lambda s: Recorder()) as obs:
        obs.batch_size = 2
        block(hidden_states=x)  # called with a keyword only, no positional args
        block(x)
    assert len(obs["norm:input"].seen) == 2
    assert all(torch.equal(seen, x) for seen in obs["norm:input"].seen)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_post_norm_block_output_is_measured_once(family: str) -> None:
    """A post-norm block returns its last norm's output tensor: one observer serves both sites."""
    model = make_model(family)
    ids = _ids()
    sites = arch.find_sites(model)
    blocks = [s for s in sites if s.kind is SiteKind.block_output]
    assert blocks and all(s.same_as for s in blocks)
    with torch.no_grad(), observe(sites, lambda s: OutlierObserver()) as obs:
        obs.batch_size = ids.shape[0]
        model(ids)
        model(ids)
    only_blocks = arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))
    with torch.no_grad(), observe(only_blocks, lambda s: OutlierObserver()) as alone:
        alone.batch_size = ids.shape[0]
        model(ids)
        model(ids)
    for block in blocks:
        assert obs[block.name] is obs[block.same_as]
        assert obs[block.name].result() == alone[block.name].result()  # what hooking it on its own measures


class _Block(nn.Module):
    """Returns its norm's output itself, or (copy=True) an equal tensor that is another object."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.copy = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(x)
        return out * 2 if self.copy else out


def _aliased_sites(block: _Block) -> list[Site]:
    return [Site("norm", SiteKind.norm, 0, block.norm, "output", "norm"),
            Site("block", SiteKind.block_output, 0, block, "output", "", same_as="norm")]


def test_alias_that_does_not_hold_on_the_first_forward_gets_its_own_observer() -> None:
    block, x = _Block(), torch.randn(2, 5, 4)
    block.copy = True
    with torch.no_grad(), observe(_aliased_sites(block), lambda s: OutlierObserver()) as obs:
        block(x)
        block(x)
    assert obs["block"] is not obs["norm"]
    assert obs["block"].result().max_abs == pytest.approx(2 * obs["norm"].result().max_abs)
    assert obs["block"].result().n_sequences == 4


def test_alias_that_breaks_later_is_an_error() -> None:
    from outlier_probe.errors import ProbeError

    block, x = _Block(), torch.randn(2, 5, 4)
    with torch.no_grad(), observe(_aliased_sites(block), lambda s: OutlierObserver()) as obs:
        block(x)
        assert obs["block"] is obs["norm"]
        block.copy = True
        with pytest.raises(ProbeError, match="stopped returning the tensor of norm"):
            block(x)
