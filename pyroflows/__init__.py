"""pyroflows: normalizing flows for Pyro.

Direction convention: every transform maps the base side ``u ~ N(0, I)`` to the data side
``x``; ``t(u)`` samples, ``t.inv(x)`` scores (see DESIGN.md).
"""

from typing import Any

from pyroflows.flows import BUILDERS, Flow, FlowDistribution, iaf, maf, nice, nsf, realnvp
from pyroflows.infer import AutoFlow

__version__ = "0.1.0"

__all__ = [
    "BUILDERS",
    "AutoFlow",
    "Flow",
    "FlowDensity",
    "FlowDistribution",
    "__version__",
    "iaf",
    "maf",
    "nice",
    "nsf",
    "realnvp",
]


def __getattr__(name: str) -> Any:
    # pyroflows.FlowDensity needs scikit-learn: pyroflows.density imports it on first use
    if name == "FlowDensity":
        from pyroflows import density

        return density.FlowDensity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
