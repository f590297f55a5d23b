"""Packing a conditioner's weights into one tensor: when it pays, and when it costs.

Every pyroflows conditioner of at most :data:`pyroflows.nn.packed.PACK_LIMIT` parameters
holds its weights and biases in one parameter ``flat``: Adam then steps one tensor per
network instead of two per layer. The price is ``split``'s backward, a ``cat`` that
copies the network's whole gradient each step. This script times one training step
(``rsample`` of ``--draws`` points, ``sum().backward()``, torch's Adam) of an
``iaf(D, hidden=(h, h))`` flow built packed and unpacked, round-robin in each repeat,
for a range of sizes, on one thread, and prints the ratio packed / unpacked:
below 1, packing pays.

Run: ``python benchmarks/packing.py`` (about a minute); the table of a run is in
``benchmarks/results/packing.md``. ``--device cuda`` times the steps on a GPU (each step
ends with a synchronisation), ``--out FILE.md`` writes the table with a line saying where
and how it was made.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pyroflows.flows import iaf

#: (D, hidden width): networks of about 7k, 115k, 259k, 460k, 1.8M and 7.3M parameters
#: (the limit, 2**17, lies between the second and the third)
SIZES = ((16, 64), (64, 256), (96, 384), (128, 512), (256, 1024), (512, 2048))


def build(dim: int, width: int, packed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    flow = iaf(dim, hidden=(width, width))
    for layer in flow.transforms:
        net = getattr(layer, "conditioner", None)
        if net is not None and hasattr(net, "pack"):
            net.pack() if packed else net.unpack()
    return flow


def step_ms(
    flow: torch.nn.Module, optimizer: torch.optim.Optimizer, draws: int, device: torch.device
) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    loss = flow().rsample((draws,)).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = parser.parse_args()
    if min(args.draws) < 1 or args.repeats < 1:
        parser.error("--draws and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.out is not None and args.out.parent.is_file():
        parser.error(f"--out: {args.out.parent} is a file, not a folder")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, one torch thread"
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`python benchmarks/packing.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"on {where}, torch {torch.__version__}, {stamp}; median of {args.repeats} steps.",
        "",
        "| D | hidden | params a network | draws | packed ms | unpacked ms | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    print(*lines, sep="\n", flush=True)
    for dim, width in SIZES:
        for draws in args.draws:
            flows = {
                kind: build(dim, width, kind == "packed").to(device)
                for kind in ("packed", "unpacked")
            }
            optimizers = {k: torch.optim.Adam(f.parameters(), lr=1e-4) for k, f in flows.items()}
            times: dict[str, list[float]] = {k: [] for k in flows}
            for repeat in range(args.repeats + 3):  # three warm-up steps each
                order = list(flows) if repeat % 2 == 0 else list(flows)[::-1]
                for kind in order:
                    elapsed = step_ms(flows[kind], optimizers[kind], draws, device)
                    if repeat >= 3:
                        times[kind].append(elapsed)
            packed, unpacked = (statistics.median(times[k]) for k in ("packed", "unpacked"))
            layer = flows["unpacked"].transforms[0].conditioner
            size = sum(p.numel() for p in layer.parameters())
            lines.append(
                f"| {dim} | {width} | {size:,} | {draws} | {packed:.2f} | {unpacked:.2f} | "
                f"{packed / unpacked:.2f} |"
            )
            print(lines[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
