"""pyroflows: normalizing flows for Pyro.

Direction convention (Pyro's, for ``TransformedDistribution``): every transform maps the
base side ``u ~ N(0, I)`` to the data side ``x``; ``t(u)`` samples, ``t.inv(x)`` scores,
and ``t.log_abs_det_jacobian(u, x)`` is ``log|det dx/du|``.
"""

from importlib.util import find_spec as _find_spec
from typing import Any

from pyroflows.flows import BUILDERS, Flow, FlowDistribution, iaf, maf, nice, nsf, realnvp
from pyroflows.infer import AutoFlow

__version__ = "0.1.0"

__all__ = [
    "BUILDERS",
    "AutoFlow",
    "Flow",
    "FlowDistribution",
    "__version__",
    "iaf",
    "maf",
    "nice",
    "nsf",
    "realnvp",
]
# FlowDensity is a scikit-learn estimator, and scikit-learn is optional
_HAS_SKLEARN = _find_spec("sklearn") is not None
if _HAS_SKLEARN:
    __all__.append("FlowDensity")


def __getattr__(name: str) -> Any:
    # pyroflows.FlowDensity needs scikit-learn: pyroflows.density imports it on first use
    if name == "FlowDensity":
        from pyroflows import density

        return density.FlowDensity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(["FlowDensity"] if _HAS_SKLEARN else [])})
