r"""Check the Pyro posteriors of ``benchmarks/posteriors`` against posteriordb's reference draws.

For each posterior, Pyro's NUTS (float64, dense mass matrix, seed 0) samples the model; its
draws are mapped to posteriordb's reported names and compared with the 10 000 reference draws:

* ``max z``: max over parameters of |mean - ref mean| / ref sd;
* ``sd ratio``: min and max over parameters of sd / ref sd.

Verdict ``ok`` when max z < 0.2 and every sd ratio is in [0.8, 1.25]: with 1000 draws that
is well within Monte Carlo error for a correctly written model, and far from it for a wrong
likelihood, prior or transform. Posteriors run in up to 2 processes with 1 torch thread each.

Usage::

    python benchmarks/check_posteriors.py --posteriordb ../shared/posteriordb \
        [--num-samples 1000 --warmup 500 --only NAME ...] [--json benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median

sys.path.insert(0, str(Path(__file__).parent))
import posteriors  # noqa: E402

MAX_Z = 0.2
SD_RATIO = (0.8, 1.25)


def check(name: str, root: str, num_samples: int, warmup: int, seed: int) -> dict:
    """Run NUTS on one posterior and compare its draws with the reference draws.

    Args:
        name: posterior name (one of ``posteriors.NAMES``).
        root: the posteriordb folder.
        num_samples: NUTS draws kept.
        warmup: NUTS warmup (adaptation) steps.
        seed: Pyro seed.

    Returns:
        A JSON-ready dict of the statistics.
    """
    torch.set_num_threads(1)
    pyro.set_rng_seed(seed)
    post = posteriors.load(name, root)
    kernel = NUTS(post.model, full_mass=True, jit_compile=False, init_strategy=init_to_median)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    wall = time.perf_counter() - start
    draws = post.to_reported(mcmc.get_samples())
    diagnostics = mcmc.diagnostics()
    params = {}
    for key, ref in post.reference.items():
        x = draws[key]
        ref_mean, ref_sd = ref.mean(), ref.std(ddof=1)
        ess = pyro.ops.stats.effective_sample_size(torch.as_tensor(x)[None], 0, 1).item()
        params[key] = {
            "mean": x.mean(),
            "sd": x.std(ddof=1),
            "ref_mean": ref_mean,
            "ref_sd": ref_sd,
            "z": abs(x.mean() - ref_mean) / ref_sd,
            "sd_ratio": x.std(ddof=1) / ref_sd,
            "ess": ess,
        }
    z = max(p["z"] for p in params.values())
    ratios = [p["sd_ratio"] for p in params.values()]
    ok = z < MAX_Z and SD_RATIO[0] <= min(ratios) and max(ratios) <= SD_RATIO[1]
    return {
        "posterior": name,
        "dim": post.dim,
        "max_z": z,
        "sd_ratio_min": min(ratios),
        "sd_ratio_max": max(ratios),
        "min_ess": min(p["ess"] for p in params.values()),
        "divergences": len(diagnostics["divergences"]["chain 0"]),
        "acceptance_rate": diagnostics["acceptance rate"]["chain 0"],
        "wall_s": wall,
        "verdict": "ok" if ok else "FAIL",
        "parameters": {k: {s: float(v) for s, v in p.items()} for k, p in params.items()},
    }


def _table(results: list[dict]) -> str:
    lines = [
        "| posterior | dim | max \\|mean - ref mean\\| / ref sd | min–max sd/ref sd "
        "| NUTS wall s | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['posterior']} | {r['dim']} | {r['max_z']:.3f} "
            f"| {r['sd_ratio_min']:.2f}–{r['sd_ratio_max']:.2f} | {r['wall_s']:.0f} "
            f"| {r['verdict']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriordb", required=True, help="folder of the posteriors")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=posteriors.NAMES, help="posteriors to run")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    for flag in ("num_samples", "warmup", "workers"):
        if getattr(args, flag) < 1:
            parser.error(
                f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
            )
    if not 0 <= args.seed < 2**32:  # Pyro's seeds
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if not Path(args.posteriordb).is_dir():
        parser.error(f"--posteriordb {args.posteriordb} is not a folder")

    names = args.only or posteriors.NAMES
    start = time.perf_counter()
    # spawn: a fresh interpreter per worker, no torch thread pools inherited through fork
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [
            pool.submit(check, n, args.posteriordb, args.num_samples, args.warmup, args.seed)
            for n in names
        ]
        results = [f.result() for f in futures]
    total = time.perf_counter() - start

    print(
        f"NUTS: {args.warmup} warmup + {args.num_samples} draws, dense mass matrix, float64, "
        f"seed {args.seed}; ok when max z < {MAX_Z} and sd ratios in {list(SD_RATIO)}\n"
    )
    print(_table(results))
    print(f"\nTotal {total:.0f} s with {args.workers} worker(s).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings["posteriordb"] = str(settings["posteriordb"])
        out = {
            "settings": settings,
            "thresholds": {"max_z": MAX_Z, "sd_ratio": list(SD_RATIO)},
            "versions": {"pyro": pyro.__version__, "torch": torch.__version__},
            "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
            "total_s": total,
            "results": results,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
