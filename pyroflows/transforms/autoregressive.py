r"""Masked autoregressive layers in both forms: IAF (fast sampling) and MAF (fast scoring).

Base ``u`` to data ``x``, with a MADE conditioner producing the parameters of an
elementwise map :math:`\tau` for each coordinate in a chosen order:

.. math::
    \text{IAF:}\quad x_i = \tau\big(u_i;\ \theta_i(u_{<i}, c)\big) \qquad\qquad
    \text{MAF:}\quad x_i = \tau\big(u_i;\ \theta_i(x_{<i}, c)\big)

The Jacobian is triangular in that order, so
:math:`\log|\det J| = \sum_i \log|\tau'(u_i; \theta_i)|`.

======  ====================  ===========================  ============================
form    conditioner reads     ``t(u)`` (sample)            ``t.inv(x)`` (score)
======  ====================  ===========================  ============================
IAF     ``u`` (base side)     1 MADE pass                  ``D`` passes
MAF     ``x`` (data side)     ``D`` passes                 1 MADE pass
======  ====================  ===========================  ============================

The ``D``-pass direction iterates :math:`v \leftarrow \tau^{\pm 1}(\cdot;\ \theta(v))` from
:math:`v = 0`; after pass :math:`k` the first :math:`k` coordinates in the order are exact,
so after ``D`` passes all are (and so are the gradients). The IAF form scores its *own*
samples in no extra pass: the layer caches the last ``(u, x, log|det|)``
(see :class:`~pyroflows.transforms.base.FlowTransform`), which is what the ELBO needs.

References:
    Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016). Improved Variational
    Inference with Inverse Autoregressive Flow. arXiv:1606.04934.
    Papamakarios, Pavlakou, Murray (2017). Masked Autoregressive Flow for Density
    Estimation. arXiv:1705.07057.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyroflows._checks import check_choice
from pyroflows._torch_modes import is_vmap_batch
from pyroflows.nn import MADE
from pyroflows.transforms.base import ConditionalFlowTransform, FlowTransform
from pyroflows.transforms.elementwise import Affine

FORMS = ("iaf", "maf")


class _Autoregressive:
    """The autoregressive maths, shared by the unconditional and conditional classes."""

    dim: int
    form: str
    transformer: Affine
    conditioner: MADE

    def _build(self, transformer, form, hidden, context, order, activation) -> None:
        self.form = check_choice(form, "form", FORMS)
        self.transformer = transformer
        self.conditioner = MADE(
            self.dim,
            transformer.num_params,
            hidden,
            context,
            order,
            activation,
            params_first=transformer.params_first,
        )
        self._order_cache: tuple[torch.Tensor, int, list[int]] | None = None

    def _order_list(self) -> list[int]:
        """The order buffer as a list, re-read whenever the buffer changes.

        ``load_state_dict`` copies another order into the buffer in place (bumping its
        version counter) and ``.to()`` replaces it, so a list kept from construction
        would go stale and the ``D``-pass inverse would solve in the wrong order.
        """
        order = self.conditioner.order
        if is_vmap_batch(order):
            raise RuntimeError(
                "the D-pass direction of an autoregressive layer solves in the order of its "
                "'order' buffer, which it reads as a Python list, and here 'order' is batched "
                "by torch.func.vmap (a stack_module_state ensemble); pass the buffers "
                "unbatched (in_dims None) when every member has the same orders (the builders "
                "give every flow of one dim the same orders, unless permutation='random')"
            )
        if order.is_inference():  # built under inference mode: no version counter
            return order.tolist()
        cached = self._order_cache
        # the tensor itself is kept (not its id, which a later tensor could reuse once
        # this one is freed), so `is` cannot match another tensor
        if cached is None or cached[0] is not order or cached[1] != order._version:
            cached = self._order_cache = (order, order._version, order.tolist())
        return cached[2]

    def _iterate(self, step, y: torch.Tensor, context: torch.Tensor | None):
        """Solve ``v = step(y, theta(v))`` for ``v`` in ``D`` passes (triangular system).

        Pass ``k`` makes the ``k``-th coordinate in the order exact, so passes before the
        last map only that coordinate; the last maps all of them (and gives the log-det).
        """
        v = torch.zeros_like(y)
        params_first = self.transformer.params_first
        order = self.conditioner.order
        with self.conditioner.masked_weights_held():  # masked once for the D passes
            for k, i in enumerate(self._order_list()[:-1]):
                params = self.conditioner(v, context)
                params_i = params[..., i : i + 1] if params_first else params[..., i : i + 1, :]
                v_i = step(y[..., i : i + 1], params_i)[0]
                v = v.index_copy(-1, order[k : k + 1], v_i)
            return step(y, self.conditioner(v, context))

    def _forward(self, u: torch.Tensor, context: torch.Tensor | None):
        if self.form == "iaf":
            return self.transformer.forward(u, self.conditioner(u, context))
        return self._iterate(self.transformer.forward, u, context)

    def _backward(self, x: torch.Tensor, context: torch.Tensor | None):
        if self.form == "maf":
            return self.transformer.inverse(x, self.conditioner(x, context))
        return self._iterate(self.transformer.inverse, x, context)

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        # One pass from the side the conditioner reads; the elementwise map's log-det at
        # the side it takes in closed form (a spline's own side, where a flat bin's float32
        # output would pin down its argument only roughly; either side for affine maps)
        iaf = self.form == "iaf"
        params = self.conditioner(u if iaf else x, context)
        side = getattr(self.transformer, "side", "base" if iaf else "data")
        if side == "base":
            return self.transformer.forward(u, params)[1]
        return self.transformer.inverse(x, params)[1]

    def extra_repr(self) -> str:
        # the base class's sizes: dim, and context for the conditional twin
        return f"{super().extra_repr()}, form={self.form!r}, transformer={self.transformer}"


class AffineAutoregressive(_Autoregressive, FlowTransform):
    r"""Masked affine autoregressive layer, base ``u`` to data ``x``, in IAF or MAF form.

    .. math::
        x_i = u_i\, e^{s_i} + t_i, \qquad (s_i, t_i) = \mathrm{MADE}(v)_i, \qquad
        \log|\det J| = \textstyle\sum_i s_i

    with :math:`v = u` (IAF) or :math:`v = x` (MAF), and :math:`s` soft-clamped to
    :math:`[-b, b]`. Cost: IAF samples in 1 pass and inverts in ``D``; MAF scores in 1
    pass and samples in ``D`` (see the module docstring). Starts at the identity.

    Args:
        dim: size of the vector ``D``.
        form: ``"iaf"`` (conditioner reads ``u``) or ``"maf"`` (reads ``x``).
        hidden: hidden layer sizes of the MADE.
        order: autoregressive order, a permutation of ``range(D)`` (default natural).
        activation: module class for the MADE's non-linearity.
        clamp: bound :math:`b` on the log-scale (``None``: no clamp).

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; ``log_abs_det_jacobian``: ``batch``.

    Raises:
        ValueError: for an unknown ``form`` or an ``order`` that is not a permutation.

    Example:
        >>> t = AffineAutoregressive(3, form="iaf", hidden=(8,))
        >>> u = torch.randn(4, 3)
        >>> x = t(u)          # one MADE pass
        >>> t.inv(x) is u     # cached: scoring its own sample costs nothing
        True
    """

    def __init__(
        self,
        dim: int,
        form: str = "iaf",
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        clamp: float | None = 3.0,
    ) -> None:
        super().__init__(dim)
        self._build(Affine(clamp), form, hidden, 0, order, activation)


class ConditionalAffineAutoregressive(_Autoregressive, ConditionalFlowTransform):
    r"""Masked affine autoregressive layer whose MADE also reads a context ``c``.

    .. math::
        x_i = u_i\, e^{s_i} + t_i, \qquad (s_i, t_i) = \mathrm{MADE}(v, c)_i

    Every hidden layer of the MADE sees ``c``; ``t.condition(c)`` returns the plain
    transform. Costs as for :class:`AffineAutoregressive`.

    Args:
        dim: size of the vector ``D``.
        context: size of the context vector.
        form: ``"iaf"`` or ``"maf"``.
        hidden: hidden layer sizes of the MADE.
        order: autoregressive order, a permutation of ``range(D)``.
        activation: module class for the MADE's non-linearity.
        clamp: bound on the log-scale (``None``: no clamp).

    Shapes:
        ``u``, ``x``: ``(*batch, D)``; context: ``(*batch, context)``.
    """

    def __init__(
        self,
        dim: int,
        context: int,
        form: str = "iaf",
        hidden: Sequence[int] = (64, 64),
        order: Sequence[int] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        clamp: float | None = 3.0,
    ) -> None:
        super().__init__(dim, context)
        self._build(Affine(clamp), form, hidden, self.context_features, order, activation)
