r"""A Gaussian mixture: AutoFlow for the continuous latents, the assignments summed out.

AutoFlow refuses discrete latents. A mixture's assignments ``a[i]`` are left to
``TraceEnum_ELBO``, which sums them out in training: the guide is built on the model
with them hidden (``poutine.block``), as for Pyro's own autoguides. Its diagnostics
must weigh it against the *whole* model: ``pyroflows.infer.diagnose(model, guide, x)``
sums the enumerated sites out of each weight,
:math:`\log w_s = \log \sum_a p(x, z_s, a) - \log q(z_s)`. The guide's own
``guide.diagnose(x)`` only sees the blocked model, draws ``a`` from its prior, and says
so in a warning.

What it shows (seed 0, 50 points, 1500 steps, 1000 draws): against the whole model
k-hat is 0.40 and the ELBO -117.91 (the training loss ends at 117.88); against the
blocked model k-hat is 23 and the ELBO -537, the noise of the prior's assignments. The
medians of the locations are 3.27 and -3.19 (the clusters' true centres: 3 and -3).

Run it from the repository root (about 30 seconds of CPU)::

    python examples/mixture.py
    python examples/mixture.py --steps 200    # a rough, fast run
"""

import argparse
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate

from pyroflows.infer import AutoFlow, diagnose


@config_enumerate
def model(x):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("data", len(x)):
        a = pyro.sample("a", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[a], scale), obs=x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--draws", type=int, default=1000, help="guide draws to diagnose")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pyro.set_rng_seed(args.seed)
    x = torch.cat([torch.randn(25) - 3.0, torch.randn(25) + 3.0])
    # warm_start=None: with `a` hidden the guide's model has no log density to find a
    # mode of (AutoFlow would skip its Laplace warm start, with a warning)
    guide = AutoFlow(poutine.block(model, hide=["a"]), warm_start=None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(args.steps):
        loss = svi.step(x)
    print(f"final loss {loss:.2f}")
    print("median:", {k: v.numpy().round(2).tolist() for k, v in guide.median(x).items()})

    print("whole model  |", diagnose(model, guide, x, num_samples=args.draws))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # it warns: the blocked model draws `a`
        print("blocked model|", guide.diagnose(x, num_samples=args.draws))


if __name__ == "__main__":
    main()
