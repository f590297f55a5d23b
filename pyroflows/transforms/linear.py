r"""Linear layers: fixed permutations, a learnable LU-parametrized matrix, and ActNorm.

All map base ``u`` to data ``x`` and cost one pass in each direction. They hold no
context: a conditional flow uses them as they are, between its conditional layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyroflows._checks import HALF_DTYPES, check_bool, check_permutation
from pyroflows._torch_modes import is_vmap_batch
from pyroflows.transforms.base import FlowTransform


class Permutation(FlowTransform):
    r"""Fixed permutation of the coordinates: :math:`x = u_{\pi}`, :math:`\log|\det J| = 0`.

    Used between coupling layers so that every coordinate gets transformed. The
    permutation is a buffer: it is saved in ``state_dict`` and moves with ``.to()``.

    Args:
        dim: size of the vector ``D``.
        permutation: ``"random"`` (drawn once from torch's global generator),
            ``"reverse"``, or a sequence giving :math:`\pi`.

    Example:
        >>> t = Permutation(3, "reverse")
        >>> t(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """

    def __init__(self, dim: int, permutation: str | Sequence[int] = "random") -> None:
        super().__init__(dim)
        if isinstance(permutation, str):
            if permutation == "random":
                perm = torch.randperm(self.dim)
            elif permutation == "reverse":
                perm = torch.arange(self.dim - 1, -1, -1)
            else:
                raise ValueError(
                    f"permutation must be 'random', 'reverse' or a sequence, got {permutation!r}"
                )
        else:
            perm = check_permutation(permutation, "permutation", self.dim)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))
        # A floating buffer that carries the flow's dtype for input checks.
        self.register_buffer("_dtype_ref", torch.zeros(()), persistent=False)

    def _forward(self, u, context):
        return u.index_select(-1, self.permutation), u.new_zeros(u.shape[:-1])

    def _backward(self, x, context):
        return x.index_select(-1, self.inverse_permutation), x.new_zeros(x.shape[:-1])

    def _log_abs_det(self, u, x, context):
        return u.new_zeros(u.shape[:-1])

    @property
    def sign(self) -> int:
        """The determinant of the permutation matrix: ``(-1) ** (D - number of cycles)``."""
        perm, seen, cycles = self.permutation.tolist(), set(), 0
        for start in range(len(perm)):
            if start not in seen:
                cycles += 1
                i = start
                while i not in seen:
                    seen.add(i)
                    i = perm[i]
        return -1 if (len(perm) - cycles) % 2 else 1


class LULinear(FlowTransform):
    r"""Learnable invertible linear map in LU form, base ``u`` to data ``x``.

    .. math::
        x = L U u + b, \qquad L = I + \text{strict lower}, \quad
        U = \text{strict upper} + \operatorname{diag}(e^{d}), \qquad
        \log|\det J| = \textstyle\sum_i d_i

    Cost: a matrix product (:math:`O(D^2)`) to sample; two triangular solves
    (:math:`O(D^2)`) to score, in float32 for a half-precision layer (torch solves
    triangular systems in float32 and float64 only). Starts at the identity.

    Args:
        dim: size of the vector ``D``.

    References:
        Kingma, Dhariwal (2018). Glow: Generative Flow with Invertible 1x1 Convolutions.
        arXiv:1807.03039.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.lower = nn.Parameter(torch.zeros(self.dim, self.dim))
        self.upper = nn.Parameter(torch.zeros(self.dim, self.dim))
        self.log_diag = nn.Parameter(torch.zeros(self.dim))
        self.bias = nn.Parameter(torch.zeros(self.dim))
        self.register_buffer("_strict_lower", torch.tril(torch.ones(self.dim, self.dim), -1))
        self.register_buffer("_eye", torch.eye(self.dim))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.lower * self._strict_lower + self._eye
        upper = self.upper * self._strict_lower.T + torch.diag(self.log_diag.exp())
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The matrix :math:`W = L U`."""
        lower, upper = self._factors()
        return lower @ upper

    def _log_abs_det(self, u, x, context):
        return self.log_diag.sum().expand(u.shape[:-1])

    def _forward(self, u, context):
        return F.linear(u, self.weight(), self.bias), self.log_diag.sum().expand(u.shape[:-1])

    def _backward(self, x, context):
        lower, upper = self._factors()
        rhs = (x - self.bias).reshape(-1, self.dim).T
        if rhs.dtype in HALF_DTYPES:  # torch has no triangular solve in half precision
            lower, upper, rhs = lower.float(), upper.float(), rhs.float()
        y = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        u = torch.linalg.solve_triangular(upper, y, upper=True).T.reshape(x.shape)
        return u.to(x.dtype), self.log_diag.sum().expand(x.shape[:-1])


class ActNorm(FlowTransform):
    r"""Per-coordinate affine map with data-dependent initialisation (Glow's ActNorm).

    .. math::
        x = u \odot e^{s} + m, \qquad \log|\det J| = \textstyle\sum_i s_i

    With ``data_init=True``, the first batch of at least two distinct points that the
    layer sees sets :math:`(s, m)` so that the *output* of that call is standardized per
    coordinate: scoring data ``x`` first gives :math:`m = \bar x`, :math:`e^{s} = \mathrm{sd}(x)`;
    sampling ``u`` first gives :math:`e^{s} = 1/\mathrm{sd}(u)`, :math:`m = -\bar u e^{s}`.
    A coordinate without spread in that batch keeps :math:`s = 0`. Until such a batch
    comes (single points, copies of one point) the layer is the identity; if its
    parameters are trained or set meanwhile (an SVI guide drawing one point per step),
    they are kept and no data initialisation follows. Whether it has been initialised is
    a buffer, so a loaded ``state_dict`` is not re-initialised. With ``data_init=False``
    it starts at the identity (NICE's scaling).

    Cost: elementwise, one pass each way.

    Args:
        dim: size of the vector ``D``.
        data_init: initialise from the first batch.

    References:
        Kingma, Dhariwal (2018). Glow. arXiv:1807.03039.
    """

    def __init__(self, dim: int, data_init: bool = True) -> None:
        super().__init__(dim)
        data_init = check_bool(data_init, "data_init")
        self.log_scale = nn.Parameter(torch.zeros(self.dim))
        self.shift = nn.Parameter(torch.zeros(self.dim))
        self.register_buffer("initialized", torch.tensor(not data_init))

    @torch.no_grad()
    def _initialize(self, value: torch.Tensor, inverse: bool) -> None:
        if bool(self.initialized):
            return
        if bool(self.log_scale.any()) or bool(self.shift.any()):
            # trained (or set) while it waited for a batch: those values are kept
            self.initialized.fill_(True)
            return
        if is_vmap_batch(value):
            raise RuntimeError(
                "ActNorm takes its initial scale and shift from the first batch it sees, "
                "which torch.func.vmap cannot give it (one point per call, data-dependent "
                "branches): run the flow once on a batch, or load its state_dict, before "
                "vmap; or build it with data_init=False"
            )
        flat = value.reshape(-1, self.dim)
        if flat.shape[0] < 2:
            return  # one point: no spread to take, wait for a batch
        # statistics in float64 (on the CPU, once: MPS has no float64): a float32 column
        # without spread has sd exactly 0 there, one with a large offset keeps its spread
        wide = flat.to("cpu", torch.float64)
        finite = torch.isfinite(wide)
        if not bool(finite.all()):  # the scale and shift would be NaN for good
            row, column = (~finite).nonzero()[0].tolist()
            raise ValueError(
                f"ActNorm takes its initial scale and shift from the first batch it sees, and "
                f"this one holds {flat[row, column].item()} (at row {row}, coordinate "
                f"{column} of the batch flattened to (-1, {self.dim})); pass finite values"
            )
        mean, std = wide.mean(0), wide.std(0)
        flat_column = std <= 4 * torch.finfo(torch.float64).eps * mean.abs()
        if bool(flat_column.all()):
            return  # copies of one point (a point scored under several contexts): wait
        std = torch.where(flat_column, torch.ones_like(std), std)
        mean, std = mean.to(flat.device, flat.dtype), std.to(flat.device, flat.dtype)
        if inverse:  # value is data: u = (x - m) e^{-s} should be standard
            self.log_scale.copy_(std.log())
            self.shift.copy_(mean)
        else:  # value is base: x = u e^{s} + m should be standard
            self.log_scale.copy_(-std.log())
            self.shift.copy_(-mean / std)
        self.initialized.fill_(True)

    def _forward(self, u, context):
        self._initialize(u, inverse=False)
        return u * self.log_scale.exp() + self.shift, self.log_scale.sum().expand(u.shape[:-1])

    def _backward(self, x, context):
        self._initialize(x, inverse=True)
        u = (x - self.shift) * torch.exp(-self.log_scale)
        return u, self.log_scale.sum().expand(x.shape[:-1])

    def _log_abs_det(self, u, x, context):
        return self.log_scale.sum().expand(u.shape[:-1])
