"""Where a benchmark writes when no ``--out`` is given.

The results under ``benchmarks/results/`` are those of each script's full run, quoted
in the README: a smoke test or a partial run (one posterior, fewer seeds, other guides)
must not replace them. So the default stem is the full run's only for a run with the
full protocol; ``--quick`` writes ``<stem>_quick`` and any other run ``<stem>_partial``
(both ignored by git).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Where the full runs' results are kept.
RESULTS = Path(__file__).resolve().parent / "results"


def default_stem(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    stem: str,
    protocol: tuple[str, ...],
    quick: bool = False,
) -> str:
    """``stem``, ``stem + "_quick"`` or ``stem + "_partial"``, by the flags in ``protocol``.

    A flag counts as changed when its value differs from the parser's default (lists
    compared as sets: the same guides in another order are the same run).
    """
    if quick:
        return f"{stem}_quick"
    for flag in protocol:
        value, default = getattr(args, flag), parser.get_default(flag)
        if isinstance(value, list) and isinstance(default, list):
            value, default = set(value), set(default)
        if value != default:
            print(
                f"(--{flag.replace('_', '-')} differs from the full run's: writing "
                f"{stem}_partial, not the committed {stem}; --out names another file)"
            )
            return f"{stem}_partial"
    return stem


def results_path(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    stem: str,
    suffix: str = "",
    ignore: tuple[str, ...] = (),
) -> Path:
    """``benchmarks/results/<stem><suffix>`` by :func:`default_stem`, every flag counted.

    Every argument but ``out``, ``quick`` and ``ignore`` (those that change neither the
    numbers nor what is run, such as the number of worker processes) is the protocol.
    """
    protocol = tuple(name for name in vars(args) if name not in ("out", "quick", *ignore))
    quick = bool(getattr(args, "quick", False))
    return RESULTS / f"{default_stem(parser, args, stem, protocol, quick)}{suffix}"
