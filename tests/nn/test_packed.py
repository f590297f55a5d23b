"""A network's weights packed in one parameter: the same map, gradients, states and errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import pyroflows
from pyroflows.nn import MADE, MLP
from pyroflows.nn.packed import PackedLinear
from tests.helpers import perturb, weights_and_biases


def _nets():
    return [
        MADE(4, params=2, hidden=(8, 8), context=3, zero_init=False),
        MLP(3, 2, params=2, hidden=(8,), context=3, zero_init=False),
        MLP(3, 2, params=1, hidden=(), context=3, zero_init=False),  # context_output
    ]


@pytest.mark.parametrize("k", range(3))
def test_packed_and_unpacked_compute_the_same_map_and_gradients(k):
    torch.manual_seed(0)
    net = perturb(_nets()[k]).double()
    twin = copy.deepcopy(net).unpack()
    assert [n for n, _ in net.named_parameters()] == ["flat"]
    biases = [b for _, b in net.layer_tensors().values() if b is not None]
    assert len(list(twin.parameters())) == len(net.layer_tensors()) + len(biases)
    x = torch.randn(5, net.hidden_layers[0].in_features if net.hidden_layers else 3)
    x, c = x.double(), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(twin(x, c), net(x, c), rtol=0, atol=0)
    net(x, c).square().sum().backward()
    twin(x, c).square().sum().backward()
    grads = net.layer_tensors(net.flat.grad)
    for name, layer in twin._named_layers():
        weight, bias = grads[name.removesuffix(".")]
        torch.testing.assert_close(weight, layer.weight.grad)
        if bias is not None:
            torch.testing.assert_close(bias, layer.bias.grad)


def test_a_packed_layer_reads_its_gradient_as_its_part_of_the_flat_gradient():
    torch.manual_seed(0)
    flow = pyroflows.maf(5, transforms=1, hidden=(8, 8))
    net = perturb(flow.transforms[0].conditioner)  # off the zero output layer's start
    layers = dict(net._named_layers())
    # before any backward: None, without torch's warning on a non-leaf's .grad (an error
    # under this suite's filters)
    assert all(layer.weight.grad is None for layer in layers.values())
    flow().log_prob(torch.randn(7, 5)).sum().backward()
    grads = net.layer_tensors(net.flat.grad)
    for name, layer in layers.items():
        weight, bias = grads[name.removesuffix(".")]
        assert weight.abs().sum() > 0
        torch.testing.assert_close(layer.weight.grad, weight, rtol=0, atol=0)
        if bias is not None:
            torch.testing.assert_close(layer.bias.grad, bias, rtol=0, atol=0)
    torch.optim.Adam(flow.parameters()).zero_grad()  # set_to_none
    assert all(layer.weight.grad is None for layer in layers.values())


def test_a_flow_steps_one_tensor_per_network():
    flow = pyroflows.maf(6, transforms=5, hidden=(16, 16))
    assert len(list(flow.parameters())) == 5
    layer = flow.transforms[0].conditioner.hidden_layers[0]
    assert layer.weight.shape == (16, 6)
    assert layer.bias.shape == (16,)
    assert layer.weight.data_ptr() == flow.transforms[0].conditioner.flat.data_ptr()
    assert len(list(layer.parameters())) == 0


def test_writes_through_a_layers_weight_reach_the_network_and_follow_dtype_moves():
    torch.manual_seed(0)
    net = MLP(3, 2, params=1, hidden=(8,), zero_init=False)
    x = torch.randn(4, 3)
    before = net(x)
    with torch.no_grad():
        nn.init.zeros_(net.output_layer.weight)
        net.output_layer.bias.fill_(2.0)
    torch.testing.assert_close(net(x), torch.full_like(before, 2.0))
    net.double()
    assert net.output_layer.weight.dtype == torch.float64
    assert net.flat.dtype == torch.float64


def test_states_load_across_layouts():
    torch.manual_seed(0)
    source = perturb(MADE(4, params=2, hidden=(8,), context=2, zero_init=False))
    x, c = torch.randn(5, 4), torch.randn(5, 2)
    unpacked = copy.deepcopy(source).unpack()
    per_layer = unpacked.state_dict()  # as an older version saved it: a weight per layer
    assert "hidden_layers.0.weight" in per_layer
    assert "flat" not in per_layer
    fresh = MADE(4, params=2, hidden=(8,), context=2)
    fresh.load_state_dict(per_layer)
    torch.testing.assert_close(fresh(x, c), source(x, c))
    assert set(fresh.state_dict()) == set(source.state_dict())
    other = MADE(4, params=2, hidden=(8,), context=2).unpack()
    other.load_state_dict(source.state_dict())  # a packed state into unpacked layers
    torch.testing.assert_close(other(x, c), source(x, c))
    # assign=True takes the state's dtype, as torch's own loads do
    wide = MADE(4, params=2, hidden=(8,), context=2)
    wide.load_state_dict(copy.deepcopy(unpacked).double().state_dict(), assign=True)
    assert wide.flat.dtype == torch.float64
    torch.testing.assert_close(wide(x.double(), c.double()), source(x, c).double())


def test_unpacking_a_frozen_network_keeps_it_frozen():
    net = MADE(3, 2, hidden=(8,))
    net.flat.requires_grad_(False)
    net.unpack()
    assert not any(p.requires_grad for p in net.parameters())
    net = MADE(3, 2, hidden=(8,)).unpack()  # and a trainable one trainable
    assert all(p.requires_grad for p in net.parameters())


def test_a_state_missing_a_layer_or_of_another_size_is_reported_by_name():
    net = MADE(4, params=2, hidden=(8,))
    state = copy.deepcopy(net).unpack().state_dict()
    del state["output_layer.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "output_layer.bias"'):
        net.load_state_dict(state)
    wider = MADE(4, params=2, hidden=(9,)).unpack().state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for hidden_layers.0.weight"):
        net.load_state_dict(wider)
    with pytest.raises(RuntimeError, match=r"size mismatch for flat"):
        net.load_state_dict(MADE(4, params=2, hidden=(9,)).state_dict())


def test_what_needs_a_layers_own_parameters_says_to_unpack():
    from torch.nn.utils import prune

    net = MLP(3, 2, params=1, hidden=(8,))
    with pytest.raises(TypeError, match=r"call unpack\(\) on the network"):
        prune.l1_unstructured(net.hidden_layers[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"requires_grad_\(\) on one layer.*unpack\(\)"):
        net.hidden_layers[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"flat must have the shape .*\(50,\), got \(3,\)"):
        net.layer_tensors(torch.zeros(3))
    net.unpack()
    net.hidden_layers[0].requires_grad_(False)  # its own parameters now
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    with pytest.raises(ValueError, match="this network is unpacked"):
        net.layer_tensors()


def test_a_network_pickled_with_a_parameter_per_layer_works_and_packs():
    # an older version pickled its dense layers as plain nn.Linear holding their own
    torch.manual_seed(0)
    net = perturb(MLP(3, 2, params=2, hidden=(8,), context=2, zero_init=False))
    x, c = torch.randn(4, 3), torch.randn(4, 2)
    expected = net(x, c)
    old = copy.deepcopy(net).unpack()
    for _, layer in old._named_layers():
        layer.__class__ = nn.Linear
    back = pickle.loads(pickle.dumps(old))
    torch.testing.assert_close(back(x, c), expected)
    back.pack()
    assert all(type(layer) is PackedLinear for _, layer in back._named_layers())
    assert [n for n, _ in back.named_parameters()] == ["flat"]
    torch.testing.assert_close(back(x, c), expected)


def test_the_test_helper_lists_weights_in_the_unpacked_order():
    net = MLP(3, 2, params=1, hidden=(8,), context=2)
    packed = weights_and_biases(net)
    unpacked = list(copy.deepcopy(net).unpack().parameters())
    assert [t.shape for t in packed] == [t.shape for t in unpacked]


def test_views_kept_for_calls_without_gradients_follow_steps_moves_and_new_data():
    torch.manual_seed(0)
    net = MADE(3, params=2, hidden=(8,), zero_init=False)
    x = torch.randn(4, 3)

    def fresh_result():  # the same weights, split anew
        return copy.deepcopy(net).unpack()(x)

    with torch.no_grad():
        net(x)
    kept = net.__dict__["_flat_views"]
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(x).square().sum().backward()  # with gradients: split anew, recorded
    optimizer.step()  # in place: the kept views see it
    with torch.no_grad():
        torch.testing.assert_close(net(x), fresh_result())
    assert net.__dict__["_flat_views"] is kept
    with torch.no_grad():
        net.flat.data = net.flat.data * 2.0  # new data: new views
        torch.testing.assert_close(net(x), fresh_result())
        assert net.__dict__["_flat_views"] is not kept
        net.double()
        assert net(x.double()).dtype == torch.float64
    assert "_flat_views" not in pickle.loads(pickle.dumps(net)).__dict__
    assert "_flat_views" not in net.unpack().__dict__


def test_a_state_of_layers_of_other_sizes_but_the_same_total_is_refused():
    a = pyroflows.nice(4, transforms=2, hidden=(8, 16))
    b = pyroflows.nice(4, transforms=2, hidden=(16, 8))  # the same number of weights
    assert a.state_dict()["transforms.0.conditioner.flat"].shape == (
        b.state_dict()["transforms.0.conditioner.flat"].shape
    )
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(
        RuntimeError, match=r"size mismatch for transforms.0.conditioner.flat: the"
    ) as caught:
        b.load_state_dict(a.state_dict())
    assert "Missing key" not in str(caught.value)  # said once, with the reason
    assert all(torch.equal(b.state_dict()[k], before[k]) for k in before)
    unpacked = copy.deepcopy(b)
    for t in unpacked.transforms:
        if hasattr(t, "conditioner"):
            t.conditioner.unpack()
    with pytest.raises(RuntimeError, match=r"size mismatch for transforms.0.conditioner.flat"):
        unpacked.load_state_dict(a.state_dict())


def test_a_partly_frozen_network_is_not_packed():
    net = MLP(3, 2, params=1, hidden=(8,)).unpack()
    net.hidden_layers[0].requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"partly frozen \(requires_grad False in hidden_layers.0\)"
    ):
        net.pack()
    assert len(list(net.parameters())) == 4  # left as it was
    net.requires_grad_(False)
    assert not net.pack().flat.requires_grad  # frozen as a whole: packed frozen


def test_kept_views_do_not_stop_torch_from_swapping_flat():
    net = MADE(3, params=2, hidden=(8,), zero_init=False)
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = net(x)  # views kept
    state = copy.deepcopy(net.state_dict())
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        net.double()
        net.float()
        net.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)


class _Splits(torch.overrides.TorchFunctionMode):
    def __init__(self, flat):
        super().__init__()
        self.flat, self.count = flat, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.split, torch.split) and args and args[0] is self.flat:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_d_calls_of_an_inverse_under_autograd_split_flat_once():
    # each split's backward writes a gradient of the whole of flat: D of them, per
    # layer, cost more than the passes at D = 96
    from pyroflows.transforms import AffineAutoregressive

    t = perturb(AffineAutoregressive(6, form="maf", hidden=(16,)))
    with _Splits(t.conditioner.flat) as splits:
        t(torch.randn(3, 6)).sum().backward()  # the MAF form's D-pass direction
    assert splits.count == 1
    assert "_held_views" not in t.conditioner.__dict__  # released after the passes


def test_networks_above_the_limit_are_built_unpacked():
    from pyroflows.nn.packed import PACK_LIMIT

    small = MADE(4, params=2, hidden=(8, 8))
    assert [n for n, _ in small.named_parameters()] == ["flat"]
    big = MADE(64, params=2, hidden=(512, 512))  # 360k parameters
    count = sum(p.numel() for p in big.parameters())
    assert count > PACK_LIMIT
    names = [n for n, _ in big.named_parameters()]
    assert "flat" not in names
    assert "hidden_layers.0.weight" in names
    x = torch.randn(3, 64)
    before = big(x)
    assert torch.equal(big.pack()(x), before)  # packed on request: the same map
    assert [n for n, _ in big.named_parameters()] == ["flat"]
    assert sum(p.numel() for p in big.parameters()) == count


def test_torch_func_maps_a_layer_of_a_packed_network_as_a_loop_does():
    # vmap reads repr(module) as it unwraps its outputs (Linear.extra_repr reads bias),
    # and a packed layer's bias once called retain_grad there, which torch.func refuses
    flow = pyroflows.maf(2, transforms=2, hidden=(8,))
    layer = flow.transforms[0]
    assert len(list(layer.parameters())) == 1  # packed: one flat parameter
    x = torch.randn(5, 2)
    torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x))
    torch.testing.assert_close(torch.func.vmap(layer.inv)(x), layer.inv(x.clone()))
    weight = layer.conditioner.hidden_layers[0].weight
    grads = torch.func.grad(lambda w: (w * weight).sum())(torch.ones_like(weight))
    torch.testing.assert_close(grads, weight.detach())
    assert layer.conditioner.hidden_layers[0].weight.grad is None  # and, outside, no warning
