r"""Flow layers: Pyro ``TransformModule``\ s mapping base ``u`` to data ``x``.

Each family module holds the transform, its conditional twin and the maths they share.
"""

from pyroflows.transforms.autoregressive import (
    AffineAutoregressive,
    ConditionalAffineAutoregressive,
)
from pyroflows.transforms.base import (
    ConditionalFlowTransform,
    ConditionedTransform,
    FlowTransform,
)
from pyroflows.transforms.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
)
from pyroflows.transforms.elementwise import Additive, Affine
from pyroflows.transforms.linear import ActNorm, LULinear, Permutation
from pyroflows.transforms.spline import (
    ConditionalSplineAutoregressive,
    ConditionalSplineCoupling,
    RationalQuadratic,
    SplineAutoregressive,
    SplineCoupling,
    rational_quadratic_spline,
)

__all__ = [
    "ActNorm",
    "Additive",
    "AdditiveCoupling",
    "Affine",
    "AffineAutoregressive",
    "AffineCoupling",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineAutoregressive",
    "ConditionalAffineCoupling",
    "ConditionalFlowTransform",
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "ConditionedTransform",
    "FlowTransform",
    "LULinear",
    "Permutation",
    "RationalQuadratic",
    "SplineAutoregressive",
    "SplineCoupling",
    "rational_quadratic_spline",
]
