"""Networks used as backbones, hypernetworks, weightless targets and supermasked nets."""

from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork, HyperNetwork
from cl_lightning.nets.masked import MaskedLeNet300100, MaskedMLP, MaskedResNet18
from cl_lightning.nets.mlp import MLP
from cl_lightning.nets.resnet import ReducedResNet18, ResNet18

__all__ = ["MLP", "ChunkedHyperNetwork", "HyperNetwork", "MaskedLeNet300100", "MaskedMLP",
           "MaskedResNet18", "ReducedResNet18", "ResNet18"]
