"""Speed of pyroflows' MAF, IAF, RealNVP and NSF against Pyro's flows, zuko and nflows.

What is measured, for each event size ``D`` (default 8 and 32) and each flow, at one
architecture (default: 5 transforms, MADE/MLP conditioners with hidden sizes (64, 64),
ReLU, affine elementwise maps):

1. **Training step** (ms, median over repeats): build the distribution anew
   (``d = flow()``, as a user's loop does), ``loss = -d.log_prob(batch).mean()`` on a batch
   of 512 data points, ``loss.backward()``, one Adam step.
2. **Sampling throughput** (samples/s, from the median time): ``d.sample((N,))`` under
   ``torch.no_grad()``, with ``N = 4096`` by default.

The contenders, with the cost each form should have (one pass = one conditioner call):

==========  ===========================================  ==============  ==============
flow        library                                      score (train)   sample
==========  ===========================================  ==============  ==============
maf         ``pyroflows.maf``                            1 pass/layer    D passes/layer
maf         Pyro ``AffineAutoregressive`` used as        1 pass/layer    D passes/layer
            ``t.inv`` (MAF form)
maf         ``zuko.flows.MAF``, nflows MAF               1 pass/layer    D passes/layer
iaf         ``pyroflows.iaf``                            D passes/layer  1 pass/layer
iaf         Pyro ``AffineAutoregressive`` (IAF form)     D passes/layer  1 pass/layer
realnvp     ``pyroflows.realnvp``                        1 pass/layer    1 pass/layer
realnvp     Pyro ``affine_coupling`` + ``Permute``       1 pass/layer    1 pass/layer
realnvp     ``zuko.flows.RealNVP``, nflows coupling      1 pass/layer    1 pass/layer
==========  ===========================================  ==============  ==============

Pyro has no MAF class: its ``AffineAutoregressive`` computes ``y = mu(x) + sigma(x) * x``
with the network reading its *input* (``_call`` is one pass, ``_inverse`` loops over the
``D`` coordinates). In a ``TransformedDistribution`` the input is the base side, so that
is IAF; putting ``t.inv`` in the list instead makes ``log_prob`` call ``t`` on the data
(one pass) and ``sample`` call ``t._inverse`` (``D`` passes): the MAF form. zuko and
nflows define their flows from data to noise, so their MAF scores in one pass as well.

Architectures are matched: every autoregressive layer is a MADE ``D -> 64 -> 64 -> 2D``
whose variable order alternates natural / reversed between layers (our
``permutation="reverse"``, zuko's default; Pyro's ``AutoRegressiveNN`` is given those
orders explicitly; nflows gets a ``ReversePermutation`` between layers, which costs an
index only); every coupling layer is an MLP ``D/2 -> 64 -> 64 -> 2 * D/2`` with a reversal
(ours, Pyro) or alternating checkered masks (zuko, nflows) between layers. The table
prints parameter counts to show it. One exception: zuko has no spline *coupling* layer,
so its ``nsf`` is ``NSF(passes=2)``, a full-width MADE with two variable groups (more
parameters, and two passes to sample); its ``nsf`` ratios partly measure that bigger
network. Scale clamps differ by library and cannot all be
made equal: ours is ``3 * tanh(s / 3)``; Pyro is given a hard clip to ``[-3, 3]`` (its
default is ``[-5, 3]``) with gradients passed through; zuko uses its default soft bound
``s / (1 + |s| / log(1e3))``; nflows uses ``softplus(s) + 1e-3`` (MAF) and
``sigmoid(s + 2) + 1e-3`` (coupling) and offers no option. These maps are elementwise
but not free (a smooth clamp and its backward cost more than a clip), and that difference is
part of what the ratios measure.

Fairness details:

* The contenders run round-robin inside each repeat (the starting one rotates), so slow
  spells of the machine hit all of them alike; warm-up steps come first.
* The training data are seeded standard normal draws: a pool of 8 batches, cycled. Each
  step indexes the pool anew, so every step sees a *new tensor object*: Pyro's and our
  transforms cache the last ``(input, output)`` pair by identity, and re-scoring the very
  same tensor would otherwise hit a stale cache (Pyro) or skip work.
* ``torch.set_num_threads`` defaults to 1 so the numbers are less noisy on small machines.
* Before timing, the script counts network passes per layer for one ``log_prob`` and one
  ``sample`` of every contender (calls of its linear layers) and prints whether each form
  costs what the table above says, so a mis-built contender cannot go unnoticed.
* ``--dtype float64`` also sets torch's default dtype, as Pyro users do (Pyro's
  autoregressive inverse allocates with the default dtype).

Run (from the repository root)::

    python benchmarks/speed.py                 # full run, D = 8 and 32: 10-17 min
    python benchmarks/speed.py --quick         # smoke test (speed_quick.json), about a minute
    python benchmarks/speed.py --dims 16 --threads 2 --device cuda --out /tmp/speed.json

zuko and nflows are the optional ``bench`` extra (``pip install -e .[bench]``); if they do
not import, their rows say so and the rest runs. Ratios are the figures to quote:
``ratio vs pyro`` is Pyro's time / this contender's time, taken within each round-robin
round and then the median over rounds (for sampling that equals this throughput / Pyro's
throughput), so above 1 means faster than Pyro's equivalent flow. Pairing by round keeps
the ratio steady when other processes slow the machine down for a while, which moves the
millisecond columns; the JSON also keeps the ratio of the medians and the quartiles.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import nn

import pyroflows

FLOWS = ("maf", "iaf", "realnvp", "nsf", "nsf_maf", "nsf_iaf")
BINS = 8  # spline bins, all libraries
BOUND = 5.0  # spline interval [-B, B], all libraries
LIBRARIES = ("pyroflows", "pyro", "zuko", "nflows")
POOL = 8  # distinct training batches, cycled


@dataclass
class Contender:
    """One flow of one library, ready to train and sample.

    Attributes:
        flow: ``"maf"``, ``"iaf"``, ``"realnvp"``, or a spline flow: ``"nsf"`` (coupling),
            ``"nsf_maf"`` / ``"nsf_iaf"`` (autoregressive, scoring / sampling in one pass).
        library: who implements it.
        module: the module holding every parameter.
        make: builds the distribution (anything with ``log_prob``), once per step.
        sample: ``sample(n)`` draws ``n`` points (called under ``torch.no_grad``).
        note: how it was built, for the JSON.
    """

    flow: str
    library: str
    module: nn.Module
    make: Callable[[], Any]
    sample: Callable[[int], torch.Tensor]
    note: str = ""
    optimizer: torch.optim.Optimizer | None = None
    train_s: dict[int, float] = field(default_factory=dict)  # repeat index -> seconds
    sample_s: dict[int, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def params(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- ours


def _ours(flow: str, dim: int, transforms: int, hidden: tuple[int, ...], clamp: float) -> Contender:
    if flow.startswith("nsf"):
        autoregressive = {"nsf": False, "nsf_maf": "maf", "nsf_iaf": "iaf"}[flow]
        model = pyroflows.nsf(
            dim,
            transforms=transforms,
            bins=BINS,
            bound=BOUND,
            hidden=hidden,
            autoregressive=autoregressive,
        )
        note = (
            f"pyroflows.nsf(D, transforms, bins={BINS}, bound={BOUND}, hidden, "
            f"autoregressive={autoregressive!r}); reversed orders / Permutation between layers"
        )
    else:
        builder = {"maf": pyroflows.maf, "iaf": pyroflows.iaf, "realnvp": pyroflows.realnvp}[flow]
        model = builder(dim, transforms=transforms, hidden=hidden, clamp=clamp)
        note = (
            f"pyroflows.{flow}(D, transforms, hidden, clamp={clamp}): log-scale "
            f"{clamp} * tanh(s / {clamp}); reversed orders / Permutation between layers"
        )
    return Contender(
        flow, "pyroflows", model, make=model, sample=lambda n: model().sample((n,)), note=note
    )


# --------------------------------------------------------------------------- Pyro


class PyroFlow(nn.Module):
    """A stack of Pyro transforms on a standard normal base, as a Pyro user writes it.

    Args:
        dim: event size.
        layers: Pyro transforms, base side first (modules or plain transforms).
        invert: put ``t.inv`` in the distribution instead of ``t`` (the MAF form of an
            autoregressive layer).
    """

    def __init__(self, dim: int, layers: list[Any], invert: bool = False) -> None:
        super().__init__()
        self.modules_ = nn.ModuleList(t for t in layers if isinstance(t, nn.Module))
        self.layers = layers
        self.invert = invert
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self) -> dist.TransformedDistribution:
        """Return a fresh ``TransformedDistribution``."""
        base = dist.Normal(self.loc, self.scale).to_event(1)
        layers = [t.inv for t in self.layers] if self.invert else list(self.layers)
        return dist.TransformedDistribution(base, layers)


def _orders(dim: int, transforms: int) -> list[torch.Tensor]:
    natural = torch.arange(dim)
    return [natural if k % 2 == 0 else natural.flip(0) for k in range(transforms)]


def _pyro(
    flow: str, dim: int, transforms: int, hidden: tuple[int, ...], clamp: float, device
) -> Contender:
    clip = {"log_scale_min_clip": -clamp, "log_scale_max_clip": clamp}
    if flow in ("nsf_maf", "nsf_iaf"):
        layers = [
            T.SplineAutoregressive(
                dim,
                AutoRegressiveNN(
                    dim, list(hidden), param_dims=[BINS, BINS, BINS - 1], permutation=order
                ),
                count_bins=BINS,
                bound=BOUND,
                order="quadratic",
            )
            for order in _orders(dim, transforms)
        ]
        model = PyroFlow(dim, layers, invert=flow == "nsf_maf")
        form = "t.inv of each layer (MAF form)" if flow == "nsf_maf" else "t as is (IAF form)"
        note = (
            f"pyro SplineAutoregressive(D, AutoRegressiveNN(D, {list(hidden)}, "
            f"param_dims=[K, K, K-1]), count_bins={BINS}, bound={BOUND}, order='quadratic'), "
            f"{form}"
        )
    elif flow == "nsf":
        layers = []
        reverse = torch.arange(dim - 1, -1, -1, device=device)
        split = dim // 2
        rest = dim - split
        for k in range(transforms):
            if k:
                layers.append(T.Permute(reverse))
            net = DenseNN(
                split, list(hidden), param_dims=[rest * BINS, rest * BINS, rest * (BINS - 1)]
            )
            layers.append(
                T.SplineCoupling(
                    dim, split, net, count_bins=BINS, bound=BOUND, order="quadratic", identity=True
                )
            )
        model = PyroFlow(dim, layers)
        note = (
            f"pyro SplineCoupling(D, D // 2, DenseNN(hidden={list(hidden)}), count_bins={BINS}, "
            f"bound={BOUND}, order='quadratic', identity=True) with Permute(reversed) between"
        )
    elif flow in ("maf", "iaf"):
        layers = [
            T.AffineAutoregressive(AutoRegressiveNN(dim, list(hidden), permutation=order), **clip)
            for order in _orders(dim, transforms)
        ]
        model = PyroFlow(dim, layers, invert=flow == "maf")
        form = "t.inv of each layer (MAF form)" if flow == "maf" else "t as is (IAF form)"
        note = (
            f"pyro AffineAutoregressive(AutoRegressiveNN(D, {list(hidden)}, "
            f"permutation=natural/reversed alternating)), {form}; hard clip [-{clamp}, {clamp}]"
        )
    else:
        layers = []
        reverse = torch.arange(dim - 1, -1, -1, device=device)
        for k in range(transforms):
            if k:
                layers.append(T.Permute(reverse))
            layers.append(T.affine_coupling(dim, hidden_dims=list(hidden), **clip))
        model = PyroFlow(dim, layers)
        note = (
            f"pyro affine_coupling(D, hidden_dims={list(hidden)}) with Permute(reversed) "
            f"between layers; hard clip [-{clamp}, {clamp}]"
        )
    return Contender(flow, "pyro", model, model, lambda n: model().sample((n,)), note)


# --------------------------------------------------------------------------- peers


def _zuko(flow: str, dim: int, transforms: int, hidden: tuple[int, ...]) -> Contender:
    import zuko

    if flow in ("nsf", "nsf_maf"):
        passes = 2 if flow == "nsf" else None  # 2: coupling; None: fully autoregressive
        model = zuko.flows.NSF(
            dim, transforms=transforms, bins=BINS, hidden_features=hidden, passes=passes
        )
        # zuko's spline bound is 5 by default, the BOUND used by the others
        note = f"zuko.flows.NSF(D, transforms, bins={BINS}, hidden_features, passes={passes})"
    elif flow == "maf":
        model = zuko.flows.MAF(dim, transforms=transforms, hidden_features=hidden)
        note = "zuko.flows.MAF(D, transforms, hidden_features); alternating orders"
    elif flow == "realnvp":
        model = zuko.flows.RealNVP(dim, transforms=transforms, hidden_features=hidden)
        note = "zuko.flows.RealNVP(D, transforms, hidden_features); alternating checkered masks"
    else:
        raise NotImplementedError("zuko has no IAF built in")  # nsf_iaf included
    return Contender(flow, "zuko", model, model, lambda n: model().sample((n,)), note)


def _nflows(flow: str, dim: int, transforms: int, hidden: tuple[int, ...]) -> Contender:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import MLP
    from nflows.transforms.autoregressive import (
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
    )
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import (
        AffineCouplingTransform,
        PiecewiseRationalQuadraticCouplingTransform,
    )
    from nflows.transforms.permutations import ReversePermutation

    if len(set(hidden)) != 1:
        raise ValueError(f"nflows' MADE needs equal hidden sizes, got {hidden}")
    layers: list[nn.Module] = []
    if flow in ("maf", "nsf_maf"):
        made = {"features": dim, "hidden_features": hidden[0], "num_blocks": len(hidden) - 1}
        for k in range(transforms):
            if k:
                layers.append(ReversePermutation(dim))
            if flow == "nsf_maf":
                layers.append(
                    MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                        **made,
                        num_bins=BINS,
                        tails="linear",
                        tail_bound=BOUND,
                        use_residual_blocks=False,
                    )
                )
            else:
                layers.append(
                    MaskedAffineAutoregressiveTransform(**made, use_residual_blocks=False)
                )
        kind = (
            f"MaskedPiecewiseRationalQuadraticAutoregressiveTransform (bins={BINS})"
            if flow == "nsf_maf"
            else "MaskedAffineAutoregressiveTransform (plain MADE)"
        )
        note = f"nflows {kind} + ReversePermutation"
    elif flow in ("realnvp", "nsf"):

        class _Net(MLP):
            """nflows' MLP, taking (and ignoring) the context its couplings pass."""

            def forward(self, inputs: torch.Tensor, context: Any = None) -> torch.Tensor:
                """Apply the MLP."""
                return super().forward(inputs)

        def net(features_in: int, features_out: int) -> nn.Module:
            return _Net([features_in], [features_out], hidden_sizes=list(hidden))

        for k in range(transforms):
            mask = torch.ones(dim)
            mask[k % 2 :: 2] = -1
            if flow == "nsf":
                layers.append(
                    PiecewiseRationalQuadraticCouplingTransform(
                        mask, net, num_bins=BINS, tails="linear", tail_bound=BOUND
                    )
                )
            else:
                layers.append(AffineCouplingTransform(mask, net))
        kind = "PiecewiseRationalQuadraticCoupling" if flow == "nsf" else "AffineCoupling"
        note = f"nflows {kind}Transform with MLP, alternating checkered masks"
    else:
        raise NotImplementedError("nflows has no IAF built in")
    model = Flow(CompositeTransform(layers), StandardNormal([dim]))
    return Contender(flow, "nflows", model, lambda: model, lambda n: model.sample(n), note)


def _peer_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("zuko", "nflows"):
        try:
            __import__(name)
            found[name] = importlib.metadata.version(name)
        except Exception:  # any failure to import means "not available"
            found[name] = None
    return found


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _train_step(c: Contender, batch: torch.Tensor) -> torch.Tensor:
    d = c.make()
    loss = -d.log_prob(batch).mean()
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    c.optimizer.step()
    return loss.detach()


def _sample_once(c: Contender, n: int) -> torch.Tensor:
    with torch.no_grad():
        return c.sample(n)


def _passes(c: Contender, batch: torch.Tensor, n: int) -> tuple[float, float] | None:
    """Network passes per layer for one ``log_prob`` and one ``sample``: a check of the form.

    Counts calls of every linear layer (masked ones included) and divides by their number,
    so a MADE or MLP called once per layer gives 1, and ``D`` times gives ``D``.
    """
    linears = [
        m
        for m in c.module.modules()
        if isinstance(m, nn.Linear) or type(m).__name__.endswith("Linear")  # zuko.nn.Linear
    ]
    if not linears:
        return None
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            c.make().log_prob(batch)
            score, calls[0] = calls[0], 0
            c.sample(n)
            sample = calls[0]
    finally:
        for h in handles:
            h.remove()
    return score / len(linears), sample / len(linears)


def _round_robin(
    contenders, repeats: int, warmup: int, run, record, sync, label: str, budget: float
):
    """Run ``run(c, i)`` for every live contender, repeat by repeat, rotating the start.

    A contender whose warm-up call took ``t`` seconds gets ``budget / t`` timed repeats
    (at least 5, at most ``repeats``), so a D-pass sampler does not hold the run up for
    an hour; the paired ratios use the rounds that both sides ran.
    """
    live = [c for c in contenders if c.error is None]
    cap = {id(c): repeats for c in live}
    for i in range(warmup + repeats):
        shift = i % max(len(live), 1)
        for c in live[shift:] + live[:shift]:
            if c.error is not None or i - warmup >= cap[id(c)]:
                continue
            try:
                sync()
                start = time.perf_counter()
                out = run(c, i)
                sync()
                elapsed = time.perf_counter() - start
                if not bool(torch.isfinite(out).all()):
                    raise FloatingPointError(f"non-finite output during {label}")
            except Exception as exc:  # a failing peer must not stop the run
                c.error = f"{label}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                continue
            if i >= warmup:
                record(c)[i - warmup] = elapsed
            elif i == warmup - 1:
                cap[id(c)] = int(min(repeats, max(5, budget / max(elapsed, 1e-9))))


def _build(flow, library, dim, args, device, dtype) -> Contender:
    hidden = tuple(args.hidden)
    try:
        torch.manual_seed(0)
        if library == "pyroflows":
            c = _ours(flow, dim, args.transforms, hidden, args.clamp)
        elif library == "pyro":
            c = _pyro(flow, dim, args.transforms, hidden, args.clamp, device)
        elif library == "zuko":
            c = _zuko(flow, dim, args.transforms, hidden)
        else:
            c = _nflows(flow, dim, args.transforms, hidden)
        c.module.to(device=device, dtype=dtype)
        c.optimizer = torch.optim.Adam(c.module.parameters(), lr=1e-3)
    except Exception as exc:  # report and go on
        c = Contender(flow, library, nn.Module(), lambda: None, lambda n: torch.empty(0))
        c.error = f"build: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    return c


def run_dim(dim: int, args, device, dtype, peers) -> list[dict[str, Any]]:
    entries: list[Contender | tuple[str, str]] = []  # a contender, or (flow, library) skipped
    for flow in args.flows:
        for library in args.libraries:
            if library in ("zuko", "nflows") and flow in ("iaf", "nsf_iaf"):
                continue  # neither ships an IAF
            if peers.get(library, "") is None:
                entries.append((flow, library))
            else:
                entries.append(_build(flow, library, dim, args, device, dtype))
    contenders = [e for e in entries if isinstance(e, Contender)]

    g = torch.Generator().manual_seed(1234 + dim)
    data = torch.randn(POOL, args.batch, dim, generator=g).to(device=device, dtype=dtype)
    sync = _sync(device)
    passes = {}
    for c in contenders:
        try:
            passes[id(c)] = (
                _passes(c, data[0].clone(), min(args.samples, 64)) if not c.error else None
            )
        except Exception as exc:  # the timed runs will report it
            passes[id(c)] = None
            print(f"  pass count failed for {c.library} {c.flow}: {exc}", file=sys.stderr)

    start = time.perf_counter()
    _round_robin(
        contenders,
        args.repeats,
        args.warmup,
        lambda c, i: _train_step(c, data[i % POOL]),  # a new view (tensor object) each step
        lambda c: c.train_s,
        sync,
        "train",
        args.budget,
    )
    t_train = time.perf_counter() - start
    start = time.perf_counter()
    _round_robin(
        contenders,
        args.sample_repeats,
        1,
        lambda c, i: _sample_once(c, args.samples),
        lambda c: c.sample_s,
        sync,
        "sample",
        args.budget,
    )
    t_sample = time.perf_counter() - start
    print(
        f"  D={dim}: training {t_train:.0f} s, sampling {t_sample:.0f} s",
        file=sys.stderr,
        flush=True,
    )

    rows, row_of = [], {}
    for e in entries:
        if isinstance(e, Contender):
            rows.append(_row(dim, e.flow, e.library, e, e.error, args.samples))
            row_of[id(e)] = rows[-1]
            counted = passes.get(id(e))
            rows[-1]["score_passes_per_layer"] = counted[0] if counted else None
            rows[-1]["sample_passes_per_layer"] = counted[1] if counted else None
        else:
            rows.append(_row(dim, *e, None, "not installed"))
    for base in (c for c in contenders if c.library == "pyro"):
        ref = row_of[id(base)]
        for c in (c for c in contenders if c.flow == base.flow):
            r = row_of[id(c)]
            if r["train_ms"] and ref["train_ms"]:
                r["train_ratio_vs_pyro"] = ref["train_ms"] / r["train_ms"]
                r["train_ratio_vs_pyro_paired"] = _paired(base.train_s, c.train_s)
            if r["samples_per_s"] and ref["samples_per_s"]:
                r["sample_ratio_vs_pyro"] = r["samples_per_s"] / ref["samples_per_s"]
                r["sample_ratio_vs_pyro_paired"] = _paired(base.sample_s, c.sample_s)
    return rows


def _paired(reference: dict[int, float], other: dict[int, float]) -> float | None:
    """Median over repeats of ``reference / other`` timed in the same round."""
    common = reference.keys() & other.keys()
    return statistics.median(reference[i] / other[i] for i in common) if common else None


def _quantiles(times: dict[int, float]) -> dict[str, float] | None:
    if not times:
        return None
    values = list(times.values())
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"p25": q[0], "median": statistics.median(values), "p75": q[2]}


def _row(dim, flow, library, c: Contender | None, error: str | None, n: int = 0) -> dict:
    train = _quantiles(c.train_s) if c else None
    sample = _quantiles(c.sample_s) if c else None
    built = c is not None and not (error or "").startswith("build")
    return {
        "dim": dim,
        "flow": flow,
        "library": library,
        "params": c.params if built else None,
        "train_ms": 1e3 * train["median"] if train else None,
        "train_ms_p25": 1e3 * train["p25"] if train else None,
        "train_ms_p75": 1e3 * train["p75"] if train else None,
        "train_ratio_vs_pyro": None,
        "train_ratio_vs_pyro_paired": None,
        "samples_per_s": n / sample["median"] if sample else None,
        "sample_s_median": sample["median"] if sample else None,
        "sample_ratio_vs_pyro": None,
        "sample_ratio_vs_pyro_paired": None,
        "score_passes_per_layer": None,
        "sample_passes_per_layer": None,
        "train_repeats": len(c.train_s) if c else 0,
        "sample_repeats": len(c.sample_s) if c else 0,
        "note": c.note if c else "",
        "error": error,
    }


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "D",
        "flow",
        "library",
        "params",
        "train step ms",
        "ratio vs pyro",
        "samples/s",
        "ratio vs pyro",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["error"]:
            cells = [str(r["dim"]), r["flow"], r["library"], _fmt(r["params"], ",")]
            cells += [r["error"] if r["error"] == "not installed" else "error", "-", "-", "-"]
            if r["train_ms"] is not None:  # it trained, then failed to sample
                cells[4] = _fmt(r["train_ms"], ".2f")
                cells[5] = _fmt(r["train_ratio_vs_pyro_paired"], ".2f")
                cells[6] = "error"
        else:
            cells = [
                str(r["dim"]),
                r["flow"],
                r["library"],
                _fmt(r["params"], ","),
                _fmt(r["train_ms"], ".2f"),
                _fmt(r["train_ratio_vs_pyro_paired"], ".2f"),
                _fmt(r["samples_per_s"], ",.0f"),
                _fmt(r["sample_ratio_vs_pyro_paired"], ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step time and sampling throughput: pyroflows vs Pyro, zuko, nflows.",
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 32], help="event sizes D")
    parser.add_argument("--transforms", type=int, default=5, help="layers per flow")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden sizes")
    parser.add_argument("--batch", type=int, default=512, help="training batch size")
    parser.add_argument("--samples", type=int, default=4096, help="N in d.sample((N,))")
    parser.add_argument("--repeats", type=int, default=None, help="timed training steps")
    parser.add_argument(
        "--sample-repeats", type=int, default=None, help="timed sample calls (default: derived)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timed calls per contender and phase (caps the repeats of slow ones)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--clamp", type=float, default=3.0, help="log-scale bound (ours, Pyro)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    parser.add_argument(
        "--libraries",
        nargs="+",
        choices=LIBRARIES,
        default=list(LIBRARIES),
        help="contenders to run (ratios need pyro among them)",
    )
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/speed.json, speed_quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    given = argparse.Namespace(**vars(args))  # the flags as given, before derived defaults
    if args.repeats is None:
        args.repeats = 3 if args.quick else 200
    if args.sample_repeats is None:
        args.sample_repeats = 2 if args.quick else max(3, args.repeats // 2)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.quick:
        args.samples = min(args.samples, 1024)
    for name in ("transforms", "batch", "samples", "repeats", "sample_repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.dims) < 1:
        parser.error(f"--dims must be >= 1 each, got {args.dims}")
    if min(args.hidden) < 1:
        parser.error(f"--hidden must be >= 1 each, got {args.hidden}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("budget", "clamp"):
        if not 0 < getattr(args, name) < float("inf"):
            parser.error(f"--{name} must be a positive finite number, got {getattr(args, name)}")
    if args.out is None:  # a smoke test never replaces the results of a full run
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _out import results_path

        args.out = results_path(parser, given, "speed", ".json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda was asked for, but torch.cuda.is_available() is False", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    torch.set_default_dtype(dtype)
    torch.set_num_threads(args.threads)
    peers = _peer_versions()

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyroflows": pyroflows.__version__,
        "zuko": peers["zuko"],
        "nflows": peers["nflows"],
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "dims": args.dims,
        "transforms": args.transforms,
        "hidden": args.hidden,
        "batch": args.batch,
        "samples": args.samples,
        "repeats": args.repeats,
        "sample_repeats": args.sample_repeats,
        "warmup": args.warmup,
        "clamp": args.clamp,
        "budget_s": args.budget,
        "quick": args.quick,
    }
    print(
        f"torch {meta['torch']}, pyro {meta['pyro']}, pyroflows {meta['pyroflows']}, "
        f"zuko {peers['zuko'] or 'not installed'}, nflows {peers['nflows'] or 'not installed'}; "
        f"{meta['threads']} thread(s), {device}, {args.dtype}",
        file=sys.stderr,
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for dim in args.dims:
        rows.extend(run_dim(dim, args, device, dtype, peers))

    print(
        f"# Flow speed: {args.transforms} transforms, hidden {tuple(args.hidden)}, "
        f"batch {args.batch}, {args.samples} samples per draw\n"
    )
    print(
        f"torch {meta['torch']}, pyro {meta['pyro']}, pyroflows {meta['pyroflows']}, "
        f"zuko {peers['zuko'] or 'not installed'}, nflows {peers['nflows'] or 'not installed'}; "
        f"device {device}, {args.dtype}, {meta['threads']} thread(s); medians of up to "
        f"{args.repeats} training steps and {args.sample_repeats} sample calls "
        f"(round-robin, after warm-up; slow contenders capped at --budget {args.budget:g} s "
        f"per phase); {meta['date']}\n"
    )
    print(table(rows))
    print(
        "\nratio vs pyro: Pyro's time / this time, per round (both timed in the same "
        "round-robin pass), median over rounds; for sampling that is this samples/s / Pyro's. "
        "> 1 means faster than Pyro's flow of the same kind. The JSON also holds the ratio of "
        "the medians (`*_ratio_vs_pyro`) and the quartiles."
    )
    busy = [r for r in rows if r["train_ms_p25"] and r["train_ms_p75"] > 1.5 * r["train_ms_p25"]]
    if busy:
        print(
            f"warning: {len(busy)} of {len(rows)} rows have a training-time p75 over 1.5 x its "
            "p25: the machine was busy and the ms columns are noisy; the paired ratios are "
            "the figures to quote."
        )
    expected = {
        "maf": lambda d: (1, d),
        "iaf": lambda d: (d, 1),
        "realnvp": lambda d: (1, 1),
        "nsf": lambda d: (1, 1),
        "nsf_maf": lambda d: (1, d),
        "nsf_iaf": lambda d: (d, 1),
    }
    odd = [
        f"D={r['dim']} {r['flow']} {r['library']}: {r['score_passes_per_layer']}/"
        f"{r['sample_passes_per_layer']}"
        for r in rows
        if r["score_passes_per_layer"] is not None
        and (r["score_passes_per_layer"], r["sample_passes_per_layer"])
        != expected[r["flow"]](r["dim"])
    ]
    print(
        "network passes per layer (score / sample), counted on linear-layer calls: "
        + ("as expected for every flow (maf 1 / D, iaf D / 1, coupling 1 / 1)" if not odd else "")
        + "; ".join(odd)
    )
    errors = [r for r in rows if r["error"] and r["error"] != "not installed"]
    for r in errors:
        print(f"- D={r['dim']} {r['flow']} {r['library']}: {r['error']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
