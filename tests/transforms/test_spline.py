"""The rational-quadratic spline as a function, and the spline layers' specifics.

The shared layer properties (autograd log-det, round trips, caching...) run over the
spline layers in test_properties.py. Here: monotonicity, the derivative, round trips at
the awkward places (bin edges, the bound, tails, adversarial parameters), no NaN/inf
anywhere, and property-based checks with hypothesis.
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import pyroflows
from pyroflows.transforms import SplineAutoregressive, SplineCoupling, rational_quadratic_spline
from pyroflows.transforms import spline as spline_module
from pyroflows.transforms.spline import _knots, _spline_autograd

B, K = 5.0, 8


def params(n, scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w, h, d = (scale * torch.randn(n, k, generator=gen, dtype=dtype) for k in (K, K, K - 1))
    return w, h, d


def spline(value, w, h, d, inverse=False):
    n = value.numel()
    shape = (n, 1)  # n independent one-dimensional splines sharing parameters
    return rational_quadratic_spline(
        value.reshape(shape),
        w.expand(n, 1, K),
        h.expand(n, 1, K),
        d.expand(n, 1, K - 1),
        B,
        inverse,
    )


def awkward_points(knots: torch.Tensor) -> torch.Tensor:
    """Knots and points just beside them, the bound, the tails and a dense grid."""
    offsets = torch.tensor([0.0, 1e-7, -1e-7, 1e-5, -1e-5, 1e-3, -1e-3], dtype=knots.dtype)
    return torch.cat(
        [
            (knots[None, :] + offsets[:, None]).flatten(),
            torch.linspace(-B, B, 4001, dtype=knots.dtype),
            torch.tensor([-B, B, -B - 1e-3, B + 1e-3, -7.0, 7.0, -1e30, 1e30], dtype=knots.dtype),
        ]
    )


ADVERSARIAL = {
    "one_bin_takes_the_width": (torch.eye(K)[3] * 30, torch.zeros(K), torch.zeros(K - 1)),
    "one_bin_takes_the_height": (torch.zeros(K), torch.eye(K)[3] * 30, torch.zeros(K - 1)),
    "skewed": (torch.eye(K)[3] * 30, torch.eye(K)[5] * 30, torch.zeros(K - 1)),
    "tiny_derivatives": (torch.zeros(K), torch.zeros(K), torch.full((K - 1,), -30.0)),
    "huge_derivatives": (torch.zeros(K), torch.zeros(K), torch.full((K - 1,), 30.0)),
    "all_at_once": (torch.eye(K)[3] * 30, torch.eye(K)[5] * 30, torch.full((K - 1,), -30.0)),
    # one dominant bin, steep at its left knot and flat at its right: the quadratic's
    # coefficients cancel in float32 (the inverse was 2x past the allowance there)
    "sharp_bin": (
        torch.eye(K)[2] * 20,
        torch.eye(K)[2] * 20,
        20 * (torch.eye(K - 1)[1] - torch.eye(K - 1)[2]),
    ),
}


def test_zero_parameters_give_the_identity():
    u = torch.linspace(-8, 8, 101)
    w, h, d = (torch.zeros(1, k) for k in (K, K, K - 1))
    x, logd = spline(u, w, h, d)
    torch.testing.assert_close(x.flatten(), u)
    torch.testing.assert_close(logd, torch.zeros_like(logd), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_strictly_monotone_and_onto_the_interval(seed):
    w, h, d = params(1, scale=2.0, seed=seed)
    u = torch.linspace(-2 * B, 2 * B, 20001, dtype=torch.float64)
    x = spline(u, w, h, d)[0].flatten()
    assert (x[1:] > x[:-1]).all()
    ends = spline(torch.tensor([-B, B], dtype=torch.float64), w, h, d)[0].flatten()
    torch.testing.assert_close(ends, torch.tensor([-B, B], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_derivative_matches_finite_differences(seed):
    w, h, d = params(1, scale=1.5, seed=seed)
    knots = _knots(w, B, 1e-3)[0].flatten()
    u = torch.linspace(-B - 1, B + 1, 997, dtype=torch.float64)
    u = u[(u[:, None] - knots[None, :]).abs().min(1).values > 1e-4]  # not across a knot
    step = 1e-6
    fd = (spline(u + step, w, h, d)[0] - spline(u - step, w, h, d)[0]) / (2 * step)
    logd = spline(u, w, h, d)[1]
    torch.testing.assert_close(logd, fd.log(), atol=1e-6, rtol=1e-6)
    # and the inverse reports the log-derivative of the forward map at its output
    x = spline(u, w, h, d)[0]
    torch.testing.assert_close(spline(x, w, h, d, inverse=True)[1], logd)


def round_trip_errors(w, h, d, dtype):
    """Round-trip errors both ways at the awkward points, and what rounding alone allows.

    Inverting a spline where it is nearly flat is ill-conditioned: ``x`` is rounded to
    the dtype before it is inverted, which moves ``u`` by up to eps * |x| / (dx/du). So the
    allowance is an absolute tolerance plus four such roundings (slopes from float64).
    """
    eps = torch.finfo(dtype).eps
    w64, h64, d64 = (p.double() for p in (w, h, d))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    u = awkward_points(_knots(w64, B, 1e-3)[0].flatten()).to(dtype).double()  # representable
    slope = spline(u, w64, h64, d64)[1].exp().flatten()
    x = spline(u.to(dtype), w, h, d)[0]
    u_err = (spline(x, w, h, d, inverse=True)[0].flatten().double() - u).abs()
    u_allowed = tol + 4 * eps * (x.abs().flatten().double() + B) / slope
    xs = awkward_points(_knots(h64, B, 1e-3)[0].flatten()).to(dtype).double()
    u_of_xs = spline(xs, w64, h64, d64, inverse=True)[0]
    slope_xs = spline(u_of_xs, w64, h64, d64)[1].exp().flatten()
    u_back = spline(xs.to(dtype), w, h, d, inverse=True)[0]
    x_err = (spline(u_back, w, h, d)[0].flatten().double() - xs).abs()
    x_allowed = tol + 4 * eps * (u_of_xs.abs().flatten() + B) * slope_xs
    return (u_err, u_allowed), (x_err, x_allowed)


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_float32_absolute_for_moderate_parameters(seed):
    """Slopes within about [0.1, 10]: the plain 1e-5 bound holds at every awkward point."""
    w, h, d = params(1, scale=0.5, seed=seed, dtype=torch.float32)
    (u_err, _), (x_err, _) = round_trip_errors(w, h, d, torch.float32)
    assert u_err.max() < 1e-5
    assert x_err.max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(5))
def test_round_trip_at_edges_bound_and_tails(seed, dtype):
    w, h, d = params(1, scale=1.5, seed=seed, dtype=dtype)
    (u_err, u_allowed), (x_err, x_allowed) = round_trip_errors(w, h, d, dtype)
    assert (u_err <= u_allowed).all()
    assert (x_err <= x_allowed).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_round_trip_adversarial_parameters(case, dtype):
    w, h, d = (p[None].to(dtype) for p in ADVERSARIAL[case])
    (u_err, u_allowed), (x_err, x_allowed) = round_trip_errors(w, h, d, dtype)
    assert (u_err <= u_allowed).all()
    assert (x_err <= x_allowed).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_no_nan_or_inf_in_values_or_gradients_over_a_million_inputs(inverse):
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    value = torch.cat(
        [
            3 * torch.randn(n - 6, generator=gen),
            torch.tensor([1e30, -1e30, B, -B, 1e-30, 0.0]),
        ]
    ).reshape(-1, 4)
    rows = value.shape[0]
    w, h, d = ((3 * torch.randn(rows, 4, k, generator=gen)).requires_grad_() for k in (K, K, K - 1))
    value.requires_grad_()
    out, logd = rational_quadratic_spline(value, w, h, d, B, inverse)
    assert torch.isfinite(out).all()
    assert torch.isfinite(logd).all()
    (out.clamp(-1e3, 1e3).sum() + logd.sum()).backward()
    for tensor in (value, w, h, d):
        assert torch.isfinite(tensor.grad).all()
    # the tails are the identity with slope 1
    tails = value.detach().abs() > B
    assert torch.equal(out.detach()[tails], value.detach()[tails])
    assert (logd.detach()[tails] == 0).all()


def both_outputs(out, logd):
    """A loss that weighs both outputs non-linearly."""
    return (out.sin() * out).sum() + (logd.cos() * logd).sum()


def fused_and_plain(value, w, h, d, loss=both_outputs):
    """Values and gradients of ``loss(out, logd)``, fused and plain."""
    results = []
    for fn in (rational_quadratic_spline, _spline_autograd):
        leaves = [t.detach().clone().requires_grad_() for t in (value, w, h, d)]
        out, logd = fn(*leaves, B, False)
        if fn is rational_quadratic_spline:  # the fused Function did the work
            assert type(out.grad_fn).__name__ == "_RationalSplineBackward"
        results.append((out, logd, torch.autograd.grad(loss(out, logd), leaves)))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", *sorted(ADVERSARIAL)])
def test_fused_forward_matches_the_plain_version(case, dtype):
    """Values and every gradient of the hand-written backward against autograd's walk."""
    if case == "random":
        w, h, d = (2 * p for p in params(1, seed=3, dtype=dtype))
    else:
        w, h, d = (p[None].to(dtype) for p in ADVERSARIAL[case])
    knots = _knots(w.double(), B, 1e-3)[0].flatten()
    value = awkward_points(knots)
    value = value[value.abs() < 1e3].to(dtype).reshape(-1, 1)  # keep the loss finite
    n = value.shape[0]
    w, h, d = (t.expand(n, 1, t.shape[-1]).contiguous() for t in (w, h, d))
    (out, logd, grads), (out_ref, logd_ref, grads_ref) = fused_and_plain(value, w, h, d)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(logd, logd_ref, **tol)
    # gradients relative to the largest: 1e-5 in float64 too, because the plain version
    # takes the last bin's width as B - x_{K-1}, which cancels when one bin holds nearly
    # all the width (off by 1e-6 relative at a knot of the "all_at_once" case)
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-5
    for name, g, g_ref in zip(
        ("value", "widths", "heights", "derivatives"), grads, grads_ref, strict=True
    ):
        scale = g_ref.abs().max().clamp_min(1.0)
        assert (g - g_ref).abs().max() <= grad_rtol * scale, name


def test_fused_forward_passes_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(1)
    value = torch.cat([3 * torch.randn(10, generator=gen), torch.tensor([4.9, -4.9, 7.0, -6.0])])
    value = value.double().reshape(7, 2).requires_grad_()
    w, h, d = (
        torch.randn(7, 2, k, generator=gen, dtype=torch.float64).requires_grad_()
        for k in (K, K, K - 1)
    )

    def f(*args):
        return rational_quadratic_spline(*args, B, False)

    assert torch.autograd.gradcheck(f, (value, w, h, d))
    assert torch.autograd.gradgradcheck(f, (value, w, h, d))  # through the plain version


@pytest.mark.parametrize("used", ["out", "logd"])
def test_fused_forward_with_one_output_unused(used):
    w, h, d = (t.expand(50, 2, t.shape[-1]) for t in params(1, seed=4))
    value = torch.linspace(-6, 6, 100, dtype=torch.float64).reshape(50, 2)

    def loss(out, logd):
        return (out if used == "out" else logd).exp().sum()

    (*_, grads), (*_, grads_ref) = fused_and_plain(value, w, h, d, loss)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


def test_fused_forward_double_backward_when_the_parameters_depend_on_the_value():
    """As in a MAF-form layer: the widths are computed from the very value they bend."""
    x = torch.tensor([[0.3], [-1.2], [2.2]], dtype=torch.float64, requires_grad=True)
    h = torch.zeros(3, 1, K, dtype=torch.float64)
    d = torch.full((3, 1, K - 1), 0.5, dtype=torch.float64)
    grads = {}
    for fn in (rational_quadratic_spline, _spline_autograd):
        for create_graph in (False, True):
            w = x.unsqueeze(-1) * torch.linspace(-1, 1, K, dtype=torch.float64)
            out, logd = fn(x, w, h, d, B, False)
            (g,) = torch.autograd.grad((logd + out.sin()).sum(), x, create_graph=create_graph)
            grads[fn.__name__, create_graph] = g.detach()
    for g in grads.values():
        torch.testing.assert_close(g, grads["_spline_autograd", False])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("autoregressive", ["maf", "iaf", False])
def test_nsf_hessian_and_function_transforms_match_the_plain_version(autoregressive, monkeypatch):
    torch.manual_seed(0)
    flow = pyroflows.nsf(3, transforms=2, hidden=(8,), autoregressive=autoregressive).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, dtype=torch.float64)

    def log_prob(v):
        return flow().log_prob(v)

    def everything():
        from torch.autograd import forward_ad

        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
            tangent = forward_ad.unpack_dual(log_prob(dual)).tangent
        return (
            torch.autograd.functional.hessian(log_prob, x),
            torch.func.jacrev(log_prob)(x).detach(),
            tangent.detach(),
        )

    fused = everything()
    monkeypatch.setattr(spline_module, "_fused_applies", lambda *args: False)
    plain = everything()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[2], fused[1] @ torch.tensor([1.0, -2.0, 0.5]).double())


raw = st.floats(-6.0, 6.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    w=st.lists(raw, min_size=K, max_size=K),
    h=st.lists(raw, min_size=K, max_size=K),
    d=st.lists(raw, min_size=K - 1, max_size=K - 1),
    a=st.floats(-12.0, 12.0),
    b=st.floats(-12.0, 12.0),
)
def test_hypothesis_monotone_and_round_trip(w, h, d, a, b):
    w, h, d = (torch.tensor([p], dtype=torch.float64) for p in (w, h, d))
    u = torch.tensor([a, b], dtype=torch.float64)
    x = spline(u, w, h, d)[0].flatten()
    if b - a > 1e-6:  # apart by more than the float64 resolution of a flat bin
        assert x[0] < x[1]
    elif a - b > 1e-6:
        assert x[0] > x[1]
    back = spline(x, w, h, d, inverse=True)[0].flatten()
    torch.testing.assert_close(back, u, atol=1e-9, rtol=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    w=st.lists(raw, min_size=K, max_size=K),
    h=st.lists(raw, min_size=K, max_size=K),
    d=st.lists(raw, min_size=K - 1, max_size=K - 1),
    y=st.floats(-12.0, 12.0),
)
def test_hypothesis_inverse_then_forward(w, h, d, y):
    w, h, d = (torch.tensor([p], dtype=torch.float64) for p in (w, h, d))
    x = torch.tensor([y], dtype=torch.float64)
    u = spline(x, w, h, d, inverse=True)[0]
    torch.testing.assert_close(spline(u, w, h, d)[0].flatten(), x, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bins": 0}, ValueError, r"bins must be an int >= 2, got 0$"),  # no word of one bin
        ({"bins": 2.5}, TypeError, "bins must be an int"),
        ({"bound": 0.0}, ValueError, "bound must be a positive finite number"),
        ({"bound": "5"}, ValueError, "bound must be a positive finite number"),
        ({"side": "up"}, ValueError, "side must be one of 'base', 'data' or None"),
    ],
)
@pytest.mark.parametrize("cls", [SplineCoupling, SplineAutoregressive])
def test_bad_layer_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(4, **kwargs)


def test_nsf_builder_forms():
    for autoregressive, expected in [(False, SplineCoupling), ("maf", SplineAutoregressive)]:
        flow = pyroflows.nsf(3, transforms=2, hidden=(16,), autoregressive=autoregressive)
        assert any(isinstance(t, expected) for t in flow.transforms)
    flow = pyroflows.nsf(3, transforms=2, hidden=(16,), autoregressive=True)
    assert all(t.form == "maf" for t in flow.transforms)
    flow = pyroflows.nsf(3, transforms=2, hidden=(16,), autoregressive="iaf")
    assert all(t.form == "iaf" for t in flow.transforms)
    with pytest.raises(ValueError, match="autoregressive must be one of"):
        pyroflows.nsf(3, autoregressive="yes")


def test_data_side_map_is_the_inverse_of_the_base_side_map():
    from pyroflows.transforms import RationalQuadratic

    torch.manual_seed(0)
    params = torch.randn(50, 4, 3 * 5 - 1, dtype=torch.float64)
    u = torch.randn(50, 4, dtype=torch.float64) * 1.5
    base = RationalQuadratic(5, 2.0, side="base")
    data = RationalQuadratic(5, 2.0, side="data")
    x, ladj = data.forward(u, params)
    x_base, ladj_base = base.inverse(u, params)
    torch.testing.assert_close(x, x_base)
    torch.testing.assert_close(ladj, -ladj_base)  # log dx/du = -log du/dx
    u_back, ladj_back = data.inverse(x, params)
    torch.testing.assert_close(u_back, u)
    torch.testing.assert_close(ladj_back, ladj)


def test_data_side_coupling_is_the_inverse_of_the_base_side_coupling():
    # same weights; the conditioner reads the pass-through half, equal on both sides.
    # float64: each side's log-det is taken where its spline is in closed form (the data
    # side's at x, the base side's at the point given as its u), so the two agree to the
    # precision of the quadratic solve, not bit for bit
    torch.manual_seed(0)
    base = SplineCoupling(4, bins=5, bound=2.0, hidden=(16,), side="base").double()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.5)
    data = SplineCoupling(4, bins=5, bound=2.0, hidden=(16,), side="data").double()
    data.load_state_dict(base.state_dict())
    u = torch.randn(50, 4, dtype=torch.float64) * 1.5
    x = data(u)
    x_base = base.inv(u.clone())
    torch.testing.assert_close(x, x_base, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        data.log_abs_det_jacobian(u, x), -base.log_abs_det_jacobian(x_base, u.clone())
    )
    assert not torch.allclose(x, u, atol=1e-3)  # the weights made it a real map


def test_nsf_side_defaults_and_choice():
    def sides(flow):
        return {t.transformer.side for t in flow.transforms if hasattr(t, "transformer")}

    assert sides(pyroflows.nsf(3, transforms=2, hidden=(16,))) == {"data"}
    assert sides(pyroflows.nsf(3, transforms=2, hidden=(16,), autoregressive="maf")) == {"data"}
    assert sides(pyroflows.nsf(3, transforms=2, hidden=(16,), autoregressive="iaf")) == {"base"}
    assert sides(pyroflows.nsf(3, transforms=2, hidden=(16,), side="base")) == {"base"}
    with pytest.raises(ValueError, match="side must be one of"):
        pyroflows.nsf(3, side="x")


def test_rational_quadratic_side_must_be_named():
    from pyroflows.transforms import RationalQuadratic

    with pytest.raises(ValueError, match="side must be 'base' or 'data'"):
        RationalQuadratic(8, 5.0, side=None)


def test_spline_settings_that_cannot_make_a_monotone_map_are_refused():
    with pytest.raises(ValueError, match="bound must be a positive finite number, got inf"):
        pyroflows.nsf(2, bound=float("inf"))
    with pytest.raises(ValueError, match="bins must be at most 999"):
        pyroflows.nsf(2, bins=1500)
    with pytest.raises(ValueError, match="bins must be an int >= 2, got 1: one bin"):
        pyroflows.nsf(2, bins=1)  # it was accepted, and stayed the identity whatever it learnt
    assert pyroflows.nsf(2, bins=999, transforms=1, hidden=(4,)).dim == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_gradient_is_the_reciprocal_slope_at_the_knots_and_the_bound(dtype):
    # Rounding puts the root a hair past 1 just below a height knot (and at x = B): a
    # clamp there gave du/dx = 0 and zero parameter gradients.
    w, h, d = (1.5 * p for p in params(1, seed=1, dtype=dtype))
    knots = _knots(h, B, 1e-3)[0].flatten()[1:]  # the interior height knots and B
    x = torch.nextafter(knots, torch.tensor(-B, dtype=dtype))
    x = torch.cat([x, torch.tensor([B], dtype=dtype)]).requires_grad_(True)
    u, logd = spline(x, w, h.requires_grad_(True), d, inverse=True)
    du_dx, du_dh = torch.autograd.grad(u.sum(), [x, h])
    assert torch.allclose(du_dx, torch.exp(-logd.flatten()), rtol=1e-3)
    assert (du_dh != 0).any()


def test_inverse_gradients_are_finite_where_the_discriminant_rounds_to_zero():
    w, h, d = (p[None].clone().requires_grad_(True) for p in ADVERSARIAL["sharp_bin"])
    x = torch.tensor([4.949995517730713], requires_grad=True)  # disc == 0 in float32
    u, logd = spline(x, w, h, d, inverse=True)
    grads = torch.autograd.grad(u.sum() + logd.sum(), [x, w, h, d], retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    (du_dx,) = torch.autograd.grad(u.sum(), [x])
    # the slope changes by 10% within one float32 step of u here: compare with float64's
    x64 = x.detach().double()
    _, logd64 = spline(x64, *(p.detach().double() for p in (w, h, d)), inverse=True)
    assert du_dx.item() == pytest.approx(torch.exp(-logd64).item(), rel=0.05)


@pytest.mark.parametrize("inverse", [False, True])
def test_a_nan_input_leaves_the_other_rows_gradients_finite(inverse):
    w, h, d = (p.clone().requires_grad_(True) for p in params(1, seed=2, dtype=torch.float32))
    value = torch.tensor([float("nan"), 0.3])
    out, logd = spline(value, w, h, d, inverse=inverse)
    assert out[0].isnan()
    (out[1] + logd[1]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (w, h, d))


def test_inverse_second_derivative_matches_finite_differences():
    w, h, d = params(1, seed=0)
    x = torch.tensor([0.3, 1.7, -2.2], dtype=torch.float64, requires_grad=True)

    def du_dx(points, create_graph=False):
        u, _ = spline(points, w, h, d, inverse=True)
        return torch.autograd.grad(u.sum(), points, create_graph=create_graph)[0]

    (second,) = torch.autograd.grad(du_dx(x, create_graph=True).sum(), x)
    step = 1e-5
    plus, minus = (du_dx((x + s).detach().requires_grad_(True)) for s in (step, -step))
    assert torch.allclose(second, (plus - minus) / (2 * step), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_not_turned_into_nan(dtype):
    flow = pyroflows.nsf(2, transforms=1, hidden=(8,)).to(dtype)
    with pytest.raises(TypeError, match="float32 or float64, got torch.b?float16"):
        flow().log_prob(torch.randn(3, 2, dtype=dtype))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"heights": torch.zeros(3, 1, 9)}, ValueError, r"heights must have shape \(3, 1, 8\)"),
        (
            {"derivatives": torch.zeros(3, 1, 8)},
            ValueError,
            r"derivatives must have shape \(3, 1, 7\)",
        ),
        ({"bound": -1.0}, ValueError, "bound must be a positive finite number"),
        ({"widths": torch.zeros(3, 1, 8, dtype=torch.float64)}, TypeError, "widths has dtype"),
        ({"value": torch.zeros(4, 1)}, ValueError, r"must have value's shape and K: \(4, 1, 8\)"),
        # shapes that broadcast but that the spline cannot take
        ({"value": torch.zeros(5, 3, 1)}, ValueError, "must have value's shape and K"),
        ({"widths": torch.zeros(())}, ValueError, "widths must have shape"),
        # past 999 bins the minimum sizes overfill the interval: the knots ran backwards
        (
            {
                "widths": torch.zeros(3, 1, 1000),
                "heights": torch.zeros(3, 1, 1000),
                "derivatives": torch.zeros(3, 1, 999),
            },
            ValueError,
            "widths has 1000 bins .* at most 999 bins",
        ),
        ({"inverse": "no"}, TypeError, "inverse must be True or False, got 'no'"),
        ({"bound": True}, ValueError, "bound must be a positive finite number, got True"),
        (
            {
                "value": torch.zeros(3, 1, dtype=torch.long),
                "widths": torch.zeros(3, 1, 8, dtype=torch.long),
                "heights": torch.zeros(3, 1, 8, dtype=torch.long),
                "derivatives": torch.zeros(3, 1, 7, dtype=torch.long),
            },
            TypeError,
            r"value must be a floating-point tensor .* got torch.int64",
        ),
    ],
)
def test_the_spline_function_checks_its_arguments(change, error, message):
    args = {
        "value": torch.tensor([[4.9999], [5.0], [5.0001]]),
        "widths": torch.zeros(3, 1, 8),
        "heights": torch.zeros(3, 1, 8),
        "derivatives": torch.zeros(3, 1, 7),
        "bound": 5.0,
    }
    with pytest.raises(error, match=message):
        rational_quadratic_spline(**{**args, **change})


@pytest.mark.parametrize("layer", ["coupling", "maf", "iaf"])
def test_a_base_side_splines_log_det_off_the_cache_is_taken_at_u(layer):
    # where the spline is nearly flat, a float32 x pins down u only roughly: the log-det
    # of a given (u, x) must be the spline's at u, as the Jacobian at u says
    torch.manual_seed(0)
    if layer == "coupling":
        t = SplineCoupling(2, hidden=(8,), side="base")
    else:
        t = SplineAutoregressive(2, form=layer, hidden=(8,), side="base")
    with torch.no_grad():
        bias = t.conditioner.output_layer.bias
        bias.copy_(torch.randn(bias.shape) * 4)
    u = torch.linspace(-4.9, 4.9, 401)
    u = torch.stack([torch.zeros_like(u), u], -1)
    with torch.no_grad():
        x = t(u)
    t.clear_cache()
    ladj = t.log_abs_det_jacobian(u, x)
    # the reference in float64 (a float32 Jacobian is itself off by ~4e-4 here, where the
    # log-det reaches 26); the old log-det, taken at the u that x gives back, was off by 0.13
    t64 = copy.deepcopy(t).double()
    jacobians = torch.func.vmap(torch.func.jacrev(lambda v: t64._forward(v, None)[0]))(u.double())
    expected = torch.linalg.slogdet(jacobians)[1]
    torch.testing.assert_close(ladj.double(), expected, atol=1e-4, rtol=1e-5)


def test_a_zero_d_tensor_bound_is_a_number_bound():
    torch.manual_seed(0)
    a = pyroflows.nsf(2, transforms=1, hidden=(8,), bound=torch.tensor(3.0))
    torch.manual_seed(0)
    b = pyroflows.nsf(2, transforms=1, hidden=(8,), bound=3.0)
    x = torch.randn(5, 2)
    assert torch.equal(a().log_prob(x), b().log_prob(x))
    with pytest.raises(ValueError, match="bound must be a positive finite number"):
        pyroflows.nsf(2, bound=torch.tensor([3.0, 4.0]))


def test_the_layers_take_the_bound_the_function_takes():
    from pyroflows.transforms import RationalQuadratic

    assert RationalQuadratic(8, torch.tensor(5)).bound == 5.0  # a 0-d integer tensor
    for bad in (True, "5", float("nan")):
        with pytest.raises(ValueError, match="bound must be a positive finite number"):
            RationalQuadratic(8, bad)
