"""The cache and the conditional plumbing that every layer shares."""

from __future__ import annotations

import warnings

import pytest
import torch

import pyroflows
from pyroflows.transforms import AffineAutoregressive, ConditionalAffineCoupling
from tests.helpers import perturb


def test_cache_hit_needs_the_same_tensor():
    t = perturb(AffineAutoregressive(4, "iaf", hidden=(8,)))
    u = torch.randn(3, 4)
    x = t(u)
    assert t.inv(x) is u
    assert t.inv(x.clone()) is not u


def test_cache_entry_without_graph_is_not_used_under_grad():
    t = perturb(AffineAutoregressive(4, "iaf", hidden=(8,)))
    u = torch.randn(3, 4)
    with torch.no_grad():
        x = t(u)
    ladj = t.log_abs_det_jacobian(u, x)  # grad mode on now: recomputed, with a graph
    assert ladj.requires_grad


def test_cache_is_dropped_when_parameters_change():
    t = perturb(AffineAutoregressive(4, "iaf", hidden=(8,)))
    u = torch.randn(3, 4)
    x = t(u)
    with torch.no_grad():
        next(t.parameters()).add_(0.5)
    assert t(u) is not x


def test_clear_cache_and_disabled_cache():
    t = perturb(AffineAutoregressive(4, "iaf", hidden=(8,)))
    u = torch.randn(2, 4)
    x = t(u)
    t.clear_cache()
    assert t.inv(x) is not u
    t._use_cache = False
    x = t(u)
    assert t.inv(x) is not u


def test_conditioned_transform_broadcasts_and_refuses_mismatches():
    layer = perturb(ConditionalAffineCoupling(3, 2, hidden=(8,)))
    t = layer.condition(torch.randn(5, 2))
    assert t(torch.randn(3)).shape == (5, 3)  # one point under every context
    assert t(torch.randn(4, 5, 3)).shape == (4, 5, 3)  # sample dims on the left
    with pytest.raises(ValueError, match="does not broadcast with the context"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"u must have shape \(\*batch, 3\), got \(5, 2\)"):
        t(torch.randn(5, 2))
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        layer.condition([0.0, 1.0])


@pytest.mark.parametrize("form", ["maf", "iaf"])
def test_a_context_bound_before_the_layer_changed_dtype_is_named(form):
    from pyroflows.transforms import ConditionalAffineAutoregressive

    layers = [
        ConditionalAffineCoupling(3, 2, hidden=(8,)),
        ConditionalAffineAutoregressive(3, 2, form=form, hidden=(8,)),
    ]
    for layer in layers:
        t = layer.condition(torch.randn(5, 2))
        layer.double()
        u = torch.randn(5, 3, dtype=torch.float64)
        bound = "conditioned on a torch.float32 context, but its weights are now torch.float64"
        with pytest.raises(TypeError, match=bound):
            t(u)
        with pytest.raises(TypeError, match=bound):
            t.inv(u)
        with pytest.raises(TypeError, match=bound):
            t.log_abs_det_jacobian(u, u)
        again = layer.condition(torch.randn(5, 2, dtype=torch.float64))
        torch.testing.assert_close(again.inv(again(u)), u)


def test_inputs_of_another_dtype_are_refused_not_cast():
    t = AffineAutoregressive(3, "maf", hidden=(8,))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the flow's parameters"):
        t.inv(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        t.inv(torch.ones(2, 3, dtype=torch.long))


def test_repr_shows_the_layers_sizes_and_conditioner():
    import pyroflows

    text = repr(pyroflows.maf(3, transforms=2, hidden=(8,)))
    assert "AffineAutoregressive(\n      dim=3, form='maf'" in text
    assert "MaskedLinear(in_features=3, out_features=8" in text
    conditional = repr(pyroflows.realnvp(4, transforms=1, hidden=(8,), context=2))
    assert "ConditionalAffineCoupling(\n      dim=4, context=2" in conditional


def test_layers_have_the_sign_of_their_jacobians_determinant():
    import itertools

    from pyroflows.transforms import Permutation

    for perm in itertools.permutations(range(4)):
        t = Permutation(4, list(perm))
        jacobian = torch.autograd.functional.jacobian(t, torch.randn(4))
        assert t.sign == int(torch.det(jacobian).sign())
    flow = pyroflows.realnvp(3, transforms=2, hidden=(8,), permutation="random")
    signs = [t.sign for t in flow().transforms]
    assert all(s in (-1, 1) for s in signs)


def test_a_module_holding_flow_layers_can_be_traced():
    # torch.jit.trace reads every attribute with hasattr; torch's Transform.sign raised
    torch.manual_seed(0)

    class Score(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = pyroflows.realnvp(3, transforms=2, hidden=(8,))

        def forward(self, x):
            return self.flow().log_prob(x)

    module = Score()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and shape-check tracer warnings
        traced = torch.jit.trace(module, (torch.randn(5, 3),), check_trace=False)
    x = torch.randn(5, 3)
    torch.testing.assert_close(traced(x), module(x))
