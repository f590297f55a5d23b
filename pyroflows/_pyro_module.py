"""Refusing Pyro's ``to_pyro_module_``, which would leave our networks untrained.

``pyro.nn.module.to_pyro_module_(m)`` turns a module into a ``PyroModule`` in place (by
setting ``m.__class__``), whose parameters become param sites when they are read as
attributes. Our networks read theirs directly (each network's weights are one packed
tensor, split into views per call), so converted they would have no param site, and
SVI with a ``pyro.optim`` optimizer would step nothing, without a word. The modules
that hold weights (layers, networks, flows) refuse the conversion instead, naming the
ways that work.
"""

from __future__ import annotations

from typing import Any

from pyro.nn import PyroModule


class RefusesPyroModule:
    """A module that ``to_pyro_module_`` may not convert (see the module docstring)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__class__" and isinstance(value, type) and issubclass(value, PyroModule):
            raise TypeError(
                f"pyro.nn.module.to_pyro_module_ cannot convert pyroflows modules "
                f"({type(self).__name__}): their networks read their weights directly (one "
                f"packed tensor each), past the PyroModule attribute access that would make "
                f"them param sites, so SVI would never train them. Register the flow in the "
                f"guide instead, pyro.module('flow', flow), or hold it in a PyroModule as a "
                f"plain nn.Module attribute"
            )
        super().__setattr__(name, value)
