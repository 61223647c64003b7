"""Attributors: fit on training data, score queries against it (influence functions, projected influence, TRAK,
TracIn, scikit-learn estimators)."""

from datatrace.attributors.influence import InfluenceFunction
from datatrace.attributors.projected import TRAK, ProjectedInfluence
from datatrace.attributors.sklearn import SklearnInfluence, from_sklearn
from datatrace.attributors.tracin import TracIn

__all__ = ["TRAK", "InfluenceFunction", "ProjectedInfluence", "SklearnInfluence", "TracIn", "from_sklearn"]
