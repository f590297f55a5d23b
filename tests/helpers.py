"""Helpers shared by the tests: perturbing parameters off the identity, Jacobians, steps."""

from __future__ import annotations

import struct
import zipfile

import torch
from torch import nn


def weights_and_biases(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter, a packed network's ``flat`` as its layers' weights and biases.

    In the order ``module.parameters()`` gave when each layer held its own parameters,
    so noise drawn tensor by tensor is the same whether the networks are packed or not.
    """
    from pyroflows.nn.mlp import ContextTrunk
    from pyroflows.nn.packed import split_flat

    found = []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, ContextTrunk) and name == "flat":
                found += [t for pair in split_flat(m) for t in pair if t is not None]
            else:
                found.append(p)
    return found


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Add seeded noise to every weight so the module is far from its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in weights_and_biases(module):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.add_(scale * noise.to(p.dtype))
    return module


def batched_jacobian(fn, u: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` at each row of ``u`` (shape ``(*batch, D)``) -> ``(*batch, D, D)``.

    Computes the full Jacobian of the flattened map and checks that rows do not interact
    (the off-diagonal blocks are zero), then returns the diagonal blocks.
    """
    dim = u.shape[-1]
    batch = u.shape[:-1]
    flat = u.reshape(-1, dim)
    n = flat.shape[0]

    def flat_fn(v):
        return fn(v.reshape(*batch, dim)).reshape(n, dim)

    jac = torch.autograd.functional.jacobian(flat_fn, flat)  # (n, D, n, D)
    blocks = jac[torch.arange(n), :, torch.arange(n), :]  # (n, D, D)
    off = jac.clone()
    off[torch.arange(n), :, torch.arange(n), :] = 0
    assert off.abs().max() == 0, "rows of the batch interact"
    return blocks.reshape(*batch, dim, dim)


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-8, "rtol": 1e-8}


def one_adam_step_moves_outputs_by(module: nn.Module, *inputs: torch.Tensor) -> float:
    """The largest change of ``module(*inputs)`` after one Adam step (lr 0.01) on its sum."""
    before = module(*inputs).detach()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    module(*inputs).sum().backward()
    optimizer.step()
    return (module(*inputs).detach() - before).abs().max().item()


def flip_a_weight_bit(path):
    """Flip one bit of the first tensor stored in ``torch.save``'s archive at ``path``.

    Returns the archive member it damaged. ``torch.load`` still reads the file.
    """

    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    with open(path, "r+b") as stream:
        stream.seek(member.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", stream.read(4))
        start = member.header_offset + 30 + name_length + extra_length
        stream.seek(start)
        byte = stream.read(1)[0]
        stream.seek(start)
        stream.write(bytes([byte ^ 0x40]))
    return member.filename
