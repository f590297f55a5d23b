"""Scale out: data-parallel fits under torchrun (gloo, 2 CPU processes) and data that is
memory-mapped and streamed, never loaded whole (checked under a memory cap)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest

FIT = ["--flow", "maf", "--transforms", "2", "--hidden", "16", "--epochs", "15", "--quiet"]
FIT += ["--patience", "100", "--batch-size", "128", "--checkpoint-every", "5"]


LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def pyroflows(*args, cwd, processes: int = 1) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "pyroflows", *map(str, args)]
    else:
        command = [*LAUNCHER, f"--nproc_per_node={processes}", "-m", "pyroflows"]
        command += list(map(str, args))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def torchrun(script, cwd) -> subprocess.CompletedProcess:
    """``script`` run by two gloo processes under torchrun."""
    command = [*LAUNCHER, "--nproc_per_node=2", str(script)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def mean_log_prob(model: str, data: str, cwd) -> float:
    result = pyroflows("score", model, data, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return float(np.loadtxt(result.stdout.splitlines()).mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)

    def draw(n):
        centre = rng.choice([-1.5, 1.5], size=(n, 1))
        return centre + 0.5 * rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5]

    np.save(path / "train.npy", draw(3000))
    np.save(path / "test.npy", draw(3000))
    return path


def test_two_processes_fit_as_well_as_one_and_write_one_model(data):
    single = []
    for seed in range(3):
        result = pyroflows("fit", "train.npy", "--out", f"one{seed}.pt", *FIT, "--seed", seed,
                           cwd=data)  # fmt: skip
        assert result.returncode == 0, result.stderr
        single.append(mean_log_prob(f"one{seed}.pt", "test.npy", data))
    result = pyroflows("fit", "train.npy", "--out", "two.pt", *FIT, "--seed", 0, cwd=data,
                       processes=2)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote two.pt") == 1  # rank 0 alone reports and writes
    two = mean_log_prob("two.pt", "test.npy", data)
    spread = max(statistics.stdev(single), 0.01)
    assert abs(two - statistics.fmean(single)) < 3 * spread, (two, single)
    written = sorted(p.name for p in data.iterdir() if p.name.startswith("two"))
    assert written == ["two.pt"]  # and the finished fit's checkpoint is gone


def test_two_processes_follow_one_whatever_the_batch_and_row_counts(tmp_path):
    # the global batch was 2 * ceil(batch / 2) rows, an odd row count left a row out of
    # every epoch, and each process added the same dequantization noise to its share:
    # the fits differed by 1.2 to 6 nats a row from a one-process fit with the same seed
    rng = np.random.default_rng(1)
    counts = np.round(3 * rng.normal(size=(801, 2)) + [0.0, 4.0])  # 801 = 8 * 101 - 7
    np.save(tmp_path / "counts.npy", counts)
    fit = ["fit", "counts.npy", "--flow", "maf", "--transforms", "2", "--hidden", "16"]
    fit += ["--epochs", "2", "--batch-size", "101", "--validation", "0", "--dequantize"]
    fit += ["--seed", "3", "--quiet"]  # the last batch of each epoch: 94 rows
    for processes in (1, 2):
        out = f"p{processes}.pt"
        result = pyroflows(*fit, "--out", out, cwd=tmp_path, processes=processes)
        assert result.returncode == 0, result.stderr
    scores = []
    for processes in (1, 2):
        result = pyroflows("score", f"p{processes}.pt", "counts.npy", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        scores.append(np.loadtxt(result.stdout.splitlines()))
    assert np.abs(scores[0] - scores[1]).max() < 1e-3


def test_a_last_batch_of_fewer_rows_than_processes_is_shared(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(201, 2)))
    fit = ["fit", "x.npy", "--flow", "maf", "--transforms", "2", "--hidden", "8", "--quiet"]
    fit += ["--epochs", "2", "--batch-size", "50", "--validation", "0", "--seed", "0"]
    scores = []
    for processes in (1, 2):  # the fifth batch of each epoch is one row: one process idles
        result = pyroflows(*fit, "--out", f"q{processes}.pt", cwd=tmp_path, processes=processes)
        assert result.returncode == 0, result.stderr
        result = pyroflows("score", f"q{processes}.pt", "x.npy", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        scores.append(np.loadtxt(result.stdout.splitlines()))
    assert np.abs(scores[0] - scores[1]).max() < 1e-4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_the_command_line_tears_down_its_process_group_before_exit(data):
    # A process group left alive at exit keeps gloo's worker threads, which can free a
    # finished collective's tensors while Python shuts down: an abort in about one run
    # in ten. Deterministic witness: no gloo thread is left once main() returns.
    script = data / "threads.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from pyroflows.density.cli import main

            code = main(["fit", "train.npy", "--out", "threads.pt", "--force", *{FIT!r},
                         "--epochs", "2"])
            tasks = os.listdir("/proc/self/task")
            names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in tasks]
            with open(f"threads{{os.environ['RANK']}}.txt", "w") as report:
                report.write(f"exit {{code}} gloo threads {{sum('gloo' in n for n in names)}}")
            """
        )
    )
    result = torchrun(script, cwd=data)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert (data / f"threads{rank}.txt").read_text() == "exit 0 gloo threads 0"


def test_a_memory_mapped_file_larger_than_the_cap_is_streamed(tmp_path):
    rows, columns = 1_600_000, 64  # 820 MB of float64
    array = np.lib.format.open_memmap(
        tmp_path / "big.npy", mode="w+", dtype=np.float64, shape=(rows, columns)
    )
    rng = np.random.default_rng(1)
    for start in range(0, rows, 100_000):
        array[start : start + 100_000] = rng.normal(size=(100_000, columns))
    array.flush()
    del array
    script = textwrap.dedent(
        f"""
        import resource
        import numpy as np
        import pyroflows
        from pyroflows.density import fit, read_table

        data, _ = read_table({str(tmp_path / "big.npy")!r})
        status = open("/proc/self/status").read().split("\\n")
        used = int(next(s for s in status if s.startswith("VmData")).split()[1]) * 1024
        # 300 MB more than now, about a third of the file (torch's threads and their
        # allocator arenas take some 200 MB whatever the data's size)
        cap = used + 300 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        flow = pyroflows.maf({columns}, transforms=1, hidden=(8,))
        history = fit(flow, data, epochs=1, batch_size=16384, validation=0.01, seed=0,
                      progress=False)
        print("fitted", history.epochs, round(history.val_nll[0], 2))
        try:
            np.array(data)
            print("loaded whole")
        except MemoryError:
            print("loading it whole is refused")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fitted 1")
    assert abs(float(lines[0].split()[2]) - 64 * 1.4189) < 1.0  # N(0, I_64): 90.81 nats
    assert lines[1] == "loading it whole is refused"


def test_processes_given_other_fits_are_refused_and_distributed_false_fits_each_alone(tmp_path):
    # Under torchrun each process takes its share of every batch of its own rows and the
    # gradients are averaged: two processes holding different rows mixed two fits into
    # one, silently. They are now refused on every rank (none left waiting), by name.
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os
            import numpy as np, torch
            import torch.distributed as dist
            import pyroflows
            from pyroflows.density import FlowDensity, fit

            import torch._dynamo  # before the group: see pyroflows.density.distributed.setup
            rank = int(os.environ["RANK"])
            dist.init_process_group("gloo")
            mine = np.random.default_rng(rank).normal(size=(200, 2)) * (1 + 3 * rank)
            same = np.random.default_rng(7).normal(size=(200, 2))
            report = {}
            torch.manual_seed(0)
            flow = pyroflows.maf(2, transforms=1, hidden=(8,))
            try:
                fit(flow, mine, epochs=2, seed=0, progress=False)
                report["refused"] = None
            except ValueError as error:
                report["refused"] = str(error)
            torch.manual_seed(0)
            flow = pyroflows.maf(2, transforms=1, hidden=(8,))
            alone = fit(flow, mine, epochs=3, seed=0, progress=False, distributed=False)
            report["alone"] = alone.val_nll
            est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=2).fit(same)
            report["estimator"] = est.history_.val_nll
            dist.destroy_process_group()
            with open(f"rank{rank}.json", "w") as out:
                json.dump(report, out)
            """
        )
    )
    result = torchrun(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import json

    import torch

    import pyroflows
    from pyroflows.density import fit

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["refused"] is not None
        assert "process(es) 1 passed others" in report["refused"]
        assert "distributed=False" in report["refused"]
    # distributed=False: each process fits its own rows as a process alone would
    for rank, report in enumerate(reports):
        mine = np.random.default_rng(rank).normal(size=(200, 2)) * (1 + 3 * rank)
        torch.manual_seed(0)
        flow = pyroflows.maf(2, transforms=1, hidden=(8,))
        alone = fit(flow, mine, epochs=3, seed=0, progress=False)
        np.testing.assert_allclose(report["alone"], alone.val_nll, rtol=1e-4)
    # FlowDensity with random_state=None: one seed (rank 0's) for both, so one split
    assert reports[0]["estimator"] == reports[1]["estimator"]


def test_two_processes_fit_a_conditional_flow_as_one_and_refuse_other_contexts(tmp_path):
    # each process takes its share of every batch's rows and of their contexts; an odd
    # batch (101 rows) and a validation split: the fit must be the one-process fit's
    script = tmp_path / "conditional.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            import numpy as np, torch
            import torch.distributed as dist
            import pyroflows
            from pyroflows.density import fit

            import torch._dynamo  # before the group: see pyroflows.density.distributed.setup
            rank = int(os.environ["RANK"]) if len(sys.argv) == 1 else 0
            rng = np.random.default_rng(0)
            c = rng.normal(size=(603, 2))
            x = np.c_[c[:, 0], c[:, 0] * c[:, 1]] + 0.3 * rng.normal(size=(603, 2))
            options = dict(epochs=3, batch_size=101, seed=0, progress=False)
            report = {}
            if len(sys.argv) == 1:
                dist.init_process_group("gloo")
                other = c if rank == 0 else c + 0.5  # other contexts, the same data
                torch.manual_seed(0)
                try:
                    fit(pyroflows.maf(2, context=2, transforms=2, hidden=(16,)), x,
                        context=other, **options)
                    report["refused"] = None
                except ValueError as error:
                    report["refused"] = str(error)
            torch.manual_seed(0)
            flow = pyroflows.maf(2, context=2, transforms=2, hidden=(16,))
            history = fit(flow, x, context=c, **options)
            with torch.no_grad():
                scores = flow(torch.as_tensor(c, dtype=torch.float32)).log_prob(
                    torch.as_tensor(x, dtype=torch.float32))
            report.update(val_nll=history.val_nll, scores=scores.tolist())
            if len(sys.argv) == 1:
                dist.destroy_process_group()
            with open(f"{'one' if len(sys.argv) > 1 else rank}.json", "w") as out:
                json.dump(report, out)
            """
        )
    )
    result = torchrun(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, str(script), "alone"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    import json

    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in ("0", "1", "one")]
    for report in reports[:2]:
        assert report["refused"] is not None
        assert "process(es) 1 passed others" in report["refused"]
        np.testing.assert_allclose(report["val_nll"], reports[2]["val_nll"], rtol=1e-4)
        assert np.abs(np.subtract(report["scores"], reports[2]["scores"])).max() < 1e-4
