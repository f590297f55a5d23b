"""Amortized posteriors: encoder, conditional flow q(z|x), the guide, IWAE log-likelihood.

The reference is a linear-Gaussian model, z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D),
whose evidence log p(x) = log N(x; b, W W^T + s^2 I), posterior and ELBO are known in
closed form.
"""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyroflows.flows import iaf
from pyroflows.infer.amortized import (
    AmortizedGuide,
    AmortizedPosterior,
    Encoder,
    amortized_posterior,
    iwae_log_likelihood,
)

D, LATENT, NOISE = 5, 2, 0.5
STEPS = 600


class LinearGaussian:
    """The model, its exact evidence and posterior (float64)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, LATENT, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        precision = torch.eye(LATENT, dtype=torch.float64) + self.W.T @ self.W / NOISE**2
        self.cov = torch.linalg.inv(precision)
        self.gain = self.cov @ self.W.T / NOISE**2  # posterior mean = gain (x - b)

    def __call__(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(LATENT, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, NOISE).to_event(1), obs=x)

    def data(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + NOISE * torch.randn(n, D, generator=g, dtype=torch.float64)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + NOISE**2 * torch.eye(D, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def elbo(self, x: torch.Tensor, loc: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        """Closed-form ELBO per row of q = N(loc, diag sd^2)."""
        prior = -0.5 * LATENT * math.log(2 * math.pi) - 0.5 * (loc**2 + sd**2).sum(-1)
        resid = x - loc @ self.W.T - self.b
        spread = (sd**2 * (self.W**2).sum(0)).sum(-1)
        lik = (
            -0.5 * D * math.log(2 * math.pi * NOISE**2)
            - 0.5 * ((resid**2).sum(-1) + spread) / NOISE**2
        )
        entropy = (0.5 * torch.log(2 * math.pi * math.e * sd**2)).sum(-1)
        return prior + lik + entropy

    def gaussian_guide(self, inflate: float) -> AmortizedGuide:
        """An AmortizedGuide whose linear encoder gives N(exact mean, inflate * diag sd)."""
        encoder = Encoder(D, LATENT, hidden=(), context=0, min_scale=0.0).double()
        with torch.no_grad():
            encoder.loc.weight.copy_(self.gain)
            encoder.loc.bias.copy_(-self.gain @ self.b)
            sd = inflate * self.cov.diagonal().sqrt()
            encoder.scale.bias.copy_(torch.log(torch.expm1(sd)))  # softplus^-1
        return AmortizedGuide(AmortizedPosterior(encoder))


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_iwae_is_exact_on_the_linear_gaussian_model():
    model = LinearGaussian()
    x = model.data(40, seed=1)
    guide = model.gaussian_guide(inflate=1.6)  # diagonal and too wide: an imperfect q
    torch.manual_seed(0)
    estimate = iwae_log_likelihood(model, guide, x, num_samples=1000)
    truth = model.log_evidence(x)
    assert estimate.shape == (40,)
    assert (estimate - truth).abs().mean() < 0.05
    assert (estimate - truth).abs().max() < 0.1
    sd = 1.6 * model.cov.diagonal().sqrt()
    elbo = model.elbo(x, (x - model.b) @ model.gain.T, sd.expand(40, LATENT))
    assert (truth - elbo).mean() > 0.3  # the guide is far enough off for the test to bite
    assert (estimate - elbo).min() > 0


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    model = LinearGaussian()
    x = model.data(10, seed=2)
    guide = model.gaussian_guide(inflate=1.5)
    torch.manual_seed(1)
    draws = torch.stack([iwae_log_likelihood(model, guide, x, num_samples=1) for _ in range(400)])
    sd = 1.5 * model.cov.diagonal().sqrt()
    elbo = model.elbo(x, (x - model.b) @ model.gain.T, sd.expand(10, LATENT))
    error = draws.mean(0) - elbo
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert (error.abs() < 4 * standard_error + 1e-9).all()
    assert (draws.std(0) > 0.05).all()  # a real Monte Carlo estimate, not a constant


def test_passes_of_particles_and_rows_give_the_same_estimate():
    model = LinearGaussian()
    x = model.data(12, seed=3)
    guide = model.gaussian_guide(inflate=1.2)
    torch.manual_seed(2)
    whole = iwae_log_likelihood(model, guide, x, num_samples=300, max_batch=10**6)
    torch.manual_seed(2)
    small = iwae_log_likelihood(model, guide, x, num_samples=300, max_batch=50)
    assert whole.shape == small.shape == (12,)
    truth = model.log_evidence(x)
    assert (whole - truth).abs().max() < 0.1
    assert (small - truth).abs().max() < 0.1


@pytest.mark.parametrize("flow", ["iaf", "nsf"])
def test_flow_posterior_shapes_and_a_one_pass_elbo(flow):
    torch.manual_seed(0)
    q = amortized_posterior(D, LATENT, flow=flow, hidden=(16,), context=4)
    d = q(torch.randn(7, D))
    z = d.rsample((3,))
    assert d.batch_shape == (7,)
    assert d.event_shape == (LATENT,)
    assert z.shape == (3, 7, LATENT)
    assert torch.isfinite(d.log_prob(z)).all()

    calls = []
    for module in q.flow.modules():
        if type(module).__name__ == "MADE":
            module.register_forward_hook(lambda *_: calls.append(1))
    model = LinearGaussian()
    x = model.data(6, seed=4).float()
    model.W, model.b = model.W.float(), model.b.float()
    guide = AmortizedGuide(q)
    Trace_ELBO().loss(model, guide, x)
    assert len(calls) == 2  # IAF form: one MADE pass per layer to sample, none to score
    estimate = iwae_log_likelihood(model, guide, x, num_samples=64)
    assert estimate.shape == (6,)
    assert torch.isfinite(estimate).all()


def test_svi_trains_a_flow_posterior_past_the_diagonal_gaussian():
    # The exact posterior is a correlated Gaussian: the best diagonal q misses it by a
    # known KL; an IAF with the encoder's context can close that gap.
    model = LinearGaussian(seed=7)  # a posterior correlation of the latents
    x = model.data(64, seed=6)
    precision = torch.linalg.inv(model.cov)
    # KL(q || p) of the best diagonal q (sd_i^2 = 1 / precision_ii)
    best_diag_kl = 0.5 * (torch.log(precision.diagonal()).sum() - torch.logdet(precision)).item()
    assert best_diag_kl > 0.1
    gaps = {}
    for flow in (None, "iaf"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        options = {"transforms": 2, "context": 4} if flow else {}
        # a linear encoder: the exact posterior mean is linear in x (no amortization gap)
        q = amortized_posterior(D, LATENT, flow=flow, hidden=(), **options).double()
        guide = AmortizedGuide(q)
        elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), elbo)
        for _ in range(STEPS):
            svi.step(x)
        loss = Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(model, guide, x)
        gaps[flow] = (model.log_evidence(x).sum().item() + loss) / x.shape[0]
    assert gaps[None] == pytest.approx(best_diag_kl, abs=0.05)
    assert gaps["iaf"] < 0.3 * gaps[None]


def test_subsampling_guide_and_model_share_the_rows():
    n, batch = 30, 7
    x = torch.randn(n, 3)

    def model(data):
        with pyro.plate("data", n, subsample_size=batch) as index:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=data[index])

    guide = AmortizedGuide(
        amortized_posterior(3, 2, flow="iaf", hidden=(8,), context=2), size=n, subsample_size=batch
    )
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    index = guide_trace.nodes["data"]["value"]
    assert index.shape == (batch,)
    assert torch.equal(model_trace.nodes["data"]["value"], index)
    assert torch.equal(model_trace.nodes["x"]["value"], x[index])
    assert model_trace.nodes["x"]["scale"] == pytest.approx(n / batch)

    # a mini-batch handed in: the ELBO is scaled to the whole data set
    minibatch = AmortizedGuide(guide.posterior, size=n)
    trace = poutine.trace(minibatch).get_trace(x[:5])
    assert trace.nodes["z"]["value"].shape == (5, 2)
    assert trace.nodes["z"]["scale"] == pytest.approx(n / 5)


def test_iwae_refuses_latents_outside_the_data_plate():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'mu' is not inside plate 'data'"):
        iwae_log_likelihood(model, guide, torch.zeros(4), num_samples=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="flow must be one of"):
        amortized_posterior(4, 2, flow="maf")
    for flow in ("iaf", "nsf"):  # the flow's widths named as given, not as the encoder's
        with pytest.raises(ValueError, match="every entry of flow_hidden must be"):
            amortized_posterior(4, 2, flow=flow, hidden=(8,), flow_hidden=(16, -1))
    with pytest.raises(ValueError, match="latent_dim is 2"):
        AmortizedPosterior(Encoder(4, 2, context=3), iaf(3, context=3))
    with pytest.raises(ValueError, match="context of size 5"):
        AmortizedPosterior(Encoder(4, 2, context=3), iaf(2, context=5))
    with pytest.raises(ValueError, match="latent_dim must be"):
        Encoder(4, 0)
    q = amortized_posterior(4, 2, flow="iaf", hidden=(8,))
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4\)"):
        q(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="float64"):
        q(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="subsample_size needs size"):
        AmortizedGuide(q, subsample_size=3)
    with pytest.raises(TypeError, match="register must be True or False, got 'yes'"):
        AmortizedGuide(q, register="yes")
    with pytest.raises(ValueError, match="num_samples must be"):
        iwae_log_likelihood(lambda x: None, lambda x: None, torch.zeros(2, 4), num_samples=0)


def test_a_data_plate_with_a_plate_nested_inside():
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            with pyro.plate("pixels", 3, dim=-1):
                pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    guide = AmortizedGuide(amortized_posterior(3, 2, flow="iaf", hidden=(8,), context=2), dim=-2)
    x = torch.randn(4, 3)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (4, 1, 2)
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(model, guide, x)))
    estimate = iwae_log_likelihood(model, guide, x, num_samples=8)
    assert estimate.shape == (4,)
    assert torch.isfinite(estimate).all()


def test_iwae_refuses_a_latent_the_guide_does_not_draw():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"latent sites \['w', 'z'\].*guide's sites \['z'\]"):
        iwae_log_likelihood(model, guide, torch.zeros(4), num_samples=2)


def test_iwae_slices_per_row_keyword_arguments_with_the_rows():
    def model(x, label=None):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + label, 1.0), obs=x)

    def guide(x, label=None):  # the exact posterior: every weight is p(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal((x - label) / 2, math.sqrt(0.5)))

    x, label = torch.randn(6), torch.arange(6.0)
    exact = dist.Normal(label, math.sqrt(2.0)).log_prob(x)
    for max_batch in (2**15, 4, 1):  # one pass; passes of rows; one row per pass
        estimate = iwae_log_likelihood(
            model, guide, x, num_samples=10, label=label, max_batch=max_batch
        )
        assert torch.allclose(estimate, exact, atol=1e-5)


def test_iwae_skips_deterministic_sites_outside_the_data_plate():
    model = LinearGaussian()
    x = model.data(6, seed=4)
    guide = model.gaussian_guide(inflate=1.3)

    def with_deterministic(data):
        pyro.deterministic("beta", torch.tensor(0.5, dtype=data.dtype))  # log-density 0
        model(data)

    torch.manual_seed(3)
    plain = iwae_log_likelihood(model, guide, x, num_samples=50)
    torch.manual_seed(3)
    assert torch.equal(iwae_log_likelihood(with_deterministic, guide, x, num_samples=50), plain)


def test_guide_refuses_x_without_a_rows_dim():
    guide = AmortizedGuide(amortized_posterior(16, 4, flow="iaf", hidden=(8,)))
    with pytest.raises(ValueError, match=r"x of shape \(16,\) gives q\(z \| x\) with batch shape"):
        guide(torch.zeros(16))  # one data point, not 16 rows: x[None] is meant
    assert poutine.trace(guide).get_trace(torch.zeros(1, 16)).nodes["z"]["value"].shape == (1, 4)


def test_guide_refuses_x_with_extra_batch_dims_even_when_a_size_matches():
    guide = AmortizedGuide(amortized_posterior(5, 2, flow="iaf", hidden=(8,)))
    for shape in [(3, 4, 5), (4, 4, 5)]:  # (4, 4, 5) slipped through, to fail in the ELBO
        with pytest.raises(ValueError, match=rf"x of shape {re.escape(str(shape))} gives"):
            guide(torch.zeros(shape))


def test_guide_refuses_x_without_rows_and_bad_names():
    q = amortized_posterior(5, 2, flow="iaf", hidden=(8,))
    with pytest.raises(ValueError, match=r"x has no rows \(shape \(0, 5\)\)"):
        AmortizedGuide(q)(torch.zeros(0, 5))
    for argument in ("site", "plate", "name"):
        for bad in (None, 3, ""):
            with pytest.raises(TypeError, match=f"{argument} must be a non-empty str"):
                AmortizedGuide(q, **{argument: bad})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_is_named_by_the_guide_and_by_iwae(bad):
    model, guide = (
        LinearGaussian(),
        AmortizedGuide(amortized_posterior(D, LATENT, flow="iaf", hidden=(8,))),
    )
    x = torch.zeros(3, D)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite .* at index \(1, 2\)"):
        guide(x)
    with pytest.raises(ValueError, match=r"x holds 1 NaN or infinite"):
        iwae_log_likelihood(model, guide, x, num_samples=5)


def test_x_that_is_not_a_tensor_gets_a_type_error_naming_what_came():
    import numpy as np

    model, x = LinearGaussian(), np.zeros((3, D))
    guide = model.gaussian_guide(1.0)
    for call in (
        lambda: poutine.trace(guide).get_trace(x),
        lambda: iwae_log_likelihood(model, guide, x, num_samples=4),
    ):
        with pytest.raises(TypeError, match=r"x must be a torch.Tensor .*got ndarray"):
            call()
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        iwae_log_likelihood(model, guide, torch.tensor(1.0), num_samples=4)


def _labelled_model(data):
    """A semi-supervised VAE's shape: a label y and a latent z per row, one data plate."""
    with pyro.plate("data", data.shape[0]):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = z.sum(-1, keepdim=True) + y.unsqueeze(-1).float()
        pyro.sample("x", dist.Normal(loc, 1.0).expand(loc.shape[:-1] + (4,)).to_event(1), obs=data)


def test_guide_samples_inside_the_callers_data_plate():
    gz = AmortizedGuide(amortized_posterior(4, 2, flow="iaf", hidden=(8,), context=2))

    def guide(data, subsample_size=None):
        with pyro.plate("data", data.shape[0], subsample_size=subsample_size) as index:
            pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
            return gz(data[index])

    x = torch.randn(6, 4)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (6, 2)
    assert [f.name for f in trace.nodes["z"]["cond_indep_stack"]] == ["data"]
    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(_labelled_model, guide, x)))
    assert iwae_log_likelihood(_labelled_model, guide, x, num_samples=8).shape == (6,)
    # the caller's plate subsamples and scales
    trace = poutine.trace(guide).get_trace(x, subsample_size=2)
    assert trace.nodes["z"]["value"].shape == (2, 2)
    assert trace.nodes["z"]["scale"] == pytest.approx(3.0)


def test_guide_inside_a_callers_plate_checks_rows_and_options():
    q = amortized_posterior(4, 2, flow="iaf", hidden=(8,), context=2)
    x = torch.randn(6, 4)
    with pytest.raises(
        ValueError, match=r"batch shape \(6,\): the enclosing plate 'data' has 2 rows"
    ):
        with pyro.plate("data", 6, subsample_size=2):
            AmortizedGuide(q)(x)
    with pytest.raises(ValueError, match="built with subsample_size=2"):
        with pyro.plate("data", 6):
            AmortizedGuide(q, size=6, subsample_size=2)(x)
    with pytest.raises(ValueError, match=r"has dim=-2 but the guide was built with dim=-1"):
        with pyro.plate("data", 6, dim=-2):
            AmortizedGuide(q)(x)


def test_a_body_of_the_wrong_width_is_named():
    encoder = Encoder(None, 2, body=torch.nn.Linear(4, 7), body_features=8)
    with pytest.raises(ValueError, match=r"features of shape \(3, 7\) but .* body_features=8"):
        encoder(torch.zeros(3, 4))
    assert [
        t.shape
        for t in Encoder(None, 2, body=torch.nn.Linear(4, 8), body_features=8)(torch.zeros(3, 4))
    ] == [(3, 2), (3, 2), (3, 16)]


def test_a_trained_guide_pickles_and_keeps_training():
    # pyro.module hangs weak references on the parameters, which pickle refuses
    import io
    import pickle

    model = LinearGaussian()
    x = model.data(64, seed=1)
    guide = AmortizedGuide(amortized_posterior(D, LATENT, flow="iaf").double())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    loaded = pickle.loads(pickle.dumps(guide))
    pyro.set_rng_seed(0)
    expected = iwae_log_likelihood(model, guide, x, num_samples=8)
    pyro.set_rng_seed(0)
    torch.testing.assert_close(iwae_log_likelihood(model, loaded, x, num_samples=8), expected)
    assert torch.isfinite(torch.tensor(svi.step(x)))  # the original trains on


def float32_linear_gaussian():
    """The linear-Gaussian model in float32 (a default encoder's dtype) and 8 of its rows."""
    model = LinearGaussian()

    def float_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ model.W.T.float(), NOISE).to_event(1), obs=x)

    return float_model, model.data(8, seed=0).float()


def test_an_unregistered_guide_under_svi_says_once_that_it_will_not_train():
    import warnings

    float_model, x = float32_linear_gaussian()
    guide = AmortizedGuide(amortized_posterior(D, LATENT, flow="iaf", hidden=(8,)), register=False)

    svi = SVI(float_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    with pytest.warns(UserWarning, match="register=False.*is run by SVI.step.*will not train"):
        svi.step(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(x)  # once, not at every step
        Trace_ELBO().differentiable_loss(float_model, guide, x)  # a torch optimizer's loop
    fresh = AmortizedGuide(amortized_posterior(D, LATENT, flow="iaf", hidden=(8,)), register=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trace_ELBO().differentiable_loss(float_model, fresh, x)  # no SVI.step: no warning


def test_an_unregistered_guide_that_the_caller_registers_gets_no_warning():
    import warnings

    float_model, x = float32_linear_gaussian()
    inner = AmortizedGuide(amortized_posterior(D, LATENT, flow="iaf", hidden=(8,)), register=False)

    def guide(x):
        pyro.module("encoder", inner)  # as Pyro's VAE tutorial registers its encoder
        return inner(x)

    svi = SVI(float_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    before = [p.detach().clone() for p in inner.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(x)
    assert any(not torch.equal(a, p) for a, p in zip(before, inner.parameters(), strict=True))


def test_iwae_drops_the_log_prob_of_observations_the_model_masks_out():
    # poutine.mask sets the site's mask (the distribution itself stays unmasked), so only
    # iwae's own masking keeps the hidden coordinates out: for rows whose hidden coordinates
    # are masked the estimate is the evidence of the seen coordinates alone.
    model = LinearGaussian()
    keep, drop = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
    n = 16
    x = model.data(n, seed=4)
    row_mask = torch.arange(n) % 2 == 0  # even rows: hidden coordinates masked out

    def masked_model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros(LATENT, dtype=data.dtype), 1.0).to_event(1)
            )
            loc = z @ model.W.T + model.b
            pyro.sample("x_seen", dist.Normal(loc[..., keep], NOISE).to_event(1), obs=data[:, keep])
            with poutine.mask(mask=~row_mask):
                pyro.sample(
                    "x_hidden", dist.Normal(loc[..., drop], NOISE).to_event(1), obs=data[:, drop]
                )

    # the guide: the exact posterior given the seen coordinates, widened (a Gaussian q)
    w_seen, b_seen = model.W[keep], model.b[keep]
    precision = torch.eye(LATENT, dtype=torch.float64) + w_seen.T @ w_seen / NOISE**2
    cov = torch.linalg.inv(precision)
    gain = torch.zeros(LATENT, D, dtype=torch.float64)
    gain[:, keep] = cov @ w_seen.T / NOISE**2
    encoder = Encoder(D, LATENT, hidden=(), context=0, min_scale=0.0).double()
    with torch.no_grad():
        encoder.loc.weight.copy_(gain)
        encoder.loc.bias.copy_(-gain[:, keep] @ b_seen)
        encoder.scale.bias.copy_(torch.log(torch.expm1(1.3 * cov.diagonal().sqrt())))
    guide = AmortizedGuide(AmortizedPosterior(encoder))

    torch.manual_seed(5)
    estimate = iwae_log_likelihood(masked_model, guide, x, num_samples=2000)
    seen_cov = w_seen @ w_seen.T + NOISE**2 * torch.eye(len(keep), dtype=torch.float64)
    seen_only = dist.MultivariateNormal(b_seen, seen_cov).log_prob(x[:, keep])
    full = model.log_evidence(x)
    truth = torch.where(row_mask, seen_only, full)
    assert estimate.shape == (n,)
    assert (estimate - truth).abs().max() < 0.1
    assert (full - seen_only)[row_mask].abs().min() > 1.0  # the mask matters on these rows


def test_a_subsampling_guide_encodes_the_rows_it_draws():
    n, batch = 30, 7
    model = LinearGaussian()
    x = model.data(n, seed=6)
    posterior = model.gaussian_guide(inflate=1.0).posterior  # loc depends on x
    guide = AmortizedGuide(posterior, size=n, subsample_size=batch)
    pyro.set_rng_seed(3)
    trace = poutine.trace(guide).get_trace(x)
    index = trace.nodes["data"]["value"]
    assert index.shape == (batch,)
    assert not torch.equal(index, torch.arange(batch))  # drawn rows, not the first ones
    site = trace.nodes["z"]
    expected = posterior(x[index])
    torch.testing.assert_close(site["fn"].base_dist.loc, expected.base_dist.loc)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), expected.log_prob(site["value"]))
    # the drawn z sits near the exact posterior mean of those same rows
    exact_mean = (x[index] - model.b) @ model.gain.T
    torch.testing.assert_close(site["fn"].base_dist.loc, exact_mean)

    # the same with a flow posterior: its log q(z | x) is that of the drawn rows
    flow_q = amortized_posterior(D, LATENT, flow="iaf", hidden=(8,), context=2).double()
    with torch.no_grad():
        torch.manual_seed(0)
        for head in (flow_q.encoder.loc, flow_q.encoder.scale):
            head.weight.normal_()
    flow_guide = AmortizedGuide(flow_q, size=n, subsample_size=batch, name="flow_guide")
    pyro.set_rng_seed(4)
    trace = poutine.trace(flow_guide).get_trace(x)
    index = trace.nodes["data"]["value"]
    assert not torch.equal(index, torch.arange(batch))
    z = trace.nodes["z"]["value"]
    torch.testing.assert_close(trace.nodes["z"]["fn"].log_prob(z), flow_q(x[index]).log_prob(z))


def test_the_encoder_scale_never_falls_below_min_scale():
    encoder = Encoder(D, LATENT, hidden=(4,), context=3, min_scale=0.05)
    with torch.no_grad():
        encoder.scale.bias.fill_(-1e3)  # softplus of the head is 0
    _, scale, _ = encoder(torch.randn(6, D))
    torch.testing.assert_close(scale, torch.full((6, LATENT), 0.05))
    q = AmortizedPosterior(encoder, iaf(LATENT, context=3, hidden=(8,)))
    assert torch.isfinite(q(torch.randn(6, D)).rsample()).all()
    # an untrained encoder: softplus(head) == 1, plus the default floor 1e-3
    _, scale, _ = Encoder(D, LATENT, hidden=(4,), context=0)(torch.randn(3, D))
    torch.testing.assert_close(scale, torch.full((3, LATENT), 1.0 + 1e-3))


def test_a_mini_batch_keeps_the_models_own_indices():
    # size=N with a mini-batch: the guide does not know the batch's indices and must not
    # hand the model 0..B-1 in their place (a model reading covariates by them got the
    # wrong rows)
    n = 100
    covariate = torch.arange(n, dtype=torch.float32)
    data = torch.randn(n, 3)
    seen = {}

    def model(x, idx):
        with pyro.plate("data", n, subsample=idx) as i:
            seen["i"] = i
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True) + covariate[i, None]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    guide = AmortizedGuide(amortized_posterior(3, 2, flow="iaf", hidden=(8,)), size=n)
    idx = torch.arange(90, 98)
    pyro.clear_param_store()
    loss = Trace_ELBO().loss(model, guide, data[idx], idx)
    assert seen["i"].tolist() == idx.tolist()
    assert math.isfinite(loss)
    guide_trace = poutine.trace(guide).get_trace(data[idx], idx)
    assert guide_trace.nodes["z"]["scale"] == pytest.approx(n / 8)
    assert "data" not in guide_trace.nodes  # no indices recorded for the model to replay


def test_a_semi_supervised_guide_enumerates_the_label_around_the_flow_posterior():
    from pyro.infer import TraceEnum_ELBO, config_enumerate

    torch.manual_seed(0)
    x = torch.randn(6, 1) * 1.5
    q = amortized_posterior(3, 1, flow="iaf", hidden=(8,), context=2)
    guide_z = AmortizedGuide(q, register=False)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(2)))
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + y.unsqueeze(-1).float(), 1.0).to_event(1), obs=x)

    def x_and_label(x, y):  # q(z | x, y): x broadcast against y's enumerated dim
        onehot = torch.nn.functional.one_hot(y, 2).float()
        shape = torch.broadcast_shapes(onehot.shape[:-1], x.shape[:-1])
        return torch.cat([x.expand(*shape, 1), onehot.expand(*shape, 2)], -1)

    def guide_with(sample_z, enumerate=True):
        def guide(x):
            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", dist.Categorical(logits=torch.zeros(x.shape[0], 2)))
                return sample_z(x_and_label(x, y))

        return config_enumerate(guide) if enumerate else guide

    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    torch.manual_seed(1)
    ours = elbo.loss(model, guide_with(guide_z), x)
    torch.manual_seed(1)
    direct = elbo.loss(model, guide_with(lambda v: pyro.sample("z", q(v))), x)
    assert ours == pytest.approx(direct, rel=1e-6)
    particles = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    assert math.isfinite(particles.loss(model, guide_with(guide_z, enumerate=False), x))


def test_a_nested_plate_guide_takes_an_image_encoder():
    # dim=-2 took only (rows, features): the singleton dims now go into the encoder's
    # outputs, so any encoder body works
    body = torch.nn.Flatten(-3)
    encoder = Encoder(None, 2, context=0, body=body, body_features=25)
    guide = AmortizedGuide(AmortizedPosterior(encoder), dim=-2, register=False)
    images = torch.randn(4, 1, 5, 5)
    z = guide(images)
    assert z.shape == (4, 1, 2)


def test_subsampling_options_that_cannot_hold_are_refused():
    q = amortized_posterior(3, 2, flow="iaf", hidden=(8,))
    with pytest.raises(ValueError, match="subsample_size=10 is more than size=4"):
        AmortizedGuide(q, size=4, subsample_size=10)
    guide = AmortizedGuide(q, size=10, subsample_size=4, register=False)
    with pytest.raises(ValueError, match="x has 3 rows, fewer than size=10: a mini-batch"):
        guide(torch.randn(3, 3))

    def model(x):
        with pyro.plate("data", 10, subsample_size=4):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    for max_batch in (2**15, 8, 3):  # the same message however x is cut into passes
        with pytest.raises(ValueError, match="guide was built with subsample_size=4"):
            iwae_log_likelihood(model, guide, torch.randn(10, 3), 4, max_batch=max_batch)
    with pytest.raises(ValueError, match=r"flow options \['flow_hidden', 'transforms'\]"):
        amortized_posterior(10, 8, flow=None, transforms=5, flow_hidden=(3,))


@pytest.mark.parametrize("size", [6, None])
def test_a_shuffled_batch_of_every_row_keeps_the_models_own_indices(size):
    # all N rows in shuffled order (randperm(N).split(B) with B >= N): the guide recorded
    # 0..N-1 and the model, replayed, read its covariates by those instead of its own; a
    # guide without size did the same to any batch
    n = 6
    covariate = torch.arange(n, dtype=torch.float32)
    data = torch.randn(n, 3)
    seen = {}

    def model(x, idx):
        with pyro.plate("data", n, subsample=idx) as i:
            seen["i"] = i
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True) + covariate[i, None]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    guide = AmortizedGuide(amortized_posterior(3, 2, hidden=(8,)), size=size, register=False)
    for idx in (torch.tensor([5, 2, 0, 4, 1, 3]), torch.tensor([4, 1, 3])):
        Trace_ELBO().loss(model, guide, data[idx], idx)
        assert seen["i"].tolist() == idx.tolist()


def test_iwae_takes_more_rows_than_a_guides_size():
    # a guide trained on N rows, scored on a larger test set: refused or not depending on
    # max_batch (whether a pass held more than N rows)
    q = amortized_posterior(3, 2, flow="iaf", hidden=(8,))
    x = torch.randn(15, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    sized, plain = AmortizedGuide(q, size=10, register=False), AmortizedGuide(q, register=False)
    torch.manual_seed(0)
    a = iwae_log_likelihood(model, sized, x, 8)
    torch.manual_seed(0)
    b = iwae_log_likelihood(model, plain, x, 8)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="size=10.*a guide without size"):
        sized(x)  # outside iwae, still refused, with the remedy for a test set


def test_iwae_sums_out_a_discrete_latent_the_model_enumerates():
    # y ~ Categorical(pi), z | y ~ N(m_y, 1), x | z ~ N(z, 1), y left to TraceEnum_ELBO:
    # p(x) = sum_y pi_y N(x; m_y, sqrt 2). Refused before ("latent sites differ")
    pi = torch.tensor([0.3, 0.7], dtype=torch.float64)
    m = torch.tensor([-2.0, 1.5], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(pi), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(m[y], 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 1.3))

    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5], dtype=torch.float64)
    exact = torch.logsumexp(pi.log() + dist.Normal(m, 2**0.5).log_prob(x[:, None]), -1)
    torch.manual_seed(0)
    estimate = iwae_log_likelihood(model, guide, x, 5000, max_batch=4000)  # several passes
    # Monte Carlo error at most 0.024 over seeds 0-2; without the sum over y, or without
    # pi, the estimate is off by 0.3 nats or more
    torch.testing.assert_close(estimate, exact, atol=0.05, rtol=0)


def test_a_guide_with_a_support_draws_on_it_with_the_change_of_variables():
    from torch.distributions import constraints

    torch.manual_seed(0)
    q = amortized_posterior(5, 3, flow="iaf", hidden=(8,))
    x = torch.randn(4, 5)
    guide = AmortizedGuide(q, support=constraints.positive, register=False)
    site = poutine.trace(guide).get_trace(x).nodes["z"]
    z = site["value"]
    assert z.shape == (4, 3)
    assert bool((z > 0).all())
    # log q(z) = log q_R(log z) - sum log z
    expected = q(x).log_prob(z.log()) - z.log().sum(-1)
    calls = []
    for module in q.flow.modules():
        if type(module).__name__ == "MADE":
            module.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(site["fn"].log_prob(z), expected)
    # its own draw is scored without the IAF's inverse (3 passes a layer here), as
    # without a support: the bijection's output is cached
    assert calls == []
    q(x).log_prob(z.log())  # a fresh point: the inverse runs
    assert len(calls) == 3 * len(q.flow.transforms)
    simplex = AmortizedGuide(q, support=constraints.simplex, register=False)
    w = poutine.trace(simplex).get_trace(x).nodes["z"]["value"]
    assert w.shape == (4, 4)  # stick-breaking: latent_dim + 1 entries
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    with pytest.raises(TypeError, match="support must be a .*Constraint"):
        AmortizedGuide(q, support="positive")
    with pytest.raises(ValueError, match="no bijection from the reals"):
        AmortizedGuide(q, support=constraints.nonnegative_integer)


def test_iwae_names_guide_draws_outside_the_models_support():
    # a Gamma z with the guide on all of R^d: with Pyro's validation off, the weights
    # were finite and meaningless (torch's Gamma(1) density is finite at z < 0)
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(torch.ones(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    guide = AmortizedGuide(amortized_posterior(1, 2, hidden=(8,)), register=False)
    x = torch.randn(6, 1)
    pyro.enable_validation(False)
    try:
        with pytest.raises(ValueError, match=r"site 'z' fall outside.*support=constraints\."):
            iwae_log_likelihood(model, guide, x, num_samples=10)
    finally:
        pyro.enable_validation(True)


def test_iwae_refuses_an_enumerated_site_in_a_plate_inside_the_data_plate():
    # c per pixel of each row: the weight needs prod_j sum_c, and the rows' sum over the
    # pixels came first (sum_c prod_j: 3.6 nats off on two rows), unsaid
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pix", x.shape[1], dim=-1):
                c = pyro.sample(
                    "c", dist.Bernoulli(torch.tensor(0.5)), infer={"enumerate": "parallel"}
                )
                pyro.sample("x", dist.Normal(z + 3.0 * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0))

    with pytest.raises(ValueError, match=r"enumerates site 'c' in plate\(s\) \['data', 'pix'\]"):
        iwae_log_likelihood(model, guide, torch.randn(2, 3), 10)


def test_a_guide_built_with_size_alone_scores_every_row_in_iwae():
    q = amortized_posterior(3, 2, flow="iaf", hidden=(8,))
    x = torch.randn(10, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    sized, plain = AmortizedGuide(q, size=10, register=False), AmortizedGuide(q, register=False)
    for max_batch in (2**15, 20):
        torch.manual_seed(0)
        a = iwae_log_likelihood(model, sized, x, 8, max_batch=max_batch)
        torch.manual_seed(0)
        b = iwae_log_likelihood(model, plain, x, 8, max_batch=max_batch)
        torch.testing.assert_close(a, b)


def test_inside_the_callers_plate_a_wrongly_shaped_x_is_still_refused():
    # batch dims left of the rows are taken only where Pyro put them (an open plate of
    # that size, an enumeration dim) or of size 1: x stacked twice over counted the ELBO
    q = amortized_posterior(4, 2, flow="iaf", hidden=(8,), context=2)
    guide = AmortizedGuide(q, register=False)
    x = torch.randn(6, 4)
    with pyro.plate("data", 6):
        assert guide(x[None]).shape == (1, 6, 2)
        with pytest.raises(ValueError, match=r"batch shape \(2, 6\): the enclosing plate"):
            guide(torch.stack([x, x]))
    with pyro.plate("particles", 2, dim=-2), pyro.plate("data", 6):
        assert guide(torch.stack([x, x])).shape == (2, 6, 2)


def test_inside_a_subsampled_outer_plate_the_guide_takes_the_subsample():
    q = amortized_posterior(3, 2, flow="iaf", hidden=(8,), context=2)
    guide = AmortizedGuide(q, register=False)
    x = torch.randn(100, 5, 3)
    with pyro.plate("groups", 100, subsample_size=10, dim=-2) as idx, pyro.plate("data", 5):
        assert guide(x[idx]).shape == (10, 5, 2)
    index = torch.arange(7)
    with pyro.plate("groups", 100, subsample=index, dim=-2), pyro.plate("data", 5):
        assert guide(x[index]).shape == (7, 5, 2)


def test_iwae_refuses_a_guide_whose_plate_has_another_dim():
    # the rows broadcast into an 8 x 8 grid: the estimate was ~94 nats off, silently,
    # where SVI's loss refuses the same pair
    torch.manual_seed(0)
    x = torch.randn(8, 6)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True).expand(z.shape[:-1] + (6,))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x.unsqueeze(-2))

    posterior = amortized_posterior(6, 3, flow="iaf", hidden=(16,))
    wrong = AmortizedGuide(posterior, register=False)  # dim=-1
    with pytest.raises(ValueError, match="Model and guide shapes disagree at site 'z'"):
        iwae_log_likelihood(model, wrong, x, num_samples=20)
    right = AmortizedGuide(posterior, dim=-2, register=False)
    exact = dist.MultivariateNormal(torch.zeros(6), 3 * torch.ones(6, 6) + torch.eye(6))
    estimate = iwae_log_likelihood(model, right, x, num_samples=2000)
    assert abs(estimate.mean().item() - exact.log_prob(x).mean().item()) < 0.3
