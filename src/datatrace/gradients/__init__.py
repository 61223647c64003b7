"""Everything ``torch.func`` computes on a copied model: per-example gradients, objective gradients, curvature-vector
products and dense curvature matrices."""

from datatrace.gradients.functional import FunctionalModel, prepare_model

__all__ = ["FunctionalModel", "prepare_model"]
