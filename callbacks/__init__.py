"""Continual-learning plugins (ContinualCallback subclasses). Add one by dropping a file here."""

from callbacks.ari_consolidation import ARIConsolidation
from callbacks.ewc import EWC
from callbacks.gradient_sign import GradientSignFilter
from callbacks.hnet_regularizer import OutputRegularizer
from callbacks.mark_meta_update import MARKMetaUpdate
from callbacks.mask_basis import MaskBasisFreezing

__all__ = ["ARIConsolidation", "EWC", "GradientSignFilter", "MARKMetaUpdate", "MaskBasisFreezing",
           "OutputRegularizer"]
