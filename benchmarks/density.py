"""Density estimation: held-out NLL and training time of pyroflows' flows against zuko and nflows.

For every data set of ``density_data`` (three generated ones whose true density is known,
three real ones bundled with scikit-learn) and every seed, each contender is built with
the same architecture (``K`` transforms, conditioners with two hidden layers of ``H``
units, ReLU; splines with the same bins on ``[-5, 5]``), trained on the same rows with
Adam at the same learning rate, batch size, epoch budget, plateau schedule and
early-stopping patience, and scored on the same held-out rows in the data's own units.
Ours go through the library's own loop, ``pyroflows.density.fit``; zuko and nflows
through ``train_generic``, a loop written to do what ``fit`` does (standardize, same
batches, same schedule, same stopping rule, best weights restored).

Contenders in one (data set, seed) job run one after the other in one process with one
torch thread, in an order rotated across jobs, after an untimed warm-up fit of each, so
time ratios are taken side by side. Prints a markdown table per data set and a table of
the targets, and writes JSON (and the markdown) under ``benchmarks/results/``::

    python benchmarks/density.py --workers 2            # the full run (hours on 2 cores)
    python benchmarks/density.py --quick                # a smoke test, minutes
    python benchmarks/density.py --datasets wine --contenders nsf zuko-nsf

Without ``--out``, only the full run writes ``results/density.{json,md}``; ``--quick``
writes ``density_quick`` and any other run ``density_partial``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # density_data
sys.path.insert(1, str(HERE.parent))  # the pyroflows of this working tree

import density_data  # noqa: E402
from _out import default_stem  # noqa: E402

OURS = ("maf", "realnvp", "nsf", "nsf-ar")
PEERS = ("zuko-maf", "zuko-nsf", "nflows-maf")
CONTENDERS = OURS + PEERS
LABELS = {
    "maf": ("maf", "pyroflows"),
    "realnvp": ("realnvp", "pyroflows"),
    "nsf": ("nsf (coupling)", "pyroflows"),
    "nsf-ar": ("nsf-ar (MAF form)", "pyroflows"),
    "zuko-maf": ("MAF", "zuko"),
    "zuko-nsf": ("NSF (autoregressive)", "zuko"),
    "nflows-maf": ("MAF", "nflows"),
}
TRUTH_TOLERANCE = 0.05  # nats per dimension


@dataclass(frozen=True)
class Config:
    """One data set's architecture and budget, the same for every contender.

    Attributes:
        transforms: flow layers ``K``.
        hidden: width ``H`` of the two hidden layers of every MADE / MLP.
        batch: mini-batch size.
        epochs: most epochs (early stopping usually ends the fit sooner).
        patience: epochs without a better validation NLL before stopping.
        lr: Adam's learning rate.
        bins: spline bins (NSF contenders).
        sizes: rows drawn for train, validation and test (generated data only).
    """

    transforms: int
    hidden: int
    batch: int
    epochs: int
    patience: int
    lr: float = 1e-3
    bins: int = 8
    sizes: tuple[int, int, int] = (0, 0, 0)


GENERATED_SIZES = (10_000, 2_000, 10_000)
QUICK_SIZES = (2_000, 500, 2_000)
CONFIGS = {
    "mixture": Config(5, 64, 256, 200, 20, sizes=GENERATED_SIZES),
    "ring": Config(5, 64, 256, 200, 20, sizes=GENERATED_SIZES),
    "student-t": Config(5, 64, 256, 200, 20, sizes=GENERATED_SIZES),
    "wine": Config(3, 32, 32, 1000, 30),
    "breast-cancer": Config(5, 64, 64, 1000, 30),
    "digits": Config(5, 64, 128, 500, 30),
}


# --------------------------------------------------------------------------- contenders


def build(
    name: str, dim: int, cfg: Config, context: int = 0
) -> tuple[nn.Module, Callable[..., Any]]:
    """Contender ``name`` for event size ``dim``: its module and its ``log_prob(x, c=None)``.

    Architectures are matched: ``cfg.transforms`` layers, every conditioner a MADE or MLP
    with hidden sizes ``(H, H)``, ReLU; splines with ``cfg.bins`` bins on ``[-5, 5]``.
    With ``context`` > 0 each is its conditional form, p(x | c) with ``c`` of that size
    fed to every conditioner, and ``log_prob`` takes the batch's contexts ``c``.
    """
    hidden = (cfg.hidden, cfg.hidden)
    if name in OURS:
        import pyroflows

        if name == "maf":
            flow = pyroflows.maf(dim, context=context, transforms=cfg.transforms, hidden=hidden)
        elif name == "realnvp":
            flow = pyroflows.realnvp(dim, context=context, transforms=cfg.transforms, hidden=hidden)
        else:
            flow = pyroflows.nsf(
                dim,
                context=context,
                transforms=cfg.transforms,
                bins=cfg.bins,
                hidden=hidden,
                autoregressive="maf" if name == "nsf-ar" else False,
            )
        return flow, lambda x, c=None: flow(c).log_prob(x)
    if name == "zuko-maf":
        import zuko

        flow = zuko.flows.MAF(dim, context, transforms=cfg.transforms, hidden_features=hidden)
        return flow, lambda x, c=None: flow(c).log_prob(x)
    if name == "zuko-nsf":
        import zuko

        # zuko's NSF is fully autoregressive by default (passes=None), its splines live on
        # [-5, 5] (MonotonicRQSTransform's bound) and are the identity outside
        flow = zuko.flows.NSF(
            dim, context, transforms=cfg.transforms, bins=cfg.bins, hidden_features=hidden
        )
        return flow, lambda x, c=None: flow(c).log_prob(x)
    if name == "nflows-maf":
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.permutations import ReversePermutation

        layers: list[nn.Module] = []
        for k in range(cfg.transforms):
            if k:
                layers.append(ReversePermutation(dim))
            # num_blocks=1 without residual blocks: MADE D -> H -> H -> 2D
            layers.append(
                MaskedAffineAutoregressiveTransform(
                    features=dim,
                    hidden_features=cfg.hidden,
                    context_features=context or None,
                    num_blocks=1,
                    use_residual_blocks=False,
                )
            )
        flow = Flow(CompositeTransform(layers), StandardNormal([dim]))
        return flow, lambda x, c=None: flow.log_prob(x, context=c)
    raise ValueError(f"unknown contender {name!r}")


def count_params(module: nn.Module) -> int:
    """Trainable scalars."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- training


def train_generic(
    module: nn.Module,
    log_prob: Callable[..., torch.Tensor],
    train: torch.Tensor,
    val: torch.Tensor,
    cfg: Config,
    seed: int,
    schedule: str | None,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The peers' loop, written to do what ``pyroflows.density.fit`` does.

    ``log_prob`` is called as ``log_prob(x, c)``, ``c`` the batch's contexts when
    ``context`` gives the training and validation rows' (a conditional flow), else
    ``None``; the context is not standardized (``fit`` does not standardize it either).

    Standardizes with the training mean and sd (``1/N``), then runs Adam(``lr``, with
    ``fused=True`` as ``fit`` has it on a CPU) on the
    mean NLL of mini-batches of ``batch`` rows (every row each epoch, the last batch
    possibly smaller, in an order redrawn each epoch by a ``torch.Generator`` seeded with
    ``seed``: the same batches as ``fit`` draws), scores the whole validation set after
    every epoch, steps ``ReduceLROnPlateau(factor=0.5, patience=5)`` on that score when
    ``schedule == "plateau"``, stops after ``patience`` epochs without a lower validation
    NLL, and restores the best weights. A non-finite training loss raises
    ``FloatingPointError`` (as ``fit`` does). The caller times the call.

    Returns:
        ``shift``, ``scale`` (the standardization, to score in data units), ``epochs``,
        ``best_epoch``, ``best_val_nll``, and the ``train_nll`` and ``val_nll`` curves,
        all NLLs in nats per row in the data's units (as ``fit``'s history).
    """
    from pyroflows.density.standardize import moments

    shift, scale = moments(train)  # the standardisation fit gives our flows
    log_det = scale.log().sum().item()  # data units = standardized units + sum(log sd)
    z_train = (train - shift) / scale
    z_val = (val - shift) / scale
    c_train, c_val = context if context is not None else (None, None)

    n = len(z_train)
    # Adam's fused update, as fit uses on a CPU
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, fused=True)
    scheduler = None
    if schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
    g = torch.Generator().manual_seed(seed)
    best_val, best_epoch, bad_epochs, best_state = math.inf, 0, 0, None
    train_curve: list[float] = []
    val_curve: list[float] = []
    try:
        module.train()
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(n, generator=g)
            total = 0.0
            for start in range(0, n, cfg.batch):
                rows = order[start : start + cfg.batch]
                batch = z_train[rows]
                loss = -log_prob(batch, None if c_train is None else c_train[rows]).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss {loss.item()} in epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            train_curve.append(total / n + log_det)
            module.eval()
            with torch.no_grad():
                score = -log_prob(z_val, c_val).mean().item() + log_det
            module.train()
            val_curve.append(score)
            if not math.isfinite(score):
                score = math.inf
            if score < best_val:
                best_val, best_epoch, bad_epochs = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                bad_epochs += 1
            if scheduler is not None:
                scheduler.step(score)
            if bad_epochs >= cfg.patience:
                break
    finally:
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
    return {
        "shift": shift,
        "scale": scale,
        "epochs": len(val_curve),
        "best_epoch": best_epoch,
        "best_val_nll": best_val,
        "train_nll": train_curve,
        "val_nll": val_curve,
    }


def fit_ours(
    flow: nn.Module,
    train: torch.Tensor,
    val: torch.Tensor,
    cfg: Config,
    seed: int,
    schedule: str | None,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Our flows through the library's own loop, ``pyroflows.density.fit``.

    ``context``: the training and validation rows' contexts, for a conditional flow.
    """
    from pyroflows.density import fit

    history = fit(
        flow,
        train,
        context=None if context is None else context[0],
        validation=val if context is None else (val, context[1]),
        epochs=cfg.epochs,
        batch_size=cfg.batch,
        lr=cfg.lr,
        patience=cfg.patience,
        schedule=schedule,
        standardize=True,
        seed=seed,
        progress=False,
    )
    return {
        "epochs": int(history.epochs),
        "best_epoch": int(history.best_epoch),
        "best_val_nll": float(history.best_val_nll),
        "train_nll": [float(v) for v in history.train_nll],
        "val_nll": [float(v) for v in history.val_nll],
        "fit_seconds": float(history.seconds),
    }


def fit_one(
    name: str,
    split: density_data.Split,
    cfg: Config,
    seed: int,
    ours_loop: str,
    schedule: str | None,
) -> dict[str, Any]:
    """Build, train (timed) and score one contender on one seed's split."""
    dim = split.dim
    row: dict[str, Any] = {"contender": name, "library": LABELS[name][1], "error": None}
    try:
        torch.manual_seed(seed)  # the initial weights
        module, log_prob = build(name, dim, cfg)
        row["params"] = count_params(module)
        ours = name in OURS and ours_loop == "fit"
        gc.collect()
        start = time.perf_counter()
        if ours:
            out = fit_ours(module, split.train, split.val, cfg, seed, schedule)
        else:
            out = train_generic(module, log_prob, split.train, split.val, cfg, seed, schedule)
        row["wall_s"] = time.perf_counter() - start
        with torch.no_grad():
            if ours:  # the fitted flow scores in data units (standardization included)
                test_lp = module().log_prob(split.test)
            else:
                shift, scale = out.pop("shift"), out.pop("scale")
                test_lp = log_prob((split.test - shift) / scale) - scale.log().sum()
        nll = -test_lp.double().mean().item() / dim
        row.update(out)
        row["nll"] = nll
        row["s_per_epoch"] = row["wall_s"] / max(row["epochs"], 1)
        if not math.isfinite(nll):
            row["error"] = f"non-finite test NLL ({nll})"
    except Exception as exc:  # a contender that fails is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row


def warm_up(names: list[str], split: density_data.Split, cfg: Config, job: dict) -> None:
    """One short untimed fit per contender, so no timed fit pays first-call costs.

    Imports, lazy initialisation in torch, Pyro, zuko and nflows, and allocator growth
    would otherwise land on whichever contender happens to run first in a process.
    """
    tiny = Config(**{**asdict(cfg), "epochs": 1})
    rows = split.train[: 2 * cfg.batch]
    small = density_data.Split(rows, split.val[: cfg.batch], split.test[: cfg.batch])
    for name in names:
        fit_one(name, small, tiny, 0, job["ours_loop"], job["schedule"])


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """All contenders on one (data set, seed), interleaved, starting at ``job['rotation']``."""
    torch.set_num_threads(1)
    cfg = Config(**job["config"])
    dataset, seed = job["dataset"], job["seed"]
    split = density_data.load(dataset, seed, cfg.sizes)
    truth = None
    if split.test_log_prob is not None:
        truth = -split.test_log_prob.mean().item() / split.dim
    names = job["contenders"]
    warm_up(names, split, cfg, job)
    shift = job["rotation"] % len(names)
    rows = []
    for name in names[shift:] + names[:shift]:
        row = fit_one(name, split, cfg, seed, job["ours_loop"], job["schedule"])
        row.update(dataset=dataset, seed=seed, dim=split.dim, truth=truth, sizes=split.sizes)
        if truth is not None and row.get("nll") is not None:
            row["gap"] = row["nll"] - truth
        rows.append(row)
        _progress(row)
    return rows


def _progress(r: dict[str, Any]) -> None:
    if r["error"]:
        text = f"error: {r['error']}"
    else:
        text = f"NLL/dim {r['nll']:.4f}  epochs {r['epochs']:4d}  wall {r['wall_s']:7.1f} s" + (
            f"  gap {r['gap']:+.4f}" if r.get("gap") is not None else ""
        )
    print(
        f"  {r['dataset']:13s} seed {r['seed']}  {r['contender']:10s}  {text}",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------- summary


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[dict[str, Any]], dataset: str, names: list[str]) -> dict[str, Any]:
    """Per-contender means over seeds, best peer, our best, time ratios and targets."""
    mine = [r for r in rows if r["dataset"] == dataset]
    stats: dict[str, dict[str, Any]] = {}
    for name in names:
        rs = [r for r in mine if r["contender"] == name]
        ok = [r for r in rs if not r["error"]]
        nll = [r["nll"] for r in ok]
        stats[name] = {
            "contender": name,
            "library": LABELS[name][1],
            "params": next((r["params"] for r in rs if r.get("params") is not None), None),
            "seeds": len(rs),
            "seeds_ok": len(ok),
            "errors": sorted({r["error"] for r in rs if r["error"]}),
            "nll_mean": _mean(nll),
            "nll_sd": _sd(nll),
            "truth_mean": _mean([r["truth"] for r in ok if r["truth"] is not None]),
            "gap_mean": _mean([r["gap"] for r in ok if r.get("gap") is not None]),
            "gap_sd": _sd([r["gap"] for r in ok if r.get("gap") is not None]),
            "epochs_mean": _mean([r["epochs"] for r in ok]),
            "wall_mean": _mean([r["wall_s"] for r in ok]),
            "s_per_epoch_mean": _mean([r["s_per_epoch"] for r in ok]),
            "time_ratio_vs_best_peer": None,
        }

    def best(group: tuple[str, ...]) -> str | None:
        scored = [n for n in names if n in group and stats[n]["nll_mean"] is not None]
        return min(scored, key=lambda n: stats[n]["nll_mean"]) if scored else None

    best_peer, our_best = best(PEERS), best(OURS)
    if best_peer is not None:
        wall = {
            r["seed"]: r["wall_s"] for r in mine if r["contender"] == best_peer and not r["error"]
        }
        for name in names:
            ratios = [
                r["wall_s"] / wall[r["seed"]]
                for r in mine
                if r["contender"] == name and not r["error"] and r["seed"] in wall
            ]
            if ratios:  # geometric mean over seeds of the same-seed (same job) ratio
                stats[name]["time_ratio_vs_best_peer"] = math.exp(
                    statistics.fmean(math.log(x) for x in ratios)
                )
    targets: dict[str, Any] = {"our_best": our_best, "best_peer": best_peer}
    if our_best is not None and best_peer is not None:
        o, p = stats[our_best], stats[best_peer]
        allowance = p["nll_sd"] or 0.0
        targets["nll"] = o["nll_mean"] <= p["nll_mean"] + allowance
        targets["nll_margin"] = o["nll_mean"] - p["nll_mean"]
        targets["nll_allowance"] = allowance
        targets["time"] = (o["time_ratio_vs_best_peer"] or math.inf) <= 1.0
        targets["time_ratio"] = o["time_ratio_vs_best_peer"]
    if our_best is not None and stats[our_best]["gap_mean"] is not None:
        targets["truth_gap"] = stats[our_best]["gap_mean"]
        targets["truth"] = stats[our_best]["gap_mean"] <= TRUTH_TOLERANCE
    return {"dataset": dataset, "contenders": stats, "targets": targets}


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def dataset_table(summary: dict[str, Any], names: list[str]) -> str:
    """Markdown table of one data set."""
    head = [
        "flow",
        "library",
        "params",
        "NLL/dim (mean ± sd)",
        "truth",
        "gap",
        "epochs",
        "wall s",
        "s/epoch",
        "time / best peer",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = summary["targets"]
    for name in names:
        s = summary["contenders"][name]
        label = LABELS[name][0]
        if name == t.get("our_best"):
            label += " (our best)"
        if name == t.get("best_peer"):
            label += " (best peer)"
        nll = _fmt(s["nll_mean"], ".4f")
        if s["nll_sd"] is not None:
            nll += f" ± {s['nll_sd']:.4f}"
        if s["errors"]:
            nll = (nll + "; " if s["seeds_ok"] else "") + (
                f"failed {s['seeds'] - s['seeds_ok']}/{s['seeds']}: {s['errors'][0][:60]}"
            )
        gap = _fmt(s["gap_mean"], "+.4f")
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    s["library"],
                    _fmt(s["params"], ","),
                    nll,
                    _fmt(s["truth_mean"], ".4f"),
                    gap,
                    _fmt(s["epochs_mean"], ".0f"),
                    _fmt(s["wall_mean"], ".1f"),
                    _fmt(s["s_per_epoch_mean"], ".3f"),
                    _fmt(s["time_ratio_vs_best_peer"], ".2f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def targets_table(summaries: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Markdown table of the targets per data set, and the misses in words."""
    head = ["data set", "our best", "best peer", "NLL vs peer", "gap to truth", "time vs peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    misses = []
    for s in summaries:
        t = s["targets"]
        name = s["dataset"]
        if t.get("our_best") is None or t.get("best_peer") is None:
            lines.append(f"| {name} | {t.get('our_best') or '-'} | {t.get('best_peer') or '-'} |")
            misses.append(f"{name}: no result for ours or for any peer")
            continue
        o = s["contenders"][t["our_best"]]
        p = s["contenders"][t["best_peer"]]
        word = {True: "holds", False: "MISSES"}
        nll = (
            f"{word[t['nll']]}: {o['nll_mean']:.4f} vs {p['nll_mean']:.4f}"
            f" (+ sd {t['nll_allowance']:.4f})"
        )
        truth = (
            f"{word[t['truth']]}: {t['truth_gap']:+.4f}" if t.get("truth") is not None else "n/a"
        )
        time_cell = f"{word[t['time']]}: {_fmt(t['time_ratio'], '.2f')}x"
        our = f"{LABELS[t['our_best']][0]}"
        peer = f"{LABELS[t['best_peer']][1]} {LABELS[t['best_peer']][0]}"
        lines.append(f"| {name} | {our} | {peer} | {nll} | {truth} | {time_cell} |")
        if not t["nll"]:
            misses.append(
                f"{name}: our best NLL/dim {o['nll_mean']:.4f} is {t['nll_margin']:+.4f} from "
                f"{peer}'s {p['nll_mean']:.4f} (allowance {t['nll_allowance']:.4f})"
            )
        if t.get("truth") is False:
            misses.append(
                f"{name}: our best is {t['truth_gap']:.4f} nats/dim from the truth "
                f"(target {TRUTH_TOLERANCE})"
            )
        if not t["time"]:
            misses.append(f"{name}: our best took {_fmt(t['time_ratio'], '.2f')}x {peer}'s time")
    return "\n".join(lines), misses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", choices=density_data.NAMES, default=list(density_data.NAMES)
    )
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="most epochs, every data set (default: per set)"
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience (default: per set)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each running whole (data set, seed) jobs (each 1 torch thread)",
    )
    parser.add_argument(
        "--ours-loop",
        choices=("fit", "generic"),
        default="fit",
        help="fit: pyroflows.density.fit (the benchmark); generic: the peers' loop (diagnostic)",
    )
    parser.add_argument(
        "--schedule",
        choices=("plateau", "none"),
        default="plateau",
        help="learning-rate schedule, every contender (fit's default: plateau)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 seed, 10 epochs, fewer generated rows"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (.md written beside)")
    args = parser.parse_args(argv)
    if args.out is None:  # by the flags as given (the defaults below fill some in)
        protocol = ("datasets", "contenders", "seeds", "epochs", "patience", "ours_loop")
        stem = default_stem(parser, args, "density", (*protocol, "schedule"), args.quick)
        args.out = HERE / "results" / f"{stem}.json"
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.quick and args.epochs is None:
        args.epochs = 10
    for name in ("seeds", "epochs", "patience", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def configs_for(args: argparse.Namespace) -> dict[str, Config]:
    """Per-data-set configs after the command line's overrides."""
    out = {}
    for name in args.datasets:
        cfg = asdict(CONFIGS[name])
        if args.epochs is not None:
            cfg["epochs"] = args.epochs
        if args.patience is not None:
            cfg["patience"] = args.patience
        if args.quick and name in density_data.GENERATED:
            cfg["sizes"] = QUICK_SIZES
        out[name] = Config(**cfg)
    return out


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "pyro-ppl", "zuko", "nflows", "scikit-learn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    import pyroflows

    found["pyroflows"] = pyroflows.__version__
    return found


def _describe(name: str, cfg: Config, split_sizes: tuple[int, int, int] | None) -> str:
    dim = density_data.DIMS[name]
    sizes = "/".join(str(n) for n in split_sizes) if split_sizes else "?"
    return (
        f"D = {dim}; train/val/test rows {sizes}; {cfg.transforms} transforms, hidden "
        f"({cfg.hidden}, {cfg.hidden}), {cfg.bins} spline bins; Adam lr {cfg.lr:g}, batch "
        f"{cfg.batch}, at most {cfg.epochs} epochs, patience {cfg.patience}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    configs = configs_for(args)
    names = [n for n in CONTENDERS if n in args.contenders]
    versions = _versions()
    jobs = []
    for d_index, dataset in enumerate(args.datasets):
        for seed in range(args.seeds):
            jobs.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "config": asdict(configs[dataset]),
                    "contenders": names,
                    "rotation": d_index + seed,
                    "ours_loop": args.ours_loop,
                    "schedule": None if args.schedule == "none" else args.schedule,
                }
            )
    print(
        f"{len(jobs)} jobs ({len(args.datasets)} data sets x {args.seeds} seeds), "
        f"{len(names)} contenders each, {args.workers} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.workers == 1:
        for job in jobs:
            rows.extend(run_job(job))
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            for future in as_completed([pool.submit(run_job, job) for job in jobs]):
                rows.extend(future.result())
    total = time.perf_counter() - start

    summaries = [summarize(rows, d, names) for d in args.datasets]
    ours_note = (
        "ours trained by `pyroflows.density.fit`"
        if args.ours_loop == "fit"
        else "ours trained by the benchmark's generic loop (--ours-loop generic, a diagnostic)"
    )
    date = datetime.datetime.now(datetime.timezone.utc)
    md = [
        "# Density estimation: held-out NLL and training time",
        "",
        f"pyroflows {versions['pyroflows']}, zuko {versions['zuko'] or 'not installed'}, "
        f"nflows {versions['nflows'] or 'not installed'}, torch {versions['torch']}, "
        f"pyro {versions['pyro-ppl']}; {args.seeds} seed(s), 1 torch thread per process, "
        f"{args.workers} worker process(es); {ours_note}, peers by the benchmark's loop that "
        f"mirrors it; {date:%Y-%m-%d %H:%M} UTC on {platform.machine()} with "
        f"{os.cpu_count()} cores; total {total:.0f} s"
        + (" (--quick: a smoke test, not a result)" if args.quick else "")
        + ".",
        "",
        "NLL/dim: mean over test rows of -log p(x) / D in the data's own units, then mean ± sd "
        "over seeds. truth: the same for the true density on the same test rows. gap: NLL - "
        "truth. wall s: the fit (training and validation passes, until early stopping). "
        "time / best peer: this wall time / the best peer's on the same seed, geometric mean "
        "over seeds. Best = lowest mean NLL.",
    ]
    for summary in summaries:
        name = summary["dataset"]
        sizes = next((tuple(r["sizes"]) for r in rows if r["dataset"] == name), None)
        md += ["", f"## {name}", "", _describe(name, configs[name], sizes), ""]
        md.append(dataset_table(summary, names))
    table, misses = targets_table(summaries)
    md += [
        "",
        "## Targets",
        "",
        "On every data set our best flow's held-out NLL is at most the best peer's plus that "
        f"peer's seed-to-seed sd, within {TRUTH_TOLERANCE} nats/dim of the truth where it is "
        "known, and its wall time at most that peer's (time ratio <= 1).",
        "",
        table,
        "",
        "Misses:" if misses else "Every target holds.",
        *(f"- {m}" for m in misses),
    ]
    text = "\n".join(md)
    print(text)

    meta = {
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "threads_per_process": 1,
        "workers": args.workers,
        "seeds": args.seeds,
        "ours_loop": args.ours_loop,
        "schedule": args.schedule,
        "quick": args.quick,
        "total_s": total,
        "truth_tolerance": TRUTH_TOLERANCE,
    }
    payload = {
        "meta": meta,
        "configs": {k: asdict(v) for k, v in configs.items()},
        "summary": summaries,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
