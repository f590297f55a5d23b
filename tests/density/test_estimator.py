import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
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


# torch's CPU kernels (softplus, sigmoid, a fused multiply-add...) may round a value
# differently in their vectorised body and in their scalar tail, so a row's float32 score
# can move by an ulp or two with its position in the batch (the plain autograd spline does
# too: 75 of 1,660 sliced values differ in a scratch check). These two checks ask for
# rtol 1e-7, below float32's resolution after a few layers; test_score_samples_is_row_
# invariant checks the same property at 1e-5 (float32) and 1e-12 (float64).
ROW_POSITION_CHECKS = {
    name: "a float32 score moves by an ulp with its row's position in the batch"
    for name in ("check_methods_sample_order_invariance", "check_methods_subset_invariance")
}


def test_passes_scikit_learn_checks():
    # every check runs (check_array_api_input skips itself without SCIPY_ARRAY_API:
    # FlowDensity converts to torch, so array-API inputs are moot); none fails but the
    # two row-position checks above, which may
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(
            FlowDensity(transforms=2, hidden=(8,), epochs=3, random_state=0),
            expected_failed_checks=ROW_POSITION_CHECKS,
            on_fail=None,
        )
    failed = [(r["check_name"], str(r["exception"])) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) > 30


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", 1e-5), ("float64", 1e-12)])
def test_score_samples_is_row_invariant(dtype, rtol):
    x, _ = mixture_rows(400, seed=5)
    est = FlowDensity(transforms=2, hidden=(8,), epochs=3, random_state=0, dtype=dtype).fit(x)
    rows = x[:37]
    full = est.score_samples(rows)
    order = np.random.default_rng(0).permutation(len(rows))
    np.testing.assert_allclose(est.score_samples(rows[order]), full[order], rtol=rtol, atol=0)
    for start, stop in ((0, 1), (3, 10), (5, 37), (11, 20)):
        np.testing.assert_allclose(
            est.score_samples(rows[start:stop]), full[start:stop], rtol=rtol, atol=0
        )


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


def test_messages_about_the_values_call_them_x():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=300), rng.normal(1e8, 10.0, size=300)]  # float32 steps of 8
    with pytest.raises(ValueError, match=r"^X column 2 \(index 1\) has mean 1e\+08"):
        FlowDensity(flow="maf", transforms=1, epochs=1).fit(X)
    X[:, 1] = 7.0
    with pytest.warns(UserWarning, match=r"fit: X column\(s\) 2 \(7\) hold one value"):
        FlowDensity(flow="maf", transforms=1, epochs=1).fit(X)


def test_set_params_after_a_fit_changes_nothing_until_the_next_fit(tmp_path):
    # scoring, sampling and saving read the fitted model, not parameters set since:
    # dequantize=True made the scores a dequantized bound and the draws integers, and a
    # file saved after set_params(flow="nsf") described a flow its weights did not fit
    X, _ = mixture_rows(300, 3)
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=2, random_state=0).fit(X)
    scores, draws = est.score_samples(X[:5]), est.sample(20, random_state=1)
    est.set_params(dequantize=True, flow="nsf", standardize=False)
    np.testing.assert_array_equal(est.score_samples(X[:5]), scores)
    np.testing.assert_array_equal(est.sample(20, random_state=1), draws)
    est.save(tmp_path / "m.pt")
    again = FlowDensity.load(tmp_path / "m.pt")
    assert (again.flow, again.standardize, again.dequantize) == ("maf", True, False)
    np.testing.assert_allclose(again.score_samples(X[:5]), scores, atol=1e-6)
    assert est.get_params()["flow"] == "nsf"  # the parameter itself is as set
    est.set_params(dequantize=False).fit(X)  # the next fit takes them
    assert est.flow_.transforms[0].__class__.__name__.startswith("Spline")


def test_a_loaded_estimator_has_the_settings_of_the_fit_and_refits_the_same(tmp_path):
    # get_params() of a loaded estimator was the defaults (200 epochs, lr 1e-3, no seed),
    # so clone(loaded).fit(X) trained another model than the one in the file
    X, _ = mixture_rows(300, 3)
    settings = {"epochs": 4, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4,
                "validation_fraction": 0.2, "patience": 2, "clip_grad": 5.0,
                "schedule": "cosine", "random_state": 9}  # fmt: skip
    est = FlowDensity(flow="maf", transforms=2, hidden=(8,), **settings).fit(X)
    est.save(tmp_path / "m.pt")
    again = FlowDensity.load(tmp_path / "m.pt")
    assert {k: again.get_params()[k] for k in settings} == settings
    refit = clone(again).fit(X)
    np.testing.assert_allclose(refit.score_samples(X), est.score_samples(X), atol=1e-5)

    # a callable schedule cannot be kept: "callable" says so, and a refit asks for it
    def halving(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    FlowDensity(flow="maf", transforms=1, epochs=1, schedule=halving).fit(X).save(tmp_path / "c.pt")
    loaded = FlowDensity.load(tmp_path / "c.pt")
    assert loaded.schedule == "callable"
    with pytest.raises(ValueError, match=r"set it again with set_params\(schedule=\.\.\.\)"):
        loaded.fit(X)
    # a NumPy generator cannot be kept: the loaded estimator says None, not a made-up int
    rng = np.random.default_rng(0)
    FlowDensity(flow="maf", transforms=1, epochs=1, random_state=rng).fit(X).save(tmp_path / "g.pt")
    assert FlowDensity.load(tmp_path / "g.pt").random_state is None


def test_top_level_name_and_errors():
    assert pyroflows.FlowDensity is FlowDensity
    est = FlowDensity(**SMALL)
    with pytest.raises(NotFittedError, match="not fitted"):
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


def test_a_read_only_array_is_fitted_dequantized_without_a_warning():
    # pandas hands out read-only arrays: torch.from_numpy of one warns (an error here)
    X = np.random.default_rng(0).poisson(3.0, size=(100, 2)).astype(float)
    X.setflags(write=False)
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=1, dequantize=True)
    assert np.isfinite(est.fit(X).score_samples(X)).all()
    fractional = X.copy()
    fractional[3, 1] = 0.5
    fractional.setflags(write=False)
    with pytest.raises(ValueError, match=r"X row 4, column 2 \(index \[3, 1\]\) is 0.5"):
        est.fit(fractional)
    with pytest.raises(ValueError, match=r"X holds values up to 300000\d\d, too large to dequant"):
        est.fit(X + 3e7)  # float32 cannot resolve the noise there


def test_a_dequantized_model_samples_integer_rows_near_the_data():
    X = np.random.default_rng(0).poisson(3.0, size=(400, 2)).astype(float)
    est = FlowDensity(flow="maf", dequantize=True, **SMALL).fit(X)
    draws = est.sample(4000, random_state=0)
    assert np.array_equal(draws, np.floor(draws))  # cells, not points of x + U[0, 1)
    assert np.abs(draws.mean(0) - X.mean(0)).max() < 0.25  # not shifted by +1/2
    continuous = est.flow_().sample((4000,)).double().numpy()
    assert np.abs(continuous.mean(0) - X.mean(0) - 0.5).max() < 0.25


def test_some_columns_dequantized_survive_the_model_file_and_the_command_line(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=400), rng.poisson(3.0, size=400)])
    est = FlowDensity(flow="maf", dequantize=[1], **SMALL).fit(X)
    draws = est.sample(500, random_state=0)
    assert np.array_equal(draws[:, 1], np.floor(draws[:, 1]))  # the count, floored
    assert not np.array_equal(draws[:, 0], np.floor(draws[:, 0]))
    est.save(tmp_path / "m.pt")
    again = FlowDensity.load(tmp_path / "m.pt")
    assert again._fitted("dequantize") == [1]
    np.testing.assert_array_equal(again.score_samples(X[:30]), est.score_samples(X[:30]))
    # the command line scores it, fractions in the measured column and all
    np.savetxt(tmp_path / "rows.csv", X[:30], delimiter=",", header="a,b", comments="")
    scored = subprocess.run(
        [sys.executable, "-m", "pyroflows", "score", "m.pt", "rows.csv", "-o", "s.csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    from_cli = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(from_cli, est.score_samples(X[:30]), rtol=1e-5)


def test_numpy_scalars_from_parameter_grids(tmp_path):
    X, _ = mixture_rows(300, 5)
    small = {"hidden": (8,), "epochs": 2, "random_state": 0}
    grid = GridSearchCV(FlowDensity(flow="maf", **small), {"transforms": np.arange(1, 3)}, cv=2)
    grid.fit(X)
    grid.best_estimator_.save(tmp_path / "m.pt")  # plain ints in the model file
    again = FlowDensity.load(tmp_path / "m.pt")
    assert np.allclose(again.score_samples(X), grid.best_estimator_.score_samples(X), atol=1e-5)
    est = FlowDensity(
        flow="maf",
        transforms=np.int64(1),
        hidden=np.array([8]),
        batch_size=np.int64(64),
        lr=np.float32(1e-3),
        validation_fraction=np.float32(0.2),
        epochs=2,
        random_state=0,
    ).fit(X)
    assert len(est.history_.val_nll) == 2
    with pytest.raises(ValueError, match=r"validation_fraction must be a number in \[0, 1\)"):
        FlowDensity(validation_fraction=1.0, epochs=1).fit(X)


def test_resume_with_a_random_state_that_is_not_an_int(tmp_path):
    X, _ = mixture_rows(300, 6)
    small = {"flow": "maf", "transforms": 1, "hidden": (8,), "epochs": 3, "progress": False}
    first = FlowDensity(checkpoint_dir=tmp_path, random_state=None, **small).fit(X)
    resumed = FlowDensity(
        checkpoint_dir=tmp_path, resume=True, random_state=np.random.RandomState(5), **small
    ).fit(X)  # a different draw of seed: the checkpoint's seed is the one that counts
    assert resumed.history_.train_nll == first.history_.train_nll
    assert np.array_equal(resumed.score_samples(X), first.score_samples(X))


def test_scores_refuse_values_beyond_float32():
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=1, random_state=0)
    est.fit(mixture_rows(100, 7)[0])
    with pytest.raises(ValueError, match=r"X: 1e\+39 at row 2, column 1 .* beyond the range"):
        est.score_samples(np.array([[0.0, 0.0], [1e39, 0.0]]))


def test_nan_and_inf_are_named_by_row_and_column_as_fit_names_them():
    X = np.random.default_rng(0).normal(size=(50, 2))
    X[7, 1] = np.nan  # scikit-learn's own check named neither (and advised another model)
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=1, random_state=0)
    with pytest.raises(ValueError, match=r"X holds 1 NaN .* NaN at row 8, column 2"):
        est.fit(X)
    X[7, 1] = 0.0
    est.fit(X)
    X[3, 0] = -np.inf
    with pytest.raises(ValueError, match=r"the first is -?inf at row 4, column 1"):
        est.score_samples(X)


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_a_point_too_far_out_for_the_flow_scores_minus_inf_not_nan(flow):
    X = np.random.default_rng(0).normal(size=(300, 2))
    est = FlowDensity(flow=flow, transforms=2, hidden=(8,), epochs=2, random_state=0).fit(X)
    scores = est.score_samples(np.array([[-1e38, 1e38], [0.1, 0.2]]))  # finite in float32
    assert scores[0] == -np.inf  # the network overflowed: it gave NaN
    assert np.isfinite(scores[1])


def test_rows_to_score_are_not_refused_for_float32_rounding():
    X = np.random.default_rng(0).normal(size=(300, 2))
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=1, random_state=0).fit(X)
    rows = np.array([[0.1, 0.3], [0.1 + 1e-9, 0.3]])  # rounded by 3 sd of this tiny column
    assert np.isfinite(est.score_samples(rows)).all()  # only data to fit are refused


def test_a_scikit_learn_without_validate_data_is_named_as_too_old():
    import subprocess
    import sys

    code = (
        "import sklearn.utils.validation as v; del v.validate_data\n"
        "from pyroflows.density import FlowDensity\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "FlowDensity needs scikit-learn >= 1.6 (for validate_data), found" in result.stderr


def test_arrays_with_negative_strides_fit_and_score():
    X = np.random.default_rng(0).normal(size=(200, 2))
    small = {"flow": "maf", "transforms": 1, "hidden": (8,), "epochs": 2, "random_state": 0}
    est = FlowDensity(**small).fit(X[::-1])  # a view torch.as_tensor cannot take as it is
    forward = FlowDensity(**small).fit(np.ascontiguousarray(X[::-1]))
    np.testing.assert_array_equal(est.score_samples(X[::-1]), forward.score_samples(X[::-1]))
    np.testing.assert_array_equal(est.score_samples(X[:, ::-1]), est.score_samples(X[:, [1, 0]]))


def test_a_dequantized_score_does_not_depend_on_the_row_position():
    X = np.random.default_rng(0).poisson(3.0, size=(300, 2)).astype(float)
    est = FlowDensity(flow="maf", dequantize=True, **SMALL).fit(X)
    rows = X[:40]
    full = est.score_samples(rows)
    alone = np.array([est.score_samples(row[None])[0] for row in rows])
    np.testing.assert_allclose(alone, full, rtol=1e-5)
    np.testing.assert_allclose(est.score_samples(rows[::-1]), full[::-1], rtol=1e-5)
    same = est.score_samples(np.repeat(rows[:1], 5, axis=0))
    np.testing.assert_allclose(same, same[0], rtol=1e-5)


def test_dequantize_refuses_values_that_are_not_whole_numbers():
    X = np.random.default_rng(0).poisson(3.0, size=(100, 2)).astype(float)
    X[7, 1] = 2.5
    est = FlowDensity(flow="maf", dequantize=True, **SMALL)
    with pytest.raises(ValueError, match=r"X row 8, column 2 \(index \[7, 1\]\) is 2\.5, not a"):
        est.fit(X)
    X[7, 1] = 2.0
    est.fit(X)
    with pytest.raises(ValueError, match=r"row 2, column 1 .* is 0\.5, .*fitted to integer data"):
        est.score_samples(np.array([[1.0, 2.0], [0.5, 1.0]]))


def test_a_failed_refit_keeps_the_previous_fit_whole():
    X, _ = mixture_rows(200, 8)
    est = FlowDensity(flow="maf", **SMALL).fit(X)
    before = est.score_samples(X[:5])
    flow = est.flow_
    est.set_params(flow="glow")
    with pytest.raises(ValueError, match="flow must be one of"):
        est.fit(np.hstack([X, X[:, :1]]))  # three columns
    assert est.n_features_in_ == 2
    assert est.flow_ is flow
    np.testing.assert_array_equal(est.score_samples(X[:5]), before)
    assert est.sample(3, random_state=0).shape == (3, 2)


def test_options_may_not_set_a_named_parameter_again():
    X, _ = mixture_rows(100, 9)
    for key, value in (("dtype", "float64"), ("transforms", 4), ("hidden", (8,))):
        with pytest.raises(ValueError, match=rf"options\['{key}'\] duplicates the {key} param"):
            FlowDensity(flow="maf", options={key: value}, **SMALL).fit(X)
    with pytest.raises(TypeError, match="options must be a dict"):
        FlowDensity(flow="maf", options=[1], **SMALL).fit(X)


def test_hidden_of_another_type_is_refused_by_name():
    X, _ = mixture_rows(100, 9)
    small = {k: v for k, v in SMALL.items() if k != "hidden"}
    with pytest.raises(
        TypeError, match=r"hidden must be None, an int or a sequence .*got float 8\.5"
    ):
        FlowDensity(flow="maf", hidden=8.5, **small).fit(X)  # "'float' object is not iterable"


@pytest.mark.parametrize("name", ["standardize", "progress", "resume"])
def test_switches_must_be_bools(name):
    X = np.random.default_rng(0).poisson(3.0, size=(100, 2)).astype(float)
    with pytest.raises(TypeError, match=rf"{name}.* must be True or False, got 'no'"):
        FlowDensity(flow="maf", **{**SMALL, name: "no"}).fit(X)


def test_dequantize_must_be_a_bool_or_columns():
    X = np.random.default_rng(0).poisson(3.0, size=(100, 2)).astype(float)
    message = r"dequantize must be True, False or a sequence of column indices .*got 'no'"
    with pytest.raises(TypeError, match=message):
        FlowDensity(flow="maf", **{**SMALL, "dequantize": "no"}).fit(X)


def test_dequantize_takes_a_data_frames_column_names():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=200), rng.poisson(3.0, size=200)])
    frame = pd.DataFrame(X, columns=["height", "count"])
    small = {**SMALL, "epochs": 2}
    by_name = FlowDensity(flow="maf", dequantize=["count"], **small).fit(frame)
    by_index = FlowDensity(flow="maf", dequantize=[1], **small).fit(frame)
    assert by_name._fitted("dequantize") == [1]
    np.testing.assert_array_equal(by_name.score_samples(frame), by_index.score_samples(frame))
    assert (by_name.sample(20, random_state=0)[:, 1] % 1 == 0).all()  # counts: whole
    with pytest.raises(ValueError, match=r"dequantize names no column 'visits' of X; its col"):
        FlowDensity(flow="maf", dequantize=["visits"], **small).fit(frame)
    with pytest.raises(TypeError, match=r"X has no column names .*give 0-based column indices"):
        FlowDensity(flow="maf", dequantize=["count"], **small).fit(X)


def test_random_state_may_be_a_numpy_generator():
    X, _ = mixture_rows(100, 10)
    small = {k: v for k, v in SMALL.items() if k != "random_state"}
    first = FlowDensity(flow="maf", random_state=np.random.default_rng(3), **small).fit(X)
    again = FlowDensity(flow="maf", random_state=np.random.default_rng(3), **small).fit(X)
    np.testing.assert_array_equal(first.score_samples(X), again.score_samples(X))
    draws = first.sample(4, random_state=np.random.default_rng(1))
    np.testing.assert_array_equal(draws, first.sample(4, random_state=np.random.default_rng(1)))
    with pytest.raises(ValueError, match="random_state must be an int, None, a numpy"):
        first.sample(4, random_state="seven")


@pytest.mark.parametrize("seed", [2**40, -1])
def test_an_int_random_state_outside_numpys_seeds_is_refused_for_its_range(seed):
    X, _ = mixture_rows(100, 10)
    small = {k: v for k, v in SMALL.items() if k != "random_state"}
    message = r"random_state must be in \[0, 2\*\*32\) \(NumPy's seeds\) when an int, got"
    with pytest.raises(ValueError, match=message):
        FlowDensity(flow="maf", random_state=seed, **small).fit(X)
    est = FlowDensity(flow="maf", random_state=0, **small).fit(X)
    with pytest.raises(ValueError, match=message):
        est.sample(2, random_state=seed)


@pytest.mark.parametrize("dtype", [torch.float64, np.float64, np.dtype("float64")])
def test_dtype_may_be_a_torch_or_numpy_dtype(tmp_path, dtype):
    X, _ = mixture_rows(100, 11)
    est = FlowDensity(flow="maf", dtype=dtype, **SMALL).fit(X)
    assert est.flow_.base_loc.dtype == torch.float64
    assert est.get_params()["dtype"] is dtype  # the parameter as given (clone needs it)
    est.save(tmp_path / "m.pt")  # the file holds the plain name
    assert FlowDensity.load(tmp_path / "m.pt").dtype == "float64"
    with pytest.raises(ValueError, match="dtype must be one of float32, float64; got 'float16'"):
        FlowDensity(flow="maf", dtype=torch.float16, **SMALL).fit(X)


def test_resume_refuses_another_int_random_state_and_takes_the_same(tmp_path):
    X, _ = mixture_rows(300, 6)
    small = {"flow": "maf", "transforms": 1, "hidden": (8,), "epochs": 3, "progress": False}
    first = FlowDensity(checkpoint_dir=tmp_path, random_state=1, **small).fit(X)
    other = FlowDensity(checkpoint_dir=tmp_path, resume=True, random_state=5, **small)
    with pytest.raises(ValueError, match="random_state=5 gives another seed than the checkpoint"):
        other.fit(X)  # it returned the old fit and recorded random_state=5 in its model file
    same = FlowDensity(checkpoint_dir=tmp_path, resume=True, random_state=1, **small).fit(X)
    assert np.array_equal(same.score_samples(X), first.score_samples(X))
    # another validation_fraction is named as the estimator's parameter, not fit()'s
    wider = FlowDensity(
        checkpoint_dir=tmp_path, resume=True, random_state=1, validation_fraction=0.2, **small
    )
    with pytest.raises(
        ValueError, match=r"with validation_fraction=0\.1; now validation_fraction=0\.2"
    ):
        wider.fit(X)


def test_a_context_option_is_refused_by_name():
    x = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match=r"options\['context'\] makes a conditional flow"):
        FlowDensity(options={"context": 1}, epochs=1).fit(x)
