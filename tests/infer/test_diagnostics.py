import math
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to, constraints

from pyroflows.infer import (
    AutoFlow,
    Diagnosis,
    diagnose,
    importance_draws,
    importance_resample,
    loo,
    summarize,
    to_arviz,
)
from pyroflows.infer.diagnostics import GENERIC_REMEDY, psis, remedy_for, verdict

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


@pytest.fixture
def sequential_runs(monkeypatch):
    """A list that grows by one each time the draws are scored one at a time."""
    from pyroflows.infer.diagnostics import _sequential_draws

    calls = []
    monkeypatch.setattr(
        "pyroflows.infer.diagnostics._sequential_draws",
        lambda *a: calls.append(1) or _sequential_draws(*a),
    )
    return calls


def normal_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def exact_guide_model():
    pyro.sample("z", dist.Normal(1.0, 2.0))


def exact_guide():
    pyro.sample("z", dist.Normal(1.0, 2.0))


def unit_model():
    pyro.sample("z", dist.Uniform(0.0, 1.0))


def nowhere_guide():
    # every draw where unit_model has density 0
    pyro.sample("z", dist.Uniform(5.0, 6.0))


def narrow_guide():
    # far too narrow and off-centre: the weights p/q have a very heavy tail
    pyro.sample("z", dist.Normal(0.0, 0.3))


def test_exact_guide_has_equal_weights_and_full_ess():
    report = diagnose(exact_guide_model, exact_guide, num_samples=500)
    assert isinstance(report, Diagnosis)
    assert report.elbo == pytest.approx(0.0, abs=1e-5)  # log p(x) = 0 for a normalized p
    assert report.log_evidence == pytest.approx(0.0, abs=1e-5)
    assert report.ess == pytest.approx(500, rel=1e-3)
    assert report.khat < 0.5
    assert report.trustworthy
    assert report.verdict.startswith("good")
    assert "k-hat" in str(report)
    assert "log p(x) ~ " in str(report)  # an estimate, not a bound ('>=' before)
    assert "unreliable" not in str(report)
    shaky = Diagnosis(0.9, 40.0, 500, -3.0, 0.48, verdict(0.9))
    assert "log p(x) ~ 0.48 (unreliable at this k-hat)" in str(shaky)


def test_a_guide_far_wider_than_the_posterior_is_not_called_close():
    def model():
        pyro.sample("mu", dist.Normal(0.0, 0.1))

    def wide_guide():
        pyro.sample("mu", dist.Normal(0.0, 3.0))

    diagnosis = diagnose(model, wide_guide, num_samples=4000)
    assert diagnosis.khat < 0.5  # importance sampling from it is reliable
    assert diagnosis.verdict.startswith("good for importance sampling")
    assert "importance_resample" in diagnosis.verdict
    assert f"ESS {diagnosis.ess / diagnosis.num_samples:.1%}" in diagnosis.verdict  # as printed


def test_bad_guide_is_flagged():
    report = diagnose(exact_guide_model, narrow_guide, num_samples=2000)
    assert report.khat > 0.7
    assert not report.trustworthy
    assert report.verdict.startswith("do not trust")
    assert report.ess < 200


def test_log_weights_match_the_densities():
    log_w, draws = importance_draws(exact_guide_model, narrow_guide, num_samples=300)
    z = draws["z"]
    expected = dist.Normal(1.0, 2.0).log_prob(z) - dist.Normal(0.0, 0.3).log_prob(z)
    assert log_w.shape == (300,)
    assert torch.allclose(log_w, expected, atol=1e-5)


def test_model_that_does_not_broadcast_falls_back_to_one_draw_at_a_time():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        # float() breaks vectorization over a particle plate
        pyro.sample("obs", dist.Normal(float(z), 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(0.2, 0.8))

    log_w, draws = importance_draws(model, guide, num_samples=50)
    z = draws["z"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(torch.tensor(0.5))
        - dist.Normal(0.2, 0.8).log_prob(z)
    )
    assert torch.allclose(log_w, expected, atol=1e-5)


def test_a_model_that_fails_one_draw_at_a_time_raises_its_own_error():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if z.dim():
            raise RuntimeError("shape error of the particle plate")
        raise ValueError("the model's own error")

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="the model's own error"):
        importance_draws(model, guide, num_samples=5)


def test_verdict_thresholds():
    assert verdict(0.3).startswith("good")
    assert verdict(0.5).startswith("usable")
    assert verdict(0.7).startswith("usable")
    assert verdict(0.71).startswith("do not trust")
    assert verdict(math.nan).startswith("do not trust")


def test_trustworthy_holds_up_to_and_at_0_7():
    def report(khat):
        return Diagnosis(khat, 900.0, 1000, -1.0, -0.9, verdict(khat))

    assert report(0.7).trustworthy  # "usable with care" ends at 0.7, as the verdict reads
    assert not report(0.7 + 1e-9).trustworthy
    assert not report(math.nan).trustworthy
    assert not report(math.inf).trustworthy


def test_the_good_readings_note_quotes_the_ess_it_prints_the_smoothed_one():
    # a raw ESS of 60% and a smoothed one of 40%: the line that prints the smoothed
    # one judges by it (and the other way round)
    assert "importance_resample" in verdict(0.3, 0.6, smoothed_ess_fraction=0.4)
    assert "ESS 40.0%" in verdict(0.3, 0.6, smoothed_ess_fraction=0.4)
    judged_by_smoothed = verdict(0.3, 0.4, smoothed_ess_fraction=0.6)
    assert not judged_by_smoothed.startswith("good for importance sampling")
    assert "ESS 60.0%" in judged_by_smoothed
    assert "close to the posterior" in verdict(0.3, 0.4, smoothed_ess_fraction=0.95)
    assert "importance_resample" in verdict(0.3, 0.4)  # the raw one, when alone


def test_verdict_for_a_guide_that_misses_mass_names_the_remedies_that_work():
    # measured on posteriordb's GP regression: more draws per step and the STL estimator
    # widened an under-dispersed flow; more steps, layers or a smaller final lr did not
    reading = verdict(0.9, 0.1)
    assert "num_particles=16, vectorize_particles=True" in reading
    assert "estimator='stl'" in reading
    assert "smaller learning rate" not in reading


def test_verdict_gives_the_remedy_it_is_told_in_place_of_the_generic_one():
    reading = verdict(0.9, 0.1, remedy="fit it better")
    assert reading.endswith("(fit it better)")
    assert "estimator='stl'" not in reading
    assert GENERIC_REMEDY in verdict(0.9, 0.1)
    assert verdict(0.3, remedy="fit it better") == verdict(0.3)  # only a guide that misses
    with pytest.raises(TypeError, match="remedy must be a string or None, got int"):
        verdict(0.9, remedy=3)


@pytest.mark.parametrize("estimator", ["reparam", "stl"])
def test_a_flow_guide_that_misses_mass_is_told_what_it_can_still_change(estimator):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    # untrained and ten times too narrow: its weights have a heavy tail
    guide = AutoFlow(model, warm_start=None, init_scale=0.1, estimator=estimator)
    for report in (guide.diagnose(num_samples=1000), diagnose(model, guide, num_samples=1000)):
        assert report.verdict.startswith("do not trust")
        assert "num_particles=16, vectorize_particles=True" in report.verdict
        assert "in place of a Gaussian" not in report.verdict  # it is a flow already
        # an STL guide is not told to use STL
        assert ("or estimator='stl'" in report.verdict) == (estimator == "reparam")
        # nor a cold guide (no Laplace warm start) left to think more steps of the
        # same would do (a mini-batched model's first call skips the warm start)
        assert "started cold (warm_start=None)" in report.verdict
        assert "warm-start it (warm_start='laplace')" in report.verdict
    warm = AutoFlow(model, estimator=estimator)
    warm()
    assert warm.anchor == "laplace"
    assert "started cold" not in remedy_for(warm)
    assert remedy_for(AutoNormal(model)) is None  # any other guide: the generic advice


def test_verdict_never_prints_a_khat_on_the_wrong_side_of_its_threshold():
    assert "k-hat 0.4996 < 0.5" in verdict(0.4996)
    assert "k-hat 0.7004 > 0.7" in verdict(0.7004)
    assert "k-hat 0.5004 in" in verdict(0.5004)
    assert "k-hat 0.31 < 0.5" in verdict(0.3149)
    # a small k-hat with widely varying weights: reliable importance sampling, not a
    # guide close to the posterior
    wide = verdict(0.3, 0.05)
    assert wide.startswith("good for importance sampling")
    assert "ESS 5.0% of the draws" in wide
    assert "close to the posterior" not in wide
    assert "the guide is close to the posterior" in verdict(0.3, 0.95)
    assert "the guide is close to the posterior" in verdict(0.3)  # no ESS given
    # weights that vary less, but enough to matter (an sd ratio near 2 in one coordinate,
    # as three of Pyro's fits on posteriordb had beside k-hat < 0.5): still good, but
    # resampled draws are closer than the raw ones
    varied = verdict(0.3, 0.62)
    assert varied.startswith("good: k-hat 0.30 < 0.5")
    assert "ESS 62.0% of the draws" in varied
    assert "importance_resample()" in varied
    assert "the guide is close to the posterior" not in varied
    # an ESS just under a threshold is not printed on its other side
    assert "ESS 89.96% of the draws" in verdict(0.3, 0.8996)
    assert "ESS 49.996% of the draws" in verdict(0.3, 0.49996)
    # PSIS cannot see a mode that no draw visits, and the good verdict says so
    for ess in (0.62, 0.95):
        assert "a mode no draw comes near stays unseen" in verdict(0.3, ess)
    assert "(ESS 6.5% of the draws: the raw draws are far from it)" in verdict(0.65, 0.065)
    assert "ESS" not in verdict(0.65, 0.8)


def test_verdict_notes_a_large_khat_on_nearly_flat_weights():
    # a guide very close to the posterior: log weights within a few hundredths of a nat,
    # but their right tail is heavy relative to that bulk (as seen on posteriordb with the
    # "stl" estimator); the reading stays "do not trust" but says why it may be misleading
    g = np.random.default_rng(0)
    flat = 0.02 * g.standard_normal(2000)
    flat[:100] = 0.04 + np.minimum(0.01 * (g.uniform(size=100) ** -1.5 - 1), 0.6)
    report = summarize(torch.tensor(flat))
    assert report.khat > 0.7
    assert report.ess / report.num_samples > 0.99
    assert report.verdict.startswith("do not trust")
    assert "barely vary" in report.verdict
    assert "more draws" in report.verdict
    one_mode_missed = 0.02 * g.standard_normal(2000)
    one_mode_missed[0] += 20.0  # smoothing hides this draw; the raw weights do not
    report = summarize(torch.tensor(one_mode_missed))
    assert report.khat > 0.7
    assert "barely vary" not in report.verdict
    heavy = 3.0 * g.standard_normal(2000)  # lognormal weights: heavy for real
    report = summarize(torch.tensor(heavy))
    assert report.khat > 0.7
    assert report.verdict.startswith("do not trust")
    assert "barely vary" not in report.verdict
    assert "barely vary" not in verdict(0.9)  # no ESS given, no note


def test_summarize_non_finite_weights_is_untrustworthy():
    report = summarize(torch.tensor([0.0, 1.0, -math.inf, math.nan, 0.5]))
    assert report.khat == math.inf
    assert not report.trustworthy
    assert summarize(torch.full((50,), -math.inf)).verdict.startswith("do not trust: every")


def test_weights_of_0_are_left_out_of_the_pareto_fit_and_said():
    g = np.random.default_rng(0)
    lw = 0.3 * g.standard_normal(2000)
    with_zeros = lw.copy()
    with_zeros[:500] = -np.inf
    smoothed, khat = psis(with_zeros)
    assert (smoothed[:500] == -np.inf).all()
    expected, expected_k = psis(lw[500:])
    np.testing.assert_allclose(smoothed[500:], expected)
    assert khat == expected_k < 0.5
    report = summarize(with_zeros)
    assert report.ess == pytest.approx(summarize(lw[500:]).ess)
    assert report.trustworthy  # the weights are fine: importance sampling works
    # but the raw draws are not all possible
    assert report.verdict.startswith("usable with care")
    assert "500 of the 2000 draws have weight 0" in report.verdict
    few = summarize(np.concatenate([lw[:10], np.full(990, -np.inf)]))
    assert "cannot be estimated from 10 draws of positive weight" in few.verdict
    one = summarize(np.array([0.1, -np.inf])).verdict
    assert "1 of the 2 draws has weight 0 (the model gives it" in one
    with (
        pyro.validation_enabled(False),  # the model scores values outside its support
        pytest.raises(ValueError, match="none of the 20 proposals has a positive finite weight"),
    ):
        importance_resample(unit_model, nowhere_guide, num_samples=2, num_proposals=20)


def test_psis_needs_two_draws():
    with pytest.raises(ValueError, match="at least 2"):
        psis(np.array([0.0]))


def test_psis_normalizes():
    smoothed, khat = psis(0.3 * torch.randn(1000))
    assert np.logaddexp.reduce(smoothed) == pytest.approx(0.0, abs=1e-9)
    assert khat < 0.5


@pytest.mark.parametrize("log_joint", [-27.2, -300.0, -3000.0])
def test_weights_that_differ_by_rounding_are_constant(log_joint):
    # an exact guide in float32: its log weights differ by a few units in the last place
    # of the log joint; a Pareto fit of that reads noise (ArviZ gave k-hat inf)
    ulp = float(np.spacing(np.float32(log_joint)))
    g = torch.Generator().manual_seed(0)
    lw = (torch.tensor(log_joint) + ulp * torch.randint(-3, 4, (2000,), generator=g)).float()
    smoothed, khat = psis(lw)
    assert khat == -math.inf
    np.testing.assert_allclose(smoothed, lw.double() - torch.logsumexp(lw.double(), 0))
    report = summarize(lw)
    assert report.trustworthy
    assert report.verdict.startswith("good: the weights are constant (each within 1%")
    # spread beyond 1%: read by the Pareto fit as before
    assert psis(0.02 * torch.randn(2000, generator=g))[1] > -math.inf


@pytest.mark.parametrize(
    ("step", "values", "seed"),
    [
        (0.005, 3, 0),  # ArviZ's own k-hat is inf (no draw above the tail's cutoff)
        (0.02, 8, 3),  # ArviZ gives k-hat 0.04 and NaN smoothed weights
    ],
)
def test_a_pareto_fit_that_fails_on_a_tied_tail_is_said(step, values, seed):
    # weights rounded to a few values, spread over more than 1%: the raw weights are
    # kept, and the verdict says why (the NaN weights gave "ESS 0" beside k-hat 0.04)
    lw = step * np.random.default_rng(seed).integers(-values, values + 1, 2000).astype(float)
    smoothed, khat = psis(lw)
    assert khat == math.inf
    np.testing.assert_allclose(smoothed, lw - np.logaddexp.reduce(lw))
    report = summarize(lw)
    assert report.ess == pytest.approx(2000, rel=0.02)
    assert "tie in their tail" in report.verdict
    assert "float64" in report.verdict
    assert "outweighs" not in report.verdict  # no draw does: the ESS is all of them


def test_too_few_draws_are_said_even_when_their_weights_are_close():
    # the 1% rule applies where a tail could be fitted: 5 draws get "too few draws"
    report = summarize(np.array([0.0, 0.003, -0.004, 0.006, 0.001]))
    assert "cannot be estimated from 5 draws" in report.verdict
    assert summarize(np.zeros(5)).khat == -math.inf  # exactly constant: still constant


def test_log_evidence_is_the_log_mean_weight_not_the_elbo():
    # q = N(2, 2.5) against p = N(1, 2) (normalized: log p(x) = 0); KL(q || p) = 0.183
    def wide_guide():
        pyro.sample("z", dist.Normal(2.0, 2.5))

    pyro.set_rng_seed(0)
    report = diagnose(exact_guide_model, wide_guide, num_samples=8000)
    kl = math.log(2.0 / 2.5) + (2.5**2 + 1.0) / (2 * 2.0**2) - 0.5
    assert report.elbo == pytest.approx(-kl, abs=0.03)
    assert report.log_evidence == pytest.approx(0.0, abs=0.03)


def test_importance_resample_corrects_a_biased_guide():
    def biased_guide():
        pyro.sample("z", dist.Normal(2.0, 2.5))

    draws = importance_resample(exact_guide_model, biased_guide, num_samples=4000)
    z = draws["z"]
    assert z.shape == (4000,)
    assert z.mean().item() == pytest.approx(1.0, abs=0.15)  # the guide's mean is 2.0
    assert z.std().item() == pytest.approx(2.0, abs=0.15)


def test_num_samples_is_checked():
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(exact_guide_model, exact_guide, num_samples=0)
    with pytest.raises(ValueError, match="num_proposals"):
        importance_resample(exact_guide_model, exact_guide, num_samples=5, num_proposals=1)
    with pytest.raises(ValueError, match=r"num_proposals must be at least num_samples \(10\)"):
        importance_resample(exact_guide_model, exact_guide, num_samples=10, num_proposals=5)


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")  # Pyro's own warning at the site
def test_importance_resample_refuses_proposals_of_infinite_weight():
    # a draw of log weight +inf cannot be normalized against the others: it was dropped
    # (given probability 0, the opposite of its weight) and the rest resampled
    def spiked_model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("spike", torch.where(z > 1.0, torch.tensor(math.inf), torch.tensor(0.0)))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=r"proposals \(the first is proposal \d+\) have a log"):
        importance_resample(spiked_model, guide, num_samples=10)


def test_to_arviz_on_a_pyro_autoguide():
    data = torch.randn(20) + 3.0
    guide = AutoNormal(normal_model)
    guide(data)
    idata = to_arviz(normal_model, guide, data, num_samples=200)
    assert set(idata.posterior.data_vars) == {"loc", "scale"}
    assert idata.posterior["loc"].shape == (1, 200)
    assert (idata.posterior["scale"].values > 0).all()  # constrained space
    assert idata.sample_stats["log_importance_weight"].shape == (1, 200)
    assert np.logaddexp.reduce(idata.sample_stats["psis_log_weight"].values[0]) == pytest.approx(
        0.0, abs=1e-9
    )
    assert "khat" in idata.posterior.attrs
    summary = az.summary(idata, kind="stats")
    assert list(summary.index) == ["loc", "scale"]


def test_draws_one_at_a_time_leave_out_plate_indices():
    # a model that cannot broadcast over a particle plate takes the sequential route
    def model(y):
        s = pyro.sample("s", dist.HalfNormal(2.0))
        with pyro.plate("g", 2):
            m = pyro.sample("m", dist.Normal(0.0, 1.0))
        mu = m.reshape(2).sum()
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, s), obs=y)

    pyro.clear_param_store()
    y = torch.randn(20)
    guide = AutoNormal(model)
    guide(y)
    log_w, draws = importance_draws(model, guide, y, num_samples=6)
    assert set(draws) == {"s", "m"}
    assert tuple(draws["m"].shape) == (6, 2)
    assert log_w.shape == (6,)


def test_verdict_when_arviz_gives_an_infinite_k_hat_for_finite_weights():
    few = summarize(torch.randn(20) * 0.1)  # a tail of 4 draws: no Pareto fit
    assert few.khat == math.inf
    assert "cannot be estimated from 20 draws" in few.verdict
    assert "not finite" not in few.verdict
    dominated = summarize(torch.cat([torch.randn(199) * 0.1, torch.tensor([800.0])]))
    assert dominated.khat == math.inf
    assert "outweighs all the others" in dominated.verdict
    assert summarize(torch.tensor([0.0, math.inf, 1.0])).verdict.endswith("not finite")


def summed_model(y):
    # runs under a particle plate, but z.sum() adds up every draw's z, not one draw's
    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=y)


def test_a_model_that_mixes_the_draws_up_is_scored_one_draw_at_a_time():
    def guide(y):
        pyro.sample("z", dist.Normal(0.5, 0.7).expand([3]).to_event(1))

    y = torch.tensor(2.0)
    log_w, draws = importance_draws(summed_model, guide, y, num_samples=40)
    z = draws["z"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z.sum(-1), 1.0).log_prob(y)
        - dist.Normal(0.5, 0.7).log_prob(z).sum(-1)
    )
    torch.testing.assert_close(log_w, expected)
    # the exact posterior mean of each z is y / 4 = 0.5
    resampled = importance_resample(summed_model, guide, y, num_samples=500)["z"]
    assert resampled.mean(0).sub(0.5).abs().max().item() < 0.15


def test_a_point_mass_guide_is_refused():
    from pyro.infer.autoguide import AutoDelta

    data = torch.randn(20) + 3.0
    guide = AutoDelta(normal_model)
    guide(data)
    with pytest.raises(ValueError, match="every one of the guide's 100 draws is the same point"):
        diagnose(normal_model, guide, data, num_samples=100)


def test_a_subsampling_model_is_refused_by_name():
    def model(y, size=None):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("rows", len(y), subsample_size=size) as rows:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y[rows])

    def guide(y, size=None):
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    y = torch.randn(100)
    with pytest.raises(ValueError, match=r"subsamples plate 'rows' \(10 of 100 rows\)"):
        diagnose(model, guide, y, 10, num_samples=50)
    assert diagnose(model, guide, y, num_samples=50).num_samples == 50  # the full data


def test_importance_resample_warns_when_the_weights_cannot_be_trusted():
    with pytest.warns(UserWarning, match=r"importance_resample: k-hat .* > 0.7") as caught:
        importance_resample(exact_guide_model, narrow_guide, num_samples=200)
    assert caught[0].filename == __file__  # points at the caller's line


def test_importance_resample_does_not_call_nearly_flat_weights_a_few_repeated_draws():
    # a factor of a few steps (0.02 apart): weights that tie, with ESS above 99%, whose
    # tail ArviZ can read as heavy; the warning said the resampled draws "repeat a few
    # proposals", beside an ESS of 1989 of 2000
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("steps", 0.02 * torch.clamp(torch.round(4 * z), -8, 8))

    def prior_guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    said = []
    for seed in range(6):
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importance_resample(model, prior_guide, num_samples=200)
        said += [str(w.message) for w in caught]
    assert said  # some seeds give k-hat > 0.7 (seed 3: 8.97)
    for message in said:
        assert "though the weights barely vary" in message
        assert "repeat a few proposals" not in message


def test_a_model_with_latents_the_guide_does_not_set_is_reported():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        hidden = pyro.sample("hidden", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z + hidden, 0.1), obs=torch.tensor(0.3))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    blocked = pyro.poutine.block(model, hide=["hidden"])
    with pytest.warns(UserWarning, match="draws latent sites the guide does not set"):
        diagnose(blocked, guide, num_samples=50)


def test_observed_data_left_out_of_the_arguments_is_named():
    # y=None (as for Predictive) makes the model draw y: the weights carry its noise,
    # and the warning names the site and says to pass the data
    def model(y=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 0.1), obs=y)

    def guide(y=None):
        pyro.sample("z", dist.Normal(0.3, 0.1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagnose(model, guide, num_samples=50)
    told = [str(w.message) for w in caught if "does not set ('y')" in str(w.message)]
    assert told, [str(w.message) for w in caught]
    assert "Observed data left out of the arguments" in told[0]


def test_weights_of_another_shape_than_one_per_draw_are_refused():
    with pytest.raises(ValueError, match=r"log_weights must have shape \(S,\).*got \(4, 50\)"):
        summarize(torch.randn(4, 50))
    with pytest.raises(ValueError, match="log_weights must have shape"):
        psis(np.zeros((10, 1)))


def eight_schools_like(y, broadcast=True):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        standard = pyro.sample("standard", dist.Normal(0.0, 1.0))
        shift = mu if broadcast else float(mu)  # float() breaks the particle plate
        theta = pyro.deterministic("theta", shift + tau * standard)
        pyro.sample("y", dist.Normal(theta, 10.0), obs=y)
    pyro.deterministic("count", torch.tensor(float(len(y))))


def eight_schools_guide(broadcast):
    """Four schools' data and an untrained AutoNormal of ``eight_schools_like``."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0])
    pyro.set_rng_seed(0)
    guide = AutoNormal(eight_schools_like)
    guide(y, broadcast)
    return y, guide


@pytest.mark.parametrize("broadcast", [True, False])
def test_deterministic_sites_come_with_the_draws(broadcast):
    from pyroflows.infer.diagnostics import _batch_agrees

    y, guide = eight_schools_guide(broadcast)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "pyroflows.infer.diagnostics._batch_agrees",
            lambda *a: calls.append(1) or _batch_agrees(*a),
        )
        idata = to_arviz(eight_schools_like, guide, y, broadcast, num_samples=60)
    assert bool(calls) == broadcast  # the vectorized route, checked, or one at a time
    post = idata.posterior
    assert post["theta"].shape == (1, 60, 4)
    expected = post["mu"].values[..., None] + post["tau"].values[..., None] * post["standard"]
    np.testing.assert_allclose(post["theta"].values, expected, rtol=1e-5)
    assert (post["count"].values == 4.0).all()
    with warnings.catch_warnings():  # an untrained guide: k-hat is above 0.7, mostly
        warnings.filterwarnings("ignore", "importance_resample: k-hat", UserWarning)
        draws = importance_resample(eight_schools_like, guide, y, broadcast, num_samples=30)
    assert draws["theta"].shape == (30, 4)
    torch.testing.assert_close(
        draws["theta"], draws["mu"][:, None] + draws["tau"][:, None] * draws["standard"]
    )
    # importance_draws keeps to the latents
    assert set(importance_draws(eight_schools_like, guide, y, broadcast, num_samples=5)[1]) == {
        "mu",
        "tau",
        "standard",
    }


def test_a_deterministic_site_that_mixes_the_draws_up_is_computed_one_draw_at_a_time():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.deterministic("total", z.sum())  # sums every draw's z under a particle plate

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    idata = to_arviz(model, guide, num_samples=50)
    np.testing.assert_allclose(
        idata.posterior["total"].values, idata.posterior["z"].values.sum(-1), rtol=1e-5
    )


def test_the_batch_check_leaves_seeded_results_as_they_were(monkeypatch):
    # an autoguide's model is wrapped by its init_loc_fn, which draws from the prior
    # even under a condition: the check must not move the random stream
    from pyroflows import AutoFlow

    data = torch.randn(20) + 3.0
    pyro.set_rng_seed(0)
    guide = AutoFlow(normal_model, warm_start=None)
    guide(data)
    runs = []
    for check in (True, False):
        if not check:
            monkeypatch.setattr("pyroflows.infer.diagnostics._batch_agrees", lambda *a: True)
        pyro.set_rng_seed(1)
        log_w, _ = importance_draws(guide.model, guide, data, num_samples=50)
        runs.append((log_w, torch.rand(3)))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_a_deterministic_site_that_is_nan_keeps_the_vectorized_route(sequential_runs):
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.deterministic("log_z", torch.log(z))  # NaN for every negative draw

    def guide():
        pyro.sample("z", dist.Normal(-2.0, 0.1))  # every draw negative

    idata = to_arviz(model, guide, num_samples=20)
    assert not sequential_runs
    assert np.isnan(idata.posterior["log_z"].values).all()


def hierarchical_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("groups", len(y)):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta, 1.0), obs=y)


def test_the_batch_check_of_an_iaf_guide_inverts_no_flow(sequential_runs, monkeypatch):
    # scoring one of an IAF guide's draws again would invert it in D network passes a
    # layer (at D = 1000, minutes per check): the check takes the batch's log q instead
    from pyroflows import AutoFlow
    from pyroflows.transforms.autoregressive import _Autoregressive

    y = torch.randn(30)
    pyro.set_rng_seed(0)
    guide = AutoFlow(hierarchical_model, warm_start=None)
    guide(y)

    def no_inverse(*args):
        raise AssertionError("the D-pass inverse ran")

    monkeypatch.setattr(_Autoregressive, "_iterate", no_inverse)
    log_w, samples = importance_draws(hierarchical_model, guide, y, num_samples=40)
    assert not sequential_runs
    # the batch's weights are the guide's: log q(z_s) of its own draws, from the cache
    monkeypatch.undo()
    with torch.no_grad():
        value = torch.cat(
            [
                samples["mu"][:, None],
                biject_to(constraints.positive).inv(samples["tau"])[:, None],
                samples["theta"],
            ],
            -1,
        )
        posterior = guide.get_posterior()
        tau = samples["tau"]
        log_p = (
            dist.Normal(0.0, 5.0).log_prob(samples["mu"])
            + dist.HalfNormal(5.0).log_prob(tau)
            + tau.log()  # the Jacobian of tau = exp(v)
            + dist.Normal(0.0, 1.0).log_prob(samples["theta"]).sum(-1)
            + dist.Normal(samples["mu"][:, None] + tau[:, None] * samples["theta"], 1.0)
            .log_prob(y)
            .sum(-1)
        )
        expected = log_p - posterior.log_prob(value)  # a fresh tensor: D passes a layer
    torch.testing.assert_close(log_w, expected, rtol=1e-4, atol=1e-3)


def test_the_batch_check_still_rescores_a_guide_subclass_that_mixes_draws(sequential_runs):
    # only Pyro's own Gaussian/IAF guides and AutoFlow made of pyroflows layers are taken
    # at their batch's word: a subclass whose posterior mixes the draws is caught
    from pyro.distributions.transforms import Transform
    from pyro.infer.autoguide import AutoMultivariateNormal

    class ShiftByTheBatch(Transform):  # log-det of each draw reads the whole batch
        domain = codomain = constraints.real_vector
        bijective = True

        def _call(self, u):
            return u

        def _inverse(self, x):
            return x

        def log_abs_det_jacobian(self, u, x):
            return 5.0 * (u.mean(0, keepdim=True) ** 2).sum(-1).expand(u.shape[:-1])

    class MixingGuide(AutoMultivariateNormal):
        def get_posterior(self, *args, **kwargs):
            q = super().get_posterior(*args, **kwargs)
            return dist.TransformedDistribution(q, [ShiftByTheBatch()])

    y = torch.randn(30)
    pyro.set_rng_seed(0)
    guide = MixingGuide(hierarchical_model)
    guide(y)
    importance_draws(hierarchical_model, guide, y, num_samples=40)
    assert sequential_runs  # the guide's side of the check failed: one draw at a time


def test_the_batch_check_of_an_autoguide_still_catches_a_model_that_mixes_draws(
    sequential_runs,
):
    from pyroflows import AutoFlow

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.factor("penalty", -0.5 * (z**2).sum())  # sums every draw's z: one number

    pyro.set_rng_seed(0)
    guide = AutoFlow(model, warm_start=None)
    guide()
    log_w, samples = importance_draws(model, guide, num_samples=30)
    assert sequential_runs  # the model's side of the check failed: one draw at a time
    with torch.no_grad():
        z = samples["z"]
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - 0.5 * (z**2).sum(-1)
        expected = log_p - guide.get_posterior().log_prob(z.clone())
    torch.testing.assert_close(log_w, expected, rtol=1e-4, atol=1e-4)


def test_draws_are_scored_in_runs_of_at_most_chunk_draws_that_join_up(monkeypatch):
    # a model's intermediates grow with the draws under the plate (a GP's S x n x n
    # kernels): many draws are scored a chunk at a time, and the chunks join up
    from pyroflows.infer import diagnostics

    sizes = []
    vectorized = diagnostics.vectorized_importance_weights
    monkeypatch.setattr(diagnostics, "_CHUNK", 7)
    monkeypatch.setattr(
        diagnostics,
        "vectorized_importance_weights",
        lambda *a, **k: sizes.append(k["num_samples"]) or vectorized(*a, **k),
    )
    y = torch.tensor([0.5, -1.0, 2.0])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.deterministic("double", 2 * mu)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(0.3, 0.5))

    log_w, samples, pointwise = diagnostics._draws(model, guide, (y,), {}, 20, True, True)
    assert sizes == [3, 6, 6, 5]  # a trial run of 3 draws checked first, then runs of <= 7
    mu = samples["mu"]
    assert len(set(mu.tolist())) == 20
    lik = dist.Normal(mu[:, None], 1.0).log_prob(y)
    prior_over_q = dist.Normal(0.0, 2.0).log_prob(mu) - dist.Normal(0.3, 0.5).log_prob(mu)
    torch.testing.assert_close(log_w, prior_over_q + lik.sum(-1))
    torch.testing.assert_close(samples["double"], 2 * mu)
    torch.testing.assert_close(pointwise.log_lik["y"], lik)
    torch.testing.assert_close(pointwise.rest, prior_over_q)
    assert pointwise.vectorized


def test_no_chunk_is_a_single_draw_the_batch_check_could_not_read(monkeypatch):
    from pyroflows.infer import diagnostics

    assert diagnostics._chunks(256) == [256]
    assert diagnostics._chunks(257) == [129, 128]
    assert diagnostics._chunks(513) == [171, 171, 171]
    assert diagnostics._chunks(1) == [1]
    monkeypatch.setattr(diagnostics, "_CHUNK", 8)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        # under the particle plate a running sum over the draws: draw 0 is left alone,
        # and only a run of two draws or more shows it
        pyro.sample("obs", dist.Normal(mu.cumsum(0), 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("mu", dist.Normal(0.2, 0.8))

    log_w, draws = importance_draws(model, guide, num_samples=17)  # chunks of 8, 8, 1 before
    z = draws["mu"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, 1.0).log_prob(torch.tensor(0.5))
        - dist.Normal(0.2, 0.8).log_prob(z)
    )
    torch.testing.assert_close(log_w, expected)


def mixing_model(y):
    a = pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    pyro.deterministic("shift", a.sum(-1))
    with pyro.plate("data", len(y)):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))  # a local latent: the guide has the plate
        pyro.sample("y", dist.Normal(a.sum() + u, s), obs=y)  # sums every draw's a


@pytest.mark.parametrize("guide_class", ["AutoMultivariateNormal", "AutoFlow"])
def test_a_distribution_like_guide_draws_once_for_a_model_scored_one_draw_at_a_time(
    guide_class, sequential_runs, monkeypatch
):
    # the model runs once a draw; the guide, one batch a chunk: its draws, log q and the
    # Jacobian of each constrained site must still give each draw's own weight
    import pyro.infer.autoguide

    from pyroflows import AutoFlow
    from pyroflows.infer import diagnostics
    from pyroflows.infer.diagnostics import _draws

    y = torch.tensor([0.5, -0.3, 1.2, 0.1])
    make = AutoFlow if guide_class == "AutoFlow" else getattr(pyro.infer.autoguide, guide_class)
    guide = make(mixing_model)
    guide(y)
    monkeypatch.setattr(diagnostics, "_GUIDE_CHUNK", 16)
    batch, batches = diagnostics._guide_batch, []
    monkeypatch.setattr(diagnostics, "_guide_batch", lambda *a: batches.append(a[3]) or batch(*a))
    posterior = guide.get_posterior
    calls = []
    guide.get_posterior = lambda *a: calls.append(1) or posterior(*a)
    log_w, samples, pointwise = _draws(mixing_model, guide, (y,), {}, 40, True, observed=True)
    assert sequential_runs
    assert batches == [14, 13, 13]  # the guide's draws in chunks, not all at once
    assert len(calls) <= 10  # not one guide run a draw (40)
    with torch.no_grad():
        a, s, u = samples["a"], samples["s"], samples["u"]
        log_q = posterior().log_prob(torch.cat([a, s.log()[:, None], u], -1)) - s.log()
        lik = dist.Normal(a.sum(-1, keepdim=True) + u, s[:, None]).log_prob(y)
        log_p = dist.Normal(0.0, 1.0).log_prob(torch.cat([a, u], -1)).sum(-1)
        log_p = log_p + dist.LogNormal(0.0, 0.5).log_prob(s)
    torch.testing.assert_close(log_w, log_p + lik.sum(-1) - log_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(samples["shift"], a.sum(-1))
    torch.testing.assert_close(pointwise.log_lik["y"], lik)
    torch.testing.assert_close(pointwise.rest, log_p - log_q, rtol=1e-4, atol=1e-4)
    assert len(set(s.tolist())) == 40  # forty draws, not one repeated


def test_a_guide_site_the_model_observes_keeps_the_data():
    # a guide set up with y latent, then scored with y observed: the data stay the data
    from pyro.infer.autoguide import AutoMultivariateNormal

    from pyroflows.infer.diagnostics import _draws

    def model(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(float(mu), 1.0), obs=y)  # float(): one draw at a time

    guide = AutoMultivariateNormal(model)
    guide()
    y = torch.tensor(3.0)
    _, samples, pointwise = _draws(model, guide, (y,), {}, 30, False, observed=True)
    assert set(samples) == {"mu"}
    expected = dist.Normal(samples["mu"], 1.0).log_prob(y)
    torch.testing.assert_close(pointwise.log_lik["y"], expected)


# ---------------------------------------------------------------- log-likelihood and LOO

PRIOR_SD, NOISE_SD = 2.0, 1.0


def conjugate_model(y, scale=1.0):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(y)), poutine.scale(scale=scale):
        pyro.sample("y", dist.Normal(mu, NOISE_SD), obs=y)


def conjugate_posterior(y, scale=1.0):
    """Mean and sd of mu given y (each point's likelihood to the power ``scale``)."""
    precision = PRIOR_SD**-2 + scale * len(y) / NOISE_SD**2
    return scale * float(y.sum()) / NOISE_SD**2 / precision, precision**-0.5


def exact_loo(y, scale=1.0):
    """log p(y_i | y_-i) for every i: a Normal of the held-out posterior's predictive."""
    out = []
    for i in range(len(y)):
        loc, sd = conjugate_posterior(torch.cat([y[:i], y[i + 1 :]]), scale)
        out.append(dist.Normal(loc, math.hypot(NOISE_SD, sd)).log_prob(y[i]))
    return torch.stack(out).numpy()


def shifted_guide(y, scale=1.0):
    # off-centre by half a posterior sd and 40% too wide: usable, but not the posterior
    loc, sd = conjugate_posterior(y, scale)
    pyro.sample("mu", dist.Normal(loc + 0.5 * sd, 1.4 * sd))


def test_loo_of_a_guide_matches_the_exact_leave_one_out():
    from pyroflows.infer import loo

    y = torch.linspace(-2.0, 3.0, 20)
    exact = exact_loo(y)
    loc, sd = conjugate_posterior(y)
    lppd = dist.Normal(loc, math.hypot(NOISE_SD, sd)).log_prob(y).sum().item()
    pyro.set_rng_seed(0)
    result = loo(conjugate_model, shifted_guide, y, num_samples=4000)
    assert result["n_data_points"] == 20
    assert result["n_samples"] == 4000
    assert result["loo_i"].shape == (20,)
    assert result["pareto_k"].shape == (20,)
    np.testing.assert_allclose(result["loo_i"].values, exact, atol=0.05)
    assert result["elpd_loo"] == pytest.approx(exact.sum(), abs=0.1)
    assert result["p_loo"] == pytest.approx(lppd - exact.sum(), abs=0.1)
    assert result["se"] == pytest.approx(math.sqrt(20 * np.var(exact)), rel=0.02)
    assert (result["pareto_k"].values < 0.7).all()
    assert not result["warning"]
    # ArviZ's own loo on the same kind of draws takes them for posterior draws: 2 nats off
    pyro.set_rng_seed(0)
    idata = to_arviz(conjugate_model, shifted_guide, y, num_samples=4000)
    assert abs(az.loo(idata)["elpd_loo"] - exact.sum()) > 1.0
    # results compare as az.loo's do
    pyro.set_rng_seed(1)
    with warnings.catch_warnings():
        # ArviZ 0.23's compare calls a pandas method that pandas 3.1 deprecates
        warnings.filterwarnings("ignore", message="The inplace keyword")
        table = az.compare({"shifted": result, "also": loo(conjugate_model, shifted_guide, y)})
    assert set(table.index) == {"shifted", "also"}


def test_loo_warns_about_points_it_cannot_estimate():
    from pyroflows.infer import loo

    def narrow(y):
        pyro.sample("mu", dist.Normal(conjugate_posterior(y)[0] + 1.0, 0.02))

    y = torch.linspace(-2.0, 3.0, 20)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match=r"20 of 20 data points have Pareto k-hat above 0\.6667"):
        result = loo(conjugate_model, narrow, y, num_samples=1000)
    assert result["warning"]


def test_loo_notes_points_whose_large_k_hat_sits_on_flat_ratios():
    # each point's likelihood is flat in mu below 1 (most draws): the ratios tie at their
    # largest value, and ArviZ's k-hat is inf, though the estimates are close
    y = torch.linspace(-2.0, 2.0, 10)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.05 * torch.relu(mu - 1.0) ** 2, 1.0), obs=y)

    def prior_guide(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    from pyroflows.infer import loo

    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match=r"data points have Pareto k-hat") as record:
        result = loo(model, prior_guide, y, num_samples=4000)
    message = str(record[0].message)
    assert "all of them have leave-one-out ratios that barely vary" in message
    assert (result["pareto_k"].values > 0.7).any()
    # nearly p(y_i | mu = 0): the likelihood barely depends on mu where the prior is
    exact = dist.Normal(0.0, 1.0).log_prob(y).numpy()
    np.testing.assert_allclose(result["loo_i"].values, exact, atol=0.01)
    # a guide far off: large k-hats on ratios that vary, and no such note
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match=r"data points have Pareto k-hat") as record:
        loo(
            conjugate_model,
            lambda y: pyro.sample("mu", dist.Normal(1.5, 0.02)),
            y,
            num_samples=1000,
        )
    assert "barely vary" not in str(record[0].message)


def test_loo_of_ratios_tied_in_their_tail_is_finite():
    # weights of 17 values 0.02 apart, and data that do not depend on z: ArviZ's
    # smoothing gave NaN, and elpd_loo and p_loo were NaN for half the seeds
    y = torch.tensor([0.3, -0.5, 1.0])

    def model(y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        step = torch.floor(17 * dist.Normal(0.0, 1.0).cdf(z)).clamp(max=16) - 8
        pyro.factor("steps", 0.02 * step)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0 * z, 1.0), obs=y)

    def prior_guide(y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    exact = dist.Normal(0.0, 1.0).log_prob(y).sum().item()
    for seed in (0, 3, 5):  # each NaN before
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the failed fits' k-hat: inf
            result = loo(model, prior_guide, y, num_samples=2000)
        assert result["elpd_loo"] == pytest.approx(exact, abs=1e-6)
        assert result["p_loo"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("broadcast", [True, False])
def test_to_arviz_log_likelihood_is_each_points_log_density(broadcast):
    y, guide = eight_schools_guide(broadcast)
    idata = to_arviz(eight_schools_like, guide, y, broadcast, num_samples=50)
    # the observed site only: not the deterministic sites
    assert set(idata.log_likelihood.data_vars) == {"y"}
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    theta = torch.from_numpy(idata.posterior["theta"].values[0])
    expected = dist.Normal(theta, 10.0).log_prob(y).numpy()
    assert idata.log_likelihood["y"].shape == (1, 50, 4)
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an untrained guide's k-hats
        assert az.loo(idata)["n_data_points"] == 4
    no_lik = to_arviz(eight_schools_like, guide, y, broadcast, num_samples=5, log_likelihood=False)
    assert "log_likelihood" not in no_lik.groups()


def test_log_likelihood_and_loo_take_the_data_sites_by_name():
    from pyroflows.infer import loo

    def model(y, z):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.factor("penalty", -0.5 * mu**2)  # not a data point
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        pyro.sample("z", dist.Normal(mu, 1.0).expand([2, 3]).to_event(2), obs=z)

    def guide(y, z):
        pyro.sample("mu", dist.Normal(0.5, 0.3))

    y, z = torch.randn(5), torch.randn(2, 3)
    idata = to_arviz(model, guide, y, z, num_samples=40)
    assert set(idata.log_likelihood.data_vars) == {"y", "z"}
    assert idata.log_likelihood["z"].shape == (1, 40)  # one point: its event is (2, 3)
    with pytest.raises(ValueError, match=r"2 observed sites \['y', 'z'\].*var_name="):
        loo(model, guide, y, z, num_samples=40)
    with pytest.raises(ValueError, match=r"var_name must be one of .*got 'w'"):
        loo(model, guide, y, z, num_samples=40, var_name="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert loo(model, guide, y, z, num_samples=40, var_name="y")["n_data_points"] == 5
    with pytest.raises(ValueError, match="no observed site"):
        loo(exact_guide_model, exact_guide, num_samples=40)


def test_loo_of_a_tempered_model_fits_with_the_scale_and_predicts_without():
    from pyroflows.infer import loo

    # the points weigh 2 in the fit; the predictive density of a point is still p(y_i | mu)
    y = torch.linspace(-2.0, 3.0, 20)
    pyro.set_rng_seed(0)
    result = loo(conjugate_model, shifted_guide, y, 2.0, num_samples=4000)
    np.testing.assert_allclose(result["loo_i"].values, exact_loo(y, 2.0), atol=0.05)


def test_loo_counts_draws_where_only_the_left_out_point_has_density_0():
    from pyroflows.infer import loo

    # y_i ~ Uniform(0, theta): a draw with theta below the largest point has weight 0, but
    # belongs to that point's leave-one-out posterior, which starts at the second largest
    y = torch.tensor([0.5, 1.2, 2.0, 2.6, 3.1, 4.0], dtype=torch.float64)

    def model(y):
        theta = pyro.sample("theta", dist.Uniform(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Uniform(0.0, theta), obs=y)

    def guide(y):
        pyro.sample("theta", dist.Uniform(2.9, 10.0))

    grid = torch.linspace(0.0, 10.0, 200_001, dtype=torch.float64)[1:]
    exact = []
    for i in range(len(y)):
        rest = torch.cat([y[:i], y[i + 1 :]])
        posterior = torch.where(grid > rest.max(), grid ** -(len(y) - 1), 0.0)  # flat prior
        predictive = torch.where(grid > y[i], 1 / grid, 0.0)
        exact.append(math.log(float((posterior * predictive).sum() / posterior.sum())))
    with pyro.validation_enabled(False):  # a Uniform's support moves with theta
        pyro.set_rng_seed(0)
        result = loo(model, guide, y, num_samples=4000)
    np.testing.assert_allclose(result["loo_i"].values, exact, atol=0.05)  # the last: -2.63


def test_points_whose_entries_are_all_masked_inside_to_event_are_not_data():
    # d.mask(m).to_event(1): the mask is over each point's entries (shape (N, 3) beside
    # a log-density of shape (N,)); the weight's expand to (N,) raised a RuntimeError
    y = torch.randn(6, 3)
    entries = torch.ones(6, 3, dtype=torch.bool)
    entries[1] = False  # point 1: every entry masked
    entries[4, 0] = False  # point 4: one entry masked, a point still

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 2.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0).mask(entries).to_event(1), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(y.mean(0), 0.4).to_event(1))

    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a rough guide's k-hats
        result = loo(model, guide, y, num_samples=500)
    assert result["n_data_points"] == 5
    with pytest.warns(UserWarning, match=r"a distribution's \.mask\(m\)"):
        idata = to_arviz(model, guide, y, num_samples=20)
    lik = idata.log_likelihood["y"].values[0]
    assert np.isnan(lik[:, 1]).all()
    assert np.isfinite(np.delete(lik, 1, axis=1)).all()


@pytest.mark.parametrize("how", ["poutine.mask", "distribution.mask"])
def test_masked_points_are_not_data(how):
    from pyroflows.infer import loo

    y = torch.tensor([0.3, -1.2, 9.9, 0.8, 9.9, 1.5])
    kept = torch.tensor([True, True, False, True, False, True])

    def masked(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            if how == "poutine.mask":
                with poutine.mask(mask=kept):
                    pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
            else:  # the distribution's own mask: its masked points score 0 alike
                pyro.sample("y", dist.Normal(mu, 1.0).mask(kept), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(0.35, 0.5))

    results = []
    for model, data in ((masked, y), (conjugate_model, y[kept])):
        pyro.set_rng_seed(0)
        results.append(loo(model, guide, data, num_samples=2000))
    assert results[0]["n_data_points"] == 4
    assert results[0]["loo_i"].dims == ("y_point",)
    np.testing.assert_allclose(results[0]["loo_i"].values, results[1]["loo_i"].values, rtol=1e-6)
    assert results[0]["se"] == pytest.approx(results[1]["se"], rel=1e-6)
    # NaN where masked, and a warning: az.loo and az.waic of NaN points give NaN
    with pytest.warns(UserWarning, match=r"masks out points of 'y'.*az\.loo and az\.waic"):
        idata = to_arviz(masked, guide, y, num_samples=20)
    np.testing.assert_array_equal(
        np.isnan(idata.log_likelihood["y"].values[0]), ~kept.expand(20, 6).numpy()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own, on 20 draws
        assert np.isnan(az.loo(idata).elpd_loo)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_arviz(conjugate_model, guide, y[kept], num_samples=20)  # nothing masked: quiet


@pytest.mark.parametrize("broadcast", [True, False])
def test_pointwise_terms_add_up_to_the_log_weight(broadcast):
    from pyroflows.infer.diagnostics import _draws, _weighted

    kept = torch.tensor([True, False, True, True])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.factor("penalty", -0.1 * mu**2)
        with pyro.plate("data", len(y)), poutine.scale(scale=0.5), poutine.mask(mask=kept):
            shift = mu if broadcast else float(mu)  # float() breaks the particle plate
            pyro.sample("y", dist.Normal(shift, 1.0), obs=y)
        pyro.sample("total", dist.Normal(mu, 1.0), obs=y.sum())

    def guide(y):
        pyro.sample("mu", dist.Normal(0.3, 0.5))

    log_w, _, pointwise = _draws(model, guide, (torch.randn(4),), {}, 30, False, observed=True)
    assert set(pointwise.sites) == {"y", "total"}
    total = pointwise.rest.double()
    for name, data in pointwise.sites.items():
        total = total + _weighted(pointwise.log_lik[name], data).reshape(30, -1).sum(1)
    torch.testing.assert_close(total, log_w.double(), rtol=1e-5, atol=1e-4)


def test_reserved_options_and_single_points_are_said():
    from pyroflows.infer import loo

    y = torch.randn(5)
    with pytest.raises(TypeError, match=r"log_likelihood must be True or False.*got 'studentt'"):
        to_arviz(conjugate_model, shifted_guide, y, num_samples=10, log_likelihood="studentt")
    with pytest.raises(TypeError, match="var_name must be a site name"):
        loo(conjugate_model, shifted_guide, y, num_samples=10, var_name=1)

    def one_point(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)

    with warnings.catch_warnings(record=True) as record:  # and one about that point's k-hat
        warnings.simplefilter("always")
        assert loo(one_point, shifted_guide, y, num_samples=200)["n_data_points"] == 1
    assert any("single data point" in str(w.message) for w in record)


@pytest.mark.parametrize("broadcast", [True, False])
def test_posterior_predictive_replicates_the_data_at_each_draw(broadcast, sequential_runs):
    def model(y, broadcast):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu if broadcast else float(mu), 1.0), obs=y)
        loc = mu[..., None, None].expand(mu.shape + (2, 3))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(2), obs=torch.zeros(2, 3))

    def guide(y, broadcast):
        pyro.sample("mu", dist.Normal(3.0, 2.0))

    pyro.set_rng_seed(0)
    idata = to_arviz(model, guide, torch.randn(5) + 10.0, broadcast, num_samples=2000)
    assert bool(sequential_runs) != broadcast  # one batch, or one draw at a time
    replicates = idata.posterior_predictive
    assert replicates["y"].shape == (1, 2000, 5)
    assert replicates["z"].shape == (1, 2000, 2, 3)
    mu = idata.posterior["mu"].values[0]
    y = replicates["y"].values[0]
    # y_rep = mu_s + N(0, 1) noise: the draw's mu, not the prior's, nor the data
    assert np.std(y - mu[:, None]) == pytest.approx(1.0, abs=0.03)
    assert np.corrcoef(y[:, 0], mu)[0, 1] == pytest.approx(2.0 / math.sqrt(5.0), abs=0.02)
    assert np.corrcoef(y[:, 0], y[:, 1])[0, 1] == pytest.approx(0.8, abs=0.03)


def test_posterior_predictive_is_left_out_when_the_data_cannot_be_drawn():
    class ScoreOnly(dist.Normal):
        def rsample(self, sample_shape=()):
            raise NotImplementedError("no sampler")

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", ScoreOnly(mu, 1.0), obs=y)

    with pytest.warns(UserWarning, match=r"no posterior_predictive group.*\['y'\].*no sampler"):
        idata = to_arviz(model, shifted_guide, torch.randn(4), num_samples=20)
    assert "posterior_predictive" not in idata.groups()
    assert "log_likelihood" in idata.groups()
    with pytest.raises(TypeError, match="posterior_predictive must be True or False"):
        to_arviz(model, shifted_guide, torch.randn(4), num_samples=20, posterior_predictive=1)
    y = torch.randn(4)
    quiet = to_arviz(model, shifted_guide, y, num_samples=20, posterior_predictive=False)
    assert "posterior_predictive" not in quiet.groups()


def test_posterior_predictive_draws_every_point_of_an_observation_without_a_plate():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)  # larger than its distribution

    def guide(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    pyro.set_rng_seed(0)
    idata = to_arviz(model, guide, torch.randn(3), num_samples=400)
    y, mu = idata.posterior_predictive["y"].values[0], idata.posterior["mu"].values[0]
    assert y.shape == (400, 3)
    assert np.std(y - mu[:, None]) == pytest.approx(1.0, abs=0.1)
    assert np.var(y, axis=1, ddof=1).mean() == pytest.approx(1.0, abs=0.15)  # per point


def test_posterior_predictive_keeps_the_draws_apart(sequential_runs):
    def model(y, total):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            ys = pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        # uses the value of y: run under a particle plate with y let go, it would sum every
        # draw's replicates; the weights, with y fixed, do not show it
        pyro.sample("total", dist.Normal(ys.sum(), 0.1), obs=total)

    def guide(y, total):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    pyro.set_rng_seed(0)
    y = torch.randn(5)
    idata = to_arviz(model, guide, y, y.sum(), num_samples=400)
    assert not sequential_runs  # the weights were computed in one batch
    replicates = idata.posterior_predictive
    total, ys = replicates["total"].values[0, :, 0], replicates["y"].values[0]
    assert np.std(total - ys.sum(-1)) == pytest.approx(0.1, rel=0.15)  # each draw's own sum
    # a scalar site is one point of shape (1,) in every group
    assert idata.observed_data["total"].shape == (1,)
    assert idata.log_likelihood["total"].shape == (1, 400, 1)


def test_to_arviz_options_are_checked():
    y = torch.randn(3)
    idata = to_arviz(conjugate_model, shifted_guide, y, num_samples=20, log_likelihood=np.False_)
    assert "log_likelihood" not in idata.groups()
    with pytest.raises(ValueError, match="num_samples must be an int >= 2, got 1"):
        to_arviz(conjugate_model, shifted_guide, y, num_samples=1)
    with pytest.raises(ValueError, match="num_samples must be an int >= 2, got 1"):
        diagnose(conjugate_model, shifted_guide, y, num_samples=1)


def test_a_site_off_by_a_few_nats_is_not_hidden_by_a_weight_of_thousands():
    # under the particle plate the factor sums every draw's t**2: each weight is off by
    # tens of nats, within 1e-3 of |log w| = 28,000 but 100% of the factor's own value
    n, lam = 20000, 0.1
    y = torch.randn(n, generator=torch.Generator().manual_seed(0)) + 3.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        t = pyro.sample("t", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -lam * (t**2).sum())
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    precision = n + 0.01
    loc, scale = float(y.sum()) / precision, precision**-0.5

    def exact(y):  # the posterior itself: every weight is log p(y)
        pyro.sample("mu", dist.Normal(loc, scale))
        pyro.sample("t", dist.Normal(0.0, (1 + 2 * lam) ** -0.5))

    pyro.set_rng_seed(0)
    report = diagnose(model, exact, y, num_samples=200)
    assert report.ess == pytest.approx(200, rel=1e-3)
    log_w, _ = importance_draws(model, exact, y, num_samples=200)
    assert float(log_w.std()) < 0.05


def test_a_guide_that_is_a_point_mass_on_some_sites_is_refused_by_name():
    from pyro.infer.autoguide import AutoDelta, AutoGuideList

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 0.1))
        pyro.sample("b", dist.Normal(a, 1.0))

    pyro.set_rng_seed(0)
    guide = AutoGuideList(model)
    guide.append(AutoDelta(poutine.block(model, expose=["a"])))
    guide.append(AutoNormal(poutine.block(model, hide=["a"])))
    guide()
    with pytest.raises(ValueError, match=r"draws of 'a' are all the same value \(a point mass"):
        diagnose(model, guide, num_samples=50)


def test_a_model_that_mixes_the_draws_is_found_on_a_few_before_a_large_run(monkeypatch):
    from pyroflows.infer import diagnostics

    sizes = []
    vectorized = diagnostics.vectorized_importance_weights
    monkeypatch.setattr(
        diagnostics,
        "vectorized_importance_weights",
        lambda *a, **k: sizes.append(k["num_samples"]) or vectorized(*a, **k),
    )

    def model():  # under the particle plate, (S, S) where one value a draw was meant
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu.unsqueeze(-1) + mu, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("mu", dist.Normal(0.2, 0.8))

    log_w, draws = importance_draws(model, guide, num_samples=500)
    assert sizes == [3]  # not a run of 256 (S x S memory) first
    z = draws["mu"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(2 * z, 1.0).log_prob(torch.tensor(0.5))
        - dist.Normal(0.2, 0.8).log_prob(z)
    )
    torch.testing.assert_close(log_w, expected)


def test_verdict_names_arguments_that_are_not_numbers_or_fractions():
    with pytest.raises(TypeError, match="khat must be a number, got str '0.3'"):
        verdict("0.3")
    with pytest.raises(TypeError, match="khat must be a number, got NoneType"):
        verdict(None)
    with pytest.raises(ValueError, match=r"ess_fraction must be a fraction in \[0, 1\] .*5.0"):
        verdict(0.3, 5.0)
    with pytest.raises(ValueError, match="smoothed_ess_fraction must be a fraction"):
        verdict(0.8, smoothed_ess_fraction=-1.0)
    assert verdict(torch.tensor(0.3)).startswith("good")
    assert verdict(0.3, float("nan")).startswith("good")


def _masked_data_model(y, m):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("d", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=y, obs_mask=m)


def test_a_guide_drawing_entries_the_model_masks_is_warned_about():
    # obs_mask: the model gives y_unobserved no density where m is True, a guide that
    # draws every entry (as an autoguide does) scores them: the weights mean nothing
    y = torch.tensor([0.3, -1.2, 2.0, 0.5, 1.1], dtype=torch.float64)
    m = torch.tensor([True, True, False, True, False])
    seen = y[m]
    n = len(seen)
    loc, scale = seen.sum() / (n + 1), (1.0 / (n + 1)) ** 0.5
    evidence = dist.MultivariateNormal(torch.zeros(n).double(), torch.eye(n).double() + 1)
    truth = evidence.log_prob(seen).item()

    def guide(y, m):
        z = pyro.sample("z", dist.Normal(loc, scale))
        with pyro.plate("d", len(y)):
            pyro.sample("y_unobserved", dist.Normal(z, 1.0))

    def masked_guide(y, m):  # the cure: the guide masks the same entries
        z = pyro.sample("z", dist.Normal(loc, scale))
        with pyro.plate("d", len(y)), poutine.mask(mask=~m):
            pyro.sample("y_unobserved", dist.Normal(z, 1.0))

    with pytest.warns(UserWarning, match=r"masks entries of the latent site\(s\) 'y_unobserved'"):
        importance_draws(_masked_data_model, guide, y, m, num_samples=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_w, _ = importance_draws(_masked_data_model, masked_guide, y, m, num_samples=200)
    torch.testing.assert_close(log_w, torch.full_like(log_w, truth))


def test_a_flat_prior_with_a_factor_keeps_its_weights():
    # Pyro's pattern for a prior given by factors: .mask(False) and pyro.factor; the
    # masked density must not be counted (the factor is the prior)
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0).mask(False))
        pyro.factor("prior", dist.Normal(0.0, 1.0).log_prob(z))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(0.25, 0.5**0.5))

    truth = dist.Normal(0.0, 2**0.5).log_prob(torch.tensor(0.5))
    with pytest.warns(UserWarning, match="unless a factor elsewhere"):
        log_w, _ = importance_draws(model, guide, num_samples=50)
    torch.testing.assert_close(log_w, truth.expand(50), rtol=1e-5, atol=1e-5)


def test_a_latent_the_guide_does_not_draw_is_proposed_by_its_prior():
    # a site the model enumerates in training, which the guide leaves to it: its prior
    # density cancels; before, it stayed in every weight (log p(x) >= -2.09 against -1.52)
    x = torch.tensor(0.7, dtype=torch.float64)

    def model(x):
        c = dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64))
        pyro.sample("c", c, infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0).double(), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    truth = dist.Normal(torch.tensor(0.0).double(), 2**0.5).log_prob(x).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro's "vars in model but not guide"
        log_w, _ = importance_draws(model, guide, x, num_samples=200)
    torch.testing.assert_close(log_w, torch.full_like(log_w, truth))


def _mixture_point(x):
    # c (enumerated) shifts x; the guide draws z only, so c is the model's to sum out
    c = pyro.sample(
        "c", dist.Bernoulli(torch.tensor(0.3).double()), infer={"enumerate": "parallel"}
    )
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0).double(), 1.0))
    pyro.deterministic("z2", 2 * z)
    pyro.deterministic("shift", 2 * c + z)  # varies with c: no one value a draw
    pyro.sample("x", dist.Normal(z + 2 * c, 1.0), obs=x)


def _mixture_point_guide(x):
    pyro.sample("z", dist.Normal(torch.tensor(0.5).double(), 0.8))


def test_an_enumerated_latent_the_guide_does_not_draw_is_summed_out_of_the_weights():
    # log w = log sum_c p(c) p(z) p(x | z, c) - log q(z); before, c was drawn from its
    # prior and the weights read the noise of that draw (k-hat 19 on a fitted mixture)
    x = torch.tensor(1.7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro's "vars in model but not guide"
        log_w, samples = importance_draws(_mixture_point, _mixture_point_guide, x, num_samples=64)
    z = samples["z"]
    assert set(samples) == {"z"}
    unit = dist.Normal(torch.tensor(0.0).double(), 1.0)
    joint = torch.logsumexp(
        torch.stack(
            [
                math.log(0.7) + dist.Normal(z, 1.0).log_prob(x),
                math.log(0.3) + dist.Normal(z + 2, 1.0).log_prob(x),
            ]
        ),
        0,
    )
    expected = unit.log_prob(z) + joint - dist.Normal(torch.tensor(0.5).double(), 0.8).log_prob(z)
    torch.testing.assert_close(log_w, expected)


def test_enumerated_latents_in_a_plate_are_summed_out_row_by_row():
    y = torch.tensor([-2.1, -1.7, 0.2, 1.9, 2.4, 2.2], dtype=torch.float64)
    mix = torch.tensor([0.4, 0.6], dtype=torch.float64)

    def model(y):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2).double(), 5.0).to_event(1))
        with pyro.plate("rows", len(y)):
            k = pyro.sample("k", dist.Categorical(mix), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(locs[k], 1.0), obs=y)

    q = dist.Normal(torch.tensor([-2.0, 2.0]).double(), 0.3).to_event(1)

    def guide(y):
        pyro.sample("locs", q)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_w, samples = importance_draws(model, guide, y, num_samples=40)
    locs = samples["locs"]  # (40, 2)
    rows = dist.Normal(locs[:, None, :], 1.0).log_prob(y[None, :, None]) + mix.log()
    expected = (
        dist.Normal(torch.zeros(2).double(), 5.0).to_event(1).log_prob(locs)
        + torch.logsumexp(rows, -1).sum(-1)
        - q.log_prob(locs)
    )
    torch.testing.assert_close(log_w, expected)
    # a guide a little wider than the posterior of locs: the summed weights call it good
    # (with k drawn from its prior instead, k-hat was 1.8-2.3 on three seeds)
    wider = dist.Normal(torch.tensor([-1.6, 2.0]).double(), 0.6).to_event(1)
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert diagnose(model, lambda y: pyro.sample("locs", wider), y, num_samples=500).khat < 0.5


def test_summed_latents_are_summed_out_of_the_pointwise_likelihood():
    # log p(x | z) = log sum_c p(c) p(x | z, c): before, the log_likelihood group was
    # left out (with a warning) and loo refused any model with a summed site
    x = torch.tensor(1.7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        warnings.filterwarnings("error", message="to_arviz")
        idata = to_arviz(_mixture_point, _mixture_point_guide, x, num_samples=20)
    # z2 does not vary with c; shift does, and has no one value a draw
    assert set(idata.posterior.data_vars) == {"z", "z2"}
    np.testing.assert_allclose(idata.posterior["z2"], 2 * idata.posterior["z"])
    assert idata.posterior_predictive["x"].shape == (1, 20, 1)  # a scalar site: one point
    z = torch.as_tensor(idata.posterior["z"].values[0])
    expected = torch.logsumexp(
        torch.stack(
            [
                math.log(0.7) + dist.Normal(z, 1.0).log_prob(x),
                math.log(0.3) + dist.Normal(z + 2, 1.0).log_prob(x),
            ]
        ),
        0,
    )
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0, :, 0], expected.numpy())


def _grid_loo(y, locs_shift, prior_sd, weights):
    """elpd_i = log p(y_i | y_-i) of a 1-D mixture location model, on a fine grid."""
    mu = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    comps = dist.Normal(mu[:, None, None] + locs_shift, 1.0).log_prob(y[None, :, None])
    ll = torch.logsumexp(comps + weights.log(), -1)  # (grid, n)
    prior = dist.Normal(torch.tensor(0.0).double(), prior_sd).log_prob(mu)
    total = prior + ll.sum(1)
    elpd = []
    for i in range(len(y)):
        without = total - ll[:, i]
        elpd.append(torch.logsumexp(without + ll[:, i], 0) - torch.logsumexp(without, 0))
    return torch.stack(elpd), total


def test_loo_of_a_mixture_with_its_assignments_summed_out_matches_the_exact_leave_one_out():
    # each row's assignment k_i is summed out of log p(y_i | mu); the guide draws mu only.
    # The reference: p(y_i | y_-i) by quadrature over mu
    y = torch.tensor([-1.4, -0.3, 0.5, 2.2, 3.1, 3.9, 6.0], dtype=torch.float64)
    shift = torch.tensor([0.0, 3.0], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0).double(), 3.0))
        with pyro.plate("rows", len(y)):
            k = pyro.sample("k", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(mu + shift[k], 1.0), obs=y)

    exact, total = _grid_loo(y, shift, 3.0, weights)
    mu = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    post = torch.softmax(total, 0)
    mean = (post * mu).sum()
    sd = ((post * (mu - mean) ** 2).sum()).sqrt()
    q = dist.Normal(mean, 1.3 * sd)  # a little wider than the posterior

    def guide(y):
        pyro.sample("mu", q)

    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        result = loo(model, guide, y, num_samples=4000)
    # Monte Carlo error: at most 0.05 a point and 0.05 in all over seeds 0-5; a pointwise
    # term without the mixture's weights would be off by log 2 a point
    np.testing.assert_allclose(result.loo_i.values, exact.numpy(), atol=0.08)
    assert abs(result.elpd_loo - exact.sum().item()) < 0.1


def test_a_drawn_latent_that_depends_on_a_summed_site_weighs_the_components():
    # z_i (drawn by the guide) depends on k_i: log p(y_i | z) = log sum_k p(k | z_i)
    # p(y_i | k, z_i); before, log p(z_i) was folded in too (2.9 nats off)
    y = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    locs = torch.tensor([-2.0, 2.0], dtype=torch.float64)
    sds = torch.tensor([0.5, 1.5], dtype=torch.float64)

    def model(y):
        with pyro.plate("rows", len(y)):
            k = pyro.sample("k", dist.Categorical(w), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(locs[k], 1.0))
            pyro.sample("y", dist.Normal(z, sds[k]), obs=y)

    def guide(y):
        with pyro.plate("rows", len(y)):
            pyro.sample("z", dist.Normal(y, 0.5))

    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        idata = to_arviz(model, guide, y, num_samples=5, posterior_predictive=False)
    z = torch.as_tensor(idata.posterior["z"].values[0])
    joint = w.log() + dist.Normal(locs, 1.0).log_prob(z[..., None])  # log p(k, z_i)
    given = joint - torch.logsumexp(joint, -1, keepdim=True)  # log p(k | z_i)
    exact = torch.logsumexp(given + dist.Normal(z[..., None], sds).log_prob(y[:, None]), -1)
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], exact.numpy(), atol=1e-12)


def test_summed_sites_sharing_a_markov_dim_leave_the_pointwise_likelihood_out():
    # pyro.markov reuses enumerated dims: c_0's and c_2's, say. Grouped by dim, c_2 was
    # taken for y_0's assignment where no data site depended on it (a wrong value)
    y = torch.tensor([1.0, -0.5, 0.4], dtype=torch.float64)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    locs = torch.tensor([-2.0, 2.0], dtype=torch.float64)

    def model(y):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0).double(), 1.0))
        for t in pyro.markov(range(3)):
            c = pyro.sample(f"c_{t}", dist.Categorical(w), infer={"enumerate": "parallel"})
            if t < 2:
                pyro.sample(f"y_{t}", dist.Normal(z + locs[c], 1.0), obs=y[t])

    def guide(y):
        pyro.sample("z", dist.Normal(torch.tensor(0.2).double(), 0.7))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        with pytest.raises(ValueError, match="'c_0' and 'c_2' share an enumerated dim"):
            loo(model, guide, y, num_samples=20, var_name="y_0")


def test_a_summed_site_shared_by_data_sites_leaves_the_pointwise_likelihood_out():
    # one global c behind two observations: p(y1, y2 | z) does not fall apart per site
    y = torch.tensor([0.3, 1.2], dtype=torch.float64)

    def model(y):
        c = pyro.sample(
            "c", dist.Bernoulli(torch.tensor(0.3).double()), infer={"enumerate": "parallel"}
        )
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0).double(), 1.0))
        pyro.sample("y1", dist.Normal(z + c, 1.0), obs=y[0])
        pyro.sample("y2", dist.Normal(z - c, 1.0), obs=y[1])

    def guide(y):
        pyro.sample("z", dist.Normal(torch.tensor(0.5).double(), 0.8))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        warnings.filterwarnings("error", message="to_arviz")
        with pytest.raises(UserWarning, match="'c'.*'y1' and 'y2' depend on the same summed"):
            to_arviz(model, guide, y, num_samples=20)
        idata = to_arviz(model, guide, y, num_samples=20, log_likelihood=False)
        with pytest.raises(ValueError, match=r"loo: .*'c'.*'y1' and 'y2' depend on the same"):
            loo(model, guide, y, num_samples=20, var_name="y1")
    assert "log_likelihood" not in idata.groups()
    assert set(idata.posterior.data_vars) == {"z"}


def test_a_summed_site_outside_the_data_plate_leaves_the_pointwise_likelihood_out():
    # a global switch c behind every row: p(y | z) does not fall apart per row
    y = torch.tensor([0.3, 1.2, -0.4], dtype=torch.float64)

    def model(y):
        c = pyro.sample(
            "c", dist.Bernoulli(torch.tensor(0.3).double()), infer={"enumerate": "parallel"}
        )
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0).double(), 1.0))
        with pyro.plate("rows", len(y)):
            pyro.sample("y", dist.Normal(z + c, 1.0), obs=y)

    def guide(y):
        pyro.sample("z", dist.Normal(torch.tensor(0.5).double(), 0.8))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
        with pytest.raises(ValueError, match=r"loo: .*'c' and data site 'y' are not in the same"):
            loo(model, guide, y, num_samples=20)


def test_a_model_that_indexes_by_group_is_scored_one_draw_at_a_time():
    # a[g] (not a[..., g]) raises an IndexError under the particle plate, which was
    # taken for the model's own error: AutoFlow's warm start and every diagnostic failed
    groups = torch.arange(12) % 6  # index 5: past a 3-draw particle dim
    y = torch.randn(12, dtype=torch.float64) + groups

    def model(groups, y):
        with pyro.plate("groups", 6):
            a = pyro.sample("a", dist.Normal(torch.zeros(6).double(), 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(a[groups], 1.0), obs=y)

    q = dist.Normal(torch.arange(6.0).double(), 0.5)

    def guide(groups, y):
        with pyro.plate("groups", 6):
            pyro.sample("a", q)

    log_w, samples = importance_draws(model, guide, groups, y, num_samples=20)
    a = samples["a"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(a).sum(-1)
        + dist.Normal(a[:, groups], 1.0).log_prob(y).sum(-1)
        - q.log_prob(a).sum(-1)
    )
    torch.testing.assert_close(log_w, expected)
    guided = AutoFlow(model)
    guided(groups, y)  # its warm start weighs Gaussians with these diagnostics
    assert guided.diagnose(groups, y, num_samples=50).ess > 0


def test_a_scaled_guide_is_refused():
    # poutine.scale on model and guide (a loss scale for SVI) flattened every weight:
    # a bad guide was called good
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(1.0, 0.5))

    with pytest.raises(ValueError, match="the guide's sites 'z' are scaled"):
        diagnose(poutine.scale(model, 0.01), poutine.scale(guide, 0.01), num_samples=100)


def test_a_float32_model_that_mixes_the_draws_up_is_caught():
    # at |log w| of 28,000 the float32 check let 22 nats of mixing pass
    torch.manual_seed(0)
    n = 20000
    x = torch.randn(n) + 1.0

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        mu = 2 * z.mean()  # a bug: under a particle plate it averages over the draws too
        with pyro.plate("d", n):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    center = float(2 * x.sum() / (2 * n + 1)) / 2
    scale = (1.5 * 2 / (2 * n + 1)) ** 0.5

    def guide(x):
        pyro.sample("z", dist.Normal(torch.full((2,), center), scale).to_event(1))

    log_w, samples = importance_draws(model, guide, x, num_samples=50)
    z = samples["z"].double()
    prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    likelihood = dist.Normal(z.sum(-1, keepdim=True), 1.0).log_prob(x.double()).sum(-1)
    proposal = dist.Normal(torch.full((2,), center).double(), scale).log_prob(z).sum(-1)
    assert (log_w.double() - (prior + likelihood - proposal)).abs().max() < 0.1


def test_a_model_asserting_a_shape_is_scored_a_draw_at_a_time():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        assert z.dim() == 0  # fails under a particle plate
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(0.25, 0.5**0.5))

    log_w, _ = importance_draws(model, guide, num_samples=20)
    truth = dist.Normal(0.0, 2**0.5).log_prob(torch.tensor(0.5))
    torch.testing.assert_close(log_w, truth.expand(20), rtol=1e-5, atol=1e-5)


def test_a_subsampling_model_is_named_before_its_scaled_local_guide_sites():
    def model(y, size=None):
        with pyro.plate("rows", len(y), subsample_size=size) as rows:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[rows])

    def guide(y, size=None):
        with pyro.plate("rows", len(y), subsample_size=size):
            pyro.sample("z", dist.Normal(0.0, 1.0))  # scaled by 100 / 10 in the plate

    with pytest.raises(ValueError, match=r"subsamples plate 'rows' \(10 of 100 rows\)"):
        diagnose(model, guide, torch.randn(100), 10, num_samples=50)


def test_a_mask_over_the_data_points_is_not_taken_for_masked_latents():
    # poutine.mask around a whole model weighs its global latents by the points kept, but
    # leaves none of their entries without density: no warning
    y = torch.randn(10)
    mask = torch.arange(10) % 5 != 0

    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    def masked(y):
        with poutine.mask(mask=mask):
            model(y)

    def guide(y):
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importance_draws(masked, guide, y, num_samples=20)


def _wide_guide_model():
    def model():
        s = pyro.sample("s", dist.Gamma(2.0, 2.0))
        pyro.sample("y", dist.Normal(0.0, s), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("s", dist.Normal(1.0, 1.0))  # negative 16% of the time

    return model, guide


@pytest.mark.parametrize("call", [diagnose, importance_resample, to_arviz])
def test_a_guide_drawing_outside_the_models_support_is_named(call, sequential_runs):
    model, guide = _wide_guide_model()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        # named at the site, not the model's later Normal(0, s < 0) failure
        with pytest.raises(ValueError, match=r"guide drew site 's' outside the model's support"):
            call(model, guide, num_samples=500)
    assert sequential_runs == []  # not taken for a model that does not broadcast


def test_a_guide_outside_the_support_without_validation_is_not_trusted():
    model, guide = _wide_guide_model()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = diagnose(model, guide, num_samples=500)
    assert not report.trustworthy


def test_a_discrete_site_drawn_alike_every_time_is_not_taken_for_a_point_mass():
    def model():
        b = pyro.sample("b", dist.Bernoulli(0.5))
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(m + 3 * b, 1.0), obs=torch.tensor(4.0))

    def guide():
        pyro.sample("b", dist.Bernoulli(0.9999))  # a density on {0, 1}, all ones in 500
        pyro.sample("m", dist.Normal(1.0, 1.0))

    pyro.set_rng_seed(0)
    log_w, draws = importance_draws(model, guide, num_samples=500)
    assert bool((draws["b"] == 1).all())
    # the weight is p(x, b=1, m) / (0.9999 q(m)): the guide's Bernoulli is in it
    m = draws["m"]
    joint = (
        dist.Bernoulli(0.5).log_prob(torch.tensor(1.0))
        + dist.Normal(0.0, 1.0).log_prob(m)
        + dist.Normal(m + 3, 1.0).log_prob(torch.tensor(4.0))
    )
    q = math.log(0.9999) + dist.Normal(1.0, 1.0).log_prob(m)
    assert torch.allclose(log_w, joint - q, atol=1e-5)


def _dynamic_model_and_guide():
    """A site ('e') that only the draws with k = 1 have: the structure changes."""

    def model():
        k = pyro.sample("k", dist.Bernoulli(0.5))
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        if k.item() == 1:
            m = m + pyro.sample("e", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor(1.0))

    def guide():
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("m", dist.Normal(0.5, 0.8))
        if k.item() == 1:
            pyro.sample("e", dist.Normal(0.0, 1.0))

    return model, guide


@pytest.mark.parametrize("seed", range(4))  # the first draw with and without 'e'
def test_diagnose_takes_a_model_whose_structure_changes(seed):
    model, guide = _dynamic_model_and_guide()
    pyro.set_rng_seed(seed)
    report = diagnose(model, guide, num_samples=1000)
    # log p(y = 1) = log(N(1; 0, 2) / 2 + N(1; 0, 3) / 2), variances 2 and 3
    exact = math.log(
        0.5 * math.exp(-1 / 4) / math.sqrt(4 * math.pi)
        + 0.5 * math.exp(-1 / 6) / math.sqrt(6 * math.pi)
    )
    assert report.log_evidence == pytest.approx(exact, abs=0.05)
    assert report.khat < 0.7


@pytest.mark.parametrize("call", [importance_draws, importance_resample, to_arviz])
def test_samples_of_a_model_whose_structure_changes_are_refused_by_site(call):
    model, guide = _dynamic_model_and_guide()
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=r"structure changes .* site 'e' is in \d+ of the 300"):
        call(model, guide, num_samples=300)


def test_a_scalar_site_outside_the_support_is_named_with_its_value():
    def model():
        s = pyro.sample("s", dist.Gamma(2.0, 1.0))
        with pyro.plate("n", 3):
            pyro.sample("y", dist.Normal(0.0, s), obs=torch.tensor([0.5, 1.0, 2.0]))

    def guide():
        pyro.sample("s", dist.Normal(-3.0, 1.0))  # nearly always negative

    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError, match=r"site 's' outside the model's support .*: the value"):
            diagnose(model, guide, num_samples=10)


def test_a_site_masked_out_whole_is_not_held_to_its_support():
    # .mask(False) with a pyro.factor: Pyro's own validation never sees the value
    data = torch.tensor([0.1, -0.2, 0.05])

    def model():
        s = pyro.sample("s", dist.Gamma(torch.ones(2), 1.0).mask(False).to_event(1))
        pyro.factor("f", -0.5 * (s**2).sum())
        with pyro.plate("n", 3):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=data)

    def guide():
        pyro.sample("s", dist.Normal(torch.zeros(2), 1.0).to_event(1))  # the factor's law

    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the masked-latent warning
        log_w, _ = importance_draws(model, guide, num_samples=50)
    exact = dist.Normal(0.0, 1.0).log_prob(data).sum() + 2 * math.log(math.sqrt(2 * math.pi))
    assert torch.allclose(log_w, exact.expand(50), atol=1e-5)


def test_a_guide_certain_of_a_discrete_value_is_a_point_mass():
    data = torch.tensor([0.1, -0.2, 0.05])

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        with pyro.plate("n", 3):
            pyro.sample("y", dist.Normal(3 * z - 1.5, 1.0), obs=data)

    def guide():
        pyro.sample("z", dist.Delta(torch.tensor(1.0)))  # misses half the posterior

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match="a point mass"):
        diagnose(model, guide, num_samples=100)


def test_a_site_that_changes_shape_is_diagnosed_and_its_samples_refused():
    def model():
        k = pyro.sample("k", dist.Categorical(torch.ones(3)))
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([int(k) + 1]).to_event(1))
        pyro.sample("y", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.5))

    def guide():
        k = pyro.sample("k", dist.Categorical(torch.ones(3)))
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([int(k) + 1]).to_event(1))

    pyro.set_rng_seed(0)
    report = diagnose(model, guide, num_samples=300)
    # prior proposal: the weights are the likelihood, N(0.5; 0, k + 2), averaged over k
    exact = math.log(
        sum(
            math.exp(dist.Normal(0.0, math.sqrt(k + 2.0)).log_prob(torch.tensor(0.5)))
            for k in range(3)
        )
        / 3
    )
    assert report.log_evidence == pytest.approx(exact, abs=0.05)
    with pytest.raises(ValueError, match="site 'z' changes shape from draw to draw"):
        importance_draws(model, guide, num_samples=50)


def test_loo_takes_a_model_whose_structure_changes():
    def model():
        b = pyro.sample("b", dist.Bernoulli(0.5))
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        if b.item() == 1:
            m = m + pyro.sample("e", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 4):
            pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor([0.3, -0.1, 0.8, 0.2]))

    def guide():  # the prior as the proposal: valid weights, whatever the structure
        b = pyro.sample("b", dist.Bernoulli(0.5))
        pyro.sample("m", dist.Normal(0.0, 1.0))
        if b.item() == 1:
            pyro.sample("e", dist.Normal(0.0, 1.0))

    from pyroflows.infer import loo

    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # prior proposal: high k-hats
        result = loo(model, guide, num_samples=400)
    assert math.isfinite(float(result["elpd_loo"]))


def test_to_arviz_takes_data_that_broadcast_against_the_event():
    # a Gamma of shape (N, 1) scoring rows of 3: torch broadcasts, the density is per row
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(0)) + 0.5

    def model(x):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("rows", 6):
            pyro.sample("obs", dist.Gamma(s * torch.ones(6, 1), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("s", dist.LogNormal(0.0, 0.3))

    pyro.set_rng_seed(0)
    # a draw of the (6, 1) Gamma copied over 3 entries is no replicate of the data
    with pytest.warns(UserWarning, match="no posterior predictive for 'obs'"):
        idata = to_arviz(model, guide, x, num_samples=50)
    assert "posterior_predictive" not in idata.groups()
    assert idata.observed_data["obs"].shape == (6, 3)
    s = torch.as_tensor(idata.posterior["s"].values[0])  # (draws,)
    expected = dist.Gamma(s[:, None, None], 1.0).log_prob(x).sum(-1)  # (draws, 6)
    got = torch.as_tensor(idata.log_likelihood["obs"].values[0])
    assert torch.allclose(got, expected.to(got.dtype), atol=1e-4)


def _plate_model(y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("g", len(y), subsample_size=subsample_size) as idx:
        th = pyro.sample("th", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(th, 0.5), obs=y[idx])


def test_a_guide_built_on_other_data_is_named_not_the_model():
    guide = AutoNormal(_plate_model)
    pyro.set_rng_seed(0)
    guide(torch.arange(5.0))  # its plate 'g' has 5 rows from now on
    with pytest.raises(ValueError, match="the guide's plate 'g' has 5 rows, the model's 7"):
        diagnose(_plate_model, guide, torch.arange(7.0), num_samples=20)


def test_a_guide_that_subsamples_is_named_not_the_model():
    y = torch.randn(8)
    guide = AutoNormal(_plate_model)
    pyro.set_rng_seed(0)
    guide(y, 4)  # the autoguide's plate keeps subsample_size=4
    with pytest.raises(ValueError, match=r"the guide subsamples plate 'g' \(4 of 8 rows\)"):
        diagnose(_plate_model, guide, y, None, num_samples=20)


def test_a_guide_certain_up_to_torchs_clamp_is_a_point_mass():
    data = torch.tensor([0.5, 1.0, 2.0, -0.3])

    def model():
        k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 4):
            pyro.sample("y", dist.Normal(mu + k, 1.0), obs=data)

    def guide():  # log_prob of its one value is -1.2e-7, not 0: torch clamps probs
        pyro.sample("k", dist.Categorical(torch.tensor([1.0, 0.0, 0.0])))
        pyro.sample("mu", dist.Normal(0.5, 0.5))

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match="draws of 'k' are all the same value"):
        diagnose(model, guide, num_samples=100)


def test_a_latent_under_a_site_mask_is_still_held_to_its_support():
    # poutine.mask(False) leaves Pyro's validation on (only .mask(False) skips it)
    def model():
        with poutine.mask(mask=False):
            z = pyro.sample("z", dist.Gamma(torch.ones(3), 1.0).to_event(1))
        pyro.factor("f", -(z**2).sum())

    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the masked-latent warning
        with pytest.raises(ValueError, match="guide drew site 'z' outside the model's support"):
            diagnose(model, guide, num_samples=40)


def test_loo_refuses_data_sites_that_only_some_draws_have():
    from pyroflows.infer import loo

    data = torch.tensor([0.3, -0.1, 0.8, 0.2])

    def model():
        b = pyro.sample("b", dist.Bernoulli(0.5))
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("n", 4):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=data)
            if b.item() == 1:
                pyro.sample("y2", dist.Normal(mu, 2.0), obs=data)

    def guide():
        pyro.sample("b", dist.Bernoulli(0.5))
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    for seed in range(4):  # the first draw with and without 'y2'
        pyro.set_rng_seed(seed)
        with pytest.raises(ValueError, match=r"data sites change from draw to draw \('y2'"):
            loo(model, guide, num_samples=100)
