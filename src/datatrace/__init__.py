"""datatrace: training data influence, verified against retraining.

``score[q, i]`` estimates ``f_q(theta_without_i) - f_q(theta_hat)``: the change of query q's measurement (by
default its loss) if training example i were removed and the model retrained, in the measurement's units.
"""

from . import metrics, retrain
from ._validation import NotFittedError
from .diagnostics import RegressionDiagnostics, linear_regression_diagnostics
from .influence import InfluenceFunction
from .projected import TRAK, ProjectedInfluence
from .projection import FactorizedProjector, RandomProjector
from .scores import Scores, TopK
from .sklearn import SklearnInfluence, from_sklearn
from .store import GradientStore
from .tasks import ClassificationTask, RegressionTask, Task
from .tracin import TracIn

__version__ = "0.1.0"

__all__ = [
    "TRAK",
    "ClassificationTask",
    "FactorizedProjector",
    "GradientStore",
    "InfluenceFunction",
    "NotFittedError",
    "ProjectedInfluence",
    "RandomProjector",
    "RegressionDiagnostics",
    "RegressionTask",
    "Scores",
    "SklearnInfluence",
    "Task",
    "TopK",
    "TracIn",
    "__version__",
    "from_sklearn",
    "linear_regression_diagnostics",
    "metrics",
    "retrain",
]
