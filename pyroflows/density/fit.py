r"""Maximum-likelihood fitting of a flow to rows of data, with everything a fit needs.

:func:`fit` minimizes the mean negative log-likelihood of mini-batches,

.. math::
    \mathcal L(\theta) = -\frac{1}{|B|}\sum_{x \in B} \log p_\theta(x),

(for a conditional flow, :math:`-\frac{1}{|B|}\sum_{(x, c) \in B} \log p_\theta(x \mid c)`
over the rows and their contexts) with Adam, and keeps what a user would otherwise write by
hand: a validation split, early stopping on the validation NLL with the best weights
restored, an optional learning-rate schedule and gradient clipping, a progress bar, a
returned :class:`History`, and checkpoints that survive Ctrl-C and resume to the same
result as an uninterrupted run.

Scores are in the data's own units: the data are standardized by a fixed affine layer
appended to the flow (see :mod:`pyroflows.density.standardize`), whose log-det is part of
``log_prob``. Integer data can be dequantized: each training batch gets fresh
:math:`U[0, 1)` noise, so the flow fits a continuous density whose integral over the unit
cell :math:`[x, x + 1)` bounds the probability of :math:`x` from below (Theis et al. 2016).
"""

from __future__ import annotations

import errno
import hashlib
import math
import numbers
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pyroflows._checks import check_bool, check_number, check_positive_int, warn_from_caller
from pyroflows.density import distributed as parallel
from pyroflows.density.data import DataError
from pyroflows.density.rows import (
    CHUNK,
    Rows,
    as_source,
    check_integers,
    chunk_noise,
    dequantized_columns,
    noise_mask,
)
from pyroflows.density.standardize import (
    add_standardization,
    constant_columns,
    refuse_unscalable,
    settle,
)
from pyroflows.flows import Flow

CHECKPOINT = "checkpoint.pt"
SCHEDULES = (None, "cosine", "plateau")


class ResumeMismatch(ValueError):
    """A checkpoint that ``resume=True`` refuses: the fit it records differs from this one.

    Attributes:
        path: the checkpoint file.
        changed: ``{argument: (then, now)}`` for each of :func:`fit`'s arguments that
            differ: ``"seed"``, the options (``"epochs"``, ``"lr"``, ``"batch_size"``,
            ``"validation"`` (the fraction, or ``"rows"``), ...), ``"data"`` (other
            training rows), ``"validation_rows"`` (other held-out rows), ``"context"``
            (other contexts, or a conditional fit's checkpoint for an unconditional one
            or the reverse) or ``"flow"`` (another architecture).
    """

    def __init__(self, message: str, path: Path, changed: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.path = path
        self.changed = changed


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder``, or ``None`` if they can.

    Tried by writing and removing a small file in ``folder`` or, where it does not exist
    yet, in its nearest existing parent (which must be a folder): a fit learns before its
    first epoch what it would otherwise learn at its first checkpoint. Makes no folder.
    """
    place = Path(folder).absolute()
    while not place.exists() and place != place.parent:
        if place.is_symlink():  # a link to nothing: the folder could not be made there
            return f"{place} is a symbolic link to {os.readlink(place)}, which does not exist"
        place = place.parent
    if not place.is_dir():
        return f"{place} is not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=place, prefix=".probe.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return error.strerror or str(error)
    return None


def _same_option(then: Any, now: Any) -> bool:
    """Whether a recorded option equals the current one; floats to a relative 1e-6.

    A NumPy ``float32`` fraction and the Python float it rounds give the same split; the
    learning rate comes back from the optimizer's state in any case.
    """
    if isinstance(then, float) and isinstance(now, float):
        return math.isclose(then, now, rel_tol=1e-6, abs_tol=0.0)
    return then == now


def _optimizer_tensors(state: dict) -> list[tuple[int, tuple[int, ...]]] | None:
    """``(index, shape)`` of each parameter an optimizer's state dict holds, in order.

    The shape is that of its first per-parameter state tensor (Adam's moments), ``()``
    for one the optimizer has not stepped yet; None for a state dict of another form.
    """
    try:
        indices = [i for group in state["param_groups"] for i in group["params"]]
        held = state["state"]
    except (KeyError, TypeError):
        return None
    shapes = []
    for i in indices:
        tensors = [v for v in held.get(i, {}).values() if torch.is_tensor(v) and v.dim() > 0]
        shapes.append((i, tuple(tensors[0].shape) if tensors else ()))
    return shapes


def _packed_names(architecture: str) -> str:
    """``architecture`` with each network's dense layers named as before packing."""
    return re.sub(r"\bPackedLinear\(", "Linear(", architecture)


def _architecture(flow: Flow) -> str:
    """The flow's layers, sizes and options as its ``repr`` shows them (no addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(flow))


@dataclass
class History:
    """What happened during a fit, epoch by epoch (NLLs are nats per row, data units).

    Attributes:
        train_nll: mean training NLL of each epoch (over its mini-batches, as trained).
        val_nll: validation NLL after each epoch (empty without validation data).
        lr: learning rate used in each epoch.
        best_epoch: the epoch (from 1) whose weights the flow holds at the end.
        best_val_nll: its validation NLL (its training NLL without validation data).
        epochs: epochs run.
        stopped_early: whether early stopping ended the fit.
        seconds: wall time of the fit (summed over resumed runs).
    """

    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val_nll: float = math.inf
    epochs: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The history as plain Python values (for JSON or a checkpoint)."""
        return asdict(self)


class _Interrupt:
    """Turns SIGINT into a flag that the loop checks between mini-batches.

    An interrupt that lands inside ``optimizer.step()`` would leave half-updated weights;
    deferring it to the next batch boundary (milliseconds later) keeps a checkpoint
    exact. Installed only in the main thread (the only one Python delivers signals to).
    """

    def __init__(self) -> None:
        self.raised = False
        self.forced = False  # a second Ctrl-C: state may be mid-update, write no checkpoint
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C: stop now, whatever the state
            self.forced = True
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _umask() -> int:
    """The process's umask, read without changing it where the system says it.

    Linux (4.7 and later) shows it in ``/proc/self/status``; elsewhere it is read by
    setting it and putting it back, which another thread could see for an instant.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(stream)`` on a temporary file, then a rename.

    The file at ``path`` is either the old one or the whole new one, never half a file:
    a failure or a Ctrl-C inside ``write`` (a full disk, a bad value) leaves the old file
    as it was and no temporary behind. ``stream`` is a binary file opened in the
    destination's folder (made if missing). A new file gets the permissions ``open``
    would give it; a file replaced keeps its own, its group and (written by root) its
    owner, and one this user may not write is refused, as ``open`` would refuse it. A
    symbolic link (a dangling one too) keeps pointing where it did, at the new file;
    another hard link to the old file keeps the old contents. What is not a regular file
    (a pipe, a terminal, ``/dev/null``), and any path under ``/dev/`` or ``/proc/``
    (``/dev/stdout`` redirected to a file, a shell's ``>(gzip > f)``), cannot be
    replaced: it is written to as it is. Errors of the destination name ``path`` as
    given.
    """
    given = Path(path)
    if given.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name", str(given))
    try:
        found: os.stat_result | None = os.stat(given)  # through links
    except FileNotFoundError:
        found = None
    in_place = str(given.absolute()).startswith(("/dev/", "/proc/"))  # /dev/stdout, fds
    if in_place or (found is not None and not stat.S_ISREG(found.st_mode)):
        with open(given, "wb") as stream:
            write(stream)
        return
    # a link (dangling too) is followed: its target is written, the link kept
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if found is not None and not os.access(given, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(given))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # the name's start only: a name near the system's 255 bytes would leave no room
        handle, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name[:100]}.", suffix=".tmp"
        )
    except OSError as error:  # named by the file asked for, not a folder's or temporary's
        reason = unwritable(target.parent) or error.strerror
        raise OSError(error.errno, reason, str(given)) from None
    try:
        if found is None:  # as open() makes a file, not mkstemp's 0600
            os.chmod(temporary, 0o666 & ~_umask())
        else:  # the replaced file's permissions, owner and group, where this user may
            os.chmod(temporary, stat.S_IMODE(found.st_mode))
            root = getattr(os, "geteuid", lambda: -1)() == 0
            try:  # (only root may give a file to another owner)
                os.chown(temporary, found.st_uid if root else -1, found.st_gid)
            except (OSError, AttributeError):  # not in that group; no chown (Windows)
                pass
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except OSError as error:  # a full disk, say: named by the file asked for
        Path(temporary).unlink(missing_ok=True)
        if error.errno is None or error.filename not in (None, temporary, str(target)):
            raise  # an error of another file, raised inside write
        raise OSError(error.errno, error.strerror, str(given)) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to ``path`` via :func:`write_atomic` (never half a file)."""
    write_atomic(path, lambda stream: torch.save(state, stream))


def damaged_member(path: str | os.PathLike) -> str | None:
    """The first member of ``torch.save``'s zip archive at ``path`` failing its CRC check.

    ``None`` when every member is intact. ``torch.load`` reads the members without
    checking their CRCs, so a copy with a flipped bit in a weight loads silently and
    scores nats off.
    """
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def checkpoint_finished(path: str | os.PathLike) -> bool | None:
    """Whether a checkpoint file records a completed fit; ``None`` if it is unreadable."""
    try:
        return bool(read_checkpoint(path).get("done", False))
    except ValueError:
        return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (``weights_only``: it cannot run code).

    Loaded on the CPU (the generator state must stay there; ``load_state_dict`` moves the
    rest).

    Raises:
        ValueError: the file is not a readable pyroflows checkpoint (truncated, corrupt,
            or some other file), naming it.
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip and torch errors alike: say which file
        raise ValueError(
            f"{path} is not a readable pyroflows checkpoint (torch.load raised "
            f"{type(error).__name__}); pass resume=False to start afresh"
        ) from None
    damaged = damaged_member(path)
    if damaged is not None:
        raise ValueError(
            f"{path} is a damaged checkpoint: its member {damaged} fails the zip CRC check; "
            f"pass resume=False to start afresh"
        )
    if not isinstance(state, dict) or state.get("format") != "pyroflows-checkpoint":
        raise ValueError(
            f"{path} is not a pyroflows checkpoint (it holds a {type(state).__name__} without "
            f"the checkpoint format tag); pass resume=False to start afresh"
        )
    return state


class _NegativeLogLikelihood(nn.Module):
    """The NLL of a batch over ``divisor`` as a module's forward, so DDP can hook its backward.

    One process: ``divisor`` is the batch's size (the mean NLL). Data-parallel over
    ``W`` processes, each holding its share of a global batch of ``B`` rows, it is
    ``B / W``: DDP averages the ``W`` gradients, which then make the gradient of the
    global batch's mean NLL, however unevenly its rows were shared.
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(
        self, x: torch.Tensor, divisor: float, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[0] == 0:  # a share of no rows (a last batch of fewer rows than ranks):
            # zero, but through every parameter, for DDP's reduction to wait on
            return sum(p.sum() for p in self.parameters()) * 0.0
        return -self.flow(context).log_prob(x).sum() / divisor


def _mean_nll(
    flow: Flow,
    data: Rows,
    noise_seed: int | None,
    rank: int,
    world: int,
    chunk: int = CHUNK,
    mask: torch.Tensor | None = None,
    context: Rows | None = None,
) -> float:
    """Mean NLL of the rows of ``data``; ranks share the chunks and sum their totals.

    With ``noise_seed`` (dequantisation) chunk ``c`` gets :math:`U[0,1)` noise from a
    generator seeded by ``(noise_seed, c)``: the same noise at every epoch and for any
    number of ranks, without holding it in memory; on the columns of ``mask`` only, when
    given. ``context``: the rows' contexts (a conditional flow), row for row.
    """
    like = flow.base_loc
    total = 0.0
    with torch.no_grad():
        d = flow() if context is None else None
        for c, start in enumerate(range(0, len(data), chunk)):
            if c % world != rank:
                continue
            positions = torch.arange(start, min(start + chunk, len(data)))
            x = data.take(positions)
            if noise_seed is not None:
                u = chunk_noise(x.shape, noise_seed, c, like)
                x = x + (u if mask is None else u * mask)
            here = d if context is None else flow(context.take(positions))
            total -= here.log_prob(x).sum().item()
    if world > 1:
        (total,) = parallel.sum_all([total], like.device)
    return total / len(data)


def _warn_if_discrete(rows: Rows, name: str, dequantized: bool | list[int] = False) -> None:
    """Warn when the rows look like integer data fitted without dequantisation.

    A column whose values in the first chunk are whole numbers that repeat (fewer
    distinct values than half the rows): a density can put ever narrower spikes on the
    values, and as the validation rows take the same values, its NLL falls without
    bound with the training NLL (early stopping cannot see it). Every column so: the
    remedy is ``dequantize=True``. Some columns only (a count beside measurements):
    the warning names them and the remedy, ``dequantize=[...]`` those columns (on a
    normal column beside a Poisson one, 4000 rows, nsf, the validation NLL fell from
    3.08 to 2.31 by epoch 21, below the true 3.12, with no word of it). Columns already
    ``dequantized`` (a list) are not named.
    """
    chunk = next(iter(rows.chunks()), None)
    if chunk is None or len(chunk) < 20:
        return
    chunk = chunk.to("cpu", torch.float64)
    whole = (chunk == chunk.floor()).all(0)
    distinct = [int(torch.unique(chunk[:, j]).numel()) for j in range(chunk.shape[1])]
    spiky = [j for j in range(chunk.shape[1]) if whole[j] and distinct[j] <= len(chunk) // 2]
    if dequantized is not False:
        spiky = [j for j in spiky if j not in dequantized]
    if not spiky:
        return
    if len(spiky) < chunk.shape[1]:
        spiky = [j for j in spiky if distinct[j] > 1]  # a constant one is warned of apart
        if not spiky:
            return
        remedy = sorted(set(spiky) | set(dequantized or []))  # with those already listed
        remedy = True if len(remedy) == chunk.shape[1] else remedy
        named = ", ".join(f"{j + 1} ({distinct[j]} distinct)" for j in spiky[:5])
        more = " ..." if len(spiky) > 5 else ""
        flag = (
            "--dequantize on the command line"
            if remedy is True
            else "0-based column indices; on the command line --dequantize-columns with "
            "their names, or numbers from 1"
        )
        warn_from_caller(
            f"fit: in the first {len(chunk)} rows of {name}, column(s) {named}{more} hold "
            "whole numbers that repeat: a flow fitted to them puts ever narrower spikes on "
            "the values, and its validation NLL falls without bound (the held-out rows take "
            f"the same values). Pass dequantize={remedy} ({flag}), which fits the mass of "
            "each cell of those columns"
        )
        return
    shown = ", ".join(str(k) for k in distinct[:5]) + (" ..." if len(distinct) > 5 else "")
    warn_from_caller(
        f"fit: every value in the first {len(chunk)} rows of {name} is a whole number, and "
        f"each column repeats its values ({shown} distinct value(s) per column): a flow "
        "fitted to such data puts ever narrower spikes on the values, and its validation "
        "NLL falls without bound (the held-out rows take the same values); for integer "
        "data pass dequantize=True (--dequantize on the command line), which fits the "
        "mass of each cell"
    )


def _warn_if_unscaled_context(mean: torch.Tensor, sd: torch.Tensor) -> None:
    r"""Warn of context columns far from unit scale, which a flow's networks take as they are.

    ``fit`` standardizes the data (the density's own units), not the context. A column
    whose values are large, :math:`\sqrt{\bar c^2 + s^2} > 10` (years around 2000,
    incomes, a constant 1e6 alike: the first layer's weights multiply them, and its units
    saturate), or that varies by :math:`0 < s < 10^{-3}` (the networks can hardly tell its
    values apart) is named. Indicators and proportions in [0, 1] are not.
    """
    size = (mean.square() + sd.square()).sqrt()
    bad = [j for j in range(len(sd)) if size[j] > 10 or 0 < sd[j] < 1e-3]
    if bad:
        shown = ", ".join(
            f"{j + 1} (mean {float(mean[j]):.4g}, sd {float(sd[j]):.4g})" for j in bad[:5]
        )
        warn_from_caller(
            f"fit: context column(s) {shown}{' ...' if len(bad) > 5 else ''} are far from "
            "unit scale (values above 10 in size, or varying by less than 1e-3), and the "
            "flow's networks take the context as it is (fit standardizes the data, not the "
            "context): they learn slowly from such a column, or not at all. Standardize it, "
            "(c - mean) / sd with the training contexts' mean and sd (a constant column: "
            "drop it), here and wherever you condition the flow"
        )


def _check_ranks_agree(
    fingerprint: list,
    held_out: list | None,
    seed: int,
    options: dict,
    architecture: str,
    device,
    context_totals: tuple[float, float] = (0.0, 0.0),
) -> None:
    """Refuse, on every rank, a data-parallel fit whose ranks were given different fits.

    Each rank takes its share of every batch of *its* rows, and the gradients are
    averaged: ranks holding other data, seeds or options would mix unrelated fits.
    """
    described = repr((sorted(options.items()), architecture)).encode()
    digest = int.from_bytes(hashlib.blake2b(described, digest_size=6).digest(), "big")
    rows, dim, batch_size, total = fingerprint
    held_rows, held_total = held_out[:2] if held_out is not None else (-1, 0.0)
    exact = [float(v) for v in (rows, dim, batch_size, held_rows, seed % 2**52, digest)]
    close = [float(total), float(held_total), *map(float, context_totals)]
    others = parallel.disagreeing(exact, close, device)
    if others:
        raise ValueError(
            f"fit: this fit is data-parallel (torchrun, or the script's process group), and "
            f"every process must pass the same data, contexts, seed and options, but process(es) "
            f"{', '.join(map(str, others))} passed others than process 0; to fit each "
            f"process on its own data, or in one process alone, pass distributed=False"
        )


def _is_pair_of_tables(value: object) -> bool:
    """Whether ``value`` is a tuple or list of two 2-D tables (not two rows of numbers)."""
    if not (isinstance(value, tuple | list) and len(value) == 2):
        return False
    try:
        return all(np.ndim(part) == 2 for part in value)
    except (TypeError, ValueError):  # a ragged part: not a table
        return False


def _split(
    data: Rows,
    validation: object,
    generator: torch.Generator,
    like: torch.Tensor,
    context: Rows | None = None,
) -> tuple[Rows, Rows | None, Rows | None, Rows | None]:
    """Training and validation rows, and their contexts (``None`` without one).

    A fraction of the rows is drawn with ``generator``; the contexts are split with their
    rows. Validation rows of the caller's are ``(M, D)``, or with a context the pair
    ``(rows (M, D), context (M, c))``.
    """
    # not 1 or 0 rows, nor a fraction of 1; a string is no table of rows either
    if isinstance(validation, bool | np.bool_ | str | bytes):
        what = "rows (M, D)" if context is None else "a pair (rows (M, D), context (M, c))"
        raise TypeError(
            f"validation must be a fraction in [0, 1), {what} or None, got {validation!r}"
        )
    if (
        validation is None
        or isinstance(validation, numbers.Real)
        and not isinstance(validation, bool)
    ):
        fraction = 0.0 if validation is None else float(validation)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"validation must be a fraction in [0, 1) or rows, got {validation}")
        n = len(data)
        n_val = min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n > 1 else 0
        if n_val == 0:
            return data, None, context, None
        order = torch.randperm(n, generator=generator)
        # sorted: streaming passes read a memory-mapped file front to back (batches are
        # shuffled by their own order each epoch)
        kept, held = order[n_val:].sort().values, order[:n_val].sort().values
        if context is None:
            return data.subset(kept), data.subset(held), None, None
        return data.subset(kept), data.subset(held), context.subset(kept), context.subset(held)
    if context is None:
        if _is_pair_of_tables(validation):
            raise TypeError(
                "validation is a pair of tables, as (rows, context) for a conditional flow, "
                f"but this flow is unconditional: pass validation rows (M, {data.dim})"
            )
        return data, as_source(validation, "validation", like, data.dim, fitting=True), None, None
    if not (isinstance(validation, tuple | list) and len(validation) == 2):
        raise TypeError(
            f"validation for a conditional flow must be a fraction in [0, 1), None, or a "
            f"pair (rows (M, {data.dim}), context (M, {context.dim})), got "
            f"{type(validation).__name__}"
            + (f" of length {len(validation)}" if isinstance(validation, tuple | list) else "")
        )
    rows = as_source(validation[0], "validation[0]", like, data.dim, fitting=True)
    contexts = as_source(
        validation[1], "validation[1]", like, context.dim, True, "the flow's context size"
    )
    if len(rows) != len(contexts):
        raise ValueError(
            f"validation's rows and contexts must pair up, got {len(rows)} rows and "
            f"{len(contexts)} contexts"
        )
    return data, rows, context, contexts


# devices with torch's fused Adam kernel (torch >= 2.4 checks only at the first step)
_FUSED_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})


def _adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0):
    """Adam with torch's fused update where the parameters' device has one.

    The fused kernel updates every parameter in one call. On one CPU thread it made a
    training step (batch 256, D = 16, 5 layers, hidden (64, 64)) 13% faster than the
    multi-tensor (``foreach``) update for ``maf`` (2.14 -> 1.85 ms) and 5% faster for
    ``nsf`` (6.87 -> 6.55 ms). The arithmetic is Adam's. Where the device has no fused
    kernel, the multi-tensor update is used.
    """
    params = list(params)
    if all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # torch < 2.4 has no fused Adam on a CPU, and says so here
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _signature(rows: Rows) -> list[float]:
    """A fingerprint of the values, per column, in float64.

    The sum, the sum of squares and the sum weighted by row (row ``i`` by ``i + 1``): the
    checkpoint's check of the data: a changed value, columns in another order or rows
    in another order (another split, other batches) change it, where the grand total of
    every value did not change for any of these.
    """
    sums, start = None, 0
    for chunk in rows.chunks():
        x = chunk.to("cpu", torch.float64)  # summed on the CPU: the same on any device
        weight = torch.arange(start + 1, start + 1 + x.shape[0], dtype=x.dtype, device=x.device)
        part = torch.stack([x.sum(0), (x * x).sum(0), weight @ x])
        sums = part if sums is None else sums + part
        start += x.shape[0]
    return [] if sums is None else sums.flatten().tolist()


def _same_signature(then: list, now: list) -> bool:
    """Whether two :func:`_signature` entries agree.

    True if either is missing: a checkpoint written before it existed.
    """
    if not then or not now:
        return True
    then, now = then[0], now[0]
    return len(then) == len(now) and all(
        math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-10) for a, b in zip(then, now, strict=True)
    )


def _make_schedule(schedule, optimizer, epochs):
    if schedule is None:
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
    if callable(schedule):
        return schedule(optimizer)
    raise ValueError(
        f"schedule must be None, 'cosine', 'plateau' or a callable optimizer -> scheduler, "
        f"got {schedule!r}"
    )


def fit(
    flow: Flow,
    data: object,
    *,
    context: object = None,
    validation: object = 0.1,
    epochs: int = 200,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str | Callable[[torch.optim.Optimizer], Any] | None = "plateau",
    clip_grad: float | None = None,
    patience: int | None = 20,
    standardize: bool = True,
    dequantize: bool | Sequence[int] = False,
    seed: int | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    callback: Callable[[int, History], bool | None] | None = None,
    name: str = "data",
    distributed: bool = True,
) -> History:
    r"""Fit ``flow`` to the rows of ``data`` by maximum likelihood; return the history.

    The flow is trained in place. At the end it holds the weights of the epoch with the
    lowest validation NLL, and ``flow()`` is the fitted density in the data's own units.

    A conditional flow (built with ``context=c``) is fitted to :math:`p(x \mid c)` by
    :math:`\max_\theta \sum_i \log q_\theta(x_i \mid c_i)`, with ``context`` the
    ``(N, c)`` rows :math:`c_i` beside ``data``'s :math:`x_i`; the split, the batches and
    the checkpoints keep each row with its context, and ``flow(c)`` is then the fitted
    density of :math:`x` given :math:`c`. The data are standardized, the context is not:
    the flow's networks take it as it is (a column far from unit scale is warned of).

    Cost per epoch: one ``log_prob`` (the flow's scoring direction, ``t.inv``) and its
    backward pass per mini-batch, plus one scoring pass over the validation rows. Use a
    flow that scores in one pass (``maf``, ``realnvp``, ``nice``, ``nsf``), not ``iaf``.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), the fit is data-parallel: it joins the
    process group unless the script already has (gloo on the CPU, nccl on CUDA), each
    process takes its share of every batch, and only rank 0 writes checkpoints. Every
    process must then call ``fit`` with the same data and options (checked before the
    first epoch: a process that differs is named). The script should end with
    ``torch.distributed.destroy_process_group()``, as the command line does: a group still
    alive when Python exits can abort the process. A script that makes the group itself
    should ``import torch._dynamo`` before it: imported while a group exists, it keeps the
    group alive past its destruction (seen with torch 2.13). ``distributed=False`` fits in
    this process alone, whatever the environment: for a fit of each process's own data,
    or one made by rank 0 alone (the others would not join it, and the fit would wait
    for them).

    Args:
        flow: a :class:`~pyroflows.Flow` of size ``D``, unconditional or conditional.
        data: training rows, shape ``(N, D)``: a NumPy array (converted to the flow's
            dtype) or a tensor of the flow's dtype. NaN and inf are refused.
        context: for a conditional flow (and only then), the context of each row of
            ``data``, shape ``(N, c)``, in the same forms as ``data`` (a memory-mapped
            ``.npy`` too). NaN and inf are refused.
        validation: a fraction of ``data`` (drawn at random, with ``seed``; with a
            context, the same rows of it) held out for early stopping, or validation rows
            ``(M, D)`` (with a context, the pair ``(rows (M, D), context (M, c))``), or
            ``None``/``0`` for none (then the training NLL stands in, and nothing guards
            against over-fitting).
        epochs: the most epochs to run.
        batch_size: rows per mini-batch (the last batch of an epoch may be smaller).
        lr: Adam's learning rate (torch's fused Adam where the device has it, else its
            multi-tensor update).
        weight_decay: Adam's (L2) weight decay.
        schedule: ``"plateau"`` (default: halve the rate once 6 epochs in a row bring no
            better validation NLL: torch's ``ReduceLROnPlateau`` with ``patience=5``),
            ``"cosine"`` (to 0 over ``epochs``), ``None`` (constant), or a callable
            ``optimizer -> scheduler`` stepped once per epoch.
        clip_grad: clip the gradient's total norm to this value (``None``: no clipping).
        patience: stop after this many epochs without a better validation NLL
            (``None``: run every epoch, still restoring the best weights).
        standardize: append (or update) a fixed affine layer holding the training data's
            mean and sd, so the flow sees standardized data and scores in data units.
        dequantize: add fresh :math:`U[0, 1)` noise to every training batch (and fixed
            noise, the same every epoch, to the validation rows): for integer data (a
            value that is not a whole number is refused, with its row and column).
            ``True`` for every column, or a list of 0-based column indices for some (a
            count beside measurements): the flow is then a density of the others and of
            those columns plus noise.
        seed: seeds the split, the batch order and the noise (``None``: drawn from
            torch's global generator). The flow's initial weights are the caller's.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
        checkpoint_dir: write ``checkpoint.pt`` here (atomically) every
            ``checkpoint_every`` epochs, at the end, and on Ctrl-C: the flow, optimizer,
            schedule, epoch and batch, random state, best score and best weights.
        checkpoint_every: epochs between checkpoints.
        resume: continue from ``checkpoint_dir``'s checkpoint if there is one (the flow
            must be built as the one that wrote it, with the same layers, sizes and
            activation; data, contexts, validation rows and options the same: other data, batch
            size, epochs, lr, schedule... are refused, by name, with a
            :class:`ResumeMismatch`). A finished fit's checkpoint gives its result back as
            it is.
        callback: ``callback(epoch, history)`` after each epoch; returning ``True`` stops,
            ``False`` or ``None`` goes on (anything else is refused: a ``TypeError``). An
            error it raises stops the fit as a Ctrl-C would: the epoch's checkpoint is
            written (a finished one, if the fit ended at that epoch), the best weights so
            far are restored, and the error propagates. In a data-parallel fit it runs
            in every process and must answer, or raise, the same in each (one that
            raises alone leaves the others waiting for it).
        name: what messages about ``data``'s values call it (the estimator's ``"X"``, a
            file's name); rows and columns in them count from 1.
        distributed: ``True`` (default): data-parallel under ``torchrun`` or in the
            script's process group, as above; ``False``: this process alone.

    Returns:
        The :class:`History` (also complete when resumed).

    Raises:
        KeyboardInterrupt: on Ctrl-C, after the checkpoint is written (at the next
            mini-batch boundary, so it is exact) and the best weights so far restored.
        FloatingPointError: a non-finite loss; the best weights so far are restored.
            Any other error inside the training (one from ``callback``, a device out of
            memory) restores them too before it propagates.
        ValueError, TypeError: bad arguments or data, naming the argument; a
            ``checkpoint_dir`` that cannot be written (before the first epoch).

    Example:
        >>> import pyroflows
        >>> from pyroflows.density import fit
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(500, 2) * torch.tensor([1.0, 3.0]) + 5.0
        >>> flow = pyroflows.maf(2, transforms=2, hidden=(16,))
        >>> history = fit(flow, x, epochs=5, seed=0, progress=False)
        >>> history.epochs, flow().sample((3,)).shape
        (5, torch.Size([3, 2]))

        A conditional density, :math:`p(x \mid c)`:

        >>> c = torch.randn(500, 1)
        >>> x = c + 0.1 * torch.randn(500, 2)
        >>> cflow = pyroflows.maf(2, context=1, transforms=2, hidden=(16,))
        >>> _ = fit(cflow, x, context=c, epochs=5, seed=0, progress=False)
        >>> cflow(torch.tensor([0.5])).sample((3,)).shape
        torch.Size([3, 2])
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyroflows.Flow, got {type(flow).__name__}")
    if flow.conditional and context is None:
        raise ValueError(
            f"fit: this flow is conditional, p(x | c) with a context of size "
            f"{flow.context_features}: pass context=, the context of each row of data, "
            f"shape (N, {flow.context_features})"
        )
    if not flow.conditional and context is not None:
        raise ValueError(
            "fit: context was given, but the flow is unconditional (built with context=0): "
            "build it with context=c (pyroflows.nsf(D, context=c)) to fit p(x | c), or "
            "drop context= to fit p(x)"
        )
    if any(t.is_inference() for t in [*flow.parameters(), *flow.buffers()]):
        raise ValueError(
            "flow was built (or loaded) under torch.inference_mode(): its tensors cannot be "
            "trained or updated; build it outside inference mode"
        )
    if not any(p.requires_grad for p in flow.parameters()):
        raise ValueError(
            "flow has no parameter that requires grad (frozen with requires_grad_(False)?): "
            "fit would train nothing"
        )
    # plain Python numbers from here on: they go into the checkpoint (weights_only)
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    if patience is not None:
        if (
            isinstance(patience, numbers.Integral)
            and not isinstance(patience, bool)
            and patience == 0
        ):
            raise ValueError(
                "patience must be an int >= 1, or None to never stop early (the command "
                "line's --patience 0), got 0"
            )
        patience = check_positive_int(patience, "patience")
    # finite: an lr or weight decay of inf passed here and made the loss non-finite at
    # the first step, whose advice (a smaller lr) then read as a riddle
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    lr = float(lr)
    if not (
        isinstance(weight_decay, numbers.Real)
        and not isinstance(weight_decay, bool)
        and 0 <= weight_decay < math.inf
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    weight_decay = float(weight_decay)
    if clip_grad is not None:
        clip_grad = check_number(clip_grad, "clip_grad (or None)")
    standardize = check_bool(standardize, "standardize")
    dequantize = dequantized_columns(dequantize, flow.dim)
    resume = check_bool(resume, "resume")
    if progress is not None:
        progress = check_bool(progress, "progress (or None)")
    if schedule not in SCHEDULES and not callable(schedule):
        _make_schedule(schedule, None, epochs)  # raises the message
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir, where the checkpoint is")
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be a callable callback(epoch, history), or None, got {callback!r}"
        )
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64) (torch's range), got {seed}")
        seed = int(seed)

    like = flow.base_loc
    rank, world = parallel.setup(like.device, check_bool(distributed, "distributed"))
    if world > 1 and like.device.type != "cuda" and parallel.backend() == "nccl":
        raise ValueError(
            f"fit: the process group is nccl, which reduces CUDA tensors only, and this flow "
            f"is on the {like.device.type}: move the flow (and the data) to this process's "
            f"GPU, or pass distributed=False to fit in this process alone"
        )
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    source = as_source(data, name, like, flow.dim, fitting=True)
    contexts = None
    if context is not None:
        size = flow.context_features
        try:
            ndim = None if isinstance(context, np.memmap) else np.ndim(context)
        except (TypeError, ValueError):  # ragged: as_source says what is wrong
            ndim = None
        if ndim is not None and ndim != 2:
            one = ndim == 1 and size == 1
            hint = " (one number per row: context.reshape(-1, 1))" if one else ""
            raise DataError(
                f"context must have shape (N, {size}), a row per row of {name}, got shape "
                f"{tuple(np.shape(context))}{hint}"
            )
        contexts = as_source(context, "context", like, size, True, "the flow's context size")
        if len(contexts) != len(source):
            raise ValueError(
                f"context must hold one row per row of {name}: got {len(contexts)} context "
                f"rows for {len(source)} rows"
            )
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    state = None
    # an unreadable checkpoint (None) is replaced without a word, as resume=True refuses it
    if not resume and path is not None and path.exists() and rank == 0:
        if checkpoint_finished(path) is False:
            warn_from_caller(
                f"fit: {path} holds an unfinished fit, which resume=False starts afresh over "
                f"(its first checkpoint replaces that one); pass resume=True to continue it"
            )
    if resume and path.exists():
        state = read_checkpoint(path)
        if seed is None:
            seed = state["seed"]  # the same split and batches as the interrupted fit
        elif seed != state["seed"]:
            raise ResumeMismatch(
                f"seed={seed}, but the checkpoint in {checkpoint_dir} was written with "
                f"seed={state['seed']} (the seed fixes the split and the batches); pass "
                f"seed=None or seed={state['seed']} to resume, or resume=False to start afresh",
                path,
                {"seed": (state["seed"], seed)},
            )
    if seed is None:  # one seed for every rank: rank 0's
        seed = int(torch.randint(2**62, ()).item())
        if world > 1:
            seed = parallel.broadcast_int(seed, like.device)
    generator = torch.Generator().manual_seed(seed)
    mask = noise_mask(dequantize, flow.dim, like)
    if dequantize:  # the whole source: rows numbered as the caller's
        check_integers(source, mask)
    train, valid, train_c, valid_c = _split(source, validation, generator, like, contexts)
    if len(train) < 2:
        split = valid is not None and train is not source  # a fraction held out, not rows
        held = f", of which the validation split took {len(valid)}" if split else ""
        remedy = (
            " or hold none out (validation=None; --validation 0 on the command line; "
            "validation_fraction=None for FlowDensity)"
        )
        raise ValueError(
            f"fit needs at least 2 training rows, got {len(source)} row(s) in {name}{held}; "
            f"give more rows{remedy if split else ''}"
        )
    if dequantize and valid is not None and not isinstance(validation, numbers.Real):
        check_integers(valid, mask)  # validation rows of their own
    noise_seed = seed % 2**31 + 1 if dequantize else None
    # the training noise is drawn where the batches are (no CPU tensor per batch on CUDA)
    noise = torch.Generator(like.device).manual_seed(seed % 2**31 + 2)
    mean, sd, total = train.moments()  # one streaming pass; checks every value
    # the columns without noise, on the moments' device (torch.where takes no CPU mask
    # beside CUDA tensors)
    plain = torch.ones_like(sd, dtype=torch.bool) if mask is None else mask.to(sd.device) == 0
    # dequantized columns have an sd of at least 1/sqrt(12): only the others are checked
    refuse_unscalable(mean, torch.where(plain, sd, 1.0), like.dtype, name)
    constant = [j for j in constant_columns(mean, sd, like.dtype) if plain[j]]
    if constant and rank == 0:
        shown = ", ".join(f"{j + 1} ({float(mean[j]):.6g})" for j in constant[:5])
        warn_from_caller(
            f"fit: {name} column(s) {shown}{' ...' if len(constant) > 5 else ''} hold one value "
            "in every training row: a flow has no density there (it fits an ever narrower "
            "spike as it trains, and its draws spread around the value); drop such columns "
            "and put the value back after sampling"
        )
    if dequantize is not True and rank == 0:
        _warn_if_discrete(train, name, dequantize)
    held_out = None
    if valid is not None:  # the validation rows too, before any epoch (and on every rank)
        held_out = [len(valid), valid.moments()[2]]
        if path is not None:  # a resume's check of the rows: only with checkpoints
            held_out.append(_signature(valid))
    # the contexts' fingerprints: [sum of the training contexts, of the validation ones]
    # (each checks every value), and with checkpoints their signatures too
    context_print = None
    if train_c is not None:
        c_mean, c_sd, c_total = train_c.moments()
        if rank == 0:
            _warn_if_unscaled_context(c_mean, c_sd)
        c_held = valid_c.moments()[2] if valid_c is not None else 0.0
        context_print = [c_total, c_held]
        if path is not None:
            context_print.append(_signature(train_c))
            context_print.append(_signature(valid_c) if valid_c is not None else [])
    if path is not None and rank == 0:
        reason = unwritable(path.parent)
        if reason is not None:  # found now, not after the epochs up to the first checkpoint
            raise ValueError(f"checkpoint_dir {checkpoint_dir} cannot be written: {reason}")
    if standardize:  # a layer the optimizer steps around: never an inference tensor
        with torch.inference_mode(False):
            add_standardization(flow).set(*settle(mean, sd, mask, like.dtype))

    optimizer = _adam(flow.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = _make_schedule(schedule, optimizer, epochs)
    history = History()
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs, start_epoch, start_batch, order, partial = 0, 0, 0, None, [0.0, 0]
    fingerprint = [len(train), int(flow.dim), int(batch_size), total]
    if path is not None:
        fingerprint.append(_signature(train))
    # what else decides the fit: resuming under other values would not continue it
    options = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "schedule": (
            None if schedule is None else str(schedule) if isinstance(schedule, str) else "callable"
        ),
        "clip_grad": None if clip_grad is None else float(clip_grad),
        "patience": None if patience is None else int(patience),
        "standardize": bool(standardize),
        "dequantize": dequantize,
        "dtype": str(like.dtype).removeprefix("torch."),  # the data's fingerprint's too
        "validation": (
            "rows"
            if valid is not None and not isinstance(validation, numbers.Real)
            else float(validation or 0.0)
        ),
    }
    architecture = _architecture(flow)
    if world > 1:
        _check_ranks_agree(
            fingerprint[:4],
            held_out,
            seed,
            options,
            architecture,
            like.device,
            (0.0, 0.0) if context_print is None else tuple(context_print[:2]),
        )

    if state is not None:
        then = state.get("options", options)  # checkpoints before this record none
        changed = [k for k in options if not _same_option(then.get(k, options[k]), options[k])]
        if changed:
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written by a fit with "
                + ", ".join(f"{k}={then[k]!r}" for k in changed)
                + "; now "
                + ", ".join(f"{k}={options[k]!r}" for k in changed)
                + ". resume=True continues that fit as it was: pass the same options, or "
                "resume=False to start afresh",
                path,
                {k: (then[k], options[k]) for k in changed},
            )
        then, now = state["fingerprint"], fingerprint
        head = then[:3] == now[:3] and math.isclose(then[3], now[3], rel_tol=1e-6, abs_tol=1e-6)
        if not head or not _same_signature(then[4:], now[4:]):
            also = "" if not head else "; the same sum, but other values or another order"
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written for other data or options "
                f"(training rows, dim, batch size, sum of the training values: {then[0]}, "
                f"{then[1]}, {then[2]}, {then[3]:.9g}; now {now[0]}, {now[1]}, {now[2]}, "
                f"{now[3]:.9g}{also}); pass resume=False to start afresh",
                path,
                {"data": (then, now)},
            )
        then = state.get("held_out", held_out)  # checkpoints before this record none
        if (then is None) != (held_out is None) or (
            then is not None
            and (
                then[0] != held_out[0]
                or not math.isclose(then[1], held_out[1], rel_tol=1e-6, abs_tol=1e-6)
                or not _same_signature(then[2:], held_out[2:])
            )
        ):
            shown = [
                "none" if v is None else f"{v[0]} rows summing to {v[1]:.9g}"
                for v in (then, held_out)
            ]
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written for other validation rows "
                f"({shown[0]}; now {shown[1]}): its best score would not be comparable; pass "
                f"the same validation rows, or resume=False to start afresh",
                path,
                {"validation_rows": (then, held_out)},
            )
        then = state.get("architecture", architecture)
        # an earlier pyroflows showed a dense layer of a network as Linear: the same flow
        if _packed_names(then) != _packed_names(architecture):
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written for another flow:\n{then}\n"
                f"now:\n{architecture}\nbuild the flow as it was, or pass resume=False to "
                f"start afresh",
                path,
                {"flow": (then, architecture)},
            )
        then = state.get("context")
        if (then is None) != (context_print is None):
            kinds = ("an unconditional", "a conditional")
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written by {kinds[then is not None]} "
                f"fit, and this one is {kinds[context_print is not None]}; pass resume=False "
                f"to start afresh",
                path,
                {"context": (then, context_print)},
            )
        if then is not None and (
            not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
                for a, b in zip(then[:2], context_print[:2], strict=True)
            )
            or not _same_signature(then[2:3], context_print[2:3])
            or not _same_signature(then[3:4], context_print[3:4])
        ):
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written for other contexts (the "
                f"training and validation contexts must be those of the interrupted fit, "
                f"row for row); pass the same context, or resume=False to start afresh",
                path,
                {"context": (then, context_print)},
            )
        kept = _optimizer_tensors(state["optimizer"])
        now = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]
        if kept is not None and len(kept) != len(now):
            differs = f"for {len(kept)} parameter tensors, but this flow has {len(now)}"
        else:
            wrong = [k for k, (_, shape) in enumerate(kept or ()) if shape and shape != now[k]]
            differs = (
                f"with parameter {wrong[0]} of shape {kept[wrong[0]][1]}, but this flow's "
                f"is {now[wrong[0]]}"
                if wrong
                else ""
            )
        if differs:  # refused before any weight is loaded
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} holds the optimizer's state {differs} "
                f"(a checkpoint written by an earlier pyroflows, whose networks kept their "
                f"weights otherwise: a weight and a bias per layer, or large networks packed "
                f"in one tensor; or for another flow): pass resume=False to start afresh",
                path,
                {"flow": (None, architecture)},
            )
        try:
            flow.load_state_dict(state["flow"])
        except RuntimeError:
            raise ResumeMismatch(
                f"the checkpoint in {checkpoint_dir} was written for a flow of another "
                f"architecture; build the flow as it was, or pass resume=False to start afresh",
                path,
                {"flow": (None, architecture)},
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        noise.set_state(state["noise"])
        history = History(**state["history"])
        best_state = state["best"]
        bad_epochs = state["bad_epochs"]
        start_epoch, start_batch = state["epoch"], state["batch"]
        if state["batch"] and state.get("world", 1) != world:
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} stopped mid-epoch in a fit over "
                f"{state.get('world', 1)} process(es); resume it with as many (now {world})"
            )
        order, partial = state["order"], state["partial"]
        if rank != 0:  # rank 0's checkpoint holds the sums of every rank
            partial = [0.0, 0]
        if state["done"]:
            if best_state is not None:
                flow.load_state_dict(best_state)
            return history

    def checkpoint(epoch: int, batch: int, done: bool = False) -> None:
        if path is None or rank != 0:  # one writer: rank 0
            return
        state = {
            "format": "pyroflows-checkpoint",
            "flow": flow.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "noise": noise.get_state(),
            "history": history.as_dict(),
            "best": best_state,
            "bad_epochs": bad_epochs,
            "epoch": epoch,
            "batch": batch,
            "order": order,
            "partial": partial,
            "done": done,
            "fingerprint": fingerprint,
            "options": options,
            "held_out": held_out,
            "architecture": architecture,
            "context": context_print,
            "seed": seed,
            "world": world,
        }
        _save_atomic(state, path)

    def restore_best() -> None:
        if best_state is not None:
            flow.load_state_dict(best_state)

    def finish() -> None:  # the fit has ended: the best weights, in a finished checkpoint
        restore_best()
        checkpoint(history.epochs, 0, done=True)

    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=start_epoch, desc="fit", unit="epoch", leave=False)
    # the batches are a one-process fit's (batch_size rows of the epoch's order, the last
    # one shorter), and each rank takes every world-th row of each, with those rows' noise
    # out of the noise drawn for the whole batch (the same on every rank), so the averaged
    # gradient is that of the one-process fit's batch
    n_train = len(train)
    if n_train < world:
        raise ValueError(f"{n_train} training rows cannot be shared by {world} processes")
    n_batches = math.ceil(n_train / batch_size)
    objective: nn.Module = _NegativeLogLikelihood(flow)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [like.device] if like.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=ids)
    position = (start_epoch, start_batch)  # (epochs done, batches of the next one done)
    seconds_before, clock = history.seconds, time.perf_counter()

    def tick() -> None:
        history.seconds = seconds_before + time.perf_counter() - clock

    interrupt = _Interrupt()
    ended = False  # the last epoch (or the early stop's) is done: what is left is finish()
    try:
        # the caller's torch.no_grad() or inference_mode() does not reach the training
        with interrupt, torch.inference_mode(False), torch.enable_grad():
            flow.train()
            for epoch in range(start_epoch, epochs):
                if order is None:  # the same order on every rank (same generator)
                    order = torch.randperm(n_train, generator=generator)
                mine = order.to(train.device)  # once an epoch, not a copy per batch
                for batch in range(start_batch, n_batches):
                    rows = mine[batch * batch_size : (batch + 1) * batch_size]
                    size = len(rows)
                    share = rows if world == 1 else rows[rank::world]
                    x = train.take(share)
                    c = None if train_c is None else train_c.take(share)
                    if dequantize:
                        u = torch.rand(
                            (size, x.shape[-1]),
                            generator=noise,
                            dtype=like.dtype,
                            device=like.device,
                        )
                        x = x + (u if world == 1 else u[rank::world]) * mask
                    divisor = size / world
                    loss = objective(x, divisor, c)
                    finite, stopping = bool(torch.isfinite(loss)), interrupt.raised
                    # every rank must take the same decision, or the others would wait
                    # for it forever: the flags are or-ed while the backward pass runs
                    flags = (
                        parallel.PendingFlags([not finite, stopping], like.device)
                        if world > 1
                        else None
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    bad, stopping = (not finite, stopping) if flags is None else flags.wait()
                    if bad:
                        restore_best()
                        raise FloatingPointError(
                            f"the training loss is {loss.item()} at epoch {epoch + 1}, batch "
                            f"{batch + 1}; try a smaller lr or clip_grad"
                            + ("" if standardize else ", or standardize=True")
                        )
                    if clip_grad is not None:
                        torch.nn.utils.clip_grad_norm_(flow.parameters(), clip_grad)
                    optimizer.step()
                    partial = [partial[0] + loss.item() * divisor, partial[1] + x.shape[0]]
                    position = (epoch, batch + 1)
                    if stopping or (world == 1 and interrupt.raised):
                        raise KeyboardInterrupt  # after a whole step: the checkpoint is exact
                start_batch = 0
                partial = parallel.sum_all(partial, like.device) if world > 1 else partial
                history.train_nll.append(partial[0] / partial[1])
                history.lr.append(optimizer.param_groups[0]["lr"])
                score = history.train_nll[-1]
                if valid is not None:
                    flow.eval()
                    score = _mean_nll(
                        flow, valid, noise_seed, rank, world, mask=mask, context=valid_c
                    )
                    flow.train()
                    history.val_nll.append(score)
                if not math.isfinite(score):
                    score = math.inf
                if score < history.best_val_nll:
                    history.best_val_nll, history.best_epoch, bad_epochs = score, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
                else:
                    bad_epochs += 1
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(score)
                elif scheduler is not None:
                    scheduler.step()
                history.epochs = epoch + 1
                order, partial, position = None, [0.0, 0], (epoch + 1, 0)
                stop = patience is not None and bad_epochs >= patience
                history.stopped_early = stop
                if bar is not None:
                    shown = {"train": f"{history.train_nll[-1]:.4f}"}
                    if valid is not None:
                        shown["val"] = f"{score:.4f}"
                    bar.set_postfix(shown, refresh=False)
                    bar.update(1)
                ended = stop or epoch + 1 == epochs  # (what a checkpoint now must say)
                if callback is not None:
                    try:
                        said = callback(epoch + 1, history)
                        flag = (
                            isinstance(said, torch.Tensor)
                            and said.dtype == torch.bool
                            and said.dim() == 0
                        )
                        if not (said is None or isinstance(said, (bool, np.bool_)) or flag):
                            raise TypeError(
                                f"callback must return True (stop), False or None (go on), "
                                f"got {said!r} at epoch {epoch + 1}"
                            )
                        stop = stop or bool(said)
                    except Exception:  # the epoch is whole: its checkpoint is exact
                        tick()  # (a Ctrl-C goes to its own handler, which knows a forced one)
                        if ended:
                            finish()
                        else:
                            checkpoint(*position)
                        raise
                if world > 1:
                    (stop,) = parallel.PendingFlags([stop], like.device).wait()
                if stop or epoch + 1 == epochs:
                    break
                if (epoch + 1) % checkpoint_every == 0:
                    tick()
                    checkpoint(*position)
            tick()
            finish()
    except KeyboardInterrupt:
        tick()
        if world > 1 and not interrupt.forced:  # every rank stopped at the same batch
            partial = parallel.sum_all(partial, like.device)
        if interrupt.forced:  # a forced stop keeps the last checkpoint, which is exact
            pass
        elif ended:
            finish()
        else:
            checkpoint(*position)
        restore_best()
        raise
    except BaseException:  # the caller gets the best weights, whatever stopped the fit
        restore_best()
        raise
    finally:
        if bar is not None:
            bar.close()
        flow.eval()
    if interrupt.raised:  # after the last batch (validation, callback, the checkpoint's
        raise KeyboardInterrupt  # write): the fit is done and saved, but the Ctrl-C stands
    return history
