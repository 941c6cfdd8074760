"""Continual methods, each a LightningModule (subclass of ContinualModule)."""

from cl_lightning.methods.ari import ARILearner
from cl_lightning.methods.base import ContinualModule, JointTraining
from cl_lightning.methods.er_ace import ERACE
from cl_lightning.methods.gdumb import GDumb
from cl_lightning.methods.hat import HAT
from cl_lightning.methods.hnet import HNET
from cl_lightning.methods.hnet_tir import HNETTIR
from cl_lightning.methods.icarl import ICaRL
from cl_lightning.methods.impresslearn import ImpressLearn
from cl_lightning.methods.mark import MARK
from cl_lightning.methods.packnet import PackNet
from cl_lightning.methods.prompts import L2P, CODAPrompt, DualPrompt, SimpleCIL
from cl_lightning.methods.replay import DGR, HNETR, VAEReplayModule
from cl_lightning.methods.supsup import SupermaskModule, SupSup

__all__ = ["DGR", "HAT", "HNET", "HNETR", "HNETTIR", "L2P", "MARK", "ARILearner", "CODAPrompt", "ContinualModule",
           "DualPrompt", "ERACE", "GDumb", "ICaRL", "ImpressLearn", "JointTraining", "PackNet", "SimpleCIL", "SupSup",
           "SupermaskModule", "VAEReplayModule"]
