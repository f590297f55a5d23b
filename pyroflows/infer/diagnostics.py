r"""Did the guide work? Importance weights, PSIS k-hat, ESS, resampling and ArviZ export.

Draws :math:`z_s \sim q` from a guide and forms the log importance weights

.. math::
    \log w_s = \log p(x, z_s) - \log q(z_s), \qquad s = 1, \dots, S,

whose mean is the ELBO and whose log-mean-exp is an estimate of :math:`\log p(x)`.
Pareto-smoothed importance sampling (Vehtari et al. 2024; ArviZ's ``psislw``) fits a
generalized Pareto to the largest weights; its shape :math:`\hat k` says how heavy the
tail of :math:`p/q` is, and so whether the guide can be trusted (Yao et al. 2018):
:math:`\hat k < 0.5` good, :math:`0.5 \le \hat k \le 0.7` usable with care,
:math:`\hat k > 0.7` do not trust. These functions work with any Pyro guide, not only
:class:`~pyroflows.infer.AutoFlow`, so a mean-field guide can be checked the same way.

Weights are computed vectorized over the draws (one model and one guide run under a
particle plate, Pyro's ``vectorized_importance_weights``, for at most 256 draws at a
time, so that memory stays bounded) when the model broadcasts, and
one draw at a time when it does not, or when two draws scored one at a time disagree
with the batch (a model that runs under the plate but mixes the draws up); a guide that
draws as one distribution does (AutoFlow, Pyro's Gaussian and IAF autoguides) then still
draws under the plate, up to 1024 draws a run, and only the model runs once a draw. The weights
need the model's full likelihood and a guide with a density: a model that subsamples a
plate, and a point-mass guide (``AutoDelta``), are refused.

A discrete latent that the model enumerates in parallel (``infer={"enumerate":
"parallel"}``, as ``config_enumerate`` sets for ``TraceEnum_ELBO``) and the guide does
not draw is summed out of the weight, as the ELBO sums it out in training:

.. math::
    \log w_s = \log \sum_{c} p(x, z_s, c) - \log q(z_s),

by Pyro's tensor contraction over the enumerated dims (``poutine.enum``), one model run
per draw. The pointwise log-likelihoods (:func:`loo`, ``to_arviz``'s ``log_likelihood``
group) sum them out of each point too,
:math:`\log p(y_i \mid z_s) = \log \sum_{c_i} p(c_i \mid z_s)\, p(y_i \mid c_i, z_s)`,
where the model's factors fall apart by point: each summed site shares the plates of
the one data site that depends on it (a mixture's assignment of each row). A summed
site shared by several points or data sites (a global switch) ties them together:
:func:`loo` is then refused, and ``to_arviz`` leaves the group out, saying why.

The same weights turn guide draws into leave-one-out cross-validation (:func:`loo`), and
:func:`to_arviz` writes the pointwise log-likelihood that ArviZ's ``loo`` and ``waic``
read.

References:
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but Did It Work?: Evaluating Variational
    Inference. ICML. arXiv:1802.02538.
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto Smoothed Importance Sampling.
    JMLR 25. arXiv:1507.02646.
    Magnusson, Andersen, Jonasson, Vehtari (2019). Bayesian leave-one-out
    cross-validation for large data. ICML. arXiv:1904.10679.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.util import plate_log_prob_sum
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.messenger import Messenger
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import constraints

from pyroflows._checks import check_positive_int, warn_from_caller


def _arviz():
    """Import ArviZ, hiding the notice about its own refactor that it prints on import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


GOOD_KHAT = 0.5
USABLE_KHAT = 0.7


#: ESS, as a fraction of the draws, above which a large k-hat gets a note (see ``verdict``).
FLAT_ESS_FRACTION = 0.9

#: Spread (max - min) of the log weights at or below which :func:`psis` takes them as
#: constant: every weight within 1% of every other, so no estimate moves by more than
#: that whatever the weights' tail, and the spread may be rounding alone (a float32 log
#: joint near -3000 is rounded to 2.4e-4, and a sum of many terms more): a Pareto fit of
#: it reads noise, and ArviZ can give k-hat inf for an exact guide.
FLAT_LOG_WEIGHT_SPREAD = 0.01

#: ESS, as a fraction of the draws, below which a small k-hat does not make the guide
#: "close to the posterior" (see ``verdict``): a Gaussian guide 3 times as wide as a
#: Gaussian posterior gives k-hat < 0.5 and an ESS of 46% in one dimension; on eight
#: schools, an AutoFlow whose raw tau quantiles were 0.54 / 2.13 / 8.08 against the
#: resampled 0.32 / 2.78 / 9.86 had k-hat 0.48 and an ESS of 48%.
CLOSE_ESS_FRACTION = 0.5

#: ESS, as a fraction of the draws, below which a small k-hat's "good" reading no longer
#: calls the guide close to the posterior but says that resampled draws are closer: in
#: one dimension an ESS of 90% is a Gaussian guide 1.3 times as wide as a Gaussian
#: posterior, or one 0.32 sd off centre. On posteriordb (``posterior_quality.json``,
#: 2026-12-05) three fits of Pyro's guides had k-hat < 0.5 with an ESS of 59-65%, while
#: the worse of their largest mean error (in posterior sds) and largest |log sd ratio|
#: was 0.58-0.65.
NEAR_ESS_FRACTION = 0.9


def _khat_text(khat: float, thresholds: tuple[float, ...] = ()) -> str:
    """k-hat to two decimals, or more where two would put it on a threshold's other side.

    The thresholds are 0.5 and 0.7, and any given.
    """
    bounds = (GOOD_KHAT, USABLE_KHAT, *thresholds)
    for digits in (2, 3, 4, 6):
        text = f"{khat:.{digits}f}"
        shown = float(text)
        if all((shown < t) == (khat < t) and (shown <= t) == (khat <= t) for t in bounds):
            return text
    return repr(khat)


def _ess_text(fraction: float) -> str:
    """An ESS fraction as a percentage, with more digits where one would cross a threshold.

    The thresholds are :data:`CLOSE_ESS_FRACTION` and :data:`NEAR_ESS_FRACTION`: 0.8996
    reads 89.96%, not 90.0% in the line for an ESS below 90%.
    """
    for digits in (1, 2, 3, 4):
        shown = float(f"{100 * fraction:.{digits}f}") / 100
        if all((shown < t) == (fraction < t) for t in (CLOSE_ESS_FRACTION, NEAR_ESS_FRACTION)):
            return f"{100 * fraction:.{digits}f}%"
    return f"{fraction!r} of 1"


def verdict(
    khat: float,
    ess_fraction: float | None = None,
    *,
    smoothed_ess_fraction: float | None = None,
    remedy: str | None = None,
) -> str:
    r"""A one-line reading of a PSIS :math:`\hat k` (Yao et al. 2018 thresholds).

    :math:`\hat k` reads the weights of the guide's own draws: posterior mass far from
    every draw (a second mode the guide never visits) leaves no trace in them, so a
    "good" reading cannot rule it out (and says so).

    Args:
        khat: the Pareto shape estimate.
        ess_fraction: the raw (unsmoothed) weights' ESS / number of draws, if known.
            :math:`\hat k` is scale-free: when the weights barely vary (a guide very close
            to the posterior), a tail that is heavy only next to that narrow bulk can
            still give :math:`\hat k > 0.7`. With ``ess_fraction >=``
            :data:`FLAT_ESS_FRACTION` the "do not trust" reading says so and asks for more
            draws; the reading itself does not change. Conversely, a guide much wider than
            the posterior (or otherwise off, but covering it) gives a small
            :math:`\hat k`, which says that importance sampling from it is reliable, not
            that its draws are the posterior's: with ``ess_fraction <``
            :data:`CLOSE_ESS_FRACTION` the "good" reading says to use resampled draws, and
            the "usable with care" one says how far the raw draws are; below
            :data:`NEAR_ESS_FRACTION` the "good" reading says resampled draws are closer
            to the posterior than the raw ones, instead of calling the guide close.
        smoothed_ess_fraction: the Pareto-smoothed weights' ESS / number of draws (what
            :class:`Diagnosis` prints), used instead of ``ess_fraction`` for the notes
            on wide weights when given, so that the line quotes the ESS it prints.
        remedy: what the "do not trust" reading of a guide that misses mass advises, in
            place of :data:`GENERIC_REMEDY` (which names remedies for any guide); see
            :func:`remedy_for` for the advice fitted to a given guide.

    The remedy the "do not trust" reading names for a flow comes from posteriordb's GP
    regression (``benchmarks/results/posterior_quality*.md``): fitted with one draw per
    step, the default :class:`~pyroflows.infer.AutoFlow`'s smallest sd ratio stayed at
    0.4-0.6 with 4 or 8 layers, 20,000 steps or a smaller final learning rate; 16 draws
    per step raised it to about 0.8, and ``estimator="stl"`` to about 0.65 (with the
    second IAF layer reversing the variable order, as the default did then; with both
    layers in the model's order, the default since, one draw gives 0.65 and
    ``estimator="stl"`` 0.75, and 16 draws 0.83 and, with ``estimator="stl"``, 0.91).
    """
    if isinstance(khat, torch.Tensor) and khat.dim() == 0:
        khat = khat.item()
    if isinstance(khat, (bool, np.bool_)) or not isinstance(khat, numbers.Real):
        raise TypeError(f"khat must be a number, got {type(khat).__name__} {khat!r}")
    for name, value in (
        ("ess_fraction", ess_fraction),
        ("smoothed_ess_fraction", smoothed_ess_fraction),
    ):  # NaN passes: the ESS of weights that are all 0
        if value is not None and (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, numbers.Real)
            or value < 0
            or value > 1 + 1e-6  # rounding
        ):
            raise ValueError(f"{name} must be a fraction in [0, 1] or None, got {value!r}")
    if remedy is not None and not isinstance(remedy, str):
        raise TypeError(f"remedy must be a string or None, got {type(remedy).__name__}")
    spread = smoothed_ess_fraction if smoothed_ess_fraction is not None else ess_fraction
    if khat == -math.inf:
        return (
            "good: the weights are constant (each within 1% of the others), the guide "
            "matches the posterior's shape wherever its draws go (a mode no draw comes near "
            "stays unseen)"
        )
    if not math.isfinite(khat):
        return "do not trust: the importance weights are not finite"
    if khat < GOOD_KHAT and spread is not None and spread < CLOSE_ESS_FRACTION:
        return (
            f"good for importance sampling: k-hat {_khat_text(khat)} < {GOOD_KHAT}, but the "
            f"weights vary widely (ESS {_ess_text(spread)} of the draws): the guide's raw draws "
            "are not the posterior's (too wide, too narrow or off centre somewhere); "
            "importance_resample() corrects them"
        )
    if khat < GOOD_KHAT and spread is not None and spread < NEAR_ESS_FRACTION:
        return (
            f"good: k-hat {_khat_text(khat)} < {GOOD_KHAT}, the guide covers the posterior "
            f"wherever its draws go, but its weights vary (ESS {_ess_text(spread)} of the draws): "
            "importance_resample() gives draws closer to the posterior than the raw ones "
            "(a mode no draw comes near stays unseen)"
        )
    if khat < GOOD_KHAT:
        return (
            f"good: k-hat {_khat_text(khat)} < {GOOD_KHAT}, the guide is close to the posterior "
            "wherever its draws go (a mode no draw comes near stays unseen)"
        )
    if khat <= USABLE_KHAT:
        wide = ""
        if spread is not None and spread < CLOSE_ESS_FRACTION:
            wide = f" (ESS {_ess_text(spread)} of the draws: the raw draws are far from it)"
        return (
            f"usable with care: k-hat {_khat_text(khat)} in [{GOOD_KHAT}, {USABLE_KHAT}]; "
            f"importance-resampled draws are more reliable than the raw guide{wide}"
        )
    if ess_fraction is not None and ess_fraction >= FLAT_ESS_FRACTION:
        return (
            f"do not trust: k-hat {_khat_text(khat)} > {USABLE_KHAT}, though the weights "
            f"barely vary (ESS {ess_fraction:.1%} of the draws), so the tail is heavy only "
            "next to a very narrow bulk; score more draws to confirm"
        )
    return (
        f"do not trust: k-hat {_khat_text(khat)} > {USABLE_KHAT}, the guide misses mass the "
        f"posterior has ({GENERIC_REMEDY if remedy is None else remedy})"
    )


_MORE_DRAWS = "more draws per step, e.g. Trace_ELBO(num_particles=16, vectorize_particles=True)"

#: The advice of :func:`verdict` for a guide that misses mass, when the guide is not known.
GENERIC_REMEDY = (
    f"try a flow in place of a Gaussian or mean-field guide; for a flow, {_MORE_DRAWS}, "
    "or AutoFlow(estimator='stl'), which help more than more steps or layers"
)


def remedy_for(guide: Any) -> str | None:
    """The advice :func:`verdict` gives for ``guide`` when it misses mass.

    An :class:`~pyroflows.infer.AutoFlow` is told what it can still change: more draws
    per step, and ``estimator='stl'`` unless it already uses it; one whose warm start
    did not run, why and what would warm-start it (``warm_start='laplace'``, a first call
    on the full data), or, where its model hides latent sites for another guide (an
    ``AutoGuideList``), that none can and it needs more steps.
    For any other guide this returns ``None``, and the verdict gives
    :data:`GENERIC_REMEDY`.
    """
    from pyroflows.infer.autoflow import AutoFlow  # autoflow imports this module

    if not isinstance(guide, AutoFlow):
        return None
    cold = ""
    if getattr(guide, "_cold_start", False):  # no warm start ran: a flow settles slowly
        why, cure = {
            "off": ("warm_start=None", "warm-start it (warm_start='laplace')"),
            "subsampled": (
                "its first call subsampled the data",
                "warm-start it with a first call on the full data, before the mini-batch "
                "steps, where the model allows one, or give it more steps",
            ),
            "hidden": (
                "its model draws random values with this guide's latent sites fixed: "
                "latent sites it does not cover, hidden for another guide, or a subsample "
                "drawn by hand",
                "no warm start can fit those: give it more steps",
            ),
        }.get(
            getattr(guide, "_cold_reason", None),  # None: a guide pickled before it
            (
                "warm_start=None, or its first call subsampled the data or hid latent sites",
                "warm-start it (warm_start='laplace', first call on the full data)",
            ),
        )
        cold = (
            f"this AutoFlow started cold ({why}), and a cold flow can take thousands of "
            f"steps to settle: {cure}; "
        )
    if guide.estimator == "stl":
        return (
            f"{cold}this AutoFlow already uses estimator='stl': try {_MORE_DRAWS}, which "
            "helps more than more steps or layers"
        )
    return (
        f"{cold}for this AutoFlow, {_MORE_DRAWS}, or estimator='stl', which help more than "
        "more steps or layers"
    )


@dataclass(frozen=True)
class Diagnosis:
    r"""What the importance weights of a guide say.

    Attributes:
        khat: PSIS Pareto shape :math:`\hat k` of the weights' tail.
        ess: effective sample size of the Pareto-smoothed self-normalized weights,
            :math:`1 / \sum_s \tilde w_s^2`, out of ``num_samples``.
        num_samples: the number of guide draws ``S``.
        elbo: mean log weight, the ELBO estimate :math:`\frac1S \sum_s \log w_s`.
        log_evidence: the importance-sampling estimate of :math:`\log p(x)`,
            :math:`\log \frac1S \sum_s w_s` (an estimate from below, in expectation).
        verdict: the reading of ``khat`` in words.
    """

    khat: float
    ess: float
    num_samples: int
    elbo: float
    log_evidence: float
    verdict: str

    @property
    def trustworthy(self) -> bool:
        r"""Whether :math:`\hat k \le 0.7`."""
        return self.khat <= USABLE_KHAT  # False for nan and inf

    def __str__(self) -> str:
        """One line a user can print.

        ``log p(x) ~`` the importance-sampling estimate: a lower bound in expectation
        only (one estimate can land above the truth), and worth little where the
        weights are not trustworthy, which the line then says.
        """
        evidence = f"log p(x) ~ {self.log_evidence:.2f}"
        if not self.trustworthy:
            evidence += " (unreliable at this k-hat)"
        return (
            f"k-hat {_khat_text(self.khat)} | ESS {self.ess:.0f}/{self.num_samples} | "
            f"ELBO {self.elbo:.2f} | {evidence} | {self.verdict}"
        )


def _as_weights(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Log weights as a float64 NumPy vector; anything but shape ``(S,)`` is refused."""
    lw = torch.as_tensor(log_weights).detach().double().cpu().numpy()
    if lw.ndim != 1:
        raise ValueError(
            f"log_weights must have shape (S,), one weight per draw, got {tuple(lw.shape)}; "
            "pool chains or particles yourself (e.g. .reshape(-1)) if that is meant"
        )
    return lw


def psis(log_weights: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed, self-normalized log weights and :math:`\hat k` (ArviZ's ``psislw``).

    Args:
        log_weights: shape ``(S,)``, the raw log importance weights.

    Returns:
        ``(smoothed, khat)``: normalized smoothed log weights (log-sum-exp 0), shape
        ``(S,)``, and the Pareto shape. A weight of 0 (``-inf``: a draw the model gives
        density 0) stays 0 and the others are smoothed; NaN or ``+inf`` weights give
        ``khat = inf``; constant weights (an exact guide) ``khat = -inf``, and so do
        weights whose logs spread over at most :data:`FLAT_LOG_WEIGHT_SPREAD` (each
        within 1% of the others, left as they are; from more than 20 draws, enough for
        a tail fit): no tail to fit. A Pareto fit that fails on a tied tail, as weights
        rounded to a few values have (ArviZ then gives NaN smoothed weights, or
        ``khat = inf`` itself), gives ``khat = inf`` and the raw weights.
    """
    lw = _as_weights(log_weights)
    if lw.size < 2:
        raise ValueError(f"log_weights must hold at least 2 draws, got {lw.size}")
    if np.isnan(lw).any() or (lw == math.inf).any():
        finite = np.where(np.isfinite(lw), lw, -np.inf)
        with np.errstate(invalid="ignore"):  # no finite weight at all: NaN, said by k-hat
            finite = finite - np.logaddexp.reduce(finite)
        return finite, math.inf
    zero = lw == -math.inf
    if zero.any():
        out = np.full_like(lw, -math.inf)
        if zero.sum() >= lw.size - 1:  # nothing, or a single draw, to smooth
            out[~zero] = 0.0
            return out, math.inf
        out[~zero], khat = psis(lw[~zero])
        return out, khat
    # constant weights, up to rounding: no tail to fit (ArviZ can report inf); where
    # the draws are too few for a tail fit (the verdict asks for more), exactly constant
    fits = min(0.2 * lw.size, 3 * math.sqrt(lw.size)) > 4
    if np.ptp(lw) <= (FLAT_LOG_WEIGHT_SPREAD if fits else 1e-6):
        return lw - np.logaddexp.reduce(lw), -math.inf
    with warnings.catch_warnings():
        # ArviZ warns when k-hat is large; the Diagnosis verdict says it in words
        warnings.simplefilter("ignore")
        smoothed, khat = _arviz().psislw(lw.copy())
    smoothed = np.asarray(smoothed)
    if not np.isfinite(smoothed).all():  # the fit failed on a tied tail: no smoothing
        return lw - np.logaddexp.reduce(lw), math.inf
    return smoothed, float(khat)


def summarize(log_weights: torch.Tensor | np.ndarray, *, remedy: str | None = None) -> Diagnosis:
    """Turn raw log importance weights (shape ``(S,)``) into a :class:`Diagnosis`.

    ``remedy``: the advice of a "do not trust" verdict for a guide that misses mass (see
    :func:`verdict`); ``None`` for advice that fits any guide.
    """
    return _summarize(log_weights, remedy)[0]


def _raw_ess_fraction(log_weights: np.ndarray) -> np.ndarray:
    r"""The unsmoothed weights' ESS over the number of draws, along the last axis.

    :math:`1 / (S \sum_s \bar w_s^2)` with :math:`\bar w` the self-normalized weights; 0
    where they are not all finite (NaN or ``+inf`` log weights, or none positive).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        shares = np.exp(2 * (log_weights - np.logaddexp.reduce(log_weights, -1, keepdims=True)))
        fraction = 1.0 / shares.sum(-1) / log_weights.shape[-1]
    return np.where(np.isfinite(shares).all(-1), fraction, 0.0)


def _summarize(
    log_weights: torch.Tensor | np.ndarray, remedy: str | None = None
) -> tuple[Diagnosis, np.ndarray]:
    """The :class:`Diagnosis` and the smoothed log weights, from one PSIS fit."""
    lw = _as_weights(log_weights)
    smoothed, khat = psis(lw)
    finite = np.isfinite(smoothed)
    ess = float(1.0 / np.sum(np.exp(2 * smoothed[finite]))) if finite.any() else 0.0
    num = lw.size
    with np.errstate(invalid="ignore", over="ignore"):
        elbo = float(np.mean(lw))
        log_total = np.logaddexp.reduce(lw)
        log_evidence = float(log_total - math.log(num))
    # the raw weights' ESS for the note on flat weights: smoothing would hide one
    # dominant draw (a missed mode), the case the note must never excuse
    raw_ess_fraction = float(_raw_ess_fraction(lw))
    reading = verdict(khat, raw_ess_fraction, smoothed_ess_fraction=ess / num, remedy=remedy)
    zero = int(np.sum(lw == -math.inf))
    positive = num - zero
    if khat == math.inf and not (np.isnan(lw).any() or (lw == math.inf).any()):
        # ArviZ gives inf for finite weights when the tail it fits holds 4 draws or
        # fewer (min(0.2 S, 3 sqrt S): any S <= 20), or when one weight outweighs the
        # rest by more than exp's range
        if positive == 0:
            reading = (
                "do not trust: every draw has weight 0 (the model gives each draw of the "
                "guide density 0)"
            )
        elif min(0.2 * positive, 3 * math.sqrt(positive)) <= 4:
            reading = (
                f"do not trust: k-hat cannot be estimated from {positive} draws of positive "
                "weight (the Pareto fit needs more than 4 draws in the tail); use at least "
                "100 draws"
            )
        elif raw_ess_fraction >= FLAT_ESS_FRACTION:  # no draw outweighs the others
            reading = (
                f"do not trust: k-hat is inf, the Pareto fit failed on weights that barely "
                f"vary (ESS {raw_ess_fraction:.1%} of the draws) and tie in their tail, as "
                "weights rounded to a few values do: score the model and guide in float64 "
                "to read k-hat"
            )
        else:
            reading = (
                "do not trust: k-hat is inf, one draw's weight outweighs all the others "
                "(the guide misses mass the posterior has)"
            )
    if 0 < zero < num:
        if khat <= USABLE_KHAT:
            reading = (
                f"usable with care: k-hat {_khat_text(khat)}, but the raw draws of the guide "
                "include impossible values"
            )
        verb, them = ("has", "it") if zero == 1 else ("have", "them")
        reading += (
            f"; {zero} of the {num} draws {verb} weight 0 (the model gives {them} density 0), "
            "which importance_resample leaves out"
        )
    return Diagnosis(khat, ess, num, elbo, log_evidence, reading), smoothed


def max_plate_nesting(model: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """How many batch dims the model's plates use (0 when it has no vectorized plate)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return _nesting(trace)


def _nesting(trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _subsamples(frame: Any) -> bool:
    """Whether a plate frame of a trace covers only some of its rows (a subsample)."""
    return frame.full_size is not None and frame.full_size != frame.size


def _subsampled_frame(trace) -> Any | None:
    """The first plate frame of a trace's sample sites that subsamples, else ``None``."""
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if _subsamples(frame):
                    return frame
    return None


def _refuse_subsampling(trace, guide_trace=None) -> None:
    """Raise for a model trace whose plates score a mini-batch of their rows.

    With the ``guide_trace`` it was replayed on, a plate the guide holds with other rows
    (Pyro replays the guide's plate indices into the model) is named as the guide's.
    """
    frame = _subsampled_frame(trace)
    if frame is None:
        return
    site = None if guide_trace is None else guide_trace.nodes.get(frame.name)
    if site is not None and site["type"] == "sample" and site_is_subsample(site):
        size, drawn = site["fn"].size, site["fn"].subsample_size
        if size != frame.full_size:
            raise ValueError(
                f"the guide's plate {frame.name!r} has {size} rows, the model's "
                f"{frame.full_size}: a guide built (or trained) on other data, whose plate "
                "Pyro replays into the model; weigh it on the data it was built for, or "
                "build and train a guide for these data"
            )
        if drawn is not None and drawn != size:
            raise ValueError(
                f"the guide subsamples plate {frame.name!r} ({drawn} of {size} rows), and "
                "Pyro replays its rows into the model: importance weights need the full "
                "likelihood; use a guide whose plate takes every row (an autoguide keeps "
                "the subsample_size of the model it was first run with: build one with "
                "subsample_size=None and load the trained parameters into it)"
            )
    if frame is not None:
        raise ValueError(
            f"the model subsamples plate {frame.name!r} ({frame.size} of "
            f"{frame.full_size} rows): importance weights need the full likelihood "
            "(a mini-batch scaled up gives weights that change from call to call); "
            "call it with the full data (e.g. subsample_size=None)"
        )


def _latent_names(model_trace, guide_trace) -> list[str]:
    return [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and name in guide_trace.nodes
        and not site["infer"].get("is_auxiliary")
        and not site_is_subsample(site)  # a plate's index draw, not a latent
    ]


def _undrawn_latents(model_trace, drawn) -> list[str]:
    """The model's latent sites (not a plate's index draw) whose names are not in ``drawn``."""
    return [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and name not in drawn
    ]


def _guide_sites(guide_trace) -> list[str]:
    """The guide's own draws (latent and auxiliary), which fix one joint draw."""
    return [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def importance_draws(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 2000,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Draw from ``guide`` and weigh against ``model``: :math:`\log w_s` and the latents.

    The weights are computed 256 draws at a time when the model broadcasts over a
    particle plate, else one draw at a time. A model can run under the plate and still
    mix the draws up (``z.sum()`` over the draws instead of over the event), so two
    draws are scored again one at a time: when they disagree with the batch, every
    draw is scored one at a time.

    A discrete latent the model enumerates in parallel in training (``config_enumerate``)
    and the guide does not draw is summed out of each weight: :math:`\log w_s = \log
    \sum_c p(x, z_s, c) - \log q(z_s)`, one model run per draw. One the model enumerates
    sequentially is drawn from its prior, which is its proposal: its density cancels
    from the weight. A latent the
    model masks (``obs_mask``'s ``*_unobserved`` site, ``poutine.mask``) but the guide
    draws whole gets a ``UserWarning``: the masked entries have no density in the model
    unless a factor gives them one, and then the weights mean nothing.

    Raises:
        ValueError: if the model subsamples a plate (the weights need the full data),
            if the guide's sites are scaled (``poutine.scale``: a proposal's density is
            not to be tempered), if every draw of the guide is the same point (a
            point mass such as ``AutoDelta`` has no density to weigh), or if a site is
            in only some of the draws (a model whose structure changes from draw to
            draw: :func:`diagnose`, which needs no samples, takes it).

    Returns:
        ``(log_weights, samples)``: shape ``(num_samples,)``, and a dict of each latent
        site's constrained draws with shape ``(num_samples, *site_shape)``.
    """
    return _draws(model, guide, args, kwargs, num_samples, deterministic=False)[:2]


def _draws(
    model,
    guide,
    args,
    kwargs,
    num_samples: int,
    deterministic: bool,
    observed=False,
    stacked=True,
    pointwise_for: str | None = None,
):
    """:func:`importance_draws`, with the model's ``pyro.deterministic`` sites if asked.

    Returns ``(log_w, samples, pointwise)``: with ``observed``, ``pointwise`` is the
    :class:`_Pointwise` log-likelihood of the model's data sites at each draw, else None.
    With ``stacked`` (for callers that use ``samples``), a site that only some draws
    have (a model whose structure changes) is refused; without, it is left out of
    ``samples``. ``pointwise_for`` (a caller's name, with ``observed``): the caller needs
    the pointwise log-likelihoods, so a model with sites to sum out is refused before
    any draw.
    """
    check_positive_int(num_samples, "num_samples")
    with torch.no_grad(), poutine.block():
        whole = model
        model, drawn = _as_proposed(model, guide, args, kwargs)
        first = _one_run(model, guide, args, kwargs)
        derived = _deterministic_names(first) if deterministic else []
        sites = _data_sites(first) if observed else {}
        summed = _summed_sites(first, drawn)
        if summed:
            log_w, samples, pointwise, partial = _summed_draws(
                whole,
                guide,
                args,
                kwargs,
                num_samples,
                (drawn, summed),
                first,
                derived,
                sites,
                pointwise_for,
            )
        else:
            log_w, samples, pointwise, partial = _plain_draws(
                model, guide, args, kwargs, num_samples, first, derived, sites
            )
    fixed = [
        name
        for name, v in samples.items()
        if name not in derived and v[0].numel() and bool((v == v[:1]).all())
    ]
    # a discrete site may well take one value in every draw (a guide's Bernoulli(0.9999)):
    # only a guide that gives that value probability 1 there (a Delta) is a point mass
    discrete = [n for n in fixed if _is_discrete(first.nodes.get(n))]
    if num_samples > 1 and discrete:
        certain = _certain(guide, args, kwargs, discrete)
        fixed = [n for n in fixed if n not in discrete or n in certain]
    if num_samples > 1 and fixed:
        latents = [name for name in samples if name not in derived]
        which = (
            f"every one of the guide's {num_samples} draws is the same point"
            if len(fixed) == len(latents)
            else f"the guide's {num_samples} draws of {', '.join(map(repr, fixed))} are all "
            f"the same value"
        )
        raise ValueError(
            f"{which} (a point mass, such as AutoDelta's MAP estimate): it has no density "
            "to weigh against the posterior, so k-hat, the ESS and the bound on log p(x) "
            "would mean nothing; use a guide with a density (AutoNormal, AutoFlow, ...) "
            "for every latent site"
        )
    if partial and stacked:
        name, count = next(iter(partial.items()))
        how = (
            f"is in {count} of the {num_samples} draws"
            if count < num_samples
            else "changes shape from draw to draw"
        )
        raise ValueError(
            f"the model's structure changes from draw to draw: site {name!r} {how}, so its "
            f"draws make no one array (per site, as samples or ArviZ variables need them); "
            f"diagnose() and loo() need only the weights and take such a model"
        )
    return log_w.detach(), {n: v.detach() for n, v in samples.items()}, pointwise


def _plain_draws(model, guide, args, kwargs, num_samples, first, derived, sites):
    """The weights of a model with nothing to sum out, as :func:`_summed_draws` returns them.

    Under the particle plate where the model broadcasts and keeps the draws apart, else
    one draw at a time. ``model`` is the model under :class:`_Proposed`; ``first`` one run of it.
    """
    nesting = _nesting(first)

    def run(size, shapes):
        return _vectorized_draws(
            model, guide, args, kwargs, size, nesting, first, shapes, derived, sites
        )

    def agrees(part) -> bool:
        # the check's runs may draw (a model wrapped by an autoguide's init_loc_fn draws
        # from the prior before the condition applies): seeded results stay as they were
        with _rng_kept(part[0].device):
            return _batch_agrees(model, guide, args, kwargs, *part, derived)

    try:
        shapes = _guide_shapes(guide, args, kwargs)  # once for all the chunks
        # a few draws first, checked one at a time: a model that mixes the draws up
        # shows it here, before a run of 256 can make (256, 256, n) tensors of it
        trial = min(num_samples, _TRIAL)
        parts = [run(trial, shapes)]
        joined = parts[0]
        batched = agrees(joined)
        if batched and num_samples > trial:
            parts += [run(size, shapes) for size in _chunks(num_samples - trial)]
            joined = _joined(parts)
            batched = agrees(joined)  # the first and the last of them all
    except _OutsideSupport:
        raise
    except _NOT_BROADCAST:
        # the model does not broadcast over a particle plate: one draw at a time
        # (if that fails too, its error is the model's own, and it is raised: the
        # particle-plate error above stays attached as its context)
        log_w, samples, pointwise, partial = _sequential_draws(
            model, guide, args, kwargs, num_samples, derived, sites, first
        )
    else:
        if batched:
            log_w, _, samples, pointwise, _, _ = joined
            partial = {}
        else:
            log_w, samples, pointwise, partial = _sequential_draws(
                model, guide, args, kwargs, num_samples, derived, sites, first
            )
    return log_w, samples, pointwise, partial


def _certain(guide, args, kwargs, names: list[str]) -> set[str]:
    """Those of the guide's sites ``names`` whose value has probability 1 (one guide run).

    To within 1e-5 of its log (a ``Bernoulli(0.9999)``, at -1e-4, is a density).
    """
    with torch.no_grad(), poutine.block(), _rng_kept():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    certain = set()
    for name in names:
        site = trace.nodes.get(name)
        # torch clamps probabilities: Categorical([1, 0, 0]) scores -1.2e-7, not 0
        if site is not None and bool((site["fn"].log_prob(site["value"]) > -1e-5).all()):
            certain.add(name)
    return certain


def _is_discrete(site: dict | None) -> bool:
    """Whether a model's sample site has a discrete support."""
    if site is None or site["type"] != "sample":
        return False
    try:
        return bool(getattr(site["fn"].support, "is_discrete", False))
    except NotImplementedError:  # a distribution that declares no support
        return False


#: what a model that does not run under a particle plate raises (an ``assert`` on a
#: shape included)
_NOT_BROADCAST = (RuntimeError, ValueError, AssertionError, IndexError)


class _Proposed(Messenger):
    """The model as the importance weights of a guide's draws need it.

    A latent the model enumerates in training (``infer={"enumerate": ...}``) and the
    guide does not draw (``drawn``) is drawn from its prior by the model: that is its
    proposal, so its density is masked out of the weight (it would otherwise stay in
    every weight, with no proposal density to cancel it). Those named in ``summed`` are
    left to ``poutine.enum`` to sum out (:func:`_summed_draws`). Other sites are left alone.
    """

    def __init__(self, drawn: frozenset[str], summed: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.drawn = drawn
        self.summed = summed

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        name = msg["name"]
        if msg["infer"].get("enumerate") and name not in self.drawn and name not in self.summed:
            msg["mask"] = False

    def _postprocess_message(self, msg) -> None:
        # with validation on, a guide value outside the site's support is named here,
        # before the model goes on to compute with it (and fails somewhere else)
        if (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and msg["name"] in self.drawn
            and _validates(msg["fn"])
        ):
            _check_support(msg["name"], msg["fn"], msg["value"])


#: the wrappers whose ``log_prob`` is their base's: Pyro's validation is the base's
_WRAPPERS = (torch.distributions.Independent, pyro.distributions.ExpandedDistribution)


def _validates(fn: Any) -> bool:
    """Whether Pyro's ``log_prob`` would check a value's support, as this site's runs.

    It would not under a mask of ``False`` (``.mask(False)``: the density is taken as 0
    unseen), nor where the distribution that scores was built with
    ``validate_args=False`` (behind ``to_event`` and ``expand``, whose own flag is not
    the one that counts).
    """
    while True:
        if isinstance(fn, MaskedDistribution):
            if fn._mask is False:
                return False
        elif not isinstance(fn, _WRAPPERS):
            return bool(getattr(fn, "_validate_args", False))
        fn = fn.base_dist


class _OutsideSupport(ValueError):
    """A guide's draw outside its model site's support (not a broadcasting failure)."""


def _check_support(name: str, fn: Any, value: torch.Tensor) -> None:
    """Raise :class:`_OutsideSupport` if a guide's ``value`` at ``name`` leaves ``fn``'s support."""
    try:
        support = fn.support
    except NotImplementedError:  # a distribution that declares none
        return
    if support is None or constraints.is_dependent(support):
        return  # nothing to check against (Pyro's own validation skips these too)
    inside = support.check(value)
    if bool(inside.all()):
        return
    outside = ~inside
    count, total = int(outside.sum()), outside.numel()
    example = None
    if support.event_dim == 0:  # one number per entry: show the first one outside
        try:
            example = f"{torch.broadcast_to(value, outside.shape)[outside][0].item():.4g}"
        except RuntimeError:  # a value the constraint broadcast in another way
            pass
    if total > 1:
        what = f"{count} of the {total} values checked" + (f", e.g. {example}" if example else "")
    else:
        what = f"the value drawn, {example}" if example else "the value drawn"
    raise _OutsideSupport(
        f"the guide drew site {name!r} outside the model's support ({support}): "
        f"{what}. The model has no density there, so "
        "those draws cannot be weighed (with validation on, the model would fail on them); "
        "give the guide's site the model's support: a distribution on it, or a Normal "
        "mapped through biject_to(support) as Pyro's autoguides do"
    )


def _as_proposed(model, guide, args, kwargs):
    """``model`` under :class:`_Proposed` for ``guide``'s sites (one run of each), and those sites.

    That run first refuses a model that subsamples (see :func:`_refuse_subsampling`),
    then a guide whose sites are scaled: its density is the proposal's, and
    ``poutine.scale`` on model and guide alike (a loss scale for SVI) would flatten every
    weight by that factor. And warns when the model masks entries of a latent that the
    guide draws whole (see :func:`_warn_masked_latents`).
    """
    with _rng_kept():  # the draws to come are as they were
        single = poutine.trace(guide).get_trace(*args, **kwargs)
        drawn = _guide_sites(single)
        proposed = poutine.replay(_Proposed(frozenset(drawn))(model), trace=single)
        model_trace = poutine.trace(proposed).get_trace(*args, **kwargs)
    _refuse_subsampling(model_trace, single)  # named before the guide's sites it scales
    scaled = sorted(n for n in drawn if not _is_one(single.nodes[n]["scale"]))
    if scaled:
        raise ValueError(
            f"the guide's sites {', '.join(map(repr, scaled))} are scaled (poutine.scale, "
            "or a subsampled plate): the weights need the guide's own density; pass the "
            "model and guide unscaled (a scale on both is a loss scale for SVI, which "
            "leaves the posterior as it is)"
        )
    _warn_masked_latents(model_trace, single, drawn)
    drawn = frozenset(drawn)
    return _Proposed(drawn)(model), drawn


def _summed_sites(trace, drawn: frozenset[str]) -> frozenset[str]:
    """The latent sites of a model ``trace`` to sum out of the weights.

    Those the model enumerates in parallel (``config_enumerate``'s default) whose
    distribution can enumerate its support, and which the guide does not draw.
    """
    nodes = trace.nodes
    return frozenset(
        name
        for name in _undrawn_latents(trace, drawn)
        if nodes[name]["infer"].get("enumerate") == "parallel"
        and getattr(nodes[name]["fn"], "has_enumerate_support", False)
    )


def _summed_log_joint(trace) -> torch.Tensor:
    r""":math:`\log \sum_c p(x, z, c)` of a model trace run under ``poutine.enum``.

    Each site's log-density is a factor on the plates it sits in; the enumerated dims
    (those of the trace's symbols that are not plates) are summed out and the plates
    multiplied out by Pyro's contraction, as ``TraceEnum_ELBO`` and ``NUTS`` do.
    """
    trace.compute_log_prob()
    trace.pack_tensors()
    plates = set(trace.plate_to_symbol.values())
    factors: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()
    for _, site in _sampled(trace):
        if site_is_subsample(site):
            continue
        ordinal = frozenset(
            trace.plate_to_symbol[frame.name]
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        )
        factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    return contract_to_tensor(factors, set(trace.symbol_to_dim) - plates)


def _summed_draws(
    model, guide, args, kwargs, num_samples, latents, first, derived, sites, pointwise_for=None
):
    """:func:`_sequential_draws` with the summed sites summed out of each weight.

    ``latents``: ``(drawn, summed)``, the guide's sites and those to sum out. ``model``
    is the model as given; it runs under ``poutine.enum`` left of its plates, once a
    draw. A deterministic site that varies with a summed site (it has the enumerated
    dims) is left out of the samples. With ``sites`` (the data), the pointwise
    log-likelihoods have the summed sites summed out too (:func:`_summed_pointwise`)
    where the model's factors allow it (:func:`_not_pointwise`); where they do not, a
    caller that needs them (``pointwise_for``, its name) is refused before any draw, and
    for others the returned :class:`_Pointwise` holds the sites and says why not.
    """
    drawn, summed = latents
    proposed = _Proposed(drawn, summed)(model)
    enumerated = poutine.enum(proposed, first_available_dim=-1 - _nesting(first))
    why_not = None
    if sites:
        with _rng_kept():  # one run for the model's factors: the draws to come are as they were
            trial = poutine.trace(enumerated).get_trace(*args, **kwargs)
        why_not = _not_pointwise(trial, sites, summed)
        if why_not is not None and pointwise_for is not None:
            raise ValueError(
                f"{pointwise_for}: the model enumerates latent site(s) "
                f"{', '.join(map(repr, sorted(summed)))} that the guide does not draw; the "
                f"weights sum them out, but the pointwise log-likelihood log p(y_i | z) "
                f"cannot have them summed out: {why_not}. Have the guide draw them, or "
                "compare models by another criterion"
            )
    log_w, samples, pointwise, partial = _sequential_draws(
        enumerated,
        guide,
        args,
        kwargs,
        num_samples,
        derived,
        sites if why_not is None else None,
        first,
        _summed_log_joint,
        functools.partial(_summed_pointwise, summed=summed) if why_not is None else None,
    )
    for name in derived:
        shape = first.nodes[name]["value"].shape
        if name in samples and samples[name].shape[1:] != shape:
            del samples[name]
    if sites and why_not is not None:
        pointwise = _Pointwise(
            sites, {}, log_w.new_zeros(num_samples), False, tuple(sorted(summed)), why_not
        )
    elif pointwise is not None:
        pointwise = dataclasses.replace(pointwise, summed=tuple(sorted(summed)))
    return log_w, samples, pointwise, partial


def _enumerated_dims(site: dict, dims: set[int]) -> set[int]:
    """Which of the enumerated ``dims`` a site's log-density varies along."""
    log_prob = site["unscaled_log_prob"]
    return {d for d in dims if -d <= log_prob.dim() and log_prob.shape[d] > 1}


def _plates_of(site: dict) -> frozenset[str]:
    return frozenset(frame.name for frame in site["cond_indep_stack"] if frame.vectorized)


def _summed_groups(trace, sites, summed) -> dict[str, tuple[set[str], set[int]]]:
    """Per data site that varies with a summed site: the sites linked to it, and their dims.

    The sites linked to a data site are those whose densities vary along an enumerated
    dim it varies along, and so on (the summed sites it depends on, the other sites
    that depend on those, ...): the factors a sum over those dims has to take together.
    ``trace``: a run under ``poutine.enum``, its log-densities computed.
    """
    trace.compute_log_prob()
    dims = {trace.nodes[name]["infer"]["_enumerate_dim"] for name in summed}
    varies = {
        name: _enumerated_dims(site, dims)
        for name, site in _sampled(trace)
        if not site_is_subsample(site)
    }
    groups = {}
    for name in sites:
        linked, along = {name}, set(varies.get(name, ()))
        grew = bool(along)
        while grew:
            grew = False
            for other, its in varies.items():
                if other not in linked and its & along:
                    linked.add(other)
                    along |= its
                    grew = True
        if along:
            groups[name] = (linked, along)
    return groups


def _not_pointwise(trace, sites, summed) -> str | None:
    r"""Why the pointwise log-likelihoods cannot have the summed sites summed out, or None.

    They can when :math:`\log \sum_c p(y, z, c)` falls apart into one term per data
    point: every data site that varies with a summed site is linked
    (:func:`_summed_groups`) to no other data site, and to sites that all sit in its
    plates (a summed site local to each point, as a mixture's assignment of each row,
    or a global one that only a single global observation depends on); none of them
    scaled, and none masked but the data site itself (whose masked points are left
    out); and each summed site has an enumerated dim of its own (``pyro.markov`` lets
    sites share one).
    """
    nodes = trace.nodes
    dims: dict[int, str] = {}
    for name in sorted(summed):
        dim = nodes[name]["infer"]["_enumerate_dim"]
        if dim in dims:
            return (
                f"{dims[dim]!r} and {name!r} share an enumerated dim (pyro.markov reuses "
                "them), which this sum does not follow"
            )
        dims[dim] = name
    for name, (linked, _) in _summed_groups(trace, sites, summed).items():
        others = sorted(n for n in linked if n in sites and n != name)
        if others:
            return (
                f"data sites {name!r} and {', '.join(map(repr, others))} depend on the same "
                "summed site, so their points are not apart"
            )
        plates = _plates_of(nodes[name])
        strays = sorted(n for n in linked if _plates_of(nodes[n]) != plates)
        if strays:
            return (
                f"{', '.join(map(repr, strays))} and data site {name!r} are not in the same "
                "plates (a summed site shared by several data points ties them together)"
            )
        scaled = sorted(n for n in linked if not _is_one(nodes[n]["scale"]))
        if scaled:
            return (
                f"{_listed(scaled)} scaled (poutine.scale), and a scaled density's sum over "
                "the summed sites is not that sum scaled; score the model unscaled"
            )
        masked = sorted(n for n in linked if n != name and nodes[n]["mask"] is not None)
        if masked:
            return f"{_listed(masked)} masked (poutine.mask), beside data site {name!r}"
    return None


def _listed(names: list[str]) -> str:
    """``'a' is`` or ``'a', 'b' are``."""
    return f"{', '.join(map(repr, names))} {'is' if len(names) == 1 else 'are'}"


def _summed_pointwise(trace, sites, joint, summed):
    r"""Each data site's :math:`\log p(y_i \mid z)` with the summed sites summed out, and the rest.

    For a data site that varies with no summed site, its own log-density; for one
    that does, with :math:`G` the other sites linked to it (:func:`_summed_groups`;
    :func:`_not_pointwise` has checked they allow it),

    .. math::
        \log p(y_i \mid z) = \log \sum_c p(y_i \mid c, z) \prod_{s \in G} p(s_i \mid \dots)
        - \log \sum_c \prod_{s \in G} p(s_i \mid \dots),

    for a mixture :math:`\log \sum_k \pi_k p(y_i \mid k, z)`; the second term takes out
    what the other linked sites say of :math:`c` (a latent the guide draws whose
    density varies with the assignment: :math:`p(k \mid z_i)`, not :math:`\pi_k`,
    weighs the components). The rest is the summed log joint ``joint`` less the data's
    weighed terms.
    """
    groups = _summed_groups(trace, sites, summed)
    log_lik, rest = {}, joint
    for name, data in sites.items():
        if name in groups:
            linked, along = groups[name]
            along = sorted(along)
            given = sum(trace.nodes[n]["unscaled_log_prob"] for n in linked if n != name)
            terms = torch.logsumexp(
                given + trace.nodes[name]["unscaled_log_prob"], dim=along, keepdim=True
            ) - torch.logsumexp(given, dim=along, keepdim=True)
        else:
            terms = trace.nodes[name]["unscaled_log_prob"]
        # the enumerated dims, summed to size 1, and any plate dims left of the data's
        terms = terms.reshape(terms.shape[terms.dim() - len(data.shape) :])
        log_lik[name] = terms.expand(data.shape)
        weight = data.weight.to(terms.device, terms.dtype)
        rest = rest - torch.where(data.points.to(terms.device), weight * log_lik[name], 0.0).sum()
    return log_lik, rest


def _masked(site: dict) -> bool:
    """Whether a site's density leaves some entries of its value out (a mask anywhere)."""
    fn = site["fn"]
    if _masks_out(site["mask"], fn.batch_shape):
        return True
    while fn is not None:
        if isinstance(fn, MaskedDistribution) and _masks_out(fn._mask, fn.base_dist.batch_shape):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _masks_out(mask: object, batch_shape: torch.Size) -> bool:
    """Whether ``mask`` is False at every place some entry of a ``batch_shape`` value is.

    A mask broadcast up over a site (a global latent inside ``poutine.mask`` over the
    data points) weighs its density, but leaves none of its entries out.
    """
    if mask is None or mask is True:
        return False
    if mask is False:
        return True
    m = torch.as_tensor(mask, dtype=torch.bool)
    extra = m.dim() - len(batch_shape)
    if extra > 0:
        m = m.reshape(-1, *m.shape[extra:]).any(0)
    offset = len(batch_shape) - m.dim()
    for i in range(m.dim()):
        if batch_shape[offset + i] == 1 and m.shape[i] > 1:
            m = m.any(i, keepdim=True)
    return not bool(m.all())


def _warn_masked_latents(model_trace, guide_trace, drawn) -> None:
    """Warn when the model masks entries of a latent that the guide draws and scores whole.

    Those entries have no density in the model (``obs_mask``'s ``*_unobserved`` site at
    the observed entries, ``poutine.mask``) unless a factor elsewhere gives them one (a
    flat prior made by ``.mask(False)`` and a ``pyro.factor``), while the guide's density
    counts them: for the former the posterior there is flat, and the weights mean
    nothing.
    """
    names = [
        n
        for n in drawn
        if n in model_trace.nodes
        and model_trace.nodes[n]["type"] == "sample"
        and not model_trace.nodes[n]["is_observed"]
        and _masked(model_trace.nodes[n])
        and not _masked(guide_trace.nodes[n])
    ]
    if names:
        warn_from_caller(
            f"the model masks entries of the latent site(s) {', '.join(map(repr, names))} "
            "(obs_mask, poutine.mask) that the guide draws and scores whole: unless a "
            "factor elsewhere gives those entries a density (a .mask(False) prior with a "
            "pyro.factor), the posterior is flat there and the weights (k-hat, ESS, the "
            "bound on log p(x)) mean nothing; mask the guide's site the same way (for "
            "obs_mask, poutine.mask(mask=~obs_mask) around the guide's *_unobserved site)"
        )


def _is_one(scale: object) -> bool:
    if isinstance(scale, torch.Tensor):
        return bool((scale == 1).all())
    return scale == 1


#: draws of the first run under the particle plate, checked one at a time before any
#: other run: a model that mixes the draws up can need S x S x n memory in a run of S
_TRIAL = 3

#: draws scored in one run under the particle plate: a model's intermediates grow with
#: the draws (a GP's kernel matrices, S x n x n), so 2000 draws in one run can need
#: gigabytes that 256 at a time do not
_CHUNK = 256

#: draws of a guide in one run under the particle plate when the model is run a draw
#: at a time: a guide's intermediates grow as S x its width (at D = 1000, 10,000 draws of
#: the default AutoFlow peaked at 317 MB in one run); each run masks the MADEs' weights
#: anew (0.25 s a run at that size), so the runs are larger than the model's
_GUIDE_CHUNK = 1024


def _chunks(num_samples: int, chunk: int | None = None) -> list[int]:
    """Sizes of the runs under the particle plate that make up ``num_samples`` draws.

    At most ``chunk`` (default ``_CHUNK``) each and as equal as can be: a run of one draw
    could not show a model that mixes the draws up to the batch check, which reads the
    last draw.
    """
    count = -(-num_samples // (chunk or _CHUNK))
    size, extra = divmod(num_samples, count)
    return [size + 1] * extra + [size] * (count - extra)


def _vectorized_draws(
    model, guide, args, kwargs, num_samples, nesting, first, shapes, derived, sites
):
    """One run of model and guide under a particle plate of ``num_samples`` draws.

    ``shapes``: :func:`_guide_shapes`. Returns ``(log_w, draws, samples, pointwise,
    log_q)`` (see :func:`_batch_agrees`); raises ``RuntimeError`` or ``ValueError`` when
    the model does not broadcast.
    """
    log_w, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, **kwargs
    )
    log_w = log_w.reshape(num_samples)
    log_q = _vectorized_log_q(guide, guide_trace, num_samples)
    draws = _guide_draws(guide_trace, shapes, num_samples, nesting)
    samples = {n: draws[n] for n in _latent_names(model_trace, guide_trace)}
    for n in derived:
        value = _stacked(model_trace.nodes[n]["value"], first.nodes[n]["value"].shape, num_samples)
        if value is None:  # not one value per draw: the draws are mixed up
            raise ValueError(f"deterministic site {n!r} does not broadcast")
        samples[n] = value
    pointwise = _vectorized_pointwise(model_trace, guide_trace, sites, num_samples, nesting)
    return log_w, draws, samples, pointwise, log_q, _site_sums(model_trace, num_samples)


def _site_sums(trace, num_samples: int) -> dict[str, torch.Tensor]:
    """Each sample site's log-density summed over all but the particle plate, ``(S,)``.

    A site without the particle dim (a ``pyro.factor`` of a sum over every draw, say)
    gets its one total for every draw: what the batch's weights counted.
    """
    if num_samples == 1:
        trace.log_prob_sum()  # sets each site's log_prob_sum (memoized)
        return {n: torch.as_tensor(site["log_prob_sum"]).reshape(1) for n, site in _sampled(trace)}
    particles = trace.plate_to_symbol["num_particles_vectorized"]
    sums = {}
    for name, site in _sampled(trace):
        packed = site["packed"]["log_prob"]
        if particles in packed._pyro_dims:
            sums[name] = torch.einsum(f"{packed._pyro_dims}->{particles}", [packed])
        else:
            sums[name] = packed.sum().expand(num_samples)
    return sums


def _sampled(trace):
    """``(name, site)`` of the sample sites, whose log-densities a weight sums."""
    return [(n, site) for n, site in trace.nodes.items() if site["type"] == "sample"]


def _joined(parts: list[tuple]):
    """The results of :func:`_vectorized_draws` runs, joined along the draws."""
    if len(parts) == 1:
        return parts[0]

    def cat(dicts: list[dict]) -> dict:
        return {n: torch.cat([d[n] for d in dicts]) for n in dicts[0]}

    log_ws, draws, samples, pointwises, log_qs, site_sums = zip(*parts, strict=True)
    pointwise = None
    if pointwises[0] is not None:
        first = pointwises[0]
        log_lik = cat([p.log_lik for p in pointwises])
        rest = torch.cat([p.rest for p in pointwises])
        pointwise = _Pointwise(first.sites, log_lik, rest, first.vectorized)
    log_q = None if log_qs[0] is None else torch.cat(log_qs)
    return torch.cat(log_ws), cat(draws), cat(samples), pointwise, log_q, cat(site_sums)


@dataclass(frozen=True)
class _DataSite:
    """An observed data site of a model, read from one run of it.

    ``shape`` is the shape of its pointwise log-likelihood (the site's batch shape);
    ``weight`` (that shape) the factor the model puts on each point's log-density, its
    scale times its mask; ``points`` (bool, that shape) the data points: weight not 0.
    ``value`` is the observed value, broadcast to ``shape + event_shape``;
    ``unscaled_shape`` the shape of the site's own log-density (``shape`` or less, when
    a mask or scale broadcasts it up).
    """

    shape: torch.Size
    weight: torch.Tensor
    points: torch.Tensor
    value: torch.Tensor
    unscaled_shape: torch.Size
    #: whether a draw of the site has the data's event shape (not so when the data
    #: broadcast a smaller event: one draw would be copied across the data's entries)
    replicable: bool = True


@dataclass(frozen=True)
class _Pointwise:
    r"""Pointwise log-likelihoods of a model's data sites at ``S`` draws.

    ``log_lik[name]``: :math:`\log p(y_i \mid z_s)` unscaled and unmasked, shape
    ``(S, *shape)``. ``rest``: shape ``(S,)``, the log weight without any data site,
    :math:`\log p(z_s) - \log q(z_s)` plus factor sites; summed from the sites, so it
    stays finite where a data point of density 0 makes the log weight :math:`-\infty`.
    ``vectorized``: whether the model ran under the particle plate (and was checked to
    keep the draws apart), else one draw at a time.
    """

    sites: dict[str, _DataSite]
    log_lik: dict[str, torch.Tensor]
    rest: torch.Tensor
    vectorized: bool
    #: latent sites summed out of the weights (:func:`_summed_draws`)
    summed: tuple[str, ...] = ()
    #: why the pointwise log-likelihoods could not have the ``summed`` sites summed out
    #: (:func:`_not_pointwise`): then ``log_lik`` is empty, and ``rest`` not computed
    #: (zeros)
    why_not: str | None = None


def _is_data(site: dict) -> bool:
    """Whether a trace's site is observed data (not ``pyro.deterministic`` or ``pyro.factor``).

    Nor a site that ``poutine.reparam`` made of a latent (:func:`_is_derived`).
    """
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not _is_derived(site)
        and not site["infer"].get("is_auxiliary")  # pyro.factor
        and not site_is_subsample(site)
    )


def _is_derived(site: dict) -> bool:
    """Whether a trace's site is a value computed from the latents, not data.

    A ``pyro.deterministic`` site, or a latent that ``poutine.reparam`` replaced by a
    function of new latents (``LocScaleReparam``, ``TransformReparam``, ...): Pyro makes
    both an observed ``Delta`` masked out, ``Delta(value).mask(False)``, which scores 0.
    """
    if site["type"] != "sample" or not site["is_observed"]:
        return False
    if site["infer"].get("_deterministic"):
        return True
    fn = site["fn"]
    return (
        isinstance(fn, MaskedDistribution)
        and fn._mask is False
        and isinstance(fn.base_dist, pyro.distributions.Delta)
    )


def _data_sites(trace) -> dict[str, _DataSite]:
    """The model's observed data sites (not ``pyro.deterministic`` or ``pyro.factor``)."""
    trace.compute_log_prob()
    out = {}
    for name, site in trace.nodes.items():
        if not _is_data(site):
            continue
        shape = site["log_prob"].shape  # the unscaled one, broadcast with scale and mask
        log_prob = site["log_prob"]
        weight = torch.as_tensor(site["scale"], dtype=log_prob.dtype, device=log_prob.device)
        for mask in (site["mask"], *_distribution_masks(site["fn"])):
            if mask is not None:
                weight = weight * torch.as_tensor(mask, device=weight.device)
        weight = weight.expand(shape)
        # the data as they broadcast with the density's shape (an event of 1 taking a
        # data row of 3, say: a Gamma of shape (N, 1) scoring (N, 3) data)
        event = site["fn"].event_shape
        full = torch.broadcast_shapes(site["value"].shape, shape + event)
        value = site["value"].expand(full)
        unscaled = site["unscaled_log_prob"].shape
        replicable = full[len(full) - len(event) :] == event
        out[name] = _DataSite(shape, weight, weight != 0, value, unscaled, replicable)
    return out


def _distribution_masks(fn: Any) -> list[object]:
    """The masks of the ``MaskedDistribution`` wrappers of ``fn`` (``d.mask(m)``).

    A data point so masked scores 0, as one inside ``poutine.mask`` does: both are left
    out of the data points. A mask inside a wrapper that makes batch dims event dims
    (``d.mask(m).to_event(1)``) is over the entries of a point: the point is left out
    when all of its entries are masked (``any`` over those dims), each mask then of
    ``fn``'s batch shape, or a bool.
    """
    masks = []
    points = len(fn.batch_shape)
    while fn is not None:
        if isinstance(fn, MaskedDistribution):
            mask = fn._mask
            if isinstance(mask, torch.Tensor):
                mask = mask.expand(fn.base_dist.batch_shape) if mask.dim() else mask
                while mask.dim() > points:  # a point's entries, made event dims outside
                    mask = mask.any(-1)
            masks.append(mask)
        fn = getattr(fn, "base_dist", None)
    return masks


def _broadcast_draws(value: torch.Tensor, num_samples: int, shape: torch.Size) -> torch.Tensor:
    """``(S, *part)`` with ``part`` broadcastable to ``shape``, as ``(S, *shape)``."""
    missing = len(shape) - (value.dim() - 1)
    value = value.reshape((num_samples,) + (1,) * missing + value.shape[1:])
    return value.expand((num_samples, *shape))


def _vectorized_pointwise(model_trace, guide_trace, sites, num_samples, nesting):
    """:class:`_Pointwise` from the traces of a run under the particle plate."""
    if not sites:
        return None
    log_lik = {}
    for name, data in sites.items():
        unscaled = model_trace.nodes[name]["unscaled_log_prob"]
        per_draw = _per_draw(unscaled, 0, data.unscaled_shape, num_samples, nesting)
        log_lik[name] = _broadcast_draws(per_draw, num_samples, data.shape)

    def sums(trace, skip=()):
        total = 0.0
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and name not in skip and not site_is_subsample(site):
                lp = site["log_prob"]
                dim = lp.dim() - (nesting + 1)
                if dim < 0 or lp.shape[dim] != num_samples:  # the same for every draw
                    total = total + lp.sum().expand(num_samples)
                else:
                    total = total + lp.movedim(dim, 0).reshape(num_samples, -1).sum(-1)
        return total

    rest = sums(model_trace, skip=sites) - sums(guide_trace)
    return _Pointwise(sites, log_lik, torch.as_tensor(rest).expand(num_samples), True)


def _deterministic_names(trace) -> list[str]:
    """The model's ``pyro.deterministic`` and reparametrized sites, in the order it makes them."""
    return [name for name, site in trace.nodes.items() if _is_derived(site)]


def _stacked(value: torch.Tensor, shape: torch.Size, num_samples: int) -> torch.Tensor | None:
    """A deterministic site's value under the particle plate as ``(S, *shape)``, or None.

    Its leading dim is the particle plate's (``S`` draws) when it depends on the draws;
    a value that does not is the same for every draw.
    """
    size = math.prod(shape)
    if value.numel() == size:
        return value.reshape(shape).expand((num_samples, *shape))
    if value.dim() and value.shape[0] == num_samples and value.numel() == num_samples * size:
        return value.reshape((num_samples, *shape))
    return None


def _particles(site: dict, shape: torch.Size, num_samples: int, nesting: int) -> torch.Tensor:
    """A site's draws under the particle plate, as ``(num_samples, *shape)``."""
    return _per_draw(site["value"], site["fn"].event_dim, shape, num_samples, nesting)


def _per_draw(
    value: torch.Tensor, event_dim: int, shape: torch.Size, num_samples: int, nesting: int
) -> torch.Tensor:
    """A tensor computed under the particle plate, as ``(num_samples, *shape)``.

    The particle plate is batch dim ``-(nesting + 1)`` (left of the ``event_dim``
    rightmost dims); the plates of the model it encloses keep their places after it.
    """
    dim = value.dim() - event_dim - (nesting + 1)
    if dim < 0 or value.shape[dim] != num_samples:  # broadcast along the plate: repeat
        return value.reshape((1, *shape)).expand((num_samples, *shape))
    return value.movedim(dim, 0).reshape((num_samples, *shape))


_GAUSSIAN_AND_IAF_GUIDES = (
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
    AutoIAFNormal,
)


def _vectorized_log_q(guide, guide_trace, num_samples: int) -> torch.Tensor | None:
    r"""The batch's :math:`\log q(z_s)` per draw, for guides whose batch needs no check.

    Scoring a draw of an IAF-form guide again inverts its flow in ``D`` network passes
    a layer (minutes for ``D`` in the thousands). For guides known to batch their draws
    as a distribution does (see :func:`_batches_like_a_distribution`) the batch's
    ``log q`` is taken as it is and only the model's side is checked. Other guides:
    ``None`` (both sides are checked).
    """
    if not _batches_like_a_distribution(guide):
        return None
    if num_samples == 1:
        return guide_trace.log_prob_sum().reshape(1)
    particles = guide_trace.plate_to_symbol["num_particles_vectorized"]
    return plate_log_prob_sum(guide_trace, particles).reshape(num_samples)


def _batches_like_a_distribution(guide) -> bool:
    """Whether ``guide`` is one whose draws under a particle plate are scored one by one.

    Exactly Pyro's Gaussian and IAF autoguides, and an :class:`AutoFlow` made of this
    library's layers: each draws one packed vector from one distribution, and every
    transform in it maps each draw on its own. A subclass, or a flow holding another
    transform (which may mix the draws of a batch), gets the full check.
    """
    from pyroflows.infer.autoflow import AutoFlow  # autoflow.py builds on this module

    if type(guide) in _GAUSSIAN_AND_IAF_GUIDES:
        return True
    if type(guide) is not AutoFlow:
        return False
    return all(type(t).__module__.startswith("pyroflows.") for t in guide._transforms())


def _single_log_weight(model, guide, args, kwargs, values: dict[str, torch.Tensor], log_q=None):
    r""":math:`\log p(x, z) - \log q(z)` of one draw, the guide's sites set to ``values``.

    With ``log_q`` (that draw's :math:`\log q`, from the batch) the guide is not run.
    """
    # conditioned sites count in log_prob_sum as observed ones do (the model ignores the
    # guide's auxiliary sites)
    if log_q is None:
        traced = poutine.trace(poutine.condition(guide, data=values))
        log_q = traced.get_trace(*args, **kwargs).log_prob_sum()
    model_trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    return model_trace.log_prob_sum() - log_q, model_trace


def _batch_agrees(
    model, guide, args, kwargs, log_w, draws, samples, pointwise, log_q, site_sums, derived
) -> bool:
    """Whether the first and last draws, scored one at a time, match the batch's weights.

    And each model site's log-density (``site_sums``, see :func:`_site_sums`: a weight
    of thousands of nats may not hide a site that is off by a few), the ``derived``
    (deterministic) sites' values and the ``pointwise`` log-likelihoods. The first is
    scored twice: when the two differ, the model draws latent values the guide does not
    set, and a ``UserWarning`` says so. With ``log_q`` (the batch's per-draw guide
    density, see :func:`_vectorized_log_q`; ``None``: run the guide too) only the model
    is run one draw at a time.
    """
    for s in sorted({0, len(log_w) - 1}):
        values = {name: value[s] for name, value in draws.items()}
        q_s = None if log_q is None else log_q[s]
        try:
            single, trace = _single_log_weight(model, guide, args, kwargs, values, q_s)
            if s == 0:
                again, _ = _single_log_weight(model, guide, args, kwargs, values, q_s)
        except _OutsideSupport:
            raise
        except _NOT_BROADCAST:
            return False
        if s == 0 and not torch.isclose(single, again, rtol=1e-6, atol=1e-6, equal_nan=True):
            undrawn = _undrawn_latents(trace, values)
            which = f" ({', '.join(map(repr, undrawn))})" if undrawn else ""
            warn_from_caller(
                "the model's log density at one draw of the guide changes from run to run: "
                f"it draws latent sites the guide does not set{which}, from their prior, so "
                "every weight carries their noise (a valid weight, but a noisier one). "
                "Observed data left out of the arguments (a site given None) is drawn so: "
                "pass it. For sites hidden with poutine.block for another guide, diagnose "
                "the guide that covers every latent site (the AutoGuideList); discrete "
                "ones the model enumerates in parallel (config_enumerate) are summed out "
                "when they are visible to the diagnostics (not hidden by poutine.block)"
            )
            return False
        pairs = [(trace.nodes[name]["value"], samples[name][s]) for name in derived]
        if pointwise is not None:
            trace.compute_log_prob()
            pairs += [
                (trace.nodes[n]["unscaled_log_prob"].expand(d.shape), pointwise.log_lik[n][s])
                for n, d in pointwise.sites.items()
            ]
        for one, batch in pairs:
            if one.shape != batch.shape or not torch.allclose(
                one, batch, rtol=1e-4, atol=1e-6, equal_nan=True
            ):
                return False
        magnitude = 0.0  # of the terms the weight sums, which set its rounding
        for name, sums in site_sums.items():
            node = trace.nodes.get(name)
            if node is None or node["type"] != "sample":
                return False
            if not _sums_close(torch.as_tensor(node["log_prob_sum"]), sums[s]):
                return False
            magnitude += abs(float(sums[s])) if torch.isfinite(sums[s]) else 0.0
        if not _sums_close(single, log_w[s], magnitude):
            return False
    return True


def _sums_close(single: torch.Tensor, batch: torch.Tensor, magnitude: float = 0.0) -> bool:
    """Whether a log-density summed one draw at a time matches the batch's sum.

    ``magnitude``: the size of the terms summed, when larger than the sum itself (a
    weight is a difference of two log-densities).
    """
    if not torch.isfinite(single) and not torch.isfinite(batch):
        return bool(single == batch) or bool(single.isnan() and batch.isnan())
    # sums of many terms in another order differ in the last digits: in float32 about
    # 1e-6 of their size (pairwise sums of 10^5 terms); a model that mixes the draws up
    # is off by whole terms. 1e-3 let 22 nats of mixing pass in a sum of 28,000
    relative = 1e-6 if single.dtype == torch.float64 else 2e-5
    tolerance = relative * (1.0 + max(abs(single.item()), magnitude))
    return abs(single.item() - batch.item()) <= tolerance


def _one_run(model, guide, args, kwargs):
    """A trace of one run of ``model``, for its sites and their shapes.

    Its latents drawn from their priors or, where a prior cannot be drawn (Pyro's
    ``ImproperUniform``: ``NotImplementedError``), set to a draw of ``guide``, taken with
    torch's generators forked (the draws to come are as they would be without it).
    """
    try:
        return poutine.trace(model).get_trace(*args, **kwargs)
    except NotImplementedError:
        with _rng_kept():
            single = poutine.trace(guide).get_trace(*args, **kwargs)
            return poutine.trace(poutine.replay(model, trace=single)).get_trace(*args, **kwargs)


def _rng_kept(device: torch.device | None = None):
    """Fork torch's generators: the CPU's, and ``device``'s if it is a CUDA device.

    Without ``device``, every CUDA device's once CUDA is in use.
    """
    if device is None:
        initialized = torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if initialized else []
    else:
        devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _sequential_draws(
    model,
    guide,
    args,
    kwargs,
    num_samples,
    derived=(),
    sites=None,
    first=None,
    log_joint=None,
    pointwise_of=None,
):
    r"""One model run per draw, for models that do not broadcast.

    ``log_joint`` (a model trace -> :math:`\log p(x, z)`) defaults to the trace's
    ``log_prob_sum``; ``pointwise_of`` (a model trace, ``sites`` and that log joint ->
    each data site's unscaled pointwise log-density and the log joint less the data's
    weighed terms) defaults to the sites' own log-densities and the other sites' sum.

    The guide runs once per draw too, unless it batches its draws as a distribution does
    (:func:`_batches_like_a_distribution`) and ``first`` (a trace of the model) is given:
    then one run under a particle plate left of the model's plates draws them all, with
    each draw's :math:`\log q`, and only the model runs once per draw, its latent sites
    conditioned on the draw (AutoFlow's set-up on a 3-parameter model: 0.45 s, not 2.1).
    """
    sites = sites or {}
    runs = None
    if first is not None and _batches_like_a_distribution(guide):
        runs = _runs_on_a_guide_batch(model, guide, args, kwargs, num_samples, first)
    if runs is None:
        runs = _runs_with_the_guide(model, guide, args, kwargs, num_samples)
    log_ws, draws, liks, rests = [], [], [], []
    for model_trace, log_q, latents in runs:
        if sites:  # pointwise too: log_prob_sum then sums these, not the sites again
            model_trace.compute_log_prob()
        joint = model_trace.log_prob_sum() if log_joint is None else log_joint(model_trace)
        log_ws.append(joint - log_q)
        draw = dict(latents)
        draw.update((n, model_trace.nodes[n]["value"]) for n in derived)
        draws.append(draw)
        if sites:
            nodes = model_trace.nodes
            # (the latents count as observed where the model runs conditioned on them)
            here = {n for n, site in nodes.items() if _is_data(site) and n not in draw}
            if here != set(sites):
                changed = ", ".join(map(repr, sorted(here.symmetric_difference(sites))))
                raise ValueError(
                    f"the model's data sites change from draw to draw ({changed} in some "
                    "draws only): leave-one-out needs the same data points at every draw; "
                    "diagnose() takes such a model"
                )
            if pointwise_of is None:
                lik = {n: nodes[n]["unscaled_log_prob"].expand(d.shape) for n, d in sites.items()}
                rest = model_trace.log_prob_sum(lambda name, _: name not in sites)
            else:
                lik, rest = pointwise_of(model_trace, sites, joint)
            liks.append(lik)
            rests.append(torch.as_tensor(rest - log_q))
    # a model whose structure changes from draw to draw has sites in some draws only:
    # their weights are as valid as any, but those sites' draws make no one array
    counts: dict[str, int] = {}
    shapes: dict[str, set[torch.Size]] = {}
    for draw in draws:
        for n, v in draw.items():
            counts[n] = counts.get(n, 0) + 1
            shapes.setdefault(n, set()).add(v.shape)
    # a site of several shapes (its size drawn too) makes no one array either
    partial = {n: c for n, c in counts.items() if c < len(draws) or len(shapes[n]) > 1}
    samples = {n: torch.stack([d[n] for d in draws]) for n in counts if n not in partial}
    pointwise = None
    if sites:
        log_lik = {n: torch.stack([lik[n] for lik in liks]) for n in sites}
        pointwise = _Pointwise(sites, log_lik, torch.stack(rests), False)
    return torch.stack(log_ws), samples, pointwise, partial


def _runs_with_the_guide(model, guide, args, kwargs, num_samples):
    """Per draw, a guide run and the model replayed on it: ``(model trace, log q, latents)``."""
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        names = _latent_names(model_trace, guide_trace)
        yield (
            model_trace,
            guide_trace.log_prob_sum(),
            {n: guide_trace.nodes[n]["value"] for n in names},
        )


def _runs_on_a_guide_batch(model, guide, args, kwargs, num_samples, first):
    """:func:`_runs_with_the_guide`'s runs from guide runs for all draws, or ``None``.

    The guide draws in runs of at most ``_GUIDE_CHUNK`` draws under a particle plate (so
    that 10,000 draws of a 1,000-dimensional guide do not hold every network activation
    at once), the first made here to see whether the guide runs under the plate at all.
    The model runs once a draw, its latent sites (those of ``first``, a trace of the
    model, that the guide draws) conditioned on the draw; observed sites keep their data.
    """
    nesting = _nesting(first)
    shapes = _guide_shapes(guide, args, kwargs)
    sizes = _chunks(num_samples, _GUIDE_CHUNK)
    batch = _guide_batch(guide, args, kwargs, sizes[0], nesting, shapes)
    if batch is None:
        return None
    observed = {n for n, site in first.nodes.items() if site.get("is_observed")}

    def runs():
        names = None
        chunk = batch
        for k, size in enumerate(sizes):
            if k:
                chunk = _guide_batch(guide, args, kwargs, size, nesting, shapes)
                if chunk is None:
                    raise RuntimeError(
                        f"the guide ran under a particle plate of {sizes[0]} draws but not "
                        f"of {size}: its draws cannot be scored in batches"
                    )
            draws, log_q = chunk
            draws = {n: value for n, value in draws.items() if n not in observed}
            for s in range(size):
                draw = {n: value[s] for n, value in draws.items()}
                traced = poutine.trace(poutine.condition(model, data=draw))
                model_trace = traced.get_trace(*args, **kwargs)
                if names is None:  # conditioning made them observed: the guide's, in the model
                    names = [
                        n
                        for n, site in model_trace.nodes.items()
                        if site["type"] == "sample" and n in draws and not site_is_subsample(site)
                    ]
                yield model_trace, log_q[s], {n: draw[n] for n in names}

    return runs()


def _guide_shapes(guide, args, kwargs) -> dict[str, torch.Size]:
    """The shape of each of the guide's sample sites in one run (no particle plate)."""
    single = poutine.trace(guide).get_trace(*args, **kwargs)
    return {n: single.nodes[n]["value"].shape for n in _guide_sites(single)}


def _guide_draws(guide_trace, shapes, num_samples: int, nesting: int) -> dict:
    """Each guide site's draws from a run under the particle plate, ``(S, *site_shape)``."""
    return {
        n: _particles(guide_trace.nodes[n], shapes[n], num_samples, nesting)
        for n in _guide_sites(guide_trace)
    }


def _guide_batch(guide, args, kwargs, num_samples: int, nesting: int, shapes: dict):
    r"""A guide's draws from one run under a particle plate: ``(draws, log_q)``.

    ``draws`` maps each of the guide's sample sites (auxiliary ones too) to its values,
    ``(num_samples, *site_shape)``; ``log_q`` is each draw's :math:`\log q`, shape
    ``(num_samples,)``; ``shapes``: :func:`_guide_shapes`. ``None`` when the guide does
    not run under the plate.
    """
    particles = pyro.plate("num_particles_vectorized", num_samples, dim=-(nesting + 1))
    try:
        with particles:
            guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        guide_trace.compute_log_prob()
    except _NOT_BROADCAST:  # the guide does not run under the plate
        return None
    # the plates' index draws (the guide enters the model's plates) are not the guide's
    # draws, and their log-density (a 0) has no particle dim
    guide_trace = prune_subsample_sites(guide_trace)
    guide_trace.pack_tensors()
    log_q = _vectorized_log_q(guide, guide_trace, num_samples)
    return _guide_draws(guide_trace, shapes, num_samples, nesting), log_q


def diagnose(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 2000,
    **kwargs: Any,
) -> Diagnosis:
    r"""PSIS :math:`\hat k`, ESS and a verdict for any Pyro guide of ``model``.

    Args:
        model: the Pyro model.
        guide: a trained guide of it (an autoguide or a hand-written one).
        *args: the model's arguments.
        num_samples: guide draws ``S`` (:math:`\hat k` needs a few hundred at least).
        **kwargs: the model's keyword arguments.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> diagnose(model, guide, num_samples=500).khat < 0.5
        True
    """
    check_positive_int(num_samples, "num_samples", minimum=2)
    log_w = _draws(model, guide, args, kwargs, num_samples, deterministic=False, stacked=False)[0]
    return summarize(log_w, remedy=remedy_for(guide))


def importance_resample(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    num_proposals: int | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    r"""Posterior draws corrected by PSIS: resample guide draws by their smoothed weights.

    Draws ``num_proposals`` (default ``10 * num_samples``) from the guide, smooths the
    weights with PSIS and resamples ``num_samples`` of them with replacement, with
    probability :math:`\tilde w_s`. When :math:`\hat k \le 0.7` these draws are closer to
    the posterior than the guide's own; above, a ``UserWarning`` says that they are not.

    Raises:
        ValueError: ``num_proposals`` below ``num_samples``; a proposal whose log weight
            is NaN or :math:`+\infty` (it cannot be normalized against the others); no
            proposal of positive weight.

    Returns:
        A dict of each latent site's draws, and of each ``pyro.deterministic`` site's
        values at them, shape ``(num_samples, *site_shape)``.
    """
    check_positive_int(num_samples, "num_samples")
    num_proposals = 10 * num_samples if num_proposals is None else num_proposals
    check_positive_int(num_proposals, "num_proposals", minimum=2)
    if num_proposals < num_samples:
        raise ValueError(
            f"num_proposals must be at least num_samples ({num_samples}), got {num_proposals}: "
            "fewer proposals than draws would make every draw repeat one (the default, "
            "10 * num_samples, leaves room for the weights to choose)"
        )
    log_w, draws, _ = _draws(model, guide, args, kwargs, num_proposals, deterministic=True)
    lw = _as_weights(log_w)
    broken = np.flatnonzero(np.isnan(lw) | (lw == math.inf))
    if broken.size:
        raise ValueError(
            f"importance_resample: {broken.size} of the {num_proposals} proposals (the first "
            f"is proposal {broken[0]}) have a log weight of +inf or NaN: the model's or the "
            "guide's log density is not finite there, so the weights cannot be normalized "
            "and no resample would be right; check the model at those draws"
        )
    report, smoothed = _summarize(lw)
    weights = np.exp(smoothed)
    if not np.nan_to_num(weights).sum() > 0:
        raise ValueError(
            f"importance_resample: none of the {num_proposals} proposals has a positive "
            "finite weight (the model gives every draw of the guide density 0, or the "
            "weights are not finite): there is nothing to resample"
        )
    if not report.khat <= USABLE_KHAT and report.ess >= FLAT_ESS_FRACTION * report.num_samples:
        warn_from_caller(  # no draw dominates: the large k-hat is of a narrow tail
            f"importance_resample: k-hat {_khat_text(report.khat)} > {USABLE_KHAT}, though "
            f"the weights barely vary (ESS {report.ess:.0f} of {report.num_samples} "
            "proposals): the resampled draws are about the guide's own; diagnose() says "
            "what the k-hat may mean"
        )
    elif not report.khat <= USABLE_KHAT:
        warn_from_caller(
            f"importance_resample: k-hat {_khat_text(report.khat)} > {USABLE_KHAT} (ESS "
            f"{report.ess:.0f} of {report.num_samples} proposals): the resampled draws repeat "
            "a few proposals and do not represent the posterior; improve the guide first"
        )
    probs = torch.as_tensor(weights)
    index = torch.multinomial(probs, num_samples, replacement=True)
    return {name: value[index.to(value.device)] for name, value in draws.items()}


def to_arviz(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 4000,
    log_likelihood: bool = True,
    posterior_predictive: bool = True,
    **kwargs: Any,
):
    r"""Guide draws as an ArviZ ``InferenceData``, with their log importance weights.

    The ``posterior`` group has one variable per latent site, in its constrained space
    and original shape, and one per ``pyro.deterministic`` site (as ArviZ's
    ``from_pyro`` has them), with dims ``(chain, draw, ...)`` = ``(1, num_samples, ...)``.
    ``sample_stats`` holds ``log_importance_weight`` (raw) and ``psis_log_weight``
    (smoothed, normalized), and the group's attributes hold ``khat`` and ``ess``, so
    ``az.summary(idata)`` and ``az.plot_posterior(idata)`` work on it as on MCMC output.

    With ``log_likelihood`` (the default), the ``log_likelihood`` group holds each
    observed site's pointwise log-density :math:`\log p(y_i \mid z_s)` at each draw,
    shape ``(1, num_samples, *batch_shape)``: one point per element of the site's plates
    (a site's event dims make one point), unscaled, as ArviZ's ``from_pyro`` writes it;
    points the model masks out (``poutine.mask``, ``obs_mask``, a
    distribution's ``.mask(m)``) or scales by 0 are NaN.
    ``observed_data`` holds the observed values (broadcast to the points). ``az.loo``
    and ``az.waic`` then run on it, but take the guide's draws for posterior draws;
    :func:`loo` corrects for the guide with the importance weights. Where the model
    masks points out, their NaN make ``az.loo`` and ``az.waic`` NaN: a ``UserWarning``
    says so, and :func:`loo` leaves them out. The group holds
    ``num_samples`` values per point: ``log_likelihood=False`` leaves it out. For a model
    with discrete sites summed out of the weights (see the module's notes), each point's
    log-likelihood has them summed out too where they are local to it; where not (a
    summed site shared by several points), the group is left out, with a
    ``UserWarning`` unless ``log_likelihood=False``. Its ``posterior`` group has the
    guide's sites (and the deterministic sites that do not vary with a summed site),
    not the summed ones.

    With ``posterior_predictive`` (the default), the ``posterior_predictive`` group holds
    a replicate of each observed site drawn from the model at each draw (the model run
    with its latents set to the draw and its observed data sites let go, as
    ``poutine.uncondition`` does), so ``az.plot_ppc(idata)`` works; a model whose
    observed sites cannot be drawn gets a ``UserWarning`` and no group.

    ``num_samples``, ``log_likelihood`` and ``posterior_predictive`` are this function's
    own: a model keyword argument of any of these names cannot pass through it.
    """
    check_positive_int(num_samples, "num_samples", minimum=2)
    for option, value in (
        ("log_likelihood", log_likelihood),
        ("posterior_predictive", posterior_predictive),
    ):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(
                f"{option} must be True or False (to_arviz's own option, not passed to the "
                f"model), got {value!r}"
            )
    log_w, draws, pointwise = _draws(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        deterministic=True,
        observed=bool(log_likelihood or posterior_predictive),
    )
    report, smoothed = _summarize(log_w)
    posterior = {name: _numpy(value)[None] for name, value in draws.items()}
    stats = {
        "log_importance_weight": _numpy(log_w)[None],
        "psis_log_weight": smoothed[None],
    }
    groups: dict[str, Any] = {"posterior": posterior, "sample_stats": stats}
    if pointwise is not None:
        sites = pointwise.sites

        def points(name: str, array: np.ndarray) -> np.ndarray:
            # a scalar site as one point of shape (1,) in every group (ArviZ gives a 0-d
            # observed value a dim of 1, and loo_pit wants the groups to match)
            return array[..., None] if sites[name].value.dim() == 0 else array

        if log_likelihood and pointwise.why_not is not None:
            warn_from_caller(
                f"to_arviz: the model enumerates latent site(s) "
                f"{', '.join(map(repr, sorted(pointwise.summed)))} that the guide does not "
                "draw; the weights sum them out, but the pointwise log-likelihood cannot have "
                f"them summed out ({pointwise.why_not}), so the log_likelihood group is left "
                "out (log_likelihood=False says so without this warning)"
            )
        elif log_likelihood:
            groups["log_likelihood"] = {
                name: points(
                    name, np.where(_numpy(data.points), _numpy(pointwise.log_lik[name]), np.nan)
                )[None]
                for name, data in sites.items()
            }
            masked = [name for name, data in sites.items() if not bool(data.points.all())]
            if masked:
                warn_from_caller(
                    f"to_arviz: the model masks out points of {', '.join(map(repr, masked))} "
                    "(poutine.mask, obs_mask, a distribution's .mask(m) or a scale of 0), "
                    "which the log_likelihood group "
                    "holds as NaN, so az.loo and az.waic on it give NaN; "
                    "pyroflows.infer.loo(model, guide, ...) leaves them out"
                )
        groups["observed_data"] = {name: points(name, _numpy(d.value)) for name, d in sites.items()}
        if posterior_predictive:
            replicates = _replicates(model, args, kwargs, draws, pointwise)
            if replicates is not None:
                groups["posterior_predictive"] = {
                    name: points(name, _numpy(value))[None] for name, value in replicates.items()
                }
    idata = _arviz().from_dict(**groups)
    attrs = {
        "khat": report.khat,
        "ess": report.ess,
        "inference_library": "pyro + pyroflows",
        "inference_library_version": pyro.__version__,
    }
    idata.posterior.attrs.update(attrs)
    idata.sample_stats.attrs.update(attrs)
    return idata


class _LetGo(UnconditionMessenger):
    """``poutine.uncondition`` for the named sites only.

    A deterministic site, which Pyro makes an observed ``Delta``, must keep its value.
    """

    def __init__(self, names) -> None:
        super().__init__()
        self.names = frozenset(names)

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.names and msg["is_observed"]:
            # an observation larger than its distribution (no plate): one draw per point
            fn, value = msg["fn"], msg["value"]
            points = value.shape[: value.dim() - fn.event_dim]
            shape = torch.broadcast_shapes(fn.batch_shape, points)
            if shape != fn.batch_shape:
                msg["fn"] = fn.expand(shape)
            super()._pyro_sample(msg)


def _replicates(model, args, kwargs, draws, pointwise) -> dict[str, torch.Tensor] | None:
    """A replicate of each data site at each draw (``(S, *value_shape)``), or None.

    The model runs with its latents set to the draws and its data sites let go: under a
    particle plate when the weights were computed that way, checked (a model can use
    the value a data site returns and mix the draws up, which fixed data did not show),
    else, or when that fails, one draw at a time. (Pyro's ``Predictive`` in parallel
    takes a latent's event dims for batch dims, so it is not used.)
    """
    names = [n for n, d in pointwise.sites.items() if d.replicable]
    if len(names) < len(pointwise.sites):
        left = [n for n in pointwise.sites if n not in names]
        warn_from_caller(
            f"to_arviz: no posterior predictive for {', '.join(map(repr, left))}: the data "
            "broadcast against a smaller event of the site's distribution, so a draw of it "
            "does not have the data's shape (give the distribution the data's event shape)"
        )
        if not names:
            return None
        pointwise = dataclasses.replace(pointwise, sites={n: pointwise.sites[n] for n in names})
    with torch.no_grad(), poutine.block():
        try:
            first = poutine.trace(model).get_trace(*args, **kwargs)
        except NotImplementedError:  # a prior that cannot be drawn: at the first draw
            at_first = poutine.condition(model, {n: v[0] for n, v in draws.items()})
            first = poutine.trace(at_first).get_trace(*args, **kwargs)
        latents = {
            n: v for n, v in draws.items() if not first.nodes[n]["infer"].get("_deterministic")
        }
        num_samples = len(next(iter(draws.values())))
        free = _LetGo(names)(model)
        if pointwise.vectorized:
            try:
                replicates = _vectorized_replicates(
                    model, free, first, args, kwargs, latents, pointwise
                )
            except (RuntimeError, ValueError, NotImplementedError):
                replicates = None
            if replicates is not None:
                return replicates
        try:
            runs = [
                poutine.trace(poutine.condition(free, {n: v[s] for n, v in latents.items()}))
                .get_trace(*args, **kwargs)
                .nodes
                for s in range(num_samples)
            ]
        except (RuntimeError, ValueError, NotImplementedError) as error:
            warn_from_caller(
                f"to_arviz: no posterior_predictive group, the model's observed sites "
                f"{names} could not be drawn at the guide's draws ({type(error).__name__}: "
                f"{error}); posterior_predictive=False skips them"
            )
            return None
    return {
        n: torch.stack([run[n]["value"].expand(d.value.shape) for run in runs])
        for n, d in pointwise.sites.items()
    }


def _vectorized_replicates(model, free, first, args, kwargs, latents, pointwise):
    """:func:`_replicates` under a particle plate; None when a check of two draws fails.

    The check runs draws ``0`` and ``S - 1`` alone, latents and replicated data set, and
    compares each data site's log-density there with the batch's.
    """
    num_samples = len(next(iter(latents.values())))
    nesting = _nesting(first)
    shaped = {}
    for n, v in latents.items():
        batch = len(first.nodes[n]["fn"].batch_shape)
        shaped[n] = v.reshape((num_samples,) + (1,) * (nesting - batch) + v.shape[1:])

    def particles(*a, **k):
        with pyro.plate("_replicates", num_samples, dim=-(nesting + 1)):
            return poutine.condition(free, shaped)(*a, **k)

    trace = poutine.trace(particles).get_trace(*args, **kwargs)
    replicates, densities = {}, {}
    for n, data in pointwise.sites.items():
        site = trace.nodes[n]
        event_dim = site["fn"].event_dim
        replicates[n] = _per_draw(site["value"], event_dim, data.value.shape, num_samples, nesting)
        log_p = site["fn"].log_prob(site["value"])
        densities[n] = _per_draw(log_p, 0, data.shape, num_samples, nesting)
    for s in sorted({0, num_samples - 1}):
        values = {n: v[s] for n, v in latents.items()}
        values.update((n, v[s]) for n, v in replicates.items())
        # the model as it is, data set to the replicates: it scores them as the batch did
        alone = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
        for n, data in pointwise.sites.items():
            site = alone.nodes[n]
            one = site["fn"].log_prob(site["value"]).expand(data.shape)
            if not torch.allclose(one, densities[n][s], rtol=1e-4, atol=1e-5, equal_nan=True):
                return None
    return replicates


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy()


def loo(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 4000,
    var_name: str | None = None,
    **kwargs: Any,
):
    r"""PSIS leave-one-out cross-validation from a guide's draws, corrected by their weights.

    ArviZ's ``az.loo`` takes its draws to be the posterior's. Draws :math:`z_s \sim q`
    of a guide are not; their importance weights :math:`w_s = p(y, z_s) / q(z_s)` put
    them right (Magnusson et al. 2019). The leave-one-out posterior
    :math:`p(z \mid y_{-i}) \propto p(y_{-i}, z)` is reached from :math:`q` with the
    ratios

    .. math::
        \log r_{is} = \log p(z_s) - \log q(z_s) + \sum_{j \ne i} \log p(y_j \mid z_s)

    (:math:`\log w_s - \log p(y_i \mid z_s)`, computed from its terms so that a draw
    where only :math:`y_i` has density 0 still counts for point :math:`i`), which PSIS
    smooths and normalizes per data point (its Pareto :math:`\hat k_i` says whether
    that point's estimate holds), giving

    .. math::
        \widehat{\mathrm{elpd}}_i = \log \sum_s \tilde r_{is}\, p(y_i \mid z_s),
        \qquad \widehat{\mathrm{elpd}}_\mathrm{loo} = \sum_i \widehat{\mathrm{elpd}}_i,

    with standard error :math:`\sqrt{n \operatorname{Var}_i \widehat{\mathrm{elpd}}_i}`
    and :math:`p_\mathrm{loo} = \sum_i \log \sum_s \tilde w_s p(y_i \mid z_s) -
    \widehat{\mathrm{elpd}}_\mathrm{loo}` (:math:`\tilde w` the guide's smoothed,
    normalized weights). With :math:`q` the exact posterior, :math:`w` is constant and
    this is ``az.loo``'s estimate.

    A data point is an element of the observed site's batch shape (its plates; a site's
    event dims make one point). Points the model masks out (``poutine.mask``, ``obs_mask``,
    a distribution's ``.mask(m)``) are not data: they are left out of ``loo_i``, and
    ``loo_i`` and ``pareto_k`` are then flat over the points kept. A site the model scales
    (``poutine.scale``) enters the ratios as the model weighs it (the fit is of the
    tempered posterior) and the predictive density :math:`p(y_i \mid z_s)` unscaled. The
    other observed sites stay in every fit. A discrete site the model enumerates and the
    guide does not draw is summed out of each point's density where it is local to that
    point (a mixture's assignment of each row:
    :math:`p(y_i \mid z_s) = \sum_k p(k \mid z_s)\, p(y_i \mid k, z_s)`); a model whose
    summed site is shared by several points, or whose sites that vary with it are scaled, is
    refused (``ValueError``). Memory: a few ``num_samples`` by ``n`` float64 arrays (160 MB
    each for 5,000 points and 4,000 draws).

    Args:
        model: the Pyro model; it must score the whole data set (no subsampled plate).
        guide: a trained guide of it.
        *args: the model's arguments.
        num_samples: guide draws ``S``.
        var_name: the observed site whose points are left out; needed when the model
            has more than one.
        **kwargs: the model's keyword arguments (``num_samples`` and ``var_name`` are
            this function's own and do not reach the model).

    Returns:
        ArviZ's ``ELPDData`` on the log scale, pointwise (``loo_i`` and ``pareto_k``), as
        ``az.loo(..., pointwise=True)`` returns it, so ``az.compare`` takes a dict of them.
        A ``UserWarning`` says when some :math:`\hat k_i` exceed ArviZ's threshold
        :math:`\min(1 - 1/\log_{10} S, 0.7)`, and when the site is a single point.

    References:
        Vehtari, Gelman, Gabry (2017). Practical Bayesian model evaluation using
        leave-one-out cross-validation and WAIC. Statistics and Computing 27.
        Magnusson, Andersen, Jonasson, Vehtari (2019). Bayesian leave-one-out
        cross-validation for large data. ICML. arXiv:1904.10679.
    """
    check_positive_int(num_samples, "num_samples", minimum=2)
    if var_name is not None and not isinstance(var_name, str):
        raise TypeError(f"var_name must be a site name (str) or None, got {var_name!r}")
    log_w, _, pointwise = _draws(  # no samples: a model whose structure changes is taken
        model,
        guide,
        args,
        kwargs,
        num_samples,
        deterministic=False,
        observed=True,
        stacked=False,
        pointwise_for="loo",
    )
    sites = pointwise.sites if pointwise is not None else {}
    if not sites:
        raise ValueError("the model has no observed site: there are no data points to leave out")
    if var_name is None:
        if len(sites) > 1:
            raise ValueError(
                f"the model has {len(sites)} observed sites {sorted(sites)}: say which "
                "one's points to leave out with var_name="
            )
        (var_name,) = sites
    elif var_name not in sites:
        raise ValueError(
            f"var_name must be one of the observed sites {sorted(sites)}, got {var_name!r}"
        )
    # the log weight from its terms: rest (prior, factors, -log q), the other sites, and
    # the left-out site's points, each weighed as the model weighs it
    base = pointwise.rest.double()
    for name, data in sites.items():
        if name != var_name:
            base = base + _weighted(pointwise.log_lik[name], data).reshape(num_samples, -1).sum(1)
    data = sites[var_name]
    points = data.points.flatten().to(log_w.device)
    ll = pointwise.log_lik[var_name].double().reshape(num_samples, -1)[:, points]  # (S, n)
    weighted = _weighted(pointwise.log_lik[var_name], data).reshape(num_samples, -1)[:, points]
    lw = log_w.double()
    if torch.isnan(lw).any() or (lw == math.inf).any() or torch.isnan(base).any():
        raise ValueError(
            "some log importance weights are NaN or +inf: the model or guide gives no finite "
            "density at some draws, so LOO cannot be estimated; see diagnose()"
        )
    n = ll.shape[1]
    if n == 0:
        raise ValueError(f"every point of site {var_name!r} is masked out: none to leave out")
    # sum over j != i of the weighed log-likelihoods: -inf where a point other than i
    # has density 0
    zero = torch.isneginf(weighted)
    count = zero.sum(1, keepdim=True)
    finite_sum = torch.where(zero, 0.0, weighted).sum(1, keepdim=True)
    others = torch.where(
        count == 0,
        finite_sum - torch.where(zero, 0.0, weighted),
        torch.where((count == 1) & zero, finite_sum, -math.inf),
    )
    log_r = (base[:, None] + others).T.cpu().numpy()  # (n, S)
    ll_np = ll.T.cpu().numpy()
    if not np.isfinite(log_r).any(axis=1).all():
        i = int(np.flatnonzero(~np.isfinite(log_r).any(axis=1))[0])
        raise ValueError(
            f"no draw of the guide has a positive leave-one-out weight for point {i} of "
            f"site {var_name!r}: the guide misses that posterior entirely"
        )
    arviz = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k-hats are reported below, in one warning
        smoothed_r, khats = arviz.psislw(log_r, 1.0)
    smoothed_r, khats = np.asarray(smoothed_r), np.array(khats, dtype=float)
    failed = ~np.isfinite(smoothed_r).all(axis=1) & np.isfinite(log_r).all(axis=1)
    if failed.any():  # a fit that failed on a tied tail (see psis): the raw ratios
        raw = log_r[failed]
        smoothed_r[failed] = raw - np.logaddexp.reduce(raw, axis=1, keepdims=True)
        khats[failed] = math.inf
    smoothed_w, _ = psis(_numpy(lw))
    elpd_i = np.logaddexp.reduce(smoothed_r + ll_np, axis=-1)
    lppd = float(np.logaddexp.reduce(smoothed_w[None, :] + ll_np, axis=-1).sum())
    elpd = float(elpd_i.sum())
    good_k = min(1 - 1 / np.log10(num_samples), 0.7)
    warning = bool(np.any(khats > good_k))
    if n == 1:
        warn_from_caller(
            f"loo: site {var_name!r} is a single data point (its event dims hold the whole "
            "data set): leaving it out leaves nothing; put the points in a pyro.plate"
        )
    if warning:
        high = khats > good_k
        # the raw ratios' ESS per point: a large k-hat on ratios that barely vary reads
        # the shape of a tail that holds little weight (as verdict's note on flat weights)
        flat = high & (_raw_ess_fraction(log_r) >= FLAT_ESS_FRACTION)
        note = ""
        if flat.any():
            some = "all" if flat.sum() == high.sum() else str(int(flat.sum()))
            note = (
                f"; {some} of them have leave-one-out ratios that barely "
                f"vary (ESS at least {FLAT_ESS_FRACTION:.0%} of the draws), where a large "
                "k-hat reads a tail that holds little weight and the estimate is likely "
                "close: check those with more draws or an exact refit without the point"
            )
        warn_from_caller(
            f"loo: {int(np.sum(high))} of {n} data points have Pareto k-hat above "
            f"{good_k:.4g} (largest {_khat_text(float(np.max(khats)), (good_k,))}): their "
            "leave-one-out estimates do not hold (a poor guide, too few draws, or highly "
            f"influential points){note}"
        )
    import xarray as xr

    if bool(points.all()):
        shape = tuple(data.shape)
        dims = [f"{var_name}_dim_{j}" for j in range(len(shape))]
    else:  # masked points left out: flat over the points kept
        shape, dims = (n,), [f"{var_name}_point"]
    return arviz.ELPDData(
        data=[
            elpd,
            float(math.sqrt(n * np.var(elpd_i))),
            lppd - elpd,
            num_samples,
            n,
            warning,
            xr.DataArray(elpd_i.reshape(shape), dims=dims, name="loo_i"),
            xr.DataArray(khats.reshape(shape), dims=dims),
            "log",
            good_k,
        ],
        index=[
            "elpd_loo",
            "se",
            "p_loo",
            "n_samples",
            "n_data_points",
            "warning",
            "loo_i",
            "pareto_k",
            "scale",
            "good_k",
        ],
    )


def _weighted(log_lik: torch.Tensor, data: _DataSite) -> torch.Tensor:
    """Each point's log-density as the model weighs it (scale, mask), shape ``(S, *shape)``.

    Masked points give 0, even where their density is 0 (``-inf``) or undefined.
    """
    weight = data.weight.to(log_lik.device, torch.float64)
    return torch.where(data.points.to(log_lik.device), weight * log_lik.double(), 0.0)
