"""Guides kept in Pyro's param store: save and load restore them, and they keep training."""

import copy

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList

from pyroflows import Flow, iaf
from pyroflows.infer import AmortizedGuide, AutoFlow, amortized_posterior
from pyroflows.nn import ContextTrunk
from pyroflows.transforms import Permutation
from tests.helpers import weights_and_biases


def model():
    a = pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("b", dist.Normal(a.sum(), 0.5), obs=torch.tensor(2.0))


def other_model():
    pyro.sample("a", dist.Normal(torch.zeros(4), 1.0).to_event(1))


def train(guide, steps, loss=None, the_model=model):
    svi = SVI(the_model, guide, pyro.optim.Adam({"lr": 0.05}), loss or Trace_ELBO())
    for _ in range(steps):
        svi.step()


def state(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def moved(before, module):
    now = module.state_dict()
    return max((now[key].float() - old.float()).abs().max().item() for key, old in before.items())


def restart(folder):
    """Save Pyro's param store, clear it, load it back: a new session's store."""
    path = folder / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)


@pytest.fixture(autouse=True)
def fresh_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize(
    ("flow", "options"), [("iaf", {}), ("realnvp", {"permutation": "random"}), ("nsf", {})]
)
def test_a_saved_store_restores_a_new_guide(tmp_path, flow, options):
    pyro.set_rng_seed(0)
    guide = AutoFlow(model, flow=flow, **options)
    train(guide, 30)
    saved = state(guide)
    restart(tmp_path)
    pyro.set_rng_seed(1)  # another random permutation, other initial weights
    restored = AutoFlow(model, flow=flow, **options)
    restored()
    assert restored.anchor == "param store"  # no warm start over the saved anchor
    assert_same_state(state(restored), saved)
    pyro.set_rng_seed(2)
    a = guide.get_posterior().sample((5,))
    pyro.set_rng_seed(2)
    b = restored.get_posterior().sample((5,))
    assert torch.allclose(a, b)


def test_a_guide_trains_after_a_load(tmp_path):
    guide = AutoFlow(model)
    train(guide, 5)
    restart(tmp_path)
    restored = AutoFlow(model)
    restored()
    before = state(restored)
    train(restored, 5)
    # pyro.module alone leaves a module computing with its own tensors while the optimizer
    # steps the store's: nothing moved
    assert moved(before, restored) > 1e-3
    store = dict(pyro.get_param_store().named_parameters())
    for key, tensor in restored.linear.state_dict(keep_vars=True).items():
        assert store[f"AutoFlow.linear$$${key}"] is tensor


def test_a_load_after_the_first_call_is_taken_at_the_next(tmp_path):
    guide = AutoFlow(model)
    train(guide, 20)
    saved = state(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")
    train(guide, 20)
    assert moved(saved, guide) > 1e-3
    pyro.get_param_store().load(tmp_path / "params.pt")
    guide()
    assert_same_state(state(guide), saved)
    # and the guide still owns the store's entries: it trains on
    train(guide, 3)
    assert moved(saved, guide) > 1e-4


def test_a_store_covering_part_of_a_called_guide_is_refused(tmp_path):
    guide = AutoFlow(model)
    guide()
    kept = state(guide)
    pyro.get_param_store()["AutoFlow.linear$$$bias"] = torch.tensor([0.5, -0.5, 1.0])
    with pytest.raises(ValueError, match=r"new values for 1 of this AutoFlow's 17 tensors"):
        guide()
    assert_same_state(state(guide), kept)  # nothing copied before the refusal
    # a two-layer guide's store loaded into a called three-layer guide
    pyro.clear_param_store()
    train(AutoFlow(model), 2)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    bigger = AutoFlow(model, transforms=3)
    bigger()
    pyro.get_param_store().load(tmp_path / "params.pt")
    with pytest.raises(ValueError, match=r"new values for 17 of this AutoFlow's 22 tensors"):
        bigger()


def test_a_store_of_a_bigger_guide_is_refused(tmp_path):
    train(AutoFlow(model, transforms=3), 2)
    restart(tmp_path)
    with pytest.raises(ValueError, match=r"5 entries under this AutoFlow's names that it does"):
        AutoFlow(model)()


def test_a_second_guide_of_the_same_name_starts_afresh_and_trains():
    first = AutoFlow(model)
    train(first, 20)
    kept = state(first)
    second = AutoFlow(model)  # a notebook cell run again, without clear_param_store()
    second()
    assert second.anchor in ("laplace", "init")
    before = state(second)
    train(second, 5)
    assert moved(before, second) > 1e-3
    assert_same_state(state(first), kept)


@pytest.mark.parametrize("clears", [1, 4])  # CPython hands a dict's id out again
def test_a_state_set_after_a_clear_restores_a_new_guide(clears):
    # get_state hands out the live guide's own tensors; after clear_param_store() and
    # set_state they are the user's restored values, not a guide run again to start afresh
    first = AutoFlow(model)
    train(first, 20)
    saved = state(first)
    snapshot = pyro.get_param_store().get_state()
    for _ in range(clears):
        pyro.clear_param_store()
    second = AutoFlow(model)
    second()  # built before the state comes back, as well as after
    pyro.get_param_store().set_state(snapshot)
    second()
    assert_same_state(state(second), saved)
    train(second, 5)
    assert moved(saved, second) > 1e-3
    assert_same_state(state(first), saved)  # each guide has its own tensors
    assert pyro.get_param_store()["AutoFlow.linear$$$bias"] is second.linear.bias


def test_a_guide_run_again_after_one_took_its_own_state_back_starts_afresh():
    first = AutoFlow(model)
    train(first, 20)
    snapshot = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(snapshot)
    train(first, 5)  # its own tensors, back in the store: its own from here on
    kept = state(first)
    second = AutoFlow(model)  # a notebook cell run again, without clear_param_store()
    second()
    assert second.anchor in ("laplace", "init")  # not "param store": not first's values
    assert_same_state(state(first), kept)


def test_a_deepcopy_snapshot_keeps_its_values_and_the_live_guide_trains_on():
    guide = AutoFlow(model)
    train(guide, 10)
    snapshot = copy.deepcopy(guide)
    kept = state(snapshot)
    train(guide, 10)
    snapshot()  # takes the store's entries over from the live guide, values unchanged
    assert_same_state(state(snapshot), kept)
    before = state(guide)
    train(guide, 5)
    assert moved(before, guide) > 1e-3
    assert_same_state(state(snapshot), kept)


def test_a_snapshot_leaves_the_store_and_the_optimizer_to_the_live_guide(tmp_path):
    guide = AutoFlow(model)
    optim = pyro.optim.Adam({"lr": 0.05})
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(10):
        svi.step()
    snapshot = copy.deepcopy(guide)  # "the best so far"
    for _ in range(10):
        svi.step()
    pyro.infer.Predictive(model, guide=snapshot, num_samples=5)()  # look at it
    pyro.get_param_store().save(tmp_path / "params.pt")
    saved = torch.load(tmp_path / "params.pt", weights_only=False)["params"]
    assert torch.equal(saved["AutoFlow.linear$$$bias"], guide.linear.bias.detach())
    names = list(optim.get_state())
    assert None not in names
    assert "AutoFlow.linear$$$bias" in names


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_snapshot_does_not_stop_a_jit_trained_guide():
    guide = AutoFlow(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), JitTrace_ELBO())
    for _ in range(5):
        svi.step()
    snapshot = copy.deepcopy(guide)
    kept = state(snapshot)
    pyro.infer.Predictive(model, guide=snapshot, num_samples=5)()
    before = state(guide)
    for _ in range(5):  # the compiled loss takes its parameters from the store, by name
        svi.step()
    assert moved(before, guide) > 1e-3
    assert_same_state(state(snapshot), kept)


def test_median_of_a_restored_guide_before_its_first_call(tmp_path):
    guide = AutoFlow(model)
    train(guide, 20)
    restart(tmp_path)
    restored = AutoFlow(model)
    median = restored.median()  # sets the guide up without calling it
    assert restored.anchor == "param store"
    assert_same_state(state(restored), state(guide))
    assert median["a"].shape == (3,)


def test_module_local_params_leave_the_store_alone():
    pyro.settings.set(module_local_params=True)
    try:
        guide = AutoFlow(model)
        guide()
        optimizer = torch.optim.Adam(guide.parameters(), lr=0.05)
        before = state(guide)
        for _ in range(5):
            optimizer.zero_grad()
            Trace_ELBO().differentiable_loss(model, guide).backward()
            optimizer.step()
    finally:
        pyro.settings.set(module_local_params=False)
    assert moved(before, guide) > 1e-3
    assert not list(pyro.get_param_store().keys())


def test_a_flow_using_one_layer_twice(tmp_path):
    def tied(dim):
        layers = iaf(dim, transforms=2, permutation=None).transforms
        swap = Permutation(dim)
        return Flow(dim, [layers[0], swap, layers[1], swap])

    guide = AutoFlow(model, flow=tied)
    train(guide, 3)
    restart(tmp_path)
    restored = AutoFlow(model, flow=tied)
    restored()
    assert_same_state(state(restored), state(guide))


def test_a_store_of_another_flow_is_refused(tmp_path):
    train(AutoFlow(model, flow="iaf"), 2)
    restart(tmp_path)
    refused = r"new values for 17 of this AutoFlow's 22 tensors.*clear_param_store"
    guide = AutoFlow(model, flow="iaf", transforms=3)  # a third layer the store lacks
    for _ in range(2):  # and again: a refused guide is not left half set up
        with pytest.raises(ValueError, match=refused):
            guide()
    pyro.clear_param_store()
    guide()
    assert guide.anchor in ("laplace", "init")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    with pytest.raises(ValueError, match=r"shapes differ for 'AutoFlow\.flow.*clear_param_store"):
        AutoFlow(model, flow="nsf")()


def test_a_store_of_another_model_is_refused(tmp_path):
    train(AutoFlow(other_model), 2, the_model=other_model)
    restart(tmp_path)
    with pytest.raises(ValueError, match=r"saved for another model .*a \(3,\).*clear_param_store"):
        AutoFlow(model)()


def same_shapes_model():  # model's shapes, other sites: a store of it fits shape for shape
    c = pyro.sample("c", dist.HalfNormal(torch.ones(3)).to_event(1))
    pyro.sample("b", dist.Normal(c.sum(), 0.5), obs=torch.tensor(2.0))


def test_a_store_of_another_model_with_the_same_shapes_is_refused_by_its_sites(tmp_path):
    # it was taken (anchor "param store"): the other model's fitted flow, as this one's
    train(AutoFlow(same_shapes_model), 2, the_model=same_shapes_model)
    restart(tmp_path)
    sites = r"saved for another model \(its latent sites differ from this model's: a \(3,\)\)"
    with pytest.raises(ValueError, match=sites):
        AutoFlow(model)()
    restored = AutoFlow(same_shapes_model)  # its own model takes it
    restored()
    assert restored.anchor == "param store"


def test_the_latent_sites_fingerprint_reads_bounds_by_value_not_by_their_printout(tmp_path):
    # str() of a support with tensor bounds is their printout: print options, device
    # and dtype changed the fingerprint, and a store of the same model was refused
    def bounded():
        pyro.sample("s", dist.Uniform(torch.tensor([0.05, 0.05]), 2.0).to_event(1))

    train(AutoFlow(bounded), 2, the_model=bounded)
    restart(tmp_path)
    try:
        torch.set_printoptions(precision=2)
        guide = AutoFlow(bounded)
        guide()
    finally:
        torch.set_printoptions(profile="default")
    assert guide.anchor == "param store"
    pyro.clear_param_store()

    def bounded64():
        low = torch.tensor([0.05, 0.05], dtype=torch.float64)
        pyro.sample("s", dist.Uniform(low, 2.0).to_event(1))

    first = AutoFlow(bounded)
    first()
    pyro.clear_param_store()
    second = AutoFlow(bounded64)  # the same bounds in another dtype
    second()
    assert torch.equal(first.linear.latent_sites, second.linear.latent_sites)


def test_the_latent_sites_fingerprint_tells_supports_apart():
    from torch.distributions import constraints

    from pyroflows.infer.autoflow import _support_text

    pairs = [  # each pair differs only where str() or a 6-digit rounding did not see it
        (constraints.cat([constraints.real, constraints.positive]),
         constraints.cat([constraints.positive, constraints.real])),
        (constraints.greater_than(np.float32(2)), constraints.greater_than(np.float32(-7))),
        (dist.Uniform(0.0, 1000001.0).support, dist.Uniform(0.0, 1000000.0).support),
    ]  # fmt: skip
    for a, b in pairs:
        assert _support_text(a) != _support_text(b)
    same = [  # and equal bounds read the same in any form
        (constraints.greater_than(1000001), constraints.greater_than(1000001.0)),
        (constraints.greater_than(torch.tensor(0.1000035)),
         constraints.greater_than(torch.tensor(0.1000035, dtype=torch.float64))),
    ]  # fmt: skip
    for a, b in same:
        assert _support_text(a) == _support_text(b)


def test_a_store_and_a_state_saved_before_the_latent_sites_were_kept_still_restore(tmp_path):
    pyro.set_rng_seed(0)
    guide = AutoFlow(model)
    train(guide, 5)
    saved = {k: v for k, v in state(guide).items() if "latent_sites" not in k}
    restart(tmp_path)
    del pyro.get_param_store()["AutoFlow.linear$$$latent_sites"]  # as stores were saved
    restored = AutoFlow(model)
    restored()
    assert restored.anchor == "param store"
    assert_same_state({k: v for k, v in state(restored).items() if k in saved}, saved)
    pyro.clear_param_store()
    fresh = AutoFlow(model)
    fresh()
    fresh.load_state_dict(saved)  # a guide's state_dict of before: no key missing
    assert_same_state({k: v for k, v in state(fresh).items() if k in saved}, saved)


def test_a_guide_with_store_entries_read_still_pickles(tmp_path):
    guide = AutoFlow(model)
    train(guide, 3)
    dict(pyro.get_param_store().items())  # Pyro hangs weak references on what it reads
    torch.save(guide, tmp_path / "guide.pt")
    loaded = torch.load(tmp_path / "guide.pt", weights_only=False)
    assert_same_state(state(loaded), state(guide))


def test_a_guide_moved_to_float64_keeps_training():
    guide = AutoFlow(model)
    train(guide, 3)
    anchor = guide.anchor_loc.clone()
    guide.double()  # the anchor buffers are new tensors now
    torch.set_default_dtype(torch.float64)
    try:
        before = state(guide)
        train(guide, 3)
    finally:
        torch.set_default_dtype(torch.float32)
    assert guide.anchor_loc.dtype == torch.float64
    assert torch.equal(guide.anchor_loc, anchor.double())
    assert moved(before, guide) > 1e-4
    store = dict(pyro.get_param_store().named_parameters())
    assert store["AutoFlow.linear$$$anchor_loc"] is guide.anchor_loc


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_elbo_trains_the_guide():
    guide = AutoFlow(model)
    guide()
    before = state(guide)
    train(guide, 5, loss=JitTrace_ELBO())
    assert moved(before, guide) > 1e-3


def amortized_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(-1, 3), 1.0).to_event(1), obs=x)


def test_an_amortized_guide_restored_from_the_store_and_trained(tmp_path):
    x = torch.randn(16, 3)
    pyro.set_rng_seed(0)
    guide = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow="iaf", hidden=(8,)))
    svi = SVI(amortized_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(10):
        svi.step(x)
    saved = state(guide)
    restart(tmp_path)
    pyro.set_rng_seed(1)
    restored = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow="iaf", hidden=(8,)))
    restored(x)
    assert_same_state(state(restored), saved)
    svi = SVI(amortized_model, restored, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    assert moved(saved, restored) > 1e-3
    # a second guide of the same name, store not cleared, trains too
    again = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow="iaf", hidden=(8,)))
    before = state(again)
    svi = SVI(amortized_model, again, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    assert moved(before, again) > 1e-3


def test_two_amortized_guides_of_one_name_in_one_run_are_refused():
    x = torch.randn(16, 3)
    first = AmortizedGuide(amortized_posterior(3, latent_dim=2, hidden=(8,)), site="z")
    second = AmortizedGuide(amortized_posterior(3, latent_dim=2, hidden=(8,)), site="w")

    def guide(x):
        with pyro.plate("data", len(x)):
            first(x)
            second(x)

    with pytest.raises(ValueError, match=r"registered under the name 'guide\$\$\$.*own name"):
        pyro.poutine.trace(guide).get_trace(x)


def test_copies_train_while_the_guide_they_were_copied_from_lives():
    guide = AutoFlow(model)
    train(guide, 5)
    store_before = dict(pyro.get_param_store().named_parameters())
    kept = state(guide)
    first, second = copy.deepcopy(guide), copy.deepcopy(guide)
    for snapshot, loss in ((first, Trace_ELBO()), (second, Trace_ELBO(num_particles=2))):
        before = state(snapshot)
        train(snapshot, 10, loss=loss)
        assert moved(before, snapshot) > 1e-3
    # the store still holds the live guide's tensors, which the copies did not move
    store_after = dict(pyro.get_param_store().named_parameters())
    assert all(store_after[name] is tensor for name, tensor in store_before.items())
    assert_same_state(state(guide), kept)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_copy_under_jit_while_its_original_lives_is_refused():
    guide = AutoFlow(model)
    train(guide, 2)
    snapshot = copy.deepcopy(guide)
    with pytest.raises(ValueError, match="replays Pyro's param store by name"):
        train(snapshot, 2, loss=JitTrace_ELBO())


def test_a_load_goes_to_the_live_guide_even_when_a_snapshot_runs_first(tmp_path):
    guide = AutoFlow(model)
    train(guide, 10)
    checkpoint = state(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")
    train(guide, 10)
    snapshot = copy.deepcopy(guide)
    kept = state(snapshot)
    pyro.get_param_store().load(tmp_path / "params.pt")
    pyro.infer.Predictive(model, guide=snapshot, num_samples=3)()
    assert_same_state(state(snapshot), kept)
    guide()
    assert_same_state(state(guide), checkpoint)


def test_a_guide_renamed_after_its_first_call_moves_its_entries(tmp_path):
    guide = AutoFlow(model)
    guide()  # named "AutoFlow" here
    guides = AutoGuideList(model)
    guides.append(guide)  # now "AutoGuideList.0"
    train(guides, 5)
    names = list(pyro.get_param_store().keys())
    assert names
    assert all(name.startswith("AutoGuideList.0.") for name in names)
    saved = state(guide)
    restart(tmp_path)
    again = AutoGuideList(model)
    again.append(AutoFlow(model))
    again()
    assert_same_state(state(again[0]), saved)


@pytest.mark.parametrize("before", ["iaf", "nsf"])
def test_a_guide_of_the_same_name_and_another_architecture_leaves_a_store_that_loads(
    tmp_path, before
):
    # (a network's flat_layout, its layers' sizes, is a state-dict entry, not a tensor
    # of the module: not in the store)
    # a flow posterior, then a diagonal one under the same default name, store not
    # cleared: the flow's entries went into the saved store, which the diagonal guide
    # then refused to load ("holds 28 entries under its names that it does not have")
    x = torch.randn(16, 3)
    flow = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow=before, hidden=(8,)))
    svi = SVI(amortized_model, flow, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step(x)
    diagonal = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow=None, hidden=(8,)))
    svi = SVI(amortized_model, diagonal, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    expected = {f"guide$$${key}" for key in diagonal.posterior.state_dict()}
    assert set(pyro.get_param_store().keys()) == expected
    saved = state(diagonal)
    restart(tmp_path)
    restored = AmortizedGuide(amortized_posterior(3, latent_dim=2, flow=None, hidden=(8,)))
    restored(x)
    assert_same_state(state(restored), saved)
    # the flow guide, run again, takes its names back (and trains)
    before_state = state(flow)
    svi = SVI(amortized_model, flow, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step(x)
    assert moved(before_state, flow) > 0
    tensors = [key for key in flow.posterior.state_dict() if not key.endswith(".flat_layout")]
    assert {f"guide$$${key}" for key in tensors} <= set(pyro.get_param_store().keys())


def _three_latents():
    """Three latents whose sum is observed: a small model for the packing tests."""
    a = pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("b", dist.Normal(a.sum(), 0.5), obs=torch.tensor(2.0))


@pytest.mark.parametrize("clear", [False, True])
def test_a_guide_trains_on_after_its_networks_are_unpacked_and_packed_again(clear):
    # the layout of a network's tensors changes (one flat parameter, or a weight and a
    # bias per layer): the guide lists its tensors anew, and the optimizer steps the new
    guide = AutoFlow(_three_latents, flow="iaf", transforms=2)
    for change in ("unpack", "pack"):
        SVI(_three_latents, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()).step()
        trunks = [m for m in guide.modules() if isinstance(m, ContextTrunk)]
        assert len(trunks) == 2
        for trunk in trunks:
            getattr(trunk, change)()
        if clear:
            pyro.clear_param_store()
        svi = SVI(_three_latents, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        before = [p.detach().clone() for p in guide.parameters()]
        svi.step()
        assert not all(torch.equal(a, b) for a, b in zip(before, guide.parameters(), strict=True))
        names = set(pyro.get_param_store().keys())
        assert all(pyro.get_param_store()[n] is p for n, p in _store_names(guide, names))


def _store_names(guide, names):
    """The guide's parameters with their store names (``AutoFlow.flow$$$...``)."""
    for key, p in guide.flow.named_parameters():
        name = f"AutoFlow.flow$$${key}"
        assert name in names, name
        yield name, p


@pytest.mark.parametrize("called_first", [False, True])
def test_a_store_saved_with_a_weight_per_layer_loads_into_a_packed_guide(called_first):
    # what an earlier pyroflows saved: its networks held a weight and a bias per layer
    old = AutoFlow(_three_latents, flow="iaf", transforms=2)
    old()
    for m in old.modules():
        if isinstance(m, ContextTrunk):
            m.unpack()
    svi = SVI(_three_latents, old, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step()
    saved = pyro.get_param_store().get_state()
    assert any(name.endswith("output_layer.weight") for name in saved["params"])
    pyro.clear_param_store()
    new = AutoFlow(_three_latents, flow="iaf", transforms=2)
    if called_first:  # its own flat entries are in the store, beside the loaded ones
        new()
    pyro.get_param_store().set_state(saved)
    new()  # takes the store's values, joined into each network's flat
    for a, b in zip(weights_and_biases(new), old.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = set(pyro.get_param_store().keys())
    assert not any(name.endswith("output_layer.weight") for name in names)
    assert sum(name.endswith(".flat") for name in names) == 2


def test_a_store_saved_packed_loads_into_a_guide_built_unpacked(monkeypatch):
    # a store saved while networks of this size were packed (before PACK_LIMIT), loaded
    # into the same guide built unpacked: each network's flat split into its layers
    from pyroflows.nn import packed

    monkeypatch.setattr(packed, "PACK_LIMIT", 10**12)
    old = AutoFlow(_three_latents, flow="iaf", transforms=2)
    svi = SVI(_three_latents, old, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step()
    saved = pyro.get_param_store().get_state()
    assert sum(name.endswith(".flat") for name in saved["params"]) == 2
    pyro.clear_param_store()
    monkeypatch.setattr(packed, "PACK_LIMIT", 0)
    new = AutoFlow(_three_latents, flow="iaf", transforms=2)
    new()  # its own per-layer entries are in the store, beside the loaded flat ones
    assert not any("flat" in m._parameters for m in new.modules() if isinstance(m, ContextTrunk))
    pyro.get_param_store().set_state(saved)
    new()  # takes the store's values, split into each network's layers
    for a, b in zip(new.parameters(), weights_and_biases(old), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = set(pyro.get_param_store().keys())
    assert not any(name.endswith(".flat") for name in names)
    assert sum(name.endswith("output_layer.weight") for name in names) == 2
