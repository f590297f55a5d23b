"""Compare two Pyro models by leave-one-out cross-validation, each fitted with AutoFlow.

A straight line observed with three gross outliers: is a Normal or a Student-t
likelihood the better predictive model? Each model gets an AutoFlow guide; ``guide.loo``
estimates its expected log predictive density (elpd) by PSIS leave-one-out, with the
guide's draws reweighed by their importance weights (a guide is not the posterior), and
``az.compare`` ranks the two: the Student-t model wins by about 29 nats, eight standard
errors of the difference. Each point's Pareto k-hat says whether its leave-one-out
estimate holds; they inherit the guide's own k-hat (the tail of its weights), so a run
whose 4,000 draws catch a heavy tail of the guide can flag several points, as
``diagnose`` would with those draws::

    python examples/model_comparison.py             # about half a minute
    python examples/model_comparison.py --steps 300
"""

from __future__ import annotations

import argparse
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

from pyroflows import AutoFlow

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ's notice about its refactor
    import arviz as az


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Forty points of y = 1 + 2 x + N(0, 0.5^2) noise, three pushed 6 to 8 units off."""
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-2.0, 2.0, n)
    y = 1.0 + 2.0 * x + 0.5 * torch.randn(n, generator=generator)
    y[[5, 20, 33]] += torch.tensor([6.0, -8.0, 7.0])
    return x, y


def regression(likelihood: str):
    """A Bayesian straight line with a Normal or a Student-t (4 dof) likelihood."""

    def model(x, y):
        intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
        slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        mean = intercept + slope * x
        if likelihood == "normal":
            noise = dist.Normal(mean, sigma)
        else:
            noise = dist.StudentT(4.0, mean, sigma)
        with pyro.plate("data", len(x)):
            pyro.sample("y", noise, obs=y)

    return model


def fit(model, x, y, steps: int) -> AutoFlow:
    pyro.clear_param_store()
    guide = AutoFlow(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    torch.set_num_threads(1)  # small networks: more threads only add overhead
    pyro.set_rng_seed(0)
    x, y = data()
    results = {}
    for likelihood in ("normal", "student-t"):
        model = regression(likelihood)
        guide = fit(model, x, y, args.steps)
        print(f"{likelihood:9s} guide: {guide.diagnose(x, y, num_samples=1000)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the k-hats are printed below
            results[likelihood] = guide.loo(x, y, num_samples=4000)
        k = results[likelihood]["pareto_k"].values
        print(
            f"{likelihood:9s} elpd_loo {results[likelihood]['elpd_loo']:8.2f} "
            f"(se {results[likelihood]['se']:.2f}), k-hat > 0.7 at {int((k > 0.7).sum())} "
            f"of {k.size} points, largest {k.max():.3f}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's use of a pandas method pandas deprecates
        table = az.compare(results)
    print(table[["rank", "elpd_loo", "p_loo", "elpd_diff", "dse", "weight"]].round(2))


if __name__ == "__main__":
    main()
