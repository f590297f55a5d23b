"""Flow and the builders: shapes, normalisation, caching, persistence, devices, bad input."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

import pyroflows
from pyroflows import Flow
from pyroflows.transforms import AffineCoupling, ConditionalAffineCoupling
from tests.helpers import perturb

# Every builder, and the autoregressive forms of nsf.
VARIANTS = {name: (name, {}) for name in pyroflows.BUILDERS}
VARIANTS["nsf_maf"] = ("nsf", {"autoregressive": "maf"})
VARIANTS["nsf_iaf"] = ("nsf", {"autoregressive": "iaf"})
FLOWS = sorted(VARIANTS)
BUILDERS = sorted(pyroflows.BUILDERS)


def small(name: str, dim: int = 2, context: int | None = None, **kwargs) -> Flow:
    builder, fixed = VARIANTS[name]
    kwargs = {"transforms": 3, "hidden": (32, 32), **fixed, **kwargs}
    return pyroflows.BUILDERS[builder](dim, context=context, **kwargs)


def rough(name: str, dim: int = 2, context=None, scale: float = 0.3, seed: int = 0) -> Flow:
    """A small flow pushed well off the identity (splines: less, or they turn needle-sharp)."""
    scale = min(scale, 0.1) if name.startswith("nsf") else scale
    return perturb(small(name, dim, context), scale=scale, seed=seed)


@pytest.mark.parametrize("name", FLOWS)
def test_unconditional_shapes(name):
    d = small(name, dim=3)()
    assert d.event_shape == (3,)
    assert d.batch_shape == ()
    assert d.sample().shape == (3,)
    x = d.sample((4, 5))
    assert x.shape == (4, 5, 3)
    assert d.log_prob(x).shape == (4, 5)


@pytest.mark.parametrize("name", FLOWS)
def test_conditional_batch_of_contexts(name):
    # float64: a perturbed spline flow is sharp enough that float32 rounding differences
    # between batched and single evaluations would blur what this test is about
    flow = rough(name, dim=3, context=2).double()
    context = torch.randn(4, 5, 2, dtype=torch.float64)
    d = flow(context)
    assert d.batch_shape == (4, 5)
    assert d.event_shape == (3,)
    assert d.sample().shape == (4, 5, 3)  # no sample shape needed
    x = d.sample((6,))
    assert x.shape == (6, 4, 5, 3)
    lp = d.log_prob(x)
    assert lp.shape == (6, 4, 5)
    # each entry is the density under its own context
    single = flow(context[1, 2]).log_prob(x[:, 1, 2].clone())
    torch.testing.assert_close(lp[:, 1, 2], single, atol=1e-9, rtol=1e-9)
    # one point scored under every context broadcasts
    assert d.log_prob(torch.zeros(3, dtype=torch.float64)).shape == (4, 5)


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_integrates_to_one(name):
    flow = rough(name, scale=0.2, seed=3).double()
    grid = torch.linspace(-10, 10, 501, dtype=torch.float64)
    step = grid[1] - grid[0]
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        log_p = flow().log_prob(points)
        base = torch.distributions.Normal(0.0, 1.0).log_prob(points).sum(-1)
    assert (log_p - base).abs().max() > 0.5, "the perturbed flow should not be the base"
    mass = log_p.exp().sum() * step**2
    assert abs(mass.item() - 1) < 0.01


@pytest.mark.parametrize("name", FLOWS)
def test_samples_follow_log_prob(name):
    """The sampler and the density describe the same distribution: E_q[log q] = -H."""
    flow = rough(name, scale=0.2, seed=3).double()
    torch.manual_seed(1)
    with torch.no_grad():
        d = flow()
        x = d.sample((20000,))
        lp = d.log_prob(x.clone())  # a fresh copy: scored without the cache
    assert torch.isfinite(lp).all()
    # Monte-Carlo mean of log q(x) under x ~ q must match the grid entropy estimate
    grid = torch.linspace(-10, 10, 401, dtype=torch.float64)
    step = grid[1] - grid[0]
    pts = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        lq = flow().log_prob(pts)
    expected = (lq.exp() * lq).sum() * step**2
    assert abs(lp.mean() - expected) < 4 * lp.std() / 20000**0.5 + 0.01


def count_conditioner_calls(flow: Flow) -> list[int]:
    counts = [0] * len(flow.transforms)
    for i, layer in enumerate(flow.transforms):
        if hasattr(layer, "conditioner"):

            def hook(module, args, output, i=i):
                counts[i] += 1

            layer.conditioner.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("context", [None, 3])
def test_iaf_scores_its_own_samples_without_another_pass(context):
    flow = perturb(pyroflows.iaf(6, transforms=4, hidden=(16,), context=context))
    counts = count_conditioner_calls(flow)
    d = flow(torch.randn(5, 3)) if context else flow()
    x = d.rsample((10,))
    lp = d.log_prob(x)
    assert counts == [1] * 4
    lp.sum().backward()  # the cached log-det carries the graph
    # a fresh copy of the same points needs the D-pass inverse: 6 passes per layer
    d.log_prob(x.detach().clone())
    assert counts == [1 + 6] * 4


@pytest.mark.parametrize("name", ["realnvp", "nice"])
def test_coupling_flows_score_own_samples_from_the_cache(name):
    flow = rough(name, dim=4)
    counts = count_conditioner_calls(flow)
    d = flow()
    d.log_prob(d.rsample((8,)))
    assert [c for c in counts if c] == [1] * 3


def test_maf_scores_data_in_one_pass_per_layer():
    flow = perturb(pyroflows.maf(5, transforms=3, hidden=(16,)))
    counts = count_conditioner_calls(flow)
    flow().log_prob(torch.randn(10, 5))
    assert counts == [1] * 3


def test_cache_is_not_stale_after_an_optimizer_step():
    flow = perturb(pyroflows.iaf(3, transforms=2, hidden=(16,)))
    optim = torch.optim.SGD(flow.parameters(), lr=0.1)
    d = flow()
    x = d.rsample((7,))
    (-d.log_prob(x).mean()).backward()
    before = d.log_prob(x).detach()
    optim.step()
    after = d.log_prob(x).detach()
    expected = flow().log_prob(x.detach().clone()).detach()
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("context", [None, 2])
def test_state_dict_and_pickle_round_trips(name, context):
    torch.manual_seed(0)
    flow = rough(name, dim=3, context=context)
    c = torch.randn(4, 2) if context else None
    x = torch.randn(4, 3)

    def score(f):
        return f(c).log_prob(x.clone()) if context else f().log_prob(x.clone())

    expected = score(flow).detach()
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different random permutation, replaced by the loaded one
    fresh = small(name, dim=3, context=context)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(score(fresh).detach(), expected)
    torch.testing.assert_close(score(pickle.loads(pickle.dumps(flow))).detach(), expected)


@pytest.mark.parametrize("name", FLOWS)
def test_double_moves_every_tensor_and_mixed_dtypes_are_refused(name):
    flow = small(name, dim=3, context=2).double()
    for tensor in list(flow.parameters()) + list(flow.buffers()):
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64
    d = flow(torch.randn(5, 2, dtype=torch.float64))
    assert d.sample().dtype == torch.float64
    with pytest.raises(TypeError, match="dtype torch.float32 but the flow's parameters"):
        d.log_prob(torch.randn(5, 3))
    with pytest.raises(TypeError, match="context has dtype torch.float32"):
        flow(torch.randn(5, 2))


@pytest.mark.parametrize("name", FLOWS)
def test_gradients_reach_every_parameter(name):
    flow = rough(name, dim=4, context=2)
    flow(torch.randn(8, 2)).log_prob(torch.randn(8, 4)).sum().backward()
    for pname, p in flow.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", FLOWS)
def test_eval_equals_train(name):
    flow = rough(name, dim=3)
    x = torch.randn(5, 3)
    train = flow().log_prob(x.clone())
    flow.eval()
    torch.testing.assert_close(flow().log_prob(x.clone()), train)


@pytest.mark.parametrize("name", BUILDERS)
def test_defaults_work(name):
    flow = pyroflows.BUILDERS[name](4)
    d = flow()
    assert torch.isfinite(d.log_prob(d.sample((3,)))).all()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", FLOWS)
def test_wrong_last_dimension(name):
    d = small(name, dim=3)()
    with pytest.raises(ValueError, match=r"value must have shape \(\*batch, 3\), got \(4, 2\)"):
        d.log_prob(torch.randn(4, 2))


@pytest.mark.parametrize("name", FLOWS)
def test_missing_context(name):
    with pytest.raises(ValueError, match="this flow is conditional"):
        small(name, context=2)()


@pytest.mark.parametrize("name", FLOWS)
def test_unexpected_context(name):
    with pytest.raises(ValueError, match="context was given to an unconditional flow"):
        small(name)(torch.randn(2))


@pytest.mark.parametrize("name", FLOWS)
def test_wrong_context_size(name):
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 2\), got \(5, 3\)"):
        small(name, context=2)(torch.randn(5, 3))


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_points_are_refused_by_log_prob(name, bad):
    x = torch.randn(4, 3, 2)
    x[2, 1, 0] = bad
    d = small(name)()
    with pytest.raises(ValueError, match=r"value holds 1 NaN or infinite .* at index \(2, 1, 0\)"):
        d.log_prob(x)
    # with validation off, as for torch's own distributions, no check
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        assert small(name)().log_prob(x).shape == (4, 3)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def test_a_half_precision_point_is_told_the_dtype_to_move_to():
    with pytest.raises(TypeError, match=r"call flow\.double\(\) or pass value\.to\(torch\.float32"):
        small("maf")().log_prob(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"call flow\.to\(torch\.float16\) or pass"):
        small("maf")().log_prob(torch.randn(3, 2).half())


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_context(name, bad):
    context = torch.randn(5, 2)
    context[3, 1] = bad
    flow = small(name, context=2)
    with pytest.raises(ValueError, match=r"context holds 1 NaN or infinite value\(s\) of 10"):
        flow(context)
    # with validation off, as for torch's own distributions, no check (and NaN draws)
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        assert torch.isnan(flow(context).sample()[3]).any()
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


@pytest.mark.parametrize("name", ["realnvp", "nice", "nsf"])
def test_assign_loading_float64_weights_into_a_float32_flow(name):
    # coupling flows hold Permutation layers, whose dtype reference is not in state_dict
    source = rough(name, dim=3).double()
    target = small(name, dim=3)
    target.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(target().log_prob(x), source().log_prob(x.clone()))


def test_a_conditional_flow_under_vmap():
    # the context check (a truth value) cannot run under vmap: it is skipped there
    flow = rough("maf", dim=3, context=2)
    context, x = torch.randn(4, 2), torch.randn(3)
    per_context = torch.func.vmap(lambda c: flow(c).log_prob(x))(context)
    torch.testing.assert_close(per_context, flow(context).log_prob(x))


@pytest.mark.parametrize("name", FLOWS)
def test_context_batch_that_does_not_broadcast(name):
    d = small(name, context=2)(torch.randn(5, 2))
    with pytest.raises(ValueError, match="does not broadcast with the context"):
        d.log_prob(torch.randn(4, 2))


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0}, ValueError, "dim must be an int >= 1, got 0"),
        ({"dim": 2.0}, TypeError, "dim must be an int >= 1, got float"),
        ({"dim": 2, "transforms": 0}, ValueError, "transforms must be an int >= 1"),
        ({"dim": 2, "permutation": "shuffle"}, ValueError, "permutation must be one of"),
        ({"dim": 2, "hidden": (8, -1)}, ValueError, "every entry of hidden"),
        ({"dim": 2, "hidden": "64"}, TypeError, "hidden must be a sequence of positive ints"),
        ({"dim": 2, "activation": torch.tanh}, TypeError, "not a function such as torch.tanh"),
        ({"dim": 2, "context": -2}, ValueError, "context must be an int >= 0"),
        ({"dim": 2, "context": "3"}, TypeError, "context must be an int"),
    ],
)
def test_bad_builder_arguments(name, kwargs, error, match):
    builder, fixed = VARIANTS[name]
    with pytest.raises(error, match=match):
        pyroflows.BUILDERS[builder](**fixed, **kwargs)


def test_autoregressive_flows_take_one_dimension():
    for flow in (pyroflows.maf(1), pyroflows.iaf(1), pyroflows.nsf(1, autoregressive="maf")):
        d = flow()
        assert d.log_prob(d.sample((3,))).shape == (3,)


@pytest.mark.parametrize("name", ["realnvp", "nice", "nsf"])
def test_coupling_flows_need_two_dimensions(name):
    with pytest.raises(ValueError, match="dim must be >= 2 for a coupling flow.*autoregressive="):
        pyroflows.BUILDERS[name](1)


def test_nice_scale_must_be_a_bool():
    with pytest.raises(TypeError, match="scale must be True or False, got 'no'"):
        pyroflows.nice(2, scale="no")
    assert len(pyroflows.nice(2, transforms=1, scale=np.True_).transforms) == 2


@pytest.mark.parametrize("name", ["realnvp", "maf", "iaf"])
def test_bad_clamp(name):
    with pytest.raises(ValueError, match="clamp must be a positive finite number"):
        pyroflows.BUILDERS[name](2, clamp=-1.0)


def test_flow_checks_its_layers():
    with pytest.raises(ValueError, match=r"transforms\[0\] acts on dim 3, expected dim 2"):
        Flow(2, [AffineCoupling(3)])
    with pytest.raises(ValueError, match="conditional on a context of size 4"):
        Flow(2, [ConditionalAffineCoupling(2, 4)])
    with pytest.raises(ValueError, match="conditional on a context of size 4"):
        Flow(2, [ConditionalAffineCoupling(2, 4)], context=3)
    # a context no layer reads was accepted, and ignored: log p(x | c) the same for all c
    with pytest.raises(ValueError, match="context=3, but none of its transforms is conditional"):
        Flow(2, [AffineCoupling(2)], context=3)


def test_flow_checks_the_size_of_pyro_layers():
    import pyro.distributions.transforms as T
    from pyro.nn import DenseNN

    # Pyro's layers say their size as input_dim: a wrong one failed only at sample()
    with pytest.raises(ValueError, match=r"transforms\[0\] acts on dim 3, expected dim 2"):
        Flow(2, [T.Spline(3)])
    # the autoregressive ones by their network's input_dim
    for layer in (T.affine_autoregressive(3), T.spline_autoregressive(3)):
        with pytest.raises(ValueError, match=r"transforms\[1\] acts on dim 3, expected dim 2"):
            Flow(2, [T.Spline(2), layer])
    assert Flow(3, [T.affine_autoregressive(3)])().sample((4,)).shape == (4, 3)
    with pytest.raises(ValueError, match=r"transforms\[0\] acts on dim 3, expected dim 2"):
        Flow(2, [T.conditional_affine_autoregressive(3, 2)], context=2)  # by nn.input_dim
    Flow(
        3,
        [T.conditional_affine_autoregressive(3, 2), T.conditional_affine_coupling(3, 2)],
        context=2,
    )
    # and Pyro's AffineCoupling has a dim of -1 (the tensor dim it acts along), for which
    # it was refused
    flow = Flow(2, [T.AffineCoupling(1, DenseNN(1, [8], [1, 1])), T.Spline(2)])
    x = flow().sample((5,))
    assert flow().log_prob(x).shape == (5,)


@pytest.mark.parametrize("name", FLOWS)
def test_intermediates_end_at_the_flow_samples(name):
    flow = rough(name, dim=3)
    stages = flow.intermediates(50)
    assert len(stages) == len(flow.transforms) + 1
    assert all(s.shape == (50, 3) for s in stages)
    u = torch.randn(7, 3)
    last = flow.intermediates(base=u)[-1]
    torch.testing.assert_close(flow().log_prob(last), flow().log_prob(last.clone()))
    expected = u
    for t in flow.transforms:
        expected = t(expected)
    torch.testing.assert_close(last, expected)
    c = torch.randn(4, 2)
    cstages = rough(name, dim=3, context=2).intermediates(5, context=c)
    assert cstages[-1].shape == (5, 4, 3)


@pytest.mark.parametrize("name", ["realnvp", "nice", "nsf"])
@pytest.mark.parametrize("permutation", ["reverse", "random"])
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_coupling_flows_transform_every_coordinate(name, permutation, dim):
    # with two layers, no coordinate may pass through both (a random permutation drawn
    # as a plain randperm is the identity for half the seeds at D = 2)
    for seed in range(6):
        torch.manual_seed(seed)
        flow = pyroflows.BUILDERS[name](dim, transforms=2, hidden=(8,), permutation=permutation)
        flow = perturb(flow, scale=0.3, seed=seed)
        u = torch.randn(50, dim)
        x = flow.intermediates(base=u)[-1]
        moved = (x - u).abs().amax(0)
        assert (moved > 1e-3).all(), (seed, moved)


@pytest.mark.parametrize("name", ["realnvp", "nice", "nsf"])
def test_coupling_flows_refuse_no_permutation_between_layers(name):
    with pytest.raises(ValueError, match="permutation=None would leave the first 1 coord"):
        pyroflows.BUILDERS[name](3, transforms=2, permutation=None)
    assert len(pyroflows.BUILDERS[name](3, transforms=1, permutation=None).transforms) >= 1


def test_flow_takes_any_iterable_of_layers_and_refuses_other_modules():
    assert len(Flow(2, (AffineCoupling(2) for _ in range(3))).transforms) == 3
    assert Flow(2, [AffineCoupling(2)], context=None).context_features == 0
    with pytest.raises(TypeError, match=r"transforms\[1\] must be a transform module .* Flow"):
        Flow(2, [AffineCoupling(2), pyroflows.maf(2)])
    with pytest.raises(TypeError, match=r"transforms\[0\] must be .* got Linear"):
        Flow(2, [torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"got one transform \(AffineCoupling\); pass \[layer\]"):
        Flow(2, AffineCoupling(2))
    with pytest.raises(TypeError, match="got a Flow; pass flow.transforms"):
        Flow(2, pyroflows.maf(2))
    layers = pyroflows.realnvp(3, transforms=2).transforms
    for container in (layers, torch.nn.Sequential(*layers)):  # module containers are fine
        assert len(Flow(3, container).transforms) == 3


def test_flow_takes_its_layers_dtype_and_refuses_layers_of_two():
    import pyro.distributions.transforms as pyro_transforms

    from pyroflows.transforms import Permutation

    torch.manual_seed(0)
    # layers made float64 before the flow: the base follows (it stayed float32, and the
    # first sample failed, saying the parameters were float64)
    double = Flow(3, [AffineCoupling(3).double(), Permutation(3), AffineCoupling(3).double()])
    assert double.base_loc.dtype == torch.float64
    x = double().sample((4,))
    assert x.dtype == torch.float64
    assert torch.isfinite(double().log_prob(x)).all()
    assert Flow(3, [Permutation(3)]).base_loc.dtype == torch.float32  # no weights: default
    with pytest.raises(
        ValueError,
        match=r"several dtypes .*float64 on cpu in transforms\[0\], torch.float32 on cpu in "
        r"transforms\[2\]",
    ):
        Flow(3, [AffineCoupling(3).double(), Permutation(3), AffineCoupling(3)])
    # Pyro's weightless transforms are not modules: the message names ours
    with pytest.raises(TypeError, match=r"got Permute \(a Transform that is not an nn.Module; "):
        Flow(3, [AffineCoupling(3), pyro_transforms.Permute(torch.tensor([2, 0, 1]))])


@pytest.mark.parametrize(
    "builder",
    [
        "conditional_affine_coupling",  # a ConditionalDenseNN: x beside the context
        "conditional_affine_autoregressive",  # a ConditionalAutoRegressiveNN
        "conditional_spline",  # a DenseNN of the context alone
        "conditional_planar",
    ],
)
def test_flow_refuses_a_pyro_conditional_layer_of_another_context_size(builder):
    import pyro.distributions.transforms as pyro_transforms

    layer = getattr(pyro_transforms, builder)(3, 5)
    with pytest.raises(ValueError, match=r"conditional on a context of size 5, but .*context=2"):
        Flow(3, [layer], context=2)  # it failed at the first sample, in a matrix product
    d = Flow(3, [layer], context=5)(torch.randn(4, 5))
    x = d.sample()
    assert x.shape == (4, 3)
    assert torch.isfinite(d.log_prob(x)).all()


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_of_no_rows_and_of_the_wrong_dtype(name):
    d = small(name, dim=3)()
    assert d.log_prob(torch.randn(0, 3)).shape == (0,)
    dc = small(name, dim=3, context=2)(torch.randn(4, 2))
    assert dc.log_prob(torch.randn(0, 4, 3)).shape == (0, 4)
    empty = small(name, dim=3, context=2)(torch.randn(0, 2))  # no contexts
    assert empty.log_prob(torch.randn(1, 3)).shape == (0,)
    assert empty.log_prob(torch.randn(3)).shape == (0,)
    with pytest.raises(TypeError, match=r"value has dtype torch.float64 .* pass value.to"):
        d.log_prob(torch.randn(2, 3, dtype=torch.float64))


def test_intermediates_names_base_when_it_does_not_fit_the_context():
    flow = small("maf", dim=3, context=2)
    with pytest.raises(ValueError, match=r"base has batch shape \(6,\), .* context's batch"):
        flow.intermediates(context=torch.randn(4, 2), base=torch.randn(6, 3))
    stages = flow.intermediates(context=torch.randn(4, 2), base=torch.randn(5, 4, 3))
    assert stages[-1].shape == (5, 4, 3)


def test_a_flow_registered_with_pyro_module_pickles():
    import pyro

    torch.manual_seed(0)
    flow = pyroflows.maf(3, transforms=2, hidden=(8,))
    conditional = pyroflows.realnvp(4, context=2, transforms=2, hidden=(8,))
    pyro.module("flow", flow)
    pyro.module("conditional", conditional)
    try:
        x = torch.randn(5, 3)
        loaded = pickle.loads(pickle.dumps(flow))
        torch.testing.assert_close(loaded().log_prob(x), flow().log_prob(x))
        pickle.dumps(conditional)
        torch.save(conditional, io.BytesIO())
        pyro.module("flow", flow)  # the param store links it again
        assert "unconstrained" in next(flow.parameters()).__dict__
    finally:
        pyro.clear_param_store()


def test_intermediates_of_an_unbatched_base_under_batched_contexts_share_one_shape():
    flow = pyroflows.maf(3, transforms=2, hidden=(8,), context=2)
    stages = flow.intermediates(context=torch.randn(7, 2), base=torch.randn(3))
    assert [tuple(s.shape) for s in stages] == [(7, 3)] * 3


@pytest.mark.parametrize("transform", ["jacrev", "grad"])
def test_a_flow_first_called_inside_a_torch_func_transform_still_copies(transform):
    import copy

    flow = pyroflows.realnvp(2, transforms=2, hidden=(8,))
    score = {
        "jacrev": lambda v: torch.func.jacrev(lambda w: flow().log_prob(w))(v),
        "grad": lambda v: torch.func.grad(lambda w: flow().log_prob(w))(v),
    }[transform]
    score(torch.zeros(2))  # the base distribution is built here, from wrapped tensors
    x = torch.randn(5, 2)
    expected = flow().log_prob(x)
    torch.testing.assert_close(copy.deepcopy(flow)().log_prob(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(flow))().log_prob(x), expected)


@pytest.mark.parametrize("context", [None, 2])
def test_builder_options_reach_every_layer_conditional_or_not(context):
    layers = lambda flow: [t for t in flow.transforms if hasattr(t, "transformer")]  # noqa: E731
    flow = pyroflows.realnvp(4, transforms=2, hidden=(8,), context=context, clamp=1.5)
    assert [t.transformer.clamp for t in layers(flow)] == [1.5, 1.5]
    flow = pyroflows.nsf(4, transforms=2, hidden=(8,), context=context, side="base", bins=3)
    assert [(t.transformer.side, t.transformer.bins) for t in layers(flow)] == [("base", 3)] * 2
    flow = pyroflows.nice(4, transforms=2, hidden=(8,), context=context, activation=torch.nn.Tanh)
    for t in layers(flow):
        assert any(isinstance(m, torch.nn.Tanh) for m in t.conditioner.modules())
        assert not any(isinstance(m, torch.nn.ReLU) for m in t.conditioner.modules())


@pytest.mark.parametrize("builder", ["maf", "iaf"])
def test_autoregressive_orders_alternate_or_are_drawn(builder):
    make = getattr(pyroflows, builder)
    orders = [t.conditioner.order.tolist() for t in make(5, transforms=3, hidden=(8,)).transforms]
    assert orders == [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    torch.manual_seed(0)
    flow = make(5, transforms=3, hidden=(8,), permutation="random")
    drawn = [tuple(t.conditioner.order.tolist()) for t in flow.transforms]
    assert len(set(drawn)) > 1
    assert all(sorted(order) == list(range(5)) for order in drawn)


def _torch_log_prob(d, value):
    """torch's TransformedDistribution.log_prob with torch's Normal for the flow's base."""
    base = d.base_dist
    inner = getattr(base, "base_dist", None)
    if isinstance(inner, torch.distributions.Normal):
        plain = torch.distributions.Normal(inner.loc, inner.scale, validate_args=False)
        base = torch.distributions.Independent(plain, 1)
    reference = torch.distributions.TransformedDistribution(base, d.transforms)
    return torch.distributions.TransformedDistribution.log_prob(reference, value)


def _nodes(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_has_torchs_bits_in_fewer_nodes(name, dtype):
    flow = rough(name, dim=3).to(dtype)
    x = torch.randn(7, 3, dtype=dtype)
    ours, theirs = flow().log_prob(x), _torch_log_prob(flow(), x.clone())
    assert torch.equal(ours, theirs)
    assert _nodes(ours) < _nodes(theirs)
    cond = rough(name, dim=3, context=2).to(dtype)
    d = cond(torch.randn(4, 2, dtype=dtype))
    x = torch.randn(5, 4, 3, dtype=dtype)
    assert torch.equal(d.log_prob(x), _torch_log_prob(d, x.clone()))
    one = torch.randn(3, dtype=dtype)  # one point for every context: shape (4,)
    # against torch's loop on the point copied per context: given the point itself, torch
    # misses its cache in the layer that broadcasts it (the inverse's input has shape
    # (3,), its output (4, 3)) and computes that layer's log-det by a forward pass, which
    # can differ from the inverse pass's in the last bit (8.9e-16 in float64, 17 of 20
    # seeds of the data; the test passed or failed with the run's order of tests)
    copied = one.expand(4, 3).clone()
    assert torch.equal(d.log_prob(one), _torch_log_prob(d, copied))
    # and within a few units in the last place of torch's own (at most 1.5 over 20 seeds)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(d.log_prob(one), _torch_log_prob(d, one.clone()), rtol=8 * eps, atol=0)


def test_log_prob_reads_a_moved_base_and_layers_of_other_event_dims():
    import pyro.distributions.transforms as T

    # a Pyro elementwise layer (event_dim 0: its log-det is summed here) and a base
    # moved off the standard normal: the same density as torch's, up to rounding
    flow = Flow(3, [T.Spline(3), rough("maf", dim=3).transforms[0]])
    with torch.no_grad():
        flow.base_loc.fill_(0.5)
        flow.base_scale.copy_(torch.tensor([2.0, 0.3, 1.0]))
    x = torch.randn(6, 3)
    expected = _torch_log_prob(flow(), x.clone())
    assert torch.allclose(flow().log_prob(x), expected, atol=1e-5, rtol=1e-6)
    # a base the fast path does not know (torch's own Independent) gives its log_prob
    d = flow()
    normal = torch.distributions.Normal(flow.base_loc, flow.base_scale)
    d.base_dist = torch.distributions.Independent(normal, 1)
    assert torch.allclose(d.log_prob(x), expected, atol=1e-5, rtol=1e-6)
    d.base_dist = torch.distributions.Independent(
        torch.distributions.Laplace(0.0, x.new_ones(3)), 1
    )
    assert torch.allclose(d.log_prob(x), _torch_log_prob(d, x.clone()))


@pytest.mark.parametrize("method", ["sample", "rsample"])
def test_an_int_sample_shape_is_named(method):
    d = small("maf", dim=2)()
    with pytest.raises(TypeError, match=r"sample_shape must be a tuple of ints, such as \(5,\)"):
        getattr(d, method)(5)
    assert getattr(d, method)((5,)).shape == (5, 2)
    assert getattr(d, method)(torch.Size([2, 3])).shape == (2, 3, 2)


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("context", [None, 2])
def test_a_distribution_made_before_the_flow_changed_dtype_says_so(name, context):
    # flow() builds its base in the flow's dtype of the moment; a .double() afterwards
    # converts the layers only, and the layers' checks blamed the value (or told the
    # user to convert the flow back with flow.float())
    flow = small(name, dim=3, context=context)
    d = flow() if context is None else flow(torch.zeros(2))
    flow.double()
    stale = "made while its flow was torch.float32, and the flow is now torch.float64"
    for value in (torch.zeros(3), torch.zeros(3, dtype=torch.float64)):
        with pytest.raises(TypeError, match=stale):
            d.log_prob(value)
    with pytest.raises(TypeError, match=stale):
        d.sample((2,))
    with pytest.raises(TypeError, match=stale):
        d.rsample((2,))
    fresh = flow() if context is None else flow(torch.zeros(2, dtype=torch.float64))
    assert fresh.log_prob(fresh.sample((2,))).dtype == torch.float64
    # a distribution of the flow as it is keeps the plain message for a wrong value
    with pytest.raises(TypeError, match="value has dtype torch.float32 but the flow's"):
        fresh.log_prob(torch.zeros(3))


def test_the_stale_distribution_message_is_judged_by_the_flows_own_dtype():
    from pyro.distributions import transforms as T

    from pyroflows.transforms import ActNorm, Permutation

    stale = "made while its flow was torch.float32"
    # layers without parameters (a permutation's dtype is in a buffer) count too
    flow = Flow(3, [Permutation(3)])
    d = flow()
    flow.double()
    with pytest.raises(TypeError, match=stale):
        d.sample((2,))
    # a Pyro layer fails with torch's RuntimeError, not a TypeError
    flow = Flow(3, [T.Spline(3), ActNorm(3), Permutation(3)])
    d = flow()
    flow.double()
    with pytest.raises(TypeError, match=stale):
        d.sample((2,))
    # a flow converted in part (its layers, not its base) just now: not a stale
    # distribution, and calling flow() again would not help, so the layers' message stays
    flow = small("realnvp", dim=3)
    flow.transforms.double()
    d = flow()
    with pytest.raises(TypeError, match="u has dtype torch.float32 but the flow's parameters"):
        d.sample((2,))
