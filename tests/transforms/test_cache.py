"""The layer cache serves only the pairs it may (base.py, ``_CachedBijection``), and only
while nothing it depends on changed."""

import copy

import pytest
import torch

from pyroflows import iaf, maf, realnvp
from pyroflows.transforms import AffineAutoregressive, Permutation
from tests.helpers import perturb


def fresh_scores(flow, batches):
    return [flow().log_prob(b.clone()) for b in batches]


def test_a_reused_buffer_refilled_in_place_is_scored_afresh():
    torch.manual_seed(0)
    flow = maf(3, transforms=2, hidden=(8,))
    batches = [torch.randn(10, 3) for _ in range(4)]
    buffer = torch.empty(10, 3)
    with torch.no_grad():
        d = flow()
        scores = []
        for b in batches:
            buffer.copy_(b)
            scores.append(d.log_prob(buffer).clone())
        expected = fresh_scores(flow, batches)
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_data_scored_twice_gets_a_graph_each_time():
    torch.manual_seed(0)
    flow = realnvp(2, transforms=2, hidden=(8,))
    x = torch.randn(16, 2)
    for _ in range(2):  # no optimizer step between: the second call still has a graph
        (-flow().log_prob(x).mean()).backward()
    x.requires_grad_()  # and a score function of the same tensor reaches it
    (grad,) = torch.autograd.grad(flow().log_prob(x).sum(), x)
    assert torch.isfinite(grad).all()


def test_full_batch_training_with_a_fused_optimizer():
    # fused Adam updates the weights without bumping their version counters
    torch.manual_seed(0)
    flow = maf(2, transforms=2, hidden=(8,))
    x = torch.randn(64, 2) * 2.0 + 1.0
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2, fused=True)
    losses = []
    for _ in range(20):
        loss = -flow().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_own_output_changed_in_place_is_not_served():
    torch.manual_seed(0)
    t = AffineAutoregressive(3, form="iaf", hidden=(8,))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
        u = torch.randn(5, 3)
        x = t(u)
        assert t.inv(x) is u
        x.add_(1.0)
        torch.testing.assert_close(t.inv(x), copy.deepcopy(t).inv(x.clone()))


def test_load_state_dict_with_assign_and_buffers_invalidate():
    torch.manual_seed(0)
    flow = realnvp(2, transforms=2, hidden=(8,))
    x = torch.randn(8, 2)
    flow().log_prob(x)
    other = realnvp(2, transforms=2, hidden=(8,))
    flow.load_state_dict(other.state_dict(), assign=True)  # new tensor objects go in
    torch.testing.assert_close(flow().log_prob(x), other().log_prob(x.clone()))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(3):  # trains after the new objects went in
        loss = -flow().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    a = Permutation(4, "reverse")
    u = torch.arange(4.0)
    y = a(u)
    a.load_state_dict(Permutation(4, [1, 2, 3, 0]).state_dict())  # a buffer, no parameter
    torch.testing.assert_close(a.inv(y), Permutation(4, [1, 2, 3, 0]).inv(y.clone()))
    torch.testing.assert_close(a(u), torch.tensor([1.0, 2.0, 3.0, 0.0]))


def test_a_dtype_change_drops_the_cached_pair():
    torch.manual_seed(0)
    t = AffineAutoregressive(3, form="iaf", hidden=(8,))
    u = torch.randn(5, 3)
    x = t(u)
    t.double()
    with pytest.raises(TypeError, match="dtype"):
        t.inv(x)  # float32 data for a float64 layer: refused, not the old float32 pair


def test_inference_mode_works_without_caching():
    torch.manual_seed(0)
    flow = maf(3, transforms=2, hidden=(8,))
    x = torch.randn(5, 3)
    expected = flow().log_prob(x.clone()).detach()
    with torch.inference_mode():
        torch.testing.assert_close(flow().log_prob(x), expected)
        made = torch.randn(5, 3)  # an inference tensor
        z = iaf_sample_and_score(3)
    with torch.no_grad():
        torch.testing.assert_close(flow().log_prob(made), flow().log_prob(made.clone()))
    assert z.shape == (4,)


def iaf_sample_and_score(dim):
    from pyroflows import iaf

    d = iaf(dim, transforms=2, hidden=(8,))()
    return d.log_prob(d.sample((4,)))


def test_a_context_refilled_in_place_is_not_served_from_the_cache():
    from pyroflows import iaf

    torch.manual_seed(0)
    flow = iaf(2, transforms=2, hidden=(8,), context=3)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
        context = torch.randn(4, 3)
        d = flow(context)
        z = d.sample()
        context.copy_(torch.randn(4, 3))
        torch.testing.assert_close(d.log_prob(z), flow(context.clone()).log_prob(z.clone()))
    with torch.inference_mode():  # an inference context: no cache, still right
        c = torch.randn(4, 3)
        d = flow(c)
        z = d.sample()
        torch.testing.assert_close(d.log_prob(z), flow(c.clone()).log_prob(z.clone()))


def test_a_module_kept_from_before_the_load_hook_is_still_watched():
    # an object unpickled from an older version holds its parameter list and no hook
    torch.manual_seed(0)
    flow = maf(2, transforms=1, hidden=(8,))
    flow().log_prob(torch.randn(3, 2))
    (layer,) = flow.transforms
    layer._load_state_dict_post_hooks.clear()
    del layer.__dict__["_watching_loads"]
    layer.__dict__.pop("_tensor_slots", None)
    flow.load_state_dict(maf(2, transforms=1, hidden=(8,)).state_dict(), assign=True)
    flow().log_prob(torch.randn(3, 2))  # first use after: the hook comes back
    other = maf(2, transforms=1, hidden=(8,))
    flow.load_state_dict(other.state_dict(), assign=True)
    x = torch.randn(6, 2)
    torch.testing.assert_close(flow().log_prob(x), other().log_prob(x.clone()))
    assert not {"_tensor_slots", "_parameter_list", "_tensor_list"} & set(pickle_state(layer))


def pickle_state(module):
    return module.__getstate__()


def test_a_conditioned_layer_made_before_double_drops_its_pair():
    from pyroflows.transforms import ConditionalAffineAutoregressive

    torch.manual_seed(0)
    layer = ConditionalAffineAutoregressive(2, 3, form="iaf", hidden=(8,))
    context = torch.randn(4, 3)
    t = layer.condition(context)
    x = t(torch.randn(4, 2))
    assert t.inv(x) is not None  # a hit before
    layer.double()
    with pytest.raises(TypeError, match="dtype"):
        t.inv(x)  # float32 data for the now float64 layer: checked, not the old pair


def _count_conditioner_calls(layers) -> list[int]:
    calls = [0]
    for layer in layers:
        if hasattr(layer, "conditioner"):
            layer.conditioner.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("form", ["iaf", "maf"])
def test_own_draws_are_scored_free_inside_a_compose_transform(form):
    import pyro.distributions as dist
    import pyro.distributions.transforms as T

    torch.manual_seed(0)
    layers = [AffineAutoregressive(4, form, hidden=(8,)), Permutation(4, "reverse")]
    layers.append(AffineAutoregressive(4, form, hidden=(8,)))
    compose = T.ComposeTransformModule(layers)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), [compose])
    calls = _count_conditioner_calls(layers)
    x = d.rsample((5,))
    sampled = calls[0]
    score = d.log_prob(x)  # torch's ComposeTransform re-applies each part: cache hits
    assert calls[0] == sampled  # no network pass (an IAF samples in 2, a MAF in 2 * 4)
    assert sampled == (2 if form == "iaf" else 8)
    fresh = dist.TransformedDistribution(d.base_dist, layers).log_prob(x.detach().clone())
    torch.testing.assert_close(score, fresh)


def test_with_cache_gives_the_layer_for_pyro_helpers():
    import pyro.distributions.transforms as T
    from pyro.infer.reparam import UnitJacobianReparam

    from pyroflows.transforms import AdditiveCoupling, ConditionalAffineCoupling

    layer = AdditiveCoupling(3)
    assert layer.with_cache() is layer
    assert layer.inv.with_cache(1).inv is layer
    T.ComposeTransformModule([layer, Permutation(3, "reverse")], cache_size=1)
    UnitJacobianReparam(Permutation(3, "reverse"))
    conditioned = ConditionalAffineCoupling(3, 2).condition(torch.randn(2))
    assert conditioned.with_cache() is conditioned


def _trained_step(layer, d):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = d.rsample((3,))
    (-d.log_prob(x).sum()).backward()
    optimizer.step()
    return x


def test_parameters_swapped_in_by_pyro_module_are_watched(tmp_path):
    import pyro
    import pyro.distributions as dist

    from pyroflows.transforms import LULinear

    pyro.clear_param_store()
    torch.manual_seed(0)
    layer = LULinear(3)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
    pyro.module("f", layer, update_module_params=True)
    d.log_prob(torch.randn(2, 3))
    store = pyro.get_param_store()
    store.save(tmp_path / "store.pt")
    store.load(tmp_path / "store.pt")
    pyro.module("f", layer, update_module_params=True)  # new Parameter objects
    x = _trained_step(layer, d)
    torch.testing.assert_close(d.log_prob(x), d.log_prob(x.clone()))
    pyro.clear_param_store()


def test_a_first_call_inside_functional_call_does_not_leave_a_stale_watch():
    import pyro.distributions as dist
    from torch.func import functional_call

    torch.manual_seed(0)
    layer = AffineAutoregressive(3, hidden=(8,))
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    functional_call(layer, params, (torch.randn(2, 3),))
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
    for _ in range(2):
        x = _trained_step(layer, d)
        torch.testing.assert_close(d.log_prob(x), d.log_prob(x.clone()))
    # and a pair the real parameters made is not served for swapped-in ones
    u = torch.randn(4, 3)
    x = layer(u)
    other = {k: v + 0.3 for k, v in params.items()}
    swapped = functional_call(layer, other, (u,))
    assert not torch.allclose(swapped, x)
    torch.testing.assert_close(swapped, functional_call(layer, other, (u.clone(),)))


def _push(flow, u):
    x, ladj = u, 0.0
    for t in flow().transforms:
        y = t(x)
        ladj = ladj + t.log_abs_det_jacobian(x, y)
        x = y
    return x, ladj


def test_a_fixed_base_draw_pushed_through_each_step_is_computed_afresh():
    import pyro.optim.clipped_adam

    torch.manual_seed(0)
    flow = iaf(2, transforms=2, hidden=(16,))
    u = torch.randn(64, 2)
    # ClippedAdam writes through .data: the weights change, their version counters do not
    optimizer = pyro.optim.clipped_adam.ClippedAdam(flow.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        x, ladj = _push(flow, u)
        loss = ((x - 3.0) ** 2).sum(-1).mean() - ladj.mean()
        optimizer.zero_grad()
        loss.backward()  # a served output would carry the freed graph of the last step
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        torch.testing.assert_close(_push(flow, u)[0], _push(flow, u.clone())[0])


def test_gradients_accumulated_over_two_passes_of_one_draw():
    torch.manual_seed(0)
    flow = iaf(2, transforms=2, hidden=(16,))
    u = torch.randn(8, 2)
    for _ in range(2):  # no step between: each pass needs its own graph
        _push(flow, u)[0].pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())


def test_pruning_a_used_layer_relists_its_tensors():
    from torch.nn.utils import prune

    from tests.helpers import perturb

    torch.manual_seed(0)
    flow = perturb(iaf(3, transforms=1, hidden=(8,)))
    d = flow()
    d.log_prob(d.rsample((2,)))  # the layer lists where its tensors are
    (layer,) = flow.transforms
    layer.conditioner.unpack()  # the layers' own parameters ('flat' leaves: listed anew)
    torch.testing.assert_close(d.log_prob(z := d.rsample((3,))), d.log_prob(z.clone()))
    first = layer.conditioner.hidden_layers[0]
    prune.l1_unstructured(first, "weight", amount=0.3)  # moves 'weight' to 'weight_orig'
    z = d.rsample((5,))  # no KeyError: listed anew
    with torch.no_grad():
        first.weight_orig.mul_(2.0)  # and the new slot is watched
    torch.testing.assert_close(d.log_prob(z), d.log_prob(z.clone()))


def test_a_fixed_base_draw_pushed_again_after_its_output_was_scored_is_computed_afresh():
    torch.manual_seed(0)
    flow = realnvp(2, transforms=2, hidden=(8,))
    u = torch.randn(64, 2)

    def push(d):
        x = u
        for t in d.transforms:
            x = t(x)
        return x

    d = flow()
    x = push(d)
    (-d.log_prob(x).mean()).backward()  # scores the pushed x: t.inv served from the cache
    again = push(d)
    assert again is not x
    (again**2).mean().backward()  # a graph of its own, not the freed one


@pytest.mark.parametrize("layer", ["coupling", "iaf", "spline", "conditioned"])
def test_a_fixed_base_draw_pushed_again_after_a_round_trip_check_is_computed_afresh(layer):
    # t.inv(t(u)) between passes (a round-trip check) left the layer claimed: the next
    # t(u) was served the output whose graph the backward had freed
    from pyroflows.transforms import (
        AffineCoupling,
        ConditionalAffineCoupling,
        SplineCoupling,
    )

    torch.manual_seed(0)
    t = {
        "coupling": lambda: AffineCoupling(4, hidden=(8,)),
        "iaf": lambda: AffineAutoregressive(4, "iaf", hidden=(8,)),
        "spline": lambda: SplineCoupling(4, hidden=(8,)),
        "conditioned": lambda: ConditionalAffineCoupling(4, 2, hidden=(8,)).condition(
            torch.randn(10, 2)
        ),
    }[layer]()
    u = torch.randn(10, 4)
    for _ in range(2):
        x = t(u)
        t.inv(x)
        x.pow(2).sum().backward()
        t.inv(x)  # a check after the backward claims nothing either
    again = t(u)
    assert again is not x
    again.pow(2).sum().backward()
    x = t(u)
    x.pow(2).sum().backward()
    t.inv(x)  # the check after the backward alone
    again = t(u)
    assert again is not x
    again.pow(2).sum().backward()


def test_a_sample_saved_with_torch_save_carries_no_hook_warning(tmp_path):
    # the cache's watch on a draw's graph is a tensor hook: saved without a word
    import warnings

    torch.manual_seed(0)
    d = realnvp(2, transforms=2, hidden=(8,))()
    x = d.rsample((3,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.save(x, tmp_path / "x.pt")


def test_a_log_det_edited_in_place_is_not_served_again():
    torch.manual_seed(0)
    t = AffineAutoregressive(4, hidden=(8,))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(3, 4)
    x = t(u)
    ladj = t.log_abs_det_jacobian(u, x)
    expected = ladj.detach().clone()
    ladj.neg_()
    torch.testing.assert_close(t.log_abs_det_jacobian(u, x).detach(), expected)


@pytest.mark.parametrize("builder", [iaf, maf, realnvp])
def test_freezing_or_unfreezing_between_draw_and_score_is_not_served_from_the_cache(builder):
    # requires_grad_() moves no version counter: a log-det cached with frozen weights has
    # no graph to them, and one cached with live weights a graph it should not have
    torch.manual_seed(0)
    flow = builder(3, transforms=2, hidden=(8,))
    weight = next(flow.parameters())
    flow.requires_grad_(False)
    d = flow()
    x = d.rsample((4,))
    flow.requires_grad_(True)
    logp = d.log_prob(x)
    assert logp.requires_grad
    (grad,) = torch.autograd.grad(logp.sum(), [weight])
    (fresh,) = torch.autograd.grad(flow().log_prob(x.clone()).sum(), [weight])
    torch.testing.assert_close(grad, fresh)

    layer = flow.transforms[0]
    u = torch.randn(4, 3, requires_grad=True)
    x = layer(u)  # live weights
    flow.requires_grad_(False)
    layer.log_abs_det_jacobian(u, x).sum().backward()
    assert all(p.grad is None for p in flow.parameters())  # frozen: none reaches them


def test_a_conditioned_coupling_made_before_double_drops_its_pair():
    # a coupling's watched tensors can all be the same objects after .double() (the
    # conditioner's, replaced in place): the layer's generation must still differ
    from pyroflows.transforms import ConditionalAffineCoupling

    torch.manual_seed(0)
    layer = ConditionalAffineCoupling(4, 2, hidden=(8,))
    t = layer.condition(torch.randn(3, 2))
    u = torch.randn(3, 4)
    x = t(u)
    layer.double()
    with pytest.raises(TypeError, match="dtype"):
        t.inv(x)  # float32 data for the now float64 layer: checked, not the old pair


@pytest.mark.parametrize("side", ["u", "x"])
def test_an_input_made_to_require_grad_after_the_call_is_not_served_a_graphless_pair(side):
    from pyroflows.transforms import AffineCoupling
    from tests.helpers import perturb

    torch.manual_seed(0)
    t = perturb(AffineCoupling(4, hidden=(8,))).requires_grad_(False)
    if side == "x":
        u = torch.randn(3, 4)
        x = t(u)
        x.requires_grad_()
        back = t.inv(x)  # must depend on x
        (grad,) = torch.autograd.grad(back.sum(), [x])
        again = x.detach().clone().requires_grad_()
        (fresh,) = torch.autograd.grad(t.inv(again).sum(), [again])
    else:
        x = torch.randn(3, 4)
        u = t.inv(x)
        u.requires_grad_()
        out = t(u)
        (grad,) = torch.autograd.grad(out.sum(), [u])
        again = u.detach().clone().requires_grad_()
        (fresh,) = torch.autograd.grad(t(again).sum(), [again])
    torch.testing.assert_close(grad, fresh)


@pytest.mark.parametrize("builder", [iaf, maf, realnvp])
def test_parameters_given_new_data_are_not_served_from_the_cache(builder):
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.manual_seed(0)
    flow = builder(3, transforms=2, hidden=(8,))
    d = flow()
    x = d.rsample((4,))
    # vector_to_parameters sets p.data: new storage, no version counter moved
    vector_to_parameters(parameters_to_vector(flow.parameters()).detach() + 0.3, flow.parameters())
    torch.testing.assert_close(d.log_prob(x), flow().log_prob(x.detach().clone()))
    x = d.rsample((4,))
    for p in flow.parameters():
        p.data = p.data - 0.2
    torch.testing.assert_close(d.log_prob(x), flow().log_prob(x.detach().clone()))


def test_a_context_given_new_data_is_not_served_from_the_cache():
    from pyroflows.transforms import ConditionalAffineAutoregressive

    torch.manual_seed(0)
    t = ConditionalAffineAutoregressive(3, 2, "iaf", hidden=(8,))
    context = torch.randn(4, 2)
    conditioned = t.condition(context)
    u = torch.randn(4, 3)
    x = conditioned(u)
    context.data = context.data + 1.0
    torch.testing.assert_close(conditioned.inv(x), t.condition(context.clone()).inv(x.clone()))


def test_a_conditioned_layers_cached_inverse_has_the_shape_of_a_fresh_one():
    from pyroflows.transforms import ConditionalAffineAutoregressive

    torch.manual_seed(0)
    t = ConditionalAffineAutoregressive(3, 2, "iaf", hidden=(8, 8))
    conditioned = t.condition(torch.randn(4, 2))
    u = torch.randn(3)  # broadcast against the context's batch (4,)
    x = conditioned(u)
    assert x.shape == (4, 3)
    cached = conditioned.inv(x)
    # the pair still scores for free: the log-det of the expanded pair is served
    assert conditioned.log_abs_det_jacobian(cached, x) is conditioned._cache[2]
    fresh = conditioned.inv(x.clone())
    assert cached.shape == fresh.shape == (4, 3)
    torch.testing.assert_close(cached, fresh)
    torch.testing.assert_close(cached, u.expand(4, 3))


def test_the_order_list_is_not_taken_from_a_freed_tensor():
    torch.manual_seed(0)
    t = AffineAutoregressive(4, form="maf", hidden=(8,))
    assert t._order_list() == [0, 1, 2, 3]
    # a new order tensor (even one that reuses a freed tensor's address) is read anew
    for order in ([3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]):
        t.conditioner.order = torch.tensor(order)
        assert t._order_list() == order


def _pyro_clipped_adam(params):
    from pyro.optim.clipped_adam import ClippedAdam

    return ClippedAdam(params, lr=0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),  # writes in a fused kernel
        _pyro_clipped_adam,  # writes through .data
        lambda p: torch.optim.SGD(p, lr=0.1),
    ],
    ids=["fused-adam", "pyro-clipped-adam", "sgd"],
)
@pytest.mark.parametrize("builder", [iaf, maf, realnvp])
def test_an_earlier_draw_is_scored_with_the_weights_after_any_optimizer_step(builder, make):
    torch.manual_seed(0)
    flow = builder(2, transforms=2, hidden=(16,))
    optimizer = make(list(flow.parameters()))
    d = flow()
    x = d.rsample((64,))
    log_q = d.log_prob(x)
    before = log_q.detach().clone()
    loss = (log_q + 0.5 * ((x - 3) ** 2).sum(-1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        again = flow().log_prob(x)  # x is still the layers' kept draw
        fresh = flow().log_prob(x.detach().clone())
    assert (fresh - before).abs().max() > 0.05  # the step moved the density
    torch.testing.assert_close(again, fresh)


@pytest.mark.parametrize("context", [None, 2])
@pytest.mark.parametrize("builder", [iaf, realnvp])
def test_flow_clear_cache_after_a_write_outside_any_optimizer(builder, context):
    torch.manual_seed(0)
    flow = builder(3, transforms=2, hidden=(8,), context=context)
    c = None if context is None else torch.randn(5, context)
    d = flow(c)
    x = d.rsample()
    with torch.no_grad():
        for p in flow.parameters():
            p.data.add_(0.2)  # no version counter moves, no optimizer step
        fresh = copy.deepcopy(flow)(c).log_prob(x.detach().clone())  # leaves d's layers
        assert (d.log_prob(x) - fresh).abs().max() > 0.01  # kept: not seen, as documented
        flow.clear_cache()
        torch.testing.assert_close(d.log_prob(x), fresh)


def test_flow_clear_cache_empties_a_pyro_layers_cache_too():
    import pyro.distributions.transforms as T

    from pyroflows import Flow

    def make():
        torch.manual_seed(0)
        return Flow(4, [*maf(4, transforms=1, hidden=(8,)).transforms, T.Spline(4)])

    flow, twin = make(), make()
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.1)
    d = flow()
    x = d.rsample((8,))
    (-d.log_prob(x).mean()).backward()
    optimizer.step()
    twin.load_state_dict(flow.state_dict())
    with torch.no_grad():
        fresh = twin().log_prob(x.detach().clone())
        assert (d.log_prob(x) - fresh).abs().max() > 0.01  # torch's cache: pyro#2542
        flow.clear_cache()
        torch.testing.assert_close(d.log_prob(x), fresh)


def test_flow_clear_cache_reaches_pyro_layers_inside_a_compose():
    import pyro.distributions.transforms as T
    from pyro.distributions.torch_transform import ComposeTransformModule

    from pyroflows import Flow

    torch.manual_seed(0)
    parts = [T.affine_autoregressive(2, hidden_dims=[8]) for _ in range(2)]
    flow = Flow(2, [ComposeTransformModule(parts)])
    x = flow().rsample((4,))
    with torch.no_grad():
        for p in flow.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
        flow.clear_cache()
        torch.testing.assert_close(flow().log_prob(x), flow().log_prob(x.detach().clone()))


@pytest.mark.parametrize("builder", [iaf, maf, realnvp])
def test_scoring_data_keeps_the_last_draws_pair_and_scores_it_afresh(builder):
    # a flow's log_prob computes a data batch's pairs without keeping them, so the last
    # draw's pairs stay: an IAF scores its draw free after scoring data in between
    torch.manual_seed(1)
    flow = builder(4, transforms=2, hidden=(8,))
    calls = _count_conditioner_calls(flow.transforms)
    d = flow()
    x = d.rsample((5,))
    drawn = calls[0]
    data = torch.randn(6, 4)
    expected = fresh_scores(flow, [data])[0]
    scored = calls[0]
    assert scored - drawn == (2 * 4 if builder is iaf else 2)  # D passes a layer for an IAF
    torch.testing.assert_close(d.log_prob(data), expected, rtol=0, atol=0)
    assert calls[0] - scored == scored - drawn  # data are computed afresh each time
    before = calls[0]
    score = d.log_prob(x)
    assert calls[0] == before  # the draw's pairs, still there
    torch.testing.assert_close(score, fresh_scores(flow, [x.detach()])[0])


@pytest.mark.parametrize("context", [None, 2])
def test_a_conditioner_assigned_to_a_layer_empties_its_cache(context):
    torch.manual_seed(0)
    flow = iaf(3, transforms=1, hidden=(8,), context=context)
    c = None if context is None else torch.randn(4, context)
    d = flow(c)
    x = d.rsample()
    layer = flow.transforms[0]
    other = perturb(copy.deepcopy(layer.conditioner), seed=1)
    layer.conditioner = other  # new tensors and another map; the old ones stay alive
    fresh = copy.deepcopy(flow)(c).log_prob(x.detach().clone())
    assert (fresh - flow(c).log_prob(x.detach().clone())).abs().max() < 1e-5
    torch.testing.assert_close(d.log_prob(x), fresh)  # not the triple of the old map


@pytest.mark.parametrize("how", ["transformer", "add_module", "register_module"])
def test_a_part_set_on_a_layer_by_any_route_empties_its_cache(how):
    from pyroflows.transforms.elementwise import Affine

    torch.manual_seed(0)
    flow = iaf(3, transforms=1, hidden=(8,))
    perturb(flow, scale=1.0)  # log-scales well away from 0, where the clamps differ
    d = flow()
    x = d.rsample()
    layer = flow.transforms[0]
    other = perturb(copy.deepcopy(layer.conditioner), seed=1)
    before = d.log_prob(x.detach().clone())
    if how == "transformer":  # a plain object, not a module: the map changes all the same
        assert not isinstance(layer.transformer, torch.nn.Module)
        layer.transformer = Affine(clamp=0.2)
    else:
        getattr(layer, how)("conditioner", other)
    fresh = copy.deepcopy(flow)().log_prob(x.detach().clone())
    assert (fresh - before).abs().max() > 0.05  # the part changed the map
    torch.testing.assert_close(d.log_prob(x), fresh)
