"""pyroflows: normalizing flows for Pyro.

Direction convention: every transform maps the base side ``u ~ N(0, I)`` to the data side
``x``; ``t(u)`` samples, ``t.inv(x)`` scores (see DESIGN.md).
"""

from pyroflows.flows import BUILDERS, Flow, FlowDistribution, iaf, maf, nice, nsf, realnvp

__version__ = "0.1.0"

__all__ = [
    "BUILDERS",
    "Flow",
    "FlowDistribution",
    "__version__",
    "iaf",
    "maf",
    "nice",
    "nsf",
    "realnvp",
]
