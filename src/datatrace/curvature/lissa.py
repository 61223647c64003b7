"""LiSSA: a stochastic Neumann series for the inverse curvature (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017).

With ``A_j`` the curvature on the ``j``-th random minibatch and ``s`` the scale,
``h_0 = v, h_j = v + (I - (A_j + damping I) / s) h_{j-1}`` and ``E h_j -> s (A + damping I)^{-1} v`` when every
eigenvalue of ``(A_j + damping I) / s`` lies in ``(0, 2)``. ``damping="auto"`` and ``scale="auto"`` come from a
short Lanczos estimate (:mod:`datatrace.curvature.matrix_free`, :func:`datatrace.linalg.estimate_spectrum`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from datatrace.curvature.base import check_damping, check_random_state
from datatrace.curvature.matrix_free import MatrixFree
from datatrace.data import DataSource, as_data_source
from datatrace.errors import bad_value, check_choice, check_nonnegative_float, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import MATRICES, curvature_operator
from datatrace.linalg import Operator, estimate_spectrum, positive_definite_damping

logger = logging.getLogger(__name__)

#: ``scale="auto"`` is this factor times the largest eigenvalue estimate of ``A + damping I``
SCALE_SAFETY = 1.5
#: minibatches probed (short Lanczos each) for the ``scale="auto"`` estimate
SCALE_PROBES = 4
#: a convergent series has ``||h_j|| <= (j + 1) ||v||``; LiSSA stops beyond this multiple of that bound
DIVERGENCE_FACTOR = 10.0


class _Minibatches:
    """Minibatch indices without replacement within an epoch (a fresh permutation each epoch), seeded."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order = torch.randperm(n, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx


class LiSSA(MatrixFree):
    """Stochastic Neumann-series inverse (LiSSA: Agarwal, Bullins & Hazan 2017; as used by Koh & Liang 2017).

    With ``A_j`` the curvature on the ``j``-th random minibatch (data term over the minibatch plus the
    regulariser) and ``s`` the ``scale``,

        h_0 = v,    h_j = v + (I - (A_j + damping I) / s) h_{j-1},    solve(v) = mean of h_j / s

    a stochastic truncation of ``s^{-1} sum_j (I - (A + damping I)/s)^j v = (A + damping I)^{-1} v``: since
    ``A_j`` is independent of ``h_{j-1}``, ``E h_j -> s (A + damping I)^{-1} v``. It converges when every
    eigenvalue of ``(A_j + damping I)/s`` lies in ``(0, 2)``; the truncation at ``depth`` resolves eigenvalues
    above about ``3 s / depth`` (smaller ones are damped, like early-stopped gradient descent;
    ``info["convergence_at_lambda_min"]`` is the fraction of the smallest estimated eigen-direction recovered).

    ``solve`` averages over ``repeats`` independent series and, within each, over the last ``tail`` fraction of
    the iterates ``h_j`` (Polyak-Ruppert iterate averaging). ``tail=0`` keeps only the last iterate, Koh &
    Liang's estimator; the default ``tail=0.5`` costs nothing extra and cuts the error (iterates after burn-in
    scatter around the same mean), at the price of a little more truncation bias.
    Each solve reseeds with ``random_state``: a row's answer depends on the row and the seed only.

    Args:
        matrix: ``"hessian"`` or ``"gauss-newton"`` (see :mod:`~datatrace.gradients.products`).
        damping: ``"auto"`` (as :class:`CG`) or a number ``>= 0``.
        scale: ``"auto"`` or a number ``> 0``. ``"auto"``: 1.5 times the largest eigenvalue estimate of ``A +
            damping I`` over the full batch (Lanczos) and a few probed minibatches of ``batch_size``, logged.
        depth: terms of the series (products per repeat).
        repeats: independent series averaged (variance falls as ``1/repeats``).
        batch_size: examples per minibatch product (``>= n`` gives the deterministic full-batch series).
        tail: fraction in ``[0, 1)`` of the last iterates averaged; 0 is the plain last iterate.
        random_state: seed of the minibatch order (``torch.Generator``) and of the spectrum estimate.

    Raises ``FloatingPointError`` (in ``solve``) when ``||h_j||`` leaves the bound ``10 (j + 1) ||v||`` of a
    convergent series or becomes non-finite, saying what to change.
    """

    name = "lissa"
    collective_solve = True

    def __init__(
        self,
        matrix: str = "hessian",
        damping: float | str = "auto",
        scale: float | str = "auto",
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 128,
        tail: float = 0.5,
        random_state: int = 0,
    ) -> None:
        super().__init__()
        self.matrix = check_choice("matrix", matrix, MATRICES)
        self.damping = check_damping(damping)
        if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0.0 <= tail < 1.0:
            raise bad_value("tail", tail, "expected a number with 0 <= tail < 1", "pass tail=0.5, or 0")
        self.tail = float(tail)
        if scale != "auto":
            if isinstance(scale, str) or check_nonnegative_float("scale", scale) <= 0:
                raise bad_value("scale", scale, "expected 'auto' or a number > 0", "pass scale='auto'")
            scale = float(scale)
        self.scale = scale
        self.depth = check_positive_int("depth", depth)
        self.repeats = check_positive_int("repeats", repeats)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.random_state = check_random_state(random_state)

    def _minibatch_operator(self, idx: torch.Tensor) -> Operator:
        batch = self.data_.get(idx)
        source = as_data_source(batch, "minibatch", batch_size=len(idx))
        return curvature_operator(self.fmodel_, source, self.matrix)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> LiSSA:
        source = self.bind(fmodel, data, self.matrix)
        n, p = len(source), fmodel.num_params
        self.batch_size_ = min(self.batch_size, n)
        info: dict[str, Any] = {"route": self.name, "matrix": self.matrix, "num_params": p}
        spectrum = None
        if self.damping == "auto" or self.scale == "auto":
            spectrum = self.spectrum(progress)
            info.update(spectrum.as_info())
        damping = positive_definite_damping(spectrum) if self.damping == "auto" else float(self.damping)
        if self.scale == "auto":
            top = max(abs(spectrum.lambda_max + damping), abs(spectrum.lambda_min + damping))
            generator = torch.Generator().manual_seed(self.random_state + 1)
            if self.batch_size_ < n:
                batches = _Minibatches(n, self.batch_size_, generator)
                for probe in range(SCALE_PROBES):
                    local = estimate_spectrum(
                        self._minibatch_operator(batches.next()),
                        p,
                        10,
                        random_state=self.random_state + 2 + probe,
                        dtype=fmodel.dtype,
                        device=fmodel.device,
                    )
                    top = max(top, abs(local.lambda_max + damping), abs(local.lambda_min + damping))
            scale = SCALE_SAFETY * top
            logger.info(
                "LiSSA: scale='auto' = %.4g (%.1f x the largest eigenvalue estimate %.4g of A + damping I).",
                scale,
                SCALE_SAFETY,
                top,
            )
            if scale <= 0:
                raise ValueError(
                    "scale='auto' found a zero curvature matrix (every product A v was 0). Fix: check the task's "
                    "loss and params=, or pass a positive scale and damping."
                )
        else:
            scale = float(self.scale)
        self.damping_, self.scale_ = damping, scale
        self.progress_ = progress
        info.update(
            {
                "damping": damping,
                "scale": scale,
                "depth": self.depth,
                "repeats": self.repeats,
                "batch_size": self.batch_size_,
                "tail": self.tail,
                "iterates_averaged": self._averaged(),
                "resolved_eigenvalue": 3.0 * scale / self.depth,
            }
        )
        if spectrum is not None:
            ratio = min(max(spectrum.lambda_min + damping, 0.0) / scale, 1.0)
            steps = torch.arange(self.depth - self._averaged() + 1, self.depth + 1, dtype=torch.float64)
            info["convergence_at_lambda_min"] = float(1.0 - ((1.0 - ratio) ** steps).mean())
        self.info_ = info
        return self

    def _averaged(self) -> int:
        return max(1, round(self.tail * self.depth))

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        if rows.shape[0] == 0:  # nothing to solve: no pass over the data
            return rows.clone()
        n = len(self.data_)
        s, d = self.scale_, self.damping_
        first_averaged = self.depth - self._averaged()
        v_norm = rows.norm(dim=1)
        total = torch.zeros_like(rows)
        generator = torch.Generator().manual_seed(self.random_state)
        full = self.batch_size_ >= n
        with tqdm(
            total=self.depth * self.repeats, desc="LiSSA", disable=not self.progress_, leave=False
        ) as bar:
            for repeat in range(self.repeats):
                batches = _Minibatches(n, self.batch_size_, generator)
                h = rows.clone()
                for j in range(self.depth):
                    op = self.operator_ if full else self._minibatch_operator(batches.next())
                    h = rows + h - (op(h) + d * h) / s
                    norms = h.norm(dim=1)
                    bound = DIVERGENCE_FACTOR * (j + 2) * v_norm
                    bad = ~torch.isfinite(norms) | (norms > bound)
                    if bool(bad.any()):
                        k = int(bad.nonzero()[0, 0])
                        raise FloatingPointError(
                            f"LiSSA diverged at step {j + 1} of depth={self.depth} (repeat {repeat + 1}): "
                            f"||h|| = {float(norms[k]):.3g} for a right-hand side of norm {float(v_norm[k]):.3g}, "
                            f"beyond the bound {float(bound[k]):.3g} of a convergent series. The Neumann series "
                            "converges only when scale exceeds the largest eigenvalue of (A + damping I) on every "
                            f"minibatch and A + damping I is positive definite; here scale={s:.4g}, damping={d:.4g}. "
                            "Fix: raise scale (scale='auto' estimates it), raise damping (damping='auto' shifts "
                            "negative curvature away), lower depth, or raise batch_size."
                        )
                    if j >= first_averaged:
                        total += h
                    bar.update(1)
        self.info_["solves"] = int(self.info_.get("solves", 0)) + 1
        result = total / (s * self.repeats * self._averaged())
        return result[0] if one else result

    def __repr__(self) -> str:
        return (
            f"LiSSA(matrix={self.matrix!r}, damping={self.damping!r}, scale={self.scale!r}, depth={self.depth}, "
            f"repeats={self.repeats}, batch_size={self.batch_size}, tail={self.tail}, random_state={self.random_state})"
        )


__all__ = ["LiSSA"]
