"""Elementwise maps inside the layers: the soft clamp, inverses, volume preservation."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import Additive, Affine


def test_affine_soft_clamp_bounds_the_log_scale():
    params = torch.tensor([[[1e6, 0.0], [-1e6, 0.0], [0.5, 1.0]]])  # (1, 3, 2)
    x, ladj = Affine(clamp=2.0).forward(torch.ones(1, 3), params)
    assert torch.isfinite(x).all()
    log_scale = torch.log(x[0, :2])
    assert (log_scale.abs() <= 2.0 + 1e-6).all()
    torch.testing.assert_close(x[0, 2], torch.exp(2.0 * torch.tanh(torch.tensor(0.25))) + 1.0)
    # the clamp keeps gradients alive at moderate values
    raw = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    Affine(clamp=3.0).forward(torch.ones(1, 1), raw)[1].sum().backward()
    torch.testing.assert_close(raw.grad[0, 0, 0], 1 - torch.tanh(torch.tensor(1 / 3)) ** 2)


def test_affine_inverse_and_log_det():
    t = Affine(clamp=None)
    params = torch.randn(5, 4, 2, dtype=torch.float64)
    u = torch.randn(5, 4, dtype=torch.float64)
    x, ladj = t.forward(u, params)
    u_back, ladj_back = t.inverse(x, params)
    torch.testing.assert_close(u_back, u)
    torch.testing.assert_close(ladj, params[..., 0].sum(-1))
    torch.testing.assert_close(ladj_back, ladj)


def test_additive_preserves_volume():
    t = Additive()
    u, params = torch.randn(5, 4), torch.randn(5, 4, 1)
    x, ladj = t.forward(u, params)
    assert (ladj == 0).all()
    torch.testing.assert_close(t.inverse(x, params)[0], u)


@pytest.mark.parametrize("clamp", [0.0, -1.0, float("nan")])
def test_bad_clamp(clamp):
    with pytest.raises(ValueError, match="clamp must be a positive number or None"):
        Affine(clamp)
