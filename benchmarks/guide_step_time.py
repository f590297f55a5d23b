"""Time per SVI step of AutoFlow against Pyro's AutoIAFNormal, interleaved in one process.

``posterior_quality.py`` reports each fit's CPU time per step, but its fits run in two
worker processes beside whatever job the other worker has, and that neighbour moves a
guide's time by a third from one run to the next (eight schools' ``AutoIAFNormal`` took
3.4 ms a step in one run and 4.8 ms in another). This script measures the ratio the
issue's target is about under the same conditions for both guides: for each posteriordb
posterior it sets up ``AutoIAFNormal`` (Pyro's defaults) and ``AutoFlow`` (ours, with its
defaults) on one torch thread in float64, takes 50 steps of each, then alternates
``--reps`` rounds of ``--steps`` steps of each guide (built by the quality benchmark's
``make_guide``; its ``ClippedAdam(clip_norm=10)`` at lr 0.01, without the decay, which
does not change a step's cost), and reports the median over rounds of the CPU ms per
step and their ratio. ``--guides`` times other guides of the quality benchmark in the
same rounds (each against the same ``AutoIAFNormal``), such as ``AutoFlow-iaf+stl``.

Run::

    python benchmarks/guide_step_time.py --posteriordb ../shared/posteriordb
    python benchmarks/guide_step_time.py --guides AutoFlow AutoFlow-iaf+stl --out /tmp/t

Writes ``benchmarks/results/guide_step_time.{json,md}`` (a run with other flags:
``guide_step_time_partial``; ``--out`` names another stem).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import posteriors  # noqa: E402
from posterior_quality import check_guide_names, check_posteriordb, make_guide  # noqa: E402

#: the reference every ratio is taken against, and the name ``make_guide`` builds it by
REFERENCE = ("AutoIAFNormal", "IAF")


def time_posterior(name: str, root: str, steps: int, reps: int, guides=("AutoFlow",)) -> dict:
    """Median CPU ms per step of each guide on posterior ``name``, rounds interleaved."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    post = posteriors.load(name, root)
    specs = dict([REFERENCE, *((g, g) for g in guides)])
    store = pyro.get_param_store()
    svis, scopes = {}, {}
    for guide, spec in specs.items():
        # a param store per guide: two AutoFlows would share their parameters' names
        with store.scope() as scopes[guide]:
            pyro.set_rng_seed(0)
            optim = pyro.optim.ClippedAdam({"lr": 0.01, "clip_norm": 10.0})
            model, built = post.model, make_guide(spec, post.model, post.dim)
            svis[guide] = SVI(model, built, optim, Trace_ELBO())
            for _ in range(50):  # set-up (AutoFlow's warm start) and warm-up, not timed
                svis[guide].step()
    times: dict[str, list[float]] = {guide: [] for guide in specs}
    for _ in range(reps):
        for guide, svi in svis.items():
            with store.scope(scopes[guide]):
                start = time.process_time()
                for _ in range(steps):
                    svi.step()
                times[guide].append(1000 * (time.process_time() - start) / steps)
    ms = {guide: statistics.median(v) for guide, v in times.items()}
    return {
        "posterior": name,
        "dim": post.dim,
        "ms_per_step": ms,
        "rounds": times,
        "ratio": {g: ms[g] / ms[REFERENCE[0]] for g in guides},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--posteriordb", default=str(here.parent.parent / "shared/posteriordb"))
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--reps", type=int, default=15, help="rounds per guide")
    parser.add_argument("--only", nargs="+", choices=posteriors.NAMES)
    parser.add_argument(
        "--guides",
        nargs="+",
        default=["AutoFlow", "AutoFlow-iaf+stl"],
        help="guides of posterior_quality.py to time against AutoIAFNormal",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="path stem of the .json and .md; default results/guide_step_time for the full "
        "run, results/guide_step_time_partial for any other",
    )
    args = parser.parse_args()
    for flag in ("steps", "reps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.out is None:  # a partial run never replaces the results of the full one
        from _out import results_path

        args.out = str(results_path(parser, args, "guide_step_time", ignore=("posteriordb",)))
    check_guide_names(parser, args.guides)
    check_posteriordb(parser, args.posteriordb, args.only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the timing

    import pyro
    import torch

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.only or posteriors.NAMES:
        row = time_posterior(name, args.posteriordb, args.steps, args.reps, args.guides)
        rows.append(row)
        ms = row["ms_per_step"]
        times = "  ".join(f"{g} {ms[g]:.2f} ms ({row['ratio'][g]:.2f}x)" for g in args.guides)
        print(f"{name:40s} IAF {ms[REFERENCE[0]]:.2f} ms  {times}", flush=True)
    heads = " | ".join(f"{g} ms | ratio" for g in args.guides)
    lines = [
        f"# Time per SVI step: {', '.join(args.guides)} against AutoIAFNormal, interleaved "
        "in one process",
        "",
        f"Median over {args.reps} alternating rounds of {args.steps} steps (after 50 untimed), "
        "CPU ms per step, 1 torch thread, float64, ClippedAdam, Trace_ELBO 1 particle. "
        "ratio: the guide's ms / AutoIAFNormal's (below 1: faster; the target is 1.5x at "
        "most). Each round times AutoIAFNormal first, then the guides in the order given.",
        "",
        f"| posterior | D | AutoIAFNormal ms | {heads} |",
        "|---|---|---|" + "---|---|" * len(args.guides),
    ]
    for r in rows:
        ms = r["ms_per_step"]
        cells = " | ".join(f"{ms[g]:.2f} | {r['ratio'][g]:.2f}x" for g in args.guides)
        lines.append(f"| {r['posterior']} | {r['dim']} | {ms[REFERENCE[0]]:.2f} | {cells} |")
    lines += [
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}; "
        f"pyro {pyro.__version__}, torch {torch.__version__}.",
    ]
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
