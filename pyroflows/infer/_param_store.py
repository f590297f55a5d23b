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
the same name, checked at every call. Where the entry holds another tensor:

* a tensor no mirror put there (a loaded store, ``set_state``; or one a mirror put in
  the store before a ``pyro.clear_param_store()``, which ``set_state`` put back) wins:
  its values are copied into the module's tensor in place, as ``load_state_dict`` does,
  so the optimizer's state and any aliases keep the module's tensors. Only a store that
  covers the whole module, with the same shapes and no entries of its own under the
  module's name, is taken; a store of another guide (another flow, size or model) is
  refused, naming the entries and the way out (``pyro.clear_param_store()``);
* a tensor a mirror put there (another guide of the same name, say a notebook cell run
  again) is taken over, values unchanged: the new guide starts afresh. Not by a copy of
  a guide (``copy.deepcopy``, ``torch.load``: a *passive* mirror) while another live
  guide holds the names: a snapshot called for its draws, or trained on its own,
  leaves that guide, the store and ``pyro.optim``'s names for it alone.

Every guide then states its parameters with :func:`register`: ``pyro.module``'s param
sites, but carrying the module's own tensors, so SVI trains the guide that ran, whether
or not the store holds its tensors (it does, except for such a copy).

A module registered twice under one name in a single run (two guides, one default name)
is refused. With Pyro's ``module_local_params`` setting, there is no global store to
keep: nothing is done.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro.nn.module import _is_module_local_param_enabled
from pyro.params.param_store import param_with_module_name
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK, effectful
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn
from torch.distributions import constraints

from pyroflows.nn import packed
from pyroflows.nn.mlp import ContextTrunk

# id(tensor) -> (a weak reference to it, the store's generation when it was put there):
# every tensor some mirror put in the store
_MIRRORED: dict[int, tuple[weakref.ref, int]] = {}
# store name -> the live mirror that last put a tensor there
_HOLDERS: weakref.WeakValueDictionary[str, StoreMirror] = weakref.WeakValueDictionary()

_ADVICE = (
    "it holds another guide's values under these names (another flow, its size, or "
    "another model?). Call pyro.clear_param_store() before building this guide, or load "
    "the store that was saved with it"
)


# the param store's dict when last looked at, and a count of the dicts seen (a cleared
# store's dict, and its tensors, stay held until a guide's next call looks again)
_STORE: list[Any] = [None, 0]


def _generation() -> int:
    """A number that changes when ``pyro.clear_param_store()`` gives the store a new dict.

    The dict is held (not its id, which CPython hands out again after a few clears), so
    a new one is always told from it. ``named_parameters().mapping`` is a new read-only
    view at each call: not the dict.
    """
    entries = pyro.get_param_store()._params
    if entries is not _STORE[0]:
        _STORE[0] = entries
        _STORE[1] += 1
    return _STORE[1]


def _mark(tensor: torch.Tensor) -> None:
    key = id(tensor)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _MIRRORED.get(key, (None,))[0] is ref:
            del _MIRRORED[key]

    _MIRRORED[key] = (weakref.ref(tensor, forget), _generation())


def _mirrored(tensor: torch.Tensor) -> bool:
    """Whether a mirror put ``tensor`` in the store, since it was last cleared.

    ``pyro.clear_param_store()`` gives the store a new dict: a tensor a mirror put in
    the old one and found in the new one was put back by the user
    (``set_state`` of an earlier ``get_state``), so its values are to be taken.
    """
    ref, where = _MIRRORED.get(id(tensor), (None, None))
    return ref is not None and ref() is tensor and where == _generation()


class StoreMirror:
    """Keeps the ``state_dict`` tensors of named modules as Pyro's param store entries.

    ``mirror(modules, owner)`` with ``modules`` a mapping from the ``pyro.module`` name
    to the module; the store name of tensor ``key`` of module ``name`` is
    ``param_with_module_name(name, key)``, the name ``pyro.module`` gives a parameter
    (a tensor reached under several keys keeps the first). Returns the store names whose
    values were taken from the store. ``owner`` names the guide in error messages.
    Costs a few dictionary look-ups per tensor and call.

    Args:
        passive: a copy's mirror (see the module docstring): it does not take entries
            over from any live mirror that holds them.
    """

    def __init__(self, passive: bool = False) -> None:
        self.passive = passive
        self._collected = False
        self._built_for: tuple[tuple[str, int], ...] = ()
        self._slots: list[tuple[str, dict, str]] = []
        self._packed: list[tuple[str, ContextTrunk]] = []
        self._unpacked: list[tuple[str, ContextTrunk]] = []

    def _tensors(self, modules: Mapping[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
        identity = tuple((name, id(module)) for name, module in modules.items())
        if identity != self._built_for:
            self._forget_stale()  # renamed (put in an AutoGuideList) or rebuilt
            slots, seen = [], set()
            for name, root in modules.items():
                keys = set(root.state_dict(keep_vars=True))
                for prefix, module in root.named_modules(remove_duplicate=False):
                    for table in (module._parameters, module._buffers):
                        for attr, tensor in table.items():
                            key = f"{prefix}.{attr}" if prefix else attr
                            if key in keys and id(tensor) not in seen:
                                seen.add(id(tensor))
                                slots.append((param_with_module_name(name, key), table, attr))
            self._slots, self._built_for = slots, identity
            trunks = [
                (param_with_module_name(name, f"{prefix}." if prefix else ""), module)
                for name, root in modules.items()
                for prefix, module in root.named_modules()
                if isinstance(module, ContextTrunk)
            ]
            self._packed = [(p, m) for p, m in trunks if "flat" in m._parameters]
            self._unpacked = [(p, m) for p, m in trunks if "flat" not in m._parameters]
        try:
            return [(store_name, table[attr]) for store_name, table, attr in self._slots]
        except KeyError:  # a slot emptied: a network packed or unpacked (new tensors)
            self._built_for = ()
            return self._tensors(modules)

    def _forget_stale(self) -> None:
        """Remove the store entries this mirror holds under its previous names."""
        if not self._slots or _is_module_local_param_enabled():
            return
        store = pyro.get_param_store()
        entries = store.named_parameters().mapping
        for store_name, table, attr in self._slots:
            tensor = table.get(attr)
            if tensor is not None and entries.get(store_name) is tensor:
                del store[store_name]

    def __call__(self, modules: Mapping[str, nn.Module], owner: str) -> list[str]:
        if _is_module_local_param_enabled():
            return []
        tensors = self._tensors(modules)
        self._refuse_replayed_strangers(tensors, owner)
        self._refuse_twice_in_one_run(tensors, owner)
        store = pyro.get_param_store()
        # a read-only view of the store's dict (``get_state`` would strip Pyro's weak
        # references from every tensor, which a running ``JitTrace_ELBO`` needs)
        entries = store.named_parameters().mapping
        if self.passive and self._held_by_another(tensors):
            return []  # a copy leaves the store to the live guide that holds the names
        for store_prefix, trunk in self._packed:
            flat = entries.get(store_prefix + "flat")  # absent, or this guide's own
            if store_prefix + "output_layer.weight" in entries and (
                flat is None or _mirrored(flat)
            ):
                _pack_store_entries(store, entries, store_prefix, trunk)
        for store_prefix, trunk in self._unpacked:
            flat = entries.get(store_prefix + "flat")
            if flat is not None and not _mirrored(flat):
                _unpack_store_entry(store, entries, store_prefix, trunk)
        taken, foreign = [], []
        generation = _generation()
        for store_name, tensor in tensors:
            theirs = entries.get(store_name)
            if theirs is tensor:
                # its own, perhaps put back after a clear: its own from now on, so a guide
                # of the same name made later starts afresh (not with these values)
                if _MIRRORED.get(id(tensor), (None, generation))[1] != generation:
                    _mark(tensor)
                continue
            if theirs is None or _mirrored(theirs):
                taken.append((store_name, tensor))
            else:
                foreign.append((store_name, tensor, theirs))
        if foreign:
            self._check(foreign, len(tensors), modules, entries, owner)
            with torch.no_grad():
                for _, tensor, theirs in foreign:
                    tensor.copy_(theirs)
            taken.extend((store_name, tensor) for store_name, tensor, _ in foreign)
        for store_name, tensor in taken:
            if store_name in entries:
                del store[store_name]
            store.set_state(
                {"params": {store_name: tensor}, "constraints": {store_name: constraints.real}}
            )
            _mark(tensor)
            _HOLDERS[store_name] = self
        if taken:
            self._drop_leftovers(modules, tensors)
        return [store_name for store_name, _, _ in foreign]

    @staticmethod
    def _drop_leftovers(modules: Mapping[str, nn.Module], tensors: list) -> None:
        """Remove entries under this guide's names that an earlier guide of them put there.

        A guide of the same name with another architecture (a flow, then none; fewer
        layers) leaves entries this one does not have: the store, saved, would hold them
        and could not be loaded into this guide. Entries no guide put there (a loaded
        store) are left for :meth:`_check` to refuse.
        """
        store = pyro.get_param_store()
        entries = store.named_parameters().mapping
        mine = {store_name for store_name, _ in tensors}
        for name in _entries_beside(modules, entries, mine):
            if _mirrored(entries[name]):
                del store[name]
                _HOLDERS.pop(name, None)

    def _held_by_another(self, tensors: list[tuple[str, torch.Tensor]]) -> bool:
        holders = {_HOLDERS.get(store_name) for store_name, _ in tensors} - {None, self}
        if holders and not self._collected:
            # the guide it was copied from may be unreachable but not yet collected
            self._collected = True
            gc.collect()
            holders = {_HOLDERS.get(store_name) for store_name, _ in tensors} - {None, self}
        return bool(holders)

    @staticmethod
    def _refuse_replayed_strangers(tensors: list[tuple[str, torch.Tensor]], owner: str) -> None:
        """``JitTrace_ELBO`` replays the store's tensors by name: they must be this guide's."""
        for messenger in _PYRO_STACK:
            params = getattr(messenger, "params", None)
            if not isinstance(messenger, ReplayMessenger) or params is None:
                continue
            for store_name, tensor in tensors:
                value = params.get(store_name)
                if value is not None and value is not tensor:
                    raise ValueError(
                        f"{owner}: the loss replays Pyro's param store by name "
                        f"(JitTrace_ELBO), and the store's {store_name!r} is another live "
                        "guide's (the one this guide was copied from, say), so this guide "
                        "would not train: use Trace_ELBO, or let the other guide go first"
                    )

    @staticmethod
    def _refuse_twice_in_one_run(tensors: list[tuple[str, torch.Tensor]], owner: str) -> None:
        """Two modules under one name in one traced run: SVI would train only the last."""
        for messenger in _PYRO_STACK:
            if not isinstance(messenger, TraceMessenger):
                continue
            nodes = messenger.trace.nodes
            for store_name, tensor in tensors:
                site = nodes.get(store_name)
                if site is not None and site["type"] == "param" and site["value"] is not tensor:
                    raise ValueError(
                        f"{owner}: another module was registered under the name "
                        f"{store_name!r} earlier in this run; Pyro keeps one parameter per "
                        "name, so only one of them would train. Give each its own name"
                    )

    @staticmethod
    def _check(foreign: list, count: int, modules, entries, owner: str) -> None:
        """Take a store only if it is this module's whole state, shape for shape."""
        shapes = [
            f"{name!r}: the store's {tuple(theirs.shape)}, this guide's {tuple(tensor.shape)}"
            for name, tensor, theirs in foreign
            if theirs.shape != tensor.shape
        ]
        if shapes:
            raise ValueError(
                f"Pyro's param store does not fit {owner}: shapes differ for "
                f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}; {_ADVICE}"
            )
        if len(foreign) != count:
            held = ", ".join(repr(name) for name, _, _ in foreign[:2])
            raise ValueError(
                f"Pyro's param store holds new values for {len(foreign)} of {owner}'s "
                f"{count} tensors ({held}, ...), not all of them (a store saved from a "
                f"guide keeps all its tensors; to set some values, use the guide's "
                f"load_state_dict): {_ADVICE}"
            )
        extra = _entries_beside(modules, entries, {name for name, _, _ in foreign})
        if extra:
            raise ValueError(
                f"Pyro's param store holds {len(extra)} entries under {owner}'s names that "
                f"it does not have ({', '.join(map(repr, extra[:2]))}, ...): {_ADVICE}"
            )


def _pack_store_entries(store, entries, store_prefix: str, trunk: ContextTrunk) -> None:
    """A loaded store's weight and bias per layer, as one ``flat`` entry for the network.

    What a store saved by an earlier pyroflows holds (its networks held a parameter per
    layer). Its values are joined as :meth:`ContextTrunk.load_state_dict` joins such a
    state; an incomplete set, or one of other sizes, is left for :meth:`StoreMirror._check`
    to refuse with the names.
    """
    layers = tuple(store_prefix + name for name, _ in trunk._named_layers())
    names = [
        name for name in entries if name.startswith(layers) and name.endswith((".weight", ".bias"))
    ]
    if any(_mirrored(entries[name]) for name in names):
        return  # a live guide's entries, not a loaded store
    state = {name[len(store_prefix) :]: entries[name].detach() for name in names}
    missing: list[str] = []
    errors: list[str] = []
    packed.gather_state(trunk, state, "", missing, errors)
    if missing or errors or "flat" not in state:
        return
    for name in names:
        del store[name]
    flat = store_prefix + "flat"
    if flat in entries:  # this guide's own, from a call before the store was loaded
        del store[flat]
    store.set_state({"params": {flat: state["flat"]}, "constraints": {flat: constraints.real}})


def _unpack_store_entry(store, entries, store_prefix: str, trunk: ContextTrunk) -> None:
    """A loaded store's ``flat`` entry, as a weight and bias per layer of the network.

    What a store saved from a packed network holds, loaded into the same network built
    unpacked (more than :data:`~pyroflows.nn.packed.PACK_LIMIT` parameters, or
    :meth:`ContextTrunk.unpack`). A ``flat`` of another size is left for
    :meth:`StoreMirror._check` to refuse with the names.
    """
    flat = store_prefix + "flat"
    state = {"flat": entries[flat].detach()}
    packed.scatter_state(trunk, state, "")
    if "flat" in state:  # another layout
        return
    for name in state:
        if store_prefix + name in entries:  # this guide's own, from an earlier call
            del store[store_prefix + name]
    del store[flat]
    store.set_state(
        {
            "params": {store_prefix + name: value.clone() for name, value in state.items()},
            "constraints": {store_prefix + name: constraints.real for name in state},
        }
    )


def _entries_beside(modules: Mapping[str, nn.Module], entries, known: set[str]) -> list[str]:
    """The store's entries under the modules' names (``name$$$...``) that are not ``known``."""
    prefixes = tuple(param_with_module_name(name, "") for name in modules)
    return [name for name in entries if name.startswith(prefixes) and name not in known]


class MirrorsParamStore:
    """Mixin for a guide: its :class:`StoreMirror`, made on first use, not pickled.

    A guide made by unpickling (``torch.load``, ``copy.deepcopy``) gets a *passive*
    mirror: it leaves the store to a live guide that holds the names.
    """

    def _mirror(self) -> StoreMirror:
        mirror = self.__dict__.get("_store_mirror")
        if mirror is None:
            passive = self.__dict__.get("_store_passive", False)
            mirror = self.__dict__["_store_mirror"] = StoreMirror(passive=passive)
        return mirror

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_store_mirror", None)  # tied to this process's param store
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_store_passive"] = True  # a copy


def check_identity(
    store_name: str,
    ours: torch.Tensor,
    modules: Mapping[str, nn.Module],
    mismatch: Callable[[], str],
) -> None:
    """Refuse a store whose ``store_name`` entry, which says what a guide is for, differs.

    ``ours`` is a mirrored buffer of fixed shape that names what the guide was built
    for (its model's latent sites); a store saved from a guide for something else holds
    another value there, and is refused with ``mismatch()`` (a ``ValueError``) before the
    mirror could copy its values in. A store saved before the entry existed, holding
    values for the guide's other entries (those of ``modules``, as named for
    :class:`StoreMirror`), gets a copy of ``ours``, so the mirror takes it whole as before.
    """
    if _is_module_local_param_enabled():
        return
    store = pyro.get_param_store()
    entries = store.named_parameters().mapping
    theirs = entries.get(store_name)
    if theirs is None:
        prefixes = tuple(param_with_module_name(name, "") for name in modules)
        own = {id(t) for m in modules.values() for t in m.state_dict(keep_vars=True).values()}
        if any(
            name.startswith(prefixes) and id(t) not in own and not _mirrored(t)
            for name, t in entries.items()
        ):
            copy = ours.detach().clone()
            store.set_state(
                {"params": {store_name: copy}, "constraints": {store_name: constraints.real}}
            )
        return
    if theirs is ours or _mirrored(theirs):
        return  # its own, or another guide's that the mirror takes over without its values
    if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.device), ours):
        raise ValueError(mismatch())


def register(modules: Mapping[str, nn.Module]) -> None:
    """``pyro.module(name, module)``'s param sites, carrying the module's own parameters.

    ``pyro.module`` puts the store's tensors in the sites (SVI's optimizer steps what the
    sites hold); these are the module's, which the mirror keeps as the store's entries,
    so the two agree, and a copy that leaves the store alone still trains. Under Pyro's
    ``module_local_params`` setting these are the statements ``PyroModule`` makes for a
    plain ``nn.Module`` child, which leave the global store alone too.
    """
    for name, module in modules.items():
        for key, param in module.named_parameters():
            if not param.requires_grad:
                continue
            store_name = param_with_module_name(name, key)
            # what pyro.param's value carries, and what SVI steps: site["value"].unconstrained()
            param.unconstrained = weakref.ref(param)
            _statement(
                store_name, param, constraint=constraints.real, event_dim=None, name=store_name
            )


def _returns_its_value(name: str, value: torch.Tensor, **kwargs) -> torch.Tensor:
    return value


_statement = effectful(_returns_its_value, type="param")
