import numpy as np
import pytest
import torch

from pyroflows.density.data import DataError, as_rows, read_table

LIKE = torch.zeros(())


def test_as_rows_converts_arrays_and_refuses_tensor_casts():
    rows = as_rows(np.arange(6.0).reshape(3, 2), "data", LIKE, dim=2)
    assert rows.dtype == torch.float32
    assert rows.shape == (3, 2)
    with pytest.raises(TypeError, match="float64.*no silent cast"):
        as_rows(torch.zeros(3, 2, dtype=torch.float64), "data", LIKE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros(3), r"shape \(N, D\)"),
        (np.zeros((0, 2)), "no rows"),
        (np.zeros((2, 3)), "2 columns"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), r"NaN at row 1, column 2 \(index \[0, 1\]\)"),
        (np.array([[0.0, 1.0], [np.inf, 1.0]]), "NaN or inf"),
        ([["a", "b"]], "numeric"),
    ],
)
def test_as_rows_errors(data, message):
    with pytest.raises(DataError, match=message):
        as_rows(data, "data", LIKE, dim=2)


@pytest.mark.parametrize("data", [np.ones((3, 2)) + 1j, [[1 + 2j, 0.0], [0.0, 1.0]]])
def test_complex_rows_are_refused_not_cut_to_their_real_parts(data):
    # float64 took the real parts, with only NumPy's ComplexWarning to say so
    with pytest.raises(TypeError, match=r"data must be real numbers, got complex"):
        as_rows(data, "data", LIKE, dim=2)


def test_read_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("x,y\n1,2\n3,4.5\n\n")
    values, columns = read_table(tmp_path / "h.csv")
    assert columns == ["x", "y"]
    assert np.array_equal(values, [[1, 2], [3, 4.5]])
    (tmp_path / "n.csv").write_text("1,2\n-3e2,4\n")
    values, columns = read_table(tmp_path / "n.csv")
    assert columns is None
    assert np.array_equal(values, [[1, 2], [-300, 4]])


def test_read_csv_header_argument_and_pandas_unnamed_header(tmp_path):
    (tmp_path / "p.csv").write_text("0,1,2\n1,2,3\n")  # DataFrame(x).to_csv(index=False)
    with pytest.warns(UserWarning, match=r"took the first row \(0,1,2\) as a header"):
        values, columns = read_table(tmp_path / "p.csv")
    assert columns == ["0", "1", "2"]
    assert values.tolist() == [[1, 2, 3]]
    values, columns = read_table(tmp_path / "p.csv", header=False)
    assert (columns, values.shape) == (None, (2, 3))
    (tmp_path / "y.csv").write_text("2019,2020\n1,2\n")  # could be data: auto reads it so
    assert read_table(tmp_path / "y.csv")[1] is None
    assert read_table(tmp_path / "y.csv", header=True)[1] == ["2019", "2020"]
    (tmp_path / "o.csv").write_text("0,2\n1,2\n")  # not 0..D-1: data
    assert read_table(tmp_path / "o.csv")[1] is None
    (tmp_path / "c.csv").write_text("0\n3\n1\n")  # one column's 0 is as likely a count
    values, columns = read_table(tmp_path / "c.csv")
    assert (columns, values.ravel().tolist()) == (None, [0, 3, 1])
    with pytest.raises(TypeError, match="header must be True, False or None, got 'yes'"):
        read_table(tmp_path / "y.csv", header="yes")


def _frame_csv(path, header, index, x):
    lines = [header] + [f"{i:g},{a},{b}" for i, (a, b) in zip(index, x, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("header", "index"),
    [
        (",x,y", list(range(20))),  # DataFrame.to_csv(path)
        (",x,y", list(range(40, 0, -2))),  # sorted otherwise, a subset
        (",x,y", list(range(12)) + list(range(8))),  # pd.concat of two frames
        ("Unnamed: 0,x,y", list(range(20))),  # read with its index, written again
        (",0,1", list(range(20))),  # DataFrame(array).to_csv(path): columns named 0, 1
    ],
)
def test_read_csv_refuses_pandas_row_index(tmp_path, header, index):
    x = np.random.default_rng(0).normal(size=(len(index), 2))
    path = _frame_csv(tmp_path / "f.csv", header, index, x)
    with pytest.raises(DataError, match=r"f.csv: column 1 is named .* the row index pandas"):
        read_table(path)


@pytest.mark.parametrize(
    "first",
    [
        [3, 1, 3, 0, 2, 2],  # whole numbers with repeats, not runs from 0
        [0, 0, 0, 0, 0, 0],  # all one value
        [0, 0, 0, 1, 0, 0, 1, 0, 0, 0],  # a rare-event count: "runs" of 1 or 2 rows
        [0, 1, 0, 0, 1, 0, 0, 1, 0, 1],  # a 0/1 flag
    ],
)
def test_read_csv_keeps_a_first_column_that_does_not_number_the_rows(tmp_path, first):
    x = np.random.default_rng(0).normal(size=(len(first), 2))
    for header in (",x,y", "Unnamed: 0,x,y"):
        values, columns = read_table(_frame_csv(tmp_path / "c.csv", header, first, x))
        assert columns == [header.split(",")[0], "x", "y"]
        assert values[:, 0].tolist() == first


def test_read_csv_takes_pandas_unnamed_header_over_real_values(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 2))
    # over real-valued data, pandas' header of unnamed columns is taken, with a warning
    reals = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    with pytest.warns(UserWarning, match=r"took the first row \(,0,1\) as a header"):
        values, columns = read_table(_frame_csv(tmp_path / "r.csv", ",0,1", reals, x))
    assert columns == ["", "0", "1"]
    assert values.shape == (6, 3)
    # one column named 0 over the index is as likely a data row with a missing cell
    (tmp_path / "m.csv").write_text(",0\n1.5,2\n3,4\n")
    with pytest.raises(DataError, match=r"row 1, column 1: '' is not a number"):
        read_table(tmp_path / "m.csv")


def test_read_npy_one_and_two_d(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(4.0))
    assert read_table(tmp_path / "a.npy")[0].shape == (4, 1)
    np.save(tmp_path / "b.npy", np.ones((3, 2), dtype=np.int32))
    values, columns = read_table(tmp_path / "b.npy")
    assert isinstance(values, np.memmap)  # not read into memory: fit and score stream it
    assert columns is None
    assert np.array_equal(values, np.ones((3, 2)))


def test_a_text_table_named_npy_is_named_as_such_not_as_a_pickle(tmp_path):
    (tmp_path / "table.npy").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match=r"table.npy: not a .npy file") as raised:
        read_table(tmp_path / "table.npy")
    assert "pickle" not in str(raised.value)  # NumPy's advice, allow_pickle=, was unsafe


def test_streamed_rows_check_values_and_give_the_moments(tmp_path):
    from pyroflows.density.rows import as_source

    x = np.random.default_rng(0).normal(size=(20_000, 3)) * [1.0, 1e3, 1e-3] + [5.0, -7.0, 1e4]
    np.save(tmp_path / "x.npy", x)
    rows = as_source(read_table(tmp_path / "x.npy")[0], "data", LIKE.double(), 3)
    mean, sd, total = rows.moments()
    assert np.allclose(mean.numpy(), x.mean(0), rtol=1e-12)
    assert np.allclose(sd.numpy(), x.std(0), rtol=1e-9)
    assert total == pytest.approx(x.sum(), rel=1e-12)
    index = torch.tensor([19_999, 3, 7])
    assert np.array_equal(rows.take(index).numpy(), x[[19_999, 3, 7]])
    x[12_345, 1] = np.nan
    np.save(tmp_path / "bad.npy", x)
    bad = as_source(read_table(tmp_path / "bad.npy")[0], "data", LIKE.double(), 3)
    with pytest.raises(DataError, match=r"bad.npy: NaN at row 12346, column 2"):
        bad.moments()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.csv", "", "empty"),
        ("h.csv", "a,b\n", "header but no data rows"),
        ("r.csv", "1,2\n3\n", "row 2 has 1 column"),
        ("c.csv", "a,b\n1,2\n3,oops\n", r"row 3, column 2: 'oops' is not a number"),
        # Python's float() groups digits: '2020_01' was read as 202001
        ("u.csv", "a,b\n1,2\n2020_01,4\n", r"row 3, column 1: '2020_01' is not a number"),
        ("n.csv", "1,2\n3,nan\n", "NaN at row 2, column 2"),
        ("i.csv", "1,inf\n", "inf at row 1, column 2"),
    ],
)
def test_read_csv_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_table(tmp_path / name)


def test_read_missing_and_bad_npy(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match="numeric"):
        read_table(tmp_path / "s.npy")
    np.save(tmp_path / "t.npy", np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="2-D"):
        read_table(tmp_path / "t.npy")


def test_csv_rows_are_numbered_by_file_line_and_odd_files_are_refused(tmp_path):
    (tmp_path / "gap.csv").write_text("1,2\n\n3,x\n")
    with pytest.raises(DataError, match="row 3, column 2"):
        read_table(tmp_path / "gap.csv")
    (tmp_path / "gapnan.csv").write_text("a,b\n1,2\n\n3,nan\n")
    with pytest.raises(DataError, match="NaN at row 4, column 2"):
        read_table(tmp_path / "gapnan.csv")
    (tmp_path / "bom.csv").write_bytes("\ufeff1,2\n3,4\n".encode())
    values, columns = read_table(tmp_path / "bom.csv")
    assert columns is None
    assert np.array_equal(values, [[1, 2], [3, 4]])
    (tmp_path / "binary.csv").write_bytes(bytes(range(128, 256)))
    with pytest.raises(DataError, match="not a text CSV file"):
        read_table(tmp_path / "binary.csv")


def test_csv_values_beyond_the_flows_dtype_are_refused_at_their_file_line(tmp_path):
    # blank lines count, as for the other messages (the old command-line check said row 3)
    (tmp_path / "big.csv").write_text("a,b\n\n1,2\n\n3,-1e39\n")
    with pytest.raises(DataError, match=r"big.csv: -1e\+39 at row 5, column 2 is beyond .*float32"):
        read_table(tmp_path / "big.csv", torch.float32)
    values, _ = read_table(tmp_path / "big.csv", torch.float64)  # fits a float64 flow
    assert values[1, 1] == -1e39
    values, _ = read_table(tmp_path / "big.csv")  # no dtype given: not checked
    assert values.shape == (2, 2)
