"""Pure linear algebra shared by the curvature routes, the projected curvature and the K-FAC family.

Nothing here knows about models, tasks or data: functions take tensors (or a matrix-vector product) and return
tensors.
"""

from __future__ import annotations

import torch

__all__ = ["zero_tolerance"]


def zero_tolerance(size: int, dtype: torch.dtype) -> float:
    """The relative tolerance below which an eigenvalue counts as zero: ``10 * max(size, 10) * eps(dtype)``.

    An eigenvalue ``e`` of a symmetric ``size x size`` matrix is treated as zero when
    ``|e| <= zero_tolerance(size, dtype) * max|e|``: the round-off of a symmetric eigensolver grows like
    ``size * eps * ||A||`` (Golub & Van Loan, *Matrix Computations*, 4th ed., section 8.1), so anything smaller
    is indistinguishable from zero.
    """
    return max(int(size), 10) * torch.finfo(dtype).eps * 10
