"""stats/heap.py: a full garbage collection only when a dropped model is still held by a reference cycle."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from torch import nn

from outlier_probe.stats import heap


@pytest.fixture()
def collections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = gc.collect

    def counting(*args: Any) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(heap.gc, "collect", counting)
    return calls


def test_a_model_freed_by_refcounting_costs_no_collection(collections: list[int]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    dropped = weakref.ref(model)
    del model
    heap.collect_if_alive(dropped)
    assert dropped() is None and collections == []


def test_a_model_held_by_a_cycle_is_collected(collections: list[int]) -> None:
    gc.disable()  # so that no automatic collection frees the cycle first
    try:
        model = nn.Sequential(nn.Linear(4, 4))
        model.myself = [model]  # a reference cycle: refcounting alone cannot free it
        dropped = weakref.ref(model)
        del model
        assert dropped() is not None
        heap.collect_if_alive(dropped)
    finally:
        gc.enable()
    assert dropped() is None and collections == [1]
