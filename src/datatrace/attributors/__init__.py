"""Attributors: fit on training data, score queries against it (influence functions, projected influence, TRAK,
TracIn, scikit-learn estimators)."""

from datatrace.attributors.base import Attributor
from datatrace.attributors.influence import InfluenceFunction
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.attributors.sklearn import SklearnInfluence, from_sklearn
from datatrace.attributors.tracin import TracIn
from datatrace.attributors.trak import TRAK

__all__ = [
    "TRAK",
    "Attributor",
    "InfluenceFunction",
    "ProjectedInfluence",
    "SklearnInfluence",
    "TracIn",
    "from_sklearn",
]
