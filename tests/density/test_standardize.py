import warnings

import pytest
import torch

import pyroflows
from pyroflows.density.standardize import (
    Standardization,
    add_standardization,
    moments,
    standardization_of,
)


def test_log_det_matches_autograd_and_round_trip():
    t = Standardization(3).double()
    t.set(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.1, 7.0]))
    u = torch.randn(3, dtype=torch.float64)
    x = t(u)
    jac = torch.autograd.functional.jacobian(lambda v: t.loc + t.scale * v, u)
    assert torch.allclose(jac, torch.autograd.functional.jacobian(t, u))
    assert torch.allclose(t.log_abs_det_jacobian(u, x), torch.linalg.slogdet(jac)[1])
    assert torch.allclose(t.inv(x), u)


def test_appended_layer_scores_in_data_units():
    torch.manual_seed(0)
    flow = pyroflows.maf(2, transforms=1, hidden=(8,))
    x = torch.randn(5, 2)
    before = flow().log_prob(x)
    layer = add_standardization(flow)
    assert standardization_of(flow) is layer
    assert add_standardization(flow) is layer
    loc, scale = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])
    layer.set(loc, scale)
    # p_X(m + s z) = p_Z(z) / prod(s)
    after = flow().log_prob(loc + scale * x)
    assert torch.allclose(after, before - scale.log().sum(), atol=1e-5)


def test_moments_dequantize_and_constant_columns():
    data = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    mean, sd = moments(data)
    assert torch.allclose(mean, torch.tensor([2.0, 5.0]))
    assert torch.allclose(sd, torch.tensor([(8 / 3) ** 0.5, 1.0]))  # constant column: sd 1
    mean_q, sd_q = moments(data, dequantize=True)
    assert torch.allclose(mean_q, mean + 0.5)
    assert torch.allclose(sd_q[0], torch.tensor(8 / 3 + 1 / 12).sqrt())


def test_set_rejects_bad_scale():
    t = Standardization(2)
    with pytest.raises(ValueError, match="shape"):
        t.set(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        t.set(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_small_scale_columns_are_standardized_and_constant_ones_left_alone():
    x = torch.tensor([[5e-7, 3.0], [5e-7 + 2e-8, 3.0], [5e-7 - 2e-8, 3.0]], dtype=torch.float64)
    mean, sd = moments(x, False)
    assert sd[0].item() == pytest.approx(x[:, 0].std(unbiased=False).item())
    assert sd[1].item() == 1.0


def test_a_column_float32_cannot_resolve_is_refused_by_name():
    import numpy as np

    from pyroflows.density import DataError, fit

    rng = np.random.default_rng(0)
    data = np.c_[rng.normal(size=500), rng.normal(1e8, 10.0, size=500)]  # float32 steps of 8
    flow = pyroflows.maf(2, transforms=1, hidden=(8,))
    with pytest.raises(DataError, match=r"column 2 \(index 1\) has mean 1e\+08 .* rounds its"):
        fit(flow, data, epochs=1, progress=False)
    flow64 = pyroflows.maf(2, transforms=1, hidden=(8,)).double()
    fit(flow64, data, epochs=1, progress=False)  # float64 resolves it
    assert standardization_of(flow64).scale[1].item() == pytest.approx(10.0, rel=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_columns_the_dtype_holds_well_enough_are_not_refused(dtype):
    import numpy as np

    from pyroflows.density import fit

    rng = np.random.default_rng(0)
    n = 1000
    for column, constant in (
        (np.full(n, 3.7), True),  # constant: float64 sums give an sd of ~1e-15, not 0
        (np.full(n, 1e8), True),
        (1_000_000 + rng.poisson(25, n).astype(float), False),  # float32 holds them exactly
        (np.float32(0.7) * rng.uniform(1, 2, n).astype(np.float32) / 1.5, False),  # float32
    ):
        counts = bool((column == np.floor(column)).all()) and np.ptp(column) > 0
        data = np.c_[rng.normal(size=n), column]
        flow = pyroflows.maf(2, transforms=1, hidden=(8,)).to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(flow, data, epochs=1, progress=False)
        said = [str(w.message) for w in caught]
        # the counts are said to be counts (whole numbers that repeat), not rounded
        spikes = [text for text in said if "hold whole numbers that repeat" in text]
        assert len(spikes) == int(counts), said
        said = [text for text in said if text not in spikes]
        # a constant column is said (a flow has no density there); no other is
        assert len(said) == int(constant), said
        assert all("data column(s) 2 (" in text for text in said)
        if constant:  # unit scale (float64 had 1e-15 from its sums' rounding)
            assert standardization_of(flow).scale[1].item() == 1.0


def test_a_column_whose_variance_overflows_float32_is_standardized():
    import numpy as np

    from pyroflows.density import fit

    data = np.random.default_rng(0).normal(size=(300, 2)) * [1e20, 1.0]  # var 1e40
    flow = pyroflows.maf(2, transforms=1, hidden=(8,))
    fit(flow, data, epochs=1, progress=False)
    assert standardization_of(flow).scale[0].item() == pytest.approx(1e20, rel=0.2)


def test_a_memory_mapped_column_float32_cannot_resolve_is_refused(tmp_path):
    import numpy as np

    from pyroflows.density import DataError, fit

    rng = np.random.default_rng(0)
    rounded = np.c_[rng.normal(size=500), rng.normal(1e8, 10.0, size=500)]
    counts = np.c_[rng.normal(size=500), 1_000_000 + rng.poisson(25, 500)]
    np.save(tmp_path / "rounded.npy", rounded)
    np.save(tmp_path / "counts.npy", counts)
    flow = pyroflows.maf(2, transforms=1, hidden=(8,))
    with pytest.raises(DataError, match=r"rounded.npy column 2 \(index 1\) .* rounds its"):
        fit(flow, np.load(tmp_path / "rounded.npy", mmap_mode="r"), epochs=1, progress=False)
    with pytest.warns(UserWarning, match="hold whole numbers that repeat"):  # not rounded
        fit(flow, np.load(tmp_path / "counts.npy", mmap_mode="r"), epochs=1, progress=False)
    flow64 = pyroflows.maf(2, transforms=1, hidden=(8,)).double()
    fit(flow64, np.load(tmp_path / "rounded.npy", mmap_mode="r"), epochs=1, progress=False)


def test_a_float64_column_with_a_tiny_relative_spread_is_not_taken_for_constant():
    import numpy as np

    from pyroflows.density import fit

    rng = np.random.default_rng(0)
    stamps = 1.7e18 + rng.uniform(0, 1e6, 300)  # nanosecond timestamps: 300 distinct values
    flow = pyroflows.maf(2, transforms=1, hidden=(8,)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(flow, np.c_[rng.normal(size=300), stamps], epochs=1, progress=False)
    assert standardization_of(flow).scale[1].item() == pytest.approx(stamps.std(), rel=0.1)


def test_in_memory_and_memory_mapped_data_get_the_same_rounding_decision(tmp_path):
    import numpy as np

    from pyroflows.density import DataError, fit

    rng = np.random.default_rng(0)
    n = 400
    columns = {
        "constant": (np.full(n, 3.7), False),
        "constant offset": (np.full(n, 1e8), False),
        "exact integers": (1_000_000 + rng.poisson(25, n).astype(float), False),
        "offset with sd 10": (rng.normal(1e8, 10.0, n), True),
        # float32 rounds every value to 1e8 exactly: constant after the cast, not before
        "offset with sd 1e-3": (1e8 + rng.normal(0.0, 1e-3, n), True),
        # float32 flushes every value to zero; the variance, 1e-340, is below float64's
        # normal range, so a sd from the plain sum of squares reads 0 ("constant")
        "sd 1e-170": (rng.normal(0.0, 1e-170, n), True),
    }
    for column, refused in columns.values():
        data = np.c_[rng.normal(size=n), column]
        np.save(tmp_path / "data.npy", data)
        for source in (data, np.load(tmp_path / "data.npy", mmap_mode="r")):
            flow = pyroflows.maf(2, transforms=1, hidden=(8,))
            if refused:
                with pytest.raises(DataError, match=r"column 2 \(index 1\) .* rounds its"):
                    fit(flow, source, epochs=1, progress=False)
            elif np.ptp(column) == 0:
                with pytest.warns(UserWarning, match=r"data column\(s\) 2 \(.*\) hold one"):
                    fit(flow, source, epochs=1, progress=False)
            elif (column == np.floor(column)).all():  # counts, said to be counts
                with pytest.warns(UserWarning, match="hold whole numbers that repeat"):
                    fit(flow, source, epochs=1, progress=False)
            else:
                fit(flow, source, epochs=1, progress=False)
