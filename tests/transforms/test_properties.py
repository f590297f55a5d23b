"""Properties every transform must have, run over the registry in ``registry.py``.

For each layer, in float32 and float64, batch shapes (), (7,), (3, 5), dims 1, 2, 5, 16
(coupling layers from 2), with a context for conditional twins:
shapes; log|det J| against the autograd Jacobian; inverse round trips on fresh tensors
(so the cache cannot hide a broken inverse); the cache itself; finite gradients reaching
every parameter; identity at initialisation; pickling.
"""

from __future__ import annotations

import math
import pickle

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule

from pyroflows.transforms import (
    AffineAutoregressive,
    AffineCoupling,
    ConditionalAffineAutoregressive,
    ConditionalAffineCoupling,
)
from tests.helpers import batched_jacobian, perturb
from tests.transforms.registry import CONTEXT, TRANSFORMS

DTYPES = [torch.float32, torch.float64]
BATCHES = [(), (7,), (3, 5)]
DIMS = [1, 2, 5, 16]

CASES = [
    pytest.param(name, dim, id=f"{name}-d{dim}")
    for name, entry in TRANSFORMS.items()
    for dim in DIMS
    if dim >= entry.min_dim
]


def round_trip_tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-10


class Case:
    """A perturbed layer, a context and a base-side input of the requested shape."""

    def __init__(self, name, dim, dtype, batch, seed=0):
        self.name, self.entry = name, TRANSFORMS[name]
        self.dim, self.dtype, self.batch = dim, dtype, batch
        torch.manual_seed(seed)
        self.layer = perturb(self.entry.build(dim), seed=seed).to(dtype)
        gen = torch.Generator().manual_seed(seed + 1)
        self.u = torch.randn(*batch, dim, generator=gen, dtype=torch.float64).to(dtype)
        self.context = (
            torch.randn(*batch, CONTEXT, generator=gen, dtype=torch.float64).to(dtype)
            if self.entry.conditional
            else None
        )

    def bound(self):
        """A plain transform: the layer itself, or the layer conditioned on the context."""
        if self.entry.conditional:
            return self.layer.condition(self.context)
        return self.layer


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(params=BATCHES, ids=["unbatched", "b7", "b3x5"])
def batch(request):
    return request.param


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_is_a_pyro_transform_module(name, dim):
    layer = TRANSFORMS[name].build(dim)
    expected = ConditionalTransformModule if TRANSFORMS[name].conditional else TransformModule
    assert isinstance(layer, expected)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_shapes_and_dtype(name, dim, dtype, batch):
    case = Case(name, dim, dtype, batch)
    t = case.bound()
    x = t(case.u)
    assert x.shape == case.u.shape
    assert x.dtype == dtype
    assert t.log_abs_det_jacobian(case.u, x).shape == batch
    u = t.inv(x.clone())
    assert u.shape == x.shape
    assert t.forward_shape(case.u.shape) == case.u.shape


@pytest.mark.parametrize(
    ("build", "moved"),
    [
        (lambda: AffineCoupling(4), 2),
        (lambda: AffineAutoregressive(4), 4),
        (lambda: AffineAutoregressive(4, form="maf"), 4),
        (lambda: ConditionalAffineCoupling(4, 2), 2),
        (lambda: ConditionalAffineAutoregressive(4, 2), 4),
    ],
)
def test_affine_layers_clamp_each_log_scale_at_3_by_default(build, moved):
    # every weight and bias 100: each coordinate's raw log scale is about +-1e4 (+-100
    # where the ReLUs are off), and the default soft clamp, 3 tanh(s / 3), holds it at 3
    layer = build()
    u = torch.randn(5, 4)
    for value in (100.0, -100.0):
        with torch.no_grad():
            for p in layer.parameters():
                p.fill_(value)
        t = layer.condition(torch.ones(5, 2)) if hasattr(layer, "condition") else layer
        ladj = t.log_abs_det_jacobian(u, t(u))
        torch.testing.assert_close(ladj, torch.full((5,), 3.0 * moved * math.copysign(1, value)))


CONDITIONAL_CASES = [c for c in CASES if TRANSFORMS[c.values[0]].conditional]


@pytest.mark.parametrize(("name", "dim"), CONDITIONAL_CASES)
def test_a_base_without_the_contexts_batch_shape_takes_it(name, dim):
    # Pyro's ConditionalTransformedDistribution(base, [t]).condition(context) with a base
    # of one event: the context's batch shape is the distribution's, as its draws' are
    case = Case(name, dim, torch.float64, (3, 5))
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    d = dist.ConditionalTransformedDistribution(base, [case.layer]).condition(case.context)
    assert d.batch_shape == (3, 5)
    x = d.sample((7,))
    assert x.shape == (7, 3, 5, dim)
    assert d.log_prob(x).shape == (7, 3, 5)
    assert d.to_event(2).log_prob(x).shape == (7,)
    expanded = dist.TransformedDistribution(base.expand((3, 5)), [case.bound()])
    assert torch.allclose(d.log_prob(x), expanded.log_prob(x), atol=1e-10)
    t = case.bound()
    assert t.forward_shape((dim,)) == t.inverse_shape((dim,)) == (3, 5, dim)
    assert t.forward_shape((7, 1, 5, dim)) == (7, 3, 5, dim)
    with pytest.raises(ValueError, match="does not broadcast with the context's"):
        t.forward_shape((4, dim))


@pytest.mark.parametrize(("name", "dim"), [c for c in CASES if c.values[1] == 5])
def test_log_abs_det_of_the_wrong_width_is_refused(name, dim):
    # t(u) and t.inv(x) refused a wrong last dim, log_abs_det_jacobian did not: a width
    # under dim gave a log-det of some shape unsaid, a width over it torch's broadcast error
    t = Case(name, dim, torch.float32, (3,)).bound()
    for width in (dim - 2, dim + 1):
        wrong = torch.randn(3, width)
        with pytest.raises(ValueError, match=rf"u must have shape \(\*batch, {dim}\)"):
            t.log_abs_det_jacobian(wrong, wrong.clone())


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_log_abs_det_matches_autograd(name, dim, dtype, batch):
    case = Case(name, dim, dtype, batch)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-9, "rtol": 1e-9}

    def autograd_log_det(u):
        sign, log_det = torch.linalg.slogdet(batched_jacobian(lambda v: case.bound()(v), u))
        assert (sign != 0).all()
        return log_det

    # Sampling direction: log|det| returned with t(u) (the cached value).
    t = case.bound()
    x = t(case.u)
    expected = autograd_log_det(case.u.clone())
    torch.testing.assert_close(t.log_abs_det_jacobian(case.u, x).detach(), expected, **tol)
    # Scoring direction, on fresh tensors: a MAF-form layer computes it from x alone.
    # Compared with autograd at the point the inverse returned, so that float32 rounding
    # of an ill-conditioned inverse (a nearly flat spline bin) is not counted as an error.
    x_data = x.detach().clone()
    u_back = case.bound().inv(x_data.clone()).detach()
    expected_back = autograd_log_det(u_back.clone())
    fresh = case.bound().log_abs_det_jacobian(u_back.clone(), x_data.clone())
    torch.testing.assert_close(fresh.detach(), expected_back, **tol)
    inverse = case.bound().inv.log_abs_det_jacobian(x_data.clone(), u_back.clone())
    torch.testing.assert_close(inverse.detach(), -expected_back, **tol)


def conditioning_allowance(case: Case, point: torch.Tensor, of_inverse: bool) -> torch.Tensor:
    """Per batch element: what float rounding alone can cost a round trip through ``point``.

    A map that is nearly flat somewhere (a sharp spline) has an ill-conditioned inverse: x
    is rounded to the dtype before it is inverted, which moves u by up to
    eps * |x| * ||du/dx||. The norm comes from the float64 twin of the layer.
    """
    twin = Case(case.name, case.dim, torch.float64, case.batch)
    twin_point = point.detach().double()
    jac = batched_jacobian(lambda v: twin.bound()(v), twin_point)
    if not of_inverse:
        jac = torch.linalg.inv(jac)
    eps = torch.finfo(case.dtype).eps
    x = twin.bound()(twin_point).detach()
    return 4 * eps * jac.abs().sum(-1).amax(-1) * (x.abs().amax(-1) + 1)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_round_trip_on_fresh_tensors(name, dim, dtype, batch):
    """inv(t(u)) == u within 1e-4 (float32) / 1e-10 (float64) on fresh tensors.

    Where the layer is so sharp that rounding x alone costs more (condition numbers over
    about 10^3 in float32: seen only for perturbed spline layers), the allowance is that
    rounding bound instead, computed from the float64 Jacobian.
    """
    case = Case(name, dim, dtype, batch)
    tol = round_trip_tol(dtype)
    x = case.bound()(case.u)
    u_back = case.bound().inv(x.detach().clone())  # a new tensor: no cache hit possible
    err = (u_back - case.u).abs().amax(-1)
    if (err > tol).any():
        allowed = conditioning_allowance(case, case.u, of_inverse=False).clamp_min(tol)
        assert (err.double() <= allowed).all(), (err, allowed)
    # and the other way: data side first
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(*batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    u0 = case.bound().inv(x0)
    x_back = case.bound()(u0.detach().clone())
    err = (x_back - x0).abs().amax(-1)
    if (err > tol).any():
        allowed = conditioning_allowance(case, u0, of_inverse=True).clamp_min(tol)
        assert (err.double() <= allowed).all(), (err, allowed)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_cache_returns_the_pair_it_computed(name, dim):
    case = Case(name, dim, torch.float32, (4,))
    t = case.bound()
    x = t(case.u)
    if getattr(t, "_use_cache", False):
        assert t.inv(x) is case.u  # its own output: the cached pair
        # the input it was last given, once its output was scored: the same output
        # (ComposeTransform's log-det re-applies the layer); changed in place: afresh
        assert t(case.u) is x
        u = case.u.detach().clone()
        x_u = t(u)
        assert t(u) is not x_u  # not scored: a base draw pushed through again
        t.inv(x_u)
        u.mul_(1.5)
        again = t(u)
        assert again is not x_u
        torch.testing.assert_close(again, t(u.clone()))
        x_data = torch.randn_like(x)
        u_data = t.inv(x_data)
        assert t(u_data) is x_data  # the other way round
    else:  # a layer without cache still inverts correctly
        torch.testing.assert_close(t.inv(x), case.u)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_gradients_are_finite_and_reach_every_parameter(name, dim, dtype):
    case = Case(name, dim, dtype, (6,))
    if not list(case.layer.parameters()):
        pytest.skip("no parameters")
    t = case.bound()
    x = t(case.u)
    loss = (x**2).sum() + t.log_abs_det_jacobian(case.u, x).sum()
    x_data = torch.randn_like(case.u)
    loss = loss + (case.bound().inv(x_data) ** 2).sum()
    loss.backward()
    # At D = 1 a MADE's input weights and an LU's off-diagonal factors have nothing to do.
    autoregressive = ("iaf", "maf", "spline_iaf", "spline_maf", "spline_iaf_data")
    autoregressive = (*autoregressive, "spline_maf_base", "lu_linear")
    dead_by_design = dim == 1 and name.removeprefix("cond_") in autoregressive
    for pname, p in case.layer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        if not dead_by_design:
            assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_starts_at_identity(name, dim):
    if name.startswith(("permutation", "actnorm")):
        pytest.skip("a permutation is not the identity; ActNorm starts from its data")
    entry = TRANSFORMS[name]
    layer = entry.build(dim)
    u = torch.randn(7, dim)
    context = torch.randn(7, CONTEXT)
    t = layer.condition(context) if entry.conditional else layer
    x = t(u)
    torch.testing.assert_close(x, u)
    torch.testing.assert_close(t.log_abs_det_jacobian(u, x), torch.zeros(7))


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_pickle_round_trip(name, dim):
    case = Case(name, dim, torch.float64, (5,))
    t = case.bound()
    x = t(case.u)  # fill the cache: pickling must drop it, not fail on it
    clone = pickle.loads(pickle.dumps(case.layer))
    bound = clone.condition(case.context) if case.entry.conditional else clone
    torch.testing.assert_close(bound(case.u.clone()), x.detach())
    torch.testing.assert_close(bound.inv(x.detach().clone()), case.u, atol=1e-10, rtol=0)
