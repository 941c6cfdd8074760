"""Continual-learning plugins (ContinualCallback subclasses). Add one by dropping a file here."""

from cl_lightning.callbacks.ari_consolidation import ARIConsolidation
from cl_lightning.callbacks.ewc import EWC
from cl_lightning.callbacks.gem import AGEM, GEM
from cl_lightning.callbacks.gradient_sign import GradientSignFilter
from cl_lightning.callbacks.hat import HardAttention
from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer
from cl_lightning.callbacks.icarl import ICaRLExemplars
from cl_lightning.callbacks.lr_schedule import CosineLR
from cl_lightning.callbacks.lwf import LwF
from cl_lightning.callbacks.mark_meta_update import MARKMetaUpdate
from cl_lightning.callbacks.mask_basis import MaskBasisFreezing
from cl_lightning.callbacks.packnet import PackNetPruning
from cl_lightning.callbacks.rehearsal import RehearsalPlugin
from cl_lightning.callbacks.replay import DarkExperienceReplay, ExperienceReplay
from cl_lightning.callbacks.si import SI
from cl_lightning.callbacks.task_inference import ReplayModelRegularizer, TaskInferenceReplay

__all__ = ["AGEM", "EWC", "CosineLR", "GEM", "SI", "ARIConsolidation", "DarkExperienceReplay", "ExperienceReplay",
           "GradientSignFilter", "HardAttention", "ICaRLExemplars", "LwF", "MARKMetaUpdate", "MaskBasisFreezing",
           "OutputRegularizer", "PackNetPruning", "RehearsalPlugin", "ReplayModelRegularizer", "TaskInferenceReplay"]
