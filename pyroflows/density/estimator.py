r"""``FlowDensity``: a normalizing flow as a scikit-learn density estimator.

It follows the protocol of ``sklearn.neighbors.KernelDensity``: ``fit(X)``,
``score_samples(X)`` (:math:`\log p(x)` per row), ``score(X)`` (the total
:math:`\sum_n \log p(x_n)`, so ``GridSearchCV`` and ``cross_val_score`` pick the model with
the highest held-out likelihood) and ``sample(n_samples, random_state)``. Scores are in
the data's own units: the standardisation is part of the fitted flow.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "FlowDensity needs scikit-learn: pip install 'pyroflows[density]' (or scikit-learn)"
    ) from error
try:
    from sklearn.utils.validation import validate_data
except ImportError as error:  # scikit-learn before 1.6
    import sklearn

    raise ImportError(
        f"FlowDensity needs scikit-learn >= 1.6 (for validate_data), found "
        f"{sklearn.__version__}: pip install -U 'scikit-learn>=1.6'"
    ) from error

from pyroflows._checks import check_bool
from pyroflows.density import distributed as parallel
from pyroflows.density import model_file
from pyroflows.density.data import as_rows, dtype_name
from pyroflows.density.fit import CHECKPOINT, ResumeMismatch
from pyroflows.density.fit import fit as fit_flow
from pyroflows.density.rows import (
    TensorRows,
    dequantized_columns,
    log_prob,
    refuse_too_large,
    sample,
)


class FlowDensity(BaseEstimator):
    r"""A normalizing-flow density estimator with scikit-learn's interface.

    ``fit`` builds the named flow for the data's number of columns and trains it with
    :func:`pyroflows.density.fit` (validation split, early stopping, best weights kept).

    Args:
        flow: builder name: ``"nsf"``, ``"maf"``, ``"realnvp"``, ``"nice"`` (``"iaf"``
            works but scores in ``D`` passes per layer: slow to fit).
        transforms: number of flow layers.
        hidden: hidden sizes of each conditioner (``None``: ``(64, 64)``, and for the
            MADE of maf, iaf and autoregressive nsf at least ``D - 1`` wide).
        bins: spline bins (``nsf`` only; the other flows ignore it, as scikit-learn's
            ``SVC`` ignores ``degree`` for kernels other than ``"poly"``, so one grid can
            search over ``flow`` and ``bins`` together).
        activation: ``"relu"``, ``"elu"``, ``"tanh"``, ``"gelu"`` or ``"silu"``.
        options: further builder keyword arguments (e.g. ``{"autoregressive": "maf"}``
            for ``nsf``, ``{"clamp": 5.0}`` for ``maf``); not those set by the
            parameters above (``transforms``, ``hidden``, ``bins``, ``activation``,
            ``dtype``).
        epochs, batch_size, lr, weight_decay, patience, clip_grad, schedule,
            standardize, dequantize, progress, checkpoint_dir, resume: as for
            :func:`~pyroflows.density.fit` (but ``progress`` is off by default here: an
            estimator inside ``GridSearchCV`` would print a bar per fit).
            ``dequantize`` takes ``True`` or a list of 0-based column indices, or of
            column names when ``X`` is a data frame.
        validation_fraction: share of the training rows held out for early stopping.
        dtype: ``"float32"`` or ``"float64"`` (or ``torch.float32``, ``torch.float64``, or
            NumPy's ``np.float32``, ``np.float64``).
        random_state: seeds the initial weights, the split, the batches and the noise
            (an int, a NumPy ``RandomState`` or ``Generator``, or ``None``).
        distributed: ``True`` (default): under ``torchrun``, or in a script that made a
            process group, every process fits the same rows and each takes its share of
            every batch (see :func:`~pyroflows.density.fit`; with a ``random_state`` that
            is not an int, rank 0's draw seeds them all). ``False``: this process fits
            alone: a fit of each process's own rows, or one made by rank 0 alone.

    Attributes:
        flow_: the fitted :class:`~pyroflows.Flow` (its last layer is the standardisation).
        history_: the fit's :class:`~pyroflows.density.History`.
        n_features_in_: number of columns seen by ``fit``.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(300, 2))
        >>> est = FlowDensity(flow="maf", transforms=2, hidden=(16,), epochs=3,
        ...                   random_state=0).fit(X)
        >>> est.score_samples(X[:4]).shape, est.sample(5, random_state=0).shape
        ((4,), (5, 2))
    """

    def __init__(
        self,
        flow: str = "nsf",
        transforms: int = 5,
        hidden: int | Sequence[int] | None = None,
        bins: int = 8,
        activation: str = "relu",
        options: dict[str, Any] | None = None,
        epochs: int = 200,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        validation_fraction: float | None = 0.1,
        patience: int | None = 20,
        clip_grad: float | None = None,
        schedule: str | Callable[[torch.optim.Optimizer], Any] | None = "plateau",
        standardize: bool = True,
        dequantize: bool | Sequence[int | str] = False,
        dtype: str | torch.dtype | type | np.dtype = "float32",
        random_state: int | np.random.RandomState | np.random.Generator | None = None,
        progress: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        distributed: bool = True,
    ) -> None:
        self.flow = flow
        self.transforms = transforms
        self.hidden = hidden
        self.bins = bins
        self.activation = activation
        self.options = options
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.clip_grad = clip_grad
        self.schedule = schedule
        self.standardize = standardize
        self.dequantize = dequantize
        self.dtype = dtype
        self.random_state = random_state
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.distributed = distributed

    def _builder_options(self) -> dict[str, Any]:
        hidden = self.hidden
        if _is_int(hidden):
            hidden = [hidden]
        if not (hidden is None or _is_sequence(hidden)):
            raise TypeError(
                f"hidden must be None, an int or a sequence of ints (the hidden sizes of "
                f"each conditioner), got {type(hidden).__name__} {hidden!r}"
            )
        options: dict[str, Any] = {
            "transforms": _plain(self.transforms),
            "hidden": [_plain(size) for size in hidden] if _is_sequence(hidden) else hidden,
            "activation": self.activation,
            # torch.float64 and numpy's float64 as the model file's plain "float64"
            "dtype": _dtype_name(self.dtype),
        }
        if self.flow == "nsf":
            options["bins"] = _plain(self.bins)
        extra = self.options if self.options is not None else {}
        if not isinstance(extra, dict):
            raise TypeError(
                f"options must be a dict of further builder options (or None), got "
                f"{type(extra).__name__} {extra!r}"
            )
        for key in extra:
            value = extra[key]
            conditional = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if key == "context" and conditional and value >= 1:
                raise ValueError(
                    f"options['context'] makes a conditional flow p(x | c), and FlowDensity "
                    f"fits p(x): fit a conditional flow with pyroflows.density.fit(flow, x, "
                    f"context=c), got options['context']={value!r}"
                )
            if key in _NAMED:
                raise ValueError(
                    f"options[{key!r}] duplicates the {key} parameter: set "
                    f"FlowDensity({key}=...) instead (get_params() must describe the fit)"
                )
        options.update({k: _plain(v) for k, v in extra.items()})
        return options

    def fit(self, X, y=None) -> FlowDensity:  # noqa: N803 (scikit-learn's names)
        """Fit the flow to the rows of ``X`` (``(n_samples, n_features)``); ``y`` is ignored.

        ``y`` is there for scikit-learn's conventions (``cross_val_score(est, X, y)``), as
        in ``KernelDensity``: this estimator fits ``p(x)``, never ``p(x | y)``. A density
        conditional on a context is a conditional flow (``pyroflows.nsf(D, context=C)``)
        fitted with :func:`pyroflows.density.fit` (``fit(flow, x, context=c)``).

        All or nothing: an error or an interrupt (Ctrl-C, a notebook's stop) leaves the
        estimator as it was before the call. To keep a long fit's progress through an
        interrupt, give ``checkpoint_dir`` and fit again with ``resume=True``.

        Returns:
            The fitted estimator.
        """
        fitted = {k: self.__dict__[k] for k in _FITTED if k in self.__dict__}
        try:
            return self._fit(X)
        except BaseException:  # nothing lost: the previous fit (if any) stays whole
            for key in _FITTED:
                self.__dict__.pop(key, None)
            self.__dict__.update(fitted)
            raise

    def _fit(self, X) -> FlowDensity:  # noqa: N803
        # NaN and inf are left to fit, which names the row and the column
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, ensure_all_finite=False)
        validation = _plain(self.validation_fraction)
        if validation is not None and not (
            isinstance(validation, numbers.Real)
            and not isinstance(validation, bool)
            and 0 <= validation < 1
        ):
            raise ValueError(
                f"validation_fraction must be a number in [0, 1) (or None), got {validation!r}"
            )
        dequantize = dequantized_columns(_column_indices(self, self.dequantize), X.shape[1])
        if dequantize and X.size:
            # before fit's check that float32 holds the values, whose message is not this
            dtype = model_file.DTYPES.get(self._builder_options()["dtype"])
            if dtype is not None:
                columns = X if dequantize is True else X[:, dequantize]
                refuse_too_large(float(np.abs(columns).max()), dtype, "X")
        if isinstance(self.schedule, str) and self.schedule == "callable":
            raise ValueError(
                "schedule is 'callable': this estimator was loaded from a file fitted with a "
                "callable schedule, which a file cannot hold; set it again with "
                "set_params(schedule=...) to refit"
            )
        seed = _seed(self.random_state, "random_state")
        if check_bool(self.distributed, "distributed") and not _is_int(self.random_state):
            # one split and one batch order for every process of a data-parallel fit
            cpu = torch.device("cpu")
            if parallel.setup(cpu)[1] > 1:
                seed = parallel.broadcast_int(seed, cpu)
        # a fit resumed from its checkpoint takes the checkpoint's seed (its split and
        # batches): a seed drawn from random_state=None (or a RandomState, a Generator)
        # would differ on every call; an int's seed is the same on every call, so fit
        # refuses a checkpoint written under another int
        resuming = self.resume and self._checkpoint_exists()
        given = seed if not resuming or _is_int(self.random_state) else None
        options = self._builder_options()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = model_file.build(self.flow, X.shape[1], options, standardize=self.standardize)
        try:
            history = fit_flow(
                flow,
                X,
                validation=validation,
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                weight_decay=self.weight_decay,
                schedule=self.schedule,
                clip_grad=self.clip_grad,
                patience=self.patience,
                standardize=self.standardize,
                dequantize=dequantize,
                seed=given,
                progress=self.progress,
                checkpoint_dir=self.checkpoint_dir,
                resume=self.resume,
                name="X",
                distributed=self.distributed,
            )
        except ResumeMismatch as error:
            if "seed" not in error.changed and "validation" in error.changed:
                raise ResumeMismatch(  # fit's argument, in the estimator's name
                    re.sub(r"\bvalidation=", "validation_fraction=", str(error)),
                    error.path,
                    error.changed,
                ) from None
            if "seed" not in error.changed:
                raise
            raise ResumeMismatch(
                f"random_state={self.random_state!r} gives another seed than the checkpoint "
                f"in {self.checkpoint_dir} was written with (the seed fixes the split and the "
                f"batches); pass the random_state that fit started with, or None, to resume, "
                f"or resume=False to start afresh",
                error.path,
                error.changed,
            ) from None
        self.history_ = history
        self.flow_ = flow
        self._options = options
        self._fitted_as = {
            "flow": self.flow,
            "standardize": self.standardize,
            "dequantize": dequantize,
        }
        # what the fit ran with, for the model file (a resumed fit drew its split and
        # batches with the checkpoint's seed, which this estimator does not know)
        training = {
            "epochs": _plain(self.epochs),
            "batch_size": _plain(self.batch_size),
            "lr": _plain(self.lr),
            "weight_decay": _plain(self.weight_decay),
            "validation": validation,
            "patience": _plain(self.patience),
            "clip_grad": _plain(self.clip_grad),
            # a callable cannot be kept: "callable" says so (a refit of a loaded
            # estimator then asks for it, where "plateau" would have trained another)
            "schedule": self.schedule if not callable(self.schedule) else "callable",
            "seed": given,
            "random_state": _plain(self.random_state) if _is_int(self.random_state) else None,
        }
        plain = (bool, int, float, str)  # what a file holds
        self._training = {k: v for k, v in training.items() if v is None or isinstance(v, plain)}
        return self

    def _fitted(self, name: str) -> Any:
        """The parameter ``name`` as the fit had it.

        ``set_params`` after a fit changes nothing until the next fit: ``flow_`` is still
        the flow fitted with the old value.
        """
        fitted_as = self.__dict__.get("_fitted_as")  # absent from pickles of before
        return fitted_as[name] if fitted_as is not None else getattr(self, name)

    def _checkpoint_exists(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        return (Path(self.checkpoint_dir) / CHECKPOINT).exists()

    def _rows(self, X) -> torch.Tensor:  # noqa: N803
        check_is_fitted(self, "flow_")
        X = validate_data(self, X, dtype=np.float64, reset=False, ensure_all_finite=False)
        # NaN and inf named by row and column here, and values checked in the flow's
        # dtype: 1e39 is finite, but not in float32
        return as_rows(X, "X", self.flow_.base_loc, self.n_features_in_)

    def score_samples(self, X) -> np.ndarray:  # noqa: N803
        r"""Log-density :math:`\log p(x)` of each row of ``X``, in the data's units.

        With ``dequantize=True`` the rows are integer cells and the score is the
        dequantized bound :math:`\mathbb E_u \log p(x + u) \le \log P(x)`, estimated
        with 16 seeded noise draws (see :func:`pyroflows.density.rows.log_prob`).

        Returns:
            An array of shape ``(n_samples,)``.
        """
        rows = TensorRows(self._rows(X), "X")
        return log_prob(self.flow_, rows, self._fitted("dequantize")).double().numpy()

    def score(self, X, y=None) -> float:  # noqa: N803
        r"""Total log-likelihood :math:`\sum_n \log p(x_n)` of the rows of ``X``."""
        return float(self.score_samples(X).sum())

    def sample(self, n_samples: int = 1, random_state=None) -> np.ndarray:
        r"""Draw ``n_samples`` rows from the fitted density (seeded by ``random_state``).

        With ``dequantize=True`` the flow is a density of :math:`x + u`,
        :math:`u \sim U[0, 1)^D`, so its draws are floored: integer rows, drawn from the
        model's probabilities of the integer cells (``flow_().sample()`` gives the
        continuous draws); with a list of columns, those columns are floored.

        Returns:
            An array of shape ``(n_samples, n_features)``.
        """
        check_is_fitted(self, "flow_")
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
            raise TypeError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples}")
        seed = _seed(random_state, "random_state")
        dequantize = self._fitted("dequantize")
        return sample(self.flow_, int(n_samples), seed, dequantize).double().numpy()

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the fitted model to ``path`` (see :mod:`pyroflows.density.model_file`)."""
        check_is_fitted(self, "flow_")
        columns = getattr(self, "feature_names_in_", None)
        model_file.save(
            path,
            self.flow_,
            name=self._fitted("flow"),
            options=self._options,
            standardize=self._fitted("standardize"),
            dequantize=self._fitted("dequantize"),
            columns=[str(c) for c in columns] if columns is not None else None,
            history=self.history_.as_dict(),
            training=getattr(self, "_training", None),
            force=force,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FlowDensity:
        """Read a model file written by :meth:`save` or ``pyroflows fit``.

        The estimator's parameters are those of the fit the file records: the flow's,
        and (from files that hold them: this version's) the fit's settings, so
        ``get_params()`` and a refit describe that fit, not the defaults. ``random_state``
        is the one the fit had if it was an int, else ``None`` (a NumPy generator's state
        is not kept; nor is it for files written by ``pyroflows fit``, which seeds by
        ``--seed``). A callable ``schedule`` is recorded as ``"callable"``: a refit needs
        it set again (``set_params(schedule=...)``), and says so.
        """
        flow, info = model_file.load(path)
        if flow.conditional:
            raise ValueError(
                f"{path} holds a conditional flow p(x | c) (a context of size "
                f"{flow.context_features}), and FlowDensity models p(x): read it with "
                f"flow, info = pyroflows.density.load(path), then flow(c) is p(x | c)"
            )
        options = dict(info["options"])
        est = cls(
            flow=info["flow"],
            transforms=options.get("transforms", 5),
            hidden=_hidden_option(options.get("hidden", (64, 64))),
            bins=options.get("bins", 8),
            activation=options.get("activation", "relu"),
            standardize=info["standardize"],
            dequantize=info["dequantize"],
            dtype=info["dtype"],
        )
        known = {"transforms", "hidden", "bins", "activation", "dtype"}
        est.options = {k: v for k, v in options.items() if k not in known} or None
        est.flow_, est._options = flow, options
        est._fitted_as = {k: info[k] for k in ("flow", "standardize", "dequantize")}
        est.n_features_in_ = info["dim"]
        if info.get("columns") is not None:
            est.feature_names_in_ = np.asarray(info["columns"], dtype=object)
        from pyroflows.density.fit import History

        est.history_ = History(**info["history"]) if info.get("history") else History()
        training = info.get("training")  # absent from files written before it existed
        if training is not None:
            est._training = dict(training)
            names = {"validation": "validation_fraction"}
            est.set_params(**{names.get(k, k): v for k, v in training.items() if k != "seed"})
        return est


#: The parameters that set a builder option: ``options`` must not set them a second time.
_NAMED = frozenset({"transforms", "hidden", "bins", "activation", "dtype"})
#: What ``fit`` sets: put back as it was when a fit fails.
_FITTED = (
    "n_features_in_",
    "feature_names_in_",
    "flow_",
    "history_",
    "_options",
    "_training",
    "_fitted_as",
)


def _seed(random_state: Any, name: str) -> int:
    """A seed in ``[0, 2**31 - 1)`` drawn from ``random_state``.

    An int, ``None``, a ``RandomState`` (scikit-learn's ``check_random_state``) or a NumPy
    ``Generator``.
    """
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    if _is_int(random_state) and not 0 <= random_state < 2**32:
        raise ValueError(
            f"{name} must be in [0, 2**32) (NumPy's seeds) when an int, got {random_state}"
        )
    try:
        state = check_random_state(random_state)
    except ValueError:
        raise ValueError(
            f"{name} must be an int, None, a numpy RandomState or Generator, got "
            f"{type(random_state).__name__} {random_state!r}"
        ) from None
    return int(state.randint(2**31 - 1))


def _dtype_name(dtype: Any) -> Any:
    """A torch or NumPy dtype by its name (``"float64"``); anything else as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype_name(dtype)
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    return dtype


def _plain(value: Any) -> Any:
    """A NumPy scalar (from ``np.arange`` or a search's parameter grid) as a Python one.

    The flow's options go into model files, which hold plain Python values only.
    """
    return value.item() if isinstance(value, np.generic) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _column_indices(est: FlowDensity, dequantize: Any) -> Any:
    """``dequantize``'s column names (of a data frame fitted) as 0-based indices.

    Anything else is returned as given, for :func:`dequantized_columns` to check.
    """
    if not _is_sequence(dequantize) or not any(isinstance(j, str) for j in dequantize):
        return dequantize
    names = getattr(est, "feature_names_in_", None)
    if names is None:
        raise TypeError(
            f"dequantize names columns {list(dequantize)!r}, but X has no column names (a "
            "pandas DataFrame has them): give 0-based column indices"
        )
    names = [str(n) for n in names]
    indices = []
    for j in dequantize:
        if isinstance(j, str):
            if j not in names:
                raise ValueError(f"dequantize names no column {j!r} of X; its columns are {names}")
            j = names.index(j)
        indices.append(j)
    return indices


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _hidden_option(hidden: Any) -> tuple[int, ...] | None:
    """A model file's ``hidden`` as the estimator's parameter (``None``: the default)."""
    return None if hidden is None else tuple(hidden)
