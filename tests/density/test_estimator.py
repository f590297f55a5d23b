import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.utils.estimator_checks import check_estimator

import pyroflows
from pyroflows.density import FlowDensity

SMALL = {"transforms": 2, "hidden": (16,), "epochs": 20, "random_state": 0}


def mixture_rows(n, seed):
    torch.manual_seed(seed)
    means = torch.tensor([[1.5, 1.5], [-1.5, -1.5]])
    d = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(means, 0.5).to_event(1))
    x = d.sample((n,))
    return x.double().numpy(), d


def test_passes_scikit_learn_checks():
    # every check runs; none is skipped (check_array_api_input skips itself without
    # SCIPY_ARRAY_API: FlowDensity converts to torch, so array-API inputs are moot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(
            FlowDensity(transforms=2, hidden=(8,), epochs=3, random_state=0), on_fail=None
        )
    failed = [(r["check_name"], str(r["exception"])) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) > 30


def test_fit_score_sample():
    X, truth = mixture_rows(3000, 0)
    est = FlowDensity(
        flow="maf",
        transforms=3,
        hidden=(32, 32),
        activation="elu",
        lr=5e-3,
        validation_fraction=0.2,
        random_state=0,
    ).fit(X)
    X_test, _ = mixture_rows(3000, 1)
    logp = est.score_samples(X_test)
    true = truth.log_prob(torch.as_tensor(X_test, dtype=torch.float32)).double().numpy()
    assert logp.shape == (3000,)
    assert logp.dtype == np.float64
    assert abs(true.mean() - logp.mean()) < 0.1
    assert est.score(X_test) == pytest.approx(logp.sum())
    draws = est.sample(5000, random_state=0)
    assert draws.shape == (5000, 2)
    assert np.allclose(np.abs(draws).mean(0), 1.5, atol=0.1)
    assert np.array_equal(draws, est.sample(5000, random_state=0))
    assert est.n_features_in_ == 2
    assert est.history_.epochs > 0


def test_grid_search_picks_by_held_out_likelihood_and_cross_val_score():
    X, _ = mixture_rows(600, 2)
    grid = GridSearchCV(FlowDensity(flow="maf", **SMALL), {"transforms": [1, 3]}, cv=3)
    grid.fit(X)
    assert grid.best_params_["transforms"] in (1, 3)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    scores = cross_val_score(FlowDensity(flow="realnvp", **SMALL), X, cv=3)
    assert scores.shape == (3,)
    assert np.isfinite(scores).all()


def test_save_and_load(tmp_path):
    X, _ = mixture_rows(300, 3)
    est = FlowDensity(flow="nsf", bins=4, options={"bound": 4.0}, **SMALL).fit(X)
    est.save(tmp_path / "m.pt")
    with pytest.raises(FileExistsError):
        est.save(tmp_path / "m.pt")
    again = FlowDensity.load(tmp_path / "m.pt")
    assert np.allclose(again.score_samples(X), est.score_samples(X), atol=1e-5)
    assert again.get_params()["bins"] == 4
    assert again.options == {"bound": 4.0}


def test_top_level_name_and_errors():
    assert pyroflows.FlowDensity is FlowDensity
    est = FlowDensity(**SMALL)
    with pytest.raises(Exception, match="not fitted"):
        est.score_samples(np.zeros((2, 2)))
    est.fit(mixture_rows(100, 4)[0])
    with pytest.raises(ValueError, match="2 features"):
        est.score_samples(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="n_samples"):
        est.sample(0)
    with pytest.raises(ValueError, match="flow must be one of"):
        FlowDensity(flow="glow").fit(np.zeros((10, 2)))


def test_dequantized_scores_are_the_bound_over_the_cell():
    X = np.random.default_rng(0).poisson(3.0, size=(400, 2)).astype(float)
    est = FlowDensity(flow="maf", dequantize=True, **SMALL).fit(X)
    scores = est.score_samples(X[:50])
    assert np.array_equal(scores, est.score_samples(X[:50]))  # seeded: the same each time
    x = torch.as_tensor(X[:50], dtype=torch.float32)
    with torch.no_grad():
        d = est.flow_()
        many = d.log_prob(x + torch.rand(4000, 50, 2)).double().numpy()
        corner = d.log_prob(x).double().numpy()
    standard_error = many.std(0) / np.sqrt(16)
    assert (np.abs(scores - many.mean(0)) < 5 * standard_error + 1e-6).all()
    assert not np.allclose(scores, corner, atol=1e-3)  # not the density at the corner
