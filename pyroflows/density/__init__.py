"""Density estimation: fit a flow to a table of numbers, then sample it and score points.

* :func:`fit`: the training loop (validation split, early stopping, schedule, clipping,
  progress bar, atomic checkpoints and resume), on any flow; a conditional flow is fitted
  to p(x | c) with ``fit(flow, x, context=c)``.
* :class:`Standardization`: the fixed affine layer that makes scores data-unit scores.
* :class:`FlowDensity`: a scikit-learn estimator (needs ``scikit-learn``).
* :func:`save` / :func:`load`: model files that ``torch.load(weights_only=True)`` reads.
* ``pyroflows`` on the command line: ``fit``, ``sample``, ``score``, ``info``.
"""

from typing import Any

from pyroflows.density.data import DataError, as_rows, read_table
from pyroflows.density.fit import History, ResumeMismatch, fit
from pyroflows.density.model_file import ModelFileError, build, load, save
from pyroflows.density.standardize import Standardization

__all__ = [
    "DataError",
    "FlowDensity",
    "History",
    "ModelFileError",
    "ResumeMismatch",
    "Standardization",
    "as_rows",
    "build",
    "fit",
    "load",
    "read_table",
    "save",
]


def __getattr__(name: str) -> Any:
    # FlowDensity needs scikit-learn: imported on first use, so the rest works without it.
    if name == "FlowDensity":
        from pyroflows.density.estimator import FlowDensity

        return FlowDensity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
