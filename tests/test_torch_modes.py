"""The probes of torch's transform modes: each must see its mode, and only it."""

import torch
from torch.autograd import forward_ad

from pyroflows._torch_modes import forward_ad_active, functorch_active, is_vmap_batch


def test_functorch_active_inside_vmap_and_jacrev_only():
    seen = []

    def f(x):
        seen.append(functorch_active())
        return x * 2

    f(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    torch.func.jacrev(f)(torch.ones(3))
    assert seen == [False, True, True]
    assert not functorch_active()


def test_is_vmap_batch_sees_the_mapped_tensor_not_a_plain_one():
    seen = []

    def f(x):
        seen.append(is_vmap_batch(x))
        return x

    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [True]
    assert not is_vmap_batch(torch.ones(3))


def test_forward_ad_active_inside_a_dual_level_only():
    assert not forward_ad_active()
    with forward_ad.dual_level():
        assert forward_ad_active()
    assert not forward_ad_active()
