"""Every part of pyroflows on the device chosen with ``--device`` (default: the CPU).

``python -m pytest tests/test_device.py --device cuda`` checks, on a GPU, that flows,
guides, the VAE pieces and fitting keep every tensor there and give finite results.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import constraints

import pyroflows
from pyroflows.density import fit
from pyroflows.infer import AmortizedGuide, AutoFlow, amortized_posterior, iwae_log_likelihood


@pytest.mark.parametrize(
    ("builder", "options"),
    [("maf", {}), ("iaf", {}), ("realnvp", {}), ("nice", {}), ("nsf", {}),
     ("nsf", {"autoregressive": "maf"}), ("nsf", {"autoregressive": "iaf"})],
)  # fmt: skip
@pytest.mark.parametrize("context", [None, 3])
def test_flows_stay_on_the_device(device, builder, options, context):
    flow = pyroflows.BUILDERS[builder](4, transforms=2, hidden=(16,), context=context, **options)
    flow = flow.to(device)
    c = torch.randn(5, 3, device=device) if context else None
    d = flow(c)
    x = d.rsample((2,))
    log_p = d.log_prob(x)
    assert x.device.type == log_p.device.type == device.type
    log_p.sum().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads
    assert all(g.device.type == device.type and torch.isfinite(g).all() for g in grads)
    fresh = d.log_prob(x.detach().clone())  # the inverse direction too
    assert torch.allclose(fresh, log_p.detach(), atol=1e-3)


def test_mixed_precision_is_refused(device):
    flow = pyroflows.maf(2, transforms=1, hidden=(8,)).to(device)
    with pytest.raises((TypeError, ValueError), match="dtype|float64"):
        flow().log_prob(torch.zeros(3, 2, dtype=torch.float64, device=device))


def test_fit_on_the_device(device):
    flow = pyroflows.nsf(2, transforms=2, hidden=(16,)).to(device)
    x = torch.randn(512, 2, device=device) * 3 + 1
    history = fit(flow, x, epochs=3, seed=0, progress=False)
    assert history.epochs == 3
    assert next(flow.parameters()).device.type == device.type
    assert flow().sample((4,)).device.type == device.type


def test_autoflow_on_the_device(device):
    data = torch.randn(20, device=device) + 2

    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), device=device), 10.0))
        scale = pyro.sample("scale", dist.LogNormal(torch.zeros((), device=device), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, scale), obs=y)

    guide = AutoFlow(model, warm_start=None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        assert torch.isfinite(torch.tensor(svi.step(data)))
    draws = guide(data)
    assert draws["loc"].device.type == device.type
    # the diagnostics, ArviZ export and leave-one-out read the device's tensors
    assert guide.diagnose(data, num_samples=200).num_samples == 200
    mask = torch.arange(20, device=device) % 5 != 0  # a mask on the device too

    def masked(y):
        with pyro.poutine.mask(mask=mask):
            model(y)

    masked_guide = AutoFlow(masked, warm_start=None)
    masked_guide(data)
    with pytest.warns(UserWarning, match="masks out points of 'y'"):
        idata = masked_guide.to_arviz(data, num_samples=200)
    assert idata.posterior_predictive["y"].shape == (1, 200, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an untrained guide's k-hats
        assert masked_guide.loo(data, num_samples=200)["n_data_points"] == 16


def test_amortized_posterior_on_the_device(device):
    decoder = torch.nn.Linear(2, 6).to(device)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, device=device), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    guide = AmortizedGuide(amortized_posterior(6, 2, flow="iaf", hidden=(8,))).to(device)
    x = torch.randint(0, 2, (10, 6), device=device).float()
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    estimate = iwae_log_likelihood(model, guide, x, num_samples=16)
    assert estimate.device.type == device.type
    assert torch.isfinite(estimate).all()


def test_quantiles_on_the_device_are_seeded_and_leave_its_rng_alone(device):
    def model():
        pyro.sample("w", dist.Normal(torch.zeros(3, device=device), 1.0).to_event(1))

    def states():  # the CPU's generator and the device's
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    guide = AutoFlow(model, warm_start=None)
    guide()
    first = guide.median()["w"]
    torch.randn(1000, device=device)  # a draw between two calls moves no quantile
    before = states()
    again = guide.quantiles([0.25, 0.5])["w"]
    after = states()
    assert first.device.type == device.type
    assert torch.equal(first, again[1])
    assert (again[0] < again[1]).all()
    # the generators are where the caller (the training) left them
    assert torch.equal(after[0], before[0])
    if device.type == "cuda":
        assert torch.equal(after[1], before[1])


def test_a_flow_of_layers_made_on_the_device_has_its_base_there(device):
    from pyroflows.transforms import ActNorm, AffineAutoregressive, LULinear

    layers = [AffineAutoregressive(3, "maf", hidden=(8,)), LULinear(3), ActNorm(3)]
    layers = [layer.to(device) for layer in layers]
    flow = pyroflows.Flow(3, layers)
    d = flow()
    x = d.sample((4,))
    assert x.device.type == device.type
    assert torch.isfinite(d.log_prob(x)).all()


def test_stl_autoflow_and_a_supported_amortized_guide_on_the_device(device):
    data = torch.rand(12, 4, device=device) + 0.5

    def model(y):
        rate = pyro.sample(
            "rate", dist.Gamma(torch.full((4,), 2.0, device=device), 1.0).to_event(1)
        )
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Exponential(rate).to_event(1), obs=y)

    guide = AutoFlow(model, estimator="stl")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert all(math.isfinite(svi.step(data)) for _ in range(3))
    assert guide.median(data)["rate"].device.type == device.type

    def vae(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(torch.ones(2, device=device), 1.0).to_event(1))

    amortized = AmortizedGuide(
        amortized_posterior(4, 2, flow="iaf", hidden=(8,)), support=constraints.positive
    ).to(device)
    loss = Trace_ELBO().differentiable_loss(vae, amortized, data)
    loss.backward()
    assert torch.isfinite(loss)
    assert (amortized(data) > 0).all()


def test_the_command_line_fits_on_the_device(device, tmp_path):
    import numpy as np
    import pandas as pd

    from pyroflows.density import FlowDensity
    from pyroflows.density.cli import main

    x = np.random.default_rng(0).normal(size=(300, 2)) * [1.0, 5.0] + [0.0, 50.0]
    np.savetxt(tmp_path / "data.csv", x, delimiter=",", header="a,b", comments="")
    fast = ["--flow", "nsf", "--transforms", "1", "--hidden", "8", "--epochs", "2", "--quiet"]
    out = tmp_path / "model.pt"
    assert main(["fit", str(tmp_path / "data.csv"), "--out", str(out), "--device", str(device),
                 *fast]) == 0  # fmt: skip
    model = FlowDensity.load(out)  # fitted on the device, it loads on the CPU and scores
    assert np.isfinite(model.score_samples(pd.DataFrame(x, columns=["a", "b"]))).all()


def test_autoflow_and_a_flow_under_the_device_as_torchs_default(device):
    """Users of Pyro often run ``with torch.device("cuda"):`` (or set_default_device)."""
    with device:
        data = torch.randn(15) + 1.0

        def model(y):
            loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
            with pyro.plate("data", len(y)):
                pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

        guide = AutoFlow(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        assert all(math.isfinite(svi.step(data)) for _ in range(3))
        assert guide.median(data)["loc"].device.type == device.type
        assert guide.diagnose(data, num_samples=100).num_samples == 100
        flow = pyroflows.nsf(3, transforms=2, hidden=(8,), context=2)
        x = flow(torch.randn(4, 2)).rsample()
        assert x.device.type == device.type
