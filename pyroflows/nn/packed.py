"""One flat parameter for a whole network: its layers' weights and biases as views into it.

An optimizer pays per tensor it steps: torch's Adam on the CPU runs about eight small
kernels for every parameter tensor, whatever its size. A flow of five MADEs with two
hidden layers holds 30 weight and bias tensors, and for the small networks flows use
(width 64, batch 512) those kernels cost about a fifth of a training step. Packed, the
same flow holds five tensors, one per network, and the step is 5-15% faster (less
with ``fused=True``, which updates all the tensors in one call); the maths and the
numbers of the network are unchanged. Large networks (more than :data:`PACK_LIMIT`
parameters) are built unpacked: for them the copy of the gradient that packing costs
outweighs the per-tensor saving.

A packed network's ``flat`` parameter is the concatenation of its layers' weights and
biases (each flattened, in the order of :meth:`ContextTrunk._named_layers
<pyroflows.nn.mlp.ContextTrunk._named_layers>`). The network splits it into views once
per call (one ``split``, whose backward is one ``cat``) and hands each layer its own.
``layer.weight`` and ``layer.bias`` still read as tensors of the usual shapes: views of
``flat``, made afresh at each read, so they follow ``.to()``, loads and swaps of
``flat``. A write into one under ``torch.no_grad()`` writes into ``flat``; gradients
accumulate in ``flat.grad``, and ``layer.weight.grad`` reads the layer's part of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyroflows._torch_modes import functorch_active

if TYPE_CHECKING:
    from pyroflows.nn.mlp import ContextTrunk


#: The most parameters a network is packed with as built. Above it the saving per tensor
#: is small beside the cost of ``split``'s backward, a ``cat`` that copies the whole
#: gradient. An IAF training step on the CPU (5 layers, torch's Adam, one thread) took
#: 0.78-0.98x the unpacked time with 7k-115k parameters a network, 1.00-1.09x with 259k
#: and 1.05-1.25x from 460k to 7.3M (``benchmarks/packing.py``, table in
#: ``benchmarks/results/packing.md``). On an H200 GPU every size took 0.99-1.08x
#: (``packing_cuda.md``): there the steps are bound by kernel launches.
PACK_LIMIT = 2**17


_PACKED_HINT = (
    "{what} needs the layer's own parameters, but this layer's weight and bias are views "
    "of its network's one 'flat' parameter (pyroflows packs each conditioner's weights "
    "into one tensor); call unpack() on the network first (e.g. "
    "flow.transforms[0].conditioner.unpack()), then make the optimizer again"
)


class _Piece:
    """A packed layer's ``weight`` or ``bias``: its own parameter, or a view of ``flat``.

    Read in this order: the layer's own parameter (unpacked, or ``None`` for a layer
    without bias), a plain tensor set on the layer (what pruning keeps in ``weight``),
    then the view of the network's ``flat``.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: nn.Module | None, owner: type | None = None) -> Tensor | None:
        if layer is None:
            return self  # type: ignore[return-value]
        name, state = self.name, layer.__dict__
        table = state["_parameters"]
        if name in table:
            return table[name]
        if name in state:
            return state[name]
        packed = state.get("_packed")
        if packed is None:  # during nn.Linear.__init__: not there yet (hasattr must say no)
            raise AttributeError(f"'{type(layer).__name__}' object has no attribute '{name}'")
        trunk, slots = packed
        index = slots[name]
        if index is None:
            return None
        sizes, shape = trunk.__dict__["_pack_sizes"], trunk.__dict__["_pack_shapes"][index]
        start, flat = sum(sizes[:index]), trunk.flat
        view = flat.narrow(0, start, sizes[index]).view(shape)
        if isinstance(flat, nn.Parameter) and view.requires_grad and not view.is_leaf:
            # ``layer.weight.grad`` reads the layer's slice of ``flat.grad`` (a view's own
            # ``grad`` is never filled by backward, and reading it would warn)
            grad = flat.grad
            if grad is None:
                # torch.func refuses retain_grad in its transforms (and vmap reads
                # repr(module) as it unwraps its outputs: Linear.extra_repr reads bias)
                if not functorch_active():
                    view.retain_grad()  # reads None without torch's non-leaf warning
            else:
                view.grad = grad.narrow(0, start, sizes[index]).view(shape)
        return view

    def __set__(self, layer: nn.Module, value: Tensor | None) -> None:
        if "_packed" in layer.__dict__:
            raise TypeError(_PACKED_HINT.format(what=f"setting {self.name!r}"))
        layer.__dict__[self.name] = value

    def __delete__(self, layer: nn.Module) -> None:
        if self.name not in layer.__dict__:
            raise AttributeError(self.name)
        del layer.__dict__[self.name]


class PackedLinear(nn.Linear):
    r"""``nn.Linear`` whose weight and bias can live in its network's flat parameter.

    :math:`y = W x + b`, weight :math:`W` of shape ``(out_features, in_features)``. Built,
    it holds its own parameters as any ``nn.Linear`` does; once a
    :class:`~pyroflows.nn.mlp.ContextTrunk` packs it, ``weight`` and ``bias`` are views
    of the network's ``flat`` parameter (made afresh at each read) and the layer holds no
    parameter of its own. Subclasses change the map through :meth:`_map` (a mask, a
    factor on the weight).

    The network calls it as ``layer(x, weight, bias)`` with the views it split once for
    all its layers; called as ``layer(x)``, it reads its own.
    """

    #: the weight, ``(out_features, in_features)``
    weight = _Piece()
    #: the bias, ``(out_features,)``, or None
    bias = _Piece()

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the layer; ``weight`` and ``bias`` default to its own."""
        if weight is None:
            weight, bias = self.weight, self.bias
        return self._map(x, weight, bias)

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """As ``nn.Module``'s; a non-parameter given to a packed layer gets a clear error.

        What pruning does to a layer's ``weight`` (it registers the weight it reads as a
        new parameter), which for a packed layer is a view: the remedy is ``unpack()``.
        """
        if "_packed" in self.__dict__ and param is not None and not isinstance(param, nn.Parameter):
            raise TypeError(_PACKED_HINT.format(what=f"registering {name!r}"))
        super().register_parameter(name, param)

    def requires_grad_(self, requires_grad: bool = True) -> PackedLinear:
        """As ``nn.Module``'s; a packed layer has no parameter of its own to set."""
        if "_packed" in self.__dict__:
            raise ValueError(_PACKED_HINT.format(what="requires_grad_() on one layer"))
        return super().requires_grad_(requires_grad)

    def _adopt(self, state_dict: dict, prefix: str) -> None:
        """Rewrite an older layout of this layer's entries in ``state_dict`` in place.

        Idempotent: the network calls it before it packs the entries, the layer again
        when it loads them itself (unpacked).
        """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._adopt(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def pack(trunk: ContextTrunk) -> None:
    """Move the weights and biases of ``trunk``'s layers into one parameter ``trunk.flat``.

    New parameter objects: an optimizer or a param store that held the old ones must be
    made again. Does nothing to a packed network.
    """
    if "flat" in trunk._parameters:
        return
    layers = [layer for _, layer in trunk._named_layers()]
    pieces: list[torch.Tensor] = []
    plan: list[tuple[int, torch.Size, int | None]] = []
    for layer in layers:
        if type(layer) is nn.Linear:  # a dense layer pickled by an older version
            layer.__class__ = PackedLinear
        weight, bias = layer._parameters["weight"], layer._parameters.get("bias")
        plan.append((len(pieces), weight.shape, None if bias is None else len(pieces) + 1))
        pieces += [weight] if bias is None else [weight, bias]
    frozen = {p.requires_grad for p in pieces}
    if len(frozen) > 1:
        names = [name for name, layer in trunk._named_layers() if not layer.weight.requires_grad]
        raise ValueError(
            f"cannot pack a network whose layers are partly frozen (requires_grad False "
            f"in {', '.join(n.removesuffix('.') for n in names) or 'a bias'}): one flat "
            f"parameter trains or not as a whole; unfreeze them, or keep it unpacked"
        )
    requires_grad = frozen == {True}
    flat = torch.cat([p.detach().reshape(-1) for p in pieces])
    for layer, (w, _, b) in zip(layers, plan, strict=True):
        del layer._parameters["weight"]
        if b is not None:
            del layer._parameters["bias"]
        layer.__dict__["_packed"] = (trunk, {"weight": w, "bias": b})
    trunk.__dict__["_pack_sizes"] = [p.numel() for p in pieces]
    trunk.__dict__["_pack_shapes"] = [p.shape for p in pieces]
    trunk.__dict__["_pack_plan"] = plan
    trunk.flat = nn.Parameter(flat, requires_grad=requires_grad)


def unpack(trunk: ContextTrunk) -> None:
    """Give each layer of ``trunk`` its own weight and bias parameters again.

    For what needs a layer's own ``Parameter``: pruning, ``parametrize``, weight norm,
    a parameter group per layer, freezing one layer. New parameter objects (copies of
    the packed values): make the optimizer again. Does nothing to an unpacked network.
    """
    flat = trunk._parameters.get("flat")
    if flat is None:
        return
    layers = [layer for _, layer in trunk._named_layers()]
    parts = flat.detach().split(trunk.__dict__["_pack_sizes"])
    for layer, (w, shape, b) in zip(layers, trunk.__dict__["_pack_plan"], strict=True):
        layer.__dict__.pop("_packed")
        layer.weight = nn.Parameter(parts[w].view(shape).clone(), flat.requires_grad)
        if b is not None:
            layer.bias = nn.Parameter(parts[b].clone(), flat.requires_grad)
    del trunk._parameters["flat"]
    for key in ("_pack_sizes", "_pack_shapes", "_pack_plan", "_flat_views"):
        trunk.__dict__.pop(key, None)


#: a layer's weight and bias (None for a layer without one)
Pieces = tuple[Tensor, Tensor | None]


def layout(trunk: ContextTrunk) -> Tensor:
    """Each layer's ``(out_features, in_features, has_bias)``, one row per layer.

    Saved beside ``flat`` in a state dict, so that a state of layers of other sizes but
    the same total (hidden ``(8, 16)`` and ``(16, 8)``) is refused, not split wrongly.
    """
    rows = [
        (layer.out_features, layer.in_features, int(layer.bias is not None))
        for _, layer in trunk._named_layers()
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def check_layout(trunk: ContextTrunk, state_dict: dict, prefix: str, error_msgs: list) -> bool:
    """Pop the state's layout; False (with a message) if its layers are not this network's.

    Then the state's ``flat`` is popped too: it is not loaded, and the caller keeps it
    out of the missing keys.
    """
    theirs = state_dict.pop(prefix + "flat_layout", None)
    if theirs is None:
        return True
    ours = layout(trunk)
    if (
        isinstance(theirs, Tensor)
        and theirs.shape == ours.shape
        and torch.equal(theirs.cpu(), ours)
    ):
        return True
    shown = theirs.tolist() if isinstance(theirs, Tensor) else type(theirs).__name__
    error_msgs.append(
        f"size mismatch for {prefix}flat: the state's layers (out, in, bias) are {shown}, "
        f"this network's are {ours.tolist()}."
    )
    state_dict.pop(prefix + "flat", None)
    return False


def split_flat(trunk: ContextTrunk, tensor: Tensor | None = None) -> list[Pieces] | None:
    """Each layer's ``(weight, bias)`` as views of ``tensor``, by default ``trunk.flat``.

    One ``split`` for all the layers; None for an unpacked network. ``tensor`` is any
    tensor laid out as ``flat`` (its gradient, an optimizer's state for it).

    Without gradients to record (sampling, scoring under ``no_grad``), the views of
    ``flat`` are made once and kept: they see every in-place write (an optimizer step, a
    load), and new data for ``flat`` (``.to()``, ``p.data = ...``, a swapped tensor)
    makes them anew. A D-pass inverse calls the network ``D`` times per layer, and the
    split would otherwise cost as much as a small layer's product.
    """
    flat = trunk._parameters.get("flat")
    if flat is None:
        return None
    if tensor is not None:
        return _split(trunk, tensor)
    if (flat.requires_grad and torch.is_grad_enabled()) or not _keepable(flat):
        return _split(trunk, flat)
    kept = trunk.__dict__.get("_flat_views")
    if kept is not None and kept[0] is flat and kept[1] == flat.data_ptr():
        return kept[2]
    # of a detached alias: views of flat itself would hold it, and torch's swap_tensors
    # (a .to() or a load under torch.__future__'s swap setting) refuses a held tensor
    views = _split(trunk, flat.detach())
    trunk.__dict__["_flat_views"] = (flat, flat.data_ptr(), views)
    return views


def _split(trunk: ContextTrunk, tensor: Tensor) -> list[Pieces]:
    parts = tensor.split(trunk.__dict__["_pack_sizes"])
    return [
        (parts[w].view(shape), None if b is None else parts[b])
        for w, shape, b in trunk.__dict__["_pack_plan"]
    ]


def _keepable(flat: Tensor) -> bool:
    """Whether views of ``flat`` may be kept past this call (a plain eager parameter)."""
    return (
        isinstance(flat, nn.Parameter)  # not a tensor swapped in by functional_call or vmap
        and not torch.is_inference_mode_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def gather_state(
    trunk: ContextTrunk, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list
) -> None:
    """Turn per-layer ``weight``/``bias`` entries of ``state_dict`` into one ``flat`` entry.

    For a state saved unpacked (by an earlier version, or after :func:`unpack`) loading
    into a packed network. Entries it lacks keep the network's current values and are
    reported missing, and a shape that does not fit is reported as torch reports it.
    """
    names = [(prefix + name, layer) for name, layer in trunk._named_layers()]
    keys = [key + part for key, _ in names for part in ("weight", "bias")]
    if prefix + "flat" in state_dict or not any(key in state_dict for key in keys):
        return
    current = trunk._parameters["flat"].detach().split(trunk.__dict__["_pack_sizes"])
    values: list[Tensor | None] = [None] * len(current)
    for (key, _), (w, shape, b) in zip(names, trunk.__dict__["_pack_plan"], strict=True):
        for part, index, want in (("weight", w, shape), ("bias", b, None)):
            if index is None:
                continue
            value = state_dict.get(key + part)
            if value is None:
                missing_keys.append(key + part)
                continue
            expected = want if want is not None else current[index].shape
            if not isinstance(value, torch.Tensor) or value.shape != expected:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                error_msgs.append(
                    f"size mismatch for {key + part}: copying a param with shape {got} "
                    f"from checkpoint, the shape in current model is {tuple(expected)}."
                )
                continue
            values[index] = value.reshape(-1)
    # in the state's dtype and device (a load with assign=True takes them), the
    # network's own values where the state has none
    like = next((v for v in values if v is not None), current[0])
    for key in keys:
        state_dict.pop(key, None)
    state_dict[prefix + "flat"] = torch.cat(
        [c.to(like) if v is None else v for v, c in zip(values, current, strict=True)]
    )


def scatter_state(trunk: ContextTrunk, state_dict: dict, prefix: str) -> None:
    """Turn a ``flat`` entry of ``state_dict`` into a ``weight`` and ``bias`` per layer.

    The layout is the network's own. A ``flat`` of another size is left for torch to
    report (a size mismatch packed, an unexpected key unpacked).
    """
    flat = state_dict.get(prefix + "flat")
    if not isinstance(flat, torch.Tensor):
        return
    parts = [
        (prefix + name + part, tensor.shape)
        for name, layer in trunk._named_layers()
        for part in ("weight", "bias")
        if (tensor := getattr(layer, part)) is not None
    ]
    sizes = [shape.numel() for _, shape in parts]
    if flat.shape != (sum(sizes),):
        return
    del state_dict[prefix + "flat"]
    for (key, shape), piece in zip(parts, flat.split(sizes), strict=True):
        state_dict[key] = piece.view(shape)
