r"""Elementwise monotone maps :math:`x_i = \tau(u_i; \theta_i)` inside flow layers.

Coupling and autoregressive layers use them; a conditioner supplies :math:`\theta` of
shape ``(*batch, P, D)`` for the maps here (``params_first``: each parameter a contiguous
slice) or ``(*batch, D, P)`` for maps whose parameters are used per coordinate (splines).

Each map gives ``forward(u, params) -> (x, ladj)`` and ``inverse(x, params) -> (u, ladj)``
where ``ladj`` is :math:`\sum_i \log|\partial x_i / \partial u_i|` (of the forward map,
in both calls), shape ``batch``. All-zero parameters give the identity.
"""

from __future__ import annotations

import math
import numbers

import torch

#: Log-scale clamps of :class:`Affine`: the default, and the one of model files before v3.
CLAMP_KINDS = ("tanh", "rational")


class Affine:
    r"""Affine map with a soft-clamped log-scale.

    .. math::
        x = u \, e^{s} + t, \qquad s = b \tanh(\tilde s / b), \qquad
        \log\left|\frac{\partial x}{\partial u}\right| = s

    The soft clamp keeps each layer's scale inside :math:`(e^{-b}, e^{b})`, so one bad
    batch cannot make ``inf``; it is the identity to first order at 0 (slope 1, and
    within 4% of it up to :math:`|\tilde s| = b/3`). It is computed as
    :math:`s = 2b\,\sigma(2\tilde s / b) - b`, the same function: torch's CPU kernel for
    the logistic :math:`\sigma` costs a quarter of its ``tanh`` kernel, and plain autograd
    of these few operations is cheaper than any hand-written backward in a layer this
    cheap. In float32 that form is exact to about :math:`10^{-6}` absolutely (not
    relatively, near 0), ample for a log-scale. The gradient
    :math:`1 - \tanh^2(\tilde s / b)` fades exponentially once :math:`|\tilde s|` is a few
    times :math:`b`, so a log-scale pushed far past the bound learns slowly.
    ``clamp=None`` turns the clamp off.

    ``clamp_kind="rational"`` gives :math:`s = \tilde s / (1 + |\tilde s| / b)`, the clamp
    of pyroflows before model-file version 3, so that files written then keep their
    meaning; new flows do not need it.

    Args:
        clamp: the bound :math:`b` on the log-scale.
        clamp_kind: ``"tanh"`` (the default) or ``"rational"`` (see above).
    """

    num_params = 2
    params_first = True
    clamp_kind = "rational"  # what an Affine unpickled from before clamp_kind existed meant

    def __init__(self, clamp: float | None = 3.0, clamp_kind: str = "tanh") -> None:
        if clamp is not None and (not isinstance(clamp, numbers.Real) or isinstance(clamp, bool)):
            raise TypeError(
                f"clamp must be a positive finite number (or None for no clamp), got "
                f"{type(clamp).__name__} {clamp!r}"
            )
        if clamp is not None and not 0 < clamp < math.inf:
            raise ValueError(
                f"clamp must be a positive finite number (or None for no clamp), got {clamp!r}"
            )
        if clamp_kind not in CLAMP_KINDS:
            raise ValueError(f"clamp_kind must be 'tanh' or 'rational', got {clamp_kind!r}")
        self.clamp = None if clamp is None else float(clamp)
        self.clamp_kind = clamp_kind

    def _log_scale(self, raw: torch.Tensor, sign: float) -> torch.Tensor:
        """``sign * s``: the clamped log-scale, negated for ``sign=-1`` at no extra cost."""
        b = self.clamp
        if b is None:
            return raw if sign > 0 else -raw
        if self.clamp_kind == "tanh":
            slope, height, offset = _tanh_constants(b, sign, raw.dtype)
            return torch.sigmoid(raw * slope) * height + offset
        return raw / raw.abs().mul(sign / b).add_(sign)

    def forward(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, ladj)``."""
        raw, shift = params.unbind(-2)  # one stack in backward, not two zero-fills
        log_scale = self._log_scale(raw, 1.0)
        return torch.addcmul(shift, u, log_scale.exp()), log_scale.sum(-1)

    def inverse(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, ladj)``."""
        raw, shift = params.unbind(-2)
        neg_log_scale = self._log_scale(raw, -1.0)
        return (x - shift) * neg_log_scale.exp(), -neg_log_scale.sum(-1)

    def __repr__(self) -> str:
        kind = "" if self.clamp_kind == "tanh" else f", clamp_kind={self.clamp_kind!r}"
        return f"Affine(clamp={self.clamp}{kind})"


_CONSTANTS: dict[tuple[float, float, torch.dtype], tuple[torch.Tensor, ...]] = {}


def _tanh_constants(bound: float, sign: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(2 / b, 2 b sign, -b sign)`` as 0-d CPU tensors of ``dtype``, made once.

    ``sign * b tanh(r / b) = sigmoid(r * 2/b) * 2b sign - b sign``. Tensor constants, not
    Python numbers: autograd then multiplies by them as they are, where a Python number
    is wrapped and converted on every backward pass (a tenth of the clamp's cost). 0-d CPU
    tensors combine with tensors on any device. Only plain tensors are kept: one made
    under a tensor mode (fake tensors of ``torch.export``, say) serves that call alone.
    """
    key = (bound, sign, dtype)
    found = _CONSTANTS.get(key)
    if found is None:
        with torch.inference_mode(False):  # usable in autograd even if made in inference
            found = tuple(
                torch.tensor(v, dtype=dtype, device="cpu")
                for v in (2.0 / bound, 2.0 * bound * sign, -bound * sign)
            )
        if len(_CONSTANTS) < 256 and all(type(c) is torch.Tensor for c in found):
            _CONSTANTS[key] = found
    return found


class Additive:
    r"""Shift only, volume preserving: :math:`x = u + t`, :math:`\log|\det| = 0`."""

    num_params = 1
    params_first = True

    def forward(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, 0)``."""
        x = u + params.squeeze(-2)
        return x, x.new_zeros(x.shape[:-1])

    def inverse(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, 0)``."""
        u = x - params.squeeze(-2)
        return u, u.new_zeros(u.shape[:-1])

    def __repr__(self) -> str:
        return "Additive()"
