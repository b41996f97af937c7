"""Backend and GPU selection of data-parallel runs, with CUDA and torch.distributed mocked (no GPU here:
the nccl and GPU paths themselves are untested on hardware)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from outlier_probe import distributed
from outlier_probe.config import Device
from outlier_probe.errors import UsageError


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """gpus(n): pretend this node has n CUDA devices; records torch.cuda.set_device calls."""
    chosen: list[int] = []

    def set_count(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return set_count


@pytest.mark.parametrize("n_gpus,device,device_map,expected", [
    (0, Device.cpu, None, "cpu"), (0, Device.auto, None, "cpu"), (0, None, "auto", "cpu"),
    (2, Device.cpu, None, "cpu"), (2, Device.cuda, None, "cuda"), (2, Device.auto, None, "cuda"),
    (2, None, None, "cpu"),  # gate: no --device, the CPU default
    (2, Device.cpu, "auto", "cuda"), (2, Device.cuda, "cpu", "cpu"),  # a device map decides the placement
])
def test_run_device_follows_the_options_and_the_gpus(gpus, n_gpus: int, device: Device | None, device_map: str | None,
                                                     expected: str) -> None:
    gpus(n_gpus)
    assert distributed.run_device(device, device_map) == expected


def test_backend_is_nccl_for_cuda_gloo_for_cpu_and_the_environment_overrides() -> None:
    assert distributed.backend_for("cpu", {}) == "gloo"
    assert distributed.backend_for("cuda", {}) == "cpu:gloo,cuda:nccl"  # host sums over gloo, CUDA tensors over nccl
    assert distributed.backend_for("cuda", {"OUTLIER_PROBE_DIST_BACKEND": "gloo"}) == "gloo"
    with pytest.raises(UsageError, match="choose from gloo, nccl"):
        distributed.backend_for("cpu", {"OUTLIER_PROBE_DIST_BACKEND": "mpi"})


def test_each_rank_takes_the_gpu_of_its_local_rank(gpus) -> None:
    chosen = gpus(2)
    assert distributed.bind_device("cuda", {"LOCAL_RANK": "1"}) == 1 and chosen == [1]
    assert distributed.bind_device("cpu", {"LOCAL_RANK": "5"}) is None and chosen == [1]  # a CPU run binds no GPU
    with pytest.raises(UsageError, match="local rank 2 but the node has 2 GPU"):
        distributed.bind_device("cuda", {"LOCAL_RANK": "2"})


@pytest.mark.parametrize("n_gpus,device,backend,bound", [
    (0, Device.cpu, "gloo", []), (2, Device.cpu, "gloo", []), (2, Device.cuda, "cpu:gloo,cuda:nccl", [1]),
])
def test_session_initialises_the_group_from_torchruns_environment(gpus, monkeypatch: pytest.MonkeyPatch, n_gpus: int,
                                                                   device: Device, backend: str, bound: list[int]) -> None:
    import torch.distributed as dist

    chosen = gpus(n_gpus)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OUTLIER_PROBE_DIST_BACKEND", raising=False)
    calls: list[str] = []

    class Stop(Exception):
        pass

    def init(backend_arg: str, **_kw: Any) -> None:
        calls.append(backend_arg)
        raise Stop  # nothing past the rendezvous runs here

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(Stop), distributed.session("stats", device):
        pass
    assert calls == [backend] and chosen == bound
    with pytest.raises(UsageError, match="does not run under torchrun"), distributed.session("train", device):
        pass
