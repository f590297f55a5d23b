"""Conditioners: networks that output the parameters of a flow layer."""

from pyroflows.nn.made import MADE, MaskedLinear
from pyroflows.nn.mlp import MLP, ScaledLinear

__all__ = ["MADE", "MLP", "MaskedLinear", "ScaledLinear"]
