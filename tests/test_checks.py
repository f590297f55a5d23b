"""The shared argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyroflows._checks import broadcast_shape

SHAPES = [(), (1,), (3,), (5,), (0,), (2, 1), (1, 3), (2, 3), (1, 0), (3, 1, 1), (4, 2, 3)]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(SHAPES, repeat=2)))
def test_broadcast_shape_agrees_with_torch(a, b):
    try:
        expected = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        expected = None
    assert broadcast_shape(a, b) == expected


def test_check_positive_int_takes_any_integral_type_and_returns_an_int():
    import numpy as np

    from pyroflows._checks import check_hidden, check_positive_int

    value = check_positive_int(np.int64(3), "transforms")
    assert value == 3
    assert type(value) is int
    assert check_hidden(np.array([8, 4])) == (8, 4)
    assert all(type(size) is int for size in check_hidden((np.int32(8),)))
    for bad in (True, 2.0, np.float64(2.0), "2"):
        with pytest.raises(TypeError, match="transforms must be an int"):
            check_positive_int(bad, "transforms")
    with pytest.raises(ValueError, match="transforms must be an int >= 1, got 0"):
        check_positive_int(np.int64(0), "transforms")
