"""Input checks shared by every layer.

Each error names the argument, what was expected and what came, so a user can fix the
call without reading our code.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterable

import numpy as np
import torch

#: The half-precision floating dtypes, which some layers compute in float32 or refuse.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= ``minimum``, else raise.

    Any integral type is taken (NumPy's ``int64`` from ``np.arange`` or a scikit-learn
    parameter grid included) and returned as a plain ``int``; ``bool`` and floats are not.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` as a ``bool`` if it is one (NumPy's ``bool_`` too), else raise.

    A truthy string such as ``"no"`` must not switch an option on.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_number(value: object, name: str, minimum: float = 0.0, strict: bool = True) -> float:
    """Return ``value`` as a finite ``float`` above ``minimum`` (or at it when not ``strict``).

    Python, NumPy and 0-d tensor reals are taken; ``bool`` and other types are not.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bound}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_permutation(value: object, name: str, size: int) -> torch.Tensor:
    """``value`` as a ``long`` tensor holding a permutation of ``range(size)``, else raise.

    Every entry must be an integer (Python, NumPy or an integer tensor's): ``2.9`` is
    refused, not truncated to 2.
    """
    expected = f"{name} must be a permutation of range({size}) (a sequence of ints)"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        items = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else list(value)
    except TypeError:
        raise ValueError(f"{expected}, got {value!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{expected}, got {items!r}")
    perm = torch.tensor(items, dtype=torch.long)
    if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
        raise ValueError(f"{expected}, got {perm.tolist()}")
    return perm


def check_hidden(hidden: object, name: str = "hidden") -> tuple[int, ...]:
    """Return hidden layer sizes as a tuple of positive ints."""
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Iterable) or isinstance(hidden, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of positive ints, got {hidden!r}")
    return tuple(check_positive_int(size, f"every entry of {name}") for size in hidden)


def check_choice(value: object, name: str, choices: Iterable[object]) -> object:
    """Return ``value`` if it is one of ``choices``, else raise naming ``name``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_event(x: object, name: str, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of shape ``(*batch, dim)`` with ``like``'s dtype.

    ``like`` is a parameter or buffer of the layer, so a float64 input to a float32 layer
    (or one on another device) is refused instead of silently cast.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (*batch, {dim}), got {type(x).__name__}"
        )
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (*batch, {dim}), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor ({like.dtype}), got dtype {x.dtype}")
    if x.dtype != like.dtype:
        method = {torch.float64: "double()", torch.float32: "float()"}.get(
            x.dtype, f"to({x.dtype})"
        )
        raise TypeError(
            f"{name} has dtype {x.dtype} but the flow's parameters are {like.dtype}; no silent "
            f"cast is made: call flow.{method} or pass {name}.to({like.dtype})"
        )
    if x.device != like.device:
        raise ValueError(
            f"{name} is on device {x.device} but the flow's parameters are on {like.device}; "
            f"move one of them with .to()"
        )
    return x


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, or ``None`` if they do not broadcast.

    What ``torch.broadcast_shapes`` gives, in plain Python: that function costs several
    microseconds a call, which a flow's ``log_prob`` would pay on every training step.
    """
    if len(a) < len(b):
        a, b = b, a
    out = list(a)
    offset = len(a) - len(b)
    for i, y in enumerate(b):
        x = a[offset + i]
        if x == y or y == 1:
            continue
        if x != 1:
            return None
        out[offset + i] = y
    return tuple(out)


def check_context_broadcast(
    batch: tuple[int, ...], name: str, context_batch: tuple[int, ...]
) -> tuple[int, ...]:
    """The broadcast of ``name``'s batch shape with the context's, or a ``ValueError``."""
    shape = broadcast_shape(batch, context_batch)
    if shape is None:
        raise ValueError(
            f"{name} has batch shape {tuple(batch)}, which does not broadcast with the "
            f"context's batch shape {tuple(context_batch)}"
        )
    return shape


def check_finite(value: torch.Tensor, name: str, why: str) -> None:
    """Refuse a tensor holding NaN or infinite values, saying where the first one is.

    One reduction; callers run it when distribution validation is on (torch's default,
    ``pyro.enable_validation(False)`` turns it off), as torch checks a ``Normal``'s
    parameters. Skipped while tracing (``torch.jit.trace``) and under
    ``torch.func.vmap``, where a tensor has no truth value.
    """
    if torch.jit.is_tracing():
        return
    try:
        if bool(torch.isfinite(value).all()):
            return
    except RuntimeError:  # under torch.func.vmap: no data-dependent check can run
        return
    bad = ~torch.isfinite(value)
    first = tuple(bad.nonzero()[0].tolist())
    raise ValueError(
        f"{name} holds {int(bad.sum())} NaN or infinite value(s) of {value.numel()} (the "
        f"first, {value[first].item()}, at index {first}); {why}"
    )


def check_finite_context(context: torch.Tensor) -> None:
    """Refuse a context holding NaN or infinite values (they would give NaN draws silently)."""
    check_finite(
        context,
        "context",
        "a flow conditioned on it would give NaN draws and log-densities (check the network "
        "or data that made the context)",
    )


def warn_from_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the user's call, not at pyroflows, Pyro or torch.

    The first frame outside those three packages: a guide set up inside ``svi.step`` is
    reached through Pyro's and torch's frames.
    """
    packages = tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for module in (sys.modules[__package__], sys.modules.get("pyro"), sys.modules["torch"])
        if module is not None and getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(1), 2  # level 1 is this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(packages):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
