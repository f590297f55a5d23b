"""The examples run as a user runs them (subprocess), and the quickstart meets its target."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path = ROOT, timeout: int = 300):
    """Run ``examples/<script>`` with ``args`` as a user does; the finished process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def example(script: str, *args: str, cwd: Path = ROOT) -> str:
    """Run ``examples/<script>`` with ``args`` as a user does; its stdout, once it exits 0."""
    result = run(script, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def quickstart(*args: str, cwd: Path = ROOT) -> str:
    return example("quickstart.py", *args, cwd=cwd)


def gap(output: str) -> float:
    return float(re.search(r"gap: (-?[0-9.]+) nats", output).group(1))


@pytest.mark.parametrize("flow", ["maf", "nsf"])
def test_quickstart_smoke(flow, tmp_path):
    out = quickstart("--flow", flow, "--steps", "5", "--out", str(tmp_path / "q.png"))
    assert "held-out NLL" in out
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert (tmp_path / "q_stages.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize(("flow", "target"), [("maf", 0.05), ("nsf", 0.03), ("realnvp", 0.05)])
def test_quickstart_reaches_the_true_density(flow, target):
    assert gap(quickstart("--flow", flow, "--no-plot")) < target


def test_conditional_density_example_runs():
    out = example("conditional_density.py", "--epochs", "2")
    assert "held-out NLL" in out
    assert out.count("| +") + out.count("| -") == 3  # a row per context sampled


@pytest.mark.slow
def test_conditional_density_example_reaches_the_true_density():
    out = example("conditional_density.py")
    assert gap(out) < 0.08
    radii = re.findall(r"\| ([+-][0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", out)
    assert len(radii) == 3
    for _, mean, true in radii:
        assert abs(float(mean) - float(true)) < 0.05


@pytest.mark.parametrize("script", ["eight_schools.py", "funnel.py"])
def test_guide_examples_run(script):
    out = example(script, "--steps", "30", "--draws", "1000")
    assert out.count("| ELBO ") == (3 if script == "eight_schools.py" else 2)  # all diagnosed
    assert "AutoNormal" in out
    assert "AutoFlow" in out


def test_mixture_example_sums_the_assignments_out():
    out = example("mixture.py", "--steps", "100", "--draws", "200")
    assert "started from: laplace" in out  # the assignments summed out for the warm start too
    diagnosed = float(re.search(r"\| ELBO (-?[0-9.]+) \|", out).group(1))
    enumerated = float(
        re.search(r"TraceEnum_ELBO's ELBO, 200 particles: (-?[0-9.]+)", out).group(1)
    )
    # the weights sum the assignments out as the ELBO does; drawn from their prior, the
    # assignments took the diagnosed ELBO 400 nats lower on a fitted guide
    assert abs(diagnosed - enumerated) < 5
    # leave-one-out, the assignments summed out of each point's likelihood: the mixture
    # beats one Gaussian by about 23 nats (4000 draws, 300 steps)
    diff = float(re.search(r"one Gaussian +-?[0-9.]+ +[0-9.]+ +([0-9.]+)", out).group(1))
    assert diff > 10


def test_vae_example_runs():
    out = example("vae_digits.py", "--epochs", "2")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"diagonal", "iaf"}
    for elbo, iwae, gap, _ in rows.values():
        assert float(iwae) >= float(elbo)  # the IWAE bound at k = 1000 is above the ELBO
        assert float(gap) >= 0


def test_model_comparison_example_runs():
    out = example("model_comparison.py", "--steps", "30")
    assert out.count("elpd_loo") == 3  # each model's line, and the table
    assert "student-t" in out.splitlines()[-2]  # the table's rows, in rank order


def test_quickstart_without_matplotlib_says_so_before_training(tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed\n"
        f"sys.argv = ['quickstart.py', '--out', {str(tmp_path / 'q.png')!r}]\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'quickstart.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "needs matplotlib" in result.stderr
    assert "step" not in result.stdout  # refused before the training, not after it


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("mixture.py", ["--steps", "0"], "--steps must be at least 1"),  # crashed after a fit
        ("mixture.py", ["--draws", "1"], "--draws must be at least 2"),
        ("funnel.py", ["--draws", "1"], "--draws must be at least 2"),  # printed sd nan
        ("eight_schools.py", ["--draws", "1"], "--draws must be at least 2"),
        ("quickstart.py", ["--out", "no_such_folder/x.png"], "no folder no_such_folder"),
        ("conditional_density.py", ["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_examples_refuse_bad_flags_before_any_work(script, args, message):
    result = run(script, *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
