"""Every transform under test, by name: one line here gives a layer all the property tests.

Each entry builds a layer for ``(dim, context)``; ``context`` is 0 for plain layers.
Entries marked ``coupling`` need ``dim >= 2``. Spline layers join this table as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pyroflows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineAutoregressive,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineAutoregressive,
    ConditionalAffineCoupling,
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    LULinear,
    Permutation,
    SplineAutoregressive,
    SplineCoupling,
)

CONTEXT = 3
HIDDEN = (16, 16)
SPLINE = {"bins": 5, "bound": 2.0}  # a small bound, so standard normal inputs reach the tails


@dataclass(frozen=True)
class Entry:
    build: Callable[[int], nn.Module]
    conditional: bool = False
    min_dim: int = 1
    inverse_passes: str = "1"  # "1" or "D": passes t.inv(x) takes


def _initialized_actnorm(dim: int) -> ActNorm:
    t = ActNorm(dim)
    gen = torch.Generator().manual_seed(1)
    t.inv(2.0 * torch.randn(32, dim, generator=gen) + 1.0)  # data-dependent init
    return t


def _reversed(dim: int) -> list[int]:
    return list(range(dim))[::-1]


TRANSFORMS: dict[str, Entry] = {
    "affine_coupling": Entry(lambda d: AffineCoupling(d, hidden=HIDDEN), min_dim=2),
    "affine_coupling_noclamp": Entry(
        lambda d: AffineCoupling(d, hidden=HIDDEN, clamp=None), min_dim=2
    ),
    "additive_coupling": Entry(lambda d: AdditiveCoupling(d, hidden=HIDDEN), min_dim=2),
    "iaf": Entry(
        lambda d: AffineAutoregressive(d, "iaf", HIDDEN, order=_reversed(d)), inverse_passes="D"
    ),
    "maf": Entry(lambda d: AffineAutoregressive(d, "maf", HIDDEN, order=_reversed(d))),
    "permutation_random": Entry(lambda d: Permutation(d, "random")),
    "permutation_reverse": Entry(lambda d: Permutation(d, "reverse")),
    "lu_linear": Entry(LULinear),
    "actnorm": Entry(_initialized_actnorm),
    "cond_affine_coupling": Entry(
        lambda d: ConditionalAffineCoupling(d, CONTEXT, hidden=HIDDEN), True, min_dim=2
    ),
    "cond_additive_coupling": Entry(
        lambda d: ConditionalAdditiveCoupling(d, CONTEXT, hidden=HIDDEN), True, min_dim=2
    ),
    "cond_iaf": Entry(
        lambda d: ConditionalAffineAutoregressive(d, CONTEXT, "iaf", HIDDEN),
        True,
        inverse_passes="D",
    ),
    "cond_maf": Entry(lambda d: ConditionalAffineAutoregressive(d, CONTEXT, "maf", HIDDEN), True),
    "spline_coupling": Entry(lambda d: SplineCoupling(d, hidden=HIDDEN, **SPLINE), min_dim=2),
    "spline_iaf": Entry(
        lambda d: SplineAutoregressive(d, "iaf", hidden=HIDDEN, order=_reversed(d), **SPLINE),
        inverse_passes="D",
    ),
    "spline_maf": Entry(lambda d: SplineAutoregressive(d, "maf", hidden=HIDDEN, **SPLINE)),
    "cond_spline_coupling": Entry(
        lambda d: ConditionalSplineCoupling(d, CONTEXT, hidden=HIDDEN, **SPLINE), True, min_dim=2
    ),
    "cond_spline_iaf": Entry(
        lambda d: ConditionalSplineAutoregressive(d, CONTEXT, "iaf", hidden=HIDDEN, **SPLINE),
        True,
        inverse_passes="D",
    ),
    "cond_spline_maf": Entry(
        lambda d: ConditionalSplineAutoregressive(d, CONTEXT, "maf", hidden=HIDDEN, **SPLINE), True
    ),
    # the other side of each default (coupling and MAF: "data"; IAF: "base")
    "spline_coupling_base": Entry(
        lambda d: SplineCoupling(d, hidden=HIDDEN, side="base", **SPLINE), min_dim=2
    ),
    "spline_iaf_data": Entry(
        lambda d: SplineAutoregressive(d, "iaf", hidden=HIDDEN, side="data", **SPLINE),
        inverse_passes="D",
    ),
    "spline_maf_base": Entry(
        lambda d: SplineAutoregressive(d, "maf", hidden=HIDDEN, side="base", **SPLINE)
    ),
    "cond_spline_coupling_base": Entry(
        lambda d: ConditionalSplineCoupling(d, CONTEXT, hidden=HIDDEN, side="base", **SPLINE),
        True,
        min_dim=2,
    ),
}
