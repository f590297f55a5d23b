"""Eight schools: a mean-field guide against AutoFlow, whether to trust each, and the fix.

Rubin's (1981) coaching experiment, in the non-centred form: eight schools report an
effect ``y[j]`` with a known standard error ``sigma[j]``; the effects are
``theta[j] = mu + tau * theta_trans[j]`` with ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``,
``theta_trans[j] ~ N(0, 1)``. The posterior of ``tau`` is skewed, with a long left tail
in ``log tau``. We fit ``AutoNormal``, ``AutoFlow`` and ``AutoFlow(estimator="stl")``
with the same optimiser and steps, then print for each the posterior quantiles of
``tau``, its PSIS diagnostics (k-hat < 0.5 good, 0.5-0.7 usable with care, > 0.7 do not
trust) and the same quantiles after PSIS resampling (``importance_resample``).

What it shows (seeds 0 and 1, 4000 steps; reference tau 0.26 / 2.75 / 9.7):
AutoNormal's raw draws are too narrow (5% quantile 0.59-0.63, median 2.2-2.3, 95%
8.3-8.7). The default AutoFlow, which learns a skew of each coordinate after its flow,
reaches further into the left tail of ``log tau`` (5% quantile 0.32-0.33), but its
median and upper tail fall short (2.4, 95% 8.1-9.0); its k-hat is 0.48-0.56. The
"sticking the landing" estimator comes closest (5% 0.24-0.39, median 2.6-2.8, 95%
9.5-9.8), yet its k-hat differs most between seeds: 0.62 on seed 0, 1.28 on seed 1 (ESS
78-95% of the draws), and the diagnostics say so. Resampled, all three come close to
the reference (5% 0.23-0.34, median 2.69-2.82, 95% 9.5-10.4); on seed 0 both AutoFlow
guides' resampling warns (k-hat 0.72 and 0.74 over 40,000 proposals).

Run it from the repository root (two to three minutes)::

    python examples/eight_schools.py
    python examples/eight_schools.py --steps 500    # a rough, fast run
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows.infer import AutoFlow, diagnose, importance_resample

y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)


def fit(guide, steps: int):
    pyro.clear_param_store()
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)})  # 1e-2 -> 1e-3
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(y, sigma)
    return guide


def quantiles(tau: torch.Tensor) -> str:
    q05, q50, q95 = torch.quantile(tau.flatten(), torch.tensor([0.05, 0.5, 0.95])).tolist()
    return f"tau: 5% {q05:5.2f}  median {q50:5.2f}  95% {q95:5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=10000, help="posterior draws to summarize")
    args = parser.parse_args()
    for flag, least in (("steps", 1), ("draws", 2)):  # one draw has no spread
        if getattr(args, flag) < least:
            parser.error(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    torch.set_num_threads(1)

    guides = [
        ("AutoNormal", AutoNormal),
        ("AutoFlow", AutoFlow),
        ("AutoFlow+stl", lambda model: AutoFlow(model, estimator="stl")),
    ]
    for name, make in guides:
        pyro.set_rng_seed(args.seed)
        guide = fit(make(model), args.steps)
        tau = Predictive(model, guide=guide, num_samples=args.draws)(y, sigma)["tau"]
        print(f"{name:12s} {quantiles(tau)}")
        print(f"{'':12s} {diagnose(model, guide, y, sigma, num_samples=4000)}")
        draws = importance_resample(
            model, guide, y, sigma, num_samples=args.draws, num_proposals=4 * args.draws
        )
        print(f"{'':12s} PSIS-resampled {quantiles(draws['tau'])}")
    print("reference (long NUTS run, posteriordb): tau: 5% 0.26  median 2.75  95% 9.7")


if __name__ == "__main__":
    main()
