"""Data-parallel fitting: training throughput (rows/s) with 1 and with N processes.

Fits the same flow to the same memory-mapped ``.npy`` data with the command line, once in
one process and once under ``torchrun --nproc_per_node=N`` (gloo on the CPU, or nccl with
``--device cuda``), for the same epochs and the same global batch, and reports rows per
second of training (the fit's own clock, validation passes included) and the held-out
NLL of each fit, side by side. Each process uses one torch thread, so N processes use N
cores::

    python benchmarks/scale.py                       # 1 and 2 processes, this machine
    python benchmarks/scale.py --processes 1 2 4 8 --device cuda --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def make_data(path: Path, rows: int, dim: int, seed: int) -> None:
    """Draws of one correlated Gaussian mixture, as a memory-mappable ``.npy`` file."""
    mixing = np.random.default_rng(0).normal(size=(dim, dim)) / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        centre = rng.choice([-2.0, 2.0], size=(n, 1))
        array[start : start + n] = centre + rng.normal(size=(n, dim)) @ mixing
    array.flush()


def fit(processes: int, args: argparse.Namespace, work: Path) -> dict:
    """One fit with ``processes`` processes; its wall time, fit time and held-out NLL."""
    out = work / f"model{processes}.pt"
    command = ["-m", "pyroflows", "fit", str(work / "train.npy"), "--out", str(out), "--force"]
    command += ["--flow", args.flow, "--epochs", str(args.epochs), "--patience", "1000"]
    command += ["--batch-size", str(args.batch_size), "--validation", "0.02", "--quiet"]
    command += ["--device", args.device, "--seed", "0", "--checkpoint-every", "1000"]
    command += ["--hidden", args.hidden]
    if processes == 1:
        launch = [sys.executable]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run([*launch, *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{result.stderr[-2000:]}")
    info = torch.load(out, weights_only=True)
    seconds = info["history"]["seconds"]
    score = subprocess.run(
        [sys.executable, "-m", "pyroflows", "score", str(out), str(work / "test.npy")],
        capture_output=True,
        text=True,
        env=env,
    )
    if score.returncode != 0:
        raise RuntimeError(f"scoring the {processes}-process fit failed:\n{score.stderr[-2000:]}")
    nll = -float(np.loadtxt(score.stdout.splitlines()).mean()) / args.dim
    trained = args.rows * 0.98 * args.epochs
    return {"processes": processes, "fit_s": seconds, "wall_s": wall,
            "rows_per_s": trained / seconds, "nll_per_dim": nll}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch")
    parser.add_argument("--hidden", default="128,128", help="MADE hidden sizes")
    parser.add_argument("--flow", default="maf", choices=["realnvp", "nice", "maf", "iaf", "nsf"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (the .md beside it); default results/scale.json for the full run, "
        "results/scale_partial.json for any other",
    )
    args = parser.parse_args(argv)
    for flag in ("rows", "dim", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
            )
    if min(args.processes) < 1:
        parser.error(f"--processes must be at least 1 each, got {args.processes}")
    if args.out is None:  # a partial run never replaces the results of the full one
        sys.path.insert(0, str(HERE))
        from _out import results_path

        args.out = results_path(parser, args, "scale", ".json")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        make_data(work / "train.npy", args.rows, args.dim, seed=0)
        make_data(work / "test.npy", 20_000, args.dim, seed=1)
        rows = [fit(p, args, work) for p in args.processes]
    base = rows[0]["rows_per_s"]
    lines = [
        "# Data-parallel fit throughput",
        "",
        f"{args.flow} (hidden {args.hidden}), D = {args.dim}, {args.rows} rows (memory-mapped "
        f".npy), {args.epochs} epochs, global batch {args.batch_size}, device {args.device}, "
        f"one torch thread per process; {os.cpu_count()} cores here, so more processes "
        "than cores cannot go faster.",
        "",
        "| processes | fit s | rows/s | speed-up | held-out NLL/dim |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['fit_s']:.1f} | {r['rows_per_s']:,.0f} | "
            f"{r['rows_per_s'] / base:.2f}x | {r['nll_per_dim']:.4f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "results": rows}, indent=1))  # fmt: skip
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
