"""Dense conditioner: a multilayer perceptron with an optional context in every layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._checks import check_bool, check_hidden, check_positive_int
from pyroflows._pickling import DropsParamStoreLinks
from pyroflows._pyro_module import RefusesPyroModule
from pyroflows.nn import packed
from pyroflows.nn.packed import PackedLinear


class ScaledLinear(PackedLinear):
    """A linear layer whose weight is used times a constant ``scale`` (a scalar buffer).

    What :meth:`ContextTrunk.scale_updates` makes of a wide dense layer: the stored
    weight is :math:`W' = W / c`, so an optimizer step on it moves :math:`W` by ``c``
    times as much.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("scale", torch.ones((), dtype=self.weight.dtype))

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight * self.scale, bias)

    def _adopt(self, state_dict: dict, prefix: str) -> None:
        # the state of a plain layer (saved before the layer was scaled) holds the
        # weight W itself: stored as W / scale, so the outputs and the step scaling stay
        weight, scale = prefix + "weight", prefix + "scale"
        if scale not in state_dict and weight in state_dict:
            state_dict[weight] = state_dict[weight] / self.scale.to(state_dict[weight])
            state_dict[scale] = self.scale.detach().clone()


def _made_scaled(layer: PackedLinear) -> ScaledLinear:
    """``layer`` turned into a :class:`ScaledLinear` of factor 1, in place.

    The module and the ``Parameter`` objects that hold its weight (the network's flat
    one, or its own) stay the same, so an optimizer or Pyro's param store that holds
    them goes on stepping them (new parameters would be left out of both, silently).
    """
    layer.__class__ = ScaledLinear
    layer.register_buffer(
        "scale", torch.ones((), dtype=layer.weight.dtype, device=layer.weight.device)
    )
    return layer


class ContextTrunk(RefusesPyroModule, DropsParamStoreLinks, nn.Module):
    """Shared body of the conditioners: hidden layers with an additive context term each.

    ``hidden_layers`` and ``output_layer`` are built by the subclass (dense or masked);
    this class adds the context projections, the zero initialisation of the output and
    the forward pass, so the MLP and MADE differ only in their masks.

    The weights and biases of all its layers live in one parameter, ``flat``
    (:mod:`pyroflows.nn.packed`): an optimizer steps one tensor per network instead of
    two per layer, which on the CPU makes a small flow's training step with torch's
    default Adam 5-15% faster (less with ``fused=True``). A network of more than
    :data:`~pyroflows.nn.packed.PACK_LIMIT` parameters is built unpacked (the ``cat``
    that gathers ``flat``'s gradient then costs more than it saves, measured on the
    CPU). ``layer.weight`` and
    ``layer.bias`` read as views of it; a state dict holds ``flat`` and the layers'
    sizes (``flat_layout``), and a state saved with a weight and bias per layer loads as
    well.
    :meth:`unpack` gives each layer its own parameters back, for pruning,
    ``parametrize``, per-layer parameter groups or freezing; :meth:`pack` undoes it.
    """

    def __init__(
        self,
        hidden_layers: Sequence[PackedLinear],
        output_layer: PackedLinear,
        out_shape: tuple[int, int],
        context: int,
        activation: Callable[[], nn.Module],
        zero_init: bool,
    ) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.context_features = context
        self.hidden_layers = nn.ModuleList(hidden_layers)
        self.output_layer = output_layer
        self.context_layers = nn.ModuleList(
            PackedLinear(context, layer.out_features, bias=False)
            for layer in (hidden_layers if context else ())
        )
        self.context_output = (
            PackedLinear(context, output_layer.out_features, bias=False)
            if context and not hidden_layers
            else None
        )
        if isinstance(activation, nn.Module) or not callable(activation):
            raise TypeError(
                f"activation must be a module class or a callable returning a module, such "
                f"as nn.ReLU (not an instance such as nn.ReLU()); got {activation!r}"
            )
        try:
            self.activation = activation()
        except TypeError as error:  # a function such as torch.tanh, not a module class
            raise TypeError(
                f"activation must be a module class or a callable returning a module, such "
                f"as nn.Tanh (not a function such as torch.tanh); calling {activation!r} "
                f"with no arguments failed: {error}"
            ) from None
        if not isinstance(self.activation, nn.Module):
            raise TypeError(
                f"activation() must return an nn.Module, got {type(self.activation).__name__}"
            )
        if check_bool(zero_init, "zero_init"):
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)
            if self.context_output is not None:
                nn.init.zeros_(self.context_output.weight)
        if sum(p.numel() for p in self.parameters()) <= packed.PACK_LIMIT:
            packed.pack(self)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_flat_views", None)  # views of flat kept for calls without gradients
        state.pop("_held_views", None)  # and for the D calls of an inverse
        return state

    def _apply(self, fn, recurse: bool = True):
        # kept views would hold the old data (a GPU copy after .cpu(), say) until the
        # next call without gradients made them anew
        self.__dict__.pop("_flat_views", None)
        return super()._apply(fn, recurse)

    def _named_layers(self) -> list[tuple[str, PackedLinear]]:
        """Every linear layer with its state-dict prefix: the order of ``flat``'s parts."""
        layers = [(f"hidden_layers.{k}.", m) for k, m in enumerate(self.hidden_layers)]
        layers.append(("output_layer.", self.output_layer))
        layers += [(f"context_layers.{k}.", m) for k, m in enumerate(self.context_layers)]
        if self.context_output is not None:
            layers.append(("context_output.", self.context_output))
        return layers

    def pack(self) -> ContextTrunk:
        """Put every layer's weight and bias into one parameter ``flat`` (as built).

        New parameter objects: make the optimizer again (pyroflows' guides list the new
        ones in Pyro's param store themselves). Returns the network.
        """
        packed.pack(self)
        return self

    def unpack(self) -> ContextTrunk:
        """Give every layer its own ``weight`` and ``bias`` parameters again.

        For what needs a layer's own ``Parameter``: pruning, ``parametrize``, weight
        norm, a parameter group per layer, freezing one layer. The map is the same; the
        parameters are new objects, so make the optimizer again. Returns the network.
        """
        packed.unpack(self)
        return self

    def layer_tensors(self, flat: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Each layer's ``(weight, bias)`` as views of ``flat``, by name.

        ``flat`` is laid out as the network's ``flat`` parameter, which it defaults to:
        pass ``net.flat.grad`` for the layers' gradients. Names as in the state dict of
        an unpacked network (``"hidden_layers.0"``, ``"output_layer"``, ...); the bias is
        None for a layer without one (the context projections).
        """
        if "flat" not in self._parameters:
            raise ValueError("this network is unpacked: its layers hold their own parameters")
        if flat is not None and flat.shape != self.flat.shape:
            raise ValueError(
                f"flat must have the shape of the network's flat parameter, "
                f"{tuple(self.flat.shape)}, got {tuple(flat.shape)}"
            )
        names = [name.removesuffix(".") for name, _ in self._named_layers()]
        return dict(zip(names, packed.split_flat(self, flat), strict=True))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Return the parameters, shape ``(*batch, *out_shape)``."""
        self._check(x, context)
        try:
            held = self.__dict__.get("_held_views")  # inside MADE.masked_weights_held
            grad = torch.is_grad_enabled()
            if held is not None and held[0] == threading.get_ident():
                pieces = held[1].get(grad)  # views with a graph only where one is recorded
                if pieces is None:
                    pieces = held[1][grad] = packed.split_flat(self)
            else:
                pieces = packed.split_flat(self)  # one split for all the layers (None unpacked)
            hidden = len(self.hidden_layers)
            h = x
            for i, layer in enumerate(self.hidden_layers):
                h = layer(h, *pieces[i]) if pieces else layer(h)
                if context is not None:
                    projection = self.context_layers[i]
                    j = hidden + 1 + i
                    h = h + (projection(context, *pieces[j]) if pieces else projection(context))
                h = self.activation(h)
            out = self.output_layer(h, *pieces[hidden]) if pieces else self.output_layer(h)
            if self.context_output is not None and context is not None:
                projection = self.context_output
                out = out + (projection(context, *pieces[-1]) if pieces else projection(context))
        except RuntimeError as error:  # no cost on the happy path: explain, then re-raise
            self._explain(x, context, error)
            raise
        return out.unflatten(-1, self.out_shape)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # a scaled network's state (a factor beside a dense layer's weight) loads into a
        # fresh one: its dense layers become ScaledLinear first (the children load next)
        from pyroflows.nn.made import MaskedLinear  # made.py builds on this module

        named = [(f"hidden_layers.{k}.", m) for k, m in enumerate(self.hidden_layers)]
        for name, layer in [*named, ("output_layer.", self.output_layer)]:
            plain = not isinstance(layer, (ScaledLinear, MaskedLinear))
            if plain and isinstance(layer, nn.Linear) and prefix + name + "scale" in state_dict:
                _made_scaled(layer)
        # the state's weights as a weight and bias per layer, rewritten from an older
        # layout where need be (a state saved before its layers were scaled), then
        # packed again if this network is packed (states of either kind load into both)
        fits = packed.check_layout(self, state_dict, prefix, error_msgs)
        packed.scatter_state(self, state_dict, prefix)
        if "flat" in self._parameters and fits:
            for name, layer in self._named_layers():
                if isinstance(layer, PackedLinear):
                    layer._adopt(state_dict, prefix + name)
            packed.gather_state(self, state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not fits and prefix + "flat" in missing_keys:  # refused above, with the reason
            missing_keys.remove(prefix + "flat")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "flat" in self._parameters:  # the layers' sizes, checked when it loads
            destination[prefix + "flat_layout"] = packed.layout(self)

    @torch.no_grad()
    def scale_updates(self, reference_fan_in: int = 64) -> None:
        r"""Store each layer's weight as :math:`W = c\,W'`, :math:`c = \min(1, n_0 / n)`.

        ``n`` is the layer's fan-in and :math:`n_0` is ``reference_fan_in``. The outputs
        are unchanged (up to rounding); what changes is what an optimizer step does. Adam
        moves every stored entry by about its learning rate, and in its first steps a row's
        entries move together (their gradients share the sign of the unit's error times
        the input sign), so a pre-activation moves by about :math:`\text{lr}\cdot n\,
        \mathbb E|h|`: with ``lr = 0.01`` and ``n = 4000`` a log-scale jumps by tens in one
        step and the fit diverges. Stored as :math:`W'`, every layer moves by about
        :math:`\text{lr}\cdot \min(n, n_0)\,\mathbb E|h|`, as a layer of fan-in
        :math:`n_0` would (the "maximal update" scaling of the step with width; Yang &
        Hu 2021, arXiv:2011.14522). Layers with ``n <= n_0`` are left exactly as they
        are; so are the context projections.

        The factor :math:`c` lives in a buffer of the layer (a MADE's kept mask entries
        become :math:`c`; a dense layer becomes a :class:`ScaledLinear` holding :math:`c`),
        so a state dict carries it with the weight it belongs to: a scaled network's
        state loads into a fresh one (its dense layers become scaled), and a plain
        ``nn.Linear``'s into a :class:`ScaledLinear`, as the same map. The layers keep
        their ``Parameter`` objects (a dense one changes class in place), so an optimizer
        or a param store that holds them goes on stepping them. Calling it again with
        another reference re-scales from the current factor.
        """
        from pyroflows.nn.made import MaskedLinear  # made.py builds on this module

        reference_fan_in = check_positive_int(reference_fan_in, "reference_fan_in")
        layers = [*self.hidden_layers, self.output_layer]
        for layer in layers:
            target = min(1.0, reference_fan_in / layer.in_features)
            if isinstance(layer, MaskedLinear):
                factor = layer.mask
                now = float(factor.max())  # the kept entries' current factor
                if now == 0.0:  # no connection kept (a MADE's output for D = 1)
                    continue
            elif isinstance(layer, ScaledLinear):
                factor = layer.scale
                now = float(factor)
            else:
                if target == 1.0:
                    continue
                layer = _made_scaled(layer)  # the same module and parameters
                factor, now = layer.scale, 1.0
            if abs(target - now) > 1e-6 * target:  # the factor is stored in float32
                layer.weight.mul_(now / target)
                factor.mul_(target / now)

    def _explain(self, x: torch.Tensor, context: torch.Tensor | None, error: RuntimeError) -> None:
        """Raise a clear error for what made ``F.linear`` or an addition fail.

        An ``x`` of another dtype or device than the weights, or one whose batch shape
        does not broadcast with the context's.
        """
        if context is not None:
            try:
                torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"x has batch shape {tuple(x.shape[:-1])}, which does not broadcast with "
                    f"the context's batch shape {tuple(context.shape[:-1])}"
                ) from error
        weight = (self.hidden_layers[0] if len(self.hidden_layers) else self.output_layer).weight
        if x.dtype != weight.dtype:
            fix = (
                f"convert one of them (x.to({weight.dtype}) or net.to({x.dtype}))"
                if x.is_floating_point()
                else f"x must be floating point: x.to({weight.dtype})"
            )
            raise TypeError(
                f"x has dtype {x.dtype} but the network's weights are {weight.dtype}; no "
                f"silent cast is made: {fix}"
            ) from error
        if x.device != weight.device:
            raise ValueError(
                f"x is on device {x.device} but the network's weights are on "
                f"{weight.device}; move one of them with .to()"
            ) from error

    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        """Clear errors for what ``F.linear`` would report in its own words.

        Two comparisons on the happy path: this runs on every call of every flow layer.
        """
        x_event = self.__dict__.get("_x_event")
        if x_event is None:  # made once (also for modules pickled before it existed)
            first = self.hidden_layers[0] if len(self.hidden_layers) else self.output_layer
            x_event = self.__dict__["_x_event"] = torch.Size([first.in_features])
            self.__dict__["_context_event"] = torch.Size([self.context_features])
        try:
            ok = x.shape[-1:] == x_event
        except AttributeError:
            ok = False
        if not ok:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (*batch, {x_event[0]}), got {shape}")
        expected = self.context_features
        if context is None:
            if expected:
                raise ValueError(
                    f"context is missing: this network was built with context={expected}"
                )
            return
        if not expected:
            raise ValueError("context was given to a network built with context=0")
        try:
            ok = context.shape[-1:] == self.__dict__["_context_event"] and context.dtype == x.dtype
        except AttributeError:
            raise TypeError(
                f"context must be a tensor of shape (*batch, {expected}), got "
                f"{type(context).__name__}"
            ) from None
        if ok:
            return
        if context.shape[-1:] != self.__dict__["_context_event"]:
            raise ValueError(
                f"context must have shape (*batch, {expected}), got {tuple(context.shape)}"
            )
        raise TypeError(f"context has dtype {context.dtype} but x has {x.dtype}")


class MLP(ContextTrunk):
    r"""Multilayer perceptron that outputs ``params`` numbers for each of ``out_features``.

    .. math::
        h_0 = x, \quad h_{l} = \sigma(W_l h_{l-1} + V_l c + b_l), \quad
        \theta = W_{L+1} h_L + b_{L+1}

    The context :math:`c` (optional) enters *every* hidden layer through its own linear map
    :math:`V_l`, so it can modulate all depths of the network. It is projected once per
    call and broadcast against the input's batch shape, so a context of shape ``(*B, c)``
    serves inputs of shape ``(n, *B, in_features)`` without being copied.

    The output layer starts at zero (``zero_init=True``), so a coupling layer built on an
    untrained MLP is exactly the identity.

    Args:
        in_features: size of the input's last dimension.
        out_features: number of output dimensions.
        params: numbers produced per output dimension (2 for an affine map).
        hidden: sizes of the hidden layers.
        context: size of the context vector, 0 for none.
        activation: a module class or callable returning a module, e.g. ``nn.ReLU``.
        zero_init: start the output layer at zero.
        params_first: output shape ``(*batch, params, out_features)`` instead of
            ``(*batch, out_features, params)``: each parameter a contiguous slice.

    Shapes:
        ``x``: ``(*batch, in_features)``; ``context``: ``(*batch, context)``;
        output: ``(*batch, out_features, params)``.

    Example:
        >>> net = MLP(3, 2, params=2, hidden=(16,), context=4)
        >>> net(torch.randn(10, 3), torch.randn(10, 4)).shape
        torch.Size([10, 2, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        params: int = 1,
        hidden: Sequence[int] = (64, 64),
        context: int = 0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init: bool = True,
        params_first: bool = False,
    ) -> None:
        in_features = check_positive_int(in_features, "in_features")
        out_features = check_positive_int(out_features, "out_features")
        params = check_positive_int(params, "params")
        params_first = check_bool(params_first, "params_first")
        context = check_positive_int(context, "context", minimum=0)
        sizes = (in_features, *check_hidden(hidden))
        super().__init__(
            [PackedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)],
            PackedLinear(sizes[-1], out_features * params),
            (params, out_features) if params_first else (out_features, params),
            context,
            activation,
            zero_init,
        )
        self.in_features = in_features
