"""Which of torch's transform modes is active: the one place that reads torch's privates.

``torch.func`` transforms (``vmap``, ``jacrev``, ``grad``...) wrap tensors, and forward-mode
AD tags them with a level; a layer that caches tensors or takes a fused path must know.
torch exposes no public test for either, so these read private attributes, each with a
fallback that says "not active" where the attribute is gone.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

_are_functorch_transforms_active = getattr(
    torch._C, "_are_functorch_transforms_active", lambda: False
)
_is_batchedtensor = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``jacrev``, ``grad``...) is running."""
    return bool(_are_functorch_transforms_active())


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (inside ``torch.autograd.forward_ad.dual_level()``)."""
    return forward_ad._current_level >= 0


def is_vmap_batch(value: torch.Tensor) -> bool:
    """Whether ``value`` is a ``torch.func.vmap`` batch (the map sees one point per call)."""
    return bool(_is_batchedtensor(value)) if _is_batchedtensor is not None else False
