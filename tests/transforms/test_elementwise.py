"""Elementwise maps inside the layers: the soft clamp, inverses, volume preservation."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import Additive, Affine


def test_affine_soft_clamp_bounds_the_log_scale():
    params = torch.tensor([[[1e6, -1e6, 0.5], [0.0, 0.0, 1.0]]])  # (1, 2, 3): (log-scale, shift)
    x, ladj = Affine(clamp=2.0).forward(torch.ones(1, 3), params)
    assert torch.isfinite(x).all()
    log_scale = torch.log(x[0, :2])
    assert (log_scale.abs() <= 2.0 + 1e-6).all()
    torch.testing.assert_close(x[0, 2], torch.exp(torch.tensor(0.5 / (1 + 0.5 / 2.0))) + 1.0)
    # the clamp keeps gradients alive at moderate values
    raw = torch.tensor([[[1.0], [0.0]]], requires_grad=True)
    Affine(clamp=3.0).forward(torch.ones(1, 1), raw)[1].sum().backward()
    torch.testing.assert_close(raw.grad[0, 0, 0], torch.tensor((1 + 1 / 3) ** -2))


def test_affine_inverse_and_log_det():
    t = Affine(clamp=None)
    params = torch.randn(5, 2, 4, dtype=torch.float64)  # (*batch, params, D)
    u = torch.randn(5, 4, dtype=torch.float64)
    x, ladj = t.forward(u, params)
    torch.testing.assert_close(x, u * params[:, 0].exp() + params[:, 1])
    u_back, ladj_back = t.inverse(x, params)
    torch.testing.assert_close(u_back, u)
    torch.testing.assert_close(ladj, params[:, 0].sum(-1))
    torch.testing.assert_close(ladj_back, ladj)


def test_additive_preserves_volume():
    t = Additive()
    u, params = torch.randn(5, 4), torch.randn(5, 1, 4)
    x, ladj = t.forward(u, params)
    assert (ladj == 0).all()
    torch.testing.assert_close(t.inverse(x, params)[0], u)


@pytest.mark.parametrize("clamp", [0.0, -1.0, float("nan")])
def test_bad_clamp(clamp):
    with pytest.raises(ValueError, match="clamp must be a positive number or None"):
        Affine(clamp)


@pytest.mark.parametrize("clamp", [None, 2.0])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_gradients_match_finite_differences(clamp, inverse):
    """The fused backward (used under grad mode) against torch's numerical gradcheck."""
    t = Affine(clamp)
    value = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = (2 * torch.randn(3, 2, 4, dtype=torch.float64)).requires_grad_()
    fn = t.inverse if inverse else t.forward
    assert torch.autograd.gradcheck(lambda v, p: fn(v, p), (value, params))
    assert torch.autograd.gradgradcheck(lambda v, p: fn(v, p), (value, params))
    # only one output used: the other's gradient is taken as zero
    assert torch.autograd.gradcheck(lambda v, p: fn(v, p)[1], (value, params))
    # the no-grad path gives the same numbers
    out, ladj = fn(value, params)
    with torch.no_grad():
        out2, ladj2 = fn(value, params)
    torch.testing.assert_close(out2, out.detach())
    torch.testing.assert_close(ladj2, ladj.detach())
