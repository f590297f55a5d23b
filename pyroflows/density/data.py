"""Data in: arrays and tensors checked for a fit, and tables read from CSV or ``.npy``.

Every problem is a :class:`DataError` (a ``ValueError``) whose message names the file or
argument, the row and column where it can, what was expected and what came, so the command
line can print it as one line.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Data that cannot be used as it is: missing, empty, ragged, non-numeric, non-finite."""


def as_rows(
    data: object,
    name: str,
    like: torch.Tensor,
    dim: int | None = None,
    fitting: bool = False,
    width: str = "the flow's dim",
) -> torch.Tensor:
    """Return ``data`` as a finite ``(N, D)`` tensor with ``like``'s dtype and device.

    NumPy arrays (and nested lists) are converted to ``like``'s dtype; a torch tensor must
    already have it (no silent cast of a tensor, as everywhere in pyroflows).

    Args:
        data: rows of observations, shape ``(N, D)``.
        name: the argument's name, for messages.
        like: a tensor of the flow (dtype and device).
        dim: the required number of columns, if known.
        fitting: rows a flow will be fitted to: also refuse columns that the conversion
            rounds too much (:func:`check_rounding`). Rows to score are not refused.
        width: what ``dim`` is, for the message about a wrong number of columns.
    """
    if isinstance(data, torch.Tensor):
        if not data.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor ({like.dtype}), got {data.dtype}")
        if data.dtype != like.dtype:
            raise TypeError(
                f"{name} has dtype {data.dtype} but the flow's parameters are {like.dtype}; no "
                f"silent cast is made: pass {name}.to({like.dtype}) or convert the flow"
            )
        tensor = data.detach().to(like.device)
        array = None
    else:
        try:
            array = np.asarray(data)  # no copy of an array
            kind = array.dtype.kind
            if kind != "c":
                array = np.asarray(array, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise DataError(f"{name} must be numeric rows of shape (N, D): {error}") from None
        if kind == "c":  # float64 would drop the imaginary parts, silently
            raise TypeError(
                f"{name} must be real numbers, got complex ({array.dtype}); pass the parts "
                f"as columns of their own (np.c_[x.real, x.imag]) if both matter"
            )
        # torch wants writable memory (not a read-only memmap) and no negative strides
        # (X[::-1]); np.asarray copies neither when the array is float64 already
        if not array.flags.writeable or any(step < 0 for step in array.strides):
            array = array.copy()
        tensor = torch.as_tensor(array, dtype=like.dtype, device=like.device)
    if tensor.dim() != 2:
        raise DataError(f"{name} must have shape (N, D), got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise DataError(f"{name} is empty: it has no rows")
    if dim is not None and tensor.shape[1] != dim:
        raise DataError(f"{name} must have {dim} columns ({width}), got {tensor.shape[1]}")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        original = float(array[row, col]) if array is not None else tensor[row, col].item()
        raise DataError(non_finite_message(name, original, row, col, like.dtype, int(bad.sum())))
    if fitting and array is not None and like.dtype != torch.float64:
        check_rounding(name, array, tensor)
    return tensor


#: The largest rounding of a column by the flow's dtype, as a fraction of the column's sd,
#: that :func:`check_rounding` lets through.
ROUNDING = 0.01


def check_rounding(name: str, array: np.ndarray, tensor: torch.Tensor) -> None:
    """Refuse columns that ``tensor``'s dtype rounds by more than ``ROUNDING`` of their sd.

    A column with mean 1e8 and sd 10 is stored in float32 in steps of 8: a flow fitted to
    it learns the rounding (scores tens of nats off, samples all alike), silently. Values
    the dtype holds exactly (integers below 2**24 in float32, data that were float32
    already) and columns constant up to float64 rounding pass.
    """
    error = np.abs(tensor.detach().cpu().double().numpy() - array).max(axis=0)
    values = torch.from_numpy(array)
    mean = values.mean(0)
    m2 = ((values - mean) ** 2).sum(0)
    sd = column_sd(lambda: [values], len(array), mean, m2, values.amax(0) > values.amin(0))
    refuse_rounding(name, error, mean.numpy(), sd.numpy(), tensor.dtype)


#: A variance below this (float64's smallest normal number over its epsilon) has lost bits
#: to subnormals, or all of them.
TINY_VARIANCE = torch.finfo(torch.float64).tiny / torch.finfo(torch.float64).eps


def column_sd(
    blocks: Callable[[], Iterable[torch.Tensor]],
    count: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
    varies: torch.Tensor,
) -> torch.Tensor:
    r"""Population sd of every column (float64), exact to rounding however small or large.

    :math:`\sqrt{M_2 / n}` from the sum of squared deviations :math:`M_2`, except in a
    column that ``varies`` (its largest value above its smallest) whose variance left
    float64's normal range (sd below about :math:`10^{-146}` or above :math:`10^{154}`):
    there the sd comes from a second pass over ``blocks()`` (float64 tensors of rows, on
    ``mean``'s device) that sums the squares of the deviations scaled by the largest one
    so far, as LAPACK's ``dnrm2``. Without it a column of values near :math:`10^{-170}`,
    which float32 flushes to zero, has variance 0 and would pass as constant. The
    standardisation moments (:meth:`~pyroflows.density.rows.Rows.moments`) and the
    rounding checks both take their sd from here.
    """
    var = m2 / count
    sd = var.sqrt()
    redo = ((var < TINY_VARIANCE) | ~torch.isfinite(var)) & varies
    if not redo.any():
        return sd
    scale = torch.zeros_like(mean)  # the largest |x - mean| so far, per column
    total = torch.zeros_like(mean)  # the sum of ((x - mean) / scale)^2
    for block in blocks():
        deviation = block - mean
        new = torch.maximum(scale, deviation.abs().amax(0))
        safe = torch.where(new > 0, new, torch.ones_like(new))
        total = total * (scale / safe) ** 2 + ((deviation / safe) ** 2).sum(0)
        scale = new
    return torch.where(redo, scale * (total / count).sqrt(), sd)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype by its short name, as messages and model files give it: ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def refuse_rounding(
    name: str, error: np.ndarray, mean: np.ndarray, sd: np.ndarray, dtype: torch.dtype
) -> None:
    """Raise for the first column whose largest rounding ``error`` exceeds ``ROUNDING`` sd."""
    constant = sd <= 1e3 * np.finfo(np.float64).eps * np.abs(mean)
    bad = ~constant & (error > ROUNDING * sd)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        kind = dtype_name(dtype)
        raise DataError(
            f"{name} column {j + 1} (index {j}) has mean {mean[j]:.6g} and sd {sd[j]:.3g}, but "
            f"{kind} rounds its values by up to {error[j]:.3g} ({error[j] / sd[j]:.2g} sd), so "
            f"the flow would fit the rounding; use a float64 flow (dtype='float64', "
            f"--dtype float64) or subtract the column's offset first"
        )


def non_finite_message(
    name: str, value: float, row: int, col: int, dtype: torch.dtype, count: int | None = None
) -> str:
    """What is wrong with the first bad value of ``name``, at 0-based ``(row, col)``.

    Rows and columns are given from 1, as in a file, with the 0-based index beside. A
    finite ``value`` is one that overflowed ``dtype`` (``1e39`` in float32). ``count``:
    how many bad values there are, when known.
    """
    where = f"row {row + 1}, column {col + 1} (index [{row}, {col}])"
    if math.isfinite(value):
        return beyond_range_message(name, value, where, dtype)
    kind = "NaN" if math.isnan(value) else "inf"
    if count is None:  # a streamed file: how many more there are is not known yet
        return f"{name}: {kind} at {where}; every value must be finite"
    return (
        f"{name} holds {count} NaN or inf value(s); the first is {kind} at {where}; every "
        f"value must be finite"
    )


#: what an overflow message suggests by default
_REMEDY = "use a float64 flow"


def beyond_range_message(
    name: str, value: float, where: str, dtype: torch.dtype, remedy: str = _REMEDY
) -> str:
    """The message for a ``value`` finite in float64 that overflows ``dtype``, at ``where``."""
    return (
        f"{name}: {value!r} at {where} is beyond the range of {dtype} (the flow's dtype); "
        f"rescale the data or {remedy}"
    )


def read_table(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    remedy: str = _REMEDY,
    header: bool | None = None,
    whole_numbers: str | None = None,
    names: Sequence[str] | None = None,
    whole_columns: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[str] | None]:
    """Read a numeric table from a CSV file (with or without a header) or a ``.npy`` file.

    By default a CSV's first row is its header when no cell of it parses as a number, or
    when it is exactly ``0,1,...,D-1`` with ``D >= 2``: the header pandas writes for
    unnamed columns (``DataFrame(x).to_csv(index=False)``; ``,0,1,...`` with the row
    index), taken with a ``UserWarning`` that says so. A first column that is pandas' row
    index (an empty or ``Unnamed: 0`` header cell over whole numbers that number the rows)
    is refused: it is not data. Rows and columns in messages count from 1 as lines in an
    editor do (the header, if any, is row 1, and blank lines count).

    Args:
        path: the file; a pipe (``/dev/stdin``, a shell's ``<(...)``) is read once into
            memory.
        dtype: the flow's dtype: a CSV value finite in float64 but beyond its range
            (``1e39`` for float32) is refused here, where the file's line is known.
        remedy: what the overflow message suggests (the command line names its flag).
        header: whether a CSV's first row is its header: ``None`` (the default) decides
            as above; ``True`` or ``False`` says (a numeric header such as years needs
            ``True``).
        whole_numbers: for integer data (to be dequantized, or scored by a model fitted
            to it): refuse a CSV value that is not a whole number, naming its line, with
            this text as the advice that ends the message. A ``.npy`` file's values are
            checked when a fit or score streams them (its rows are its lines).
        names: the column names a model was fitted with: with ``header=None``, a first
            row that is exactly these names is the header too (numbers such as years,
            which the rule above would take for data). A first row of numbers that is
            them in another order is read as data, with a ``UserWarning`` (it may be a
            header of swapped columns); pandas' names ``0,1,...`` excepted (a row of
            counts).
        whole_columns: the 0-based columns that ``whole_numbers`` checks (default: all).

    Returns:
        The values as an ``(N, D)`` array (float64 from a CSV; from a ``.npy`` file, the
        file memory-mapped read-only, its values checked when a fit or score streams
        them), and the column names (``None`` when the file has no header).

    Raises:
        DataError: missing or empty file, ragged rows, a non-numeric cell (row and column
            named), NaN or inf, a fraction under ``whole_numbers``, pandas' row index as
            the first column, or a ``.npy`` array that is not 2-D numeric.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a CSV or .npy file")
    if header is not None and not isinstance(header, bool):
        raise TypeError(f"header must be True, False or None, got {header!r}")
    stream = None  # a pipe (/dev/stdin, a shell's <(...)) is read once, into memory
    if not path.is_file():
        stream = path.read_bytes()
        if not stream:
            raise DataError(f"{path}: the stream is empty")
    elif path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".npy":
        return _read_npy(path, stream), None
    if header is None and names is not None:
        first, wanted = _first_row(path, stream), [str(n).strip() for n in names]
        if first == wanted:  # the model's own columns (a file that its sample wrote, say)
            header = True
        elif (
            first is not None
            and len(set(wanted)) == len(wanted) > 1
            and sorted(first) == sorted(wanted)
            and wanted != [str(j) for j in range(len(wanted))]  # pandas' 0,1,...: data
        ):
            # the names in another order: a header whose columns are swapped, or, where
            # the names are numbers (years), as likely a row of data; said, not guessed
            if all(_number(cell) is None for cell in first):
                header = True  # read as the header, and refused by the caller's check
            else:
                warnings.warn(
                    f"{path}: the first row ({','.join(first)}) is the model's column "
                    f"names in another order; it is read as data: if it is a header, its "
                    f"columns are in another order than the fit's (pass header=True "
                    f"(--header yes) to have the names checked)",
                    UserWarning,
                    stacklevel=2,
                )
    values, names, lines = _read_csv(path, dtype, remedy, header, stream)
    if whole_numbers is not None:
        fractional = values != np.floor(values)
        if whole_columns is not None:
            fractional[:, np.setdiff1d(np.arange(values.shape[1]), list(whole_columns))] = False
        if fractional.any():
            row, col = (int(i) for i in np.argwhere(fractional)[0])
            raise DataError(
                f"{path}: row {lines[row]}, column {col + 1}: {float(values[row, col])!r} is "
                f"not a whole number: {whole_numbers}"
            )
    return values, names


def _open_text(path: Path, stream: bytes | None):
    """The CSV as text (a byte-order mark dropped): the file, or a pipe's bytes read."""
    if stream is None:
        return open(path, newline="", encoding="utf-8-sig")
    return io.TextIOWrapper(io.BytesIO(stream), encoding="utf-8-sig", newline="")


def _first_row(path: Path, stream: bytes | None = None) -> list[str] | None:
    """A CSV's first non-blank row, its cells stripped (``None`` if unreadable)."""
    try:
        with _open_text(path, stream) as handle:
            for row in csv.reader(handle):
                if any(cell.strip() for cell in row):
                    return [cell.strip() for cell in row]
    except (UnicodeDecodeError, csv.Error):
        return None  # the full read names what is wrong
    return None


def _pandas_header(cells: list[str]) -> bool:
    """Whether a first row is pandas' header of unnamed columns: ``0,1,...,D-1``.

    That is ``DataFrame(array).to_csv(path, index=False)``; with the row index it is
    ``,0,1,...,D-2`` (an empty cell over the index). One column's ``0`` is as likely a
    count, so a single column without the index never matches.
    """
    cells = [c.strip() for c in cells]
    if cells and cells[0] == "":  # over pandas' row index (refused once the rows are read)
        cells = cells[1:]  # ",0" alone is as likely a row of data with a missing cell
    return len(cells) >= 2 and cells == [str(j) for j in range(len(cells))]


#: the first bytes of every .npy file (NumPy's format, any version)
_NPY_MAGIC = b"\x93NUMPY"


def _read_npy(path: Path, stream: bytes | None = None) -> np.ndarray:
    if stream is None:
        with open(path, "rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
    else:
        head = stream[: len(_NPY_MAGIC)]
    if head != _NPY_MAGIC:  # NumPy would take it for a pickle, and advise allow_pickle=
        raise DataError(
            f"{path}: not a .npy file (it does not begin with NumPy's header); a text "
            f"table (CSV) is read as one when its name does not end in .npy"
        )
    try:
        if stream is None:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            array = np.load(io.BytesIO(stream), allow_pickle=False)
    except ValueError as error:
        raise DataError(f"{path}: not a numeric .npy array ({error})") from None
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array (rows, columns), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{path}: the array is empty (shape {array.shape})")
    return array  # memory-mapped: fit and score stream it, checking values as they come


def _number(cell: str) -> float | None:
    """The cell as a number, or ``None`` for text.

    Python's ``float`` reads ``1_000`` as 1000 (its literals' digit grouping): in a
    table that is text, such as a code ``2020_01``, not a number.
    """
    if "_" in cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(
    path: Path,
    dtype: torch.dtype | None,
    remedy: str,
    header_given: bool | None = None,
    stream: bytes | None = None,
) -> tuple[np.ndarray, list[str] | None, list[int]]:
    # rows are numbered by their line in the file (blank lines count, as in an editor);
    # utf-8-sig drops the byte-order mark that spreadsheet exports put first
    try:
        with _open_text(path, stream) as handle:
            reader = csv.reader(handle)
            rows, lines = [], []
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (not UTF-8); expected CSV or .npy") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{path}: the file holds no data rows")
    header = None
    first = rows[0]
    guessed = False  # the first row taken for pandas' header of unnamed columns
    if header_given is None:
        header_given = all(_number(cell) is None for cell in first)
        guessed = not header_given and _pandas_header(first)
        header_given = header_given or guessed
    if header_given:
        header = [cell.strip() for cell in first]
        rows, lines = rows[1:], lines[1:]
        if not rows:
            raise DataError(f"{path}: the file has a header but no data rows")
    width = len(header) if header is not None else len(rows[0])
    values = np.empty((len(rows), width))
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(
                f"{path}: row {lines[i]} has {len(row)} column(s), expected {width} (ragged "
                f"rows){_separator_hint(rows[0])}"
            )
        for j, cell in enumerate(row):
            number = _number(cell)
            if number is None:
                raise DataError(
                    f"{path}: row {lines[i]}, column {j + 1}: {cell.strip()!r} is not a "
                    f"number{_cell_hint(cell, j, width, i == 0 and header is None)}"
                )
            values[i, j] = number
    _check_finite(values, path, lines, dtype, remedy)
    if header is not None and _pandas_index(header, values):
        raise DataError(
            f"{path}: column 1 is named {header[0]!r} and holds whole numbers that number the "
            f"rows: the row index pandas writes unless told not to "
            f"(DataFrame.to_csv(path, index=False)); write the file without it, or drop that "
            f"column"
        )
    if guessed:  # said once the file is known to be read, not before a refusal
        warnings.warn(
            f"{path}: took the first row ({','.join(c.strip() for c in first)}) as a "
            "header, as pandas writes for unnamed columns; pass header=False (--header "
            "no) if it is data",
            UserWarning,
            stacklevel=3,
        )
    return values, header, lines


def _pandas_index(header: list[str], values: np.ndarray) -> bool:
    """Whether column 1 is pandas' row index.

    Its header cell is empty (or ``Unnamed: 0``, pandas' name for it when a file with an
    index is read and written again), the other columns are named, and it holds whole
    numbers that number the rows: distinct (a frame as built, or shuffled, or a subset),
    or runs ``0, 1, 2, ...`` one after another, five rows long or more on average (frames
    joined by ``pd.concat``).
    """
    if len(header) < 2 or not all(header[1:]):
        return False
    if header[0] and re.fullmatch(r"Unnamed: \d+", header[0]) is None:
        return False
    first = values[:, 0]
    if not (first == np.floor(first)).all():
        return False
    if len(np.unique(first)) == len(first):
        return True
    steps, starts = np.diff(first), int((first == 0).sum())
    # runs of 5 rows or more on average: a 0/1 flag or a small count starts "runs" too
    runs = first[0] == 0 and ((steps == 1) | (first[1:] == 0)).all() and 5 * starts <= len(first)
    return bool(runs)


def _separator_hint(first: list[str]) -> str:
    """A hint when the file looks separated by something other than commas."""
    text = ",".join(first)
    for name, mark in (("semicolons", ";"), ("tabs", "\t")):
        if mark in text:
            return f"; the file looks separated by {name}: pyroflows reads comma-separated values"
    return ""


def _cell_hint(cell: str, column: int, width: int, first_row: bool) -> str:
    """A hint for a cell that is not a number, when its cause is a common one."""
    separator = _separator_hint([cell])
    if separator:
        return separator
    if not cell.strip():
        return " (an empty cell" + (
            ": a comma at the end of the line?)" if column == width - 1 else ")"
        )
    if first_row:
        return " (a first row is read as a header only when none of its cells is a number)"
    return ""


def _check_finite(
    values: np.ndarray, path: Path, lines: list[int], dtype: torch.dtype | None, remedy: str
) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if math.isnan(values[row, col]) else "inf"
        where = f"row {lines[row]}, column {col + 1}"
        raise DataError(f"{path}: {kind} at {where}; every value must be finite")
    if dtype is not None and dtype.is_floating_point and dtype != torch.float64:
        big = np.abs(values) > torch.finfo(dtype).max
        if big.any():
            row, col = (int(i) for i in np.argwhere(big)[0])
            where = f"row {lines[row]}, column {col + 1}"
            value = float(values[row, col])
            raise DataError(beyond_range_message(str(path), value, where, dtype, remedy))
