"""Autoregressive specifics: triangular Jacobian in the chosen order, pass counts, forms."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import (
    AffineAutoregressive,
    ConditionalAffineAutoregressive,
    SplineAutoregressive,
)
from tests.helpers import perturb


@pytest.mark.parametrize("form", ["iaf", "maf"])
def test_jacobian_is_triangular_in_the_order(form):
    order = [3, 0, 4, 1, 2]
    t = perturb(AffineAutoregressive(5, form, hidden=(16, 16), order=order)).double()
    jac = torch.autograd.functional.jacobian(t, torch.randn(5, dtype=torch.float64))
    rank = torch.empty(5, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(5)
    later = rank[None, :] > rank[:, None]  # x_i may not depend on u_j later in the order
    assert (jac[later] == 0).all()
    assert (jac[rank[None, :] < rank[:, None]] != 0).any()


def count_calls(t) -> list[int]:
    calls = [0]
    t.conditioner.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("form", "sample_passes", "score_passes"), [("iaf", 1, 7), ("maf", 7, 1)])
def test_passes_per_direction(form, sample_passes, score_passes):
    t = perturb(AffineAutoregressive(7, form, hidden=(16,)))
    calls = count_calls(t)
    t(torch.randn(3, 7))
    assert calls[0] == sample_passes
    calls[0] = 0
    t.inv(torch.randn(3, 7))
    assert calls[0] == score_passes
    calls[0] = 0
    u, x = torch.randn(3, 7), torch.randn(3, 7)
    t.log_abs_det_jacobian(u, x)  # computed from the side the conditioner reads
    assert calls[0] == 1


def test_conditional_first_variable_depends_on_context():
    t = perturb(ConditionalAffineAutoregressive(3, 2, "iaf", hidden=(16,)))
    u = torch.randn(3)
    a = t.condition(torch.zeros(2))(u)
    b = t.condition(torch.ones(2))(u)
    assert a[0] != b[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"form": "flow"}, "form must be one of 'iaf', 'maf'; got 'flow'"),
        ({"order": [0, 0, 1]}, r"order must be a permutation of range\(3\)"),
        ({"clamp": 0.0}, "clamp must be a positive finite number"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AffineAutoregressive(3, **kwargs)


def test_every_autoregressive_layer_defaults_to_the_iaf_form():
    # the spline layers defaulted to "maf": swapping AffineAutoregressive(D) for
    # SplineAutoregressive(D) in a guide turned a one-pass draw into D passes, unsaid
    from pyroflows.transforms import (
        ConditionalAffineAutoregressive,
        ConditionalSplineAutoregressive,
        SplineAutoregressive,
    )

    layers = [
        AffineAutoregressive(3),
        SplineAutoregressive(3),
        ConditionalAffineAutoregressive(3, 2),
        ConditionalSplineAutoregressive(3, 2),
    ]
    assert [t.form for t in layers] == ["iaf"] * 4


@pytest.mark.parametrize("form", ["maf", "iaf"])
@pytest.mark.parametrize("family", ["affine", "spline"])
def test_loaded_order_is_the_one_the_d_pass_direction_uses(form, family):
    # load_state_dict copies another order into the buffer: both directions must follow it
    def make(order):
        if family == "affine":
            return AffineAutoregressive(4, form, (8,), order)
        return SplineAutoregressive(4, form, 4, 3.0, (8,), order)

    torch.manual_seed(0)
    source, target = perturb(make([2, 0, 3, 1])), make(None)
    u = torch.randn(3, 4)
    target(u), target.inv(u)  # use it once with its own order first
    target.load_state_dict(source.state_dict())
    assert torch.allclose(target(u), source(u), atol=1e-5)
    assert torch.allclose(target.inv(u), source.inv(u), atol=1e-5)


class _MaskProducts(torch.overrides.TorchFunctionMode):
    """Counts the products of a weight with one of the given masks, per mask."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks
        self.counts = [0] * len(masks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__mul__, torch.Tensor.mul, torch.mul):
            for k, mask in enumerate(self.masks):
                if any(a is mask for a in args):
                    self.counts[k] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["iaf", "maf"])
def test_the_d_pass_direction_masks_each_weight_once(form):
    # D calls of the MADE share one masked copy of each weight: before, each pass kept
    # its own for the backward (D copies: tens of gigabytes at D = 512, width 2048)
    dim = 6
    t = AffineAutoregressive(dim, form=form, hidden=(16, 16))
    perturb(t)
    y = torch.randn(3, dim)
    layers = [*t.conditioner.hidden_layers, t.conditioner.output_layer]
    with _MaskProducts([layer.mask for layer in layers]) as products:
        out = t.inv(y) if form == "iaf" else t(y)
    assert products.counts == [1] * len(layers)
    with _MaskProducts([layer.mask for layer in layers]) as products:
        t(y) if form == "iaf" else t.inv(y)  # the one-pass direction: once, as it is
    assert products.counts == [1] * len(layers)
    assert t.conditioner.output_layer._held is None  # released after the passes
    assert t.conditioner.output_layer._holding is None
    # and the one-pass direction (inverse of the D-pass one) still recovers y
    back = t(out.detach().clone()) if form == "iaf" else t.inv(out.detach().clone())
    torch.testing.assert_close(back, y, rtol=1e-4, atol=1e-4)


def test_an_ensemble_batched_by_vmap_names_its_order_buffer_in_the_d_pass_direction():
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    import pyroflows

    class Scorer(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, x):
            return self.flow().log_prob(x)

    members = [pyroflows.iaf(3, transforms=2, hidden=(8,)) for _ in range(3)]
    params, buffers = stack_module_state(members)
    template = Scorer(copy.deepcopy(members[0]).to("meta"))
    x = torch.randn(5, 3)

    def score(p, b, x):
        state = {f"flow.{name}": value for name, value in {**p, **b}.items()}
        return functional_call(template, state, (x,))

    with pytest.raises(RuntimeError, match="'order' is batched by torch.func.vmap"):
        vmap(score, in_dims=(0, 0, None))(params, buffers, x)
    # the orders are the same for every member: unbatched buffers give each its score
    got = vmap(score, in_dims=(0, None, None))(params, buffers_of(members[0]), x)
    for k, member in enumerate(members):
        torch.testing.assert_close(got[k], member().log_prob(x.clone()), atol=1e-5, rtol=1e-5)


def buffers_of(module):
    return dict(module.named_buffers())
