"""MADE: the autoregressive property, checked through the autograd Jacobian of the network."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from pyroflows.nn import MADE, MaskedLinear
from tests.helpers import one_adam_step_moves_outputs_by


def jacobian_support(made: MADE, dim: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where d(output)/d(input) and d(output)/d(context) are non-zero, over several points.

    Returned as (output i, param p, input j), whatever the MADE's output layout.
    """
    transpose = made.params_first
    params = made.out_shape[0] if transpose else made.out_shape[1]

    def by_output(*args):
        out = made(*args)
        return out.transpose(-1, -2) if transpose else out

    dep_x = torch.zeros(dim, params, dim, dtype=torch.bool)
    dep_c = torch.zeros(dim, params, max(context, 1), dtype=torch.bool)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(dim, generator=gen, dtype=torch.float64)
        c = torch.randn(max(context, 1), generator=gen, dtype=torch.float64)
        if context:
            jx, jc = torch.autograd.functional.jacobian(by_output, (x, c))
            dep_c |= jc != 0
        else:
            jx = torch.autograd.functional.jacobian(by_output, x)
        dep_x |= jx != 0
    return dep_x, dep_c


@pytest.mark.parametrize("dim", [1, 2, 5, 9])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("hidden", [(16,), (20, 20), (8, 12, 10)])
@pytest.mark.parametrize("params", [1, 3])
@pytest.mark.parametrize("params_first", [False, True])
def test_outputs_depend_exactly_on_earlier_inputs(dim, context, hidden, params, params_first):
    order = torch.randperm(dim, generator=torch.Generator().manual_seed(dim)).tolist()
    # tanh, not ReLU: a dead ReLU unit at the probe points would hide a real connection
    narrow = dim > 1 and min(hidden) < dim - 1 + bool(context)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if not narrow else "ignore")  # tested below
        made = MADE(dim, params, hidden, context, order, nn.Tanh, False, params_first).double()
    assert made.out_shape == ((params, dim) if params_first else (dim, params))
    dep_x, dep_c = jacobian_support(made, dim, context)
    rank = torch.empty(dim, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(dim)
    allowed = rank[None, :] < rank[:, None]  # (output i, input j): rank(j) < rank(i)
    # Never depends on a later (or the same) input: the property a flow relies on.
    assert not (dep_x & ~allowed[:, None, :]).any()
    # With hidden layers wide enough for every degree (1..D-1, and 0 for context-only
    # units when there is a context), it depends on all earlier inputs.
    if min(hidden) >= dim - 1 + bool(context):
        assert (dep_x == allowed[:, None, :]).all()
    if context:  # every output, the first in the order included, sees the context
        assert dep_c.any(-1).all()


def test_output_shape_and_zero_init():
    made = MADE(4, params=2, hidden=(8,), context=2)
    out = made(torch.randn(3, 5, 4), torch.randn(5, 2))  # context broadcasts over batch
    assert out.shape == (3, 5, 4, 2)
    assert (out == 0).all()


def test_held_masked_weights_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    made = MADE(4, params=2, hidden=(8, 8), context=3, zero_init=False)
    x, c = torch.randn(5, 4), torch.randn(5, 3)
    plain = made(x, c)
    grads = torch.autograd.grad(plain.square().sum(), list(made.parameters()))
    with made.masked_weights_held():
        with made.masked_weights_held():  # nested: the outer block keeps holding them
            held = made(x, c)
        again = made(x, c)
    torch.testing.assert_close(held, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    held_grads = torch.autograd.grad(held.square().sum(), list(made.parameters()))
    for a, b in zip(grads, held_grads, strict=True):
        torch.testing.assert_close(a, b)
    # released after the block, also when it raises: the next call masks the new weights
    with pytest.raises(RuntimeError, match="inside"), made.masked_weights_held():
        raise RuntimeError("inside")
    with torch.no_grad():
        made.output_layer.weight.add_(1.0)
    assert not torch.equal(made(x, c), plain)
    dep = torch.autograd.functional.jacobian(lambda v: made(v, c[:1]).sum(-1), x[:1])
    assert (dep[0, 0, 0, :] == 0).all()  # still masked: the first output reads no input
    assert (dep[0, 3, 0, :3] != 0).any()


def test_scaled_updates_keep_the_outputs_and_move_wide_layers_as_narrow_ones():
    # (the dense MLP's twin is in tests/nn/test_mlp.py)
    x = torch.randn(4, 8)
    moves = {}
    for reference in (None, 64):
        torch.manual_seed(0)
        made = MADE(8, params=2, hidden=(1024, 1024), zero_init=False)
        plain = made(x).detach()
        if reference is not None:
            made.scale_updates(reference)
            torch.testing.assert_close(made(x), plain, rtol=1e-5, atol=1e-6)
            masks = [m.mask for m in made.modules() if isinstance(m, MaskedLinear)]
            first, *wide = masks  # fan-in 8 <= 64: left exactly as it was
            assert set(first.unique().tolist()) == {0.0, 1.0}
            assert all(set(m.unique().tolist()) == {0.0, 64 / 1024} for m in wide)
        moves[reference] = one_adam_step_moves_outputs_by(made, x)
    # Adam's first step moves a row's 1024 entries together: the unscaled outputs jump
    assert moves[64] < moves[None] / 4


def test_scaled_updates_rescale_from_the_current_factor_and_keep_the_order():
    torch.manual_seed(0)
    made = MADE(5, params=2, hidden=(256,), zero_init=False, order=[3, 1, 4, 0, 2])
    x = torch.randn(3, 5)
    plain = made(x).detach()
    made.scale_updates(16)
    made.scale_updates(16)  # again: nothing changes
    assert made.output_layer.mask.max().item() == 16 / 256
    made.scale_updates(128)
    assert made.output_layer.mask.max().item() == 128 / 256
    torch.testing.assert_close(made(x), plain, rtol=1e-5, atol=1e-6)
    dep = torch.autograd.functional.jacobian(lambda v: made(v).sum(-1), x[:1])[0, :, 0, :]
    assert (dep[3] == 0).all()  # the first variable in the order still reads no input
    assert (dep[1, [0, 1, 2, 4]] == 0).all()  # the second reads the first only
    assert dep[1, 3] != 0
    with pytest.raises(ValueError, match="reference_fan_in"):
        made.scale_updates(0)


@pytest.mark.parametrize("fan_in", [107, 121, 219, 240, 282])  # 64 / n not exact in float32
def test_scaling_twice_changes_nothing(fan_in):
    made = MADE(fan_in, params=2, hidden=(fan_in,), zero_init=False)
    single = MADE(1, params=2, hidden=(80,), zero_init=False)  # output mask all zero
    for module in (made, single):
        module.scale_updates(64)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        module.scale_updates(64)
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_held_weights_belong_to_the_thread_that_holds_them():
    import threading

    torch.manual_seed(0)
    made = MADE(4, params=2, hidden=(8,), zero_init=False)
    x = torch.randn(3, 4)
    grads = []

    def train():  # another thread, while this one holds the weights without gradients
        made(x).sum().backward()
        grads.append(made.layer_tensors(made.flat.grad)["hidden_layers.0"][0])

    with torch.no_grad(), made.masked_weights_held():
        made(x)  # held, without a graph
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    assert grads[0] is not None  # it used this thread's held weight, which has no graph
    assert grads[0].abs().sum() > 0


def test_masks_are_buffers_that_move_with_the_module():
    made = MADE(3, hidden=(8,)).double()
    names = dict(made.named_buffers())
    assert {"hidden_layers.0.mask", "output_layer.mask", "order"} <= set(names)
    assert names["hidden_layers.0.mask"].dtype == torch.float64
    assert "hidden_layers.0.mask" in made.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": 0}, ValueError, "features must be an int >= 1"),
        ({"features": 2.5}, TypeError, "features must be an int"),
        ({"features": 3, "order": [0, 1, 1]}, ValueError, "order must be a permutation"),
        ({"features": 3, "order": [0, 1]}, ValueError, "order must be a permutation"),
        ({"features": 3, "hidden": (8, 0)}, ValueError, "every entry of hidden"),
        ({"features": 3, "context": -1}, ValueError, "context must be an int >= 0"),
        # a truthy string switched the option on
        ({"features": 3, "zero_init": "False"}, TypeError, "zero_init must be True or False"),
        ({"features": 3, "params_first": "no"}, TypeError, "params_first must be True or"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        MADE(**kwargs)


@pytest.mark.parametrize("order", ["abc", [0, "x", 2], 7, [0.5, 2.7, 1.1], [0.0, 1.0, 2.0]])
def test_order_that_is_not_a_sequence_of_ints(order):
    with pytest.raises(ValueError, match=r"order must be a permutation of range\(3\)"):
        MADE(3, order=order)


@pytest.mark.parametrize(("dim", "hidden", "context"), [(5, (3,), 0), (6, (9, 4), 0), (5, (4,), 2)])
def test_narrow_hidden_layers_warn_and_say_which_inputs_are_lost(dim, hidden, context):
    order = torch.randperm(dim, generator=torch.Generator().manual_seed(1)).tolist()
    with pytest.warns(UserWarning, match=r"narrower than") as record:
        made = MADE(dim, 2, hidden, context, order, nn.Tanh, False).double()
    assert record[0].filename == __file__  # points at the caller, not at pyroflows
    seen = int(re.search(r"inputs after position (\d+)", str(record[0].message)).group(1))
    dep_x, _ = jacobian_support(made, dim, context)
    reaches_output = dep_x.flatten(0, 1).any(0)  # per input j
    rank = torch.empty(dim, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(1, dim + 1)
    # the inputs the message names as lost reach nothing; the earlier ones (but the
    # last variable, which no output may read) do
    assert not reaches_output[rank > seen].any()
    assert reaches_output[(rank <= seen) & (rank < dim)].all()


@pytest.mark.parametrize(("dim", "hidden", "context"), [(5, (4,), 0), (5, (5,), 2), (1, (1,), 3)])
def test_wide_enough_hidden_layers_do_not_warn(dim, hidden, context):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MADE(dim, 2, hidden, context)


def test_a_builder_too_narrow_for_its_dim_warns_at_the_users_line():
    import pyroflows

    with pytest.warns(UserWarning, match=r"hidden=\(64, 64\) has a layer narrower than 69") as w:
        pyroflows.maf(70, transforms=1, hidden=(64, 64))
    assert w[0].filename == __file__


@pytest.mark.parametrize(
    ("build", "width"),
    [
        (lambda p: p.maf(70, transforms=1), 69),
        (lambda p: p.iaf(70, transforms=1, context=3), 70),
        (lambda p: p.nsf(70, transforms=1, autoregressive="maf"), 69),
        (lambda p: p.maf(10, transforms=1), 64),
    ],
)
def test_builder_defaults_are_wide_enough_for_every_input(build, width):
    import pyroflows

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = build(pyroflows)
    made = flow.transforms[0].conditioner
    assert [layer.out_features for layer in made.hidden_layers] == [width, width]


def test_a_plain_state_loads_into_a_scaled_made_as_the_same_map_with_its_scaling():
    torch.manual_seed(0)
    plain = MADE(4, params=2, hidden=(200,), zero_init=False)
    scaled = MADE(4, params=2, hidden=(200,), zero_init=False)
    scaled.scale_updates(64)
    scaled.load_state_dict(plain.state_dict())  # saved before the layers were scaled
    x = torch.randn(5, 4)
    torch.testing.assert_close(scaled(x), plain(x))
    assert scaled.output_layer.mask.max().item() == pytest.approx(64 / 200)  # steps scaled
    fresh = MADE(4, params=2, hidden=(200,), zero_init=False)
    fresh.load_state_dict(scaled.state_dict())  # a scaled state keeps its scaling
    torch.testing.assert_close(fresh(x), plain(x))
    assert fresh.output_layer.mask.max().item() == pytest.approx(64 / 200)
