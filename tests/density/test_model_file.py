import os
import pickle

import numpy as np
import pytest
import torch

from pyroflows.density import ModelFileError, build, fit, load, save
from pyroflows.density.standardize import standardization_of
from pyroflows.transforms import Affine
from tests.helpers import flip_a_weight_bit

SMALL = {"transforms": 1, "hidden": [4]}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("maf", {"transforms": 2, "hidden": [8], "permutation": "random"}),
        ("nsf", {"transforms": 2, "hidden": [8], "bins": 4, "permutation": "random"}),
        ("nsf", {"transforms": 2, "hidden": [8], "autoregressive": "maf"}),
        ("realnvp", {"transforms": 2, "hidden": [8], "activation": "elu", "dtype": "float64"}),
        ("nice", {"transforms": 2, "hidden": [8]}),
    ],
)
def test_round_trip_gives_the_same_density(tmp_path, name, options):
    torch.manual_seed(0)
    flow = build(name, 3, options)
    like = flow.base_loc
    x = torch.randn(400, 3, dtype=like.dtype) * 3 + 1
    fit(flow, x, epochs=2, seed=0, progress=False)
    path = save(
        tmp_path / "m.pt",
        flow,
        name=name,
        options=options,
        standardize=True,
        columns=["a", "b", "c"],
    )
    loaded, info = load(path)
    assert info["flow"] == name
    assert info["dim"] == 3
    assert info["columns"] == ["a", "b", "c"]
    assert loaded.base_loc.dtype == like.dtype
    assert standardization_of(loaded) is not None
    with torch.no_grad():
        assert torch.allclose(loaded().log_prob(x), flow().log_prob(x), atol=1e-5)
        torch.manual_seed(1)
        a = flow().sample((5,))
        torch.manual_seed(1)
        b = loaded().sample((5,))  # sampling runs the (D-pass) inverse: orders must match
    assert torch.allclose(a, b, atol=1e-5)


def test_never_overwrites_without_force(tmp_path):
    flow = build("maf", 2, SMALL)
    path = save(tmp_path / "m.pt", flow, name="maf", options=SMALL, standardize=True)
    with pytest.raises(FileExistsError, match="force"):
        save(path, flow, name="maf", options=SMALL, standardize=True)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="force must be True or False, got 'no'"):
        save(path, flow, name="maf", options=SMALL, standardize=True, force="no")
    assert path.read_bytes() == before  # a truthy string is not a yes
    save(path, flow, name="maf", options=SMALL, standardize=True, force=True)


def test_a_path_that_cannot_be_written_is_named_not_its_temporary(tmp_path):
    flow = build("maf", 2, SMALL)
    (tmp_path / "file").write_text("")
    for path, error in (
        (tmp_path, IsADirectoryError),  # a folder given as the file name
        (tmp_path / "file" / "m.pt", OSError),  # a file where the folder should be
    ):
        with pytest.raises(error) as raised:
            save(path, flow, name="maf", options=SMALL, standardize=True, force=True)
        assert ".tmp" not in str(raised.value)
        assert str(path) in str(raised.value)
    assert not list(tmp_path.rglob("*.tmp"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_refuses_files_that_could_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as stream:
        pickle.dump({"format": "pyroflows-density", "payload": _RunsCode()}, stream)
    torch.save({"format": "pyroflows-density", "payload": _RunsCode()}, "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ModelFileError, match="refused it unread"):
            load(name)
    assert not (tmp_path / "pwned.txt").exists()


def test_other_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a pyroflows model file"):
        load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable"):
        load(tmp_path / "text.pt")


def test_build_errors():
    with pytest.raises(ValueError, match="flow must be one of"):
        build("glow", 2)
    with pytest.raises(ValueError, match="activation"):
        build("maf", 2, {"activation": "swish"})
    with pytest.raises(ValueError, match="dtype"):
        build("maf", 2, {"dtype": "float16"})
    with pytest.raises(ValueError, match="bad options"):
        build("maf", 2, {"bins": 4})
    assert build("nsf", 1).dim == 1  # falls back to the autoregressive spline


def test_nsf_files_record_the_spline_side_and_version_1_files_mean_base(tmp_path):
    torch.manual_seed(0)
    options = {"transforms": 2, "hidden": [8], "bins": 4}
    x = torch.randn(300, 3) * 2 + 1
    flow = build("nsf", 3, options)  # today's default: the data side
    fit(flow, x, epochs=2, seed=0, progress=False)
    path = save(tmp_path / "new.pt", flow, name="nsf", options=options, standardize=True)
    info = load(path)[1]
    assert info["side"] == "data"
    assert "side" not in info["options"]  # the caller's options are kept as given

    # a version 1 file (written before `side` existed) holds base-side splines
    old = build("nsf", 3, {**options, "side": "base"})
    fit(old, x, epochs=2, seed=0, progress=False)
    path = save(tmp_path / "old.pt", old, name="nsf", options=options, standardize=True)
    state = torch.load(path, weights_only=True)
    state["version"] = 1
    del state["side"]
    torch.save(state, path)
    loaded, _ = load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded().log_prob(x), old().log_prob(x))
    state["version"] = 4
    torch.save(state, path)
    with pytest.raises(ModelFileError, match="version 4, this pyroflows reads 1, 2, 3"):
        load(path)


@pytest.mark.parametrize("name", ["maf", "iaf", "realnvp"])
def test_affine_files_record_the_clamp_and_version_2_files_mean_rational(tmp_path, name):
    torch.manual_seed(0)
    options = {"transforms": 2, "hidden": [8], "clamp": 1.0}
    x = torch.randn(300, 3) * 2 + 1
    flow = build(name, 3, options)
    with torch.no_grad():  # log-scales well inside and beyond the bound
        for p in flow.parameters():
            p.add_(torch.randn_like(p))
    path = save(tmp_path / "new.pt", flow, name=name, options=options, standardize=True)
    loaded, info = load(path)
    assert info["clamp_kind"] == "tanh"
    assert info["version"] == 3
    with torch.no_grad():
        new = flow().log_prob(x)
        torch.testing.assert_close(loaded().log_prob(x), new)

    # a version 2 file (written before the tanh clamp) means the rational clamp
    state = torch.load(path, weights_only=True)
    state["version"] = 2
    del state["clamp_kind"]
    torch.save(state, path)
    loaded, _ = load(path)
    affines = [t.transformer for t in loaded.transforms if hasattr(t, "transformer")]
    assert len(affines) == 2
    assert all(a.clamp_kind == "rational" for a in affines)
    for t in flow.transforms:
        if hasattr(t, "transformer"):
            t.transformer = Affine(1.0, clamp_kind="rational")
    with torch.no_grad():  # fresh copies of x: the layers cache their last input
        old = flow().log_prob(x.clone())
        torch.testing.assert_close(loaded().log_prob(x.clone()), old)
    assert (old - new).abs().max() > 1e-2  # the two clamps differ: the record matters

    # saved again, it is a version 3 file that records the rational clamp
    again = save(tmp_path / "again.pt", loaded, name=name, options=options, standardize=True)
    reloaded, info = load(again)
    assert info["version"] == 3
    assert info["clamp_kind"] == "rational"
    with torch.no_grad():
        torch.testing.assert_close(reloaded().log_prob(x.clone()), old)

    state = torch.load(again, weights_only=True)
    state["clamp_kind"] = "soft"
    torch.save(state, again)
    with pytest.raises(ModelFileError, match="unknown clamp_kind 'soft'"):
        load(again)
    affines[0].clamp_kind = "tanh"  # one layer of each kind cannot be recorded
    with pytest.raises(ValueError, match="mixes affine clamp kinds"):
        save(tmp_path / "mixed.pt", loaded, name=name, options=options, standardize=True)


@pytest.mark.parametrize("name", ["realnvp", "nice", "nsf"])
def test_files_of_coupling_flows_without_permutations_still_load(tmp_path, name):
    # builders refuse permutation=None with several coupling layers now; files written
    # before hold such flows (every layer on the same split) and must keep loading
    torch.manual_seed(0)
    options = {"transforms": 3, "hidden": (8,), "permutation": None}
    flow = build(name, 3, {**options, "permutation": "reverse"})
    flow.transforms = torch.nn.ModuleList(
        t for t in flow.transforms if type(t).__name__ != "Permutation"
    )  # the layout the old builder made
    x = torch.randn(300, 3) * 2 + 1
    fit(flow, x, epochs=2, seed=0, progress=False)
    path = save(tmp_path / "old.pt", flow, name=name, options=options, standardize=True)
    loaded, _ = load(path)
    assert [type(t) for t in loaded.transforms] == [type(t) for t in flow.transforms]
    with torch.no_grad():
        torch.testing.assert_close(loaded().log_prob(x), flow().log_prob(x))


def test_a_damaged_copy_is_refused_not_loaded_with_other_weights(tmp_path):
    flow = build("maf", 2, SMALL)
    path = save(tmp_path / "m.pt", flow, name="maf", options=SMALL, standardize=True)
    member = flip_a_weight_bit(path)
    torch.load(path, weights_only=True)  # torch itself reads it without a word
    with pytest.raises(ModelFileError, match=rf"damaged model file: its member {member} fails"):
        load(path)


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("version", True, "model file version True, this pyroflows reads"),
        ("version", "3", "model file version '3', this pyroflows reads"),
        ("dequantize", "no", "entry 'dequantize' must be True, False or a list of column"),
        ("dequantize", [2], r"entry 'dequantize' must be True, .*, got \[2\]"),
        ("dequantize", [0, 1], r"entry 'dequantize' must be True, .*, got \[0, 1\]"),
        ("columns", ["a"], r"entry 'columns' must be None or 2 column names, got \['a'\]"),
        ("history", {"epochs": 3, "colour": 1}, "entry 'history' must be None or a fit's"),
        ("dtype", "float16", "entry 'dtype' must be one of float32, float64, got 'float16'"),
        ("training", [3], "entry 'training' must be None or a dict of fit settings, got list"),
        ("training", {"epochs": 3, "colour": 1}, r"entry 'training' holds unknown .*'colour'"),
        ("training", {"lr": [0.1]}, "entry 'training' setting 'lr' must be a plain value"),
    ],
)
def test_entries_beside_the_weights_are_checked(tmp_path, entry, value, message):
    options = {"transforms": 1, "hidden": [4]}
    flow = build("maf", 2, options)
    path = save(tmp_path / "m.pt", flow, name="maf", options=options, standardize=True)
    load(path)  # as written: fine
    state = torch.load(path, weights_only=True)
    state[entry] = value
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=message):
        load(path)


def test_weights_of_another_flow_are_named_by_key(tmp_path):
    flow = build("maf", 2, SMALL)
    path = save(tmp_path / "m.pt", flow, name="maf", options=SMALL, standardize=True)
    state = torch.load(path, weights_only=True)
    state["options"] = {}  # a file from elsewhere whose options (5 layers) lie about its weights
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"do not match .*: .*Missing key\(s\) .*transforms"):
        load(path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, r"file could not be loaded: build\('maf', 2, options.*Missing key"),  # 5 layers
        ({"transforms": 1, "hidden": [8]}, "size mismatch"),
        ({**SMALL, "context": 3}, "flow is unconditional, but options give context=3"),
    ],
)
def test_save_refuses_options_that_would_not_load_its_weights(tmp_path, options, match):
    # the fit would be lost: the file would be refused at load
    flow = build("maf", 2, SMALL)
    with pytest.raises(ValueError, match=match):
        save(tmp_path / "m.pt", flow, name="maf", options=options, standardize=True)
    assert not (tmp_path / "m.pt").exists()
    flow = build("maf", 2, {**SMALL, "context": 2})
    with pytest.raises(ValueError, match="conditional on a context of 2, but options give con"):
        save(tmp_path / "m.pt", flow, name="maf", options=SMALL, standardize=True)


def test_a_half_precision_flow_is_refused_with_the_remedy(tmp_path):
    flow = build("maf", 2, SMALL).half()
    with pytest.raises(ValueError, match=r"float32 or float64 flow, got torch.float16: save flow"):
        save(tmp_path / "m.pt", flow, name="maf", options=SMALL, standardize=True)
    assert not (tmp_path / "m.pt").exists()


def test_training_settings_are_written_checked_and_read_back(tmp_path):
    options = {"transforms": 1, "hidden": [4]}
    flow = build("maf", 2, options)
    training = {"epochs": 7, "lr": 0.003, "schedule": None, "seed": 11}
    common = {"name": "maf", "options": options, "standardize": True}
    path = save(tmp_path / "m.pt", flow, **common, training=training)
    assert load(path)[1]["training"] == training
    older = torch.load(path, weights_only=True)
    del older["training"]  # files written before the entry existed
    torch.save(older, path)
    assert load(path)[1].get("training") is None
    with pytest.raises(ValueError, match=r"training: holds unknown settings \['speed'\]"):
        save(tmp_path / "n.pt", flow, **common, training={"speed": 1})
    assert not (tmp_path / "n.pt").exists()


@pytest.mark.parametrize("name", ["maf", "realnvp", "nsf"])
def test_files_with_a_weight_per_layer_still_load(tmp_path, name):
    # files written before each network's weights were packed into one 'flat' tensor
    torch.manual_seed(0)
    options = {"transforms": 2, "hidden": [8]}
    flow = build(name, 3, options)
    x = torch.randn(50, 3)
    fit(flow, x, epochs=1, seed=0, progress=False)
    expected = flow().log_prob(x).detach()
    for t in flow.transforms:
        if hasattr(t, "conditioner"):
            t.conditioner.unpack()
    path = save(tmp_path / "m.pt", flow, name=name, options=options, standardize=True)
    assert not any(key.endswith(".flat") for key in torch.load(path)["state_dict"])
    loaded, _ = load(path)
    assert any(key.endswith(".flat") for key in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded().log_prob(x), expected)


@pytest.mark.parametrize(
    ("given", "stored"),
    [((1,), [1]), (np.array([1]), [1]), ([2, 0], [0, 2]), ([-1], [2]), ([0, 1, 2], True)],
)
def test_save_stores_dequantize_as_a_fit_records_it(tmp_path, given, stored):
    # a tuple was stored as True (every column floored and checked), and [2, 0] was
    # written but refused by load
    options = {"transforms": 1, "hidden": [4]}
    flow = build("maf", 3, options)
    path = save(
        tmp_path / "m.pt", flow, name="maf", options=options, standardize=True, dequantize=given
    )
    assert load(path)[1]["dequantize"] == stored


@pytest.mark.parametrize("name", ["maf", "nsf", "realnvp"])
def test_a_conditional_flow_round_trips_and_the_readers_of_p_x_refuse_it(tmp_path, name, capsys):
    from pyroflows.density import FlowDensity
    from pyroflows.density.cli import main

    torch.manual_seed(0)
    options = {"transforms": 2, "hidden": [8], "context": 2}
    flow = build(name, 3, options)
    c = torch.randn(300, 2)
    x = torch.randn(300, 3) + c.sum(-1, keepdim=True)
    fit(flow, x, context=c, epochs=2, seed=0, progress=False)
    path = save(tmp_path / "m.pt", flow, name=name, options=options, standardize=True)
    loaded, info = load(path)
    assert loaded.context_features == 2
    with torch.no_grad():
        assert torch.allclose(loaded(c).log_prob(x), flow(c).log_prob(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"holds a conditional flow p\(x \| c\).*FlowDensity"):
        FlowDensity.load(path)
    np.savetxt(tmp_path / "x.csv", x.numpy(), delimiter=",")
    for command in ("sample", "score"):
        data = [str(tmp_path / "x.csv")] if command == "score" else ["-n", "3"]
        assert main([command, str(path), *data]) == 2
        said = capsys.readouterr().err
        assert f"`pyroflows {command}` takes models of p(x)" in said
    assert main(["info", str(path)]) == 0
    assert "given a context of 2" in capsys.readouterr().out
