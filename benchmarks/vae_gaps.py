r"""Where the digits VAE's ELBO gap comes from: amortization or the posterior family.

The issue's VAE targets ask a flow q(z|x) to gain a nat of test ELBO over the diagonal
Gaussian. A flow can only close the *approximation* gap, the part of
:math:`\log p(x) - \text{ELBO}` that comes from the family of q; the *amortization* gap,
the encoder's failure to output the best member of that family for each x, it cannot
(Cremer, Li, Duvenaud 2018). This script splits the gap, per trained model and test digit:

* :math:`\log \hat p(x)`: the IWAE estimate (k importance samples from the amortized q),
* :math:`\text{ELBO}_{\text{local}}`: the ELBO of a diagonal Gaussian fitted to each test
  digit on its own (the decoder fixed; started at the encoder's output, then Adam),
* :math:`\text{ELBO}_{\text{amortized}}`: the ELBO of the encoder's q,

so approximation gap (diagonal family) :math:`= \log \hat p(x) - \text{ELBO}_{\text{local}}`
and amortization gap :math:`= \text{ELBO}_{\text{local}} - \text{ELBO}_{\text{amortized}}`.
Both are in nats per digit, mean over the test set, then mean ± sd over seeds.

Run (about 3 minutes per seed and family)::

    python benchmarks/vae_gaps.py
    python benchmarks/vae_gaps.py --families diagonal --seeds 1 --epochs 30   # smoke test

Writes ``benchmarks/results/vae_gaps.{json,md}`` (``vae_gaps_train`` with
``--rows train``, the same split on the training digits: a larger amortization gap on
the test digits than on the training ones means the encoder overfits); a run with other
settings and no ``--out``, as the smoke test, writes ``vae_gaps_partial`` instead.

Reference:
    Cremer, Li, Duvenaud (2018). Inference Suboptimality in Variational Autoencoders. ICML.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))  # vae_digits
sys.path.insert(1, str(HERE.parent))  # the pyroflows of this working tree

import vae_digits  # noqa: E402
from _out import default_stem  # noqa: E402

from pyroflows.infer import iwae_log_likelihood  # noqa: E402

FAMILIES = {"diagonal": None, "iaf": "iaf", "nsf": "nsf"}


def amortized_elbo(vae: vae_digits.VAE, x: torch.Tensor, particles: int) -> torch.Tensor:
    """Per-digit ELBO of the encoder's q, shape ``(N,)``, from ``particles`` draws each."""
    total = torch.zeros(len(x))
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        for i in range(len(x)):  # one digit at a time: Trace_ELBO sums over the plate
            total[i] = -elbo.loss(vae.model, vae.guide, x[i : i + 1])
    return total


def _local_terms(vae, x, loc, log_scale, particles):
    """Per-digit single-sample ELBO terms, shape ``(particles, N)``."""
    eps = torch.randn(particles, *loc.shape)
    z = loc + log_scale.exp() * eps
    log_q = torch.distributions.Normal(loc, log_scale.exp()).log_prob(z).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = vae.decoder(z)
    log_lik = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    return log_lik + log_prior - log_q


def local_elbo(
    vae: vae_digits.VAE, x: torch.Tensor, steps: int, particles: int, eval_particles: int
) -> torch.Tensor:
    """Per-digit ELBO of a diagonal Gaussian fitted to each digit alone, shape ``(N,)``.

    Starts at the encoder's Gaussian (the base of a flow posterior, the whole of a
    diagonal one), then maximises the sum of the digits' ELBOs with Adam over the
    per-digit means and log-scales; the decoder is fixed.
    """
    with torch.no_grad():
        loc, scale, _ = vae.guide.posterior.encoder(x)
    loc = loc.clone().requires_grad_()
    log_scale = scale.log().clone().requires_grad_()
    for p in vae.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([loc, log_scale], lr=1e-2)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.1 ** (1 / steps))
    for _ in range(steps):
        loss = -_local_terms(vae, x, loc, log_scale, particles).mean(0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        chunks = [100] * (eval_particles // 100) + [eval_particles % 100] * bool(
            eval_particles % 100
        )
        terms = torch.cat([_local_terms(vae, x, loc, log_scale, n) for n in chunks])
    return terms.mean(0)


def run(family: str, seed: int, args: argparse.Namespace, data) -> dict[str, Any]:
    """Train one VAE, then split its test gap."""
    train_x, test_x = data
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = vae_digits.VAE(FAMILIES[family], transforms=args.transforms)
    start = time.perf_counter()
    vae_digits.train(vae, train_x, args.epochs, lr=args.lr)
    train_s = time.perf_counter() - start
    rows = test_x if args.rows == "test" else train_x
    torch.manual_seed(1000 + seed)
    log_px = iwae_log_likelihood(vae.model, vae.guide, rows, num_samples=args.k)
    amortized = amortized_elbo(vae, rows, args.particles)
    local = local_elbo(vae, rows, args.local_steps, 16, args.particles)
    row = {
        "family": family,
        "seed": seed,
        "rows": args.rows,
        "train_s": train_s,
        "iwae": log_px.mean().item(),
        "elbo_amortized": amortized.mean().item(),
        "elbo_local_diagonal": local.mean().item(),
    }
    row["gap_total"] = row["iwae"] - row["elbo_amortized"]
    row["gap_approximation_diagonal"] = row["iwae"] - row["elbo_local_diagonal"]
    row["gap_amortization_vs_local_diagonal"] = row["elbo_local_diagonal"] - row["elbo_amortized"]
    print(
        f"  seed {seed} {family:9s} IWAE {row['iwae']:.3f}  ELBO amortized "
        f"{row['elbo_amortized']:.3f}  local diagonal {row['elbo_local_diagonal']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def table(rows: list[dict[str, Any]], families: list[str]) -> str:
    """Markdown: per family, mean ± sd over seeds of each quantity."""
    keys = [
        ("iwae", "log p(x) (IWAE)"),
        ("elbo_amortized", "ELBO amortized q"),
        ("elbo_local_diagonal", "ELBO local diagonal"),
        ("gap_total", "total gap"),
        ("gap_approximation_diagonal", "approximation gap (diagonal)"),
        ("gap_amortization_vs_local_diagonal", "local diagonal - amortized"),
    ]
    lines = [
        "| trained with | " + " | ".join(label for _, label in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        cells = []
        for key, _ in keys:
            values = np.array([r[key] for r in mine])
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.3f} ± {sd:.3f}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--families", nargs="+", choices=list(FAMILIES), default=["diagonal", "iaf"]
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=vae_digits.EPOCHS)
    parser.add_argument("--lr", type=float, default=vae_digits.LR)
    parser.add_argument("--transforms", type=int, default=vae_digits.TRANSFORMS)
    parser.add_argument("--k", type=int, default=1000, help="IWAE importance samples")
    parser.add_argument("--particles", type=int, default=1000, help="draws per digit for its ELBO")
    parser.add_argument("--local-steps", type=int, default=2000, help="Adam steps, local q")
    parser.add_argument(
        "--rows",
        choices=["test", "train"],
        default="test",
        help="digits whose gap is split (train: does the encoder overfit?)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    for flag in ("seeds", "epochs", "transforms", "k", "particles", "local_steps", "threads"):
        if getattr(args, flag) < 1:
            name = flag.replace("_", "-")
            parser.error(f"--{name} must be at least 1, got {getattr(args, flag)}")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr must be a positive finite number, got {args.lr}")
    if args.out is None:
        suffix = "" if args.rows == "test" else "_train"
        protocol = ("families", "seeds", "epochs", "lr", "transforms", "k", "particles")
        stem = default_stem(parser, args, f"vae_gaps{suffix}", (*protocol, "local_steps"))
        args.out = HERE / "results" / f"{stem}.json"
    torch.set_num_threads(args.threads)
    data = vae_digits.digits()
    start = time.perf_counter()
    rows = [run(f, s, args, data) for s in range(args.seeds) for f in args.families]
    total = time.perf_counter() - start
    text = "\n".join(
        [
            "# Digits VAE: amortization and approximation gaps",
            "",
            f"Binarized 8x8 digits ({len(data[0])} train / {len(data[1])} test), latent "
            f"{vae_digits.LATENT}, {args.epochs} epochs as in `benchmarks/vae.py`, "
            f"{args.seeds} seed(s); gaps of the **{args.rows}** digits; IWAE k = {args.k}; "
            f"ELBOs from {args.particles} draws per digit; local diagonal q: "
            f"{args.local_steps} Adam steps (lr 0.01 -> 0.001, 16 draws per step) per "
            "digit, decoder fixed. Nats per digit, mean "
            f"± sd over seeds; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"total {total:.0f} s.",
            "",
            table(rows, args.families),
            "",
            "A flow posterior can close at most the approximation gap of the diagonal family "
            "(plus whatever its decoder gains in training); the rest of the total gap is "
            "the encoder's (amortization).",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
