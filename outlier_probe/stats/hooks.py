"""Forward hooks that feed observers; they live in a context manager that always removes them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

import torch

from outlier_probe.arch import Site


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return None


class Hooked(dict):
    """{site.name: observer}, plus the batch size of the forward in flight.

    Some models flatten (B, T, d) to (B*T, d) inside a block (OPT's FFN); with the batch size known the
    hooks restore the sequence dimension, so per-sequence statistics stay per sequence.
    """

    batch_size: int | None = None

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        if b and x.dim() >= 2 and x.shape[0] != b and x.shape[0] % b == 0:
            return x.reshape(b, -1, x.shape[-1])  # (B*T, d) -> (B, T, d)
        return x


@contextmanager
def observe(sites: list[Site], make_observer: Callable[[Site], Observer]) -> Iterator[Hooked]:
    """Hook every site; yields {site.name: observer}. Hooks are removed on exit, also after an exception.

    Set `.batch_size` on the yielded object before each forward when blocks may flatten their inputs.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    observers = Hooked()
    try:
        for site in sites:
            observer = make_observer(site)
            observers[site.name] = observer
            if site.capture == "output":

                def hook(_module: Any, _args: Any, output: Any, _obs: Observer = observer) -> None:
                    x = _first_tensor(output)
                    if x is not None:
                        _obs.update(observers.restore(x.detach()))

                handles.append(site.module.register_forward_hook(hook))
            else:

                def pre_hook(_module: Any, args: Any, kwargs: Any, _obs: Observer = observer) -> None:
                    x = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states", kwargs.get("input")))
                    if x is not None:
                        _obs.update(observers.restore(x.detach()))

                handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield observers
    finally:
        for handle in handles:
            handle.remove()
