r"""Base classes: the cache every flow layer shares, and the conditional plumbing.

Direction (see DESIGN.md): a transform maps the base side ``u`` to the data side ``x``.
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

from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from pyroflows._checks import broadcast_shape, check_event, check_positive_int


def _parameters(module: nn.Module) -> tuple[nn.Parameter, ...]:
    """The module's parameters, listed once and kept.

    Walking the module tree on every call of a flow layer would cost more than the layer's
    own arithmetic on small batches. The list holds the ``Parameter`` objects, which
    ``.to()``, ``.double()`` and ``load_state_dict`` update in place, so it stays right.
    """
    found = module.__dict__.get("_parameter_list")
    if found is None:
        found = tuple(module.parameters())
        module.__dict__["_parameter_list"] = found
    return found


def _reference(module: nn.Module) -> torch.Tensor:
    """A tensor whose dtype and device stand for the module's."""
    params = _parameters(module)
    if params:
        return params[0]
    for tensor in module.buffers():
        if tensor.is_floating_point():
            return tensor
    raise TypeError(f"{type(module).__name__} holds no parameter or buffer to take a dtype from")


class _CachedBijection:
    """Caching for the last ``(u, x, ladj)`` triple, in either direction.

    A hit needs the very same tensor objects (``is``), unchanged parameters (their version
    counters, which ``optimizer.step()`` bumps, so the cache never goes stale after a
    step, unlike pyro#2542), and, if grad mode is on now, grad mode on when the entry was
    made (else its ``ladj`` would carry no graph). So ``d.log_prob(d.rsample())`` runs no
    inverse and no second network pass: an IAF layer scores its own samples for free.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

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

    def _key(self) -> tuple[Any, ...]:
        return tuple(p._version for p in _parameters(self._owner()))

    def _lookup(self, u: torch.Tensor | None, x: torch.Tensor | None):
        entry = self._cache
        if entry is None or not self._use_cache:
            return None
        cu, cx, ladj, (key, grad) = entry
        if (u is not None and u is not cu) or (x is not None and x is not cx):
            return None
        if (torch.is_grad_enabled() and not grad) or key != self._key():
            return None
        return entry

    def _store(self, u: torch.Tensor, x: torch.Tensor, ladj: torch.Tensor) -> None:
        if self._use_cache:
            # straight into __dict__: nn.Module.__setattr__ costs more than the rest of this
            self.__dict__["_cache"] = (u, x, ladj, (self._key(), torch.is_grad_enabled()))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Map base-side ``u`` to data-side ``x``."""
        hit = self._lookup(u, None)
        if hit is not None:
            return hit[1]
        x, ladj = self._fwd(u)
        self._store(u, x, ladj)
        return x

    def _inv_call(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._lookup(None, x)
        if hit is not None:
            return hit[0]
        u, ladj = self._bwd(x)
        self._store(u, x, ladj)
        return u

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log|\det \partial y / \partial x|` for ``y = t(x)``, shape ``batch``.

        (Pyro names the arguments ``x`` (input) and ``y`` (output); here the input is the
        base side ``u`` and the output the data side.)
        """
        hit = self._lookup(x, y)
        if hit is not None:
            return hit[2]
        return self._ladj(x, y)

    def clear_cache(self) -> None:
        """Forget the cached triple."""
        self._cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_cache"] = None  # cached tensors may carry a graph and cannot be pickled
        return state


class FlowTransform(_CachedBijection, TransformModule):
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

    def _fwd(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_event(u, "u", self.dim, _reference(self))
        return self._forward(u, None)

    def _bwd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_event(x, "x", self.dim, _reference(self))
        return self._backward(x, None)

    def _ladj(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._log_abs_det(u, x, None)

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        return self._forward(u, context)[1]

    def extra_repr(self) -> str:
        """Sizes, shown by ``repr``."""
        return f"dim={self.dim}"


class ConditionalFlowTransform(ConditionalTransformModule):
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

    def condition(self, context: torch.Tensor) -> ConditionedTransform:
        """Bind ``context`` (shape ``(*batch, context)``) and return a plain transform."""
        check_event(context, "context", self.context_features, _reference(self))
        return ConditionedTransform(self, context)

    def _log_abs_det(self, u: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None):
        return self._forward(u, context)[1]

    def extra_repr(self) -> str:
        """Sizes, shown by ``repr``."""
        return f"dim={self.dim}, context={self.context_features}"


class ConditionedTransform(_CachedBijection, Transform):
    """A :class:`ConditionalFlowTransform` with its context bound: ``u -> x`` given ``c``.

    Inputs broadcast against the context: with a context of shape ``(*B, c)``, ``u`` may
    have shape ``(*B, dim)``, ``(n, *B, dim)`` or ``(dim,)`` (then expanded to ``B``).
    """

    def __init__(self, owner: ConditionalFlowTransform, context: torch.Tensor) -> None:
        super().__init__(cache_size=0)
        self.owner = owner
        self.context = context
        self._use_cache = owner._use_cache
        self._cache = None

    def _owner(self) -> nn.Module:
        return self.owner

    def _broadcast(self, value: torch.Tensor, name: str) -> torch.Tensor:
        check_event(value, name, self.owner.dim, _reference(self.owner))
        batch = value.shape[:-1]
        shape = broadcast_shape(batch, self.context.shape[:-1])
        if shape is None:
            raise ValueError(
                f"{name} has batch shape {tuple(batch)}, which does not broadcast with the "
                f"context's batch shape {tuple(self.context.shape[:-1])}"
            )
        return value if shape == batch else value.expand(*shape, value.shape[-1])

    def _fwd(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner._forward(self._broadcast(u, "u"), self.context)

    def _bwd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner._backward(self._broadcast(x, "x"), self.context)

    def _ladj(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.owner._log_abs_det(
            self._broadcast(u, "u"), self._broadcast(x, "x"), self.context
        )

    def __repr__(self) -> str:
        owner, shape = type(self.owner).__name__, tuple(self.context.shape)
        return f"ConditionedTransform({owner}, context={shape})"
