"""Continual methods, each a LightningModule (subclass of ContinualModule)."""

from cl_lightning.methods.ari import ARILearner
from cl_lightning.methods.base import ContinualModule, JointTraining
from cl_lightning.methods.hnet import HNET
from cl_lightning.methods.impresslearn import ImpressLearn
from cl_lightning.methods.mark import MARK
from cl_lightning.methods.supsup import SupermaskModule, SupSup

__all__ = ["HNET", "MARK", "ARILearner", "ContinualModule", "ImpressLearn", "JointTraining", "SupSup",
           "SupermaskModule"]
