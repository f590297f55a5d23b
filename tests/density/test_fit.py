import copy
import math
import os
import signal
import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyroflows
from pyroflows.density import History, fit
from pyroflows.density.fit import CHECKPOINT, checkpoint_finished
from pyroflows.density.standardize import standardization_of
from pyroflows.nn import PackedLinear
from tests.helpers import flip_a_weight_bit


def mixture() -> dist.MixtureSameFamily:
    means = torch.tensor([[1.5, 1.5], [-1.5, -1.5]])
    components = dist.Normal(means, 0.5).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), components)


def small_flow(seed: int = 0, dim: int = 2, builder=pyroflows.maf, **options) -> pyroflows.Flow:
    torch.manual_seed(seed)
    options = {"transforms": 2, "hidden": (16,), **options}
    return builder(dim, **options)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recovers_quickstart_mixture():
    torch.manual_seed(0)
    truth = mixture()
    x_train, x_test = truth.sample((4000,)), truth.sample((5000,))
    flow = pyroflows.maf(2, transforms=3, hidden=(32, 32), activation=nn.ELU)
    history = fit(flow, x_train, validation=0.2, lr=5e-3, seed=0, progress=False)
    with torch.no_grad():
        gap = (truth.log_prob(x_test) - flow().log_prob(x_test)).mean().item()
    assert 0 <= history.best_epoch <= history.epochs <= 200
    assert abs(gap) < 0.05, f"held-out NLL is {gap:.4f} nats above the truth"


def test_scores_are_in_data_units():
    # data far from the origin and on a large scale: the standardisation layer takes it
    torch.manual_seed(1)
    x = 1000.0 + 50.0 * torch.randn(2000, 2)
    flow = small_flow()
    fit(flow, x, epochs=30, lr=1e-2, seed=0, progress=False)
    layer = standardization_of(flow)
    assert torch.allclose(layer.loc, x[: layer.loc.numel()].new_tensor([1000.0, 1000.0]), atol=5)
    truth = dist.Normal(1000.0, 50.0).expand([2]).to_event(1)
    x_test = 1000.0 + 50.0 * torch.randn(2000, 2)
    with torch.no_grad():
        gap = (truth.log_prob(x_test) - flow().log_prob(x_test)).mean().item()
        draws = flow().sample((4000,))
    assert abs(gap) < 0.05
    assert torch.allclose(draws.mean(0), torch.tensor([1000.0, 1000.0]), atol=5)
    assert torch.allclose(draws.std(0), torch.tensor([50.0, 50.0]), rtol=0.1)


def test_early_stopping_stops_and_restores_best_weights():
    torch.manual_seed(2)
    truth = mixture()
    x_train, x_val = truth.sample((60,)), truth.sample((500,))
    flow = pyroflows.maf(2, transforms=4, hidden=(128, 128))  # over-fits 60 points
    history = fit(
        flow,
        x_train,
        validation=x_val,
        lr=1e-2,
        patience=5,
        schedule=None,
        seed=0,
        progress=False,
    )
    assert history.stopped_early
    assert history.epochs < 200
    assert history.epochs == history.best_epoch + 5
    assert history.best_val_nll == min(history.val_nll)
    assert history.val_nll[-1] > history.best_val_nll
    with torch.no_grad():
        now = -flow().log_prob(x_val).mean().item()
    assert now == pytest.approx(history.best_val_nll, rel=1e-5)


def test_a_score_that_only_equals_the_best_is_no_improvement():
    # lr = 1e-30 moves no weight a float32 step can see: every epoch scores the same,
    # so the first is the best and the fit stops `patience` epochs after it
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    history = fit(small_flow(), x, lr=1e-30, patience=3, epochs=20, schedule=None, progress=False)
    assert len(set(history.val_nll)) == 1
    assert (history.best_epoch, history.epochs, history.stopped_early) == (1, 4, True)


def test_history_and_cosine_schedule():
    torch.manual_seed(3)
    x = torch.randn(300, 2)
    history = fit(small_flow(), x, epochs=6, schedule="cosine", patience=None, progress=False)
    assert isinstance(history, History)
    assert history.epochs == 6
    assert len(history.train_nll) == len(history.val_nll) == 6
    assert all(a > b for a, b in zip(history.lr, history.lr[1:], strict=False))
    assert not history.stopped_early
    assert history.seconds > 0
    assert set(history.as_dict()) >= {"train_nll", "val_nll", "best_epoch"}


def test_without_validation_the_training_nll_decides():
    torch.manual_seed(4)
    history = fit(small_flow(), torch.randn(200, 2), validation=None, epochs=4, progress=False)
    assert history.val_nll == []
    assert history.best_val_nll == min(history.train_nll)


def test_dequantize_fits_the_noisy_data():
    torch.manual_seed(5)
    counts = torch.poisson(torch.full((3000, 2), 6.0))
    flow = small_flow()
    fit(flow, counts, validation=None, dequantize=True, epochs=40, lr=1e-2, seed=0, progress=False)
    assert torch.allclose(standardization_of(flow).loc, counts.mean(0) + 0.5)
    with torch.no_grad():
        draws = flow().sample((20000,))
    # x + U[0, 1): mean + 1/2, variance + 1/12
    assert torch.allclose(draws.mean(0), counts.mean(0) + 0.5, atol=0.1)
    assert torch.allclose(draws.var(0), counts.var(0) + 1 / 12, rtol=0.1)


def test_a_numpy_integer_seed_is_an_int_seed():
    x = torch.randn(100, 2)
    a, b = small_flow(), small_flow()
    fit(a, x, epochs=2, seed=np.int64(3), progress=False)
    fit(b, x, epochs=2, seed=3, progress=False)
    assert same_weights(a, b)


def test_same_seed_same_result():
    x = torch.randn(400, 2)
    a, b = small_flow(seed=7), small_flow(seed=7)
    fit(a, x, epochs=3, seed=11, progress=False)
    fit(b, x, epochs=3, seed=11, progress=False)
    assert same_weights(a, b)


def test_checkpoint_is_atomic_and_safe_to_load(tmp_path):
    flow = small_flow()
    fit(
        flow,
        torch.randn(300, 2),
        epochs=4,
        checkpoint_every=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["done"]
    assert state["epoch"] == 4


def _interrupt_after_epoch(n):
    def callback(epoch, history):
        if epoch == n:
            raise KeyboardInterrupt

    return callback


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    torch.manual_seed(8)
    x = torch.randn(700, 3) @ torch.randn(3, 3)
    options = {"epochs": 7, "batch_size": 64, "seed": 3, "progress": False, "lr": 3e-3}
    whole = small_flow(seed=1, dim=3)
    expected = fit(whole, x, **options)

    parted = small_flow(seed=1, dim=3)
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, checkpoint_dir=tmp_path, callback=_interrupt_after_epoch(3), **options)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["done"]) == (3, 0, False)

    resumed = small_flow(seed=99, dim=3)  # other initial weights: the checkpoint replaces them
    history = fit(resumed, x, checkpoint_dir=tmp_path, resume=True, **options)
    assert same_weights(resumed, whole)
    assert history.val_nll == expected.val_nll
    assert history.train_nll == expected.train_nll
    assert history.best_epoch == expected.best_epoch

    again = small_flow(seed=5, dim=3)  # a finished checkpoint just gives its result back
    assert fit(again, x, checkpoint_dir=tmp_path, resume=True, **options).epochs == 7
    assert same_weights(again, whole)


def test_a_callback_that_raises_keeps_the_best_weights_and_the_epochs_checkpoint(tmp_path):
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    options = {"epochs": 8, "seed": 0, "lr": 0.5, "progress": False}  # too fast: worsens
    seen = {}

    def failing(epoch, history):
        seen[epoch] = {k: v.clone() for k, v in flow.state_dict().items()}
        seen["best"] = history.best_epoch
        if epoch == 6:
            raise RuntimeError("a bug in the user's callback")

    flow = small_flow(seed=1, transforms=1)
    with pytest.raises(RuntimeError, match="a bug in the user's callback"):
        fit(flow, x, checkpoint_dir=tmp_path, callback=failing, **options)
    assert seen["best"] < 6  # else this test could not tell the best weights from the last
    kept = flow.state_dict()
    assert all(torch.equal(kept[k], seen[seen["best"]][k]) for k in kept)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["done"]) == (6, 0, False)
    whole = small_flow(seed=1, transforms=1)
    expected = fit(whole, x, **options)
    resumed = small_flow(seed=2, transforms=1)
    history = fit(resumed, x, checkpoint_dir=tmp_path, resume=True, **options)
    assert history.val_nll == expected.val_nll
    assert same_weights(resumed, whole)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_callback_that_raises_at_the_early_stop_leaves_a_finished_checkpoint(tmp_path, error):
    # lr = 1e-30: every epoch scores the same, and the fit stops early after epoch 4
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    options = {"lr": 1e-30, "patience": 3, "epochs": 20, "schedule": None, "progress": False}

    def failing(epoch, history):
        if epoch == 4:
            raise error("at the epoch the fit stops")

    with pytest.raises(error):
        fit(small_flow(), x, checkpoint_dir=tmp_path, callback=failing, **options)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["done"]) == (4, True)
    resumed = fit(small_flow(seed=3), x, checkpoint_dir=tmp_path, resume=True, **options)
    assert (resumed.epochs, resumed.stopped_early) == (4, True)  # not trained further


@pytest.mark.parametrize("said", ["continue", 1, torch.tensor(1.0), torch.tensor([True, True])])
def test_a_callback_answers_true_false_or_none(said):
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="callback must return True .stop., False or None"):
        fit(small_flow(), x, epochs=3, progress=False, callback=lambda e, h: said)
    with pytest.raises(TypeError, match="callback must be a callable"):
        fit(small_flow(), x, epochs=3, progress=False, callback=5)
    for answer, epochs in (
        (False, 3),
        (None, 3),
        (True, 1),
        (np.True_, 1),
        (torch.tensor(1) > 0, 1),
    ):
        history = fit(small_flow(), x, epochs=3, progress=False, callback=lambda e, h, a=answer: a)
        assert history.epochs == epochs


@pytest.mark.filterwarnings("ignore:fit. every value in the first")  # counts, on purpose
@pytest.mark.parametrize(
    ("schedule", "dequantize", "patience", "lr"),
    [("cosine", True, 2, 2e-2), ("plateau", False, 7, 5e-2)],
)
def test_a_resumed_fit_keeps_its_schedule_patience_and_noise(
    tmp_path, schedule, dequantize, patience, lr
):
    # the learning rate, the epochs without a better score and the dequantization noise
    # all carry over: the fit stops early, after the resume, exactly where it would have
    x = torch.poisson(torch.full((600, 2), 3.0), generator=torch.Generator().manual_seed(4))
    options = {
        "epochs": 30,
        "batch_size": 64,
        "seed": 5,
        "progress": False,
        "lr": lr,
        "schedule": schedule,
        "patience": patience,
        "dequantize": dequantize,
    }
    whole = small_flow(seed=1)
    expected = fit(whole, x, **options)
    assert expected.stopped_early
    assert len(set(expected.lr)) > 1  # the schedule changed the rate
    # interrupted one epoch after the best: with an epoch without a better score counted
    stop = expected.best_epoch + 1
    assert stop < expected.epochs

    parted = small_flow(seed=1)
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, checkpoint_dir=tmp_path, callback=_interrupt_after_epoch(stop), **options)
    resumed = small_flow(seed=7)
    history = fit(resumed, x, checkpoint_dir=tmp_path, resume=True, **options)
    assert history.lr == expected.lr
    assert history.val_nll == expected.val_nll
    assert (history.epochs, history.stopped_early) == (expected.epochs, True)
    assert same_weights(resumed, whole)


def _sigint_at_call(flow: pyroflows.Flow, n: int):
    """A Ctrl-C at the ``n``-th call of the flow's first network; returns the hook's handle."""
    calls = {"n": 0}

    def send_sigint(module, inputs):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGINT)

    return flow.transforms[0].conditioner.register_forward_pre_hook(send_sigint)


def test_ctrl_c_mid_epoch_checkpoints_at_the_batch_boundary(tmp_path):
    torch.manual_seed(9)
    x = torch.randn(640, 2)
    options = {"epochs": 3, "batch_size": 64, "seed": 2, "progress": False}
    whole = small_flow(seed=1)
    expected = fit(whole, x, **options)

    parted = small_flow(seed=1)
    hook = _sigint_at_call(parted, 14)  # inside the second epoch's fourth batch
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, checkpoint_dir=tmp_path, **options)
    hook.remove()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert 0 < state["batch"] < 10

    resumed = small_flow(seed=4)
    history = fit(resumed, x, checkpoint_dir=tmp_path, resume=True, **options)
    assert same_weights(resumed, whole)
    # the interrupted epoch's mean counts the batches before the stop too
    assert history.train_nll == expected.train_nll
    assert history.val_nll == expected.val_nll


def test_resume_refuses_other_data(tmp_path):
    fit(small_flow(), torch.randn(100, 2), epochs=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other data"):
        fit(
            small_flow(),
            torch.randn(120, 2),
            epochs=2,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_resume_refuses_data_with_the_same_total_in_another_order_or_with_values_moved(
    tmp_path,
):
    # the grand total of every value was the only check of the values: the same table
    # with its columns swapped came back as the old fit (scores 100 nats off a row), and
    # training and validation rows with two values swapped resumed on the changed data
    from pyroflows.density import ResumeMismatch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * [1.0, 10.0] + [40.0, 50.0]
    v = rng.normal(size=(50, 2)) * [1.0, 10.0] + [40.0, 50.0]
    options = {"epochs": 2, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    fit(small_flow(), x, validation=v, **options)
    swapped = x.copy()
    swapped[[3, 7], 1] = swapped[[7, 3], 1]  # two values of a column trade rows
    moved = x.copy()
    moved[3, 0] += 0.25
    moved[3, 1] -= 0.25  # the same total
    for other in (x[:, ::-1], x[::-1], swapped, moved):
        with pytest.raises(ResumeMismatch, match="the same sum, but other values") as caught:
            fit(small_flow(), other.copy(), validation=v, resume=True, **options)
        assert set(caught.value.changed) == {"data"}
    held = v.copy()
    held[[1, 2], 0] = held[[2, 1], 0]
    with pytest.raises(ResumeMismatch, match="other validation rows"):
        fit(small_flow(), x, validation=held, resume=True, **options)
    assert fit(small_flow(), x.copy(), validation=v.copy(), resume=True, **options).epochs == 2


def test_resume_refuses_other_options_and_returns_a_finished_fit_as_it_was(tmp_path):
    x = torch.randn(100, 2)
    first = fit(small_flow(), x, epochs=3, seed=0, checkpoint_dir=tmp_path, progress=False)
    for changed, shown in (({"epochs": 10}, "epochs=3; now epochs=10"), ({"lr": 0.05}, "lr")):
        options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
        with pytest.raises(ValueError, match=f"written by a fit with .*{shown}"):
            fit(small_flow(), x, resume=True, **{**options, **changed})  # it ran 3 epochs
    # the flow (and so the data) in float64: the dtype is named, not "other data"
    with pytest.raises(ValueError, match="dtype='float32'; now dtype='float64'"):
        fit(small_flow().double(), x.double(), resume=True, **options)
    flow = small_flow(seed=1)
    again = fit(flow, x, epochs=3, seed=0, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert again.epochs == first.epochs == 3
    assert again.best_val_nll == first.best_val_nll


def test_a_numpy_string_schedule_gives_a_resumable_checkpoint(tmp_path):
    x, schedule = torch.randn(100, 2), np.str_("cosine")  # as a parameter grid gives it
    options = {"epochs": 2, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    first = fit(small_flow(), x, schedule=schedule, **options)
    again = fit(small_flow(), x, schedule=schedule, resume=True, **options)
    assert again.best_val_nll == first.best_val_nll


def test_progress_bar_goes_to_stderr(capsys):
    fit(small_flow(), torch.randn(100, 2), epochs=2, progress=True)
    assert "epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 1.5}, TypeError, "batch_size"),
        ({"lr": -1}, ValueError, "lr"),
        ({"validation": 1.5}, ValueError, "validation"),
        ({"schedule": "linear"}, ValueError, "schedule"),
        ({"resume": True}, ValueError, "checkpoint_dir"),
        ({"clip_grad": 0}, ValueError, "clip_grad"),
        ({"patience": 0}, ValueError, r"or None to never stop early \(the command line's"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": "3"}, TypeError, "seed must be an int"),
        ({"seed": 2**64}, ValueError, "seed must be in"),
        ({"name": ""}, TypeError, "name must be a non-empty str"),
        ({"name": 3}, TypeError, "name must be a non-empty str, got 3"),
        ({"distributed": "no"}, TypeError, "distributed must be True or False"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fit(small_flow(), torch.randn(50, 2), progress=False, **kwargs)


def test_bad_flow_and_data():
    with pytest.raises(TypeError, match="pyroflows.Flow"):
        fit(nn.Linear(2, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"this flow is conditional.*pass context=.*\(N, 3\)"):
        fit(pyroflows.maf(2, context=3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="context was given, but the flow is unconditional"):
        fit(small_flow(), torch.randn(5, 2), context=torch.randn(5, 3))
    with pytest.raises(TypeError, match="no silent cast"):
        fit(small_flow(), torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 columns.*got 3"):
        fit(small_flow(), torch.randn(5, 3))
    flow = small_flow()
    with pytest.raises(ValueError, match="NaN or inf"):
        fit(flow, torch.tensor([[0.0, math.nan], [1.0, 2.0]]))


def test_non_finite_loss_restores_best_weights():
    x = torch.randn(256, 2)
    flow = small_flow(clamp=None)
    epochs = {"n": 0}

    def schedule(optimizer):
        class Explode:
            def step(self):  # after epoch 2, a learning rate no flow survives
                epochs["n"] += 1
                if epochs["n"] == 2:
                    for group in optimizer.param_groups:
                        group["lr"] = 1e12

            def state_dict(self):
                return {}

        return Explode()

    with pytest.raises(FloatingPointError, match="epoch 3.*clip_grad, or standardize=True"):
        fit(
            flow,
            x,
            validation=None,
            epochs=10,
            batch_size=32,
            schedule=schedule,
            standardize=False,
            progress=False,
        )
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    assert torch.isfinite(flow().log_prob(x)).all()
    epochs["n"] = 0  # standardized already: the advice does not offer it again
    with pytest.raises(FloatingPointError, match=r"smaller lr or clip_grad$"):
        fit(flow, x, validation=None, epochs=10, batch_size=32, schedule=schedule, progress=False)


def test_a_ctrl_c_after_the_last_batch_is_not_swallowed(tmp_path):
    # it lands in the last epoch's validation, callback or checkpoint write, after the
    # last check between batches: the fit finished (and is saved), but the script went
    # on as if no Ctrl-C had been pressed
    def callback(epoch, history):
        if epoch == 3:
            os.kill(os.getpid(), signal.SIGINT)

    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x, callback=callback, **options)
    assert checkpoint_finished(tmp_path / CHECKPOINT) is True
    assert fit(small_flow(), x, resume=True, **options).epochs == 3  # its result, as saved


def test_resume_without_a_seed_reuses_the_checkpoints_seed(tmp_path):
    torch.manual_seed(11)
    x = torch.randn(400, 2)
    options = {"epochs": 5, "batch_size": 64, "progress": False}
    parted = small_flow(seed=1)
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, checkpoint_dir=tmp_path, callback=_interrupt_after_epoch(2), **options)
    seed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["seed"]
    resumed = small_flow(seed=7)
    history = fit(resumed, x, checkpoint_dir=tmp_path, resume=True, **options)
    whole = small_flow(seed=1)
    expected = fit(whole, x, seed=seed, **options)
    assert history.val_nll == expected.val_nll
    assert same_weights(resumed, whole)


@pytest.mark.parametrize(
    "other",
    [
        lambda: small_flow(hidden=(8,)),  # other weight shapes
        lambda: pyroflows.iaf(2, transforms=2, hidden=(16,)),  # the same shapes, other form
        lambda: small_flow(activation=nn.Tanh),  # the same weights, another activation
    ],
)
def test_resume_refuses_another_architecture(tmp_path, other):
    from pyroflows.density import ResumeMismatch

    x = torch.randn(100, 2)
    options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x, callback=_interrupt_after_epoch(1), **options)
    flow = other()
    before = copy.deepcopy(flow.state_dict())
    with pytest.raises(ResumeMismatch, match="another flow") as caught:
        fit(flow, x, resume=True, **options)
    assert set(caught.value.changed) == {"flow"}
    after = flow.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # no weight was loaded


def test_resume_refuses_other_validation_rows(tmp_path):
    from pyroflows.density import ResumeMismatch

    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(200, 2)), rng.normal(size=(50, 2))
    options = {"epochs": 4, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x, validation=v, callback=_interrupt_after_epoch(2), **options)
    for other, shown, key in (
        (v * 100, "validation rows", "validation_rows"),  # other rows
        (None, "validation=", "validation"),  # none: the option differs
    ):
        with pytest.raises(ResumeMismatch, match=shown) as caught:
            fit(small_flow(), x, validation=other, resume=True, **options)
        assert set(caught.value.changed) == {key}
    with pytest.raises(ResumeMismatch, match="validation='rows'; now validation=0.2"):
        fit(small_flow(), x, validation=0.2, resume=True, **options)  # a fraction instead
    history = fit(small_flow(), x, validation=v.copy(), resume=True, **options)  # the same
    assert history.epochs == 4
    assert len(history.val_nll) == 4


def test_resume_takes_a_float32_fraction_as_the_float_it_rounds(tmp_path):
    x = np.random.default_rng(1).normal(size=(200, 2))
    options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit(
            small_flow(),
            x,
            validation=np.float32(0.1),
            callback=_interrupt_after_epoch(1),
            **options,
        )
    assert fit(small_flow(), x, validation=0.1, resume=True, **options).epochs == 3


def test_resume_names_another_batch_size_and_other_held_out_rows(tmp_path):
    from pyroflows.density import ResumeMismatch

    x = np.random.default_rng(2).normal(size=(200, 2))
    options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x, callback=_interrupt_after_epoch(1), **options)
    with pytest.raises(ResumeMismatch, match="batch_size=256; now batch_size=32") as caught:
        fit(small_flow(), x, batch_size=32, resume=True, **options)
    assert set(caught.value.changed) == {"batch_size"}
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["held_out"][1] += 1.0  # as if a held-out row had changed, the training rows not
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeMismatch, match="other validation rows") as caught:
        fit(small_flow(), x, resume=True, **options)
    assert set(caught.value.changed) == {"validation_rows"}


def test_a_dangling_link_as_checkpoint_dir_is_refused_before_the_first_epoch(tmp_path):
    import os

    from pyroflows.density.fit import unwritable

    link = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", link)
    assert "does not exist" in unwritable(link)
    assert unwritable(link / "inner") is not None
    assert unwritable(tmp_path / "new" / "folder") is None  # made later, writable
    with pytest.raises(ValueError, match="checkpoint_dir .*dangling.* cannot be written"):
        fit(small_flow(), torch.randn(50, 2), epochs=3, checkpoint_dir=link, progress=False)


def test_an_unwritable_checkpoint_dir_is_refused_before_the_first_epoch(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    epochs = []
    with pytest.raises(ValueError, match=r"checkpoint_dir .*blocker.* cannot be written"):
        fit(
            small_flow(),
            torch.randn(100, 2),
            epochs=30,
            checkpoint_dir=blocker / "ck",
            checkpoint_every=100,
            progress=False,
            callback=lambda epoch, history: epochs.append(epoch),
        )
    assert epochs == []
    assert blocker.read_text() == "a file, not a folder"


def test_checkpoints_are_written_every_n_epochs_and_readable_by_others(tmp_path):
    seen = []

    def look(epoch, history):
        path = tmp_path / "checkpoint.pt"
        seen.append(torch.load(path, weights_only=True)["epoch"] if path.exists() else None)

    fit(small_flow(), torch.randn(200, 2), epochs=7, checkpoint_every=3, seed=0,
        checkpoint_dir=tmp_path, callback=look, progress=False)  # fmt: skip
    # the callback runs before the epoch's checkpoint: epochs 3 and 6 write one
    assert seen == [None, None, None, 3, 3, 3, 6]
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o044 == 0o044  # umask 022


def test_clipping_and_the_plateau_schedule_take_effect():
    x = torch.randn(300, 2)
    norms = []
    flow = small_flow()
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        original(parameters, max_norm, *args, **kwargs)
        norms.append(torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).norm())
        return norms[-1]

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        fit(flow, x, epochs=2, clip_grad=1e-3, seed=0, progress=False)
    finally:
        torch.nn.utils.clip_grad_norm_ = original
    assert norms
    assert max(norms) <= 1e-3 * 1.0001
    # a constant validation score: the plateau schedule halves the rate after 5 epochs
    history = fit(small_flow(), x, epochs=9, lr=1e-6, patience=None, seed=0, progress=False)
    assert history.lr[0] == pytest.approx(1e-6)
    assert history.lr[-1] < history.lr[0]


def test_bad_validation_rows_are_found_before_training(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 2))
    x[3, 1] = np.inf
    np.save(tmp_path / "x.npy", x)
    data = np.load(tmp_path / "x.npy", mmap_mode="r")
    epochs = []
    with pytest.raises(ValueError, match="inf at row 4, column 2"):
        fit(small_flow(), data, validation=0.5, seed=0, progress=False,
            callback=lambda epoch, history: epochs.append(epoch))  # fmt: skip
    assert epochs == []


def test_resume_refuses_another_seed_and_unreadable_checkpoints(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 2))
    options = {"epochs": 2, "progress": False, "checkpoint_dir": tmp_path}
    fit(small_flow(), x, seed=3, **options)
    with pytest.raises(ValueError, match=r"seed=4, but the checkpoint .* seed=3"):
        fit(small_flow(), x, seed=4, resume=True, **options)
    fit(small_flow(), x, seed=3, resume=True, **options)  # the same seed: fine
    with pytest.raises(ValueError, match="sum of the training values"):
        fit(small_flow(), x + 1.0, resume=True, **options)  # same shape, other values
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_text("garbage")
    with pytest.raises(ValueError, match="not a readable pyroflows checkpoint"):
        fit(small_flow(), x, resume=True, **options)
    torch.save([1, 2], checkpoint)
    with pytest.raises(ValueError, match="not a pyroflows checkpoint .*list"):
        fit(small_flow(), x, resume=True, **options)
    checkpoint.unlink()
    fit(small_flow(), x, seed=3, **options)
    member = flip_a_weight_bit(checkpoint)
    with pytest.raises(ValueError, match=rf"damaged checkpoint: its member {member} fails"):
        fit(small_flow(), x, resume=True, **options)


def test_values_beyond_float32_are_refused_with_their_place(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    x[7, 1] = 1e39  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"1e\+39 at row 8, column 2 \(index \[7, 1\]\) is beyond"):
        fit(small_flow(), x, epochs=1, progress=False)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"x.npy: 1e\+39 at row 8, column 2 .*float32"):
        fit(small_flow(), mapped, epochs=1, progress=False)
    flow = small_flow().double()  # in float64 the same value is fine
    assert fit(flow, x, epochs=1, progress=False).epochs == 1


def test_numpy_scalar_options_give_a_resumable_checkpoint(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 2))
    options = {
        "epochs": np.int64(3),
        "batch_size": np.int64(64),
        "lr": np.float32(1e-3),
        "weight_decay": np.float64(0.0),
        "schedule": "cosine",
        "progress": False,
        "checkpoint_dir": tmp_path,
        "seed": 0,
    }
    first = fit(small_flow(), x, **options)
    again = fit(small_flow(), x, resume=True, **options)  # reads the checkpoint back
    assert again.epochs == first.epochs == 3
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        fit(small_flow(), x, epochs=1, weight_decay=-1.0, progress=False)
    for name in ("lr", "weight_decay"):  # inf made the first step's loss non-finite
        with pytest.raises(ValueError, match=f"{name} must be a finite"):
            fit(small_flow(), x, epochs=1, progress=False, **{name: math.inf})


def test_adam_is_fused_where_the_device_has_the_kernel_and_steps_as_adam_does():
    from pyroflows.density.fit import _adam

    torch.manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for make in (_adam, lambda ps, lr: torch.optim.Adam(ps, lr=lr)):
        p = nn.Parameter(start.clone())
        optimizer = make([p], lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            (p**3).sum().backward()
            optimizer.step()
        results.append((p.detach(), optimizer.defaults))
    (fused, options), (plain, _) = results
    assert options["fused"]
    assert not options["foreach"]
    torch.testing.assert_close(fused, plain)
    # no fused kernel on the meta device: the multi-tensor update instead
    options = _adam([nn.Parameter(torch.empty(3, device="meta"))], lr=0.1).defaults
    assert options["foreach"]
    assert not options["fused"]


def test_adam_falls_back_where_torch_refuses_fused_at_construction(monkeypatch):
    # torch 2.1-2.3 (allowed by pyproject) refuse fused=True for CPU parameters at once
    from pyroflows.density.fit import _adam

    real = torch.optim.Adam.__init__

    def old_torch(self, params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on CUDA")
        real(self, params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", old_torch)
    options = _adam([nn.Parameter(torch.zeros(3))], lr=0.1).defaults
    assert options["foreach"]
    assert not options["fused"]


def test_clip_grad_must_be_a_positive_number():
    flow = pyroflows.maf(2, transforms=1, hidden=(8,))
    with pytest.raises(TypeError, match="clip_grad .* must be a number > 0, got str 'x'"):
        fit(flow, torch.randn(50, 2), clip_grad="x", epochs=1, progress=False)
    with pytest.raises(ValueError, match="clip_grad .* must be a finite number > 0, got -1.0"):
        fit(flow, torch.randn(50, 2), clip_grad=-1, epochs=1, progress=False)


def test_fit_trains_under_the_callers_no_grad_and_inference_mode():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1
    expected = small_flow()
    fit(expected, x, epochs=2, seed=0, progress=False)
    for mode in (torch.no_grad, torch.inference_mode):
        flow = small_flow()
        with mode():
            fit(flow, x.clone(), epochs=2, seed=0, progress=False)
        assert same_weights(flow, expected)


def test_fit_refuses_a_flow_it_cannot_train():
    x = torch.randn(100, 2)
    with pytest.raises(ValueError, match="flow has no parameter that requires grad"):
        fit(small_flow().requires_grad_(False), x, epochs=1, progress=False)
    with torch.inference_mode():
        built = small_flow()
    with pytest.raises(ValueError, match=r"flow was built .* under torch.inference_mode\(\)"):
        fit(built, x, epochs=1, progress=False)


def test_dequantize_refuses_integers_too_large_for_float32_to_take_the_noise():
    # at 2e7 a float32 step is 2: x + U[0,1) rounds back to x, and the fit learnt the
    # rounding (every floored draw even); float64 resolves the cells
    from pyroflows.density import DataError

    x = torch.tensor([[2.0e7, 3.0], [2.0e7 + 1, 4.0], [2.0e7 + 3, 4.0], [2.0e7 + 2, 5.0]] * 10)
    with pytest.raises(DataError, match=r"up to 2000000\d, too large to dequantize in torch"):
        fit(small_flow(), x, epochs=1, dequantize=True, progress=False)
    below = x.clone()
    below[:, 0] -= 2.0e7 - 2.0**20 + 10  # just under 2**20: steps of 1/16 at most
    fit(small_flow(), below, epochs=1, dequantize=True, progress=False)
    fit(small_flow().double(), x.double(), epochs=1, dequantize=True, progress=False)


def test_the_dequantization_bound_is_2_to_the_20_in_float32_and_any_dtype_is_taken():
    from pyroflows.density import DataError
    from pyroflows.density.rows import refuse_too_large

    refuse_too_large(2.0**20 - 1, torch.float32, "X")  # steps of 1/16 below 2^20
    with pytest.raises(DataError, match="up to 1048576, too large to dequantize"):
        refuse_too_large(2.0**20, torch.float32, "X")
    refuse_too_large(15.0, torch.bfloat16, "X")  # NumPy has no bfloat16: a TypeError was
    with pytest.raises(DataError, match=r"in torch\.bfloat16: .* steps of 0\.125"):
        refuse_too_large(16.0, torch.bfloat16, "X")
    refuse_too_large(1e300, torch.float64, "X")


def test_starting_afresh_over_an_unfinished_checkpoint_warns(tmp_path):
    torch.manual_seed(12)
    x = torch.randn(300, 2)
    options = {"epochs": 4, "batch_size": 64, "progress": False, "seed": 0}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(), x, checkpoint_dir=tmp_path, callback=_interrupt_after_epoch(2), **options)
    with pytest.warns(UserWarning, match="holds an unfinished fit.*pass resume=True"):
        fit(small_flow(), x, checkpoint_dir=tmp_path, **options)
    # a finished checkpoint is replaced without a word
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["done"]
    fit(small_flow(), x, checkpoint_dir=tmp_path, **options)


@pytest.mark.parametrize(("rows", "validation", "split"), [(1, 0.1, False), (2, 0.1, True)])
def test_fewer_than_two_training_rows_are_refused(rows, validation, split):
    x = torch.randn(rows, 2)
    with pytest.raises(ValueError, match="at least 2 training rows") as error:
        fit(small_flow(), x, validation=validation, epochs=1, progress=False)
    assert ("the validation split took 1" in str(error.value)) == split
    # the remedy in the terms of each way in: fit, the command line, FlowDensity
    for way in ("validation=None", "--validation 0", "validation_fraction=None"):
        assert (way in str(error.value)) == split
    if rows == 1:  # validation rows of their own: nothing was split off the one row
        with pytest.raises(ValueError, match=r"got 1 row\(s\) in data; give more rows$"):
            fit(small_flow(), x, validation=torch.randn(5, 2), epochs=1, progress=False)


def test_a_spread_below_float32s_normal_range_is_refused_not_taken_as_constant():
    torch.manual_seed(13)
    x = (torch.randn(300, 2, dtype=torch.float64) * 1e-39).numpy()
    below = r"column 1 \(index 0\) has sd 1.04e-39, below the smallest normal float32.*float64"
    with pytest.raises(ValueError, match=below):
        fit(small_flow(), x, epochs=1, progress=False)
    # in float64 the same column fits, in its own units: log p near -log(1e-39) per dim
    flow = small_flow().double()
    fit(flow, x, epochs=2, progress=False)
    logp = flow().log_prob(torch.from_numpy(x)).mean().item()
    assert abs(logp - 2 * (math.log(1e39) - 0.5 * math.log(2 * math.pi * math.e))) < 1.0
    # unstandardized, float32 cannot resolve it either: refused, not called constant
    with pytest.raises(ValueError, match=below):
        fit(small_flow(), x, standardize=False, epochs=1, progress=False)


@pytest.mark.parametrize("mapped", [False, True])
def test_a_float64_spread_whose_variance_underflows_is_standardized_by_its_sd(tmp_path, mapped):
    # sd 1e-160: its variance, 1e-320, is below float64's normal range (a subnormal with
    # few bits, or 0 for smaller sds), yet float64 holds the sd and 1 / sd well
    x = np.random.default_rng(3).normal(size=(300, 2)) * [1e-160, 1.0] + [1e-158, 0.0]
    if mapped:
        np.save(tmp_path / "x.npy", x)
        x = np.load(tmp_path / "x.npy", mmap_mode="r")
    flow = small_flow().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "holds one value" warning: it does not
        fit(flow, x, validation=None, epochs=1, progress=False)
    scale = standardization_of(flow).scale
    sd = np.std(x[:, 0] * 1e160) * 1e-160  # numpy squares the deviations: scaled first
    assert scale[0].item() == pytest.approx(sd, rel=1e-12, abs=0)
    assert scale[1].item() == pytest.approx(np.std(x[:, 1]), rel=1e-12, abs=0)


def test_a_float64_spread_whose_variance_overflows_is_standardized_by_its_sd():
    x = np.random.default_rng(4).normal(size=(300, 2)) * [1e160, 1.0]  # variance 1e320: inf
    flow = small_flow().double()
    fit(flow, x, validation=None, epochs=1, progress=False)
    sd = np.std(x[:, 0] * 1e-160) * 1e160
    assert standardization_of(flow).scale[0].item() == pytest.approx(sd, rel=1e-12, abs=0)


def test_a_constant_column_takes_no_second_pass_over_the_rows(monkeypatch):
    from pyroflows.density import rows

    sd_of = rows.column_sd

    def first_pass_only(blocks, *moments):
        def second_pass():
            raise AssertionError("a second pass over the rows")

        return sd_of(second_pass, *moments)

    monkeypatch.setattr(rows, "column_sd", first_pass_only)
    x = np.c_[np.random.default_rng(5).normal(size=300), np.zeros(300)]  # variance exactly 0
    with pytest.warns(UserWarning, match="hold one value"):
        fit(small_flow().double(), x, epochs=1, progress=False)


@pytest.mark.parametrize("builder", [pyroflows.maf, pyroflows.realnvp])
def test_resume_refuses_a_checkpoint_of_a_flow_with_a_parameter_per_layer(tmp_path, builder):
    # as an earlier version wrote it: its networks held a weight and a bias per layer
    # (its repr named an MLP's layers Linear), so its optimizer state fits no packed flow,
    # though the weights alone would load
    from pyroflows.density import ResumeMismatch

    x = torch.randn(100, 2)
    options = {"epochs": 3, "seed": 0, "checkpoint_dir": tmp_path, "progress": False}
    old = small_flow(builder=builder)
    for t in old.transforms:
        if hasattr(t, "conditioner"):
            t.conditioner.unpack()
            for layer in t.conditioner.modules():
                if type(layer) is PackedLinear:
                    layer.__class__ = torch.nn.Linear
    with pytest.raises(KeyboardInterrupt):
        fit(old, x, callback=_interrupt_after_epoch(1), **options)
    flow = small_flow(builder=builder)
    before = copy.deepcopy(flow.state_dict())
    with pytest.raises(ResumeMismatch, match="parameter tensors, but this flow has 2") as caught:
        fit(flow, x, resume=True, **options)
    assert "written by an earlier pyroflows" in str(caught.value)
    assert "a weight and a bias per layer, or large networks packed" in str(caught.value)
    after = flow.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # no weight was loaded


def test_integer_data_fitted_without_dequantization_is_warned_about():
    # counts fitted as they are: the flow grows spikes on the values, and the validation
    # NLL (the held-out rows take the same values) falls with it, past the entropy of
    # the counts: early stopping cannot guard, so the fit says so before it starts
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (400, 2), generator=g).float()
    options = {"epochs": 1, "seed": 0, "progress": False}
    with pytest.warns(UserWarning, match=r"whole number.*\(4, 4 distinct.*dequantize=True"):
        fit(small_flow(), counts, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(small_flow(), counts, dequantize=True, **options)  # the remedy: no warning
        fit(small_flow(), torch.randn(400, 2, generator=g), **options)  # real values
        spread = torch.randint(0, 10**6, (400, 2), generator=g).float()  # few repeats
        fit(small_flow(), spread, **options)
    # a count beside a measurement: said too, with the remedy by hand (dequantize=True
    # takes whole tables only); before, nothing was said
    mixed = torch.stack([torch.randn(400, generator=g), counts[:, 0]], -1)
    with pytest.warns(UserWarning, match=r"column\(s\) 2 \(4 distinct\) hold .*dequantize=\[1\]"):
        fit(small_flow(), mixed, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(small_flow(), mixed, dequantize=[1], **options)  # that remedy: no warning
    # two counts beside a measurement, one already listed: the remedy lists both (the
    # one named alone would take the listed one's noise away)
    two = torch.stack([counts[:, 0], torch.randn(400, generator=g), counts[:, 1]], -1)
    with pytest.warns(UserWarning, match=r"column\(s\) 3 \(4 distinct\) .*dequantize=\[0, 2\] "):
        fit(small_flow(dim=3), two, dequantize=[0], **options)
    with pytest.warns(UserWarning, match=r"dequantize=True \(--dequantize on the command line\)"):
        fit(small_flow(), two[:, [0, 2]], dequantize=[0], **options)


def test_dequantize_takes_some_columns():
    # a count beside a measurement: the noise goes on the count only (before, dequantize
    # took whole tables, and the warning's remedy was to add the noise by hand)
    from pyroflows.density.rows import TensorRows, chunk_noise, log_prob, sample

    g = torch.Generator().manual_seed(0)
    mixed = torch.stack(
        [torch.randn(400, generator=g), torch.randint(0, 4, (400,), generator=g)], -1
    )
    flow = small_flow()
    history = fit(flow, mixed, dequantize=[1], epochs=2, seed=0, progress=False)
    assert math.isfinite(history.train_nll[-1])
    # the fractions of column 1 are refused, those of column 0 are data
    fractional = mixed.clone()
    fractional[5, 1] = 0.5
    with pytest.raises(ValueError, match=r"row 6, column 2 \(index \[5, 1\]\) is 0.5"):
        fit(small_flow(), fractional, dequantize=[1], epochs=1, progress=False)
    # the score: the mean over the seeded draws of log p(x + u), u on column 1 only
    rows = TensorRows(mixed[:20], "x")
    scores = log_prob(flow, rows, dequantize=[1], draws=16, seed=0)
    u = chunk_noise((16, 1, 2), 0, 0, flow.base_loc) * torch.tensor([0.0, 1.0])
    with torch.no_grad():
        expected = flow().log_prob(mixed[:20] + u).mean(0)
    torch.testing.assert_close(scores, expected)
    # draws: column 1 floored, column 0 as drawn
    draws = sample(flow, 50, 0, [1])
    assert torch.equal(draws[:, 1], draws[:, 1].floor())
    assert not torch.equal(draws[:, 0], draws[:, 0].floor())


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ([], False), ([1, 0], True), ([-1], [1]), ((0,), [0])],
)
def test_dequantize_columns_in_the_form_a_fit_records(value, expected):
    from pyroflows.density.rows import dequantized_columns

    assert dequantized_columns(value, 2) == expected


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("yes", TypeError, "dequantize must be True, False or a sequence of column indices"),
        ([0.5], TypeError, "dequantize's entries must be column indices"),
        ([True], TypeError, "dequantize's entries must be column indices"),
        ([2], ValueError, r"names column 2, but the data have 2 column\(s\)"),
        ([0, -2], ValueError, "names a column twice"),
    ],
)
def test_bad_dequantize_columns_are_named(value, error, match):
    with pytest.raises(error, match=match):
        fit(small_flow(), torch.zeros(10, 2), dequantize=value, epochs=1, progress=False)


@pytest.mark.parametrize("flag", [True, np.bool_(False), "0.1"])
def test_a_bool_for_validation_is_named(flag):
    # it was taken for rows, and refused as "validation must have shape (N, D), got ()"
    x = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(TypeError, match=r"validation must be a fraction in \[0, 1\), rows"):
        fit(small_flow(), x, validation=flag, epochs=1, progress=False)


# ------------------------------------------------------------------ conditional flows


def conditional_truth(c: torch.Tensor) -> dist.Distribution:
    """x | c: a mean and a spread that both move with c (neither a flow's bias alone)."""
    loc = torch.stack([c[:, 0], c[:, 0] * c[:, 1]], -1)
    scale = torch.stack([0.3 + 0.2 * c[:, 1].abs(), 0.5 * torch.ones(len(c))], -1)
    return dist.Normal(loc, scale).to_event(1)


def test_a_conditional_flow_recovers_a_known_conditional_density():
    torch.manual_seed(0)
    c, c_test = torch.randn(3000, 2), torch.randn(5000, 2)
    x, x_test = conditional_truth(c).sample(), conditional_truth(c_test).sample()
    flow = pyroflows.maf(2, context=2, transforms=3, hidden=(32, 32))
    history = fit(flow, x, context=c, validation=0.2, lr=5e-3, seed=0, progress=False)
    with torch.no_grad():
        truth = -conditional_truth(c_test).log_prob(x_test).mean().item()
        nll = -flow(c_test).log_prob(x_test).mean().item()
    assert abs(nll - truth) < 0.06, f"held-out NLL {nll:.4f} against the true {truth:.4f}"
    # the validation rows were scored with their own contexts: their best NLL is the
    # held-out one up to the sampling noise of 600 rows (a shuffled context costs nats)
    assert abs(history.best_val_nll - truth) < 0.15, (history.best_val_nll, truth)


def test_the_split_and_the_batches_keep_each_row_with_its_context():
    from pyroflows.density.fit import _split
    from pyroflows.density.rows import TensorRows

    x = torch.arange(40.0).reshape(20, 2)
    c = x[:, :1] * 10.0
    train, valid, train_c, valid_c = _split(
        TensorRows(x), 0.3, torch.Generator().manual_seed(0), x, TensorRows(c)
    )
    assert (len(train), len(valid), len(train_c), len(valid_c)) == (14, 6, 14, 6)
    everything = torch.arange(14)
    assert torch.equal(train_c.take(everything), train.take(everything)[:, :1] * 10.0)
    assert torch.equal(valid_c.take(torch.arange(6)), valid.take(torch.arange(6))[:, :1] * 10.0)
    # and every batch: x = c exactly (up to noise far below the flow's reach) is fitted
    # far better than any density of x alone could be
    torch.manual_seed(1)
    c = torch.randn(1000, 2)
    x = c + 0.01 * torch.randn(1000, 2)
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(16,))
    history = fit(flow, x, context=c, epochs=40, lr=1e-2, batch_size=64, seed=0, progress=False)
    assert history.best_val_nll < -4.0  # N(c, 0.01^2 I): -2 log(0.01) - log(2 pi e) = -6.4


def test_validation_rows_with_their_contexts_are_what_the_fit_scores():
    torch.manual_seed(2)
    c, c_val = torch.randn(400, 2), torch.randn(100, 2)
    x, x_val = conditional_truth(c).sample(), conditional_truth(c_val).sample()
    flow = pyroflows.maf(2, context=2, transforms=2, hidden=(16,))
    history = fit(flow, x, context=c, validation=(x_val, c_val), epochs=6, seed=0, progress=False)
    with torch.no_grad():
        nll = -flow(c_val).log_prob(x_val).mean().item()
    assert nll == pytest.approx(history.val_nll[history.best_epoch - 1], rel=1e-5)


@pytest.mark.parametrize(
    ("context", "validation", "error", "match"),
    [
        (torch.randn(50, 3), 0.1, ValueError, r"context must have 2 columns \(the flow's context"),
        (torch.randn(49, 2), 0.1, ValueError, "49 context rows for 50 rows"),
        (torch.tensor([[0.0, 1.0]] * 49 + [[0.0, math.inf]]), 0.1, ValueError, "context"),
        (torch.randn(50, 2, dtype=torch.float64), 0.1, TypeError, "no silent cast"),
        (torch.randn(50, 2), torch.randn(10, 2), TypeError, "pair .rows .M, 2., context .M, 2.."),
        (torch.randn(50, 2), (torch.randn(10, 2),), TypeError, "got tuple of length 1"),
        (
            torch.randn(50, 2),
            (torch.randn(10, 2), torch.randn(9, 2)),
            ValueError,
            "got 10 rows and 9 contexts",
        ),
        (
            torch.randn(50, 2),
            (torch.randn(10, 2), torch.randn(10, 1)),
            ValueError,
            r"validation\[1\] must have 2 columns",
        ),
        (torch.randn(50, 2), "0.1", TypeError, r"a pair \(rows \(M, D\), context"),
    ],
)
def test_bad_contexts_are_named(context, validation, error, match):
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(8,))
    with pytest.raises(error, match=match):
        fit(flow, torch.randn(50, 2), context=context, validation=validation, progress=False)


def test_a_nan_in_a_context_is_named_by_row_and_column():
    context = torch.zeros(50, 2)
    context[6, 1] = math.nan
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(8,))
    with pytest.raises(ValueError, match=r"context.*row 7.*column 2"):
        fit(flow, torch.randn(50, 2), context=context, progress=False)


def _context_columns(kind: str) -> torch.Tensor:
    rng = np.random.default_rng(3)
    columns = {
        "years": 2000.0 + 10.0 * rng.normal(size=200),  # saturates the first layer
        "constant 2000": np.full(200, 2000.0),  # as harmful: the weights multiply it too
        "tiny spread": 1e-4 * rng.normal(size=200),  # the networks can hardly tell apart
        "standardized": rng.normal(size=200),
        "one-hot, rare": (rng.random(200) < 0.995).astype(float),  # in [0, 1]: no harm
        "proportion": 0.5 + 0.03 * rng.normal(size=200),
        "constant 0": np.zeros(200),
    }
    return torch.tensor(np.c_[rng.normal(size=200), columns[kind]], dtype=torch.float32)


@pytest.mark.parametrize("kind", ["years", "constant 2000", "tiny spread"])
def test_a_context_column_far_from_unit_scale_is_named(kind):
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(8,))
    with pytest.warns(UserWarning, match=r"context column\(s\) 2 \(mean .*\) are far from unit"):
        fit(flow, torch.randn(200, 2), context=_context_columns(kind), epochs=1, progress=False)


@pytest.mark.parametrize("kind", ["standardized", "one-hot, rare", "proportion", "constant 0"])
def test_a_context_column_near_unit_scale_is_not_warned_of(kind):
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(flow, torch.randn(200, 2), context=_context_columns(kind), epochs=1, progress=False)


def test_a_one_dimensional_context_is_told_its_shape():
    flow = pyroflows.maf(2, context=1, transforms=1, hidden=(8,))
    with pytest.raises(ValueError, match=r"context must have shape \(N, 1\).*reshape\(-1, 1\)"):
        fit(flow, torch.randn(50, 2), context=torch.randn(50), progress=False)
    flow = pyroflows.maf(2, context=2, transforms=1, hidden=(8,))
    with pytest.raises(ValueError, match=r"context must have shape \(N, 2\), a row per row of"):
        fit(flow, torch.randn(50, 2), context=np.zeros((50, 2, 1)), progress=False)


def test_a_validation_pair_for_an_unconditional_flow_is_named():
    x, pair = torch.randn(50, 2), (torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(TypeError, match=r"pair of tables.*this flow is unconditional"):
        fit(small_flow(), x, validation=pair, progress=False)
    # two rows of numbers are validation rows, as before
    history = fit(small_flow(), x, validation=[[0.0, 1.0], [1.0, 0.0]], epochs=1, progress=False)
    assert len(history.val_nll) == 1


def test_a_conditional_fit_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    torch.manual_seed(4)
    c = torch.randn(500, 2)
    x = conditional_truth(c).sample()
    options = {"epochs": 6, "batch_size": 64, "seed": 3, "progress": False, "lr": 3e-3}
    whole = small_flow(seed=1, context=2)
    expected = fit(whole, x, context=c, **options)
    parted = small_flow(seed=1, context=2)
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, context=c, checkpoint_dir=tmp_path, callback=_interrupt_after_epoch(2),
            **options)  # fmt: skip
    resumed = small_flow(seed=9, context=2)
    history = fit(resumed, x, context=c, checkpoint_dir=tmp_path, resume=True, **options)
    assert same_weights(resumed, whole)
    assert (history.train_nll, history.val_nll) == (expected.train_nll, expected.val_nll)


def test_resume_refuses_other_contexts(tmp_path):
    from pyroflows.density import ResumeMismatch

    torch.manual_seed(5)
    c = torch.randn(300, 2)
    x = conditional_truth(c).sample()
    options = {"epochs": 3, "seed": 0, "progress": False, "checkpoint_dir": tmp_path}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(context=2), x, context=c, callback=_interrupt_after_epoch(1), **options)
    for other in (c.flip(0), c + 1.0):  # the same sum in another order; other values
        with pytest.raises(ResumeMismatch, match="other contexts") as caught:
            fit(small_flow(context=2), x, context=other, resume=True, **options)
        assert set(caught.value.changed) == {"context"}
    fit(small_flow(context=2), x, context=c, resume=True, **options)  # the same: goes on


def test_a_memory_mapped_context_fits_as_the_same_context_in_memory(tmp_path):
    rng = np.random.default_rng(6)
    c = rng.normal(size=(300, 2))
    x = conditional_truth(torch.as_tensor(c, dtype=torch.float32)).sample().numpy()
    np.save(tmp_path / "c.npy", c)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    flows = []
    for context in (c, mapped):
        flows.append(small_flow(seed=1, context=2))
        fit(flows[-1], x, context=context, epochs=3, seed=0, progress=False)
    assert same_weights(*flows)


def test_a_conditional_fit_stopped_mid_epoch_resumes_to_the_same_result(tmp_path):
    # Ctrl-C inside an epoch, with data and contexts memory-mapped and the data dequantized
    rng = np.random.default_rng(7)
    c = rng.normal(size=(640, 2))
    x = np.round(3 * c + rng.normal(size=(640, 2)))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "c.npy", c)
    x, c = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("x", "c"))
    options = {"epochs": 3, "batch_size": 64, "seed": 2, "progress": False, "dequantize": True}
    whole = small_flow(seed=1, context=2)
    expected = fit(whole, x, context=c, **options)

    parted = small_flow(seed=1, context=2)
    hook = _sigint_at_call(parted, 14)  # inside the second epoch's fourth batch
    with pytest.raises(KeyboardInterrupt):
        fit(parted, x, context=c, checkpoint_dir=tmp_path / "ck", **options)
    hook.remove()
    state = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], 0 < state["batch"] < 9) == (1, True)
    resumed = small_flow(seed=4, context=2)
    history = fit(resumed, x, context=c, checkpoint_dir=tmp_path / "ck", resume=True, **options)
    assert same_weights(resumed, whole)
    assert (history.train_nll, history.val_nll) == (expected.train_nll, expected.val_nll)


def test_resume_refuses_other_validation_contexts(tmp_path):
    from pyroflows.density import ResumeMismatch

    torch.manual_seed(6)
    c, c_val = torch.randn(300, 2), torch.randn(60, 2)
    x, x_val = conditional_truth(c).sample(), conditional_truth(c_val).sample()
    options = {"epochs": 3, "seed": 0, "progress": False, "checkpoint_dir": tmp_path}
    with pytest.raises(KeyboardInterrupt):
        fit(small_flow(context=2), x, context=c, validation=(x_val, c_val),
            callback=_interrupt_after_epoch(1), **options)  # fmt: skip
    with pytest.raises(ResumeMismatch, match="other contexts") as caught:
        fit(small_flow(context=2), x, context=c, validation=(x_val, c_val.flip(0)), resume=True,
            **options)  # fmt: skip
    assert set(caught.value.changed) == {"context"}


def test_resume_names_a_conditional_checkpoint_for_an_unconditional_fit_and_the_reverse(tmp_path):
    from pyroflows.density import ResumeMismatch

    x, c = torch.randn(200, 2), torch.randn(200, 2)
    options = {"epochs": 2, "seed": 0, "progress": False, "resume": True}
    fit(small_flow(), x, checkpoint_dir=tmp_path / "plain", **{**options, "resume": False})
    fit(small_flow(context=2), x, context=c, checkpoint_dir=tmp_path / "cond",
        **{**options, "resume": False})  # fmt: skip
    with pytest.raises(ResumeMismatch, match="written for another flow"):
        fit(small_flow(context=2), x, context=c, checkpoint_dir=tmp_path / "plain", **options)
    with pytest.raises(ResumeMismatch, match="written for another flow"):
        fit(small_flow(), x, checkpoint_dir=tmp_path / "cond", **options)


def test_write_atomic_takes_a_name_near_the_systems_limit_and_reads_the_umask_in_place(
    tmp_path,
):
    from pyroflows.density.fit import _umask, write_atomic

    name = tmp_path / ("m" * 250)  # the temporary's name used to add 14 bytes past 255
    write_atomic(name, lambda stream: stream.write(b"kept"))
    assert name.read_bytes() == b"kept"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    before = os.umask(0o027)
    try:
        assert _umask() == 0o027
        write_atomic(tmp_path / "new", lambda stream: stream.write(b"x"))
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(before)
