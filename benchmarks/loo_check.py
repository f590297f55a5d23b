"""Leave-one-out from a guide against leave-one-out from posteriordb's reference draws.

For every posterior under ``--posteriordb`` (models in ``benchmarks/posteriors``), the
reference: ArviZ's ``az.loo`` on the pointwise log-likelihood of the 10,000 reference
(NUTS) draws. Then each guide is fitted as in ``posterior_quality.py`` (same optimiser,
steps and seed) and scored two ways from 4,000 of its draws:

* ``loo``: :func:`pyroflows.infer.loo`, which reweighs the guide's draws by their
  importance weights;
* ``az.loo``: ArviZ's estimate on the same kind of draws, taken as posterior draws (what
  a user gets from ``az.loo(guide.to_arviz(...))``).

Reported per posterior and guide: each estimate's elpd_loo minus the reference's, the
largest pointwise difference, and how many points ``loo`` flags (Pareto k-hat above
ArviZ's threshold). Prints a markdown table and writes JSON and markdown::

    python benchmarks/loo_check.py --posteriordb ../shared/posteriordb
    python benchmarks/loo_check.py --only kidiq-kidscore_momiq --steps 500 --out /tmp/loo
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the pyroflows of this working tree

import posteriors  # noqa: E402

GUIDES = ("AutoFlow", "Normal", "MVN")


def reference_latents(post, root: Path) -> dict:
    """The model's latent sites at the reference draws, from posteriordb's parameters."""
    import pyro
    import torch
    from pyro.poutine.util import site_is_subsample

    ref = {k: torch.from_numpy(v) for k, v in post.reference.items()}
    with torch.no_grad():
        trace = pyro.poutine.trace(post.model).get_trace()
    out = {}
    for name in trace.stochastic_nodes:
        site = trace.nodes[name]
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        size = site["value"].numel()
        keys = [name] if size == 1 else [f"{name}[{k + 1}]" for k in range(size)]
        if post.name.startswith("eight_schools") and name == "theta_trans":
            theta = torch.stack([ref[f"theta[{k + 1}]"] for k in range(size)], -1)
            out[name] = (theta - ref["mu"][:, None]) / ref["tau"][:, None]
        elif post.name.startswith("gp_pois_regr") and name == "f_tilde":
            x = torch.tensor(json.loads((root / post.name / "data.json").read_text())["x"])
            f = torch.stack([ref[f"f[{k + 1}]"] for k in range(size)], -1)
            chol = posteriors._gp_cholesky(x.double(), ref["rho"], ref["alpha"])
            out[name] = torch.linalg.solve_triangular(chol, f[..., None], upper=False)[..., 0]
        else:
            out[name] = torch.stack([ref[k] for k in keys], -1) if size > 1 else ref[keys[0]]
    # the latents must give back the reference parameters
    for key, value in post.to_reported(out).items():
        if not np.allclose(value, post.reference[key], rtol=1e-6, atol=1e-8):
            raise ValueError(f"{post.name}: the latents do not give back reference {key}")
    return out


def reference_log_lik(post, root: Path, batch: int = 2000) -> np.ndarray:
    """Pointwise log-likelihood of the observed site at each reference draw, (draws, N)."""
    import pyro
    import torch

    latents = reference_latents(post, root)
    n = len(next(iter(latents.values())))
    rows = []
    for start in range(0, n, batch):
        part = {}
        for name, value in latents.items():
            value = value[start : start + batch]
            part[name] = value[:, None] if value.dim() == 1 else value  # (P, 1) or (P, K)
        with torch.no_grad(), pyro.plate("draws", len(value), dim=-2):
            trace = pyro.poutine.trace(pyro.poutine.condition(post.model, part)).get_trace()
        site = trace.nodes["obs"]
        rows.append(site["fn"].log_prob(site["value"]))
    return torch.cat(rows).numpy()


def run_one(job: dict) -> dict:
    """Fit one guide to one posterior and score its LOO (runs in a worker process)."""
    import posterior_quality
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyroflows.infer import loo, to_arviz

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    az = _arviz()
    result = {k: job[k] for k in ("posterior", "guide", "seed")}
    try:
        root = Path(job["root"])
        post = posteriors.load(job["posterior"], root)
        if job["guide"] == "reference":
            ll = reference_log_lik(post, root)
            idata = az.from_dict(log_likelihood={"obs": ll[None]})
            ref = az.loo(
                idata, pointwise=True, reff=1.0
            )  # chains pooled: draws taken as independent
            result.update(
                elpd=float(ref["elpd_loo"]),
                se=float(ref["se"]),
                loo_i=ref["loo_i"].values.tolist(),
                max_k=float(np.max(ref["pareto_k"].values)),
                points=int(ll.shape[1]),
            )
            return result
        pyro.set_rng_seed(job["seed"])
        pyro.clear_param_store()
        model = post.model
        guide = posterior_quality.make_guide(job["guide"], model, post.dim)
        steps = job["steps"]
        optim = pyro.optim.ClippedAdam(
            {"lr": 1e-2, "lrd": (1e-3 / 1e-2) ** (1 / steps), "clip_norm": 10.0}
        )
        svi = SVI(model, guide, optim, Trace_ELBO())
        start = time.perf_counter()
        for _ in range(steps):
            svi.step()
        result["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ours = loo(model, guide, num_samples=job["draws"])
        result["loo_s"] = time.perf_counter() - start
        raw = az.loo(to_arviz(model, guide, num_samples=job["draws"]), pointwise=True)
        result.update(
            elpd=float(ours["elpd_loo"]),
            loo_i=ours["loo_i"].values.tolist(),
            flagged=int(np.sum(ours["pareto_k"].values > ours["good_k"])),
            max_k=float(np.max(ours["pareto_k"].values)),
            raw_elpd=float(raw["elpd_loo"]),
            raw_loo_i=raw["loo_i"].values.tolist(),
        )
    except Exception as error:  # a guide that diverges is a result, not a crash
        result.update(error=f"{type(error).__name__}: {error}"[:200])
    return result


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def table(results: list[dict], names: list[str], guides: list[str]) -> str:
    ref = {r["posterior"]: r for r in results if r["guide"] == "reference"}
    lines = [
        "| posterior | points | reference elpd_loo (se) | guide | loo - ref | max point diff "
        "| points flagged (max k-hat) | az.loo on raw draws - ref | its max point diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r0 = ref.get(name, {})
        if "error" in r0 or not r0:
            lines.append(f"| {name} | - | {r0.get('error', 'missing')} | | | | | | |")
            continue
        head = f"| {name} | {r0['points']} | {r0['elpd']:.2f} ({r0['se']:.2f})"
        for guide in guides:
            r = next((x for x in results if x["posterior"] == name and x["guide"] == guide), None)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{head} | {guide} | {r['error']} | | | | |")
            else:
                point = np.abs(np.subtract(r["loo_i"], r0["loo_i"])).max()
                raw_point = np.abs(np.subtract(r["raw_loo_i"], r0["loo_i"])).max()
                lines.append(
                    f"{head} | {guide} | {r['elpd'] - r0['elpd']:+.2f} | {point:.3f} | "
                    f"{r['flagged']} ({r['max_k']:.2f}) | {r['raw_elpd'] - r0['elpd']:+.2f} | "
                    f"{raw_point:.3f} |"
                )
            head = "| | | "
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posteriordb", default=str(HERE.parent.parent / "shared/posteriordb"))
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--guides", nargs="+", default=list(GUIDES))
    parser.add_argument("--only", nargs="+", default=None, choices=posteriors.NAMES)
    parser.add_argument(
        "--out",
        default=None,
        help="path stem of the .json and .md; default results/loo_check for the full run, "
        "results/loo_check_partial for any other",
    )
    args = parser.parse_args(argv)
    for flag in ("steps", "draws", "workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.out is None:  # a partial run never replaces the results of the full one
        from _out import results_path

        args.out = str(results_path(parser, args, "loo_check", ignore=("workers", "posteriordb")))
    from posterior_quality import check_posteriordb

    root = check_posteriordb(parser, args.posteriordb, args.only)  # a usage error, not a row
    for guide in args.guides:
        import posterior_quality

        try:
            posterior_quality.check_guide_name(guide)
        except ValueError as error:
            parser.error(f"--guides: {error}")
    names = args.only or list(posteriors.NAMES)
    jobs = [
        {
            "posterior": name,
            "guide": guide,
            "seed": args.seed,
            "root": str(root),
            "steps": args.steps,
            "draws": args.draws,
        }
        for name in names
        for guide in ("reference", *args.guides)
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run_one, jobs))
    total = time.perf_counter() - start
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# Leave-one-out: guides against posteriordb's reference draws",
            "",
            f"{args.steps} SVI steps (ClippedAdam 1e-2 -> 1e-3, clip 10, 1 particle, seed "
            f"{args.seed}) per guide, as in posterior_quality.py; {args.draws} guide draws "
            "for each estimate; the reference is `az.loo` on the 10,000 reference draws. "
            "`loo`: `pyroflows.infer.loo` (draws reweighed by their importance weights); "
            "`az.loo on raw draws`: ArviZ's estimate taking the guide's draws for posterior "
            "draws. Differences in nats (elpd_loo is a sum over points); points flagged: "
            "Pareto k-hat of `loo` above ArviZ's threshold.",
            "",
            table(results, names, args.guides),
            "",
            f"Run: {date} on {platform.machine()} {args.workers} workers; total {total:.0f} s.",
        ]
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
