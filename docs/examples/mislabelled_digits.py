"""datatrace spec: handwritten digits with 5% of the training labels flipped on purpose.

Find the flipped labels by self-influence, rank training images by their harm to the validation loss, and check
by actual retraining that removing the most harmful ones helps:

    datatrace debug docs/examples/mislabelled_digits.py \
        --flagged docs/examples/mislabelled_digits_flagged.txt --out out/digits

The data are scikit-learn's bundled 8x8 digits (``datatrace.datasets.flipped_digits``): 1,000 training and 300
validation images (a seeded, stratified split); 50 training labels are changed to another, random class, and their
indices are listed in ``mislabelled_digits_flagged.txt`` (one per line; ``python docs/examples/mislabelled_digits.py`` rewrites it).
The model is multinomial logistic regression with weight decay 1e-3, trained to a tight minimum with
full-batch L-BFGS (influence functions describe a minimum).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

import datatrace
from datatrace.datasets import flipped_digits
from datatrace.verification.training import fit_full_batch

kind = "image"
image_shape = (8, 8)
curvature = "exact"  # 650 parameters: the exact Hessian is small and gives the best answer
WEIGHT_DECAY = 1e-3
N_TRAIN, N_VALIDATION, FLIP_FRACTION, SEED = 1000, 300, 0.05, 0
FLAGGED_FILE = Path(__file__).with_name("mislabelled_digits_flagged.txt")


@functools.cache
def _digits():
    d = flipped_digits(SEED, FLIP_FRACTION, N_TRAIN, N_VALIDATION, flip_seed=SEED, flip_in_index_order=True)
    return d.train(), d.test(), np.flatnonzero(d.flipped)


def train():
    """Pixels in [0, 1] and the labels trained on (50 of them flipped)."""
    return _digits()[0]


def validation():
    """300 held-out images with their true labels."""
    return _digits()[1]


def task():
    return datatrace.ClassificationTask(weight_decay=WEIGHT_DECAY)


def _fit(start, data):
    return fit_full_batch(start, task(), data, max_iter=2000, tolerance_grad=1e-9)


@functools.cache
def _trained():
    torch.manual_seed(SEED)
    return _fit(torch.nn.Linear(64, 10).double(), train())


def model():
    return _trained()


def train_fn(subset):
    """Retrain on a subset of train(), warm-started from the trained weights (same minimum: the loss is convex)."""
    return _fit(_trained(), subset)


if __name__ == "__main__":
    indices = _digits()[2]
    FLAGGED_FILE.write_text(
        "# training indices of mislabelled_digits.py whose labels were flipped on purpose\n"
        + "\n".join(str(i) for i in indices)
        + "\n"
    )
    print(f"wrote {len(indices)} indices to {FLAGGED_FILE}")
