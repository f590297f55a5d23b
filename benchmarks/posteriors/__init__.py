"""Pyro versions of eight posteriordb reference posteriors.

Each posterior is read from a folder ``<root>/<name>/`` holding ``data.json``,
``reference_draws.npz`` and ``summary.json`` (see ``MODELS.md`` there for the maths).
:func:`load` returns a :class:`Posterior`: a Pyro model taking no arguments, whose latent
sites are the *sampled* parameters, the reference draws in posteriordb's names, and a map from
samples of the model's sites to those names.

Batching: every model also runs under an outer particle plate at dim -2 (as with
``Trace_ELBO(vectorize_particles=True, max_plate_nesting=1)``). A global site then has batch
shape ``(P, 1)``, the 1 being the slot of the data plate (dim -1). A per-datum vector computed
from such sites has shape ``(P, 1, N)``; :func:`_along_data` drops the slot so that it lies
along the data plate, ``(P, N)``. ``Predictive(..., parallel=True)`` hands a guide's draws of a
vector site to the model as ``(n, K)`` rather than ``(n, 1, K)``; :func:`_vector` restores
the layout, so that such a run is right too.

Flat priors use :class:`_Flat`, an ``ImproperUniform`` that can be sampled (see there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

NAMES: tuple[str, ...] = (
    "eight_schools-eight_schools_noncentered",
    "kidiq-kidscore_momiq",
    "arK-arK",
    "sblrc-blr",
    "mesquite-logmesquite_logvash",
    "gp_pois_regr-gp_pois_regr",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "earnings-logearn_interaction",
)

Model = Callable[[], None]
ToReported = Callable[[Mapping[str, Tensor]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Posterior:
    """A reference posterior as a Pyro model.

    Attributes:
        name: posteriordb name, e.g. ``"arK-arK"``.
        dim: dimension of the sampled (unconstrained) space.
        model: Pyro model taking no arguments; its latent sites are the sampled parameters.
        reference: reference draws, posteriordb name -> array of shape (10000,) (chains pooled).
        to_reported: maps samples of the model's latent sites, each with a leading sample dim
            ``n``, to float64 arrays of shape (n,) keyed like ``reference``.
    """

    name: str
    dim: int
    model: Model
    reference: dict[str, np.ndarray]
    to_reported: ToReported


def load(name: str, root: str | Path, dtype: torch.dtype = torch.float64) -> Posterior:
    """Load a posterior: data, reference draws, model and map to reported names.

    Args:
        name: one of :data:`NAMES`.
        root: folder holding one subfolder per posterior.
        dtype: dtype of the data tensors (and so of the model's computations).

    Returns:
        The :class:`Posterior`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown posterior {name!r}; expected one of {NAMES}")
    folder = Path(root) / name
    data = json.loads((folder / "data.json").read_text())
    order = json.loads((folder / "summary.json").read_text())["parameter_order"]
    with np.load(folder / "reference_draws.npz") as draws:
        reference = {key: np.asarray(draws[key], dtype=np.float64).reshape(-1) for key in order}
    model, to_reported = _BUILDERS[name](data, dtype)
    with torch.no_grad():
        trace = pyro.poutine.trace(model).get_trace()
    latent = [s for s in trace.stochastic_nodes if not site_is_subsample(trace.nodes[s])]
    dim = sum(trace.nodes[site]["value"].numel() for site in latent)
    return Posterior(name, dim, model, reference, to_reported)


# --- helpers -------------------------------------------------------------------------------


def _vector(v: Tensor) -> Tensor:
    """Lay out the value of a global vector site as (K,) or (..., 1, K), see the module doc."""
    return v.unsqueeze(-2) if v.dim() == 2 else v


def _along_data(v: Tensor) -> Tensor:
    """Lay a per-datum vector of shape (N,) or (..., 1, N) along the data plate (dim -1)."""
    return v.squeeze(-2) if v.dim() > 1 else v


class _Flat(dist.ImproperUniform):
    """``ImproperUniform`` (improper flat prior on ``support``) that can be sampled.

    Pyro's ``ImproperUniform.sample`` raises, which breaks its init strategies (``AutoNormal``'s
    default ``init_to_feasible``, ``init_to_median``); and its ``log_prob`` gives float32 zeros,
    which turn Pyro's float accumulator of site log-probs into float32 when the site comes
    first. Here ``sample`` pushes standard normal noise into the support (an init strategy
    only needs a feasible point) and ``log_prob`` gives zeros of the value's dtype.

    Args:
        support: the support, e.g. ``constraints.positive``.
        event_shape: shape of one value.
        dtype: dtype of the samples.
        batch_shape: batch shape (set by ``expand``).
    """

    def __init__(
        self,
        support: constraints.Constraint,
        event_shape: tuple[int, ...],
        dtype: torch.dtype,
        batch_shape: tuple[int, ...] = (),
    ):
        super().__init__(support, torch.Size(batch_shape), torch.Size(event_shape))
        self._dtype = dtype

    def expand(self, batch_shape, _instance=None) -> _Flat:
        return _Flat(self.support, self.event_shape, self._dtype, batch_shape)

    def sample(self, sample_shape=()) -> Tensor:
        noise = torch.randn(self.shape(sample_shape), dtype=self._dtype)
        return biject_to(self.support)(noise)

    def log_prob(self, value: Tensor) -> Tensor:
        return super().log_prob(value).to(value.dtype)


def _normal(scale: float, size: int, dtype: torch.dtype) -> dist.Distribution:
    """Independent Normal(0, scale) prior on a vector of ``size`` entries."""
    return dist.Normal(torch.zeros(size, dtype=dtype), scale).to_event(1)


def _report(draws: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Name draws as posteriordb does: ``name`` for a scalar, ``name[k]`` for a vector.

    Each value has a leading sample dim ``n``; the rest is flattened, and a single entry is
    taken as a scalar (no posterior here has a vector of length 1).
    """
    out = {}
    for name, value in draws.items():
        value = value.detach().to(torch.float64).reshape(len(value), -1).cpu().numpy()
        if value.shape[1] == 1:
            out[name] = value[:, 0].copy()
        else:
            out.update({f"{name}[{k + 1}]": value[:, k].copy() for k in range(value.shape[1])})
    return out


def _pick(*sites: str) -> ToReported:
    """A ``to_reported`` for a model whose sampled parameters are the reported ones."""

    def to_reported(samples: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        return _report({site: samples[site] for site in sites})

    return to_reported


def _linear_regression(
    x: Tensor, y: Tensor, beta_prior: dist.Distribution, sigma_prior: dist.Distribution
) -> Model:
    """Model y[n] ~ Normal(x[n] . beta, sigma), given the priors of beta and sigma."""

    def model() -> None:
        beta = _vector(pyro.sample("beta", beta_prior))
        sigma = pyro.sample("sigma", sigma_prior)
        mean = _along_data(torch.einsum("nk,...k->...n", x, beta))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)

    return model


# --- the posteriors ------------------------------------------------------------------------


def _eight_schools(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Eight schools, non-centred: theta = mu + tau theta_trans, y[j] ~ N(theta[j], sigma[j]).

    mu ~ N(0, 5), tau ~ Half-Cauchy(0, 5), theta_trans[j] ~ N(0, 1).
    """
    y = torch.tensor(data["y"], dtype=dtype)
    sigma = torch.tensor(data["sigma"], dtype=dtype)
    five = torch.tensor(5.0, dtype=dtype)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, five))
        tau = pyro.sample("tau", dist.HalfCauchy(five))
        theta_trans = _vector(pyro.sample("theta_trans", _normal(1.0, len(y), dtype)))
        theta = _along_data(mu[..., None] + tau[..., None] * theta_trans)
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    def to_reported(samples: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        n = len(samples["mu"])
        mu, tau = samples["mu"].reshape(n, 1), samples["tau"].reshape(n, 1)
        theta = mu + tau * samples["theta_trans"].reshape(n, len(y))
        return _report({"theta": theta, "mu": mu, "tau": tau})

    return model, to_reported


def _kidiq(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Kid IQ: kid_score[n] ~ N(beta[1] + beta[2] mom_iq[n], sigma).

    beta flat, sigma ~ Half-Cauchy(0, 2.5).
    """
    mom_iq = torch.tensor(data["mom_iq"], dtype=dtype)
    x = torch.stack([torch.ones_like(mom_iq), mom_iq], dim=-1)
    y = torch.tensor(data["kid_score"], dtype=dtype)
    beta_prior = _Flat(constraints.real_vector, (2,), dtype)
    sigma_prior = dist.HalfCauchy(torch.tensor(2.5, dtype=dtype))
    return _linear_regression(x, y, beta_prior, sigma_prior), _pick("beta", "sigma")


def _ark(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """AR(K): y[t] ~ N(alpha + sum_k beta[k] y[t-k], sigma) for t > K.

    alpha, beta[k] ~ N(0, 10); sigma ~ Half-Cauchy(0, 2.5).
    """
    lags, series = data["K"], torch.tensor(data["y"], dtype=dtype)
    y = series[lags:]
    # column k-1 holds y[t-k] for t = K+1..T (1-based)
    x = torch.stack([series[lags - k : len(series) - k] for k in range(1, lags + 1)], dim=-1)
    ten = torch.tensor(10.0, dtype=dtype)

    def model() -> None:
        alpha = pyro.sample("alpha", dist.Normal(0.0, ten))
        beta = _vector(pyro.sample("beta", _normal(10.0, lags, dtype)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5, dtype=dtype)))
        mean = alpha[..., None] + torch.einsum("nk,...k->...n", x, beta)
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(_along_data(mean), sigma), obs=y)

    return model, _pick("alpha", "beta", "sigma")


def _sblrc(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Regression without intercept: y[n] ~ N(X[n] . beta, sigma).

    beta[d] ~ N(0, 10), sigma ~ Half-N(0, 10).
    """
    x = torch.tensor(data["X"], dtype=dtype)
    y = torch.tensor(data["y"], dtype=dtype)
    beta_prior = _normal(10.0, x.shape[1], dtype)
    sigma_prior = dist.HalfNormal(torch.tensor(10.0, dtype=dtype))
    return _linear_regression(x, y, beta_prior, sigma_prior), _pick("beta", "sigma")


def _mesquite(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Mesquite: log weight ~ N(beta . (1, log vol, log area, log shape, log height, group), sigma).

    Flat priors on beta and on sigma > 0.
    """
    d1, d2, canopy_height, total_height, group, weight = (
        torch.tensor(data[key], dtype=dtype)
        for key in ("diam1", "diam2", "canopy_height", "total_height", "group", "weight")
    )
    columns = [
        torch.ones_like(d1),
        torch.log(d1 * d2 * canopy_height),
        torch.log(d1 * d2),
        torch.log(d1 / d2),
        torch.log(total_height),
        group,
    ]
    x, y = torch.stack(columns, dim=-1), torch.log(weight)
    beta_prior = _Flat(constraints.real_vector, (6,), dtype)
    sigma_prior = _Flat(constraints.positive, (), dtype)
    return _linear_regression(x, y, beta_prior, sigma_prior), _pick("beta", "sigma")


def _gp_cholesky(x: Tensor, rho: Tensor, alpha: Tensor) -> Tensor:
    """Cholesky factor of K + 1e-10 I, K[i, j] = alpha^2 exp(-(x[i] - x[j])^2 / (2 rho^2)).

    Batched over the leading dims of ``rho`` and ``alpha``: returns shape (..., N, N).
    """
    rho, alpha = rho[..., None, None], alpha[..., None, None]
    sq_dist = (x[:, None] - x[None, :]) ** 2
    cov = alpha**2 * torch.exp(-sq_dist / (2 * rho**2))
    # posteriordb's jitter 1e-10 suffices in float64 (checked for rho up to 100, alpha up to
    # 10). In float32 it fails for half the prior draws: there use 1e-5 alpha^2, i.e. white
    # noise of sd 0.003 alpha added to f, a slightly different model.
    jitter = 1e-10 if x.dtype == torch.float64 else 1e-5 * alpha**2
    return torch.linalg.cholesky(cov + jitter * torch.eye(len(x), dtype=x.dtype))


def _gp_pois_regr(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """GP: k[n] ~ Poisson(exp(f[n])), f = L f_tilde with L L^T = K (squared exponential) + 1e-10 I.

    rho ~ Gamma(25, 4), alpha ~ Half-N(0, 2), f_tilde[n] ~ N(0, 1).
    """
    x = torch.tensor(data["x"], dtype=dtype)
    counts = torch.tensor(data["k"], dtype=dtype)

    def latent(rho: Tensor, alpha: Tensor, f_tilde: Tensor) -> Tensor:
        return (_gp_cholesky(x, rho, alpha) @ f_tilde[..., None])[..., 0]

    def model() -> None:
        rho = pyro.sample(
            "rho", dist.Gamma(torch.tensor(25.0, dtype=dtype), torch.tensor(4.0, dtype=dtype))
        )
        alpha = pyro.sample("alpha", dist.HalfNormal(torch.tensor(2.0, dtype=dtype)))
        f_tilde = _vector(pyro.sample("f_tilde", _normal(1.0, len(x), dtype)))
        f = _along_data(latent(rho, alpha, f_tilde))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Poisson(torch.exp(f)), obs=counts)

    def to_reported(samples: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        n = len(samples["rho"])
        rho, alpha = samples["rho"].reshape(n), samples["alpha"].reshape(n)
        f = latent(rho, alpha, samples["f_tilde"].reshape(n, len(x)))
        return _report({"rho": rho, "alpha": alpha, "f": f})

    return model, to_reported


def _low_dim_gauss_mix(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Mixture: y[n] ~ theta N(mu[1], sigma[1]) + (1 - theta) N(mu[2], sigma[2]), mu[1] < mu[2].

    mu[i] ~ N(0, 2) restricted to mu ordered, sigma[i] ~ Half-N(0, 2), theta ~ Beta(5, 5).
    """
    y = torch.tensor(data["y"], dtype=dtype)
    two, five = torch.tensor(2.0, dtype=dtype), torch.tensor(5.0, dtype=dtype)

    def model() -> None:
        # flat on the ordered vectors (support ordered_vector, so biject_to gives Pyro's
        # OrderedTransform), times the N(0, 2) densities; the truncation constant is dropped
        mu = _vector(pyro.sample("mu", _Flat(constraints.ordered_vector, (2,), dtype)))
        pyro.factor("mu_prior", dist.Normal(0.0, two).log_prob(mu).sum(-1))
        sigma = _vector(pyro.sample("sigma", dist.HalfNormal(two).expand([2]).to_event(1)))
        theta = pyro.sample("theta", dist.Beta(five, five))
        weights = dist.Categorical(probs=torch.stack([theta, 1 - theta], dim=-1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.MixtureSameFamily(weights, dist.Normal(mu, sigma)), obs=y)

    return model, _pick("mu", "sigma", "theta")


def _earnings(data: dict, dtype: torch.dtype) -> tuple[Model, ToReported]:
    """Earnings: log earn ~ N(beta . (1, height, male, height male), sigma).

    Flat priors on beta and on sigma > 0.
    """
    earn, height, male = (torch.tensor(data[k], dtype=dtype) for k in ("earn", "height", "male"))
    x = torch.stack([torch.ones_like(height), height, male, height * male], dim=-1)
    beta_prior = _Flat(constraints.real_vector, (4,), dtype)
    sigma_prior = _Flat(constraints.positive, (), dtype)
    return _linear_regression(x, torch.log(earn), beta_prior, sigma_prior), _pick("beta", "sigma")


_BUILDERS: dict[str, Callable[[dict, torch.dtype], tuple[Model, ToReported]]] = dict(
    zip(
        NAMES,
        (
            _eight_schools,
            _kidiq,
            _ark,
            _sblrc,
            _mesquite,
            _gp_pois_regr,
            _low_dim_gauss_mix,
            _earnings,
        ),
        strict=True,
    )
)
