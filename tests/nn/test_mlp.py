"""MLP conditioner: shapes, context in every hidden layer, zero-initialised output."""

from __future__ import annotations

import pytest
import torch

from pyroflows.nn import MADE, MLP
from pyroflows.nn.packed import PackedLinear
from tests.helpers import one_adam_step_moves_outputs_by


def test_shapes_and_context_broadcast():
    net = MLP(3, 2, params=2, hidden=(16, 16), context=4, zero_init=False)
    x, c = torch.randn(6, 5, 3), torch.randn(5, 4)
    assert net(x, c).shape == (6, 5, 2, 2)
    torch.testing.assert_close(net(x, c), net(x, c.expand(6, 5, 4)))


def test_context_reaches_every_hidden_layer():
    net = MLP(3, 2, params=1, hidden=(8, 8, 8), context=4, zero_init=False)
    assert len(net.context_layers) == 3
    out = net(torch.randn(5, 3), torch.randn(5, 4)).sum()
    out.backward()
    grads = net.layer_tensors(net.flat.grad)
    for k in range(3):
        weight, bias = grads[f"context_layers.{k}"]
        assert weight.abs().sum() > 0
        assert bias is None  # the context enters without a bias of its own


def test_context_without_hidden_layers_still_counts():
    net = MLP(3, 2, params=1, hidden=(), context=4, zero_init=False)
    c = torch.randn(4)
    jac = torch.autograd.functional.jacobian(lambda c: net(torch.zeros(3), c), c)
    assert (jac != 0).any()


def test_output_starts_at_zero():
    net = MLP(3, 2, params=2, hidden=(8,))
    assert (net(torch.randn(4, 3)) == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": 0, "out_features": 2}, ValueError, "in_features must be an int >= 1"),
        ({"in_features": 2, "out_features": "3"}, TypeError, "out_features must be an int"),
        ({"in_features": 2, "out_features": 2, "hidden": "64"}, TypeError, "hidden must be a seq"),
        ({"in_features": 2, "out_features": 2, "params": 0}, ValueError, "params must be"),
        # a truthy string switched the option on
        ({"in_features": 2, "out_features": 2, "zero_init": "no"}, TypeError, "zero_init must"),
        ({"in_features": 2, "out_features": 2, "params_first": "no"}, TypeError, "params_first"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(**kwargs)


@pytest.mark.parametrize("made", [False, True])
def test_bad_input_and_context_are_named(made):
    def net(context):
        if made:
            return MADE(3, params=2, hidden=(16,), context=context)
        return MLP(3, 2, params=2, hidden=(16,), context=context)

    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"context is missing: .* context=4"):
        net(4)(x)
    with pytest.raises(ValueError, match=r"context must have shape \(\*batch, 4\), got \(10, 5\)"):
        net(4)(x, torch.randn(10, 5))
    with pytest.raises(TypeError, match="context has dtype torch.float32 but x has torch.float64"):
        net(4).double()(x.double(), torch.randn(10, 4))
    with pytest.raises(ValueError, match="context was given to a network built with context=0"):
        net(0)(x, torch.randn(10, 4))
    with pytest.raises(TypeError, match=r"float32; .*x must be floating point: x.to\(torch.fl"):
        net(0)(x.long())  # not "net.to(torch.int64)"
    with pytest.raises(ValueError, match="context was given to a network built with context=0"):
        net(0)(x, torch.zeros(10, 0))
    with pytest.raises(TypeError, match=r"context must be a tensor of shape .* got list"):
        net(4)(x, [[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 3\), got \(10, 2\)"):
        net(0)(torch.randn(10, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 3\), got float"):
        net(0)(3.0)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the network's weights"):
        net(0)(x.double())
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the network's weights"):
        net(4).double()(x, torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"x has batch shape \(10,\), which does not broadcast"):
        net(4)(x, torch.randn(7, 4))  # torch's "size of tensor a (10) must match" before
    assert net(4)(x, torch.randn(10, 4)).shape == ((10, 3, 2) if made else (10, 2, 2))


def test_scaled_updates_of_a_dense_network_keep_its_outputs_and_its_context():
    from pyroflows.nn import ScaledLinear

    torch.manual_seed(0)
    x, c = torch.randn(4, 8), torch.randn(4, 3)
    moves = {}
    for reference in (None, 64):
        torch.manual_seed(0)
        mlp = MLP(8, 5, params=2, hidden=(512, 512), context=3, zero_init=False).double()
        plain = mlp(x.double(), c.double()).detach()
        if reference is not None:
            mlp.scale_updates(reference)
            torch.testing.assert_close(mlp(x.double(), c.double()), plain)
            first, *wide = mlp.hidden_layers
            assert type(first) is PackedLinear  # fan-in 8: left as it was
            assert all(isinstance(m, ScaledLinear) for m in [*wide, mlp.output_layer])
            assert mlp.output_layer.scale.item() == 64 / 512
            assert mlp.output_layer.scale.dtype == torch.float64
            assert all(type(m) is PackedLinear for m in mlp.context_layers)
            mlp.scale_updates(64)  # again: nothing changes
            assert mlp.output_layer.scale.item() == 64 / 512
            mlp.scale_updates(128)  # another reference: from the current factor
            assert mlp.output_layer.scale.item() == 128 / 512
            torch.testing.assert_close(mlp(x.double(), c.double()), plain)
            mlp.scale_updates(64)
        moves[reference] = one_adam_step_moves_outputs_by(mlp, x.double(), c.double())
    assert moves[64] < moves[None] / 4  # a 512-wide row no longer moves as one
    # the scaled network is a module like any other: its state dict holds the masks
    copy = MLP(8, 5, params=2, hidden=(512, 512), context=3).double()
    copy.scale_updates(64)
    copy.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(copy(x.double(), c.double()), mlp(x.double(), c.double()))


def test_a_plain_state_loads_into_a_scaled_network_as_the_same_map():
    torch.manual_seed(0)
    plain = MLP(8, 5, params=2, hidden=(512,), zero_init=False)
    scaled = MLP(8, 5, params=2, hidden=(512,), zero_init=False)
    scaled.scale_updates(64)
    scaled.load_state_dict(plain.state_dict())  # saved before the layers were scaled
    x = torch.randn(4, 8)
    torch.testing.assert_close(scaled(x), plain(x))
    assert scaled.output_layer.scale.item() == 64 / 512  # and its steps stay scaled
    # the other way, a scaled state into a plain network: its layers become scaled
    other = MLP(8, 5, params=2, hidden=(512,), zero_init=False)
    other.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(other(x), plain(x))
    assert other.output_layer.scale.item() == 64 / 512


def test_scaling_keeps_the_parameters_an_optimizer_holds_and_the_state_loads_afresh():
    import pyroflows

    torch.manual_seed(0)
    flow = pyroflows.realnvp(100, transforms=1, hidden=(128,))
    held = {id(p) for p in flow.parameters()}
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    x = torch.randn(16, 100)
    before = flow().log_prob(x).detach()
    for module in flow.modules():
        if isinstance(module, MLP):
            module.scale_updates(64)
    assert {id(p) for p in flow.parameters()} == held  # the same tensors, still stepped
    torch.testing.assert_close(flow().log_prob(x), before)
    output = flow.transforms[0].conditioner.output_layer
    start = output.weight.detach().clone()
    loss = -flow().log_prob(x).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(output.weight, start)  # the zero output layer trains
    fresh = pyroflows.realnvp(100, transforms=1, hidden=(128,))
    fresh.load_state_dict(flow.state_dict())  # a scaled state loads into a fresh flow
    torch.testing.assert_close(fresh().log_prob(x), flow().log_prob(x))
    assert fresh.transforms[0].conditioner.output_layer.scale.item() == 64 / 128
