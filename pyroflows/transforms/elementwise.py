r"""Elementwise monotone maps :math:`x_i = \tau(u_i; \theta_i)` inside flow layers.

Coupling and autoregressive layers use them; a conditioner supplies :math:`\theta` of
shape ``(*batch, D, P)``.

Each map gives ``forward(u, params) -> (x, ladj)`` and ``inverse(x, params) -> (u, ladj)``
where ``ladj`` is :math:`\sum_i \log|\partial x_i / \partial u_i|` (of the forward map,
in both calls), shape ``batch``. All-zero parameters give the identity.
"""

from __future__ import annotations

import torch


class Affine:
    r"""Affine map with a soft-clamped log-scale.

    .. math::
        x = u \, e^{s} + t, \qquad s = b \tanh(\tilde s / b), \qquad
        \log\left|\frac{\partial x}{\partial u}\right| = s

    The clamp bounds each layer's scale to :math:`[e^{-b}, e^{b}]` with a smooth gradient,
    so one bad batch cannot make ``inf``. ``clamp=None`` turns it off.

    Args:
        clamp: the bound :math:`b` on the log-scale.
    """

    num_params = 2

    def __init__(self, clamp: float | None = 3.0) -> None:
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be a positive number or None, got {clamp!r}")
        self.clamp = clamp

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = params[..., 0], params[..., 1]
        if self.clamp is not None:
            raw = torch.tanh(raw / self.clamp) * self.clamp
        return raw, shift

    def forward(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, ladj)``."""
        log_scale, shift = self._split(params)
        return u * log_scale.exp() + shift, log_scale.sum(-1)

    def inverse(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, ladj)``."""
        log_scale, shift = self._split(params)
        return (x - shift) * torch.exp(-log_scale), log_scale.sum(-1)

    def __repr__(self) -> str:
        return f"Affine(clamp={self.clamp})"


class Additive:
    r"""Shift only, volume preserving: :math:`x = u + t`, :math:`\log|\det| = 0`."""

    num_params = 1

    def forward(self, u: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, 0)``."""
        x = u + params[..., 0]
        return x, x.new_zeros(x.shape[:-1])

    def inverse(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, 0)``."""
        u = x - params[..., 0]
        return u, u.new_zeros(u.shape[:-1])

    def __repr__(self) -> str:
        return "Additive()"
