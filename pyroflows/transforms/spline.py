r"""Rational-quadratic spline layers (neural spline flows), base ``u`` to data ``x``.

Each coordinate passes through a monotone rational-quadratic spline on
:math:`[-B, B]` with :math:`K` bins, and through the identity outside it (linear tails,
slope 1), so every real input is valid. In bin :math:`k`, with knots
:math:`(x_k, y_k)`, width :math:`w_k`, height :math:`h_k`, slope :math:`s_k = h_k / w_k`,
knot derivatives :math:`d_k, d_{k+1}` and :math:`\xi = (u - x_k) / w_k \in [0, 1]`:

.. math::
    x = y_k + \frac{h_k\,[s_k \xi^2 + d_k \xi (1 - \xi)]}
                   {s_k + (d_{k+1} + d_k - 2 s_k)\, \xi (1 - \xi)}, \qquad
    \frac{dx}{du} = \frac{s_k^2\,[d_{k+1} \xi^2 + 2 s_k \xi (1 - \xi) + d_k (1 - \xi)^2]}
                         {[s_k + (d_{k+1} + d_k - 2 s_k)\, \xi (1 - \xi)]^2}

The inverse solves a quadratic :math:`a \xi^2 + b \xi + c = 0` for :math:`\xi` in the bin
found on the data side, in a cancellation-free form (Numerical Recipes' choice between
:math:`c/q` and :math:`q/a` with :math:`q = -\tfrac12 (b + \operatorname{sign}(b)
\sqrt{b^2 - 4ac})`). Forward, inverse and the log-derivative are one vectorised pass
over a batch.

The layers reuse the coupling and autoregressive machinery with this spline as the
elementwise map, so their costs are those of the affine layers: coupling, one pass in
each direction; IAF form, one pass to sample and ``D`` to invert (its own samples are
scored from the cache); MAF form, one pass to score and ``D`` to sample.

Which side the spline's argument lives on is a choice (``side``, see
:class:`RationalQuadratic`): ``"base"``, :math:`x = \mathrm{RQS}(u)`, or ``"data"``,
:math:`u = \mathrm{RQS}(x)`, so that the direction used most evaluates the rational
function and the other solves the quadratic. By default the IAF form takes ``"base"``
(it samples) and the MAF form and coupling layers take ``"data"`` (they score data).

References:
    Durkan, Bekasov, Murray, Papamakarios (2019). Neural Spline Flows. arXiv:1906.04032.
    Gregory, Delbourgo (1982). Piecewise rational quadratic interpolation to monotonic
    data. IMA Journal of Numerical Analysis 2(2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyroflows._checks import HALF_DTYPES, check_bool, check_number, check_positive_int
from pyroflows._torch_modes import forward_ad_active, functorch_active
from pyroflows.transforms.autoregressive import _Autoregressive
from pyroflows.transforms.base import ConditionalFlowTransform, FlowTransform
from pyroflows.transforms.coupling import _Coupling

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
#: the most bins a spline takes: each keeps its minimum width and height, so past this
#: the minimums alone overfill the interval and the knots run backwards
MAX_BINS = math.ceil(1 / max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT)) - 1
_MAX_BINS_REASON = (
    f"a spline takes at most {MAX_BINS} bins, as each keeps a minimum width and height of "
    f"{MIN_BIN_WIDTH} of the interval"
)


def _softmax(raw: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension.

    Written out because torch's CPU kernel is slow for a last dimension of a few bins
    (1.7 ms against 0.3 ms for 512 x 32 x 8); the shift by the maximum is detached, as
    softmax does not depend on it.
    """
    e = torch.exp(raw - raw.amax(-1, keepdim=True).detach())
    return e / e.sum(-1, keepdim=True)


def _knots(raw: torch.Tensor, bound: float, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions on ``[-B, B]`` and bin sizes, each bin at least ``minimum`` of the span."""
    knots, _ = _knots_and_softmax(raw, bound, minimum)
    return knots, knots[..., 1:] - knots[..., :-1]


def _knots_and_softmax(
    raw: torch.Tensor, bound: float, minimum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions on ``[-B, B]`` and the softmax of ``raw`` they came from.

    Each bin is at least ``minimum`` of the span; the ends are exactly ``-B`` and ``B``.
    """
    bins = raw.shape[-1]
    soft = _softmax(raw)
    sizes = minimum + (1 - minimum * bins) * soft
    inner = 2 * bound * torch.cumsum(sizes[..., :-1], dim=-1) - bound
    edge = inner.new_full((*inner.shape[:-1], 1), bound)
    return torch.cat([-edge, inner, edge], dim=-1), soft


# softplus(raw + _DERIVATIVE_SHIFT) + MIN_DERIVATIVE == 1 at raw == 0: identity at init.
_DERIVATIVE_SHIFT = math.log(math.expm1(1 - MIN_DERIVATIVE))


def _bin_index(knots: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Index ``k`` of the bin ``[knots_k, knots_{k+1}]`` holding each (clamped) value."""
    interior = knots[..., 1:-1]
    return (value[..., None] >= interior).sum(-1, keepdim=True)


def rational_quadratic_spline(
    value: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float = 5.0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Monotone rational-quadratic spline on :math:`[-B, B]`, identity outside.

    The unconstrained parameters become bins and knot derivatives by
    :math:`w = m + (1 - mK)\,\mathrm{softmax}(\tilde w)` (widths and heights, each at least
    ``1e-3`` of the span) and :math:`d = m + \mathrm{softplus}(\tilde d + c)` with
    :math:`c` such that :math:`\tilde d = 0` gives :math:`d = 1`; the two outer knot
    derivatives are 1 to meet the linear tails. All-zero parameters give the identity.

    The inverse solves the bin's quadratic for its root in the stable form, with the
    coefficients in float64 for float32 inputs (they cancel in single precision in sharp
    bins), differentiably to any order.

    Args:
        value: ``u`` (forward) or ``x`` (``inverse=True``), shape ``(*batch, D)``.
        widths: unnormalised bin widths, shape ``(*batch, D, K)``.
        heights: unnormalised bin heights, shape ``(*batch, D, K)``.
        derivatives: unconstrained interior knot derivatives, shape ``(*batch, D, K - 1)``.
        bound: half-width :math:`B` of the interval that the spline covers.
        inverse: map ``x`` to ``u`` instead of ``u`` to ``x``.

    Returns:
        ``(output, log_derivative)``, both of shape ``(*batch, D)``; the log-derivative is
        :math:`\log dx/du` of the *forward* map at the pair, in both directions.

    Example:
        >>> u = torch.linspace(-6.0, 6.0, 5)
        >>> p = torch.zeros(5, 8)
        >>> x, logd = rational_quadratic_spline(u, p, p, p[:, :7])
        >>> torch.allclose(x, u), torch.allclose(logd, torch.zeros(5), atol=1e-6)
        (True, True)
    """
    tensors = {"value": value, "widths": widths, "heights": heights, "derivatives": derivatives}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float32 or float64), got "
                f"{tensor.dtype}; no silent cast is made"
            )
        if tensor.dtype != value.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but value has {value.dtype}; no silent cast "
                f"is made: pass them in one dtype"
            )
    if widths.dim() == 0 or widths.shape[-1] < 1:
        raise ValueError(
            f"widths must have shape (*batch, D, K), K >= 1, got {tuple(widths.shape)}"
        )
    k = widths.shape[-1]
    if k > MAX_BINS:
        raise ValueError(f"widths has {k} bins (its last dim): {_MAX_BINS_REASON}")
    for name, tensor, size in (("heights", heights, k), ("derivatives", derivatives, k - 1)):
        if tuple(tensor.shape) != (*widths.shape[:-1], size):
            raise ValueError(
                f"{name} must have shape {(*widths.shape[:-1], size)} (widths' batch, "
                f"{'K' if size == k else 'K - 1'} = {size} for K = {k} bins), got "
                f"{tuple(tensor.shape)}"
            )
    if tuple(widths.shape[:-1]) != tuple(value.shape):
        raise ValueError(
            f"widths, heights and derivatives must have value's shape and K: "
            f"{(*value.shape, k)} for value of shape {tuple(value.shape)}, got widths of "
            f"shape {tuple(widths.shape)}"
        )
    bound = _check_bound(bound)
    inverse = check_bool(inverse, "inverse")
    return _spline(value, widths, heights, derivatives, bound, inverse)


def _check_bound(bound: object) -> float:
    """``bound`` as a positive finite float (a real or a 0-d real tensor), else ``ValueError``."""
    try:
        return check_number(bound, "bound", 0.0)
    except (TypeError, ValueError):
        raise ValueError(
            f"bound must be a positive finite number, got {bound!r} ({type(bound).__name__}): "
            "the half-width of the interval the spline covers"
        ) from None


def _spline(value, widths, heights, derivatives, bound: float, inverse: bool):
    """:func:`rational_quadratic_spline` without its argument checks (the layers' call)."""
    if value.dtype in HALF_DTYPES:
        raise TypeError(
            f"the spline needs float32 or float64, got {value.dtype}: its smallest bins "
            f"(1e-3 of the interval) are below half precision's resolution, so it gives "
            f"NaN and inf"
        )
    if inverse or not _fused_applies(value, widths, heights, derivatives):
        return _spline_autograd(value, widths, heights, derivatives, bound, inverse)
    return _RationalSpline.apply(value, widths, heights, derivatives, float(bound))


def _fused_applies(*tensors: torch.Tensor) -> bool:
    """Whether the fused forward can take these: plain tensors of one dtype, reverse mode.

    That is every call the layers make in training. A tensor subclass, mixed dtypes,
    forward-mode AD (inside ``forward_ad.dual_level``) and ``torch.func`` transforms
    (``vmap``, ``jacrev``, ``grad``...) take the plain version, which torch differentiates
    as it would any other code.
    """
    if forward_ad_active() or functorch_active():
        return False
    first = tensors[0]
    return all(type(t) is torch.Tensor and t.dtype == first.dtype for t in tensors)


def _spline_autograd(
    value: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline in plain differentiable torch operations (see the public function).

    Used for the inverse direction, for higher derivatives of the forward one, and as
    the reference the fused forward is tested against.
    """
    x_knots, w = _knots(widths, bound, MIN_BIN_WIDTH)
    y_knots, h = _knots(heights, bound, MIN_BIN_HEIGHT)
    d = MIN_DERIVATIVE + F.softplus(derivatives + _DERIVATIVE_SHIFT)
    d = F.pad(d, (1, 1), value=1.0)

    inside = (value >= -bound) & (value <= bound)
    # outside (and NaN): 0, not the value, so no NaN reaches the gradients of masked rows
    v = torch.where(inside, value, 0.0)
    k = _bin_index(y_knots if inverse else x_knots, v)

    def at(t: torch.Tensor, idx: torch.Tensor = k) -> torch.Tensor:
        return t.gather(-1, idx).squeeze(-1)

    x_k, w_k, y_k, h_k = at(x_knots), at(w), at(y_knots), at(h)
    d_k, d_k1 = at(d), at(d, k + 1)
    s_k = h_k / w_k
    curvature = d_k1 + d_k - 2 * s_k

    if inverse:
        # a, b and c cancel in single precision for sharp bins: form them in double
        wide = torch.float64 if v.dtype == torch.float32 else v.dtype
        h64, s64, d64, c64 = (t.to(wide) for t in (h_k, s_k, d_k, curvature))
        dy = v.to(wide) - y_k.to(wide)
        a = h64 * (s64 - d64) + dy * c64
        b = h64 * d64 - dy * c64
        c = -s64 * dy
        # The root in [0, 1], without cancellation whatever the sign of b: with
        # q = -(b + sign(b) sqrt(b^2 - 4ac)) / 2 it is c / q for b >= 0, q / a for b < 0.
        # (b^2 - 4ac > 0 for a monotone spline; the floor only keeps a rounded 0 from
        # giving the square root an infinite derivative.)
        sqrt_disc = (b * b - 4 * a * c).clamp_min(torch.finfo(wide).tiny).sqrt()
        positive = b >= 0
        q = -0.5 * (b + torch.where(positive, sqrt_disc, -sqrt_disc))
        one = torch.ones_like(q)
        xi = torch.where(
            positive, c / torch.where(positive, q, one), q / torch.where(positive, one, a)
        )
        # in the bin, keeping the gradient: rounding puts the root a hair past 1 just
        # below a knot, where a plain clamp gave du/dx = 0
        xi = (xi + (xi.clamp(0.0, 1.0) - xi).detach()).to(v.dtype)
        out = xi * w_k + x_k
    else:
        xi = (v - x_k) / w_k
        out = y_k + h_k * (s_k * xi * xi + d_k * xi * (1 - xi)) / (s_k + curvature * xi * (1 - xi))

    one_minus = 1 - xi
    numerator = d_k1 * xi * xi + 2 * s_k * xi * one_minus + d_k * one_minus * one_minus
    denominator = s_k + curvature * xi * one_minus
    # one log of the derivative (s, numerator and denominator are all positive and bounded
    # away from 0 and inf by the minimum bin sizes and derivatives)
    log_derivative = torch.log(s_k * s_k * numerator / (denominator * denominator))

    out = torch.where(inside, out, value)
    log_derivative = torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
    return out, log_derivative


class _RationalSpline(torch.autograd.Function):
    r"""The forward (rational-function) direction with a hand-written backward.

    The direction every training step takes (scoring data on the data side, sampling on
    the base side). Written out, its backward is a third fewer kernels than autograd's
    walk through the sixty small operations of the forward, about 15% of the spline's
    cost per call (more at small batches, where per-kernel overhead dominates).

    With :math:`\xi = (v - x_k)/w`, :math:`s = h/w`, :math:`P = \xi(1 - \xi)`,
    :math:`c = d_k + d_{k+1} - 2s`, :math:`\Delta = s + cP`,
    :math:`N = s\xi^2 + d_k P`, :math:`R = N / \Delta`, :math:`x = y_k + hR`,
    :math:`M = d_{k+1}\xi^2 + 2sP + d_k(1-\xi)^2` and
    :math:`L = \log x' = 2\log s + \log M - 2\log\Delta`, the partial derivatives are

    .. math::
        \partial_\xi x = w\,x', \quad
        \partial_s R = (\xi^2 - R(1 - 2P))/\Delta, \quad
        \partial_{d_k} R = P(1 - R)/\Delta, \quad
        \partial_{d_{k+1}} R = -PR/\Delta,

        \partial_\xi L = \frac{2(d_{k+1}\xi + s(1-2\xi) - d_k(1-\xi))}{M}
            - \frac{2c(1-2\xi)}{\Delta}, \quad
        \partial_s L = \frac{2}{s} + \frac{2P}{M} - \frac{2(1-2P)}{\Delta},

        \partial_{d_k} L = \frac{(1-\xi)^2}{M} - \frac{2P}{\Delta}, \quad
        \partial_{d_{k+1}} L = \frac{\xi^2}{M} - \frac{2P}{\Delta},

    chained through :math:`\xi(v, x_k, w)`, :math:`s(h, w)`, the knots
    :math:`x_k = -B + 2B\sum_{j<k} W_j`, :math:`w = 2B\,W_k` (:math:`W` the bin sizes
    after the softmax; the last bin's width, computed as :math:`B - x_{K-1}`, has the same
    gradient because :math:`\sum_j W_j = 1`), the softmax and the softplus. Outside
    :math:`[-B, B]` the map is the identity: :math:`\partial x/\partial v = 1`, nothing
    else. Under ``create_graph=True`` the backward differentiates
    :func:`_spline_autograd` instead, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, value, widths, heights, derivatives, bound):  # noqa: D102
        x_knots, soft_w = _knots_and_softmax(widths, bound, MIN_BIN_WIDTH)
        y_knots, soft_h = _knots_and_softmax(heights, bound, MIN_BIN_HEIGHT)
        d = F.softplus(derivatives + _DERIVATIVE_SHIFT).add_(MIN_DERIVATIVE)
        d = F.pad(d, (1, 1), value=1.0)

        inside = (value >= -bound) & (value <= bound)
        v = torch.where(inside, value, 0.0)  # outside and NaN: finite, masked below
        k = _bin_index(x_knots, v)
        pair = torch.cat([k, k + 1], dim=-1)
        x_k, x_k1 = x_knots.gather(-1, pair).unbind(-1)
        y_k, y_k1 = y_knots.gather(-1, pair).unbind(-1)
        d_k, d_k1 = d.gather(-1, pair).unbind(-1)
        w, h = x_k1 - x_k, y_k1 - y_k
        s = h / w
        xi = (v - x_k) / w
        one_minus = 1 - xi
        p = xi * one_minus
        curvature = d_k1 + d_k - 2 * s
        inv_den = (s + curvature * p).reciprocal_()
        xi2 = xi * xi
        # no addcmul: its vectorised body fuses the multiply-add and its scalar tail does
        # not, so a row's value would depend on its position in the batch
        r = (s * xi2 + d_k * p).mul_(inv_den)
        out = torch.where(inside, y_k + h * r, value)
        m = d_k1 * xi2 + 2 * s * p + d_k * one_minus * one_minus
        deriv = s * s * m * inv_den * inv_den
        logd = torch.where(inside, deriv.log(), 0.0)

        ctx.bound = bound
        ctx.save_for_backward(
            value, widths, heights, derivatives, inside, k, soft_w, soft_h,
            w, h, s, xi, d_k, d_k1, curvature, inv_den, r, m, deriv,
        )  # fmt: skip
        return out, logd

    @staticmethod
    def backward(ctx, grad_out, grad_logd):  # noqa: D102
        (value, widths, heights, derivatives, inside, k, soft_w, soft_h,
         w, h, s, xi, d_k, d_k1, curvature, inv_den, r, m, deriv) = ctx.saved_tensors  # fmt: skip
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain version
            inputs = (value, widths, heights, derivatives)
            return _RationalSpline._autograd_backward(ctx, inputs, grad_out, grad_logd)
        zero = w.new_zeros(())
        g_out = grad_out if grad_out is not None else torch.zeros_like(w)
        g_in = torch.where(inside, g_out, zero)  # the spline's share of grad_out
        g_log = torch.where(inside, grad_logd, zero) if grad_logd is not None else None

        one_minus = 1 - xi
        p = xi * one_minus
        g_hr = g_in * h * inv_den  # h dR/d. = h (...) / den
        # in the natural variables xi, s, d_k, d_k1
        g_xi = g_in * w * deriv
        g_s = g_hr * (xi * xi - r * (1 - 2 * p))
        g_dk = g_hr * p * (1 - r)
        g_dk1 = -g_hr * p * r
        if g_log is not None:
            inv_m = m.reciprocal()
            t = one_minus - xi
            q = 2 * p * inv_den
            g_xi = g_xi + 2 * g_log * ((d_k1 * xi + s * t - d_k * one_minus) * inv_m
                                       - curvature * t * inv_den)  # fmt: skip
            g_s = g_s + g_log * (2 / s + 2 * p * inv_m - 2 * (1 - 2 * p) * inv_den)
            g_dk = g_dk + g_log * (one_minus * one_minus * inv_m - q)
            g_dk1 = g_dk1 + g_log * (xi * xi * inv_m - q)
        inv_w = w.reciprocal()
        g_xi_w = g_xi * inv_w
        g_s_w = g_s * inv_w
        grad_value = torch.where(inside, g_xi_w, g_out)
        # the bin's knots and sizes: x_k, w (from the widths) and y_k, h (heights)
        g_xk, g_w = -g_xi_w, -(g_xi_w * xi + g_s_w * s)
        g_yk, g_h = g_in, g_in * r + g_s_w

        bins = soft_w.shape[-1]
        bins_range = torch.arange(bins, device=k.device)
        at_k = (bins_range == k).to(w.dtype)
        below_k = (bins_range < k).to(w.dtype)
        bound = ctx.bound

        def through_softmax(soft, g_size, g_knot, minimum):
            g = g_size.unsqueeze(-1) * at_k + g_knot.unsqueeze(-1) * below_k
            g = g.mul_(2 * bound * (1 - minimum * bins))
            return soft * (g - (g * soft).sum(-1, keepdim=True))

        grad_widths = through_softmax(soft_w, g_w, g_xk, MIN_BIN_WIDTH)
        grad_heights = through_softmax(soft_h, g_h, g_yk, MIN_BIN_HEIGHT)
        # interior derivative j (1..K-1) is d_k when k == j and d_k1 when k + 1 == j
        grad_derivatives = (
            g_dk.unsqueeze(-1) * at_k[..., 1:] + g_dk1.unsqueeze(-1) * at_k[..., :-1]
        ) * torch.sigmoid(derivatives + _DERIVATIVE_SHIFT)
        return grad_value, grad_widths, grad_heights, grad_derivatives, None

    @staticmethod
    def _autograd_backward(ctx, inputs, grad_out, grad_logd):
        with torch.enable_grad():
            # a fresh alias of each input: autograd.grad to the inputs themselves would
            # return total derivatives, counting twice any path by which one input
            # depends on another (MAF: the widths are computed from the value)
            leaves = [
                t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in inputs
            ]
            out, logd = _spline_autograd(*leaves, ctx.bound, False)
            pairs = [(o, g) for o, g in ((out, grad_out), (logd, grad_logd)) if g is not None]
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                leaves,
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
        return (*grads, None)


SIDES = ("base", "data")


def _side(side: str | None, form: str | None) -> str:
    """Resolve a layer's ``side``: ``None`` puts the closed form where the layer is used.

    IAF form: sampling (``"base"``); MAF form and coupling: scoring data (``"data"``).
    """
    if side is None:
        return "base" if form == "iaf" else "data"
    if side not in SIDES:
        raise ValueError(f"side must be one of 'base', 'data' or None, got {side!r}")
    return side


class RationalQuadratic:
    r"""The spline as an elementwise map for the layers: ``3K - 1`` parameters a coordinate.

    ``forward(u, params) -> (x, ladj)`` and ``inverse(x, params) -> (u, ladj)`` with
    ``params`` of shape ``(*batch, D, 3K - 1)`` (widths, heights, interior derivatives)
    and ``ladj`` the summed log-derivative of the forward map, shape ``batch``. See
    :func:`rational_quadratic_spline`.

    ``side`` says which side's coordinate the spline takes as its argument:

    * ``"base"``: :math:`x = \mathrm{RQS}(u)`; sampling evaluates the rational function,
      scoring solves a quadratic per coordinate;
    * ``"data"``: :math:`u = \mathrm{RQS}(x)`, i.e. :math:`x = \mathrm{RQS}^{-1}(u)`;
      scoring evaluates the rational function, sampling solves the quadratic. The knots
      then sit in data coordinates, which fitted held-out densities better (ring of 8
      Gaussians, 4 seeds: 0.004 to 0.006 nats/dim lower NLL) and trains faster.

    Both are monotone bijections, the identity for all-zero parameters and outside
    ``[-bound, bound]``.

    Args:
        bins: number of bins ``K``.
        bound: the spline covers ``[-bound, bound]``; identity outside.
        side: ``"base"`` or ``"data"``, as above.
    """

    #: what a spline pickled before ``side`` existed means
    side: str = "base"

    def __init__(self, bins: int = 8, bound: float = 5.0, side: str = "base") -> None:
        try:
            self.bins = check_positive_int(bins, "bins", minimum=2)
        except ValueError as error:
            if bins != 1:
                raise
            raise ValueError(
                f"{error}: one bin, whose end derivatives are fixed at 1 to meet the linear "
                "tails, can only be the identity"
            ) from None
        if self.bins > MAX_BINS:
            raise ValueError(
                f"bins must be at most {MAX_BINS}, got {self.bins}: {_MAX_BINS_REASON}"
            )
        self.bound = _check_bound(bound)
        if side not in SIDES:
            raise ValueError(f"side must be 'base' or 'data', got {side!r}")
        self.side = side
        self.num_params = 3 * self.bins - 1
        self.params_first = False  # each coordinate's 3K - 1 numbers contiguous

    def _apply(self, value, params, inverse):
        k = self.bins
        widths, heights, derivatives = params.split((k, k, k - 1), dim=-1)  # one cat backward
        # on the data side x = RQS^{-1}(u): the layer's forward map is the spline's
        # inverse, and its log-derivative is minus the spline's at the same pair
        flipped = self.side == "data"
        out, logd = _spline(value, widths, heights, derivatives, self.bound, inverse != flipped)
        ladj = logd.sum(-1)
        return out, (-ladj if flipped else ladj)

    def forward(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, ladj)``."""
        return self._apply(u, params, False)

    def inverse(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, ladj)``."""
        return self._apply(x, params, True)

    def __repr__(self) -> str:
        return f"RationalQuadratic(bins={self.bins}, bound={self.bound}, side={self.side!r})"


class SplineCoupling(_Coupling, FlowTransform):
    r"""Rational-quadratic spline coupling layer, base ``u`` to data ``x``.

    .. math::
        x_{1:k} = u_{1:k}, \qquad x_{k+1:D} = \mathrm{RQS}^{\pm 1}\big(u_{k+1:D};\
        \mathrm{MLP}(u_{1:k})\big)

    with :math:`\mathrm{RQS}` on the base side (``side="base"``:
    :math:`\log|\det J| = \sum_{i>k} \log \mathrm{RQS}'(u_i)`) or its inverse on the data
    side (``side="data"``, the default: :math:`u_i = \mathrm{RQS}(x_i)`,
    :math:`\log|\det J| = -\sum_{i>k} \log \mathrm{RQS}'(x_i)`).

    Cost: one MLP pass for ``t(u)`` and one for ``t.inv(x)``. Starts at the identity.

    Args:
        dim: size of the vector ``D`` (>= 2).
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        bins: number of spline bins ``K``.
        bound: the spline covers ``[-bound, bound]``; identity (linear tails) outside.
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.
        side: where the spline's argument lives: ``"base"`` (:math:`x = \mathrm{RQS}(u)`,
            closed form to sample) or ``"data"`` (:math:`u = \mathrm{RQS}(x)`, closed form
            to score); ``None``: ``"data"``. See :class:`RationalQuadratic`.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; ``log_abs_det_jacobian``: ``batch``.

    Example:
        >>> t = SplineCoupling(4, bins=4, hidden=(16,))
        >>> u = torch.randn(3, 4)
        >>> torch.allclose(t(u), u)  # identity at initialisation
        True

    References:
        Durkan, Bekasov, Murray, Papamakarios (2019). Neural Spline Flows.
        arXiv:1906.04032.
    """

    def __init__(
        self,
        dim: int,
        split: int | None = None,
        bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        side: str | None = None,
    ) -> None:
        super().__init__(dim)
        spline = RationalQuadratic(bins, bound, _side(side, None))
        self._build(spline, split, hidden, 0, activation)


class ConditionalSplineCoupling(_Coupling, ConditionalFlowTransform):
    r"""Spline coupling layer whose spline parameters also read a context ``c``.

    .. math::
        x_{k+1:D} = \mathrm{RQS}^{\pm 1}\big(u_{k+1:D};\ \mathrm{MLP}(u_{1:k}, c)\big)

    (the spline or its inverse by ``side``, as in :class:`SplineCoupling`).

    Args:
        dim: size of the vector ``D`` (>= 2).
        context: size of the context vector.
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        bins: number of spline bins ``K``.
        bound: the spline covers ``[-bound, bound]``.
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.
        side: where the spline's argument lives: ``"base"`` (:math:`x = \mathrm{RQS}(u)`,
            closed form to sample) or ``"data"`` (:math:`u = \mathrm{RQS}(x)`, closed form
            to score); ``None``: ``"data"``. See :class:`RationalQuadratic`.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        split: int | None = None,
        bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        side: str | None = None,
    ) -> None:
        super().__init__(dim, context)
        spline = RationalQuadratic(bins, bound, _side(side, None))
        self._build(spline, split, hidden, self.context_features, activation)


class SplineAutoregressive(_Autoregressive, FlowTransform):
    r"""Rational-quadratic spline autoregressive layer in IAF or MAF form.

    .. math::
        x_i = \mathrm{RQS}^{\pm 1}\big(u_i;\ \mathrm{MADE}(v)_i\big)

    with the spline on the base side (``side="base"``, the IAF form's default:
    :math:`\log|\det J| = \sum_i \log \mathrm{RQS}'(u_i)`) or its inverse on the data side
    (``side="data"``, the MAF form's default: :math:`u_i = \mathrm{RQS}(x_i)`,
    :math:`\log|\det J| = -\sum_i \log \mathrm{RQS}'(x_i)`). The MADE reads
    :math:`v = u` (IAF: one pass to sample, ``D`` to invert, own samples scored from
    the cache) or :math:`v = x` (MAF: one pass to score, ``D`` to sample).

    Args:
        dim: size of the vector ``D``.
        form: ``"iaf"`` (default, as :class:`AffineAutoregressive`) or ``"maf"``.
        bins: number of spline bins ``K``.
        bound: the spline covers ``[-bound, bound]``.
        hidden: hidden layer sizes of the MADE.
        order: autoregressive order, a permutation of ``range(D)``.
        activation: module class for the MADE's non-linearity.
        side: where the spline's argument lives: ``"base"`` (:math:`x = \mathrm{RQS}(u)`,
            closed form to sample) or ``"data"`` (:math:`u = \mathrm{RQS}(x)`, closed form
            to score); ``None``: ``"base"`` for the IAF form, ``"data"`` for the MAF form.
            See :class:`RationalQuadratic`.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; ``log_abs_det_jacobian``: ``batch``.
    """

    def __init__(
        self,
        dim: int,
        form: str = "iaf",
        bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        side: str | None = None,
    ) -> None:
        super().__init__(dim)
        spline = RationalQuadratic(bins, bound, _side(side, form))
        self._build(spline, form, hidden, 0, order, activation)


class ConditionalSplineAutoregressive(_Autoregressive, ConditionalFlowTransform):
    r"""Spline autoregressive layer whose MADE also reads a context ``c``.

    .. math::
        x_i = \mathrm{RQS}^{\pm 1}\big(u_i;\ \mathrm{MADE}(v, c)_i\big)

    (the spline or its inverse by ``side``, as in :class:`SplineAutoregressive`).

    Args:
        dim: size of the vector ``D``.
        context: size of the context vector.
        form: ``"iaf"`` (default, as :class:`AffineAutoregressive`) or ``"maf"``.
        bins: number of spline bins ``K``.
        bound: the spline covers ``[-bound, bound]``.
        hidden: hidden layer sizes of the MADE.
        order: autoregressive order, a permutation of ``range(D)``.
        activation: module class for the MADE's non-linearity.
        side: where the spline's argument lives: ``"base"`` (:math:`x = \mathrm{RQS}(u)`,
            closed form to sample) or ``"data"`` (:math:`u = \mathrm{RQS}(x)`, closed form
            to score); ``None``: ``"base"`` for the IAF form, ``"data"`` for the MAF form.
            See :class:`RationalQuadratic`.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        form: str = "iaf",
        bins: int = 8,
        bound: float = 5.0,
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        side: str | None = None,
    ) -> None:
        super().__init__(dim, context)
        spline = RationalQuadratic(bins, bound, _side(side, form))
        self._build(spline, form, hidden, self.context_features, order, activation)


__all__ = [
    "ConditionalSplineAutoregressive",
    "ConditionalSplineCoupling",
    "RationalQuadratic",
    "SplineAutoregressive",
    "SplineCoupling",
    "rational_quadratic_spline",
]
