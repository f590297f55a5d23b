"""Data sets for ``benchmarks/density.py``: generated ones with a known density, and real ones.

Every loader returns a :class:`Split` of float32 tensors ``(N, D)`` for one seed. The
split depends on the data set and the seed only, never on the contender, so every flow
is trained, stopped and scored on the very same rows.

Generated (train, validation and test sets are separate draws, seeded per data set and
seed; the true log-density of every test row is returned, computed in float64 on the
float32 rows the flows see):

* ``mixture``: the README's quickstart mixture, an equal mixture of two 2-D Gaussians
  with means (1.5, 1.5) and (-1.5, -1.5) and covariance 0.5^2 I.
* ``ring``: eight equally weighted 2-D Gaussians with centres on a circle of radius
  ``2 sqrt 2`` (about 2.83) at angles k pi / 4 and standard deviation ``0.5 / sqrt 2``
  (about 0.354): the "8gaussians" toy of FFJORD (Grathwohl et al., 2019), whose generator
  draws ``4 * centre + 0.5 * noise`` and divides by 1.414. Neighbouring modes are 6
  standard deviations apart.
* ``student-t``: a 16-D Student-t with 5 degrees of freedom, location 0 and a fixed
  correlation matrix (scale matrix) drawn once from seed 0: ``S = W W^T + diag(v)``
  with ``W`` a 16 x 4 standard normal matrix and ``v ~ U(0.1, 1)``, scaled to unit
  diagonal. Draws are ``L z / sqrt(w / 5)`` with ``L L^T`` the correlation matrix,
  ``z ~ N(0, I)`` and ``w`` a sum of five squared standard normals (chi-squared with 5
  degrees of freedom, exact for an integer ``df``, and seedable with a generator);
  the true log-density is ``pyro.distributions.MultivariateStudentT.log_prob``.

Real, bundled with scikit-learn (no network), split per seed by a random permutation
into 70 % train, 10 % validation and 20 % test rows:

* ``wine``: ``load_wine``, 178 rows, 13 columns.
* ``breast-cancer``: ``load_breast_cancer``, 569 rows, 30 columns (skewed; a few
  standardized values lie beyond 5 standard deviations, up to about 12).
* ``digits``: ``load_digits``, 1797 rows, 64 integer columns in 0..16 (three of them
  always 0). They are dequantized by adding ``U[0, 1)`` noise, drawn once per seed with
  its own seeded generator, to every row before the split, so train, validation and test
  rows of every contender carry the same noise. The NLL reported is then that of the
  dequantized (continuous) data, which in expectation bounds the NLL of the integer
  data from above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GENERATED = ("mixture", "ring", "student-t")
REAL = ("wine", "breast-cancer", "digits")
NAMES = GENERATED + REAL
DIMS = {"mixture": 2, "ring": 2, "student-t": 16, "wine": 13, "breast-cancer": 30, "digits": 64}

RING_MODES = 8
RING_RADIUS = 2.0 * math.sqrt(2.0)
RING_SD = 0.5 / math.sqrt(2.0)
MIXTURE_MEANS = ((1.5, 1.5), (-1.5, -1.5))
MIXTURE_SD = 0.5
T_DIM = 16
T_DF = 5
T_FACTORS = 4
REAL_FRACTIONS = (0.7, 0.1)  # train, validation; the rest is test


@dataclass
class Split:
    """One seed's rows of one data set.

    Attributes:
        train: training rows, float32 ``(N_train, D)``.
        val: validation rows (early stopping), float32 ``(N_val, D)``.
        test: held-out rows, float32 ``(N_test, D)``.
        test_log_prob: the true ``log p`` of every test row (float64), generated data only.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    test_log_prob: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """Event size ``D``."""
        return self.train.shape[-1]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Rows in train, validation and test."""
        return len(self.train), len(self.val), len(self.test)


# --------------------------------------------------------------------------- generated


def _gaussian_mixture_log_prob(x: torch.Tensor, means: torch.Tensor, sd: float) -> torch.Tensor:
    """``log p(x)`` of an equal mixture of isotropic Gaussians ``N(means[k], sd^2 I)``."""
    dim = x.shape[-1]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (N, K)
    log_normal = -0.5 * sq / sd**2 - dim * math.log(sd) - 0.5 * dim * math.log(2 * math.pi)
    return torch.logsumexp(log_normal, dim=-1) - math.log(len(means))


def _gaussian_mixture_sample(
    n: int, means: torch.Tensor, sd: float, g: torch.Generator
) -> torch.Tensor:
    k = torch.randint(len(means), (n,), generator=g)
    noise = torch.randn(n, means.shape[-1], generator=g, dtype=torch.float64)
    return means[k] + sd * noise


def _mixture_means() -> torch.Tensor:
    return torch.tensor(MIXTURE_MEANS, dtype=torch.float64)


def _ring_means() -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(RING_MODES, dtype=torch.float64) / RING_MODES
    return RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=-1)


def student_t_scale_tril() -> torch.Tensor:
    """Cholesky factor of the fixed 16-D correlation matrix (drawn from seed 0), float64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(T_DIM, T_FACTORS, generator=g, dtype=torch.float64)
    v = 0.1 + 0.9 * torch.rand(T_DIM, generator=g, dtype=torch.float64)
    s = w @ w.T + torch.diag(v)
    inv_sd = s.diagonal().rsqrt()
    corr = inv_sd[:, None] * s * inv_sd[None, :]
    return torch.linalg.cholesky(corr)


def _student_t_sample(n: int, g: torch.Generator) -> torch.Tensor:
    tril = student_t_scale_tril()
    z = torch.randn(n, T_DIM, generator=g, dtype=torch.float64)
    w = (torch.randn(n, T_DF, generator=g, dtype=torch.float64) ** 2).sum(-1)  # chi2(df)
    return (z @ tril.T) / (w / T_DF).sqrt()[:, None]


def _student_t_log_prob(x: torch.Tensor) -> torch.Tensor:
    import pyro.distributions as dist

    tril = student_t_scale_tril()
    d = dist.MultivariateStudentT(torch.tensor(float(T_DF), dtype=torch.float64), 0 * tril[0], tril)
    return d.log_prob(x)


_GENERATORS: dict[str, tuple[int, Callable, Callable]] = {
    # name: (seed offset, sample(n, g) in float64, log_prob(x float64))
    "mixture": (
        101,
        lambda n, g: _gaussian_mixture_sample(n, _mixture_means(), MIXTURE_SD, g),
        lambda x: _gaussian_mixture_log_prob(x, _mixture_means(), MIXTURE_SD),
    ),
    "ring": (
        202,
        lambda n, g: _gaussian_mixture_sample(n, _ring_means(), RING_SD, g),
        lambda x: _gaussian_mixture_log_prob(x, _ring_means(), RING_SD),
    ),
    "student-t": (303, _student_t_sample, _student_t_log_prob),
}


def generated(name: str, seed: int, sizes: tuple[int, int, int]) -> Split:
    """Separate train, validation and test draws of a generated data set, with the truth.

    Args:
        name: one of :data:`GENERATED`.
        seed: the run's seed; with the data set's offset it seeds one ``torch.Generator``.
        sizes: rows in train, validation and test.
    """
    offset, sample, log_prob = _GENERATORS[name]
    g = torch.Generator().manual_seed(10_000 * offset + seed)
    parts = [sample(n, g).float() for n in sizes]
    truth = log_prob(parts[2].double())
    return Split(*parts, test_log_prob=truth)


# --------------------------------------------------------------------------- real


def _real_array(name: str, seed: int) -> torch.Tensor:
    from sklearn import datasets

    loader = {
        "wine": datasets.load_wine,
        "breast-cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[name]
    x = torch.as_tensor(loader().data, dtype=torch.float64)
    if name == "digits":  # dequantize: U[0, 1) noise, drawn once per seed, for all contenders
        g = torch.Generator().manual_seed(20_000 + seed)
        x = x + torch.rand(x.shape, generator=g, dtype=torch.float64)
    return x


def real(name: str, seed: int) -> Split:
    """A seeded 70 / 10 / 20 permutation split of a scikit-learn data set.

    Args:
        name: one of :data:`REAL`.
        seed: seeds the permutation (and, for ``digits``, the dequantization noise).
    """
    x = _real_array(name, seed)
    n = len(x)
    n_train = round(REAL_FRACTIONS[0] * n)
    n_val = round(REAL_FRACTIONS[1] * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x = x[perm].float()
    return Split(x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


def load(name: str, seed: int, sizes: tuple[int, int, int]) -> Split:
    """Rows of data set ``name`` for ``seed`` (``sizes`` is used by generated data only)."""
    if name in GENERATED:
        return generated(name, seed, sizes)
    if name in REAL:
        return real(name, seed)
    raise ValueError(f"unknown data set {name!r}; expected one of {NAMES}")
