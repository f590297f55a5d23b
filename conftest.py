"""Shared pytest set-up: seeded, validated, with a clean Pyro parameter store per test.

``--device cuda`` (or ``PYROFLOWS_TEST_DEVICE=cuda``) runs the tests that take the
``device`` fixture on that device (``tests/test_device.py``); they skip when it is absent.
"""

import os
import warnings

import pyro
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: a second torch thread per worker (and per command-line
    # subprocess a test starts) only spins. Measured on 2 cores, the whole suite: 592 s in
    # one process; two workers 795 s with two threads each, 283 s with one (--dist loadfile).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, before any worker starts
        # ArviZ (0.23) writes a once-a-day stamp file on import, and two workers importing
        # it at once on the day's first run race on that file: one fails with
        # FileNotFoundError and its test file errors. Importing it here first writes the
        # stamp before the workers start (on a fresh machine, every run is the first).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its once-a-day notice
            import arviz  # noqa: F401


@pytest.fixture(autouse=True)
def _seed_and_clear():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("PYROFLOWS_TEST_DEVICE", "cpu"),
        help="device for the tests that take the `device` fixture: cpu, cuda, cuda:1, ...",
    )


@pytest.fixture
def device(request) -> torch.device:
    """The device chosen with --device; the test skips when it is not there."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {chosen} but torch sees no CUDA device")
    return chosen
