"""Permutation, LU-linear and ActNorm specifics (shared properties: test_properties.py)."""

from __future__ import annotations

import io
import math

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
        ([2.9, 0.2, 1.5], r"permutation must be a permutation .* sequence of ints"),
        (torch.tensor([2.0, 0.0, 1.0]), r"permutation must be a permutation"),
        ([True, False, 2], r"permutation must be a permutation"),
    ],
)
def test_permutation_bad_input(permutation, match):
    with pytest.raises(ValueError, match=match):
        Permutation(3, permutation)


def test_permutation_sign_is_its_determinants():
    assert Permutation(3, [0, 1, 2]).sign == 1
    assert Permutation(3, [1, 0, 2]).sign == -1  # one swap
    assert Permutation(3, [1, 2, 0]).sign == 1  # a 3-cycle: two swaps
    assert Permutation(4, "reverse").sign == 1  # two swaps
    assert Permutation(5, "reverse").sign == 1
    assert Permutation(2, "reverse").sign == -1
    t = Permutation(4, [2, 0, 3, 1])
    assert t.sign == round(torch.linalg.det(torch.eye(4)[:, t.permutation]).item())


def test_actnorm_initialized_flag_is_saved_with_the_state():
    # a loaded layer whose fitted parameters are exactly 0 must not re-initialise
    assert "initialized" in ActNorm(2).state_dict()
    t = ActNorm(2)
    t.inv(torch.randn(50, 2))
    with torch.no_grad():
        t.log_scale.zero_()
        t.shift.zero_()
    fresh = ActNorm(2)
    fresh.load_state_dict(t.state_dict())
    x = 5.0 * torch.randn(100, 2) + 3.0
    torch.testing.assert_close(fresh.inv(x), x)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lu_inverse_in_half_precision_solves_in_float32(dtype):
    # torch has no half-precision triangular solve: the layer solves in float32 and
    # returns the layer's dtype, with gradients, rather than raising NotImplementedError
    torch.manual_seed(0)
    t = perturb(LULinear(4))
    x = torch.randn(5, 4)
    exact = t.inv(x.clone())
    half = t.to(dtype)
    u = half.inv(x.to(dtype))
    assert u.dtype == dtype
    torch.testing.assert_close(u.float(), exact, atol=0.05, rtol=0.02)
    u.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in half.parameters())


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_actnorm_refuses_to_initialise_from_a_batch_with_non_finite_values(bad):
    data = torch.randn(5, 3)
    data[3, 2] = bad
    t = ActNorm(3)
    with pytest.raises(ValueError, match=r"holds (nan|inf) \(at row 3, coordinate 2"):
        t.inv(data)
    assert not bool(t.initialized)  # not poisoned: a clean batch still initialises it
    u = t.inv(torch.randn(200, 3) * 2.0 + 1.0)
    assert torch.isfinite(t.log_scale).all()
    torch.testing.assert_close(u.std(0), torch.ones(3), atol=1e-5, rtol=0)


def test_actnorm_data_init_must_be_a_bool():
    with pytest.raises(TypeError, match="data_init must be True or False, got 'yes'"):
        ActNorm(3, data_init="yes")


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


def test_actnorm_under_vmap_says_to_initialise_first_and_then_maps_as_without():
    t = ActNorm(3)
    x = 2 * torch.randn(6, 4, 3) + 1
    with pytest.raises(RuntimeError, match=r"run the flow once on a batch.*before vmap"):
        torch.func.vmap(t.inv)(x)
    assert not bool(t.initialized)
    t.inv(x[0])  # one batch initialises it
    torch.testing.assert_close(torch.func.vmap(t.inv)(x), t.inv(x))
    torch.testing.assert_close(torch.func.vmap(t)(x), t(x))
    torch.testing.assert_close(torch.func.vmap(ActNorm(3, data_init=False))(x), x)


def test_actnorm_without_data_init_is_the_identity():
    t = ActNorm(3, data_init=False)
    x = 7 * torch.randn(10, 3)
    torch.testing.assert_close(t.inv(x), x)


def test_actnorm_trained_while_waiting_keeps_its_values():
    # an SVI guide draws one point per step: ActNorm waits, but its parameters train
    t = ActNorm(2)
    t(torch.randn(2))
    with torch.no_grad():
        t.log_scale.add_(torch.tensor([0.3, -0.2]))
        t.shift.add_(torch.tensor([1.0, 2.0]))
    trained = (t.log_scale.detach().clone(), t.shift.detach().clone())
    t(5.0 * torch.randn(1000, 2))  # the first batch comes later: no overwrite
    assert bool(t.initialized)
    torch.testing.assert_close(t.log_scale.detach(), trained[0])
    torch.testing.assert_close(t.shift.detach(), trained[1])


def test_actnorm_waits_out_copies_of_one_point_and_keeps_flat_columns_at_unit_scale():
    t = ActNorm(2)
    t.inv(torch.tensor([0.5, -0.2]).expand(16, 2))  # one point under 16 contexts
    assert not bool(t.initialized)
    x = torch.stack([3.0 * torch.randn(200) + 1.0, torch.full((200,), 7.0)], -1)
    u = t.inv(x)
    assert bool(t.initialized)
    assert t.log_scale[1].item() == 0.0  # no spread: unit scale, not 1e-6
    torch.testing.assert_close(u[:, 1], torch.zeros(200))
    torch.testing.assert_close(u[:, 0].std(), torch.tensor(1.0))
    # 0.1 has no exact float32 form: its float32 mean and sd are off by rounding (sd 7e-9),
    # which would scale the column by 1e8; the statistics are taken in float64
    t = ActNorm(2)
    u = t.inv(torch.stack([torch.randn(100), torch.full((100,), 0.1)], -1))
    assert t.log_scale[1].item() == 0.0
    assert bool((u[:, 1] == 0).all())  # its mean exactly 0.1: in float32 it was 1e-8 off


def test_actnorm_standardizes_a_float32_column_with_a_large_offset():
    torch.manual_seed(0)
    t = ActNorm(2)
    x = torch.stack([torch.randn(500), 1e6 + 0.5 * torch.randn(500)], -1)
    u = t.inv(x)
    assert t.log_scale[1].item() == pytest.approx(math.log(0.5), abs=0.1)
    assert u[:, 1].std().item() == pytest.approx(1.0, abs=0.1)
