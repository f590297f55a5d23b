"""Conditional densities p(x | c): held-out NLL and training time against zuko and nflows.

Two generated data sets whose true conditional density is known, so each fit's held-out
NLL is set beside the truth's:

* ``ring`` (D = 2, context 1): the ring of ``examples/conditional_density.py``, radius
  ``N(1 + c / 2, 0.1^2)`` at a uniform angle, ``c ~ U[-1, 2]``;
* ``student-t`` (D = 4, context 3): ``x = m(c) + s(c) * t`` with ``t`` four independent
  Student-t(5) draws, a mean ``m(c)`` that is linear plus a sine, a product and a square
  of the context, and a scale ``s(c) = exp(0.3 c V)`` that moves with it (heavy tails
  whose width depends on c), ``c ~ N(0, I_3)``.

Every contender has the same size of architecture (``K`` transforms, conditioners with
two hidden layers of ``H`` units, ReLU, the context fed to every conditioner; splines with
the same bins on ``[-5, 5]``; our ``nsf`` is a coupling flow, ``nsf-ar`` the autoregressive
one that zuko's NSF is), the same rows, Adam at the same learning rate, batch size,
epoch budget, plateau schedule and early-stopping patience. Ours go through the library's
loop, ``pyroflows.density.fit(flow, x, context=c)``; zuko and nflows through the density
benchmark's ``train_generic``, which does what ``fit`` does (standardize x, not c; the
same batches, schedule and stopping rule; best weights restored).

Contenders of one (data set, seed) run one after the other in one process with one torch
thread, in an order rotated across jobs, after an untimed one-epoch warm-up of each::

    python benchmarks/conditional_density.py            # the full run (about 10 min)
    python benchmarks/conditional_density.py --quick    # a smoke test

Prints a markdown table per data set; writes JSON and the markdown under
``benchmarks/results/`` (``conditional_density``; ``_quick``/``_partial`` otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the pyroflows of this working tree

from _out import default_stem  # noqa: E402
from density import (  # noqa: E402
    Config,
    _versions,
    build,
    count_params,
    fit_ours,
    train_generic,
)

OURS = ("maf", "nsf", "nsf-ar")
PEERS = ("zuko-maf", "zuko-nsf", "nflows-maf")
CONTENDERS = OURS + PEERS
LIBRARY = {name: "pyroflows" for name in OURS} | {
    "zuko-maf": "zuko",
    "zuko-nsf": "zuko",
    "nflows-maf": "nflows",
}
DATASETS = {"ring": (2, 1), "student-t": (4, 3)}  # (D, context size)
CONFIG = Config(transforms=5, hidden=64, batch=256, epochs=200, patience=20)
SIZES = (10_000, 2_000, 10_000)
QUICK_SIZES = (2_000, 500, 2_000)


# --------------------------------------------------------------------------- data


def _ring(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = 3 * torch.rand(n, 1, generator=g) - 1
    angle = 2 * math.pi * torch.rand(n, generator=g)
    radius = 1 + 0.5 * c[:, 0] + 0.1 * torch.randn(n, generator=g)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)
    r = x.norm(dim=-1)
    log_p = torch.distributions.Normal(1 + 0.5 * c[:, 0], 0.1).log_prob(r)
    return x, c, log_p - math.log(2 * math.pi) - r.log()


def _student_t(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fixed = torch.Generator().manual_seed(1234)  # the same density for every seed
    w = torch.randn(3, 4, generator=fixed)
    v = torch.randn(3, 4, generator=fixed)
    c = torch.randn(n, 3, generator=g)
    mean = c @ w + torch.stack([c[:, 0].sin(), c[:, 0] * c[:, 1], c[:, 2] ** 2, -c[:, 1]], -1)
    log_scale = 0.3 * c @ v
    t = torch.distributions.StudentT(5.0)
    u = t.sample((n, 4))  # (its own draws: torch's StudentT takes no generator)
    x = mean + log_scale.exp() * u
    return x, c, (t.log_prob(u) - log_scale).sum(-1)


def load(name: str, seed: int, sizes: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Train, validation and test rows with their contexts, and the test rows' true log p."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Student-t draws
    draw = _ring if name == "ring" else _student_t
    x, c, log_p = draw(sum(sizes), g)
    a, b = sizes[0], sizes[0] + sizes[1]
    return {
        "x": x[:a],
        "c": c[:a],
        "x_val": x[a:b],
        "c_val": c[a:b],
        "x_test": x[b:],
        "c_test": c[b:],
        "test_log_p": log_p[b:],
    }


# --------------------------------------------------------------------------- contenders


def fit_one(name: str, data: dict, cfg: Config, seed: int) -> dict[str, Any]:
    """Build, train (timed) and score one contender."""
    dim, context = data["x"].shape[1], data["c"].shape[1]
    row: dict[str, Any] = {"contender": name, "library": LIBRARY[name], "error": None}
    try:
        torch.manual_seed(seed)  # the initial weights
        module, log_prob = build(name, dim, cfg, context)
        row["params"] = count_params(module)
        start = time.perf_counter()
        contexts = (data["c"], data["c_val"])
        if name in OURS:
            out = fit_ours(module, data["x"], data["x_val"], cfg, seed, "plateau", contexts)
        else:
            out = train_generic(
                module, log_prob, data["x"], data["x_val"], cfg, seed, "plateau", contexts
            )
        epochs = out["epochs"]
        row["wall_s"] = time.perf_counter() - start
        with torch.no_grad():
            if name in OURS:  # the fitted flow scores in data units
                test_lp = log_prob(data["x_test"], data["c_test"])
            else:
                shift, scale = out["shift"], out["scale"]
                z = (data["x_test"] - shift) / scale
                test_lp = log_prob(z, data["c_test"]) - scale.log().sum()
        row["nll"] = -test_lp.double().mean().item() / dim
        row["epochs"] = epochs
        row["s_per_epoch"] = row["wall_s"] / max(epochs, 1)
        if not math.isfinite(row["nll"]):
            row["error"] = f"non-finite test NLL ({row['nll']})"
    except Exception as exc:  # a contender that fails is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row


def run_job(dataset: str, seed: int, names: list[str], cfg: Config, sizes, rotation: int):
    """Every contender on one (data set, seed), after an untimed one-epoch warm-up each."""
    data = load(dataset, seed, sizes)
    truth = -data["test_log_p"].double().mean().item() / data["x"].shape[1]
    tiny = Config(**{**cfg.__dict__, "epochs": 1})
    small = {k: v[: 2 * cfg.batch] for k, v in data.items()}
    for name in names:
        fit_one(name, small, tiny, 0)
    rows = []
    shift = rotation % len(names)
    for name in names[shift:] + names[:shift]:
        row = fit_one(name, data, cfg, seed)
        row.update(dataset=dataset, seed=seed, truth=truth)
        if row["error"] is None:
            row["gap"] = row["nll"] - truth
            print(
                f"  {dataset:9s} seed {seed}  {name:10s}  NLL/dim {row['nll']:.4f}  gap "
                f"{row['gap']:+.4f}  epochs {row['epochs']:3d}  {row['wall_s']:6.1f} s",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"  {dataset} seed {seed} {name}: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def _stat(ok: list[dict], key: str, spec: str) -> str:
    """Mean ± sd over seeds of ``key`` (the sd unsigned)."""
    values = [r[key] for r in ok]
    sd = f" ± {statistics.stdev(values):{spec.lstrip('+')}}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{spec}}{sd}"


def table(rows: list[dict], dataset: str, names: list[str]) -> str:
    """Mean ± sd over the seeds that ran, per contender, and the time against the fastest peer.

    The fastest peer of a seed is taken among the peers that ran without error; a
    contender that failed on some seeds says on how many it ran.
    """
    mine = [r for r in rows if r["dataset"] == dataset]
    lines = [
        "| contender | library | params | NLL/dim | gap to truth | epochs | wall s | "
        "time / fastest peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fastest = {}
    for seed in sorted({r["seed"] for r in mine}):
        peers = [
            r["wall_s"]
            for r in mine
            if r["seed"] == seed and r["library"] != "pyroflows" and r["error"] is None
        ]
        fastest[seed] = min(peers) if peers else None
    for name in names:
        runs = [r for r in mine if r["contender"] == name]
        ok = [r for r in runs if r["error"] is None]
        if not ok:
            errors = {r["error"] for r in runs}
            lines.append(f"| {name} | {LIBRARY[name]} | | failed: {'; '.join(errors)} | | | | |")
            continue
        ratios = [r["wall_s"] / fastest[r["seed"]] for r in ok if fastest[r["seed"]]]
        ratio = f"{math.exp(statistics.fmean(map(math.log, ratios))):.2f}x" if ratios else "n/a"
        partial = f" ({len(ok)} of {len(runs)} seeds)" if len(ok) < len(runs) else ""
        lines.append(
            f"| {name} | {LIBRARY[name]} | {ok[0]['params']} | "
            f"{_stat(ok, 'nll', '.4f')}{partial} | "
            f"{_stat(ok, 'gap', '+.4f')} | {_stat(ok, 'epochs', '.0f')} | "
            f"{_stat(ok, 'wall_s', '.1f')} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 5 epochs")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (.md beside it)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.out is None:
        protocol = ("datasets", "contenders", "seeds")
        stem = default_stem(parser, args, "conditional_density", protocol, args.quick)
        args.out = HERE / "results" / f"{stem}.json"
    torch.set_num_threads(1)
    cfg, sizes, seeds = CONFIG, SIZES, args.seeds
    if args.quick:
        cfg, sizes, seeds = Config(**{**CONFIG.__dict__, "epochs": 5}), QUICK_SIZES, 1
    names = [n for n in CONTENDERS if n in args.contenders]
    start = time.perf_counter()
    rows = []
    for d, dataset in enumerate(args.datasets):
        for seed in range(seeds):
            rows.extend(run_job(dataset, seed, names, cfg, sizes, d + seed))
    total = time.perf_counter() - start
    versions = _versions()
    date = datetime.datetime.now(datetime.timezone.utc)
    md = [
        "# Conditional densities p(x | c): held-out NLL and training time",
        "",
        f"pyroflows {versions['pyroflows']}, zuko {versions['zuko']}, nflows "
        f"{versions['nflows']}, torch {versions['torch']}; {seeds} seed(s), 1 torch thread; "
        f"train/val/test rows {'/'.join(map(str, sizes))}; {cfg.transforms} transforms, "
        f"hidden ({cfg.hidden}, {cfg.hidden}), {cfg.bins} bins; Adam lr {cfg.lr:g}, batch "
        f"{cfg.batch}, at most {cfg.epochs} epochs, patience {cfg.patience}, plateau schedule; "
        f"ours by `fit(flow, x, context=c)`, peers by the density benchmark's loop; "
        f"{date:%Y-%m-%d %H:%M} UTC on {platform.machine()}; total {total:.0f} s"
        + (" (--quick: a smoke test, not a result)" if args.quick else "")
        + ".",
        "",
        "NLL/dim: mean of -log p(x | c) / D over the test rows, in the data's units, mean ± sd "
        "over seeds; gap: NLL/dim - the true density's on the same rows; wall s: the whole fit "
        "until early stopping; time / fastest peer: geometric mean over seeds of this wall "
        "time / the fastest peer's on the same seed.",
    ]
    for dataset in args.datasets:
        dim, context = DATASETS[dataset]
        md += ["", f"## {dataset} (D = {dim}, context {context})", ""]
        md.append(table(rows, dataset, names))
    text = "\n".join(md)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.isoformat(timespec="seconds"), "versions": versions, "total_s": total}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
