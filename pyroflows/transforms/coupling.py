r"""Coupling layers: half the vector passes through and parametrizes a map of the rest.

Base to data, with :math:`k` = ``split`` pass-through coordinates:

.. math::
    x_{1:k} = u_{1:k}, \qquad x_{k+1:D} = \tau\big(u_{k+1:D};\ \mathrm{NN}(u_{1:k}, c)\big)

so the Jacobian is block-triangular and
:math:`\log|\det J| = \sum_{i>k} \log|\tau'(u_i)|`. Both directions cost one network
pass, since :math:`u_{1:k} = x_{1:k}` is known on either side.

References:
    Dinh, Krueger, Bengio (2014). NICE: Non-linear Independent Components Estimation.
    arXiv:1410.8516. Dinh, Sohl-Dickstein, Bengio (2016). Density estimation using
    Real NVP. arXiv:1605.08803.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyroflows.nn import MLP
from pyroflows.transforms.base import ConditionalFlowTransform, FlowTransform
from pyroflows.transforms.elementwise import Additive, Affine


class _Coupling:
    """The coupling maths, shared by the unconditional and conditional classes."""

    dim: int
    split: int
    transformer: Affine | Additive
    conditioner: nn.Module

    def _build(self, transformer, split, hidden, context, activation) -> None:
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 for a coupling layer, got {self.dim}")
        split = self.dim // 2 if split is None else split
        if (
            isinstance(split, bool)
            or not isinstance(split, numbers.Integral)
            or not 0 < split < self.dim
        ):
            raise ValueError(f"split must be an int in [1, {self.dim - 1}], got {split!r}")
        self.split = split = int(split)
        self.transformer = transformer
        self.conditioner = MLP(
            split,
            self.dim - split,
            transformer.num_params,
            hidden,
            context,
            activation,
            params_first=transformer.params_first,
        )

    def _forward(self, u: torch.Tensor, context: torch.Tensor | None):
        u_a, u_b = u[..., : self.split], u[..., self.split :]
        x_b, ladj = self.transformer.forward(u_b, self.conditioner(u_a, context))
        return torch.cat([u_a, x_b], dim=-1), ladj

    def _backward(self, x: torch.Tensor, context: torch.Tensor | None):
        x_a, x_b = x[..., : self.split], x[..., self.split :]
        u_b, ladj = self.transformer.inverse(x_b, self.conditioner(x_a, context))
        return torch.cat([x_a, u_b], dim=-1), ladj

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        # at the side the elementwise map takes in closed form (a spline on the base side:
        # at u; where it is flat, a float32 x would pin down u only roughly)
        if getattr(self.transformer, "side", "data") == "base":
            u_a, u_b = u[..., : self.split], u[..., self.split :]
            return self.transformer.forward(u_b, self.conditioner(u_a, context))[1]
        return self._backward(x, context)[1]

    def extra_repr(self) -> str:
        # the base class's sizes: dim, and context for the conditional twin
        return f"{super().extra_repr()}, split={self.split}, transformer={self.transformer}"


class AffineCoupling(_Coupling, FlowTransform):
    r"""Affine coupling layer (RealNVP), base ``u`` to data ``x``.

    .. math::
        x_{k+1:D} = u_{k+1:D} \odot e^{s(u_{1:k})} + t(u_{1:k}), \qquad
        \log|\det J| = \textstyle\sum_i s_i, \qquad s = b \tanh(\tilde s / b)

    Cost: one MLP pass for ``t(u)`` and one for ``t.inv(x)``. Starts at the identity.

    Args:
        dim: size of the vector ``D`` (>= 2).
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.
        clamp: bound :math:`b` on the log-scale (``None``: no clamp).

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``;
        ``log_abs_det_jacobian``: ``batch``.

    Example:
        >>> t = AffineCoupling(4, hidden=(16,))
        >>> u = torch.randn(3, 4)
        >>> torch.equal(t(u), u)  # identity at initialisation
        True
    """

    def __init__(
        self,
        dim: int,
        split: int | None = None,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        clamp: float | None = 3.0,
    ) -> None:
        super().__init__(dim)
        self._build(Affine(clamp), split, hidden, 0, activation)


class ConditionalAffineCoupling(_Coupling, ConditionalFlowTransform):
    r"""Affine coupling layer whose scale and shift also read a context ``c``.

    .. math::
        x_{k+1:D} = u_{k+1:D} \odot e^{s(u_{1:k}, c)} + t(u_{1:k}, c)

    ``t.condition(c)`` returns the plain transform for that context.

    Args:
        dim: size of the vector ``D`` (>= 2).
        context: size of the context vector.
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.
        clamp: bound :math:`b` on the log-scale (``None``: no clamp).

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``;
        ``log_abs_det_jacobian``: ``batch``.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        split: int | None = None,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        clamp: float | None = 3.0,
    ) -> None:
        super().__init__(dim, context)
        self._build(Affine(clamp), split, hidden, self.context_features, activation)


class AdditiveCoupling(_Coupling, FlowTransform):
    r"""Additive coupling layer (NICE), base ``u`` to data ``x``; volume preserving.

    .. math::
        x_{k+1:D} = u_{k+1:D} + t(u_{1:k}), \qquad \log|\det J| = 0

    Cost: one MLP pass in each direction. Starts at the identity.

    Args:
        dim: size of the vector ``D`` (>= 2).
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``;
        ``log_abs_det_jacobian``: ``batch``.
    """

    def __init__(
        self,
        dim: int,
        split: int | None = None,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(dim)
        self._build(Additive(), split, hidden, 0, activation)


class ConditionalAdditiveCoupling(_Coupling, ConditionalFlowTransform):
    r"""Additive coupling layer whose shift also reads a context ``c``.

    .. math::
        x_{k+1:D} = u_{k+1:D} + t(u_{1:k}, c), \qquad \log|\det J| = 0

    Args:
        dim: size of the vector ``D`` (>= 2).
        context: size of the context vector.
        split: number of pass-through coordinates ``k`` (default ``D // 2``).
        hidden: hidden layer sizes of the conditioner MLP.
        activation: module class for its non-linearity.

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``;
        ``log_abs_det_jacobian``: ``batch``.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        split: int | None = None,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(dim, context)
        self._build(Additive(), split, hidden, self.context_features, activation)
