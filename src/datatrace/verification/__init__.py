"""Ground truth and its comparison: training to a tight minimum, leave-one-out and subset retraining, metrics
(LOO correlation, LDS, detection curves), classical regression diagnostics."""

from datatrace.verification import diagnostics, metrics, retrain, training
from datatrace.verification.training import fit_full_batch
from datatrace.verification.verify import Verification, verify

__all__ = ["Verification", "diagnostics", "fit_full_batch", "metrics", "retrain", "training", "verify"]
