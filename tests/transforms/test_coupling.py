"""Coupling specifics (shared properties: test_properties.py)."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAdditiveCoupling,
    ConditionalAffineCoupling,
)
from tests.helpers import perturb


def test_nice_log_det_is_exactly_zero():
    t = perturb(AdditiveCoupling(6, hidden=(16,)))
    u = torch.randn(10, 6)
    x = t(u)
    assert not torch.allclose(x, u)
    assert (t.log_abs_det_jacobian(u, x) == 0).all()
    assert (t.log_abs_det_jacobian(u.clone(), x.detach().clone()) == 0).all()


@pytest.mark.parametrize("split", [1, 2, 4])
def test_first_split_coordinates_pass_through(split):
    t = perturb(AffineCoupling(5, split=split, hidden=(16,)))
    u = torch.randn(3, 5)
    x = t(u)
    torch.testing.assert_close(x[:, :split], u[:, :split])
    assert not torch.allclose(x[:, split:], u[:, split:])


def test_context_changes_the_map():
    t = perturb(ConditionalAffineCoupling(4, 2, hidden=(16,)))
    u = torch.randn(4)
    assert not torch.allclose(t.condition(torch.zeros(2))(u), t.condition(torch.ones(2))(u))


@pytest.mark.parametrize("cls", [AffineCoupling, AdditiveCoupling])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 1}, "dim must be >= 2 for a coupling layer"),
        ({"dim": 4, "split": 0}, r"split must be an int in \[1, 3\], got 0"),
        ({"dim": 4, "split": 4}, r"split must be an int in \[1, 3\], got 4"),
        ({"dim": 4, "split": 1.5}, r"split must be an int in \[1, 3\], got 1.5"),
        ({"dim": 4, "split": True}, r"split must be an int in \[1, 3\], got True"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [ConditionalAffineCoupling, ConditionalAdditiveCoupling])
def test_conditional_needs_a_context_size(cls):
    with pytest.raises(ValueError, match="context must be an int >= 1, got 0"):
        cls(4, 0)


def test_split_takes_numpy_ints_and_activation_must_be_a_class():
    import numpy as np
    from torch import nn

    from pyroflows.transforms import AffineCoupling

    layer = AffineCoupling(4, split=np.int64(1))
    assert layer.split == 1
    assert type(layer.split) is int
    with pytest.raises(TypeError, match=r"not an instance such as nn.ReLU\(\)"):
        AffineCoupling(4, activation=nn.ReLU())
