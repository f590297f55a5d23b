"""Model files: a flow's configuration, weights and standardisation, safe to open.

A model file is what ``torch.save`` writes for a dict of plain values and tensors:

=================  ====================================================================
key                value
=================  ====================================================================
``format``         ``"pyroflows-density"``
``version``        file format version (3; versions 1 and 2 are read too)
``flow``           builder name (``"maf"``, ``"nsf"``, ...)
``dim``            number of columns ``D``
``options``        the builder's keyword arguments, as plain values (activation by name)
``side``           ``nsf`` only: the splines' ``side`` as built, so that a later change
                   of default cannot change what a file means (version 1 files, written
                   before ``side`` existed, mean ``"base"``); ``None`` otherwise
``clamp_kind``     affine flows only: their log-scale clamp as built, ``"tanh"`` (version
                   1 and 2 files, written before the clamp became a ``tanh``, mean
                   ``"rational"``: see :class:`~pyroflows.transforms.Affine`); ``None``
                   otherwise
``dtype``          ``"float32"`` or ``"float64"``
``standardize``    whether the flow ends with a :class:`Standardization` layer
``dequantize``     whether it was fitted to dequantized integer data: True, False or
                   the list of the dequantized columns (0-based)
``columns``        column names, or ``None``
``state_dict``     the flow's weights and buffers (masks, orders, loc and scale)
``history``        the fit's :class:`~pyroflows.density.History` as a dict
``training``       the fit's settings (:data:`TRAINING_KEYS`: epochs, batch size, learning
                   rate, ...; ``seed`` is the seed ``fit`` drew the split and batches
                   with, ``random_state`` a ``FlowDensity``'s int ``random_state``, each
                   ``None`` if unknown), or ``None``; files written before it existed
                   lack it, which means ``None``
=================  ====================================================================

:func:`load` reads it with ``torch.load(weights_only=True)``, which unpickles only
tensors and plain containers, so opening a model file from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyroflows._checks import check_bool
from pyroflows.density.rows import dequantized_columns
from pyroflows.density.standardize import add_standardization
from pyroflows.flows import BUILDERS, Flow
from pyroflows.transforms import Affine, Permutation, RationalQuadratic
from pyroflows.transforms.elementwise import CLAMP_KINDS

FORMAT = "pyroflows-density"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: The settings of :func:`~pyroflows.density.fit` that a model file's ``training`` holds.
TRAINING_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "validation",
    "patience",
    "clip_grad",
    "schedule",
    "seed",
    "random_state",
)


class ModelFileError(ValueError):
    """A file that is not a pyroflows model, or cannot be read safely."""


def build(
    flow: str, dim: int, options: dict[str, Any] | None = None, *, standardize: bool = True
) -> Flow:
    """Build the flow that a model file (or an estimator) describes, with fresh weights.

    Args:
        flow: a name in :data:`pyroflows.BUILDERS`.
        dim: number of columns ``D``.
        options: the builder's keyword arguments as plain values: ``activation`` by name
            (one of :data:`ACTIVATIONS`), ``dtype`` as ``"float32"``/``"float64"``.
        standardize: end the flow with an (identity) :class:`Standardization` layer.

    A coupling flow needs ``D >= 2``; for ``D = 1`` ``nsf`` falls back to its
    autoregressive (MAF) form, the same spline on the one coordinate.
    """
    if flow not in BUILDERS:
        raise ValueError(f"flow must be one of {', '.join(sorted(BUILDERS))}; got {flow!r}")
    kwargs = dict(options or {})
    dtype = kwargs.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    activation = kwargs.pop("activation", "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    kwargs["activation"] = ACTIVATIONS[activation]
    if kwargs.get("hidden") is not None:  # None: the builder's default for this D
        kwargs["hidden"] = tuple(kwargs["hidden"])
    if flow == "nsf" and dim == 1 and not kwargs.get("autoregressive"):
        kwargs["autoregressive"] = "maf"
    try:
        model = BUILDERS[flow](dim, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for flow {flow!r}: {error}") from None
    model = model.to(DTYPES[dtype])
    if standardize:
        add_standardization(model)
    return model


def _build_saved(flow: str, dim: int, options: Any, standardize: bool) -> Flow:
    """:func:`build` for a saved model, also one the builders would refuse today.

    The builders now refuse coupling flows with ``permutation=None`` and several layers
    (the first half of the coordinates passes through every layer), but files written
    before may hold one: it is rebuilt with the permutation layers taken out again, the
    layout it was saved with.
    """
    legacy = (
        flow in ("realnvp", "nice", "nsf")
        and isinstance(options, dict)
        and "permutation" in options
        and options["permutation"] is None
        and not options.get("autoregressive")
    )
    if not legacy:
        return build(flow, dim, options, standardize=standardize)
    model = build(flow, dim, {**options, "permutation": "reverse"}, standardize=standardize)
    kept = [t for t in model.transforms if not isinstance(t, Permutation)]
    model.transforms = nn.ModuleList(kept)
    return model


def _maps_of(flow: Flow, kind: type) -> list[Any]:
    """The elementwise maps of type ``kind`` inside ``flow``'s coupling/autoregressive layers."""
    maps = (getattr(t, "transformer", None) for t in flow.transforms)
    return [m for m in maps if isinstance(m, kind)]


def save(
    path: str | os.PathLike,
    flow: Flow,
    *,
    name: str,
    options: dict[str, Any],
    standardize: bool,
    dequantize: bool | list[int] = False,
    columns: list[str] | None = None,
    history: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a model file (atomically); refuse to overwrite one unless ``force``.

    ``name``, ``options`` and ``standardize`` must be those that :func:`build` was given
    for ``flow``; ``training``, if given, the settings the fit ran with (keys among
    :data:`TRAINING_KEYS`, plain values). ``dequantize`` as :func:`fit` takes it (``True``,
    ``False`` or column indices), stored as :func:`dequantized_columns` writes it.
    """
    from pyroflows.density.fit import _save_atomic

    path = Path(path)
    if not check_bool(force, "force") and path.exists():
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    dtype = {v: k for k, v in DTYPES.items()}.get(flow.base_loc.dtype)
    if dtype is None:
        raise ValueError(
            f"a model file holds a float32 or float64 flow, got {flow.base_loc.dtype}: save "
            f"flow.float() (or flow.double())"
        )
    context = options.get("context") or 0
    if context != flow.context_features:
        raise ValueError(
            f"save: flow is {'conditional on a context of ' if flow.context_features else ''}"
            f"{flow.context_features or 'unconditional'}, but options give context="
            f"{options.get('context')!r}: the file would build another flow; pass the options "
            f"flow was built with"
        )
    # the file must load: its name and options, rebuilt as load rebuilds them, must take
    # flow's weights (other sizes or layers would be refused at load, the fit lost)
    try:
        with warnings.catch_warnings():  # (a narrow network's warning was said at its build)
            warnings.simplefilter("ignore")
            described = _build_saved(name, int(flow.dim), {**options, "dtype": dtype}, standardize)
        described.load_state_dict(flow.state_dict())
    except (TypeError, ValueError, RuntimeError) as error:
        first = " ".join(str(error).split())[:300]
        raise ValueError(
            f"save: the file could not be loaded: build({name!r}, {int(flow.dim)}, options, "
            f"standardize={bool(standardize)}) does not make a flow that takes flow's weights "
            f"({type(error).__name__}: {first}); pass the name and options flow was built "
            f"with, got options={options!r}"
        ) from None
    sides = {spline.side for spline in _maps_of(flow, RationalQuadratic)}
    clamp_kinds = {affine.clamp_kind for affine in _maps_of(flow, Affine)}
    if len(clamp_kinds) > 1:
        raise ValueError(
            f"flow mixes affine clamp kinds {sorted(clamp_kinds)}; a model file records one"
        )
    state = {
        "format": FORMAT,
        "version": VERSION,
        "flow": name,
        "dim": int(flow.dim),
        "options": {**options, "dtype": dtype},
        "side": sides.pop() if len(sides) == 1 else None,
        "clamp_kind": clamp_kinds.pop() if len(clamp_kinds) == 1 else None,
        "dtype": dtype,
        "standardize": bool(standardize),
        "dequantize": dequantized_columns(dequantize, int(flow.dim)),
        "columns": list(columns) if columns is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "history": history,
        "training": dict(training) if training is not None else None,
    }
    problem = _training_problem(state["training"])
    if problem is not None:
        raise ValueError(f"training: {problem}")
    _save_atomic(state, path)
    return path


def load(path: str | os.PathLike) -> tuple[Flow, dict[str, Any]]:
    """Read a model file: the fitted flow (in eval mode) and the file's other entries.

    Raises:
        ModelFileError: a missing file, one that is not a pyroflows model, one that
            holds anything but tensors and plain values (refused unread), or a damaged
            copy (a member that fails its zip CRC check).
    """
    from pyroflows.density.fit import damaged_member

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle errors come in many types
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            with open(path, "rb") as stream:
                zipped = stream.read(4) == b"PK\x03\x04"  # a zip's start, without its end
            reason = (
                "a truncated or corrupt zip archive"
                if zipped
                else "not the zip archive torch.save writes: a CSV, a .npy or another file?"
            )
        elif isinstance(error, pickle.UnpicklingError):
            reason = "it holds Python objects other than tensors and plain values"
        else:
            text = str(error).strip()
            reason = f"{type(error).__name__} {text.splitlines()[0] if text else ''}".strip()
        raise ModelFileError(
            f"{path}: not a readable pyroflows model file; torch.load(weights_only=True) "
            f"refused it unread ({reason})"
        ) from None
    damaged = damaged_member(path)
    if damaged is not None:
        raise ModelFileError(
            f"{path}: a damaged model file: its member {damaged} fails the zip CRC check "
            f"(a corrupted copy? fetch or write it again)"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a pyroflows model file (no '{FORMAT}' format tag)")
    version = state.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True, 1.0, "3"
        raise ModelFileError(
            f"{path}: model file version {version!r}, this pyroflows reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        options = state["options"]
        # version 1 files predate `side`: their splines are all on the base side
        side = state.get("side") if state["version"] > 1 else "base"
        if state["flow"] == "nsf" and side is not None and isinstance(options, dict):
            options = {**options, "side": side}  # the recorded side is what the file means
        flow = _build_saved(state["flow"], state["dim"], options, state["standardize"])
        flow.load_state_dict(state["state_dict"])
        # versions 1 and 2 predate the tanh clamp: their affine layers meant the rational one
        clamp_kind = state.get("clamp_kind") if state["version"] > 2 else "rational"
        if clamp_kind is not None and clamp_kind not in CLAMP_KINDS:
            raise ValueError(f"unknown clamp_kind {clamp_kind!r} (expected 'tanh' or 'rational')")
        if clamp_kind is not None:
            for affine in _maps_of(flow, Affine):
                affine.clamp_kind = clamp_kind
    except KeyError as error:
        raise ModelFileError(f"{path}: the model file lacks the entry {error}") from None
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: the flow it describes cannot be built: {error}") from None
    except RuntimeError as error:  # torch's first line names only the class: keep them all
        what = " ".join(line.strip() for line in str(error).strip().splitlines())
        raise ModelFileError(
            f"{path}: weights do not match the flow it describes: {what}"
        ) from None
    problem = _entry_problem(state)
    if problem is not None:
        raise ModelFileError(f"{path}: {problem}")
    flow.eval()
    info = {k: v for k, v in state.items() if k != "state_dict"}
    return flow, info


def _column_list(value: list, dim: object) -> bool:
    """Whether ``value`` is a list of some columns as :func:`dequantized_columns` writes it."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return False
    try:
        return dequantized_columns(value, dim) == value
    except (TypeError, ValueError):
        return False


def _entry_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the entries beside the flow's (``None``: nothing)."""
    from pyroflows.density.fit import History

    for key in ("standardize", "dequantize"):
        if key not in state:
            return f"the model file lacks the entry '{key}'"
        if isinstance(state[key], bool):
            continue
        some = key == "dequantize" and isinstance(state[key], list)  # some columns
        if not some or not _column_list(state[key], state.get("dim")):
            what = "True, False or a list of column indices" if key == "dequantize" else ""
            return f"its entry '{key}' must be {what or 'True or False'}, got {state[key]!r}"
    if state.get("dtype") not in DTYPES:
        return f"its entry 'dtype' must be one of {', '.join(DTYPES)}, got {state.get('dtype')!r}"
    columns = state.get("columns")
    if columns is not None and not (
        isinstance(columns, list)
        and len(columns) == state["dim"]
        and all(isinstance(c, str) for c in columns)
    ):
        return f"its entry 'columns' must be None or {state['dim']} column names, got {columns!r}"
    history = state.get("history")
    known = set(History.__dataclass_fields__)
    if history is not None and not (isinstance(history, dict) and set(history) <= known):
        return f"its entry 'history' must be None or a fit's history ({', '.join(sorted(known))})"
    problem = _training_problem(state.get("training"))
    return f"its entry 'training' {problem}" if problem is not None else None


def _training_problem(training: Any) -> str | None:
    """What is wrong with a ``training`` entry (``None``: nothing)."""
    if training is None:
        return None
    if not isinstance(training, dict):
        return f"must be None or a dict of fit settings, got {type(training).__name__}"
    unknown = sorted(map(str, set(training) - set(TRAINING_KEYS)))
    if unknown:
        return f"holds unknown settings {unknown} (known: {', '.join(TRAINING_KEYS)})"
    for key, value in training.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            return f"setting {key!r} must be a plain value, got {type(value).__name__}"
    return None
