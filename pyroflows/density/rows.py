r"""Where a fit's rows come from: a tensor in memory, or a memory-mapped ``.npy`` file.

:func:`fit <pyroflows.density.fit>` reads its data only through :class:`Rows`: gather the
rows of a mini-batch by index, and stream all rows in chunks (standardisation moments,
validation scores). A :class:`TensorRows` holds a tensor; a :class:`MappedRows` holds a
NumPy memmap (``np.load(path, mmap_mode="r")``) and copies into memory only the rows it is
asked for, so a data set larger than memory is fitted in shuffled mini-batches: the
operating system pages in what each batch touches.

The moments come in one streaming pass, merged chunk by chunk in float64 (Chan, Golub &
LeVeque 1983):

.. math::
    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
    \bar x = \bar x_a + \delta\, n_b / n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n,

with the variance :math:`M_2 / n`; each chunk is also checked for NaN and inf. A column
that is not one value throughout but whose variance leaves float64's normal range (an sd
below about :math:`10^{-146}` or above :math:`10^{154}`) gets its sd from a second pass
that sums the squares of the deviations scaled by their largest (as LAPACK's
``dnrm2``), so the sd is exact to rounding however small or large; the moments are
given as sd, never squared again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from pyroflows.density.data import DataError, column_sd, non_finite_message

CHUNK = 8192


def _merge_moments(stats, block):
    """Add the rows of ``block`` to running ``(count, mean, M2)`` (Chan et al.), or start them.

    Works for float64 tensors and NumPy arrays alike.
    """
    n_b = block.shape[0]
    mean_b = block.mean(0)
    m2_b = ((block - mean_b) ** 2).sum(0)
    if stats is None:
        return n_b, mean_b, m2_b
    count, mean, m2 = stats
    n = count + n_b
    delta = mean_b - mean
    return n, mean + delta * (n_b / n), m2 + m2_b + delta**2 * (count * n_b / n)


class Rows:
    """Rows ``(N, D)`` a fit reads by index; subclasses say where they live.

    Attributes:
        index: the rows of the source this view holds (``None``: all of them, in order).
    """

    def __init__(self, like: torch.Tensor, name: str, index: torch.Tensor | None) -> None:
        self.like = like
        self.name = name
        self.index = index

    def __len__(self) -> int:
        return self._size() if self.index is None else int(self.index.numel())

    @property
    def dim(self) -> int:
        """Columns ``D``."""
        raise NotImplementedError

    def _size(self) -> int:
        raise NotImplementedError

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where :meth:`take` wants its positions (indices into a file stay on the CPU)."""
        return torch.device("cpu")

    def subset(self, positions: torch.Tensor) -> Rows:
        """The view of this view's rows at ``positions`` (CPU int64)."""
        index = positions if self.index is None else self.index[positions]
        view = type(self).__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.index = index
        return view

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows at ``positions`` of this view, as a tensor of the flow's dtype/device."""
        rows = positions if self.index is None else self.index[positions]
        return self._gather(rows)

    def chunks(self, size: int = CHUNK):
        """Every row of the view, in order, in tensors of at most ``size`` rows."""
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Column mean and (population) sd in float64, and the sum of every value."""
        stats, lowest, highest = None, None, None
        for chunk in self.chunks():
            block = chunk.double()
            stats = _merge_moments(stats, block)
            low_b, high_b = block.amin(0), block.amax(0)
            lowest = low_b if lowest is None else torch.minimum(lowest, low_b)
            highest = high_b if highest is None else torch.maximum(highest, high_b)
        count, mean, m2 = stats
        # a column whose variance left float64's normal range gets a second, scaled pass
        sd = column_sd(
            lambda: (chunk.double() for chunk in self.chunks()), count, mean, m2, highest > lowest
        )
        return mean, sd, float((mean * count).sum())


class TensorRows(Rows):
    """Rows held in a tensor already on the flow's device, with its dtype."""

    def __init__(self, data: torch.Tensor, name: str = "data") -> None:
        super().__init__(data, name, None)
        self.data = data

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.data.device

    def subset(self, positions: torch.Tensor) -> Rows:
        """The rows at ``positions``, copied together (so batches index them directly)."""
        return TensorRows(self.take(positions), self.name)

    @property
    def dim(self) -> int:  # noqa: D102
        return int(self.data.shape[1])

    def _size(self) -> int:
        return int(self.data.shape[0])

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.data[rows.to(self.data.device)]


class MappedRows(Rows):
    """Rows of a memory-mapped array, copied in (and checked) a mini-batch at a time.

    Args:
        array: a 2-D numeric ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``).
        like: a tensor of the flow (dtype and device of the batches).
        name: the argument's name or file, for messages.
    """

    def __init__(self, array: np.ndarray, like: torch.Tensor, name: str = "data") -> None:
        if array.ndim != 2:
            raise DataError(f"{name} must have shape (N, D), got {array.shape}")
        if array.shape[0] == 0:
            raise DataError(f"{name} is empty: it has no rows")
        if array.dtype.kind not in "biuf":
            raise DataError(f"{name} must be numeric, got dtype {array.dtype}")
        super().__init__(like, name, None)
        self.array = array
        # while the moments pass runs: [largest cast error per column, moments before the cast]
        self._rounding: list[Any] | None = None

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """As :meth:`Rows.moments`; also refuses columns the flow's dtype rounds too much."""
        from pyroflows.density.data import refuse_rounding

        if self.like.dtype == torch.float64:
            return super().moments()
        # the largest cast error per column, the moments of the values before the cast
        # (the spread to compare the error with, as the in-memory check has it) and their
        # smallest and largest values
        self._rounding = [np.zeros(self.dim), None, np.inf, -np.inf]
        try:
            mean, sd, total = super().moments()
            error, (count, original_mean, m2), lowest, highest = self._rounding
        finally:
            self._rounding = None
        original_sd = column_sd(
            self._originals,
            count,
            torch.from_numpy(original_mean),
            torch.from_numpy(m2),
            torch.from_numpy(highest > lowest),
        )
        refuse_rounding(self.name, error, original_mean, original_sd.numpy(), self.like.dtype)
        return mean, sd, total

    def _originals(self):
        """The view's rows as the file holds them (float64, before the cast), in chunks."""
        for start in range(0, len(self), CHUNK):
            rows = torch.arange(start, min(start + CHUNK, len(self)))
            wanted = (rows if self.index is None else self.index[rows]).numpy()
            yield torch.from_numpy(self._read(wanted))

    @property
    def dim(self) -> int:  # noqa: D102
        return int(self.array.shape[1])

    def _size(self) -> int:
        return int(self.array.shape[0])

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        wanted = rows.cpu().numpy()
        block = self._read(wanted)
        tensor = torch.as_tensor(block, dtype=self.like.dtype)
        bad = ~torch.isfinite(tensor)  # after the cast: 1e39 is finite, but not in float32
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            raise DataError(
                non_finite_message(self.name, float(block[i, j]), int(wanted[i]), j, tensor.dtype)
            )
        if self._rounding is not None and len(block):  # the moments pass: measure the cast
            error = np.abs(tensor.double().numpy() - block).max(axis=0)
            np.maximum(self._rounding[0], error, out=self._rounding[0])
            self._rounding[1] = _merge_moments(self._rounding[1], block)
            self._rounding[2] = np.minimum(self._rounding[2], block.min(axis=0))
            self._rounding[3] = np.maximum(self._rounding[3], block.max(axis=0))
        return tensor.to(self.like.device)

    def _read(self, wanted: np.ndarray) -> np.ndarray:
        """Rows ``wanted`` of the file (its own numbering), as float64, in that order."""
        order = np.argsort(wanted, kind="stable")  # read the file front to back
        block = np.empty((len(wanted), self.dim), dtype=np.float64)
        block[order] = self.array[wanted[order]]
        return block


def chunk_noise(shape: tuple[int, ...], seed: int, chunk: int, like: torch.Tensor) -> torch.Tensor:
    """:math:`U[0, 1)` noise for chunk ``chunk``, from a generator seeded by ``(seed, chunk)``.

    The same noise for a chunk every time it is drawn, however many ranks share the
    chunks, without holding it in memory; drawn on ``like``'s device, in its dtype.
    """
    g = torch.Generator(like.device).manual_seed(seed * 1_000_003 + chunk)
    return torch.rand(shape, generator=g, dtype=like.dtype, device=like.device)


def dequantized_columns(dequantize: object, dim: int) -> bool | list[int]:
    """``dequantize`` checked, in the form a fit records: which columns are integer cells.

    ``True`` (every column), ``False`` (none), or a sequence of 0-based column indices
    (negative ones count from the end), returned as ``True``, ``False`` or the sorted
    list of some columns: a count beside measurements, say.
    """
    if isinstance(dequantize, (bool, np.bool_)):
        return bool(dequantize)
    if isinstance(dequantize, (str, bytes)) or not isinstance(dequantize, Iterable):
        raise TypeError(
            f"dequantize must be True, False or a sequence of column indices (0-based), got "
            f"{dequantize!r}"
        )
    columns = list(dequantize)
    for j in columns:
        if isinstance(j, (bool, np.bool_)) or not isinstance(j, numbers.Integral):
            raise TypeError(f"dequantize's entries must be column indices (ints), got {j!r}")
        if not -dim <= j < dim:
            raise ValueError(
                f"dequantize names column {j}, but the data have {dim} column(s) "
                f"(indices 0 to {dim - 1}, or -{dim} to -1 counting from the end)"
            )
    chosen = sorted({int(j) % dim for j in columns})
    if len(chosen) < len(columns):
        raise ValueError(f"dequantize names a column twice: {columns}")
    if not chosen:
        return False
    return True if len(chosen) == dim else chosen


def noise_mask(dequantize: bool | list[int], dim: int, like: torch.Tensor) -> torch.Tensor | None:
    """1 on the dequantized columns and 0 elsewhere, in ``like``'s dtype; None for none.

    ``dequantize`` in :func:`dequantized_columns`' form.
    """
    if dequantize is False:
        return None
    mask = torch.ones(dim, dtype=like.dtype, device=like.device)
    if dequantize is not True:
        mask.zero_()[list(dequantize)] = 1.0
    return mask


#: What :func:`refuse_fractions` tells a fit, and a score, to do instead.
FIT_ADVICE = (
    "dequantize=True is for integer-valued data (counts, pixel levels); fit continuous data "
    "with dequantize=False (without --dequantize)"
)
SCORE_ADVICE = (
    "the model was fitted to integer data (dequantize=True) and scores whole-number rows "
    "(the probabilities of their unit cells)"
)
#: The same, where ``dequantize`` names some columns (``--dequantize-columns``).
FIT_ADVICE_SOME = (
    "dequantize's columns (--dequantize-columns) are the integer-valued ones (counts, "
    "levels); leave a continuous column out of them"
)
SCORE_ADVICE_SOME = (
    "the model was fitted with this column dequantized (integer data) and scores its whole "
    "numbers (the probabilities of their unit cells)"
)


def _advice(mask: torch.Tensor | None, every: str, some: str) -> str:
    """``every`` when ``mask`` covers every column (or is None), else ``some``."""
    return every if mask is None or bool(mask.bool().all()) else some


def refuse_fractions(
    x: torch.Tensor, name: str, start: int, advice: str, mask: torch.Tensor | None = None
) -> None:
    """Raise a :class:`DataError` at the first cell of ``x`` that is not a whole number.

    ``x`` holds rows ``start, start + 1, ...`` of ``name``. Dequantization models integer
    cells :math:`[x, x + 1)`: a fractional value has no cell. ``mask``: the dequantized
    columns (:func:`noise_mask`; default every column).
    """
    bad = x != x.floor()
    if mask is not None:
        bad = bad & mask.to(x.device).bool()
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        row = start + i
        raise DataError(
            f"{name} row {row + 1}, column {j + 1} (index [{row}, {j}]) is {x[i, j].item()!r}, "
            f"not a whole number: {advice}"
        )


#: The coarsest step of the flow's dtype, near the data's largest value, that dequantization
#: takes: the noise :math:`U[0, 1)` must keep some resolution inside each unit cell.
DEQUANTIZE_STEP = 1 / 16


def check_integers(rows: Rows, mask: torch.Tensor | None = None) -> None:
    """Stream ``rows`` (a whole source, not a split view) and refuse a fractional value.

    Also refuses values too large for the flow's dtype to resolve the noise in their
    cells (see :func:`refuse_too_large`). ``mask``: the dequantized columns, the only
    ones checked (:func:`noise_mask`; default every column).
    """
    start, largest, dtype = 0, 0.0, None
    for x in rows.chunks():
        refuse_fractions(x, rows.name, start, _advice(mask, FIT_ADVICE, FIT_ADVICE_SOME), mask)
        start += x.shape[0]
        dtype = x.dtype
        if mask is not None:
            x = x[:, mask.to(x.device).bool()]
        if x.numel():
            largest = max(largest, float(x.abs().max()))
    if dtype is not None:
        refuse_too_large(largest, dtype, rows.name)


def refuse_too_large(largest: float, dtype: torch.dtype, name: str) -> None:
    """Refuse integer data whose largest magnitude ``dtype`` cannot dequantize.

    In float32 a value of :math:`2^{24}` has no neighbour within 1, so ``x + u`` rounds
    back to ``x``, and the fit learns a density of the noise's rounding, not the data's
    (its draws, floored, were all even in one probe). Values are refused where the
    dtype's step exceeds :data:`DEQUANTIZE_STEP`: from :math:`2^{20}` up in float32 (step
    1/8 there), :math:`2^7` in float16 and :math:`2^4` in bfloat16.
    """
    largest = abs(largest)
    if dtype == torch.float64 or not math.isfinite(largest) or largest < 1:
        return  # a non-finite value is refused where the values are checked
    # the dtype's step between neighbours in [2^e, 2^(e+1)), which holds `largest`
    step = 2.0 ** math.floor(math.log2(largest)) * torch.finfo(dtype).eps
    if step > DEQUANTIZE_STEP:
        raise DataError(
            f"{name} holds values up to {largest:.9g}, too large to dequantize in {dtype}: the "
            f"noise U[0,1) added to them rounds to steps of {step:g}, so the fit would learn "
            "the rounding; fit with dtype float64 (--dtype float64)"
        )


def log_prob(
    flow: torch.nn.Module,
    rows: Rows,
    dequantize: bool | list[int] = False,
    draws: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    r"""Log-density of every row, streamed in chunks; shape ``(N,)``.

    With ``dequantize`` the rows are integer cells :math:`[x, x + 1)` of a flow fitted to
    :math:`x + U[0, 1)`, and the score is the Monte Carlo estimate, over ``draws`` seeded
    noise draws, of the lower bound
    :math:`\mathbb E_u \log p(x + u) \le \log \int_{[0,1)^D} p(x + u)\,du = \log P(x)`
    (Theis et al. 2016), comparable with the validation NLL of the fit. Without, it is
    :math:`\log p(x)`. With some columns dequantized (a list of them, as
    :func:`dequantized_columns` gives it), the noise goes on those only: the score is a
    density in the other columns and a probability in those. Every row gets the same
    ``draws`` noise vectors, so a row's score does not depend on where it stands among the
    rows (scored alone, in another order or in a subset, it is the same number, to the
    float rounding of batched matrix products: about 1e-6 in float32). A fractional value
    in a dequantized column is refused (it has no integer cell). The rows are finite
    (checked as they are read), so a NaN can only come from an overflow inside the flow,
    for a point so far out that its density is 0: it is reported as ``-inf``.
    """
    like = flow.base_loc
    parts = []
    mask = noise_mask(dequantized_columns(dequantize, rows.dim), rows.dim, like)
    u = chunk_noise((draws, 1, rows.dim), seed, 0, like) * mask if mask is not None else None
    advice = _advice(mask, SCORE_ADVICE, SCORE_ADVICE_SOME)
    start = 0
    with torch.no_grad():
        d = flow()
        for x in rows.chunks():
            if u is None:
                parts.append(d.log_prob(x))
                continue
            refuse_fractions(x, rows.name, start, advice, mask)
            start += x.shape[0]
            parts.append(d.log_prob(x + u).mean(0))
    logp = torch.cat(parts)
    return logp.masked_fill(logp.isnan(), -math.inf)


def sample(
    flow: torch.nn.Module, n: int, seed: int, dequantize: bool | list[int] = False
) -> torch.Tensor:
    """``n`` draws of the fitted density, seeded by ``seed`` (torch's global state kept).

    With ``dequantize`` the flow is a density of :math:`x + U[0, 1)`, and the draws are
    the integer cells they fall in (their floor): the model of the integer data. With
    some columns dequantized (a list), those columns are floored.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        draws = flow().sample((n,))
    mask = noise_mask(dequantized_columns(dequantize, draws.shape[-1]), draws.shape[-1], draws)
    return draws if mask is None else torch.where(mask.bool(), draws.floor(), draws)


def as_source(
    data: object,
    name: str,
    like: torch.Tensor,
    dim: int | None,
    fitting: bool = False,
    width: str = "the flow's dim",
) -> Rows:
    """Wrap ``data`` for a fit: a memmap stays on disk, anything else is checked in memory.

    With ``fitting``, columns the flow's dtype rounds too much are refused: in memory now,
    a memmap in its moments pass (which only a fit runs).
    """
    from pyroflows.density.data import as_rows

    if isinstance(data, np.memmap):
        if name == "data" and getattr(data, "filename", None):
            name = str(data.filename)
        source = MappedRows(data, like, name)
        if dim is not None and source.dim != dim:
            raise DataError(f"{name} must have {dim} columns ({width}), got {source.dim}")
        return source
    return TensorRows(as_rows(data, name, like, dim, fitting, width), name)
