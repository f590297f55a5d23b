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
