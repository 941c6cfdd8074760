"""Continual-learning plugins (ContinualCallback subclasses). Add one by dropping a file here."""

from callbacks.ari_consolidation import ARIConsolidation
from callbacks.ewc import EWC
from callbacks.gem import AGEM, GEM
from callbacks.gradient_sign import GradientSignFilter
from callbacks.hnet_regularizer import OutputRegularizer
from callbacks.icarl import ICaRLExemplars
from callbacks.lwf import LwF
from callbacks.mark_meta_update import MARKMetaUpdate
from callbacks.mask_basis import MaskBasisFreezing
from callbacks.rehearsal import RehearsalPlugin
from callbacks.replay import DarkExperienceReplay, ExperienceReplay
from callbacks.si import SI

__all__ = ["AGEM", "EWC", "GEM", "SI", "ARIConsolidation", "DarkExperienceReplay", "ExperienceReplay",
           "GradientSignFilter", "ICaRLExemplars", "LwF", "MARKMetaUpdate", "MaskBasisFreezing", "OutputRegularizer",
           "RehearsalPlugin"]
