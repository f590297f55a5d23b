"""Permutation, LU-linear and ActNorm specifics (shared properties: test_properties.py)."""

from __future__ import annotations

import io

import pytest
import torch

from pyroflows.transforms import ActNorm, LULinear, Permutation
from tests.helpers import perturb


def test_permutation_reverse_and_given():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert Permutation(3, "reverse")(x).tolist() == [3.0, 2.0, 1.0]
    t = Permutation(3, [2, 0, 1])
    assert t(x).tolist() == [3.0, 1.0, 2.0]
    assert t.inv(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("permutation", "match"),
    [
        ("shuffle", "permutation must be 'random', 'reverse' or a sequence"),
        ([0, 0, 1], r"permutation must be a permutation of range\(3\)"),
        ([0, 1], r"permutation must be a permutation of range\(3\)"),
    ],
)
def test_permutation_bad_input(permutation, match):
    with pytest.raises(ValueError, match=match):
        Permutation(3, permutation)


def test_permutation_is_a_saved_buffer():
    torch.manual_seed(0)
    t = Permutation(6, "random")
    other = Permutation(6, "random")
    assert not torch.equal(t.permutation, other.permutation)
    other.load_state_dict(t.state_dict())
    x = torch.randn(6)
    torch.testing.assert_close(other(x), t(x))


def test_lu_weight_and_log_det():
    t = perturb(LULinear(4)).double()
    weight = t.weight()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ weight.T + t.bias)
    torch.testing.assert_close(
        t.log_abs_det_jacobian(x, t(x)), torch.linalg.slogdet(weight)[1].expand(3)
    )
    assert torch.linalg.slogdet(weight)[0] > 0  # LU with a positive diagonal: orientation kept


def test_actnorm_standardizes_the_first_data_batch():
    data = 3.0 * torch.randn(500, 2) + torch.tensor([5.0, -1.0])
    t = ActNorm(2)
    u = t.inv(data)
    torch.testing.assert_close(u.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(u.std(0), torch.ones(2), atol=1e-5, rtol=0)
    assert bool(t.initialized)
    # later batches do not re-initialise it
    before = t.log_scale.detach().clone()
    t.inv(torch.randn(100, 2))
    torch.testing.assert_close(t.log_scale.detach(), before)


def test_actnorm_standardizes_the_first_base_batch_when_sampling_first():
    t = ActNorm(2)
    u = 0.5 * torch.randn(400, 2) + 2.0
    x = t(u)
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(2), atol=1e-5, rtol=0)


def test_actnorm_waits_for_a_batch_it_can_take_statistics_of():
    t = ActNorm(3)
    t.inv(torch.randn(3))  # a single point: no standard deviation to take
    assert not bool(t.initialized)


def test_actnorm_loaded_state_is_not_reinitialised():
    t = ActNorm(2)
    t.inv(4.0 * torch.randn(100, 2))
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm(2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(50, 2) * 100
    torch.testing.assert_close(fresh.inv(x), t.inv(x.clone()))


def test_actnorm_without_data_init_is_the_identity():
    t = ActNorm(3, data_init=False)
    x = 7 * torch.randn(10, 3)
    torch.testing.assert_close(t.inv(x), x)
