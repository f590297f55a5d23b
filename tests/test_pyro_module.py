"""pyroflows modules refuse Pyro's to_pyro_module_, which would leave them untrained."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_

import pyroflows
from pyroflows.infer import amortized_posterior
from pyroflows.nn import MADE
from pyroflows.transforms import AffineAutoregressive, AffineCoupling


def test_to_pyro_module_is_refused_not_left_untrained():
    # converted, the layer's packed weights never became param sites: SVI trained nothing
    for module in (
        AffineCoupling(4, hidden=(8,)),
        pyroflows.maf(3, transforms=1),  # refused whole, before any part is converted
        MADE(3, 2, hidden=(8,)),  # a network alone trained nothing either
        amortized_posterior(4, 2, hidden=(8,)),  # its encoder was converted before the flow
    ):
        name = type(module).__name__
        with pytest.raises(TypeError, match=rf"to_pyro_module_ cannot .*\({name}\)"):
            to_pyro_module_(module)
        assert not any(isinstance(m, PyroModule) for m in module.modules())
    # held by a PyroModule as a plain module, it trains
    target = dist.Normal(torch.tensor([3.0, -2.0, 1.0, 0.5]), 0.3).to_event(1)

    class Guide(PyroModule):
        def __init__(self):
            super().__init__()
            self.layer = AffineAutoregressive(4, hidden=(16,))

        def forward(self):
            base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [self.layer]))

    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = Guide()
    svi = SVI(lambda: pyro.sample("z", target), guide, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(300)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 10
