"""Neal's funnel in 10 dimensions: where a mean-field guide fails and a flow does not.

``v ~ N(0, 3^2)`` and, given ``v``, nine coordinates ``x_i ~ N(0, e^v)``: the scale of
``x`` spans orders of magnitude as ``v`` moves, so the posterior is a funnel with a
narrow neck. A Gaussian guide cannot bend with it and reports ``sd(v)`` far below the
true 3. An inverse autoregressive flow can: with ``v`` first in its variable order each
``x_i``'s scale is a learned function of ``v``. We print ``sd(v)`` for both guides and
each one's PSIS diagnostics.

What it shows (seeds 0 and 1, 8000 steps): AutoNormal's ``sd(v)`` is 0.47-0.48,
AutoFlow's 2.88-2.96. The model has no data, so its density is normalized,
``log p(x) = 0``, and minus the ELBO is the KL divergence from the guide to the
posterior: 1.9 nats for AutoNormal, 0.07-0.11 for AutoFlow. The ESS says the same
(69-82 of 4000 draws against 3812-3973), and so does k-hat: "do not trust" for
AutoNormal (1.03-1.05), "good" for AutoFlow (0.47-0.49), which still misses the far
end of the neck a little (``sd(v)`` below 3), where a few draws carry large weights.
PSIS judges the weights of the draws a guide makes, so a guide that never goes down
the neck can hide part of what it misses there: read k-hat with the ESS and the ELBO.

Run it from the repository root (about two minutes)::

    python examples/funnel.py
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyroflows.infer import AutoFlow, diagnose


def model():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)).expand([9]).to_event(1))


def fit(guide, steps: int):
    pyro.clear_param_store()
    optim = pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.1 ** (1 / steps)})  # 1e-2 -> 1e-3
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step()
    return guide


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=10000, help="posterior draws to summarize")
    args = parser.parse_args()
    for flag, least in (("steps", 1), ("draws", 2)):  # one draw has no spread
        if getattr(args, flag) < least:
            parser.error(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    torch.set_num_threads(1)

    guides = {
        "AutoNormal": lambda: AutoNormal(model),
        # three IAF layers, unclamped scales (e^v spans orders of magnitude), and the
        # "sticking the landing" gradient: with the defaults sd(v) was 2.28 (seed 0)
        "AutoFlow": lambda: AutoFlow(model, flow="iaf", transforms=3, clamp=None, estimator="stl"),
    }
    for name, make in guides.items():
        pyro.set_rng_seed(args.seed)
        guide = fit(make(), args.steps)
        v = Predictive(model, guide=guide, num_samples=args.draws)()["v"]
        print(f"{name:10s} sd(v) = {v.std().item():.2f} (true 3.00)")
        print(f"{'':10s} {diagnose(model, guide, num_samples=4000)}")


if __name__ == "__main__":
    main()
