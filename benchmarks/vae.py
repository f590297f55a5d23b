"""Amortized VAE posteriors on digits: diagonal Gaussian against IAF and NSF flows.

Trains the VAE of ``examples/vae_digits.py`` (binarized 8x8 digits, fixed 80/20 split,
Bernoulli decoder, latent dimension 8) with the same encoder, decoder, optimiser, epochs
and seeds for each posterior family, and reports per family (mean ± sd over seeds): the
test ELBO, the test IWAE log-likelihood (k = 1000), the gap between them, and the wall
time of an epoch. The families run one after another within each seed, in a rotated
order, so their time ratios are taken side by side. Prints a markdown table and writes
JSON (and the markdown) to ``benchmarks/results/vae.json``::

    python benchmarks/vae.py                  # 3 seeds
    python benchmarks/vae.py --seeds 1 --epochs 20 --out /tmp/vae.json   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))  # vae_digits
sys.path.insert(1, str(HERE.parent))  # the pyroflows of this working tree

import vae_digits  # noqa: E402

FAMILIES = {"diagonal": None, "iaf": "iaf", "nsf": "nsf"}


def run(family: str, seed: int, args: argparse.Namespace, data) -> dict[str, Any]:
    """Train and evaluate one (family, seed)."""
    train_x, test_x = data
    torch.manual_seed(seed)
    vae = vae_digits.VAE(FAMILIES[family], transforms=args.transforms)
    seconds = vae_digits.train(vae, train_x, args.epochs, lr=args.lr)
    torch.manual_seed(1000 + seed)
    result = vae_digits.evaluate(vae, test_x, k=args.k)
    row = {"family": family, "seed": seed, "s_per_epoch": seconds, **result}
    print(
        f"  seed {seed} {family:9s} ELBO {row['elbo']:8.3f}  IWAE {row['iwae']:8.3f}  "
        f"gap {row['gap']:.3f}  {seconds:.3f} s/epoch",
        file=sys.stderr,
        flush=True,
    )
    return row


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], families: list[str]) -> dict[str, Any]:
    """Means, sds, paired time ratios and improvements over the diagonal Gaussian."""
    out: dict[str, Any] = {}
    base = {r["seed"]: r for r in rows if r["family"] == "diagonal"}
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        s: dict[str, Any] = {"seeds": len(mine)}
        for key in ("elbo", "iwae", "gap", "s_per_epoch"):
            s[key], s[key + "_sd"] = _stat([r[key] for r in mine])
        if base and family != "diagonal":
            paired = [r for r in mine if r["seed"] in base]
            for key in ("elbo", "iwae"):
                s[key + "_gain"], s[key + "_gain_sd"] = _stat(
                    [r[key] - base[r["seed"]][key] for r in paired]
                )
            s["gap_shrink"] = 1.0 - s["gap"] / statistics.fmean(
                [base[r["seed"]]["gap"] for r in paired]
            )
            s["time_ratio"] = math.exp(
                statistics.fmean(
                    math.log(r["s_per_epoch"] / base[r["seed"]]["s_per_epoch"]) for r in paired
                )
            )
        out[family] = s
    return out


def table(summary: dict[str, Any], k: int) -> str:
    """The markdown table (``k``: the IWAE's importance samples)."""
    head = f"| posterior | test ELBO | test IWAE (k={k}) | gap | ELBO gain | IWAE gain | gap shrink | s/epoch | time / diagonal |"  # noqa: E501
    lines = [head, "|" + "---|" * 9]
    for family, s in summary.items():

        def pm(key: str, spec: str = ".3f", s: dict[str, Any] = s) -> str:
            return f"{s[key]:{spec}} ± {s[key + '_sd']:.3f}"

        gains = (
            [pm("elbo_gain", "+.3f"), pm("iwae_gain", "+.3f"), f"{100 * s['gap_shrink']:.0f}%"]
            if "elbo_gain" in s
            else ["-", "-", "-"]
        )
        ratio = f"{s['time_ratio']:.2f}" if "time_ratio" in s else "1"
        cells = [family, pm("elbo"), pm("iwae"), pm("gap"), *gains, pm("s_per_epoch"), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: dict[str, Any]) -> list[str]:
    """The issue's targets for the best flow family, in words."""
    flows = [f for f in summary if f != "diagonal" and "elbo_gain" in summary[f]]
    if not flows:
        return []
    best = max(flows, key=lambda f: summary[f]["iwae"])
    s = summary[best]
    elbo = f"{s['elbo_gain']:+.3f} ± {s['elbo_gain_sd']:.3f}"
    iwae = f"{s['iwae_gain']:+.3f} ± {s['iwae_gain_sd']:.3f}"
    checks = [
        ("test ELBO gain >= 1 nat, beyond the seed sd",
         s["elbo_gain"] >= 1.0 and s["elbo_gain"] > s["elbo_gain_sd"], elbo),
        ("IWAE gain >= 0.3 nats, beyond the seed sd",
         s["iwae_gain"] >= 0.3 and s["iwae_gain"] > s["iwae_gain_sd"], iwae),
        ("likelihood-ELBO gap shrinks >= 30%", s["gap_shrink"] >= 0.3,
         f"{100 * s['gap_shrink']:.0f}%"),
        ("time per epoch <= 2x diagonal", s["time_ratio"] <= 2.0, f"{s['time_ratio']:.2f}x"),
    ]  # fmt: skip
    return [f"best flow: {best}"] + [
        f"- {'holds' if ok else 'MISSES'}: {name} ({value})" for name, ok, value in checks
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=vae_digits.EPOCHS)
    parser.add_argument("--lr", type=float, default=vae_digits.LR)
    parser.add_argument("--transforms", type=int, default=vae_digits.TRANSFORMS)
    parser.add_argument("--k", type=int, default=1000, help="IWAE importance samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (the .md beside it); default results/vae.json for the full run, "
        "results/vae_partial.json for any other",
    )
    args = parser.parse_args(argv)
    for flag in ("seeds", "epochs", "transforms", "k", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.out is None:  # a partial run never replaces the results of the full one
        sys.path.insert(0, str(HERE))
        from _out import results_path

        args.out = results_path(parser, args, "vae", ".json")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    torch.set_num_threads(args.threads)
    families = [f for f in FAMILIES if f in args.families]
    data = vae_digits.digits()
    rows = []
    for seed in range(args.seeds):
        shift = seed % len(families)
        for family in families[shift:] + families[:shift]:
            rows.append(run(family, seed, args, data))
    summary = summarize(rows, families)
    date = datetime.datetime.now(datetime.timezone.utc)
    text = "\n".join(
        [
            "# Amortized VAE posteriors on digits",
            "",
            f"Binarized 8x8 digits, {len(data[0])} train / {len(data[1])} test rows, latent "
            f"{vae_digits.LATENT}, Bernoulli decoder; {args.epochs} epochs of SVI "
            f"(Trace_ELBO, Adam lr {args.lr:g}, batch 128), {args.transforms} flow layers; "
            f"{args.seeds} seed(s), {args.threads} torch thread(s); {date:%Y-%m-%d %H:%M} UTC. "
            f"Test ELBO with 1000 particles; IWAE with k = {args.k} importance samples; nats per "
            "digit, "
            "mean ± sd over seeds; gains and time ratios paired by seed.",
            "",
            table(summary, args.k),
            "",
            *targets(summary),
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.isoformat(timespec="seconds"), "args": vars(args) | {"out": str(args.out)},
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "results": rows}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
