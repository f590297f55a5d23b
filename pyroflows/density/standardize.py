r"""Standardisation as a flow layer, so a fitted density scores in the data's own units.

A flow fitted to standardized data :math:`z = (x - m) / s` has density :math:`p_Z`; the
density of the data is then

.. math::
    \log p_X(x) = \log p_Z\big((x - m) / s\big) - \textstyle\sum_i \log s_i .

:class:`Standardization` is that map in the flow's direction, base side to data side,
:math:`x = m + s \odot z`, appended as the flow's last layer: its log-det
:math:`\sum_i \log s_i` is counted by ``log_prob`` like any other layer's, and ``sample``
returns draws in data units. ``m`` and ``s`` are buffers: saved in ``state_dict``, moved by
``.to()``, never trained.
"""

from __future__ import annotations

import torch

from pyroflows.density.data import DataError, dtype_name
from pyroflows.flows import Flow
from pyroflows.transforms import FlowTransform


class Standardization(FlowTransform):
    r"""Fixed per-coordinate affine map :math:`x = m + s \odot z` (standardized to data).

    Cost: elementwise, one pass each way; :math:`\log|\det J| = \sum_i \log s_i`.

    Args:
        dim: size of the vector ``D``.

    Example:
        >>> t = Standardization(2)
        >>> t.set(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]))
        >>> t(torch.tensor([1.0, 1.0]))
        tensor([ 3.0000, -0.5000])
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("loc", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))

    @torch.no_grad()
    def set(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Set :math:`m` and :math:`s` (each of shape ``(D,)``, ``s > 0``)."""
        loc = torch.as_tensor(loc, dtype=self.loc.dtype, device=self.loc.device)
        scale = torch.as_tensor(scale, dtype=self.scale.dtype, device=self.scale.device)
        if loc.shape != (self.dim,) or scale.shape != (self.dim,):
            raise ValueError(
                f"loc and scale must have shape ({self.dim},), got {tuple(loc.shape)} and "
                f"{tuple(scale.shape)}"
            )
        if not (torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("loc must be finite and scale finite and positive")
        self.loc.copy_(loc)
        self.scale.copy_(scale)
        self.clear_cache()

    def _forward(self, u, context):
        return self.loc + self.scale * u, self._log_abs_det(u, u, context)

    def _backward(self, x, context):
        return (x - self.loc) / self.scale, self._log_abs_det(x, x, context)

    def _log_abs_det(self, u, x, context):
        return self.scale.log().sum().expand(u.shape[:-1])


def standardization_of(flow: Flow) -> Standardization | None:
    """The flow's standardisation layer (its last layer), or ``None`` if it has none."""
    if len(flow.transforms) and isinstance(flow.transforms[-1], Standardization):
        return flow.transforms[-1]
    return None


def add_standardization(flow: Flow) -> Standardization:
    """Return the flow's standardisation layer, appending an identity one if it has none.

    The new layer takes the dtype and device of the flow's base buffers.
    """
    layer = standardization_of(flow)
    if layer is None:
        layer = Standardization(flow.dim).to(flow.base_loc)
        flow.transforms.append(layer)
    return layer


def moments(data: torch.Tensor, dequantize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-column mean and sd of ``data`` (``(N, D)``), as a :class:`Standardization` uses.

    With ``dequantize`` the moments are those of :math:`x + U[0, 1)`: mean + 1/2 and
    variance + 1/12. A column with zero spread (or a single row) gets sd 1, so the layer
    stays invertible.
    """
    mean = data.mean(0)
    sd = data.std(0, unbiased=False) if data.shape[0] > 1 else torch.zeros_like(mean)
    return settle(mean, sd, dequantize, data.dtype)


def settle(
    mean: torch.Tensor,
    sd: torch.Tensor,
    dequantize: bool | torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale of the layer from column mean and sd (see :func:`moments`).

    Worked in float64 and only then cast to ``dtype``: the variance of a column with an
    sd of 1e20 is beyond float32's range, its sd is not. ``dequantize``: every column
    gets :math:`U[0, 1)` noise (``True``), none (``False`` or ``None``), or those where
    a 0/1 mask of the columns is 1.
    """
    mean, sd = mean.to(torch.float64), sd.to(torch.float64)
    if dequantize is not None and dequantize is not False:
        # the sd of x + U[0, 1): sqrt(sd^2 + 1/12), without squaring sd
        noisy = torch.ones_like(sd, dtype=torch.bool)
        if isinstance(dequantize, torch.Tensor):
            noisy = dequantize.to(sd.device) != 0
        mean = torch.where(noisy, mean + 0.5, mean)
        widened = torch.hypot(sd, torch.tensor(12.0, dtype=torch.float64).rsqrt())
        sd = torch.where(noisy, widened, sd)
    # constant columns (sd at rounding level relative to the mean) keep sd 1
    constant = _constant(mean, sd, dtype)
    return mean.to(dtype), torch.where(constant, torch.ones_like(sd), sd).to(dtype)


def constant_columns(mean: torch.Tensor, sd: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The columns whose spread is at ``dtype``'s rounding level of their mean (0-based)."""
    mean, sd = mean.to(torch.float64), sd.to(torch.float64)
    return _constant(mean, sd, dtype).nonzero().flatten().tolist()


def refuse_unscalable(mean: torch.Tensor, sd: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Refuse a column whose spread is below ``dtype``'s smallest normal number.

    Such a column (sd 1e-39 in float32, say: cross-sections in cm^2) is not constant, but
    ``dtype`` cannot resolve it: its standardisation cannot be held (``1 / sd``
    overflows), and unstandardized its values are subnormal numbers a flow's layers,
    bounded in scale, cannot spread to unit size. A flow would take it for a constant
    column and score it nats off.
    """
    mean, sd = mean.to(torch.float64), sd.to(torch.float64)
    bad = (sd < torch.finfo(dtype).tiny) & ~_constant(mean, sd, torch.float64)
    if bad.any():
        j = int(bad.nonzero()[0])
        kind = dtype_name(dtype)
        raise DataError(
            f"{name} column {j + 1} (index {j}) has sd {float(sd[j]):.3g}, below the smallest "
            f"normal {kind} number ({torch.finfo(dtype).tiny:.3g}): {kind} cannot resolve "
            f"it (nor hold its standardisation); use a float64 flow (dtype='float64', "
            f"--dtype float64) or rescale the column"
        )


def _constant(mean: torch.Tensor, sd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the float64 sums of a constant column leave an sd of ~1e-15 of the mean, not 0
    relative = max(torch.finfo(dtype).eps, 16 * torch.finfo(torch.float64).eps)
    tiny = (relative * mean.abs()).clamp_min(torch.finfo(dtype).tiny)
    return ~(sd > tiny)
