"""Posterior quality on posteriordb: Pyro's autoguides against AutoFlow, side by side.

For every posterior under ``--posteriordb`` (data, reference NUTS draws; models in
``benchmarks/posteriors``), fit each guide with the same optimiser, steps and particles,
over several seeds, then report per guide and posterior the median over seeds of:

* ``z``: max over parameters of |mean_q - mean_ref| / sd_ref (10,000 guide draws),
* ``sd``: the range of sd_q / sd_ref,
* ``k``: PSIS k-hat of the guide's importance weights (2,000 draws, ArviZ), and the
  importance-sampling ESS of the same draws (k-hat is scale-free: when the log weights
  barely vary, one outlier among 2,000 can give a large k-hat beside a near-full ESS),
* wall seconds for the SVI steps and milliseconds per step,

and each seed's score ``max(z, max |log sd ratio|)`` (0 is perfect), so that seed noise
shows. The guides:

* Pyro's, as a Pyro user builds them: ``Normal`` (``AutoNormal``), ``MVN``
  (``AutoMultivariateNormal``), ``IAF`` (``AutoIAFNormal`` with its defaults: one layer,
  one hidden layer of ``3D + 10``), ``IAF-2x4D`` (``AutoIAFNormal`` at the size of
  AutoFlow's default IAF: two layers, two hidden layers of ``max(16, 4D)``) and ``NSF``
  (``AutoNormalizingFlow``, spline coupling then IAF). "Best Pyro" is the best of these.
* Ours: ``AutoFlow`` (the default: IAF, Laplace warm start), ``AutoFlow-cold`` (the
  same with ``warm_start=None``, started at the initial point: what the flow does without
  the warm start), ``AutoFlow-iaf+stl`` and the other builders.
* A reference, in neither group: ``MVN-anchor``, Pyro's ``AutoMultivariateNormal``
  started at AutoFlow's warm-start Gaussian (its Laplace approximation when chosen), to
  show what the start alone gives. Its wall time includes finding that start.

Run::

    python benchmarks/posterior_quality.py --posteriordb ../shared/posteriordb
    python benchmarks/posterior_quality.py --posteriordb ../shared/posteriordb --quick
    python benchmarks/posterior_quality.py --only kidiq-kidscore_momiq --seeds 1
    python benchmarks/posterior_quality.py --particles 16 --vectorize \
        --only gp_pois_regr-gp_pois_regr --out /tmp/gp_16_particles

Writes ``benchmarks/results/posterior_quality.{json,md}`` for the full run,
``posterior_quality_quick.*`` with ``--quick`` and ``posterior_quality_partial.*`` for any
other run without ``--out`` (one posterior, fewer seeds, ...), so that only a full run
replaces the results the README quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import posteriors  # noqa: E402
from _out import default_stem  # noqa: E402

from pyroflows.infer.autoflow import GUIDE_FLOWS  # noqa: E402

PYRO_GUIDES = ("Normal", "MVN", "IAF", "IAF-2x4D", "NSF")
# the default, without its warm start, with the "sticking the landing" estimator, the
# other builders
OUR_GUIDES = (
    "AutoFlow",
    "AutoFlow-cold",
    "AutoFlow-iaf+stl",
    "AutoFlow-nsf",
    "AutoFlow-realnvp",
)
REFERENCE_GUIDES = ("MVN-anchor",)  # shown, but neither Pyro's as users get it nor ours
FLOWS = tuple(sorted(GUIDE_FLOWS))  # the builders AutoFlow takes by name


def check_guide_name(name: str) -> str:
    """Return ``name`` if :func:`make_guide` knows it, else raise ``ValueError``."""
    if name in (*PYRO_GUIDES, *REFERENCE_GUIDES, "AutoFlow", "AutoFlow-cold", "AutoFlow-lu"):
        return name
    if name.startswith("AutoFlow-"):
        spec, _, estimator = name.removeprefix("AutoFlow-").partition("+")
        flow, *sizes = spec.split(":")
        if (
            flow in FLOWS
            and estimator in ("", "reparam", "stl")
            and len(sizes) <= 2
            and all(size.isdigit() and int(size) > 0 for size in sizes)
        ):
            return name
    raise ValueError(
        f"unknown guide {name!r}; expected one of {[*PYRO_GUIDES, *REFERENCE_GUIDES]}, "
        f"AutoFlow, AutoFlow-cold, AutoFlow-lu or AutoFlow-<flow>[:<transforms>[:<width>]]"
        f"[+stl] with <flow> in {list(FLOWS)}"
    )


def check_guide_names(parser: argparse.ArgumentParser, guides: list[str]) -> None:
    """Exit through ``parser.error`` naming ``--guides`` if any name is unknown."""
    for guide in guides:
        try:
            check_guide_name(guide)
        except ValueError as error:
            parser.error(f"--guides: {error}")


def _mvn_from_anchor(model):
    """Pyro's ``AutoMultivariateNormal`` set to AutoFlow's starting Gaussian."""
    import pyro
    import torch
    from pyro.infer import autoguide

    from pyroflows.infer import AutoFlow

    start = AutoFlow(model)
    start()  # runs the warm start: the anchor is its Gaussian in the unconstrained space
    loc, scale_tril = start.anchor_loc.clone(), start.anchor_scale_tril.clone()
    pyro.clear_param_store()
    guide = autoguide.AutoMultivariateNormal(model)
    guide()
    with torch.no_grad():
        guide.loc.copy_(loc)
    scale = scale_tril.diagonal()
    guide.scale = scale.clone()  # AutoMultivariateNormal: scale_tril = diag(scale) @ L
    guide.scale_tril = (scale_tril / scale[:, None]).clone()
    if not torch.allclose(guide.get_posterior().scale_tril, scale_tril):
        raise RuntimeError("MVN-anchor: the Pyro guide did not take the anchor's scale")
    return guide


def make_guide(name: str, model, dim: int):
    """Build guide ``name`` for ``model`` with ``dim`` unconstrained latent numbers."""
    from pyro.distributions import transforms as T
    from pyro.infer import autoguide

    from pyroflows.infer import AutoFlow

    if name == "Normal":
        return autoguide.AutoNormal(model)
    if name == "MVN":
        return autoguide.AutoMultivariateNormal(model)
    if name == "MVN-anchor":
        return _mvn_from_anchor(model)
    if name == "IAF":
        return autoguide.AutoIAFNormal(model)
    if name == "IAF-2x4D":  # AutoFlow's default IAF size: 2 layers, hidden (4D, 4D), >= 16
        width = max(16, 4 * dim)
        return autoguide.AutoIAFNormal(model, hidden_dim=[width, width], num_transforms=2)
    if name == "NSF":

        def spline_then_iaf(dim):
            return T.ComposeTransformModule(
                [T.spline_coupling(dim, count_bins=8), T.affine_autoregressive(dim)]
            )

        return autoguide.AutoNormalizingFlow(model, spline_then_iaf)
    if name == "AutoFlow":
        return AutoFlow(model)
    if name == "AutoFlow-cold":  # the default without its warm start
        return AutoFlow(model, warm_start=None)
    if name == "AutoFlow-lu":  # the default plus the learnt LU-linear map (an ablation)
        return AutoFlow(model, learn_linear=True)
    if name.startswith("AutoFlow-"):
        # AutoFlow-<flow>[:<transforms>[:<hidden width>]][+<estimator>]
        spec, _, estimator = name.removeprefix("AutoFlow-").partition("+")
        flow, *sizes = spec.split(":")
        options = {}
        if sizes:
            options["transforms"] = int(sizes[0])
        if len(sizes) > 1:
            options["hidden"] = (int(sizes[1]),) * 2
        return AutoFlow(model, flow=flow, estimator=estimator or "reparam", **options)
    check_guide_name(name)  # raises for an unknown name
    raise AssertionError(name)


def moments_error(post, samples: dict) -> tuple[float, float, float]:
    """Max standardized mean error, and min / max sd ratio against the reference."""
    reported = post.to_reported(samples)
    zs, ratios = [], []
    for key, ref in post.reference.items():
        draws = np.asarray(reported[key], dtype=np.float64)
        sd_ref = ref.std(ddof=1)
        zs.append(abs(draws.mean() - ref.mean()) / sd_ref)
        ratios.append(draws.std(ddof=1) / sd_ref)
    return float(np.max(zs)), float(np.min(ratios)), float(np.max(ratios))


def run_one(job: dict) -> dict:
    """Fit one guide to one posterior and measure it (runs in a worker process)."""
    import pyro
    import torch
    from pyro.infer import SVI, Predictive, Trace_ELBO

    from pyroflows.infer import diagnose

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    pyro.set_rng_seed(job["seed"])
    pyro.clear_param_store()
    result = {k: job[k] for k in ("posterior", "guide", "seed")}
    try:
        post = posteriors.load(job["posterior"], job["root"])
        model = post.model
        result["dim"] = post.dim
        steps = job["steps"]
        start = time.perf_counter()
        cpu = time.process_time()
        guide = make_guide(job["guide"], model, post.dim)  # MVN-anchor: finds its start
        optim = pyro.optim.ClippedAdam(
            {
                "lr": job["lr"],
                "lrd": (job["final_lr"] / job["lr"]) ** (1 / steps),
                "clip_norm": 10.0,
            }
        )
        elbo = Trace_ELBO(
            num_particles=job["particles"], vectorize_particles=job.get("vectorize", False)
        )
        svi = SVI(model, guide, optim, elbo)
        for i in range(steps):
            loss = svi.step()
            if i == 0:
                setup = time.perf_counter() - start
                cpu_first = time.process_time() - cpu
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        result.update(
            wall_s=wall,
            setup_s=setup,
            ms_per_step=1000 * (cpu - cpu_first) / max(steps - 1, 1),
            final_loss=float(loss),
        )
        with torch.no_grad():
            samples = Predictive(model, guide=guide, num_samples=job["draws"], parallel=True)()
        samples = {k: v for k, v in samples.items() if k != "obs" and not k.startswith("_")}
        z, lo, hi = moments_error(post, samples)
        report = diagnose(model, guide, num_samples=job["psis_draws"])
        result.update(z=z, sd_min=lo, sd_max=hi, khat=report.khat, ess=report.ess)
        if hasattr(guide, "anchor"):
            result["anchor"] = guide.anchor
    except Exception as error:  # a guide that diverges is a result, not a crash
        result.update(error=f"{type(error).__name__}: {error}"[:200])
    return result


def score(r: dict) -> float:
    """max(z, max |log sd ratio|): 0 is perfect (the baseline's 'best' criterion)."""
    if "error" in r or not all(math.isfinite(r[k]) for k in ("z", "sd_min", "sd_max")):
        return math.inf
    return max(r["z"], abs(math.log(r["sd_min"])), abs(math.log(r["sd_max"])))


METRICS = ("z", "sd_min", "sd_max", "khat", "ess", "wall_s", "ms_per_step")


def summarise(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (posterior, guide): the median over seeds of each metric, and every seed's score.

    A seed that failed counts as score ``inf``; the medians are over the seeds that ran
    (``failed`` says how many did not). Only when every seed failed is the summary an error.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["posterior"], r["guide"]), []).append(r)
    summary = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        ok = [r for r in runs if "error" not in r]
        entry: dict = {
            "posterior": key[0],
            "guide": key[1],
            "dim": next((r["dim"] for r in runs if "dim" in r), None),
            "seeds": [r["seed"] for r in runs],
            "scores": [score(r) for r in runs],
            "failed": len(runs) - len(ok),
        }
        entry["score"] = float(np.median(entry["scores"]))
        if ok:
            entry.update({m: float(np.median([r[m] for r in ok])) for m in METRICS})
        else:
            entry["error"] = runs[0]["error"]
        summary[key] = entry
    return summary


def fmt(x: float) -> str:
    """Three significant figures, compactly."""
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        return f"{x:.0e}"
    return f"{x:.3g}" if abs(x) >= 1 else f"{x:.2f}"


def cell(r: dict) -> str:
    """One table cell: medians over seeds, then each seed's score."""
    if "error" in r:
        return "failed: " + r["error"][:40]
    text = (
        f"z {fmt(r['z'])} · sd {fmt(r['sd_min'])}–{fmt(r['sd_max'])} · k {r['khat']:.2f} "
        f"(ESS {r['ess']:.0f}) · {r['wall_s']:.0f}s/{r['ms_per_step']:.1f}ms"
    )
    if "scores" in r and len(r["scores"]) > 1:
        text += " · s " + "/".join(fmt(v) for v in r["scores"])
    if r.get("failed"):
        text += f" · {r['failed']} seed(s) failed"
    return text


def ours(guides: list[str]) -> list[str]:
    """The guides of ours among ``guides`` (neither Pyro's nor a reference), in order."""
    return [g for g in guides if g not in PYRO_GUIDES and g not in REFERENCE_GUIDES]


def best_pyro(by: dict, name: str) -> dict | None:
    """The Pyro guide with the lowest median score on posterior ``name``."""
    rows = [by[(name, g)] for g in PYRO_GUIDES if (name, g) in by]
    return min(rows, key=lambda r: r["score"]) if rows else None


def _speed(by: dict, name: str, r: dict) -> str:
    parts = []
    for base in ("IAF", "IAF-2x4D"):
        ref = by.get((name, base))
        if ref and "error" not in ref and "error" not in r:
            parts.append(f"{r['ms_per_step'] / ref['ms_per_step']:.2f}x {base}")
    return f", ms/step {' / '.join(parts)}" if parts else ""


def table(summary: dict, guides: list[str], names: list[str]) -> str:
    """The markdown table, a row per posterior."""
    head = "| posterior | D | " + " | ".join(guides) + " | best Pyro | ours vs best Pyro |"
    lines = [head, "|" + "---|" * (len(guides) + 4)]
    for name in names:
        row = [summary[(name, g)] for g in guides if (name, g) in summary]
        if not row:
            continue
        best = best_pyro(summary, name)
        cells = [cell(summary[(name, g)]) if (name, g) in summary else "" for g in guides]
        verdicts = []
        for g in ours(guides):
            r = summary.get((name, g))
            if r is None or best is None:
                continue
            better = "≤" if r["score"] <= best["score"] else ">"
            verdicts.append(
                f"{g}: {fmt(r['score'])} {better} {fmt(best['score'])}{_speed(summary, name, r)}"
            )
        best_txt = f"{best['guide']} ({fmt(best['score'])})" if best else ""
        dim = next((r["dim"] for r in row if r["dim"] is not None), "?")
        lines.append(
            f"| {name} | {dim} | " + " | ".join(cells) + f" | {best_txt} | {'; '.join(verdicts)} |"
        )
    return "\n".join(lines)


def _checks(
    r: dict, r_score: float, best: dict | None, best_score: float, iaf: dict | None
) -> list[tuple[bool, str]]:
    """The issue's targets for one result (a seed's, or the medians), as (holds, why not)."""
    checks = [
        (r["z"] <= 0.1, f"z {r['z']:.2f} > 0.1"),
        (0.9 <= r["sd_min"] and r["sd_max"] <= 1.1, f"sd {r['sd_min']:.3f}–{r['sd_max']:.3f}"),
        (r["khat"] <= 0.7, f"k-hat {r['khat']:.2f} > 0.7"),
        (best is None or r_score <= best_score, f"worse than {best and best['guide']}"),
    ]
    if iaf is not None and "error" not in iaf:
        ratio = r["ms_per_step"] / iaf["ms_per_step"]
        checks.append((ratio <= 1.5, f"{ratio:.2f}x IAF's time per step"))
    return checks


def targets(results: list[dict], summary: dict, guide: str) -> list[str]:
    """Where ``guide`` misses the issue's targets: on the medians over seeds, in words.

    The verdict is on the medians (the "worse than" check on median scores); each miss
    says on how many seeds that target held when taken seed by seed.
    """
    missed = []
    per_seed = {(r["posterior"], r["guide"], r["seed"]): r for r in results}
    for (name, g), r in summary.items():
        if g != guide:
            continue
        if "error" in r:
            missed.append(f"{name}: failed on every seed ({r['error']})")
            continue
        best = best_pyro(summary, name)
        iaf = summary.get((name, "IAF"))
        checks = _checks(r, r["score"], best, best and best["score"], iaf)
        seeds = r["seeds"]
        held = [0] * len(checks)
        for seed in seeds:
            run = per_seed[(name, g, seed)]
            if "error" in run:
                continue
            pyro_runs = [
                per_seed[(name, p, seed)] for p in PYRO_GUIDES if (name, p, seed) in per_seed
            ]
            seed_best = min(pyro_runs, key=score) if pyro_runs else None
            seed_iaf = per_seed.get((name, "IAF", seed)) if iaf is not None else None
            best_score = score(seed_best) if seed_best else math.inf
            seed_checks = _checks(run, score(run), seed_best, best_score, seed_iaf)
            for i, (ok, _) in enumerate(seed_checks):
                held[i] += ok
        failed = [
            f"{why} (held on {count}/{len(seeds)} seeds)"
            for (ok, why), count in zip(checks, held, strict=True)
            if not ok
        ]
        if failed:
            missed.append(f"{name}: " + ", ".join(failed))
    return missed


def check_posteriordb(
    parser: argparse.ArgumentParser, path: str, only: list[str] | None = None
) -> Path:
    """``--posteriordb`` as a directory holding every posterior asked for, else a usage error."""
    root = Path(path)
    if not root.is_dir():
        parser.error(f"--posteriordb {root} is not a directory")
    for name in [n for n in posteriors.NAMES if only is None or n in only]:
        try:
            posteriors.load(name, root)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--posteriordb {root}: cannot read {name} ({error})")
    return root


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every (posterior, guide, seed), print and save the table."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posteriordb", default=str(here.parent.parent / "shared/posteriordb"))
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--final-lr", type=float, default=1e-3)
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument(
        "--vectorize",
        action="store_true",
        help="draw the ELBO's particles in one vectorized pass (Trace_ELBO(vectorize_particles))",
    )
    parser.add_argument("--draws", type=int, default=10000)
    parser.add_argument("--psis-draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed on")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--guides", nargs="+", default=[*PYRO_GUIDES, *REFERENCE_GUIDES, *OUR_GUIDES]
    )
    parser.add_argument("--only", nargs="+", default=None, choices=posteriors.NAMES)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="500 steps, 2000 draws, 500 for PSIS (where --steps, --draws and --psis-draws "
        "are not given)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="path stem of the .json and .md (default: results/posterior_quality for the "
        "full run; results/posterior_quality_quick with --quick, and "
        "results/posterior_quality_partial for any other run, so neither replaces the "
        "results of a full run; with --from-json, the tables are written only here)",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="re-render the tables of a saved run (fits nothing; prints them, and writes "
        "them to --out only when given)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        if not Path(args.from_json).is_file():
            parser.error(f"--from-json {args.from_json} is not a file")
        saved = json.loads(Path(args.from_json).read_text())
        for key, value in saved["meta"]["args"].items():
            if key not in ("out", "from_json"):
                setattr(args, key, value)
        results, total = saved["results"], saved["meta"]["total_s"]
        date = saved["meta"].get("date", "unknown date")
        names = [n for n in posteriors.NAMES if any(r["posterior"] == n for r in results)]
        report(args, results, names, total, date)
        return
    if args.out is None:
        protocol = ("steps", "lr", "final_lr", "particles", "vectorize", "draws")
        protocol += ("psis_draws", "seed", "seeds", "guides", "only")
        stem = default_stem(parser, args, "posterior_quality", protocol, args.quick)
        args.out = str(here / "results" / stem)
    if args.quick:  # its budget, where the flags leave the full run's
        for flag, value in (("steps", 500), ("draws", 2000), ("psis_draws", 500)):
            if getattr(args, flag) == parser.get_default(flag):
                setattr(args, flag, value)
    for flag in ("steps", "particles", "draws", "psis_draws", "seeds", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not (0 <= args.seed and args.seed + args.seeds <= 2**32):  # Pyro's seeds
        parser.error(f"--seed must be in [0, 2**32 - --seeds], got {args.seed}")
    for flag in ("lr", "final_lr"):
        if not 0 < getattr(args, flag) < math.inf:
            parser.error(f"--{flag.replace('_', '-')} must be a positive finite number")
    check_guide_names(parser, args.guides)
    root = check_posteriordb(parser, args.posteriordb, args.only)
    names = [n for n in posteriors.NAMES if args.only is None or n in args.only]
    seeds = range(args.seed, args.seed + args.seeds)
    jobs = [
        {
            "posterior": name,
            "guide": guide,
            "root": str(root),
            "steps": args.steps,
            "lr": args.lr,
            "final_lr": args.final_lr,
            "particles": args.particles,
            "vectorize": args.vectorize,
            "draws": args.draws,
            "psis_draws": args.psis_draws,
            "seed": seed,
        }
        for seed in seeds
        for name in names
        for guide in args.guides
    ]
    start = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        results = []
        for r in pool.map(run_one, jobs):
            results.append(r)
            print(f"{r['posterior']:40s} {r['guide']:18s} {r['seed']:3d} {cell(r)}", flush=True)
    total = time.time() - start
    date = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    report(args, results, names, total, date)


def report(args, results: list[dict], names: list[str], total: float, date: str) -> None:
    """Print the markdown report and write it, with the JSON of every run, to ``--out``."""
    import pyro
    import torch

    summary = summarise(results)
    seeds = range(args.seed, args.seed + args.seeds)

    budget = (
        f"Budget: {args.steps} steps, ClippedAdam(clip_norm=10) lr {args.lr} -> "
        f"{args.final_lr} geometric decay, Trace_ELBO {args.particles} particle(s)"
        f"{' (vectorized)' if getattr(args, 'vectorize', False) else ''}, seeds "
        f"{seeds.start}..{seeds.stop - 1}, float64, 1 torch thread per worker, "
        f"{args.workers} worker(s); {args.draws} draws for moments, {args.psis_draws} for PSIS."
    )
    md = [
        "# Posterior quality on posteriordb",
        "",
        budget,
        "",
        f"Cell, medians over the {args.seeds} seed(s): `z` max |mean_q - mean_ref|/sd_ref · "
        "`sd` min–max of sd_q/sd_ref · `k` PSIS "
        f"k-hat (importance-sampling ESS of the same {args.psis_draws} draws) · wall s for "
        "the SVI steps (incl. set-up: AutoFlow's Laplace warm start; MVN-anchor's includes "
        "finding that start) / CPU ms per step after the first · `s` each seed's score "
        "max(z, max |log sd ratio|).",
        "",
        "Pyro's guides as a user builds them: IAF is `AutoIAFNormal` with its defaults, "
        "IAF-2x4D the same at AutoFlow's default IAF size (2 layers, hidden 2 x max(16, 4D)). "
        "MVN-anchor (a reference, not in 'best Pyro'): `AutoMultivariateNormal` started at "
        "AutoFlow's warm-start Gaussian. AutoFlow-cold: the default AutoFlow with "
        "`warm_start=None`.",
        "",
        table(summary, args.guides, names),
        "",
        "best Pyro = the Pyro guide with the lowest median score; its value in brackets.",
        "",
    ]
    studied = [g for g in ("AutoFlow", "AutoFlow-cold", "AutoFlow-iaf+stl") if g in args.guides]
    for guide in studied:
        what = {"AutoFlow": "the default AutoFlow"}.get(guide, f"{guide} (not the default)")
        misses = targets(results, summary, guide) if summary else []
        md += [
            f"Targets for {what} on the medians (z <= 0.1, sd in [0.9, 1.1], k <= 0.7, at "
            "least as good as the best Pyro guide, <= 1.5x AutoIAFNormal's ms/step), misses:",
            "",
            *(f"- {m}" for m in misses or ["none"]),
            "",
        ]
    machine = getattr(args, "machine", None) or {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "pyro": pyro.__version__,
        "torch": torch.__version__,
    }  # a re-rendered run keeps the machine and versions it ran with
    args.machine = machine
    md.append(
        f"Run: {date} on {machine['machine']} {machine['cores']} cores; pyro "
        f"{machine['pyro']}, torch {machine['torch']}; total {total:.0f}s."
    )
    text = "\n".join(md)
    print(text)
    if args.out is None:  # --from-json without --out: printed only
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    meta = {"args": vars(args), "total_s": total, "pyro": machine["pyro"], "date": date}
    rows = [{**v, "scores": [float(x) for x in v["scores"]]} for v in summary.values()]
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": rows, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
