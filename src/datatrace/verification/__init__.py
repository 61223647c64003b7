"""Ground truth and its comparison: training to a tight minimum, leave-one-out and subset retraining, metrics
(LOO correlation, LDS, detection curves), classical regression diagnostics."""

from datatrace.verification import diagnostics, metrics, retrain, training
from datatrace.verification.training import fit_full_batch

__all__ = ["diagnostics", "fit_full_batch", "metrics", "retrain", "training"]
