"""Projected per-example gradients: random and LoGra-style factorised projectors, the on-disk gradient store."""

from datatrace.projection.factorized import FactorizedProjector
from datatrace.projection.random import Projector, RandomProjector
from datatrace.projection.store import GradientStore

__all__ = ["FactorizedProjector", "GradientStore", "Projector", "RandomProjector"]
