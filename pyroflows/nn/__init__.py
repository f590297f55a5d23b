"""Conditioners: networks that output the parameters of a flow layer."""

from pyroflows.nn.made import MADE, MaskedLinear
from pyroflows.nn.mlp import MLP, ContextTrunk, ScaledLinear
from pyroflows.nn.packed import PackedLinear

__all__ = ["MADE", "MLP", "ContextTrunk", "MaskedLinear", "PackedLinear", "ScaledLinear"]
