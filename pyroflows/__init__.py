"""pyroflows: normalizing flows for Pyro.

Direction convention: every transform maps the base side ``u ~ N(0, I)`` to the data side
``x``; ``t(u)`` samples, ``t.inv(x)`` scores (see DESIGN.md).
"""

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
