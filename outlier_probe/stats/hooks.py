"""Forward hooks that feed observers; they live in a context manager that always removes them."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

import torch

from outlier_probe.arch import Site
from outlier_probe.errors import ProbeError


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
def observe(sites: list[Site], make_observer: Callable[[Site], Observer], root: torch.nn.Module | None = None) -> Iterator[Hooked]:
    """Hook every site; yields {site.name: observer}. Hooks are removed on exit, also after an exception.

    Set `.batch_size` on the yielded object before each forward when blocks may flatten their inputs,
    or pass the model as `root`: a pre-hook on it then reads the batch size from each forward's input.
    A site whose `same_as` site is hooked too shares that site's observer (the tensor is measured
    once): its hook only checks, on every forward, that it is handed the very tensor object the other
    site saw. If that fails on the first forward the site gets an observer of its own (nothing was
    shared yet); a later failure raises, since the shared statistics could no longer be separated.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    observers = Hooked()
    names = {site.name for site in sites}
    targets = {site.same_as for site in sites if site.same_as in names}
    last_output: dict[str, weakref.ref[torch.Tensor]] = {}  # weak: keeps no activation alive

    def feed(site: Site, x: torch.Tensor) -> None:
        if site.name in targets:
            last_output[site.name] = weakref.ref(x)
        observers[site.name].update(observers.restore(x.detach()))

    def check_alias(site: Site, x: torch.Tensor, state: dict[str, bool]) -> None:
        assert site.same_as is not None
        ref = last_output.get(site.same_as)
        if ref is not None and ref() is x:
            state["verified"] = True
            return
        if state["verified"]:
            raise ProbeError(f"site {site.name} stopped returning the tensor of {site.same_as} between batches; "
                             f"exclude one of them (--exclude '{site.name}')")
        observers[site.name] = make_observer(site)  # first forward: nothing shared yet, measure it apart
        state["alias"] = False
        feed(site, x)

    if root is not None and sites:  # the batch size of each forward, read from the model's own inputs

        def set_batch_size(_module: Any, args: Any, kwargs: Any) -> None:
            x = _first_tensor(args) if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if x is not None:
                observers.batch_size = x.shape[0]

        handles.append(root.register_forward_pre_hook(set_batch_size, with_kwargs=True))
    try:
        for site in sites:
            aliased = site.capture == "output" and site.same_as in observers  # its target comes first
            observer = observers[site.same_as] if aliased else make_observer(site)
            observers[site.name] = observer
            state = {"alias": aliased, "verified": False}

            if site.capture == "output":

                def hook(_module: Any, _args: Any, output: Any, _site: Site = site, _state: dict = state) -> None:
                    x = _first_tensor(output)
                    if x is None:
                        return
                    if _state["alias"]:
                        check_alias(_site, x, _state)
                    else:
                        feed(_site, x)

                handles.append(site.module.register_forward_hook(hook))
            else:

                def pre_hook(_module: Any, args: Any, kwargs: Any, _site: Site = site) -> None:
                    x = _first_tensor(args) if args else _first_tensor(kwargs.get("hidden_states", kwargs.get("input")))
                    if x is not None:
                        feed(_site, x)

                handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield observers
    finally:
        for handle in handles:
            handle.remove()
