"""Elementwise maps inside the layers: the soft clamp, inverses, volume preservation."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from pyroflows.transforms import Additive, Affine
from pyroflows.transforms.elementwise import _CONSTANTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_soft_clamp_bounds_the_log_scale(dtype):
    params = torch.tensor([[[1e6, -1e6, 0.5], [0.0, 0.0, 1.0]]], dtype=dtype)  # (log-scale, shift)
    x, ladj = Affine(clamp=2.0).forward(torch.ones(1, 3, dtype=dtype), params)
    assert x.dtype == dtype
    assert torch.isfinite(x).all()
    log_scale = torch.log(x[0, :2])
    torch.testing.assert_close(log_scale, torch.tensor([2.0, -2.0], dtype=dtype))
    torch.testing.assert_close(
        x[0, 2], torch.exp(2 * torch.tanh(torch.tensor(0.25, dtype=dtype))) + 1
    )
    # slope 1 at 0, and the gradient of b tanh(r / b) elsewhere
    raw = torch.tensor([[[0.0, 1.0, -4.0], [0.0, 0.0, 0.0]]], dtype=dtype, requires_grad=True)
    Affine(clamp=3.0).forward(torch.ones(1, 3, dtype=dtype), raw)[1].sum().backward()
    expected = 1 - torch.tanh(raw.detach()[0, 0] / 3) ** 2
    torch.testing.assert_close(raw.grad[0, 0], expected)
    assert raw.grad[0, 0, 0] == 1


def test_affine_zero_parameters_are_exactly_the_identity():
    for dtype in (torch.float32, torch.float64):
        u = torch.randn(4, 3, dtype=dtype)
        for kind in ("tanh", "rational"):
            x, ladj = Affine(3.0, kind).forward(u, torch.zeros(4, 2, 3, dtype=dtype))
            assert torch.equal(x, u)
            assert (ladj == 0).all()
            back, ladj_back = Affine(3.0, kind).inverse(u, torch.zeros(4, 2, 3, dtype=dtype))
            assert torch.equal(back, u)
            assert (ladj_back == 0).all()


def test_affine_rational_clamp_for_old_model_files():
    params = torch.tensor([[[1e6, 0.5], [0.0, 1.0]]])
    x, _ = Affine(clamp=2.0, clamp_kind="rational").forward(torch.ones(1, 2), params)
    torch.testing.assert_close(torch.log(x[0, 0]), torch.tensor(2.0))
    torch.testing.assert_close(x[0, 1], torch.exp(torch.tensor(0.5 / (1 + 0.5 / 2.0))) + 1.0)
    raw = torch.tensor([[[1.0], [0.0]]], requires_grad=True)
    Affine(3.0, "rational").forward(torch.ones(1, 1), raw)[1].sum().backward()
    torch.testing.assert_close(raw.grad[0, 0, 0], torch.tensor((1 + 1 / 3) ** -2))
    assert "rational" in repr(Affine(3.0, "rational"))
    assert repr(Affine()) == "Affine(clamp=3.0)"
    with pytest.raises(ValueError, match="clamp_kind must be 'tanh' or 'rational', got 'soft'"):
        Affine(3.0, "soft")


@pytest.mark.parametrize("kind", ["tanh", "rational"])
def test_affine_matches_its_formula_both_ways(kind):
    b = 1.5
    params = 3 * torch.randn(6, 2, 4, dtype=torch.float64)
    raw, shift = params.unbind(-2)
    s = b * torch.tanh(raw / b) if kind == "tanh" else raw / (1 + raw.abs() / b)
    u = torch.randn(6, 4, dtype=torch.float64)
    x, ladj = Affine(b, kind).forward(u, params)
    torch.testing.assert_close(x, u * s.exp() + shift)
    torch.testing.assert_close(ladj, s.sum(-1))
    back, ladj_back = Affine(b, kind).inverse(x, params)
    torch.testing.assert_close(back, (x - shift) * torch.exp(-s))
    torch.testing.assert_close(back, u)
    torch.testing.assert_close(ladj_back, ladj)


def test_affine_pickled_before_clamp_kind_means_rational():
    old = Affine(2.0)
    del old.__dict__["clamp_kind"]  # what unpickling an Affine from before the option gives
    restored = pickle.loads(pickle.dumps(old))
    assert restored.clamp_kind == "rational"
    assert pickle.loads(pickle.dumps(Affine(2.0))).clamp_kind == "tanh"


def test_affine_clamp_constants_work_after_inference_mode():
    _CONSTANTS.clear()
    with torch.inference_mode():  # the constants are first made here
        Affine(clamp=1.75).forward(torch.ones(2, 3), torch.ones(2, 2, 3))
    raw = torch.ones(2, 2, 3, requires_grad=True)
    Affine(clamp=1.75).forward(torch.ones(2, 3), raw)[1].sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_affine_clamp_constants_made_under_a_default_device_or_fake_mode_stay_plain():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _CONSTANTS.clear()
    with torch.device("meta"):  # a default device must not leak into the kept constants
        assert Affine(1.25).forward(torch.ones(2, 3), torch.ones(2, 2, 3))[0].is_meta
    with FakeTensorMode():  # as torch.export traces: fake constants serve that call only
        Affine(1.5).forward(torch.ones(2, 3), torch.ones(2, 2, 3))
    for b in (1.25, 1.5):
        x, ladj = Affine(b).forward(torch.ones(2, 3), torch.ones(2, 2, 3))
        assert type(x) is torch.Tensor
        torch.testing.assert_close(ladj, torch.full((2,), 3 * b * math.tanh(1 / b)))
    assert all(
        type(c) is torch.Tensor and c.device.type == "cpu" for v in _CONSTANTS.values() for c in v
    )


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


@pytest.mark.parametrize("clamp", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clamp(clamp):
    with pytest.raises(ValueError, match="clamp must be a positive finite number"):
        Affine(clamp)


@pytest.mark.parametrize("clamp", [True, "3"])
def test_clamp_of_the_wrong_type(clamp):
    with pytest.raises(TypeError, match="clamp must be a positive finite number .* got (bool|str)"):
        Affine(clamp)


@pytest.mark.parametrize(("clamp", "kind"), [(None, "tanh"), (2.0, "tanh"), (2.0, "rational")])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_gradients_match_finite_differences(clamp, kind, inverse):
    """First and second derivatives against torch's numerical gradcheck."""
    t = Affine(clamp, kind)
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
