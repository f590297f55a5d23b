"""The project's own promises: ruff-clean, README commands in step with CI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_tree_is_ruff_clean(args):
    result = subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = readme_commands()
    assert "pip install -c constraints.txt" in demo
    assert demo.endswith("python examples/quickstart.py")
    assert "pip install -c constraints.txt" in tests
    assert tests.endswith("python -m pytest")
    assert (ROOT / "examples" / "quickstart.py").exists()


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    # CI may quieten pip (-q) but must otherwise run the very same command
    assert tests.replace("pip install ", "pip install -q ") in ci


def test_constraints_pin_the_cpu_torch():
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, re.M)


def test_star_import_works_without_the_optional_scikit_learn():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from pyroflows import *\n"
        "import pyroflows\n"
        "assert 'FlowDensity' not in pyroflows.__all__ + dir(pyroflows)\n"
        "import inspect, pydoc; inspect.getmembers(pyroflows); pydoc.render_doc(pyroflows)\n"
        "print(Flow.__name__, AutoFlow.__name__)"
    )
    result = subprocess.run(["python", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Flow", "AutoFlow"]


def test_readme_python_runs():
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
