r"""Base classes: the cache every flow layer shares, and the conditional plumbing.

Direction (Pyro's): a transform maps the base side ``u`` to the data side ``x``.
``t(u)`` samples, ``t.inv(x)`` scores, ``t.log_abs_det_jacobian(u, x)`` is
:math:`\\log|\\det \\partial x / \\partial u|`, one number per batch element.

A subclass supplies the maths as three methods, each taking an optional context:

* ``_forward(u, context) -> (x, ladj)``
* ``_backward(x, context) -> (u, ladj)`` (``ladj`` still of the forward map)
* ``_log_abs_det(u, x, context) -> ladj`` computed from whichever side is cheap.

The same maths serves the unconditional :class:`FlowTransform` and, through
:meth:`ConditionalFlowTransform.condition`, a :class:`ConditionedTransform` that binds one
context tensor.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints
from torch.optim.optimizer import register_optimizer_step_post_hook

from pyroflows._checks import check_context_broadcast, check_event, check_positive_int
from pyroflows._pickling import DropsParamStoreLinks, drop_param_store_links
from pyroflows._pyro_module import RefusesPyroModule

#: optimizer steps taken in this process, by any ``torch.optim`` optimizer: a cached
#: triple is served only under the count it was made under. Version counters see most
#: steps, but not those that write through ``.data`` (Pyro's ``ClippedAdam``) or in a
#: fused kernel (``Adam(fused=True)``); torch calls this hook after every step of every
#: optimizer (a subclass's too), so those are seen as well.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _forget_tensor_lists(module: nn.Module, incompatible_keys: Any = None) -> None:
    """Drop the kept tensor slots and caches (a ``load_state_dict`` post-hook)."""
    for sub in module.modules():
        for kept in _KEPT:
            sub.__dict__.pop(kept, None)
        if "_cache" in sub.__dict__:
            sub.__dict__["_cache"] = None
        if isinstance(sub, ConditionalFlowTransform):
            # for the conditioned transforms made before, which hold their own caches
            sub.__dict__["_generation"] = sub.__dict__.get("_generation", 0) + 1


#: what a module keeps in its __dict__ to find its tensors fast (older versions kept lists)
_KEPT = ("_tensor_slots", "_parameter_list", "_tensor_list")


def _slots(module: nn.Module) -> tuple[tuple[dict, str], ...]:
    """Where the module's parameters, then its buffers, live: ``(owner's dict, name)`` pairs.

    Listed once and kept: walking the module tree on every call of a flow layer would cost
    more than the layer's own arithmetic on small batches. The tensors themselves are read
    from these slots at each use, so a tensor swapped in (``pyro.module(...,
    update_module_params=True)``, ``torch.func.functional_call``, ``load_state_dict(
    assign=True)``) is seen at once, and a slot emptied (pruning, ``parametrize``, weight
    norm move a parameter elsewhere) makes the list anew. ``.to()``, loads and
    :meth:`~_CachedBijection.clear_cache` drop the list (call the last after replacing a
    submodule).
    """
    found = module.__dict__.get("_tensor_slots")
    if found is None:
        modules = [m for _, m in module.named_modules(remove_duplicate=True)]
        seen: set[int] = set()
        found_list: list[tuple[dict, str]] = []
        for kind in ("_parameters", "_buffers"):
            for m in modules:
                table = m.__dict__[kind]
                for name, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen:  # shared: once
                        seen.add(id(tensor))
                        found_list.append((table, name))
        found = tuple(found_list)
        module.__dict__["_tensor_slots"] = found
    _watch_loads(module)  # also for a module unpickled from an older version
    return found


def _tensors(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The module's parameters and buffers (masks, orders, permutations), as they are now."""
    try:
        found = tuple([table[name] for table, name in _slots(module)])
    except KeyError:  # a slot was emptied since the list was made
        found = None
    if found is None or any(tensor is None for tensor in found):  # a bias set to None
        module.__dict__.pop("_tensor_slots", None)
        found = tuple([table[name] for table, name in _slots(module)])
    return found


def _watch_loads(module: nn.Module) -> None:
    if not module.__dict__.get("_watching_loads"):
        module.register_load_state_dict_post_hook(_forget_tensor_lists)
        module.__dict__["_watching_loads"] = True


def _reference(module: nn.Module) -> torch.Tensor:
    """A tensor whose dtype and device stand for the module's (its first floating one)."""
    for tensor in _tensors(module):
        if tensor.is_floating_point():
            return tensor
    raise TypeError(f"{type(module).__name__} holds no parameter or buffer to take a dtype from")


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two cache keys (tensors, states) match: the same objects, unchanged."""
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(map(operator.is_, a[0], b[0]))


#: which side of a cached triple the layer computed itself (the other was given to it)
_MADE_FORWARD, _MADE_INVERSE = 0, 1


def _watch_backward(x: torch.Tensor) -> list[bool]:
    """``[claimed, spent]`` for a cached output ``x``, ``spent`` set by a backward through it.

    ``t(u)`` may serve ``x`` again for its ``u`` (torch's ``ComposeTransform`` re-applies
    each part while scoring) only while ``x``'s graph stands: a backward through ``x``
    frees it, and ``x`` served after that could not be differentiated again (a loop over
    a fixed ``u`` that checks ``t.inv(t(u))`` before or after each backward). A hook on
    ``x``, put on when it is stored, says when. Where none can go on (a tensor of a
    ``torch.func`` transform), ``x`` counts as spent from the start; an ``x`` with no
    graph never is. (About 8 us a layer's draw.)
    """
    claim = [False, False]
    if x.requires_grad:
        try:
            x.register_hook(_Spend(claim))
        except RuntimeError:
            claim[1] = True
    return claim


class _Spend:
    """The hook of :func:`_watch_backward` (not saved with the tensor, and says so to torch)."""

    __slots__ = ("claim",)
    __torch_unserializable__ = True

    def __init__(self, claim: list[bool]) -> None:
        self.claim = claim

    def __call__(self, grad: torch.Tensor) -> None:
        self.claim[0], self.claim[1] = False, True


class _CachedBijection:
    """Caching for the last ``(u, x, ladj)`` triple, in either direction.

    A hit is served for ``t.inv(x)`` of the ``x`` its last ``t(u)`` returned, for ``t(u)``
    of the ``u`` its last ``t.inv(x)`` returned, for ``t(u)`` of the ``u`` its last ``t(u)``
    was given once ``t.inv`` has been served that call's output and until the pair's log-det
    is served or a backward passes through that output (torch's ``ComposeTransform``
    re-applies each part to find the log-det while scoring), and for
    ``log_abs_det_jacobian`` of the cached pair. So ``d.log_prob(d.rsample())`` runs no
    inverse and no second network pass (an IAF layer scores its own samples for free, in a
    list of layers or a ``ComposeTransform``), while a tensor the caller passes in is
    computed afresh: a data batch to score, and a base draw pushed through again, also after
    its output was scored (in a loop over a fixed ``u``, a hit would hand back a graph
    already freed by ``backward``, or, after an optimizer that writes through ``.data`` such
    as Pyro's ``ClippedAdam``, an output of the old weights). A hit also needs the same
    tensor objects (``is``), unchanged in place and in ``requires_grad`` since (their
    version counters, the cached log-det's too), the layer's parameters and buffers the same
    objects and unchanged (their version counters, which ``optimizer.step()`` and
    ``load_state_dict`` bump), no optimizer step since (of any ``torch.optim`` optimizer,
    counted by a step hook: fused ones and Pyro's ``ClippedAdam`` write past the version
    counters), so the cache never goes stale after a step, unlike pyro#2542, nor after
    parameters are swapped in, and, if grad mode is on now, grad mode on when the entry was
    made (else its ``ladj`` would carry no graph).

    ``with_cache`` returns the layer itself: it caches already (Pyro's
    ``ComposeTransformModule(..., cache_size=1)`` and ``UnitJacobianReparam`` ask for it).

    Parameters given new data all at once (``p.data = ...`` for each, as torch's
    ``vector_to_parameters`` does) are seen by where the layer's first parameter's data
    live (unless, after several such swaps with no call of the layer between, the new
    data land where the cached ones were). New data for some other parameter alone is
    not seen; call :meth:`clear_cache` after such swaps to be sure. Writes *into* the data
    outside an optimizer's step that bypass version counters (``p.data.copy_(...)``,
    ``p.data.add_(...)``) are not seen: draw anew, or call :meth:`clear_cache`, before
    scoring an earlier draw after one (SVI draws anew at every step). A part set on the
    layer itself (``layer.conditioner = other``, ``layer.transformer = ...``,
    ``add_module``) empties the cache; a change deeper in (a new activation inside the
    conditioner, a spline's ``bound`` changed) is not seen: call :meth:`clear_cache` (or
    the flow's) after such surgery.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    #: the sign of the Jacobian's determinant: positive for every layer here but a
    #: permutation (monotone elementwise maps, positive scales, LU with a positive
    #: diagonal); torch's default raises, which stops ``torch.jit.trace`` of a module
    #: holding a layer (it reads the attributes with ``hasattr``)
    sign = +1

    _cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, ...]] | None

    # Supplied by the concrete class.
    def _owner(self) -> nn.Module:
        raise NotImplementedError

    def _fwd(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _bwd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _ladj(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _key(self) -> tuple[Any, ...] | None:
        # the tensors the layer computes with now, their version counters and whether
        # they require grad (requires_grad_() moves no counter, and a log-det cached with
        # frozen weights has no graph to them), one int each: 2 * version + requires_grad;
        # where the first parameter's data live: `p.data = ...` on every parameter
        # (torch's vector_to_parameters) swaps the storage without moving a counter (one
        # address, not all: reading each costs about 1% of an MAF training step); and the
        # optimizer steps so far, for the steps that move no counter
        tensors = _tensors(self._owner())
        try:
            states = [2 * t._version + t.requires_grad for t in tensors]
        except RuntimeError:  # a layer built under inference mode: nothing to watch
            return None
        return (tensors, (*states, *_storages(tensors[:1]), _OPTIMIZER_STEPS[0]))

    def _lookup(self, u: torch.Tensor | None, x: torch.Tensor | None):
        entry = self._cache
        if entry is None or not self._use_cache:
            return None
        cu, cx, ladj, (made, states, key, grad, claimed) = entry
        if u is None:  # t.inv(x): only of the x that t(u) computed
            if x is not cx or made != _MADE_FORWARD:
                return None
        elif x is None:  # t(u): of the u that t.inv(x) computed, or (see the docstring)
            if u is not cu or (made == _MADE_FORWARD and not claimed[0]):
                return None
        elif u is not cu or x is not cx:
            return None
        if (torch.is_grad_enabled() and not grad) or states != _states(cu, cx, ladj):
            return None
        if key is None:
            return None
        now = self._key()
        if now is None or not _same_key(key, now):
            return None
        if u is None:  # its own output scored: the pair is in a chain, until a backward
            claimed[0] = not claimed[1]
        return entry

    def _store(self, u: torch.Tensor, x: torch.Tensor, ladj: torch.Tensor, made: int) -> None:
        # inference-mode tensors have no version counter to watch: not cached
        if self._use_cache and not (u.is_inference() or x.is_inference()):
            claim = _watch_backward(x) if made == _MADE_FORWARD else [False, False]
            meta = (made, _states(u, x, ladj), self._key(), torch.is_grad_enabled(), claim)
            # straight into __dict__: nn.Module.__setattr__ costs more than the rest of this
            self.__dict__["_cache"] = (u, x, ladj, meta)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Map base-side ``u`` to data-side ``x``."""
        hit = self._lookup(u, None)
        if hit is not None:
            return hit[1]
        x, ladj = self._fwd(u)
        self._store(u, x, ladj, _MADE_FORWARD)
        return x

    def _inv_call(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._lookup(None, x)
        if hit is not None:
            return hit[0]
        u, ladj = self._bwd(x)
        self._store(u, x, ladj, _MADE_INVERSE)
        return u

    def inv_and_log_abs_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t.inv(x), t.log_abs_det_jacobian(t.inv(x), x))`` in one call.

        What a log-density needs from each layer, and what a flow's ``log_prob`` calls.
        The same values as the two calls; an ``x`` this layer computed is served from the
        cache as they would serve it. Otherwise the pair is computed and not kept: a
        log-density needs it no further, and the entry there (the last sample's, say)
        stays. The cache's bookkeeping that this spares (a second lookup, and keeping
        the pair) is 3-5% of an MAF or RealNVP training step at D = 8.
        """
        hit = self._lookup(None, x)
        if hit is not None:
            hit[3][4][0] = False  # the pair is scored, as log_abs_det_jacobian marks it
            return hit[0], hit[2]
        return self._bwd(x)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log|\det \partial y / \partial x|` for ``y = t(x)``, shape ``batch``.

        (Pyro names the arguments ``x`` (input) and ``y`` (output); here the input is the
        base side ``u`` and the output the data side.)
        """
        hit = self._lookup(x, y)
        if hit is not None:
            hit[3][4][0] = False  # the pair is scored: a later t(u) of this u is a new push
            return hit[2]
        return self._ladj(x, y)

    def clear_cache(self) -> None:
        """Forget the cached triple, and where the layer's tensors are (listed anew)."""
        self._cache = None
        self._owner().__dict__.pop("_tensor_slots", None)

    def with_cache(self, cache_size: int = 1):
        """This layer: it keeps its own cache of one triple (see the class docstring)."""
        return self

    def __getstate__(self) -> dict[str, Any]:
        if isinstance(self, nn.Module):
            drop_param_store_links(self)  # Pyro's weak references, which pickle refuses
        state = super().__getstate__()  # type: ignore[misc]
        state["_cache"] = None  # cached tensors may carry a graph and cannot be pickled
        for kept in _KEPT:  # rebuilt on first use
            state.pop(kept, None)
        return state


def _storages(tensors: tuple[torch.Tensor, ...]) -> list[int]:
    """Where each tensor's data live; none for tensors that have no storage to point to.

    (``torch.func`` wrappers and fake tensors; their functions are pure, and a hit
    needs the same tensor objects anyway.)
    """
    try:
        return [t.data_ptr() for t in tensors]
    except RuntimeError:
        return []


def _states(u: torch.Tensor, x: torch.Tensor, ladj: torch.Tensor) -> tuple[Any, ...]:
    """What an in-place write or ``requires_grad_`` would change in a cached triple."""
    return (u._version, x._version, ladj._version, u.requires_grad, x.requires_grad)


class _PartsEmptyTheCache(RefusesPyroModule):
    """A layer whose cache and tensor list go when a part is set on it.

    ``layer.conditioner = other``, ``layer.transformer = ...``, ``add_module`` and
    ``register_module`` give the layer other tensors or another map. The private names a
    layer sets per call (``_cache``, ``_order_cache``) are not parts.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if "_modules" in self.__dict__ and (
            isinstance(value, nn.Module) or not name.startswith("_")
        ):
            _forget_tensor_lists(self)  # type: ignore[arg-type]

    def add_module(self, name: str, module: nn.Module | None) -> None:
        """``nn.Module.add_module`` (``register_module`` too), then the cache emptied."""
        super().add_module(name, module)  # type: ignore[misc]
        _forget_tensor_lists(self)  # type: ignore[arg-type]


class FlowTransform(_CachedBijection, _PartsEmptyTheCache, TransformModule):
    """A learnable bijection ``u -> x`` on vectors of size ``dim`` (no context).

    Subclasses implement ``_forward``, ``_backward`` and ``_log_abs_det`` (see the module
    docstring); this class checks inputs and caches.

    Args:
        dim: size of the event (last) dimension.
        cache: keep the last ``(u, x, ladj)`` triple (see :class:`_CachedBijection`).
    """

    def __init__(self, dim: int, cache: bool = True) -> None:
        super().__init__(cache_size=0)  # torch's identity cache is replaced by ours
        self.dim = check_positive_int(dim, "dim")
        self._use_cache = bool(cache)
        self._cache = None

    def _owner(self) -> nn.Module:
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda(), ...
        # buffers are replaced by new tensors and a cached triple has the old dtype
        _forget_tensor_lists(self)
        return super()._apply(fn, recurse)

    def _fwd(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_event(u, "u", self.dim, _reference(self))
        return self._forward(u, None)

    def _bwd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_event(x, "x", self.dim, _reference(self))
        return self._backward(x, None)

    def _ladj(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        like = _reference(self)
        check_event(u, "u", self.dim, like)
        check_event(x, "x", self.dim, like)
        return self._log_abs_det(u, x, None)

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        return self._forward(u, context)[1]

    def extra_repr(self) -> str:
        """Sizes, shown by ``repr``."""
        return f"dim={self.dim}"

    # torch's Transform.__repr__ comes first in the MRO and shows no sizes or submodules
    __repr__ = nn.Module.__repr__


class ConditionalFlowTransform(
    DropsParamStoreLinks, _PartsEmptyTheCache, ConditionalTransformModule
):
    """A learnable bijection ``u -> x`` whose parameters depend on a context vector.

    ``t.condition(context)`` checks the context (shape ``(*batch, context)``, the flow's
    dtype and device) and returns a :class:`ConditionedTransform`: a plain Pyro transform
    with its own cache.

    Args:
        dim: size of the event dimension.
        context: size of the context vector (>= 1).
        cache: give conditioned transforms a cache.
    """

    def __init__(self, dim: int, context: int, cache: bool = True) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.context_features = check_positive_int(context, "context")
        self._use_cache = bool(cache)

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda(), ...
        _forget_tensor_lists(self)  # buffers are replaced by new tensors
        return super()._apply(fn, recurse)

    def condition(self, context: torch.Tensor) -> ConditionedTransform:
        """Bind ``context`` (shape ``(*batch, context)``) and return a plain transform."""
        check_event(context, "context", self.context_features, _reference(self))
        return ConditionedTransform(self, context)

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        return self._forward(u, context)[1]

    def extra_repr(self) -> str:
        """Sizes, shown by ``repr``."""
        return f"dim={self.dim}, context={self.context_features}"

    __repr__ = nn.Module.__repr__  # sizes and submodules, as for FlowTransform


class ConditionedTransform(_CachedBijection, Transform):
    """A :class:`ConditionalFlowTransform` with its context bound: ``u -> x`` given ``c``.

    Inputs broadcast against the context: with a context of shape ``(*B, c)``, ``u`` may
    have shape ``(*B, dim)``, ``(n, *B, dim)`` or ``(dim,)`` (then expanded to ``B``).
    """

    def __init__(self, owner: ConditionalFlowTransform, context: torch.Tensor) -> None:
        super().__init__(cache_size=0)
        self.owner = owner
        self.context = context
        # an inference-mode context has no version counter to watch: no cache
        self._use_cache = owner._use_cache and not context.is_inference()
        self._cache = None

    def _owner(self) -> nn.Module:
        return self.owner

    def _key(self) -> tuple[Any, ...] | None:
        # the context too: a context refilled in place changes the map
        key, context = super()._key(), self.context
        if key is None:
            return None
        generation = self.owner.__dict__.get("_generation", 0)  # .to(), .double(), loads
        where = _storages((context,))
        return (key[0], (*key[1], generation, context._version, context.requires_grad, *where))

    def _broadcast(self, value: torch.Tensor, name: str) -> torch.Tensor:
        check_event(value, name, self.owner.dim, _reference(self.owner))
        batch = value.shape[:-1]
        shape = check_context_broadcast(batch, name, self.context.shape[:-1])
        return value if shape == batch else value.expand(*shape, value.shape[-1])

    def forward_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """``x``'s shape for a ``u`` of ``shape``: the batch broadcast with the context's.

        So a ``TransformedDistribution`` (and Pyro's ``ConditionalTransformedDistribution``)
        of a base that does not have the context's batch shape has it: torch expands the
        base to :meth:`inverse_shape` of this, and the distribution's ``batch_shape``,
        ``sample`` and ``log_prob`` agree (``B`` contexts: ``B`` draws a sample).
        """
        batch = check_context_broadcast(tuple(shape[:-1]), "u", self.context.shape[:-1])
        return torch.Size((*batch, *shape[-1:]))

    def inverse_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """``u``'s shape for an ``x`` of ``shape``: the batch broadcast with the context's."""
        batch = check_context_broadcast(tuple(shape[:-1]), "x", self.context.shape[:-1])
        return torch.Size((*batch, *shape[-1:]))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Map base-side ``u`` (broadcast against the context) to data-side ``x``."""
        # broadcast before the cache: the pair cached, and what a hit of t.inv returns,
        # is the expanded u a fresh inverse would give (u itself when nothing expands)
        return super().__call__(self._broadcast(u, "u"))

    def _inv_call(self, x: torch.Tensor) -> torch.Tensor:
        return super()._inv_call(self._broadcast(x, "x"))

    def inv_and_log_abs_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t.inv(x), log|det|)`` of ``x`` broadcast against the context."""
        return super().inv_and_log_abs_det(self._broadcast(x, "x"))

    def _fwd(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.owner._forward(u, self.context)  # broadcast by __call__
        except TypeError as error:
            self._check_context_dtype(error)
            raise

    def _bwd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.owner._backward(x, self.context)  # broadcast by _inv_call
        except TypeError as error:
            self._check_context_dtype(error)
            raise

    def _ladj(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u, x = self._broadcast(u, "u"), self._broadcast(x, "x")
        try:
            return self.owner._log_abs_det(u, x, self.context)
        except TypeError as error:
            self._check_context_dtype(error)
            raise

    def _check_context_dtype(self, error: TypeError) -> None:
        """After a ``TypeError``: name a context bound before the layer changed dtype.

        ``condition`` checks the context against the layer's dtype; a ``.double()`` or
        ``.float()`` of the layer (or its flow) afterwards leaves the bound context behind,
        and the network would only say that its context and its input differ.
        """
        dtype = _reference(self.owner).dtype
        if self.context.dtype != dtype:
            raise TypeError(
                f"this layer was conditioned on a {self.context.dtype} context, but its "
                f"weights are now {dtype} (the layer or its flow changed dtype after "
                f"condition()): condition it again, layer.condition(context.to({dtype})), "
                f"or for a Flow call flow(context) again"
            ) from error

    def __repr__(self) -> str:
        owner, shape = type(self.owner).__name__, tuple(self.context.shape)
        return f"ConditionedTransform({owner}, context={shape})"
