"""A guide's modules kept in Pyro's param store, so that saving and loading the store works.

``pyro.module(name, m)`` puts ``m``'s parameters in the param store the first time it
sees their names; afterwards it returns the store's tensors and leaves ``m``'s own in
place (``update_module_params=False``). So when the store already holds tensors under
those names (one loaded with ``pyro.get_param_store().load``, or one not cleared since
an earlier guide of the same name) the module computes with its own parameters while
SVI's optimizer steps the store's: the loaded values are never used and the module never
trains, without a word. Pyro's ``AutoIAFNormal`` has the same fault; its ``AutoNormal``,
built on ``PyroParam``, takes the store's values.

:class:`StoreMirror` keeps each tensor of a module's ``state_dict`` (parameters and
persistent buffers: an anchor, a permutation, ActNorm's flag) as the store's entry of
the same name, checked at every call:

* an entry that is missing, or that holds a tensor some :class:`StoreMirror` put there
  (another live guide of the same name, an earlier one in a notebook, a ``deepcopy``
  snapshot), is taken over by the module's tensor, values unchanged;
* an entry that holds any other tensor (a loaded store, a value the user set with
  ``pyro.get_param_store()[name] = ...``) wins: its values are copied into the module's
  tensor in place, as ``load_state_dict`` does, so the optimizer's state and any aliases
  keep the module's tensors, and the module's tensor then takes the entry.

A store that holds such values for some of the names but not the others belongs to a
different guide (another flow, another model), and is refused, as is a shape that
differs: the error names the entries and the way out (``pyro.clear_param_store()``).
The module's parameters are then registered as usual with ``pyro.module``, which finds
its own tensors in the store.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import pyro
import torch
from pyro.params.param_store import param_with_module_name
from torch import nn
from torch.distributions import constraints

# id(tensor) -> a weak reference to the tensor: every tensor some mirror put in the store
_MIRRORED: dict[int, weakref.ref] = {}


def _mark(tensor: torch.Tensor) -> None:
    key = id(tensor)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _MIRRORED.get(key) is ref:
            del _MIRRORED[key]

    _MIRRORED[key] = weakref.ref(tensor, forget)


def _mirrored(tensor: torch.Tensor) -> bool:
    ref = _MIRRORED.get(id(tensor))
    return ref is not None and ref() is tensor


class StoreMirror:
    """Keeps the ``state_dict`` tensors of named modules as Pyro's param store entries.

    ``mirror(modules, owner)`` with ``modules`` a mapping from the ``pyro.module`` name
    to the module; the store name of tensor ``key`` of module ``name`` is
    ``param_with_module_name(name, key)``, the name ``pyro.module`` gives a parameter.
    Returns the store names whose values were taken from the store. ``owner`` names the
    guide in error messages. Costs a few dictionary look-ups per tensor and call.

    Not pickled: a guide drops its mirror when saved and makes a new one when called.
    """

    def __init__(self) -> None:
        self._built_for: tuple[int, ...] = ()
        self._slots: list[tuple[str, dict, str]] = []

    def _tensors(self, modules: Mapping[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
        identity = tuple(id(module) for module in modules.values())
        if identity != self._built_for:
            slots = []
            for name, root in modules.items():
                keys = set(root.state_dict(keep_vars=True))
                for prefix, module in root.named_modules(remove_duplicate=False):
                    for table in (module._parameters, module._buffers):
                        for attr in table:
                            key = f"{prefix}.{attr}" if prefix else attr
                            if key in keys:
                                keys.discard(key)
                                slots.append((param_with_module_name(name, key), table, attr))
            self._slots, self._built_for = slots, identity
        return [(store_name, table[attr]) for store_name, table, attr in self._slots]

    def __call__(self, modules: Mapping[str, nn.Module], owner: str) -> list[str]:
        store = pyro.get_param_store()
        # a read-only view of the store's dict (``get_state`` would strip Pyro's weak
        # references from every tensor, which a running ``JitTrace_ELBO`` needs)
        entries = store.named_parameters().mapping
        missing, adopted, claimed = [], [], []
        for store_name, tensor in self._tensors(modules):
            theirs = entries.get(store_name)
            if theirs is tensor:
                continue
            if theirs is None:
                missing.append((store_name, tensor))
            elif _mirrored(theirs):
                claimed.append((store_name, tensor))
            else:
                adopted.append((store_name, tensor, theirs))
        if adopted:
            self._check(adopted, missing, owner)
            with torch.no_grad():
                for _, tensor, theirs in adopted:
                    tensor.copy_(theirs)
        taken = [*missing, *claimed, *((name, tensor) for name, tensor, _ in adopted)]
        for store_name, tensor in taken:
            if store_name in entries:
                del store[store_name]
            store.set_state(
                {"params": {store_name: tensor}, "constraints": {store_name: constraints.real}}
            )
            _mark(tensor)
        return [store_name for store_name, _, _ in adopted]

    @staticmethod
    def _check(adopted: list, missing: list, owner: str) -> None:
        shapes = [
            f"{name!r}: the store's {tuple(theirs.shape)}, this guide's {tuple(tensor.shape)}"
            for name, tensor, theirs in adopted
            if theirs.shape != tensor.shape
        ]
        advice = (
            "it holds another guide's values under the same names (another flow, its size, "
            "or another model?). Call pyro.clear_param_store() before building this guide, "
            "or load the store that was saved with it"
        )
        if shapes:
            raise ValueError(
                f"Pyro's param store does not fit {owner}: shapes differ for "
                f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}; {advice}"
            )
        if missing:
            held = ", ".join(repr(name) for name, _, _ in adopted[:2])
            lacking = ", ".join(repr(name) for name, _ in missing[:2])
            raise ValueError(
                f"Pyro's param store holds {len(adopted)} of {owner}'s "
                f"{len(adopted) + len(missing)} tensors ({held}, ...) but not the other "
                f"{len(missing)} ({lacking}, ...): {advice}"
            )
