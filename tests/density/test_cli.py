"""The command line, run for real: ``python -m pyroflows`` in a subprocess."""

import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

import numpy as np
import pytest

from pyroflows.density import FlowDensity, load
from pyroflows.density.cli import main

FAST = ["--flow", "maf", "--transforms", "1", "--hidden", "8", "--epochs", "3", "--quiet"]


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pyroflows", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2)) * [1.0, 10.0] + [0.0, 100.0]
    np.savetxt(path / "data.csv", x, delimiter=",", header="a,b", comments="")
    np.savetxt(path / "plain.csv", x, delimiter=",")
    np.save(path / "data.npy", x)
    result = run("fit", "data.csv", "--out", "model.pt", *FAST, cwd=path)
    assert result.returncode == 0, result.stderr
    return path


def test_entry_point_is_installed():
    (script,) = entry_points(group="console_scripts", name="pyroflows")
    assert script.load() is main


def test_fit_info_sample_score(workdir):
    result = run("fit", "data.npy", "--out", "npy.pt", *FAST, cwd=workdir)
    assert result.returncode == 0
    assert "wrote npy.pt" in result.stdout
    info = run("info", "model.pt", cwd=workdir)
    assert info.returncode == 0
    assert "maf, 2 columns" in info.stdout
    assert "a, b" in info.stdout
    # the fit's settings are kept: info shows them and a loaded estimator takes them
    assert "training  epochs=3, batch_size=256, lr=0.001," in info.stdout
    assert "patience=20, clip_grad=None, schedule=plateau, seed=0" in info.stdout
    loaded = FlowDensity.load(workdir / "model.pt").get_params()
    assert (loaded["epochs"], loaded["validation_fraction"]) == (3, 0.1)
    assert loaded["random_state"] is None  # the CLI seeds fit by --seed, not an estimator's
    sample = run("sample", "model.pt", "-n", "500", "--seed", "1", cwd=workdir)
    lines = sample.stdout.splitlines()
    assert sample.returncode == 0
    assert lines[0] == "a,b"
    assert len(lines) == 501
    draws = np.loadtxt(lines[1:], delimiter=",")
    assert abs(draws[:, 1].mean() - 100) < 3  # data units: the standardisation is in the model
    again = run("sample", "model.pt", "-n", "500", "--seed", "1", cwd=workdir)
    assert again.stdout == sample.stdout
    score = run("score", "model.pt", "plain.csv", cwd=workdir)
    logp = np.loadtxt(score.stdout.splitlines())
    assert score.returncode == 0
    assert logp.shape == (400,)
    assert np.isfinite(logp).all()
    assert "mean log p(x)" in score.stderr
    # N(0,1) x N(100, 10^2): about -1.42 - 3.22 nats per row
    assert abs(logp.mean() - (-0.5 * np.log(2 * np.pi * np.e) * 2 - np.log(10))) < 0.3
    run("sample", "model.pt", "-n", "7", "--out", "s.npy", cwd=workdir)
    assert np.load(workdir / "s.npy").shape == (7, 2)


def unfinished_fit(data, checkpoints, seed, **given):
    """The checkpoint of `fit DATA *FAST --seed SEED`, stopped after its first epoch."""
    import torch

    from pyroflows.density import build, fit, read_table

    values, _ = read_table(data, torch.float32)  # as the command reads it
    torch.manual_seed(seed)
    options = {"transforms": 1, "hidden": [8], "activation": "relu", "dtype": "float32"}

    def stop(epoch, history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            build("maf", values.shape[1], options),
            values,
            epochs=3,
            seed=seed,
            checkpoint_dir=checkpoints,
            progress=False,
            callback=stop,
            **given,
        )


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyroflows: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("missing.csv", None, ["missing.csv: no such file"]),
        ("empty.csv", "", ["the file is empty"]),
        ("words.csv", "a,b\n1,2\n3,x\n", ["row 3, column 2", "'x' is not a number"]),
        ("nan.csv", "1,2\nnan,4\n", ["NaN at row 2, column 1"]),
        ("inf.csv", "1,2\n3,-inf\n", ["inf at row 2, column 2"]),
        ("ragged.csv", "1,2\n3,4,5\n", ["row 2 has 3 column(s), expected 2"]),
        ("semicolons.csv", "a;b\n5,1;4,6\n", ["expected 1", "separated by semicolons"]),
        ("semicolon.csv", "a;b\n1;2\n3;4\n", ["'1;2' is not a number", "by semicolons"]),
        ("tabs.csv", "a\tb\n1.5\t2.5\n", ["is not a number", "separated by tabs"]),
        ("trailing.csv", "a,b,\n1,2,\n", ["column 3: ''", "a comma at the end of the line?"]),
        ("year.csv", "x,2020\n1,2\n", ["row 1, column 1", "header only when none"]),
    ],
)
def test_bad_data_for_fit(workdir, name, content, fragments):
    if content is not None:
        (workdir / name).write_text(content)
    one_line_error(run("fit", name, "--out", "never.pt", *FAST, cwd=workdir), *fragments)
    assert not (workdir / "never.pt").exists()


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("s_missing.csv", None, ["s_missing.csv: no such file"]),
        ("s_empty.csv", "", ["the file is empty"]),
        ("s_words.csv", "1,2\n3,y\n", ["row 2, column 2", "'y' is not a number"]),
        ("s_inf.csv", "1,2\ninf,4\n", ["inf at row 2, column 1"]),
        ("s_ragged.csv", "1,2\n3\n", ["row 2 has 1 column(s), expected 2"]),
        ("s_binary.csv", b"\x80\x81\xfe", ["not a text CSV file"]),
    ],
)
def test_bad_data_for_score_each_case(workdir, name, content, fragments):
    if isinstance(content, bytes):
        (workdir / name).write_bytes(content)
    elif content is not None:
        (workdir / name).write_text(content)
    one_line_error(run("score", "model.pt", name, cwd=workdir), *fragments)


def test_score_reads_npy_and_bad_paths_get_one_line(workdir):
    npy = run("score", "model.pt", "data.npy", cwd=workdir)
    csv = run("score", "model.pt", "plain.csv", cwd=workdir)
    assert npy.returncode == 0
    assert npy.stdout == csv.stdout
    # a folder that does not exist is made (as fit's --out); one under a file cannot be
    one_line_error(
        run("sample", "model.pt", "-n", "3", "--out", "data.csv/s.csv", cwd=workdir),
        "--out data.csv/s.csv: data.csv is a file, not a folder",
    )
    boom = run("fit", "data.csv", "--out", "boom.pt", *FAST, "--lr", "1e30", "--force", cwd=workdir)
    # the advice in the command line's terms: it has no clip_grad to offer
    one_line_error(boom, "training loss", "try a smaller --lr")
    assert "clip_grad" not in boom.stderr


def test_bad_data_for_score(workdir):
    (workdir / "three.csv").write_text("1,2,3\n4,5,6\n")
    one_line_error(run("score", "model.pt", "three.csv", cwd=workdir), "3 columns", "fitted to 2")
    (workdir / "nan2.csv").write_text("1,2\nnan,4\n")
    one_line_error(run("score", "model.pt", "nan2.csv", cwd=workdir), "NaN at row 2, column 1")
    one_line_error(run("score", "nothere.pt", "plain.csv", cwd=workdir), "no such model file")
    (workdir / "folder.pt").mkdir(exist_ok=True)  # a name of its own: workdir is shared
    one_line_error(run("info", "folder.pt", cwd=workdir), "folder.pt is a directory, not a model")
    (workdir / "fake.pt").write_text("not a model")
    one_line_error(run("info", "fake.pt", cwd=workdir), "not a readable pyroflows model file")


def test_never_overwrites_a_model_without_force(workdir):
    before = (workdir / "model.pt").read_bytes()
    one_line_error(run("fit", "data.csv", "--out", "model.pt", *FAST, cwd=workdir), "--force")
    assert (workdir / "model.pt").read_bytes() == before
    run("fit", "data.csv", "--out", "copy.pt", *FAST, cwd=workdir)
    forced = run(
        "fit", "data.csv", "--out", "copy.pt", "--force", *FAST, "--seed", "3", cwd=workdir
    )
    assert forced.returncode == 0


def test_bad_options(workdir):
    one_line_error(
        run("fit", "data.csv", "--out", "x.pt", "--activation", "swish", cwd=workdir), "activation"
    )
    for hidden in ("a,b", "16,,16"):  # an empty size was dropped: 16,16
        bad = run("fit", "data.csv", "--out", "x.pt", "--hidden", hidden, cwd=workdir)
        assert bad.returncode == 2
        assert f"expected comma-separated layer sizes such as 64,64; got '{hidden}'" in bad.stderr
    one_line_error(run("sample", "model.pt", "-n", "0", cwd=workdir), "-n must be")


def test_ctrl_c_leaves_a_resumable_checkpoint(workdir):
    rng = np.random.default_rng(1)
    np.savetxt(workdir / "big.csv", rng.normal(size=(3000, 3)), delimiter=",")
    args = [
        "fit",
        "big.csv",
        "--flow",
        "maf",
        "--transforms",
        "2",
        "--hidden",
        "16",
        "--epochs",
        "25",
        "--patience",
        "100",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "1",
        "--quiet",
    ]
    whole = run(*args, "--out", "whole.pt", cwd=workdir)
    assert whole.returncode == 0, whole.stderr

    process = subprocess.Popen(
        [sys.executable, "-m", "pyroflows", *args, "--out", "parted.pt"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoint = workdir / "parted.pt.ckpt" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err
    assert checkpoint.exists()
    assert not (workdir / "parted.pt").exists()
    # the same command without --resume refuses to throw the unfinished fit away
    one_line_error(run(*args, "--out", "parted.pt", cwd=workdir), "--resume", "--force")
    assert checkpoint.exists()

    resumed = run(*args, "--out", "parted.pt", "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    a = run("score", "whole.pt", "big.csv", cwd=workdir).stdout
    b = run("score", "parted.pt", "big.csv", cwd=workdir).stdout
    assert a == b
    # the resumed fit's model file records the seed it ran with (the checkpoint's)
    assert load(workdir / "parted.pt")[1]["training"]["seed"] == 0


def test_a_second_ctrl_c_before_any_checkpoint_says_there_is_none(workdir, monkeypatch, capsys):
    # a forced stop writes no checkpoint; before the first one, the message promised a
    # folder that did not exist, and --resume then started afresh without a word
    import os

    import pyroflows.density as density

    fit = density.fit

    def impatient(*args, **kwargs):
        def twice(epoch, history):
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this batch
            os.kill(os.getpid(), signal.SIGINT)  # the second: stop now

        return fit(*args, **kwargs, callback=twice)

    monkeypatch.setattr(density, "fit", impatient)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", str(workdir / "data.csv"), "--out", str(workdir / "twice.pt"), *FAST])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "stopped before any checkpoint was written" in err
    assert "--resume to continue" not in err
    assert not (workdir / "twice.pt.ckpt" / "checkpoint.pt").exists()


def test_bad_device_and_seed_get_exit_code_2(workdir):
    one_line_error(
        run("fit", "data.csv", "--out", "d.pt", *FAST, "--device", "gpu", cwd=workdir),
        "--device 'gpu' cannot be used here",
    )
    one_line_error(  # torch takes it, and the fit failed with a traceback and exit code 1
        run("fit", "data.csv", "--out", "d.pt", *FAST, "--device", "meta", cwd=workdir),
        "--device 'meta' holds no values",
    )
    for command in (
        ["fit", "data.csv", "--out", "d.pt", *FAST, "--seed", str(10**24)],
        ["sample", "model.pt", "-n", "2", "--seed", "-1"],
    ):
        bad = run(*command, cwd=workdir)
        assert bad.returncode == 2
        assert "argument --seed: a seed must be in [0, 2**63)" in bad.stderr
        assert "Traceback" not in bad.stderr
    assert not (workdir / "d.pt").exists()


def test_unreadable_checkpoint_gets_one_line_with_and_without_resume(workdir):
    folder = workdir / "broken.pt.ckpt"
    folder.mkdir()
    (folder / "checkpoint.pt").write_text("garbage")
    for extra in ([], ["--resume"], ["--resume", "--force"]):
        one_line_error(
            run("fit", "data.csv", "--out", "broken.pt", *FAST, *extra, cwd=workdir),
            "not a readable pyroflows checkpoint",
            "--force",
        )
    assert (folder / "checkpoint.pt").read_text() == "garbage"  # nothing discarded unasked
    forced = run("fit", "data.csv", "--out", "broken.pt", *FAST, "--force", cwd=workdir)
    assert forced.returncode == 0, forced.stderr


def test_info_says_which_nll_and_npy_names_are_kept(workdir):
    fitted = run("fit", "data.csv", "--out", "noval.pt", *FAST, "--validation", "0", cwd=workdir)
    assert "training NLL" in fitted.stdout
    info = run("info", "noval.pt", cwd=workdir)
    assert "best training NLL" in info.stdout
    assert "validation NLL" not in info.stdout
    assert "best validation NLL" in run("info", "model.pt", cwd=workdir).stdout
    run("sample", "model.pt", "-n", "3", "--out", "S.NPY", cwd=workdir)
    assert np.load(workdir / "S.NPY").shape == (3, 2)
    assert not (workdir / "S.NPY.npy").exists()


def test_values_beyond_the_models_float32_get_one_line(workdir):
    (workdir / "huge.csv").write_text("a,b\n1,2\n\n3,1e39\n")  # blank lines count
    one_line_error(
        run("score", "model.pt", "huge.csv", cwd=workdir),
        "huge.csv: 1e+39 at row 4, column 2 is beyond the range of torch.float32",
    )
    one_line_error(
        run("fit", "huge.csv", "--out", "huge.pt", *FAST, cwd=workdir), "--dtype float64"
    )
    x = np.ones((20, 2))
    x[4, 0] = -1e39
    np.save(workdir / "huge.npy", x)
    one_line_error(
        run("score", "model.pt", "huge.npy", cwd=workdir), "huge.npy: -1e+39 at row 5, column 1"
    )


def test_default_hidden_is_wide_enough_for_wide_data(tmp_path):
    rng = np.random.default_rng(1)
    np.savetxt(tmp_path / "wide.csv", rng.normal(size=(200, 70)), delimiter=",")
    args = ("fit", "wide.csv", "--flow", "maf", "--out", "wide.pt", "--transforms", "1")
    result = run(*args, "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "narrower than" not in result.stderr  # the MADE's width warning
    info = run("info", "wide.pt", cwd=tmp_path)
    assert "'hidden': 'default [69, 69]'" in info.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["fit", "data.csv", "--out", "f.pt", "--flow", "nfs"], ["--flow", "'nfs'", "fit --help"]),
        (["fit", "data.csv"], ["required: --out", "'pyroflows fit --help'"]),
        (["fitt", "data.csv"], ["invalid choice: 'fitt'", "'pyroflows --help'"]),
        ([], ["required: COMMAND"]),
    ],
)
def test_bad_flags_get_one_line_and_exit_code_2(workdir, args, fragments):
    one_line_error(run(*args, cwd=workdir), *fragments)  # not argparse's usage block first


def test_a_finished_fit_removes_its_checkpoint_but_not_the_users_files(workdir):
    done = run("fit", "data.csv", "--out", "tidy.pt", *FAST, "--checkpoint-every", "1",
               cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (workdir / "tidy.pt").exists()
    assert not (workdir / "tidy.pt.ckpt").exists()
    mine = workdir / "kept.pt.ckpt" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    done = run("fit", "data.csv", "--out", "kept.pt", *FAST, cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in mine.parent.iterdir()] == ["notes.txt"]


def test_a_dequantized_model_samples_integers(workdir):
    counts = np.random.default_rng(2).poisson(3.0, size=(300, 2))
    np.savetxt(workdir / "counts.csv", counts, delimiter=",", fmt="%d")
    fitted = run("fit", "counts.csv", "--out", "counts.pt", *FAST, "--dequantize", cwd=workdir)
    assert fitted.returncode == 0, fitted.stderr
    drawn = run("sample", "counts.pt", "-n", "200", "--seed", "0", cwd=workdir)
    assert drawn.returncode == 0, drawn.stderr
    lines = drawn.stdout.splitlines()
    # a header even for a model fitted without one: integer draws that start 0,1 would
    # otherwise be taken for pandas' header when read back
    assert lines[0] == "x1,x2"
    values = np.loadtxt(lines[1:], delimiter=",")
    assert values.shape == (200, 2)
    assert np.array_equal(values, np.floor(values))
    (workdir / "drawn_with_header.csv").write_text("x1,x2\n0,1\n" + "\n".join(lines[1:]) + "\n")
    scored = run("score", "counts.pt", "drawn_with_header.csv", cwd=workdir)
    assert scored.returncode == 0, scored.stderr
    assert "201 rows" in scored.stderr
    assert "as a header" not in scored.stderr
    counts = counts.astype(float)
    counts[4, 1] = 2.5
    # a header and a blank line: the message names the line an editor shows (7), not the
    # data row (5)
    text = "a,b\n" + "\n".join(f"{u:g},{v:g}" for u, v in counts[:3]) + "\n\n"
    text += "\n".join(f"{u:g},{v:g}" for u, v in counts[3:]) + "\n"
    (workdir / "fractions.csv").write_text(text)
    one_line_error(
        run("fit", "fractions.csv", "--out", "f.pt", *FAST, "--dequantize", cwd=workdir),
        "fractions.csv: row 7, column 2: 2.5 is not a whole number: dequantize=True is for",
    )
    one_line_error(  # and where a dequantized model scores it
        run("score", "counts.pt", "fractions.csv", cwd=workdir),
        "fractions.csv: row 7, column 2: 2.5 is not a whole number: the model was fitted",
    )
    np.save(workdir / "fractions.npy", counts)  # no lines: the data row and its index
    one_line_error(
        run("fit", "fractions.npy", "--out", "f.pt", *FAST, "--dequantize", cwd=workdir),
        "fractions.npy row 5, column 2 (index [4, 1]) is 2.5, not a whole number",
    )


def test_a_float64_models_csv_output_round_trips_float64(workdir):
    fitted = run("fit", "data.csv", "--out", "wide.pt", *FAST, "--dtype", "float64", cwd=workdir)
    assert fitted.returncode == 0, fitted.stderr
    for command in (
        ["sample", "wide.pt", "-n", "20", "--seed", "0"],
        ["score", "wide.pt", "data.csv"],
    ):
        csv_out = run(*command, cwd=workdir)
        npy_out = run(*command, "-o", f"{command[0]}.npy", cwd=workdir)
        assert csv_out.returncode == npy_out.returncode == 0, csv_out.stderr + npy_out.stderr
        lines = [line for line in csv_out.stdout.splitlines() if line[0] in "-0123456789"]
        from_csv = np.loadtxt(lines, delimiter=",")
        saved = np.load(workdir / f"{command[0]}.npy")
        assert np.array_equal(from_csv.reshape(-1), saved.reshape(-1))
        assert saved.shape == ((20, 2) if command[0] == "sample" else (400,))  # one per row


def test_a_checkpoint_of_another_fit_is_refused_in_the_command_lines_terms(workdir):
    # an unfinished fit of what `fit data.csv --out mis.pt *FAST --seed 3` would train
    unfinished_fit(workdir / "data.csv", workdir / "mis.pt.ckpt", seed=3)
    resume = ["fit", "data.csv", "--out", "mis.pt", *FAST, "--resume"]
    for extra, fragments in (
        (["--seed", "4"], ["with --seed 3; now --seed 4", "drop --resume and add --force"]),
        (["--epochs", "5"], ["with --epochs 3; now --epochs 5"]),
        (["--patience", "0"], ["with --patience 20; now --patience 0"]),
        (["--validation", "0.2"], ["with --validation 0.1; now --validation 0.2"]),
        (["--activation", "tanh"], ["for another flow (--flow, --transforms"]),
        (["--batch-size", "32"], ["with --batch-size 256; now --batch-size 32"]),
        (["--dtype", "float64"], ["with --dtype float32; now --dtype float64"]),
    ):
        one_line_error(run(*resume, *extra, cwd=workdir), "mis.pt.ckpt", *fragments)
    resumed = run(*resume, cwd=workdir)  # no --seed: the checkpoint's
    assert resumed.returncode == 0, resumed.stderr
    assert "starting afresh" not in resumed.stderr
    assert not (workdir / "mis.pt.ckpt").exists()
    # nothing to resume (a loop that always passes --resume; a typo in --out): said so
    fresh = run("fit", "data.csv", "--out", "new.pt", *FAST, "--resume", cwd=workdir)
    assert fresh.returncode == 0, fresh.stderr
    assert "pyroflows: note: --resume: no checkpoint at new.pt.ckpt" in fresh.stderr


def test_out_paths_that_cannot_be_written_are_refused_before_the_training(workdir):
    (workdir / "blocker").write_text("a file")
    started = time.monotonic()
    long = ["--epochs", "1000", "--patience", "0"]
    one_line_error(
        run("fit", "data.csv", "--out", "blocker/m.pt", *FAST, *long, cwd=workdir),
        "--out blocker/m.pt",
        "is not a folder",
    )
    assert time.monotonic() - started < 60  # not after 1000 epochs
    (workdir / "adir").mkdir()
    for extra in ([], ["--force"]):  # a folder is not a model file, forced or not
        one_line_error(
            run("fit", "data.csv", "--out", "adir", *FAST, *extra, cwd=workdir),
            "adir is a directory",
        )


def test_a_file_that_is_not_a_model_is_named_for_what_it_is(workdir):
    for name in ("plain.csv", "data.npy"):
        one_line_error(run("info", name, cwd=workdir), "not the zip archive torch.save writes")
    whole = (workdir / "model.pt").read_bytes()
    (workdir / "cut.pt").write_bytes(whole[: 2 * len(whole) // 3])
    one_line_error(run("info", "cut.pt", cwd=workdir), "a truncated or corrupt zip archive")
    import torch

    torch.save({"format": object()}, workdir / "objects.pt", _use_new_zipfile_serialization=True)
    one_line_error(run("info", "objects.pt", cwd=workdir), "Python objects other than tensors")


def test_help_shows_the_defaults_and_patience_0_never_stops_early(workdir):
    shown = run("fit", "--help", cwd=workdir).stdout
    for default in ("default: 256", "default: 0.001", "default: 0.1", "default: 20"):
        assert default in shown
    assert "default: 1000" in run("sample", "--help", cwd=workdir).stdout
    rng = np.random.default_rng(2)
    np.savetxt(workdir / "tiny.csv", rng.normal(size=(60, 2)), delimiter=",")
    fitted = run(
        "fit", "tiny.csv", "--out", "never.pt", *FAST, "--epochs", "8", "--patience", "0",
        cwd=workdir,
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    assert "in 8 epochs" in fitted.stdout


def test_score_refuses_columns_named_in_another_order(workdir):
    x = np.loadtxt(workdir / "data.csv", delimiter=",", skiprows=1)
    np.savetxt(workdir / "swapped.csv", x[:, ::-1], delimiter=",", header="b,a", comments="")
    result = run("score", "model.pt", "swapped.csv", cwd=workdir)
    assert result.returncode == 2
    assert "has columns ['b', 'a'] but the model was fitted to ['a', 'b']" in result.stderr


def test_fit_passes_bins_to_a_spline_flow(workdir):
    from pyroflows.density import load

    options = ["--flow", "nsf", "--bins", "3", "--transforms", "1", "--hidden", "8"]
    result = run(
        "fit", "data.csv", "--out", "bins.pt", *options, "--epochs", "1", "--quiet", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    flow, info = load(workdir / "bins.pt")
    assert info["options"]["bins"] == 3
    assert {t.transformer.bins for t in flow.transforms if hasattr(t, "transformer")} == {3}


def test_a_numeric_header_is_read_as_the_header_flag_says(workdir):
    # pandas writes 0,1 for unnamed columns; that row was read as data (an outlier row
    # in the fit, and every score after it one row off its data)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 2))
    rows = "\n".join(",".join(f"{v:.6f}" for v in row) for row in x)
    (workdir / "pandas.csv").write_text("0,1\n" + rows + "\n")
    (workdir / "years.csv").write_text("2019,2020\n" + rows + "\n")
    fitted = run("fit", "pandas.csv", "--out", "pandas.pt", *FAST, cwd=workdir)
    assert "fitted maf to 50 rows" in fitted.stdout
    assert "took the first row (0,1) as a header" in fitted.stderr
    assert "pass --header no if it is data" in fitted.stderr  # the flag, not header=False
    assert "columns   0, 1" in run("info", "pandas.pt", cwd=workdir).stdout
    score = run("score", "pandas.pt", "pandas.csv", cwd=workdir)
    assert score.stdout.splitlines()[0] == "log_prob"
    assert len(score.stdout.splitlines()) == 51
    as_data = run("score", "pandas.pt", "pandas.csv", "--header", "no", cwd=workdir)
    assert len(as_data.stdout.splitlines()) == 51
    assert "note" not in as_data.stderr
    assert (
        "fitted maf to 51 rows"
        in run("fit", "years.csv", "--out", "years_data.pt", *FAST, cwd=workdir).stdout
    )  # auto: 2019,2020 could be data
    years = run("fit", "years.csv", "--out", "years.pt", "--header", "yes", *FAST, cwd=workdir)
    assert "fitted maf to 50 rows" in years.stdout
    assert "columns   2019, 2020" in run("info", "years.pt", cwd=workdir).stdout
    # a name with a comma is quoted: 'a, x', b is two columns, not three
    (workdir / "comma.csv").write_text('"a, x",b\n' + rows + "\n")
    run("fit", "comma.csv", "--out", "comma.pt", *FAST, cwd=workdir)
    assert "columns   'a, x', b\n" in run("info", "comma.pt", cwd=workdir).stdout
    # sample writes the model's names as its header: score reads them back as the
    # header (the first row 2019,2020 was scored as a row of data)
    run("sample", "years.pt", "-n", "3", "--out", "drawn.csv", "--seed", "0", cwd=workdir)
    assert (workdir / "drawn.csv").read_text().splitlines()[0] == "2019,2020"
    scored = run("score", "years.pt", "drawn.csv", cwd=workdir)
    assert scored.stdout.splitlines()[0] == "log_prob"
    assert len(scored.stdout.splitlines()) == 4
    assert "3 rows" in scored.stderr
    other = run("score", "years_data.pt", "drawn.csv", cwd=workdir)  # a model without names
    assert "4 rows" in other.stderr  # auto, as before: 2019,2020 could be data
    # the model's numeric names in another order: as likely data, so read as data, but
    # said (it was scored as a row of data without a word, its columns perhaps swapped);
    # with --header yes, refused by the names
    (workdir / "swapped_years.csv").write_text("2020,2019\n" + rows + "\n")
    swapped = run("score", "years.pt", "swapped_years.csv", cwd=workdir)
    assert "51 rows" in swapped.stderr
    assert "the first row (2020,2019) is the model's column names in another order" in (
        swapped.stderr
    )
    assert "pass --header yes to have the names checked" in swapped.stderr
    checked = run("score", "years.pt", "swapped_years.csv", "--header", "yes", cwd=workdir)
    assert checked.returncode == 2
    assert "has columns ['2020', '2019'] but the model was fitted to ['2019', '2020']" in (
        checked.stderr
    )
    # pandas' names 0,1: a first row 1,0 is a row of counts, read as data without a word
    (workdir / "counts.csv").write_text("1,0\n" + rows + "\n")
    counts = run("score", "pandas.pt", "counts.csv", cwd=workdir)
    assert "51 rows" in counts.stderr
    assert "another order" not in counts.stderr


def test_data_from_a_pipe_is_read(workdir):
    # a pipe's size is 0: "the file is empty" was said of every pipe and of /dev/stdin
    text = (workdir / "data.csv").read_text()
    for command in (
        ["fit", "/dev/stdin", "--out", "piped.pt", *FAST],
        ["score", "model.pt", "/dev/stdin"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "pyroflows", *command],
            cwd=workdir,
            input=text,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
    assert "400 rows: mean log p(x)" in result.stderr
    assert result.stdout.splitlines()[0] == "log_prob"
    assert len(result.stdout.splitlines()) == 401
    empty = subprocess.run(
        [sys.executable, "-m", "pyroflows", "score", "model.pt", "/dev/stdin"],
        cwd=workdir,
        input="",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert empty.returncode == 2
    assert "/dev/stdin: the stream is empty" in empty.stderr


def test_a_model_fitted_in_python_to_names_with_spaces_scores_from_the_command_line(workdir):
    # pandas reads "a, b" as columns 'a' and ' b'; the command line reads names stripped,
    # and refused the model's own samples: "has columns ['a', 'b'] but ... ['a', ' b']"
    x = np.loadtxt(workdir / "data.csv", delimiter=",", skiprows=1)
    est = FlowDensity(flow="maf", transforms=1, hidden=(8,), epochs=2, random_state=0)
    est.fit(x)
    est.feature_names_in_ = np.asarray(["a", " b"], dtype=object)  # as from pandas
    est.save(workdir / "spaced.pt")
    run("sample", "spaced.pt", "-n", "5", "--seed", "0", "--out", "new/spaced.csv", cwd=workdir)
    shutil.copy(workdir / "new" / "spaced.csv", workdir / "spaced.csv")  # its folder made
    for data in ("spaced.csv", "data.csv"):
        result = run("score", "spaced.pt", data, cwd=workdir)
        assert result.returncode == 0, result.stderr


def test_column_names_with_commas_and_quotes_round_trip(workdir):
    # the header of sample's CSV was joined by bare commas: "height,cm" became two names
    x = np.random.default_rng(2).normal(size=(40, 2))
    rows = "\n".join(",".join(f"{v:.6f}" for v in row) for row in x)
    (workdir / "named.csv").write_text('"height,cm","w""t"\n' + rows + "\n")
    run("fit", "named.csv", "--out", "named.pt", *FAST, cwd=workdir)
    run("sample", "named.pt", "-n", "5", "--out", "named_draws.csv", cwd=workdir)
    assert (workdir / "named_draws.csv").read_text().splitlines()[0] == '"height,cm","w""t"'
    score = run("score", "named.pt", "named_draws.csv", cwd=workdir)
    assert score.returncode == 0, score.stderr
    assert len(score.stdout.splitlines()) == 6


def test_the_autoregressive_spline_is_reachable_and_only_for_nsf(workdir):
    args = ("fit", "data.csv", "--flow", "nsf", "--autoregressive", "maf", "--transforms", "1")
    result = run(*args, "--hidden", "8", "--epochs", "2", "--quiet", "--out", "ar.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr
    model = FlowDensity.load(workdir / "ar.pt")
    layers = [type(t).__name__ for t in model.flow_.transforms]
    assert "SplineAutoregressive" in layers
    assert "'autoregressive': 'maf'" in run("info", "ar.pt", cwd=workdir).stdout
    assert run("score", "ar.pt", "data.csv", cwd=workdir).returncode == 0
    one_line_error(
        run(
            "fit",
            "data.csv",
            "--out",
            "x.pt",
            "--flow",
            "maf",
            "--autoregressive",
            "maf",
            cwd=workdir,
        ),
        "--autoregressive applies to --flow nsf only",
    )
    one_line_error(  # not ignored: the user asked for something the flow does not have
        run("fit", "data.csv", "--out", "x.pt", "--flow", "realnvp", "--bins", "16", cwd=workdir),
        "--bins applies to --flow nsf only",
    )


def test_sample_and_score_never_write_over_their_inputs_and_ask_before_overwriting(workdir):
    shutil.copy(workdir / "model.pt", workdir / "victim.pt")
    model = (workdir / "victim.pt").read_bytes()
    data = (workdir / "plain.csv").read_bytes()
    for force in ([], ["--force"]):  # not even with --force: the command reads them
        onto_model = run("sample", "victim.pt", "-n", "3", "-o", "victim.pt", *force, cwd=workdir)
        assert onto_model.returncode == 2
        assert "--out victim.pt is the input victim.pt" in onto_model.stderr
        onto_data = run("score", "victim.pt", "plain.csv", "-o", "plain.csv", *force, cwd=workdir)
        assert onto_data.returncode == 2
        assert "is the input plain.csv" in onto_data.stderr
        fit_onto_data = run("fit", "plain.csv", "--out", "plain.csv", *force, *FAST, cwd=workdir)
        assert fit_onto_data.returncode == 2
    assert "is the input plain.csv" in fit_onto_data.stderr
    assert (workdir / "victim.pt").read_bytes() == model
    assert (workdir / "plain.csv").read_bytes() == data
    (workdir / "old.csv").write_text("keep\n")
    for command in (["sample", "victim.pt", "-n", "3"], ["score", "victim.pt", "plain.csv"]):
        kept = run(*command, "-o", "old.csv", cwd=workdir)
        assert kept.returncode == 2
        assert "old.csv exists; pass --force to overwrite it" in kept.stderr
    assert (workdir / "old.csv").read_text() == "keep\n"
    forced = run("score", "victim.pt", "plain.csv", "-o", "old.csv", "--force", cwd=workdir)
    assert forced.returncode == 0, forced.stderr
    assert len((workdir / "old.csv").read_text().splitlines()) == 400


def test_a_pandas_index_column_is_refused(workdir):
    x = np.random.default_rng(3).normal(size=(50, 2))
    lines = [",x,y"] + [f"{i},{a},{b}" for i, (a, b) in enumerate(x)]  # DataFrame.to_csv()
    (workdir / "indexed.csv").write_text("\n".join(lines) + "\n")
    result = run("fit", "indexed.csv", "--out", "indexed.pt", *FAST, cwd=workdir)
    assert result.returncode == 2
    assert "column 1 is named '' and holds whole numbers that number the rows" in result.stderr
    assert "index=False" in result.stderr
    assert not (workdir / "indexed.pt").exists()
    (workdir / "id_named.csv").write_text("\n".join(["id" + lines[0]] + lines[1:]) + "\n")
    named = run("fit", "id_named.csv", "--out", "id_named.pt", *FAST, cwd=workdir)
    assert named.returncode == 0, named.stderr  # a named column is the user's choice


def test_warnings_are_one_line_each_and_a_one_row_table_is_refused(workdir):
    x = np.random.default_rng(4).normal(size=(100, 2))
    x[:, 1] = 7.0
    np.savetxt(workdir / "constant.csv", x, delimiter=",")
    warned = run("fit", "constant.csv", "--out", "constant.pt", *FAST, cwd=workdir)
    assert warned.returncode == 0, warned.stderr
    assert "pyroflows: warning: fit: constant.csv column(s) 2 (7) hold one value" in warned.stderr
    assert "UserWarning" not in warned.stderr
    assert "sys.exit" not in warned.stderr
    (workdir / "one.csv").write_text("1.0,2.0\n")
    one = run("fit", "one.csv", "--out", "one.pt", *FAST, cwd=workdir)
    assert one.returncode == 2
    assert "at least 2 training rows, got 1 row(s) in one.csv" in one.stderr
    (workdir / "two.csv").write_text("1.0,2.0\n3.0,4.0\n")
    two = run("fit", "two.csv", "--out", "two.pt", *FAST, cwd=workdir)
    assert two.returncode == 2
    assert "the validation split took 1; give more rows or hold none out" in two.stderr
    assert "--validation 0 on the command line" in two.stderr


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["--epochs", "0"], "--epochs must be an int >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be an int >= 1, got 0"),
        (["--patience", "-1"], "--patience must be >= 0 (0: never stop early), got -1"),
        (["--validation", "1.5"], "--validation must be a fraction in [0, 1), got 1.5"),
        (["--transforms", "0"], "--transforms must be an int >= 1, got 0"),
        (["--flow", "nsf", "--bins", "1"], "--bins must be an int >= 2, got 1"),
    ],
)
def test_bad_flag_values_are_named_by_their_flag(workdir, given, said):
    # fit's own messages named its Python arguments ("batch_size must be ..."), and
    # --patience -1 was told ">= 1" although 0 is taken (never stop early)
    result = run("fit", "data.csv", "--out", "flagged.pt", "--force", *FAST, *given, cwd=workdir)
    one_line_error(result, said)


def test_a_coupling_flow_on_one_column_is_refused_in_the_command_lines_terms(workdir):
    # the builder's advice was Python: "nsf(1, autoregressive='maf' or 'iaf')"
    (workdir / "one.csv").write_text("\n".join(str(v) for v in range(1, 40)) + "\n")
    result = run("fit", "one.csv", "--out", "one.pt", *FAST, "--flow", "realnvp", cwd=workdir)
    one_line_error(result, "--flow realnvp is a coupling flow", "use --flow maf, iaf or nsf")


def test_some_columns_dequantized_from_the_command_line(workdir, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    table = np.c_[rng.normal(size=300), rng.poisson(3.0, size=300)]
    body = "\n".join(f"{u:.6f},{v:g}" for u, v in table) + "\n"
    (workdir / "mixed.csv").write_text("a,count\n" + body)
    (workdir / "bare.csv").write_text(body)
    fit_some = ["fit", *FAST, "--dequantize-columns"]
    monkeypatch.chdir(workdir)  # in this process, quicker (other tests run the real command)

    def cli(*argv):
        code = main(list(argv))
        said = capsys.readouterr()
        assert code == 0, said.err
        return said.out

    cli(*fit_some, "count", "mixed.csv", "-o", "mixed.pt")
    assert load(workdir / "mixed.pt")[1]["dequantize"] == [1]
    assert "dequantized columns count (--dequantize-columns count)" in cli("info", "mixed.pt")
    drawn = cli("sample", "mixed.pt", "-n", "200", "--seed", "0")
    values = np.loadtxt(drawn.splitlines()[1:], delimiter=",")
    assert np.array_equal(values[:, 1], np.floor(values[:, 1]))  # the count: whole
    assert not np.array_equal(values[:, 0], np.floor(values[:, 0]))  # the other: not
    # without a header, columns by number: the same fit
    cli(*fit_some, "2", "bare.csv", "-o", "bare.pt")
    assert "dequantized columns 2 (--dequantize-columns 2)" in cli("info", "bare.pt")
    assert cli("score", "mixed.pt", "bare.csv") == cli("score", "bare.pt", "bare.csv")
    # a fraction in the count column: named by its line, for the fit and for the score
    lines = ["a,count", *body.splitlines()]
    lines[3] = "0.5,2.5"
    (workdir / "frac.csv").write_text("\n".join(lines) + "\n")
    for argv, message in (
        (
            [*fit_some, "count", "frac.csv", "-o", "f.pt"],
            "frac.csv: row 4, column 2: 2.5 is "
            "not a whole number: dequantize's columns (--dequantize-columns) are the integer",
        ),
        (
            ["score", "mixed.pt", "frac.csv"],
            "frac.csv: row 4, column 2: 2.5 is not a whole "
            "number: the model was fitted with this column dequantized",
        ),
        ([*fit_some, "a", "mixed.csv", "-o", "x.pt"], "mixed.csv: row 2, column 1"),
        (
            [*fit_some, "2", "mixed.csv", "-o", "x.pt"],
            "names no column '2': DATA has a header, so give its names (a, count)",
        ),
        (
            [*fit_some, "count", "bare.csv", "-o", "x.pt"],
            "names no column 'count': DATA has no header, so give column numbers, 1 to 2",
        ),
        ([*fit_some, "3", "bare.csv", "-o", "x.pt"], "names no column '3': DATA has no header"),
        (
            [*fit_some, "count,count", "mixed.csv", "-o", "x.pt"],
            "names a column twice, got 'count,count'",
        ),
        (
            [*fit_some, "count,", "mixed.csv", "-o", "x.pt"],
            "takes comma-separated column names or numbers, got 'count,'",
        ),
    ):
        assert main(argv) == 2, argv
        said = capsys.readouterr().err.strip().splitlines()
        assert len(said) == 1, said
        assert said[0].startswith("pyroflows: error: "), said
        assert message in said[0], said
    # a header of numbers: its names, never column numbers, and a note says where
    (workdir / "years.csv").write_text("2,1\n" + body)
    assert main([*fit_some, "1", "years.csv", "-o", "y.pt", "--header", "yes"]) == 0
    note = "note: --dequantize-columns takes DATA's header names: '1' is column 2"
    assert note in capsys.readouterr().err
    assert load(workdir / "y.pt")[1]["dequantize"] == [1]
    # an unfinished fit with the count dequantized: resuming it asks for the same columns
    unfinished_fit(workdir / "mixed.csv", workdir / "part.pt.ckpt", seed=0, dequantize=[1])
    resume = ["fit", "mixed.csv", "-o", "part.pt", *FAST, "--resume"]
    refused = run(*resume, cwd=workdir)
    assert refused.returncode == 2, refused.stderr
    warning, error = refused.stderr.strip().splitlines()
    # the count, seen without noise, warned of in the command line's terms too
    assert warning.startswith("pyroflows: warning: fit: in the first 270 rows of mixed.csv")
    assert "--dequantize-columns with their names, or numbers from 1" in warning
    assert "with --dequantize-columns count; now no --dequantize" in error
    resumed = run(*resume, "--dequantize-columns", "count", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr


def test_a_resume_refusal_names_columns_the_data_lack_by_number():
    # a checkpoint of a wider table, resumed with a narrower one: its columns have no
    # names here (it was an IndexError)
    from pyroflows.density import ResumeMismatch
    from pyroflows.density.cli import _mismatch

    error = ResumeMismatch("x", "m.pt.ckpt/checkpoint.pt", {"dequantize": ([4], [0])})
    text = _mismatch(error, ["a", "b", "c"])
    assert "with --dequantize-columns 5; now --dequantize-columns a" in text


def test_dequantize_columns_reads_names_with_commas_quoted_as_in_csv():
    from pyroflows.density.cli import _Failure, _integer_columns, _shown_columns

    names = ["a, x", "b", 'q"t', "c"]
    assert _integer_columns('"a, x", b', names, 4) == [0, 1]
    shown = _shown_columns([0, 2], names)  # as info and a resume refusal print them
    assert shown == '"a, x","q""t"'
    assert _integer_columns(shown, names, 4) == [0, 2]  # and the flag reads them back
    for given in ("", "b,,c"):
        with pytest.raises(_Failure, match="takes comma-separated column names or numbers"):
            _integer_columns(given, names, 4)


@pytest.mark.parametrize(("name", "writer"), [("old.csv", "savetxt"), ("old.npy", "save")])
def test_a_write_that_fails_midway_keeps_the_file_it_would_replace(
    workdir, monkeypatch, capsys, name, writer
):
    old = workdir / name
    old.write_bytes(b"the user's earlier draws\n")
    real = getattr(np, writer)

    def full_disk(stream, *args, **kwargs):
        real(stream, *args, **kwargs)  # the draws go out, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, writer, full_disk)
    argv = ["sample", str(workdir / "model.pt"), "-n", "50", "--out", str(old), "--force"]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert old.read_bytes() == b"the user's earlier draws\n"  # not half of the new draws
    assert not list(workdir.glob(f".{name}.*"))  # and no temporary left behind
    monkeypatch.setattr(np, writer, real)
    assert main(argv) == 0
    new = np.load(old) if name.endswith(".npy") else np.loadtxt(old, delimiter=",", skiprows=1)
    assert new.shape == (50, 2)


def test_out_through_a_link_or_to_a_device_writes_there_and_keeps_what_it_was(
    workdir, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)
    target = workdir / "kept" / "draws.csv"
    target.parent.mkdir(exist_ok=True)
    target.write_text("old\n")
    target.chmod(0o640)
    link = workdir / "latest.csv"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    assert main(["sample", "model.pt", "-n", "5", "--out", str(link), "--force"]) == 0
    assert link.is_symlink()  # the link still points at the file, which holds the draws
    assert len(target.read_text().splitlines()) == 6
    assert target.stat().st_mode & 0o777 == 0o640  # a file replaced keeps its permissions
    dangling = workdir / "dangling.csv"
    dangling.unlink(missing_ok=True)
    dangling.symlink_to(workdir / "kept" / "new.csv")  # its target does not exist yet
    assert main(["sample", "model.pt", "-n", "5", "--out", str(dangling)]) == 0
    assert dangling.is_symlink()
    assert len((workdir / "kept" / "new.csv").read_text().splitlines()) == 6
    null = workdir / "null-link"
    null.unlink(missing_ok=True)
    null.symlink_to(os.devnull)  # a device (a pipe, /dev/stdout): written to, not replaced
    assert main(["sample", "model.pt", "-n", "5", "--out", str(null), "--force"]) == 0
    assert null.is_symlink()
    assert os.path.realpath(null) == os.devnull
    assert not list(workdir.rglob("*.tmp"))
    capsys.readouterr()


def test_resume_of_a_conditional_fits_checkpoint_is_refused_with_the_python_that_resumes_it(
    tmp_path, capsys
):
    import torch

    import pyroflows
    from pyroflows.density import fit

    def stop(epoch, history):
        raise KeyboardInterrupt  # leaves an unfinished checkpoint

    x = np.random.default_rng(0).normal(size=(200, 2))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    torch.manual_seed(0)
    flow = pyroflows.maf(2, context=1, transforms=1, hidden=(8,))
    with pytest.raises(KeyboardInterrupt):
        fit(flow, x, context=x[:, :1] ** 2, epochs=3, progress=False, callback=stop,
            checkpoint_dir=tmp_path / "cli.pt.ckpt")  # fmt: skip
    out = str(tmp_path / "cli.pt")
    assert main(["fit", str(tmp_path / "x.csv"), "--out", out, "--resume", *FAST]) == 2
    said = capsys.readouterr().err
    assert "holds a conditional fit, p(x | c)" in said
    assert "resume=True" in said
