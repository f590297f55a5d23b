"""Inference with flows: AutoFlow, its diagnostics, and amortized VAE posteriors.

AutoFlow is a flow autoguide for any Pyro model; the diagnostics say whether to trust a
guide; the amortized pieces give VAEs a flow posterior q(z | x) and score them by the
importance-weighted log-likelihood.
"""

from pyroflows.infer.autoflow import GUIDE_FLOWS, AutoFlow, GuideSetupError  # noqa: I001  (after diagnostics)
from pyroflows.infer.amortized import (
    AmortizedGuide,
    AmortizedPosterior,
    Encoder,
    amortized_posterior,
    iwae_log_likelihood,
)
from pyroflows.infer.diagnostics import (
    Diagnosis,
    diagnose,
    importance_draws,
    importance_resample,
    loo,
    summarize,
    to_arviz,
)

__all__ = [
    "AmortizedGuide",
    "AmortizedPosterior",
    "Encoder",
    "amortized_posterior",
    "iwae_log_likelihood",
    "GUIDE_FLOWS",
    "AutoFlow",
    "GuideSetupError",
    "Diagnosis",
    "diagnose",
    "importance_draws",
    "importance_resample",
    "loo",
    "summarize",
    "to_arviz",
]
