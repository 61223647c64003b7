"""datatrace: training data influence, verified against retraining.

``score[q, i]`` estimates ``f_q(theta_without_i) - f_q(theta_hat)``: the change of query q's measurement (by
default its loss) if training example i were removed and the model retrained, in the measurement's units.
"""

from datatrace.attributors.influence import InfluenceFunction
from datatrace.attributors.metagradient import Metagradient
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.attributors.sklearn import SklearnInfluence, from_sklearn
from datatrace.attributors.tracin import TracIn
from datatrace.attributors.tracin_recorded import RecordedTracIn
from datatrace.attributors.trak import TRAK
from datatrace.errors import NotFittedError
from datatrace.projection import FactorizedProjector, RandomProjector
from datatrace.projection.store import GradientStore
from datatrace.run.recording import Recorder, Recording
from datatrace.scores import Scores, TopK
from datatrace.tasks import ClassificationTask, RegressionTask, Task
from datatrace.verification import metrics, retrain, training
from datatrace.verification.diagnostics import RegressionDiagnostics, linear_regression_diagnostics

__version__ = "0.1.0"

__all__ = [
    "TRAK",
    "ClassificationTask",
    "FactorizedProjector",
    "GradientStore",
    "InfluenceFunction",
    "Metagradient",
    "NotFittedError",
    "ProjectedInfluence",
    "RandomProjector",
    "RecordedTracIn",
    "Recorder",
    "Recording",
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
    "training",
]
