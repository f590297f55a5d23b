"""A VAE on scikit-learn's 8x8 digits, with a diagonal Gaussian and with a flow q(z|x).

The same encoder and decoder are trained with each posterior; the script prints the test
ELBO, the test IWAE log-likelihood (k = 1000) and the gap between them, per digit.

Needs scikit-learn for the data (``pip install -e ".[density]"``)::

    python examples/vae_digits.py                 # diagonal, then IAF (about a minute)
    python examples/vae_digits.py --flows nsf --epochs 300
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from sklearn.datasets import load_digits
from torch import nn

from pyroflows.infer import AmortizedGuide, amortized_posterior, iwae_log_likelihood

LATENT, PIXELS = 8, 64
EPOCHS, LR, TRANSFORMS, HIDDEN = 300, 2e-3, 2, (256, 256)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized digits (scaled to [0, 1], then > 0.5), a fixed 80/20 train/test split."""
    x = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return torch.from_numpy(x[order[:cut]]), torch.from_numpy(x[order[cut:]])


class VAE(nn.Module):
    """p(z) = N(0, I), p(x | z) = Bernoulli(logits = decoder(z)); q(z | x) amortized."""

    def __init__(
        self, flow: str | None, hidden: tuple[int, ...] = HIDDEN, transforms: int = TRANSFORMS
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip((LATENT, *hidden), hidden, strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.decoder = nn.Sequential(*layers, nn.Linear(hidden[-1], PIXELS))
        options = {"transforms": transforms} if flow else {}
        posterior = amortized_posterior(PIXELS, LATENT, flow=flow, hidden=hidden, **options)
        # trained by a torch optimizer over vae.parameters(): no pyro.module registration
        self.guide = AmortizedGuide(posterior, register=False)

    def model(self, x: torch.Tensor) -> None:
        """The generative model of a batch of binarized digits ``x`` (``(B, 64)``)."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


def train(vae: VAE, x: torch.Tensor, epochs: int, batch: int = 128, lr: float = LR) -> float:
    """Fit by SVI on mini-batches; return the mean wall time of an epoch in seconds.

    The loss is Pyro's reparametrized ELBO (``Trace_ELBO``); one torch Adam steps every
    parameter at once, which costs less per step than ``pyro.optim.Adam``'s optimizer per
    parameter tensor. ``SVI(model, guide, pyro.optim.Adam(...), Trace_ELBO())`` needs the
    parameters in Pyro's param store instead: build the guide with ``register=True`` and
    call ``pyro.module("decoder", self.decoder)`` in the model (as written here, SVI would
    find no parameter to step).
    """
    pyro.clear_param_store()
    elbo = Trace_ELBO()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, foreach=True)
    start = time.perf_counter()
    for _ in range(epochs):
        for index in torch.randperm(len(x)).split(batch):
            loss = elbo.differentiable_loss(vae.model, vae.guide, x[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / epochs


def evaluate(vae: VAE, x: torch.Tensor, k: int = 1000) -> dict[str, float]:
    """Test ELBO (1000 particles) and IWAE log-likelihood (k samples), nats per digit.

    The ELBO in passes of at most 100 rows (x 1000 particles), and the IWAE estimate in
    passes of at most ``2**15`` row-particle pairs (its ``max_batch``), so a larger test
    set fits too.
    """
    elbo = Trace_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        test_elbo = -sum(elbo.loss(vae.model, vae.guide, rows) for rows in x.split(100)) / len(x)
    log_lik = iwae_log_likelihood(vae.model, vae.guide, x, num_samples=k).mean().item()
    return {"elbo": test_elbo, "iwae": log_lik, "gap": log_lik - test_elbo}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--flows", nargs="+", default=["none", "iaf"], choices=["none", "iaf", "nsf"]
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    torch.set_num_threads(1)  # small networks: more threads only add overhead
    train_x, test_x = digits()
    print(f"digits: {len(train_x)} train, {len(test_x)} test, latent {LATENT}")
    print(f"{'posterior':10s} {'test ELBO':>10s} {'IWAE k=1000':>12s} {'gap':>6s} {'s/epoch':>8s}")
    for name in args.flows:
        torch.manual_seed(args.seed)
        vae = VAE(None if name == "none" else name)
        seconds = train(vae, train_x, args.epochs)
        r = evaluate(vae, test_x)
        label = "diagonal" if name == "none" else name
        print(f"{label:10s} {r['elbo']:10.2f} {r['iwae']:12.2f} {r['gap']:6.2f} {seconds:8.3f}")


if __name__ == "__main__":
    main()
