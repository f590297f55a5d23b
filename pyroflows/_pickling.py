"""Pickling modules whose parameters Pyro's param store has seen.

``pyro.module(name, module)`` (and ``pyro.param``) hang a weak reference on every
parameter (``param.unconstrained``), which ``pickle`` and ``torch.save`` refuse, so a
module registered once could not be saved whole. (Reading the param store's entries,
``pyro.get_param_store().items()``, does the same to the buffers a guide keeps there.)
Pyro's own ``PyroModule`` drops the references before pickling;
:class:`DropsParamStoreLinks` does the same for our modules. The param store sets them
again on the next ``pyro.module`` / ``pyro.param`` call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def drop_param_store_links(module: nn.Module) -> None:
    """Remove Pyro's weak references from ``module``'s parameters and buffers (recursively)."""
    for tensor in (*module.parameters(), *module.buffers()):
        tensor.__dict__.pop("unconstrained", None)


@contextmanager
def param_store_links_kept(module: nn.Module) -> Iterator[None]:
    """Put Pyro's weak references back on ``module``'s parameters after the block.

    For a ``copy.deepcopy`` in the middle of an SVI step: it pickles its way through the
    module (dropping the references), and the step reads them afterwards.
    """
    kept = [
        (tensor, tensor.__dict__["unconstrained"])
        for tensor in (*module.parameters(), *module.buffers())
        if "unconstrained" in tensor.__dict__
    ]
    try:
        yield
    finally:
        for tensor, link in kept:
            tensor.__dict__["unconstrained"] = link


class DropsParamStoreLinks:
    """Mixin for an ``nn.Module``: pickling first drops Pyro's weak references."""

    def __getstate__(self) -> dict[str, Any]:
        drop_param_store_links(self)  # type: ignore[arg-type]
        return super().__getstate__()  # type: ignore[misc]
