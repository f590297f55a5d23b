"""Guides on large models: set-up time and time per SVI step as the latent dimension grows.

A non-centred hierarchical normal model with ``J`` groups (``D = J + 2`` latents: a mean,
a half-Cauchy scale and ``J`` standardized effects) is fitted by Pyro's ``AutoNormal`` and
``AutoIAFNormal``, and by ``AutoFlow`` with its defaults, with ``hidden=(2D, 2D)``, and
with ``estimator="stl"`` (default IAF, and RealNVP). For each it reports the parameter
count, the first step's time (which includes AutoFlow's set-up: the Laplace warm start
and the scoring of its Gaussian starts) and the median time of the next steps, on one
torch thread, with the mean loss of the first and of the last quarter of the steps (Adam
at lr 0.01: whether the guide descends or blows up in that many steps). It measures
cost, not fit quality::

    python benchmarks/guide_scale.py                       # J = 100, 400, 1000
    python benchmarks/guide_scale.py --groups 100 --steps 5 --out /tmp/scale.json
    python benchmarks/guide_scale.py --device cuda --out /tmp/scale_cuda.json  # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the pyroflows of this working tree

from pyroflows.infer import AutoFlow  # noqa: E402

CPU = torch.device("cpu")

GUIDES = ("AutoNormal", "AutoIAFNormal", "AutoFlow", "AutoFlow 2D", "AutoFlow stl", "realnvp stl")


def hierarchical(groups: int, device: torch.device = CPU):
    """The model and its data: ``y_j ~ N(mu + tau theta_j, sigma_j)``, ``theta_j ~ N(0, 1)``."""
    g = torch.Generator().manual_seed(0)
    sigma = (0.5 + 2.0 * torch.rand(groups, generator=g)).to(device)
    y = (1.0 + 3.0 * torch.randn(groups, generator=g)).to(device)
    zero, one, five = (torch.tensor(v, device=device) for v in (0.0, 1.0, 5.0))

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, five))
        tau = pyro.sample("tau", dist.HalfCauchy(five))
        with pyro.plate("groups", groups, device=device):
            theta = pyro.sample("theta", dist.Normal(zero, one))
            pyro.sample("y", dist.Normal(mu + tau * theta, sigma), obs=y)

    return model


def make_guide(name: str, model, dim: int):
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoIAFNormal":
        return AutoIAFNormal(model)  # Pyro's defaults: one layer, hidden 3D + 1
    if name == "AutoFlow":
        return AutoFlow(model)
    if name == "AutoFlow 2D":
        return AutoFlow(model, hidden=(2 * dim, 2 * dim))
    if name == "AutoFlow stl":
        return AutoFlow(model, estimator="stl")
    if name == "realnvp stl":
        return AutoFlow(model, flow="realnvp", estimator="stl")
    raise ValueError(f"unknown guide {name!r}")


def measure(name: str, groups: int, steps: int, device: torch.device = CPU) -> dict[str, Any]:
    """First-step and median step time of one guide on the model with ``groups`` groups.

    Each step's loss is read as a float, so a GPU step is timed to its end.
    """
    dim = groups + 2
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = hierarchical(groups, device)
    guide = make_guide(name, model, dim)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    row: dict[str, Any] = {"guide": name, "groups": groups, "dim": dim, "error": None}
    times, losses = [], []
    # Pyro's AutoIAFNormal builds its network on torch's default device, at its first call;
    # only that call runs under the device as default (the mode costs every torch call)
    first = device if name == "AutoIAFNormal" and device.type != "cpu" else None
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), first or contextlib.nullcontext():
            warnings.simplefilter("ignore")
            losses.append(svi.step())
        row["first_step_s"] = time.perf_counter() - start
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(svi.step())
            times.append(time.perf_counter() - start)
    except (RuntimeError, ValueError) as error:  # a guide that fails is a result
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    # trainable entries only (the store also holds buffers: masks, permutations)
    row["params"] = sum(v.numel() for v in pyro.get_param_store().values() if v.requires_grad)
    row["ms_per_step"] = 1e3 * statistics.median(times) if times else None
    # single-draw losses are noisy: the mean of the first and of the last quarter
    quarter = max(1, len(losses) // 4)
    row["loss_first_last"] = (
        [statistics.fmean(losses[:quarter]), statistics.fmean(losses[-quarter:])]
        if losses
        else None
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| D | guide | params | first step (set-up) s | ms / step | step / AutoIAFNormal's "
        "| mean loss, first and last quarter of the steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        iaf = next(
            x["ms_per_step"] for x in rows if x["dim"] == r["dim"] and x["guide"] == "AutoIAFNormal"
        )
        if r["ms_per_step"] is None:
            lines.append(f"| {r['dim']} | {r['guide']} | {r['params']:,} | failed: {r['error']} |")
            continue
        ratio = f"{r['ms_per_step'] / iaf:.2f}" if iaf else "-"
        first, last = r["loss_first_last"]
        failed = f" (then {r['error']})" if r["error"] else ""
        lines.append(
            f"| {r['dim']} | {r['guide']} | {r['params']:,} | {r['first_step_s']:.2f} | "
            f"{r['ms_per_step']:.1f} | {ratio} | {first:.4g} → {last:.4g}{failed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (the .md beside it); default results/guide_scale.json for the full "
        "run, results/guide_scale_partial.json for any other",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if min(args.groups) < 1 or args.steps < 1:
        parser.error("--groups and --steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    if args.out is None:  # a partial run never replaces the results of the full one
        sys.path.insert(0, str(HERE))
        from _out import results_path

        args.out = results_path(parser, args, "guide_scale", ".json")
    torch.set_num_threads(1)
    for name in GUIDES:  # untimed: the process's first calls into torch and Pyro cost
        measure(name, 2, 1, device)  # a second or so, which the first guide timed would carry
    rows = []
    for groups in args.groups:
        for name in GUIDES:
            row = measure(name, groups, args.steps, device)
            rows.append(row)
            print(f"  D={row['dim']} {name:14s} {row}", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) if args.device == "cuda" else platform.machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Guides on large models: set-up and time per step\n\n"
        f"Non-centred hierarchical normal model, D = groups + 2; Trace_ELBO, 1 particle, "
        f"Adam; median of {args.steps} steps after the first; one torch thread; torch "
        f"{torch.__version__}, pyro {pyro.__version__}, {where}; {when}. "
        "Cost, and whether the loss descends; not fit quality.\n\n"
    )
    text = header + table(rows) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
