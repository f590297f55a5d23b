"""MADE: a masked autoencoder whose outputs are autoregressive in a chosen variable order."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._checks import (
    check_bool,
    check_hidden,
    check_permutation,
    check_positive_int,
    warn_from_caller,
)
from pyroflows.nn.mlp import ContextTrunk
from pyroflows.nn.packed import PackedLinear


class MaskedLinear(PackedLinear):
    """A linear layer whose weight is multiplied by a fixed mask (a registered buffer).

    The mask is 0 where a connection is cut and 1 where it is kept, or a constant
    :math:`c < 1` on the kept entries after :meth:`~pyroflows.nn.mlp.ContextTrunk.scale_updates`.
    """

    #: inside :meth:`MADE.masked_weights_held`, the id of the thread that holds the masked
    #: weight (other threads compute their own) and the weight, kept from its first use
    _holding: int | None = None
    _held: torch.Tensor | None = None

    def __init__(self, mask: torch.Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def _adopt(self, state_dict: dict, prefix: str) -> None:
        # a state saved before the layer was scaled (kept entries 1) into a scaled layer
        # (kept entries c): stored as W / c with the mask c, so the outputs are the
        # state's and the steps stay scaled, as for a ScaledLinear
        mask, weight = prefix + "mask", prefix + "weight"
        if mask in state_dict and weight in state_dict:
            now = float(self.mask.max())
            if float(state_dict[mask].max()) == 1.0 and now not in (0.0, 1.0):
                state_dict[weight] = state_dict[weight] / now
                state_dict[mask] = state_dict[mask] * now

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        holder = self._holding
        if holder is None or holder != threading.get_ident():
            return F.linear(x, weight * self.mask, bias)
        held = self._held
        if held is None:
            held = self._held = weight * self.mask
        return F.linear(x, held, bias)


def _order(order: Sequence[int] | None, features: int) -> torch.Tensor:
    if order is None:
        return torch.arange(features)
    return check_permutation(order, "order", features)


class MADE(ContextTrunk):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    Produces ``params`` numbers :math:`\theta_i` for every input dimension :math:`i` such
    that :math:`\theta_i` depends only on the inputs that come *before* :math:`i` in
    ``order`` (and on the context, which every hidden layer sees unmasked):

    .. math::
        \frac{\partial \theta_{i}}{\partial x_j} = 0
        \quad \text{unless } \operatorname{rank}(j) < \operatorname{rank}(i).

    Degrees: input :math:`i` gets degree :math:`\operatorname{rank}(i) \in \{1..D\}`;
    hidden units cycle through degrees :math:`\{1..D-1\}` (or :math:`\{0..D-1\}` with a
    context, where degree-0 units see only the context, so the first variable's
    parameters can still depend on it non-linearly). A unit connects to units of lower
    or equal degree in the layer below; an output of degree :math:`d` connects to hidden
    units of degree :math:`< d`. Masks are buffers, so ``.to(device)`` moves them.

    One call costs one dense pass; an autoregressive *inverse* built on it needs ``D``.

    Args:
        features: number of variables ``D``.
        params: numbers produced per variable.
        hidden: hidden layer sizes; each should be at least ``D - 1`` (``D`` with a
            context) so that every degree is represented and output ``i`` can depend on
            all the inputs before it. A narrower layer is allowed, with a ``UserWarning``:
            inputs late in the order then reach no output.
        context: size of the context vector, 0 for none.
        order: the autoregressive order as a permutation of ``range(D)``: ``order[0]`` is
            the variable whose parameters depend on no input. Default: natural order.
        activation: module class for the hidden non-linearity.
        zero_init: start the output layer at zero (an identity flow layer).
        params_first: lay the output out as ``(params, D)`` instead of ``(D, params)``, so
            that each parameter is a contiguous ``(*batch, D)`` slice (affine layers).

    Shapes:
        ``x``: ``(*batch, D)``; ``context``: ``(*batch, context)``;
        output: ``(*batch, D, params)`` (``(*batch, params, D)`` with ``params_first``).

    Example:
        >>> made = MADE(3, params=2, hidden=(16, 16), order=[2, 0, 1])
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 3, 2])

    References:
        Germain, Gregor, Murray, Larochelle (2015). MADE: Masked Autoencoder for
        Distribution Estimation. arXiv:1502.03509.
    """

    def __init__(
        self,
        features: int,
        params: int = 2,
        hidden: Sequence[int] = (64, 64),
        context: int = 0,
        order: Sequence[int] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init: bool = True,
        params_first: bool = False,
    ) -> None:
        features = check_positive_int(features, "features")
        params = check_positive_int(params, "params")
        context = check_positive_int(context, "context", minimum=0)
        hidden = check_hidden(hidden)
        params_first = check_bool(params_first, "params_first")
        check_bool(zero_init, "zero_init")  # before the warning about narrow layers
        order_t = _order(order, features)
        degree_in = torch.empty(features, dtype=torch.long)
        degree_in[order_t] = torch.arange(1, features + 1)

        low = 0 if context else 1
        span = max(features - low, 1)
        if hidden and min(hidden) < span and features > 1:
            seen = min(hidden) - 1 + low  # the highest input rank any hidden unit sees
            warn_from_caller(
                f"MADE hidden={hidden} has a layer narrower than {span} (D - 1 = "
                f"{features - 1}{', + 1 for the context' if context else ''}): the inputs "
                f"after position {seen} of {features} in the order reach no output, so later "
                f"variables cannot depend on them; use hidden sizes of at least {span}",
            )
        degrees = [degree_in] + [low + torch.arange(size) % span for size in hidden]
        if params_first:  # output (p, i) at index p * D + i
            degree_out, out_shape = degree_in.repeat(params), (params, features)
        else:  # output (i, p) at index i * params + p
            degree_out, out_shape = degree_in.repeat_interleave(params), (features, params)
        super().__init__(
            [
                MaskedLinear((d_out[:, None] >= d_in[None, :]).float())
                for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True)
            ],
            MaskedLinear((degree_out[:, None] > degrees[-1][None, :]).float()),
            out_shape,
            context,
            activation,
            zero_init,
        )
        self.features = features
        self.params_first = params_first
        self.register_buffer("order", order_t)

    @contextlib.contextmanager
    def masked_weights_held(self) -> Iterator[None]:
        """Mask each layer's weight once for all the calls made inside the block.

        An autoregressive inverse calls the MADE ``D`` times on the same weights. Masking
        them at every call costs as much as the product itself for a small batch, and
        under autograd each call keeps its own masked copy for the backward pass: ``D``
        copies of every weight (at ``D = 512`` and width 2048, tens of gigabytes). Inside
        this block the calls share one masked weight per layer, one node of the graph.
        """
        layers = [m for m in self.modules() if isinstance(m, MaskedLinear)]
        if any(m._holding is not None for m in layers):  # an enclosing block holds them
            yield
            return
        try:
            for m in layers:
                m._holding = threading.get_ident()
            # and one split of flat for the D calls (each split's backward writes a
            # gradient of the whole of flat: D of them cost more than the passes)
            self.__dict__["_held_views"] = (threading.get_ident(), {})
            yield
        finally:
            self.__dict__.pop("_held_views", None)
            for m in layers:
                m._holding, m._held = None, None
