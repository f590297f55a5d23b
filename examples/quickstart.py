"""Quickstart: fit a normalizing flow to a 2-D mixture of two Gaussians.

The data are those of Pyro's normalizing-flow tutorial: an equal mixture of two Gaussians
with means (1.5, 1.5) and (-1.5, -1.5) and covariance 0.5^2 I. We draw 2,000 training
points, fit a flow (MAF by default) by maximum likelihood with Adam, and score 2,000
held-out points under the fitted flow and under the true density, which is known exactly
here, so the gap between the two says how good the fit is. A figure shows the training
data beside samples from the flow, and the flow's density with the true one overlaid; a
second one (``*_stages.png``) shows base draws bent into the data, layer by layer.

Run it from the repository root (after ``pip install -e ".[plot]"``: the figure needs
matplotlib; ``--no-plot`` does without); it takes about 15 seconds::

    python examples/quickstart.py
    python examples/quickstart.py --flow realnvp --seed 3 --out /tmp/realnvp.png
    python examples/quickstart.py --steps 500 --no-plot

``--flow`` takes any name in ``pyroflows.BUILDERS``.
"""

import argparse
import time
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import nn

import pyroflows


def true_density() -> dist.MixtureSameFamily:
    """The mixture the data come from, as a Pyro distribution we can sample and score."""
    means = torch.tensor([[1.5, 1.5], [-1.5, -1.5]])
    components = dist.Normal(means, 0.5).to_event(1)  # two 2-D Gaussians, 0.5^2 I
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), components)


# Learning rate and any builder options that differ from the shared ones below. Splines are
# flexible enough to overfit 2,000 points: fewer bins and a gentler rate keep them honest.
SETTINGS = {"nsf": {"lr": 1e-3, "bins": 4}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--flow", default="maf", choices=sorted(pyroflows.BUILDERS))
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps (full batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/quickstart.png", help="where to save the PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401  (checked now, not after the training)
        except ImportError:
            parser.error('the figure needs matplotlib: pip install -e ".[plot]", or pass --no-plot')
        out = Path(args.out)
        if not out.parent.is_dir():  # found now, not after the training
            parser.error(f"--out {args.out}: no folder {out.parent} to save the figure in")
        if not out.suffix:  # as matplotlib saves it, so the paths printed are the files
            args.out = str(out.with_suffix(".png"))

    torch.set_num_threads(1)  # the networks are tiny: more threads only add overhead
    torch.manual_seed(args.seed)  # seeds the data, the flow's initial weights, the samples

    # 1. Data: a training set and a separate held-out set from the same density.
    truth = true_density()
    x_train = truth.sample((2000,))
    x_test = truth.sample((2000,))

    # 2. A flow is an nn.Module; calling it gives a Pyro distribution over R^2.
    #    With only 2,000 points a small flow with smooth (ELU) activations generalizes
    #    better than a big ReLU one, which overfits: its held-out NLL rises as it trains.
    options = {"transforms": 3, "hidden": (32, 32), "activation": nn.ELU, "lr": 5e-3}
    options.update(SETTINGS.get(args.flow, {}))
    lr = options.pop("lr")
    flow = pyroflows.BUILDERS[args.flow](2, **options)

    # 3. Maximum likelihood: minimize the mean negative log-likelihood of the training data.
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = -flow().log_prob(x_train).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  train NLL {loss.item():.4f}  ({elapsed:.1f} s)")

    # 4. Held-out score, beside the exact score of the true density on the same points.
    with torch.no_grad():
        nll_flow = -flow().log_prob(x_test).mean().item()
        nll_true = -truth.log_prob(x_test).mean().item()
    gap = nll_flow - nll_true
    print(f"held-out NLL  flow: {nll_flow:.4f}  true: {nll_true:.4f}  gap: {gap:.4f} nats")

    if not args.no_plot:
        plot(flow, truth, x_train, args.out, f"{args.flow}: held-out gap {gap:.3f} nats")
        out = Path(args.out)  # the stages figure beside it, whatever the suffix
        plot_stages(flow, x_train, str(out.with_name(f"{out.stem}_stages{out.suffix}")))


def plot(flow, truth, x_train, path, title) -> None:
    """Save two panels: data vs flow samples, and flow density vs true density."""
    import matplotlib

    matplotlib.use("Agg")  # write files only, no window
    import matplotlib.pyplot as plt

    with torch.no_grad():
        samples = flow().sample((2000,))
        grid = torch.linspace(-4, 4, 200)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        points = torch.stack([xx, yy], dim=-1).reshape(-1, 2)
        p_flow = flow().log_prob(points).exp().reshape(xx.shape)
        p_true = truth.log_prob(points).exp().reshape(xx.shape)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8), constrained_layout=True)
    left.scatter(*x_train.T, s=3, alpha=0.4, label="training data")
    left.scatter(*samples.T, s=3, alpha=0.4, label="flow samples")
    left.legend(loc="upper left", markerscale=4)
    left.set_title("data and samples")
    filled = right.contourf(xx, yy, p_flow, levels=20, cmap="viridis")
    right.contour(xx, yy, p_true, levels=6, colors="white", linewidths=0.8)
    fig.colorbar(filled, ax=right, label="flow density")
    right.set_title("flow density (white: true density)")
    for ax in (left, right):
        ax.set(xlim=(-4, 4), ylim=(-4, 4), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


def plot_stages(flow, x_train, path) -> None:
    """Save the flow at work: base draws, after each layer, and the data, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = flow.intermediates(2000)  # [u, T1(u), T2(T1(u)), ..., x]
    names = ["base"] + [type(t).__name__ for t in flow.transforms]
    panels = len(stages) + 1
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.9), constrained_layout=True)
    color = stages[0][:, 0]  # colour each point by its base coordinate, to follow it
    for ax, points, name in zip(axes[:-1], stages, names, strict=True):
        ax.scatter(*points.T, c=color, s=2, cmap="coolwarm")
        ax.set_title(name, fontsize=9)
        # a hidden layer may stretch far past the data's range: frame 99% of its points
        lo, hi = torch.quantile(points.detach(), torch.tensor([0.005, 0.995]), dim=0)
        lo, hi = (lo - 0.1 * (hi - lo)).tolist(), (hi + 0.1 * (hi - lo)).tolist()
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]))
        ax.tick_params(labelsize=7)
    axes[-1].scatter(*x_train.T, s=2, color="gray")
    axes[-1].set_title("data", fontsize=9)
    for ax in (axes[0], axes[-1]):  # base and data on the same fixed square
        ax.set(xlim=(-4, 4), ylim=(-4, 4), aspect="equal")
    fig.savefig(path, dpi=90)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
