"""The ``pyroflows`` command line: fit a density to a table, sample it, score rows.

::

    pyroflows fit data.csv --flow nsf --out model.pt     # train, write the model file
    pyroflows sample model.pt -n 1000 > samples.csv      # draws as CSV on stdout
    pyroflows score model.pt test.csv > logp.txt         # log p(x) per row on stdout
    pyroflows info model.pt                              # what the file holds

DATA is a CSV file (with or without a header row: ``--header`` says which when the first
row is all numbers) or a ``.npy`` array. Bad input gets one
line on stderr, ``pyroflows: error: ...``, and exit code 2; warnings are one line each,
``pyroflows: warning: ...``. No command overwrites a file without ``--force``, nor, even
with it, one of its inputs; ``sample`` always writes a header (``x1,x2,...`` for a model
fitted without column names). Ctrl-C during ``fit`` leaves a checkpoint in
``MODEL.ckpt/`` and the same command with ``--resume`` continues from it (exit code 130).
The checkpoint is removed once the model file is written.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: what an overflow message suggests besides rescaling
_FLOAT64 = "fit with --dtype float64"


class _Failure(Exception):
    """A user error: printed as one line, exit code 2."""


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]  # an empty part ("16,,16") too
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes such as 64,64; got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive ints, got {text!r}")
    return sizes


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {seed}")
    return seed


def _device(text: str):
    """``text`` as a ``torch.device`` that this torch can use, or a one-line failure."""
    import torch

    try:
        device = torch.device(text)
        torch.empty(0, device=device)  # e.g. "cuda" on a CPU-only build fails here
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _Failure(f"--device {text!r} cannot be used here: {reason}") from None
    if device.type == "meta":  # shapes without values: nothing to fit, draw or score
        raise _Failure(f"--device {text!r} holds no values (torch's shape-only device)")
    return device


class _Defaults(argparse.HelpFormatter):
    """Help with "(default: ...)" after each option that has a value as its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS:
            return text  # flags, and options whose help says what leaving them out does
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (not a usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"pyroflows: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from pyroflows import BUILDERS, __version__

    parser = _Parser(
        prog="pyroflows", description="Fit, sample and score normalizing-flow densities."
    )
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser(
        "fit", help="fit a flow to DATA and write a model file", formatter_class=_Defaults
    )
    fit.add_argument("data", metavar="DATA", help="CSV (header optional) or .npy file")
    _header_flag(fit)
    fit.add_argument("--out", "-o", required=True, metavar="MODEL", help="model file to write")
    fit.add_argument("--flow", default="nsf", choices=sorted(BUILDERS), help="flow builder")
    fit.add_argument("--transforms", type=int, default=5, help="flow layers")
    fit.add_argument(
        "--hidden",
        type=_hidden,
        default=None,
        help="hidden layer sizes, comma-separated (default: 64,64; maf, iaf and "
        "autoregressive nsf: at least D-1 wide)",
    )
    fit.add_argument("--bins", type=int, default=None, help="spline bins (nsf only; default: 8)")
    fit.add_argument(
        "--autoregressive",
        choices=["maf", "iaf"],
        default=None,
        help="nsf only: autoregressive spline layers instead of coupling ones, in MAF form "
        "(one pass to score, D to sample: the better density fit) or IAF form (default: "
        "coupling)",
    )
    fit.add_argument("--activation", default="relu", help="relu, elu, tanh, gelu or silu")
    fit.add_argument("--epochs", type=int, default=200, help="the most epochs")
    fit.add_argument("--batch-size", type=int, default=256, help="rows per mini-batch")
    fit.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    fit.add_argument(
        "--patience",
        type=int,
        default=20,
        help="stop after this many epochs without a better validation NLL (0: never)",
    )
    fit.add_argument("--validation", type=float, default=0.1, help="fraction of the rows held out")
    integer = fit.add_mutually_exclusive_group()
    integer.add_argument(
        "--dequantize", action="store_true", help="integer data: add U[0,1) noise to every column"
    )
    integer.add_argument(
        "--dequantize-columns",
        metavar="COLS",
        default=None,
        help="integer columns beside continuous ones (counts beside measurements): add U[0,1) "
        "noise to these only; comma-separated header names (DATA with a header; quoted as "
        "in CSV where a name holds a comma) or column numbers counted from 1 (without)",
    )
    fit.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype")
    fit.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seeds the weights, split and batches (default: 0; with --resume, the checkpoint's)",
    )
    fit.add_argument("--force", action="store_true", help="overwrite an existing MODEL")
    fit.add_argument("--resume", action="store_true", help="continue from MODEL.ckpt/")
    fit.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        metavar="EPOCHS",
        help="epochs between checkpoints in MODEL.ckpt/",
    )
    fit.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    fit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")

    sample = commands.add_parser(
        "sample", help="draw rows from a model, CSV on stdout", formatter_class=_Defaults
    )
    sample.add_argument("model", metavar="MODEL")
    sample.add_argument("-n", "--num-samples", type=int, default=1000, help="rows to draw")
    sample.add_argument(
        "--seed", type=_seed, default=None, help="seeds the draws (default: a fresh seed)"
    )
    sample.add_argument("--out", "-o", default=None, help=".csv or .npy file (default: stdout)")
    sample.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    score = commands.add_parser("score", help="log-density of each row of DATA, on stdout")
    score.add_argument("model", metavar="MODEL")
    score.add_argument("data", metavar="DATA")
    _header_flag(score)
    score.add_argument("--out", "-o", default=None, help=".csv or .npy file (default stdout)")
    score.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    info = commands.add_parser("info", help="describe a model file")
    info.add_argument("model", metavar="MODEL")
    return parser


def _header_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--header",
        choices=["auto", "yes", "no"],
        default="auto",
        help="whether a CSV's first row is its header; auto: when none of it is a number, "
        "or it is 0,1,...,D-1 (pandas' header for unnamed columns; ,0,1,... with its index). "
        "Names are read without the spaces around them (pandas keeps them unless read "
        "with pd.read_csv(path, skipinitialspace=True))",
    )


def _read(
    args: argparse.Namespace,
    dtype: Any,
    whole_numbers: str | None = None,
    names: list[str] | None = None,
    whole_columns: list[int] | None = None,
) -> tuple[np.ndarray, list[str] | None]:
    """DATA as ``--header`` says; a note on stderr when auto took 0,1,... as a header.

    ``whole_numbers``: the advice when a value of integer data is a fraction (the CSV's
    line is named; the fit's own check counts data rows, not lines), in the 0-based
    ``whole_columns`` (default: all). ``names``: a model's columns, which auto takes for
    the header when the first row is exactly them.
    """
    from pyroflows.density.data import read_table

    header = {"auto": None, "yes": True, "no": False}[args.header]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        values, columns = read_table(
            args.data, dtype, _FLOAT64, header, whole_numbers, names, whole_columns
        )
    for warning in said:
        text = str(warning.message)
        if "as a header" in text or "names in another order" in text:
            # the pandas header taken, or the model's names swapped read as data: one
            # note, in the flag's terms
            text = text.replace("header=False (--header no)", "--header no")
            text = text.replace("header=True (--header yes)", "--header yes")
            print(f"pyroflows: note: {text}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return values, columns


def _integer_columns(given: str, names: list[str] | None, dim: int) -> bool | list[int]:
    """``--dequantize-columns``, as fit's 0-based ``dequantize``.

    Comma-separated header names when DATA has a header, column numbers from 1 to ``dim``
    when it has none: one reading each, so a header of numbers (years, pandas' 0,1,...)
    is never ambiguous. Unknown, repeated and empty tokens are refused. All the columns:
    ``True``, as ``--dequantize``.
    """
    flag = "--dequantize-columns"
    try:  # CSV quoting: '"a, b",c' names a column whose name holds a comma
        tokens = [token.strip() for token in next(csv.reader([given], skipinitialspace=True))]
    except (csv.Error, StopIteration):
        tokens = []
    if not tokens or not all(tokens):
        raise _Failure(f"{flag} takes comma-separated column names or numbers, got {given!r}")
    chosen = []
    for token in tokens:
        if names is not None and token not in names:
            raise _Failure(
                f"{flag} names no column {token!r}: DATA has a header, so give its names "
                f"({', '.join(names)})"
            )
        if names is None and not (token.isdigit() and 1 <= int(token) <= dim):
            raise _Failure(
                f"{flag} names no column {token!r}: DATA has no header, so give column "
                f"numbers, 1 to {dim}"
            )
        chosen.append(names.index(token) if names is not None else int(token) - 1)
    if len(set(chosen)) < len(chosen):
        raise _Failure(f"{flag} names a column twice, got {given!r}")
    moved = [t for t, j in zip(tokens, chosen, strict=True) if t.isdigit() and int(t) != j + 1]
    if moved:  # a header of numbers (pandas' 0,1,...): its names, not positions
        where = ", ".join(f"{t!r} is column {chosen[tokens.index(t)] + 1}" for t in moved)
        print(f"pyroflows: note: {flag} takes DATA's header names: {where}", file=sys.stderr)
    return True if len(chosen) == dim else sorted(chosen)


def _shown_columns(columns: list[int], names: list[str] | None) -> str:
    """0-based columns as ``--dequantize-columns`` takes them: names, else 1-based numbers.

    Numbers too when ``names`` (a file's header) lacks a column: a checkpoint of a wider
    table, resumed with this one.
    """
    if names is None or max(columns, default=-1) >= len(names):
        return ",".join(str(j + 1) for j in columns)
    # quoted as CSV where a name holds a comma or a quote (as the flag reads it back)
    return ",".join(
        '"' + names[j].replace('"', '""') + '"' if any(c in names[j] for c in ',"') else names[j]
        for j in columns
    )


def _check_out(out: str | None, force: bool, inputs: list[str]) -> None:
    """Refuse an ``--out`` that exists (unless ``force``) or that is one of the inputs.

    Checked before any work: a slip of the shell must not replace a model or the data
    (not even with ``--force``: the command reads them).
    """
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise _Failure(f"{out} is a directory; --out takes a file name")
    if not path.exists():
        return
    for given in inputs:
        try:
            same = path.samefile(given)
        except OSError:  # an input that is not there is named by its own check
            same = False
        if same:
            raise _Failure(f"--out {out} is the input {given}: write the output elsewhere")
    if not force:
        raise _Failure(f"{out} exists; pass --force to overwrite it")


def _write(values: Any, out: str | None, header: list[str] | None) -> None:
    """A tensor's values as .npy, or as CSV with the digits that round-trip its dtype.

    A file is written whole or not at all (:func:`~pyroflows.density.fit.write_atomic`).
    """
    from pyroflows.density.fit import write_atomic

    digits = 17 if values.dtype.itemsize == 8 else 9  # float64, float32
    values = values.double().numpy()
    if out is not None:  # its folder made, as fit's --out makes the model's
        folder = Path(out).parent
        blocked = [p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()]
        if blocked:
            raise _Failure(f"--out {out}: {blocked[-1]} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _Failure(f"--out {out}: its folder cannot be made ({error.strerror})") from None
    if out is None:
        _write_csv(sys.stdout, values, header, digits)
    elif out.lower().endswith(".npy"):  # np.save(name) would add ".npy" to "x.NPY"
        write_atomic(out, lambda stream: np.save(stream, values))
    else:  # an old file --force replaces stays whole until the new one is

        def text(stream: Any) -> None:
            wrapper = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            _write_csv(wrapper, values, header, digits)
            wrapper.flush()
            wrapper.detach()  # write_atomic closes the binary stream

        write_atomic(out, text)


def _write_csv(stream: Any, values: Any, header: list[str] | None, digits: int) -> None:
    if header is not None:  # quoted where a name holds a comma or a quote
        csv.writer(stream, lineterminator="\n").writerow(header)
    np.savetxt(stream, values, delimiter=",", fmt=f"%.{digits}g")


def _fit(args: argparse.Namespace) -> None:
    import torch

    from pyroflows.density import ResumeMismatch, build, distributed, fit, save
    from pyroflows.density.fit import (
        CHECKPOINT,
        checkpoint_finished,
        read_checkpoint,
        unwritable,
    )
    from pyroflows.density.rows import FIT_ADVICE, FIT_ADVICE_SOME

    device = _device(args.device)
    rank, _ = distributed.setup(device)  # under torchrun: join the process group
    out = Path(args.out)
    _check_out(args.out, args.force, [args.data])
    reason = unwritable(out.parent)  # now, not after the training
    if reason is not None:
        raise _Failure(f"--out {out}: its folder {out.parent} cannot be written: {reason}")
    dtype = getattr(torch, args.dtype)
    values, columns = _read(args, dtype, FIT_ADVICE if args.dequantize else None)
    dequantize: bool | list[int] = args.dequantize
    if args.dequantize_columns is not None:
        dequantize = _integer_columns(args.dequantize_columns, columns, values.shape[1])
        part = values[:, dequantize] if isinstance(dequantize, list) else values
        readable = Path(args.data).is_file()  # a pipe reads once: the fit names the row
        csv_file = readable and not str(args.data).lower().endswith(".npy")
        if csv_file and (part != np.floor(part)).any():
            # read again, to name the fraction's line (a .npy file's rows: the fit names)
            whole = list(range(values.shape[1])) if dequantize is True else dequantize
            _read(args, dtype, FIT_ADVICE_SOME, whole_columns=whole)
    options = {
        "transforms": args.transforms,
        "hidden": args.hidden,
        "activation": args.activation,
        "dtype": args.dtype,
    }
    if args.flow == "nsf":
        options["bins"] = 8 if args.bins is None else args.bins
        if args.autoregressive is not None:
            options["autoregressive"] = args.autoregressive
    else:
        for flag, given in (("--bins", args.bins), ("--autoregressive", args.autoregressive)):
            if given is not None:
                raise _Failure(
                    f"{flag} applies to --flow nsf only (its spline layers), got --flow {args.flow}"
                )
    torch.manual_seed(0 if args.seed is None else args.seed)  # resumed: the checkpoint's weights
    try:
        flow = build(args.flow, values.shape[1], options).to(device)
    except (TypeError, ValueError) as error:
        raise _Failure(_builder_in_flag_terms(str(error), args.flow, values.shape[1])) from None
    checkpoints = out.with_name(out.name + ".ckpt")
    previous = checkpoints / "checkpoint.pt"
    finished = checkpoint_finished(previous) if previous.exists() else False
    if finished is None and (args.resume or not args.force):  # every rank looks
        raise _Failure(
            f"{previous} is not a readable pyroflows checkpoint; run without --resume and "
            f"with --force to start afresh (and discard it)"
        )
    if not args.resume and previous.exists():  # every rank looks, so all refuse together
        if not args.force and not finished:
            raise _Failure(
                f"{previous} holds an unfinished fit; pass --resume to continue it, or "
                f"--force to start afresh (and discard it)"
            )
        distributed.barrier()  # every rank has looked before rank 0 removes it
        if rank == 0:
            previous.unlink()  # a fresh fit starts a fresh series
    # the checkpoint a resume continues, read once (it holds the whole flow's weights)
    kept = read_checkpoint(previous) if args.resume and previous.exists() else None
    if kept is not None and kept.get("context") is not None:
        raise _Failure(
            f"{previous} holds a conditional fit, p(x | c), written by fit(flow, x, "
            f"context=c) in Python, and the command line fits p(x): resume it with that call "
            f"and resume=True, or drop --resume and add --force to start afresh"
        )
    if args.patience is not None and args.patience < 0:
        raise _Failure(f"--patience must be >= 0 (0: never stop early), got {args.patience}")
    if args.resume and not previous.exists() and rank == 0:  # a loop that always resumes
        print(
            f"pyroflows: note: --resume: no checkpoint at {previous}; starting afresh",
            file=sys.stderr,
        )
    seed = args.seed
    if seed is None:  # resuming a checkpoint: its seed (its split and batches); else 0
        seed = kept["seed"] if kept is not None else 0
    try:
        history = fit(
            flow,
            values,
            validation=args.validation,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            patience=args.patience or None,
            dequantize=dequantize,
            seed=seed,
            progress=None if not args.quiet else False,
            checkpoint_dir=checkpoints,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            name=str(args.data),
        )
    except ResumeMismatch as error:
        raise _Failure(_mismatch(error, columns)) from None
    except (TypeError, ValueError, FloatingPointError) as error:
        raise _Failure(_in_flag_terms(str(error))) from None
    except KeyboardInterrupt:
        if (checkpoints / CHECKPOINT).exists():
            said = f"checkpoint in {checkpoints}/: run the same command with --resume to continue"
        else:  # a second Ctrl-C stops at once, without one, before the first was written
            said = (
                "stopped before any checkpoint was written (one is written every "
                "--checkpoint-every epochs, and at a single Ctrl-C): nothing to resume; run "
                "the same command again"
            )
        print(f"pyroflows: interrupted; {said}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if rank != 0:  # one model file: rank 0 writes it and reports
        distributed.barrier()
        return
    save(
        out,
        flow,
        name=args.flow,
        options=options,
        standardize=True,
        dequantize=dequantize,
        columns=columns,
        history=history.as_dict(),
        training=_training(args, seed),
        force=True,
    )
    _discard(previous)  # the model file now holds what the final checkpoint kept
    dim = values.shape[1]
    score = history.best_val_nll  # the best epoch's validation (or, without, training) NLL
    kind = "validation" if history.val_nll else "training"
    print(
        f"fitted {args.flow} to {values.shape[0]} rows x {dim} columns in {history.epochs} "
        f"epochs ({history.seconds:.1f} s); best epoch {history.best_epoch}, {kind} NLL "
        f"{score:.4f} nats/row ({score / dim:.4f} per dim); wrote {out}"
    )
    distributed.barrier()  # the others wait for the model file before leaving the group


#: fit's arguments that the command line sets by one flag, with a value
_FLAGS = {
    "seed": "--seed",
    "epochs": "--epochs",
    "lr": "--lr",
    "patience": "--patience",
    "dequantize": "--dequantize",
    "validation": "--validation",
    "batch_size": "--batch-size",
    "dtype": "--dtype",
}

#: what else a refusal can name, without values (whole tables, a flow's layers)
_OTHERS = {
    "data": "other DATA",
    "validation_rows": "other DATA (the rows --validation holds out differ)",
    "flow": "another flow (--flow, --transforms, --hidden, --bins, --autoregressive, "
    "--activation or --dtype)",
}


#: fit's argument names as the command line spells them, for its messages
_SPELLED = {
    **{name: flag for name, flag in _FLAGS.items() if name != "dequantize"},
    "checkpoint_every": "--checkpoint-every",
    # the flow builder's options
    **{n: f"--{n}" for n in ("transforms", "hidden", "bins", "activation", "autoregressive")},
}


def _builder_in_flag_terms(text: str, flow: str, dim: int) -> str:
    """A flow builder's refusal, naming the flag (and the command line's remedy)."""
    text = _in_flag_terms(text)
    if text.startswith("dim must be >= 2 for a coupling flow"):
        text = (
            f"--flow {flow} is a coupling flow, which splits the columns in two: it needs "
            f"at least 2 columns, and the data have {dim}; use --flow maf, iaf or nsf"
        )
    return text


def _in_flag_terms(text: str) -> str:
    """A message of ``fit`` about one of its arguments, naming the flag instead.

    And its advice on a loss gone non-finite: the command line has no ``clip_grad``.
    """
    text = text.replace("try a smaller lr or clip_grad", "try a smaller --lr")
    name = text.split(" ", 1)[0]
    if name in _SPELLED and text.startswith(f"{name} must "):
        text = _SPELLED[name] + text[len(name) :]
        if name == "validation":  # rows of their own cannot be given here
            text = text.replace(" or rows,", ",")
    return text


def _mismatch(error: Any, error_names: list[str] | None = None) -> str:
    """A fit's refusal to resume, in the command line's terms (``error_names``: DATA's)."""

    def shown(name: str, value: Any) -> str:
        if name == "patience" and value is None:
            value = 0
        if name == "dequantize" and isinstance(value, list):
            return f"--dequantize-columns {_shown_columns(value, error_names)}"
        if name == "dequantize":
            return "--dequantize" if value else "no --dequantize"
        return f"{_FLAGS[name]} {value}"

    scalars = [n for n in error.changed if n in _FLAGS]
    others = [n for n in error.changed if n not in _FLAGS]
    parts = []
    if scalars:
        then = ", ".join(shown(n, error.changed[n][0]) for n in scalars)
        now = ", ".join(shown(n, error.changed[n][1]) for n in scalars)
        parts.append(f"was written by a fit with {then}; now {now}")
    for name in others:
        parts.append(f"was written for {_OTHERS.get(name, f'another {name}')}")
    return (
        f"{error.path} {'; and '.join(parts)}: pass the same to resume it, or drop --resume "
        f"and add --force to start afresh"
    )


def _discard(checkpoint: Path) -> None:
    """Remove a finished fit's checkpoint, and its folder if nothing else is in it."""
    checkpoint.unlink(missing_ok=True)
    try:
        checkpoint.parent.rmdir()
    except OSError:  # the user's own files are in it: leave them
        pass


def _load(path: str, command: str | None = None):
    """The model file's flow and entries; a conditional flow only for ``info``."""
    from pyroflows.density import load

    flow, info = load(path)
    if command is not None and flow.conditional:
        call = "flow(c).sample((n,))" if command == "sample" else "flow(c).log_prob(x)"
        raise _Failure(
            f"{path} holds a conditional flow p(x | c) (a context of size "
            f"{flow.context_features}), and `pyroflows {command}` takes models of p(x): in "
            f"Python, flow, info = pyroflows.density.load({path!r}), then {call}"
        )
    return flow, info


def _sample(args: argparse.Namespace) -> None:
    import torch

    from pyroflows.density.rows import sample

    if args.num_samples < 1:
        raise _Failure(f"-n must be a positive int, got {args.num_samples}")
    _check_out(args.out, args.force, [args.model])
    flow, info = _load(args.model, "sample")
    generator_seed = args.seed if args.seed is not None else int(torch.seed() % 2**31)
    draws = sample(flow, args.num_samples, generator_seed, info["dequantize"])
    # always a header (x1, x2, ... for a model fitted without one): integer draws of a
    # dequantized model could otherwise start with 0,1,..., which `score` and `fit`
    # would take for pandas' header and drop
    columns = info["columns"] or [f"x{j + 1}" for j in range(info["dim"])]
    _write(draws, args.out, columns)


def _score(args: argparse.Namespace) -> None:
    from pyroflows.density.rows import SCORE_ADVICE, SCORE_ADVICE_SOME, as_source, log_prob

    _check_out(args.out, args.force, [args.model, args.data])
    flow, info = _load(args.model, "score")
    dequantized = info["dequantize"]
    some = isinstance(dequantized, list)  # whole numbers in those columns only
    advice = SCORE_ADVICE_SOME if some else SCORE_ADVICE if dequantized else None
    values, columns = _read(
        args, flow.base_loc.dtype, advice, info["columns"], dequantized if some else None
    )
    if values.shape[1] != info["dim"]:
        raise _Failure(
            f"{args.data} has {values.shape[1]} columns but the model was fitted to {info['dim']}"
        )
    if (
        columns is not None
        and info["columns"] is not None
        # names as the CSV reader gives them, stripped: ' b' of a frame read by pandas
        # from "a, b" is the model's column b, and its own samples' header is read so
        and columns != [str(c).strip() for c in info["columns"]]
    ):
        raise _Failure(
            f"{args.data} has columns {columns} but the model was fitted to {info['columns']}"
        )
    rows = as_source(values, args.data, flow.base_loc, info["dim"])  # .npy: streamed
    logp = log_prob(flow, rows, dequantize=info["dequantize"])  # integer cells: the bound
    npy = args.out is not None and args.out.lower().endswith(".npy")
    # one number a row: a CSV column, a vector in .npy (as log_prob gives it)
    _write(logp if npy else logp[:, None], args.out, ["log_prob"] if columns else None)
    mean = logp.double().mean().item()
    print(
        f"{len(rows)} rows: mean log p(x) {mean:.4f} nats ({mean / info['dim']:.4f} per dim)",
        file=sys.stderr,
    )


def _info(args: argparse.Namespace) -> None:
    flow, info = _load(args.model)
    params = sum(p.numel() for p in flow.parameters())
    history = info["history"] or {}
    lines = [
        f"model     {args.model}",
        f"flow      {info['flow']}, {info['dim']} columns, {params} parameters, {info['dtype']}"
        + (f", given a context of {flow.context_features}" if flow.conditional else ""),
        f"options   {_shown_options(flow, info['options'])}",
        f"standardized {info['standardize']}, dequantized {_dequantized(info)}",
    ]
    if info["columns"] is not None:
        # quoted where a name would read as two (a comma) or hides its spaces
        shown = [
            repr(c) if ("," in c or "'" in c or '"' in c or c != c.strip() or not c) else c
            for c in info["columns"]
        ]
        lines.append(f"columns   {', '.join(shown)}")
    if history:
        kind = "validation" if history.get("val_nll") else "training"  # as fit printed it
        lines.append(
            f"fit       {history['epochs']} epochs, best epoch {history['best_epoch']}, "
            f"best {kind} NLL {history['best_val_nll']:.4f} nats/row, "
            f"{history['seconds']:.1f} s"
        )
    training = info.get("training")
    if training:
        lines.append("training  " + ", ".join(f"{k}={v}" for k, v in training.items()))
    print("\n".join(lines))


def _dequantized(info: dict[str, Any]) -> str:
    """``info``'s dequantize for people: True, False, or its columns as the flag names them."""
    if not isinstance(info["dequantize"], list):
        return str(info["dequantize"])
    shown = _shown_columns(info["dequantize"], info["columns"])
    return f"columns {shown} (--dequantize-columns {shown})"


def _training(args: argparse.Namespace, seed: int | None) -> dict[str, Any]:
    """The fit's settings, for the model file: the flags', and fit's defaults for the rest."""
    from pyroflows.density import fit

    defaults = inspect.signature(fit).parameters
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": defaults["weight_decay"].default,
        "validation": args.validation,
        "patience": args.patience or None,
        "clip_grad": defaults["clip_grad"].default,
        "schedule": defaults["schedule"].default,
        "seed": seed,  # resumed: the checkpoint's seed
    }


def _shown_options(flow: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options as stored, with a default ``hidden`` shown as the widths it gave."""
    if "hidden" not in options or options["hidden"] is not None:
        return options
    trunk = next((m for m in flow.modules() if hasattr(m, "hidden_layers")), None)
    widths = [layer.out_features for layer in trunk.hidden_layers] if trunk else []
    return {**options, "hidden": f"default {widths}"}


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the command line shows it: ``pyroflows: warning: ...`` on stderr."""
    print(f"pyroflows: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0, 2 for bad input, 130 on Ctrl-C)."""
    args = _parser().parse_args(argv)
    from pyroflows.density import DataError, ModelFileError

    command = {"fit": _fit, "sample": _sample, "score": _score, "info": _info}[args.command]
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # one line each, not Python's two with a path
    try:
        try:
            command(args)
        finally:
            warnings.showwarning = shown
            _leave_process_group()
    except (_Failure, DataError, ModelFileError, FileExistsError) as error:
        print(f"pyroflows: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # an --out path in a missing folder, no permission, disk full
        if isinstance(error, BrokenPipeError):
            sys.stderr.close()
            return 0
        where = f"{error.filename}: " if error.filename else ""
        print(f"pyroflows: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
