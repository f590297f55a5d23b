"""Inference with flows: the AutoFlow guide and diagnostics that say whether to trust it."""

from pyroflows.infer.autoflow import GUIDE_FLOWS, AutoFlow  # noqa: I001  (after diagnostics)
from pyroflows.infer.diagnostics import (
    Diagnosis,
    diagnose,
    importance_draws,
    importance_resample,
    summarize,
    to_arviz,
)

__all__ = [
    "GUIDE_FLOWS",
    "AutoFlow",
    "Diagnosis",
    "diagnose",
    "importance_draws",
    "importance_resample",
    "summarize",
    "to_arviz",
]
