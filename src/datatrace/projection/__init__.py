"""Projected per-example gradients: random and LoGra-style factorised projectors, the on-disk gradient store."""

from datatrace.projection.projectors import FactorizedProjector, Projector, RandomProjector
from datatrace.projection.store import GradientStore

__all__ = ["FactorizedProjector", "GradientStore", "Projector", "RandomProjector"]
