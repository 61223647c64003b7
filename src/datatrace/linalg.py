"""Pure linear algebra shared by the curvature routes, the projected curvature and the K-FAC family.

Nothing here knows about models, tasks or data: functions take tensors (or a matrix-vector product ``op``, a
callable mapping rows ``(m, p)`` to rows ``A v``) and return tensors or numbers.

* :func:`zero_tolerance`: when an eigenvalue counts as zero (Golub & Van Loan, section 8.1).
* :func:`spectral_inverse`: ``phi(e) = 1 / (policy(e) + damping)`` for eigenvalues ``e`` of a symmetric ``C``, so
  that ``C^+ v = V diag(phi(e)) V^T v`` with three explicit decisions:

  - zero eigenvalues (``|e| <= zero_tolerance * max|e|``) get ``phi = 0``: a pseudo-inverse;
  - negative eigenvalues follow ``negative=``: ``"clip"`` sets them to 0, ``"abs"`` uses ``|e|`` (saddle-free
    Newton, Dauphin et al. 2014), ``"keep"`` uses them as they are;
  - damping ``"auto"`` at a minimum of the training objective is 0 when no eigenvalue is negative and otherwise
    ``0.01 * mean |e|`` (Levenberg-Marquardt); away from a minimum (``dof_target`` given) it is
    :func:`dof_damping`.

* :func:`dof_damping`: the damping whose ridge keeps a stated number of effective directions,
  ``sum_j e_j / (e_j + lambda) = target`` (the effective degrees of freedom of a ridge estimator; Hastie,
  Tibshirani & Friedman, *Elements of Statistical Learning*, eq. 3.50).

* :func:`lanczos` and :func:`estimate_spectrum`: a Krylov basis with full reorthogonalisation, its extreme Ritz
  values (Kaniel-Paige) and stochastic Lanczos quadrature of ``mean |e|`` (Ubaru, Chen & Saad 2017).
* :func:`positive_definite_damping` and :func:`raised_damping`: the shift that makes ``A + damping I`` positive
  definite from a spectrum estimate, ``-lambda_min * 1.1 + 0.01 * mean |e|`` (Ritz values under-estimate
  ``|lambda_min|``, hence the margin), and the same rule applied to a Rayleigh-quotient bound met later.
* :func:`conjugate_gradient`: block (preconditioned) CG, one recurrence per right-hand side, truncated on
  non-positive curvature (Hestenes & Stiefel 1952; Steihaug 1983).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from datatrace.errors import bad_value

logger = logging.getLogger(__name__)

#: a matrix-vector product on rows: ``V (m, p) -> A V`` (row ``i`` is ``A v_i``)
Operator = Callable[[torch.Tensor], torch.Tensor]

#: what :func:`spectral_inverse` does with negative eigenvalues
NEGATIVE_POLICIES = ("clip", "abs", "keep")
#: Lanczos steps used to estimate the spectrum for ``damping="auto"`` and ``scale="auto"``
SPECTRUM_STEPS = 30
#: a Ritz value below ``-NEGATIVE_RTOL * lambda_max`` counts as negative curvature
NEGATIVE_RTOL = 1e-6
#: margin on the Lanczos estimate of ``|lambda_min|`` when shifting an indefinite matrix
SHIFT_SAFETY = 1.1
#: Levenberg-Marquardt fraction of ``mean |e|``, as in the dense routes
LM_FRACTION = 0.01
#: away from a minimum, ``damping="auto"`` keeps this many effective curvature directions per model output
DOF_PER_OUTPUT = 10
#: a Krylov step whose new direction is below this fraction of ``||A||`` found an invariant subspace
BREAKDOWN_RTOL = 1e-10


def zero_tolerance(size: int, dtype: torch.dtype) -> float:
    """The relative tolerance below which an eigenvalue counts as zero: ``10 * max(size, 10) * eps(dtype)``.

    An eigenvalue ``e`` of a symmetric ``size x size`` matrix is treated as zero when
    ``|e| <= zero_tolerance(size, dtype) * max|e|``: the round-off of a symmetric eigensolver grows like
    ``size * eps * ||A||`` (Golub & Van Loan, *Matrix Computations*, 4th ed., section 8.1), so anything smaller
    is indistinguishable from zero.
    """
    return max(int(size), 10) * torch.finfo(dtype).eps * 10


def as_rows(vectors: Any, p: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``vectors`` as a 2-D ``(m, p)`` tensor in ``dtype``; the flag says whether it came as one 1-D vector."""
    if not isinstance(vectors, torch.Tensor):
        raise bad_value("vectors", vectors, "expected a torch.Tensor of shape (m, p)", "pass a tensor")
    if vectors.dim() not in (1, 2) or vectors.shape[-1] != p:
        raise bad_value(
            "vectors",
            vectors,
            f"expected shape (m, {p}) or ({p},): one row per vector in the flat space of the {p} parameters in "
            "scope",
            "pass gradients computed for the same model and params= selection",
        )
    one = vectors.dim() == 1
    rows = vectors.reshape(1, p) if one else vectors
    return rows.to(dtype=dtype, device=device), one


# -- eigenvalue policy ---------------------------------------------------------------------------------------------
def dof_damping(
    evals: torch.Tensor, target: float, multiplicity: torch.Tensor | None = None, extra: float = 0.0
) -> float:
    """The damping ``lambda >= 0`` with ``sum_j m_j e_j / (e_j + lambda) = target`` (negative ``e`` count as 0).

    ``sum_j e_j / (e_j + lambda)`` is the effective number of directions a ridge ``(C + lambda I)^{-1}`` still
    resolves (the degrees of freedom of ridge regression): ``p`` at ``lambda = 0`` falling to 0 as ``lambda``
    grows. ``multiplicity`` ``m_j`` counts repeated eigenvalues (e.g. the isotropic complement of a truncated
    spectrum); ``extra`` is added to the left side (directions known to be resolved whatever the damping).
    Returns 0 when fewer than ``target`` directions have positive curvature. Solved by bisection on
    ``log lambda`` (the left side is decreasing in ``lambda``) to a relative precision of about 1e-6.

    Why: a model trained for a budget (Adam, early stopping) is not at a minimum, and the curvature at its end
    point describes the response to removing an example only along its largest directions; small eigenvalues
    (examples already fitted, directions training never moved along) make ``C^{-1}`` explode. Keeping a fixed
    number of directions per model output is scale-free (it does not change when the loss or the parameters are
    rescaled), unlike an absolute damping.
    """
    e = evals.detach().to(torch.float64).clamp(min=0.0)
    m = torch.ones_like(e) if multiplicity is None else multiplicity.detach().to(torch.float64)
    positive = e > 0
    if float((m * positive).sum()) + extra <= target or not bool(positive.any()):
        return 0.0

    def dof(lam: float) -> float:
        return float((m * e / (e + lam)).sum()) + extra

    top = float(e.max())
    lo, hi = top * 1e-16, top * 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if dof(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-6:
            break
    return math.sqrt(lo * hi)


def spectral_inverse(
    evals: torch.Tensor,
    damping: float | str,
    negative: str,
    rtol: float | None,
    name: str,
    dof_target: float | None = None,
    multiplicity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """The eigenvalue policy (module docstring) applied to eigenvalues ``evals``: returns ``phi(e)`` (0 where an
    eigenvalue is dropped), the damping used and the facts for a route's ``info`` (``name`` is the route).

    ``rtol=None`` uses :func:`zero_tolerance` for ``evals.numel()`` eigenvalues. ``dof_target`` (the model is away
    from a minimum, see :func:`dof_damping`) makes ``damping="auto"`` keep that many effective directions,
    counting eigenvalue ``j`` ``multiplicity[j]`` times.
    """
    scale = float(evals.abs().max()) if evals.numel() else 0.0
    rtol = rtol if rtol is not None else zero_tolerance(evals.numel(), evals.dtype)
    tol = rtol * scale
    zero = evals.abs() <= tol
    is_negative = (evals < -tol) & ~zero
    rule = "given"
    if damping == "auto" and dof_target is not None:
        used, rule = dof_damping(evals, dof_target, multiplicity), f"dof={dof_target:g}"
    elif damping == "auto":
        used = 0.0 if not bool(is_negative.any()) else LM_FRACTION * float(evals.abs().mean())
        rule = "at-minimum"
    else:
        used = float(damping)
    if negative == "clip":
        effective = evals.clamp(min=0.0)
    elif negative == "abs":
        effective = evals.abs()
    else:
        effective = evals
    denom = effective + used
    dropped = zero | (denom.abs() <= tol)
    inv = torch.where(
        dropped, torch.zeros_like(denom), 1.0 / torch.where(dropped, torch.ones_like(denom), denom)
    )
    info = {
        "route": name,
        "num_params": int(evals.numel()),
        "damping": used,
        "damping_rule": rule,
        "negative_policy": negative,
        "eigenvalue_max": float(evals.max()),
        "eigenvalue_min": float(evals.min()),
        "num_negative": int(is_negative.sum()),
        "num_zero_dropped": int(dropped.sum()),
        "zero_tolerance": tol,
    }
    if int(is_negative.sum()):
        logger.info(
            "%s curvature has %d negative eigenvalue(s) (min %.3g); policy %r with damping %.3g.",
            name,
            int(is_negative.sum()),
            float(evals.min()),
            negative,
            used,
        )
    return inv, used, info


# -- Krylov machinery ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KrylovBasis:
    """An orthonormal basis ``Q`` (rows, float64) and the projected matrix ``T = Q A Q^T`` (symmetric)."""

    basis: torch.Tensor  # (k, p)
    projected: torch.Tensor  # (k, k)
    restarts: int

    @property
    def complete(self) -> bool:
        return self.basis.shape[0] == self.basis.shape[1]


def lanczos(
    op: Operator,
    p: int,
    steps: int,
    *,
    random_state: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "Lanczos",
) -> KrylovBasis:
    """``steps`` Arnoldi/Lanczos steps on the symmetric operator ``op`` from a seeded random unit start.

    Full reorthogonalisation (classical Gram-Schmidt, twice) in float64, so the basis stays orthonormal to
    rounding and ``T`` is the exact projection. On breakdown (the Krylov space became invariant, as happens for
    repeated eigenvalues) the iteration restarts from a fresh random vector orthogonal to the basis, so that with
    ``steps = p`` the basis is complete and ``Q^T T Q = A`` exactly. ``op`` works in ``dtype``.
    """
    steps = min(steps, p)
    generator = torch.Generator().manual_seed(int(random_state))
    work = torch.float64
    basis = torch.zeros(steps, p, dtype=work, device=device)
    hessenberg = torch.zeros(steps + 1, steps, dtype=work, device=device)
    restarts = 0

    def random_unit(previous: int) -> torch.Tensor:
        q = torch.randn(p, generator=generator, dtype=work).to(device)
        for _ in range(2):
            q = q - basis[:previous].T @ (basis[:previous] @ q)
        return q / q.norm()

    q = random_unit(0)
    norm_estimate = 0.0
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for j in range(steps):
            basis[j] = q
            w = op(q.to(dtype).reshape(1, p))[0].to(work)
            coefficients = basis[: j + 1] @ w
            w = w - basis[: j + 1].T @ coefficients
            again = basis[: j + 1] @ w
            w = w - basis[: j + 1].T @ again
            hessenberg[: j + 1, j] = coefficients + again
            beta = float(w.norm())
            norm_estimate = max(norm_estimate, float(hessenberg[: j + 1, j].abs().max()), beta)
            bar.update(1)
            if j + 1 == steps:
                break
            if beta <= BREAKDOWN_RTOL * max(norm_estimate, torch.finfo(work).tiny) or not math.isfinite(beta):
                if not math.isfinite(beta):
                    raise FloatingPointError(
                        f"a curvature-vector product became non-finite at Krylov step {j + 1}. Fix: check the "
                        "model's outputs and loss on the training data, or fit in float64."
                    )
                restarts += 1
                q = random_unit(j + 1)
            else:
                hessenberg[j + 1, j] = beta
                q = w / beta
    square = hessenberg[:steps, :steps]
    return KrylovBasis(basis, 0.5 * (square + square.T), restarts)


@dataclass(frozen=True)
class SpectrumEstimate:
    """Cheap facts about the spectrum of ``A`` from a short Lanczos run (see :func:`estimate_spectrum`)."""

    lambda_max: float  # largest Ritz value (<= the true largest eigenvalue)
    lambda_min: float  # smallest Ritz value (>= the true smallest eigenvalue)
    mean_abs: float  # estimate of mean |e| over all p eigenvalues
    steps: int
    exact: bool  # the basis was complete: the numbers are the exact spectrum

    @property
    def has_negative(self) -> bool:
        top = max(abs(self.lambda_max), abs(self.lambda_min))
        return top > 0 and self.lambda_min < -NEGATIVE_RTOL * top

    def as_info(self) -> dict[str, Any]:
        return {
            "lambda_max_estimate": self.lambda_max,
            "lambda_min_estimate": self.lambda_min,
            "mean_abs_eigenvalue_estimate": self.mean_abs,
            "spectrum_steps": self.steps,
            "negative_curvature_found": self.has_negative,
        }


def mean_abs_eigenvalue(krylov: KrylovBasis, evals: torch.Tensor, first: torch.Tensor) -> float:
    """``mean |e|`` over all ``p`` eigenvalues of ``A`` from a Lanczos run: exact for a complete basis, else
    one-probe stochastic Lanczos quadrature ``e_1^T |T| e_1 ~ q_0^T |A| q_0`` (unbiased for ``tr|A|/p`` since
    ``q_0`` is uniform on the sphere). ``evals`` are the eigenvalues of ``T``, ``first`` the first components of
    its eigenvectors."""
    if krylov.complete:
        return float(evals.abs().mean())
    return float((first**2 * evals.abs()).sum())


def estimate_spectrum(
    op: Operator,
    p: int,
    steps: int = SPECTRUM_STEPS,
    *,
    random_state: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SpectrumEstimate:
    """Extreme eigenvalues and ``mean |e|`` of the symmetric operator ``op`` from ``min(p, steps)`` Lanczos steps.

    The extreme Ritz values converge first (Kaniel-Paige theory); they lie inside the spectrum, so
    ``lambda_max`` is a lower bound of the largest eigenvalue and ``lambda_min`` an upper bound of the smallest.
    ``mean_abs`` is stochastic Lanczos quadrature with the run's own random start (Ubaru, Chen & Saad 2017).
    """
    krylov = lanczos(
        op,
        p,
        steps,
        random_state=random_state,
        dtype=dtype,
        device=device,
        progress=progress,
        desc="spectrum",
    )
    evals, evecs = torch.linalg.eigh(krylov.projected)
    return SpectrumEstimate(
        lambda_max=float(evals.max()),
        lambda_min=float(evals.min()),
        mean_abs=mean_abs_eigenvalue(krylov, evals, evecs[0]),
        steps=int(krylov.basis.shape[0]),
        exact=krylov.complete,
    )


# -- damping rules -------------------------------------------------------------------------------------------------
def positive_definite_damping(spectrum: SpectrumEstimate) -> float:
    """The ``"auto"`` damping of the iterative solvers: 0 without negative curvature, else the shift
    ``-lambda_min * SHIFT_SAFETY + LM_FRACTION * mean |e|`` that makes ``A + damping I`` positive definite plus
    the Levenberg-Marquardt term."""
    if not spectrum.has_negative:
        return 0.0
    return -spectrum.lambda_min * SHIFT_SAFETY + LM_FRACTION * spectrum.mean_abs


def raised_damping(spectrum: SpectrumEstimate, damping: float, min_rayleigh: float) -> tuple[float, float]:
    """The damping after a solve with ``damping`` met ``d^T (A + damping I) d <= 0``: ``(new, lambda_min)``.

    The smallest Rayleigh quotient met bounds ``lambda_min(A) <= min_rayleigh - damping``; the shift rule of
    :func:`positive_definite_damping` is applied to the smaller of that bound and the spectrum estimate, and
    the damping at least doubles.
    """
    lambda_min = min(min_rayleigh - damping, spectrum.lambda_min)
    if not math.isfinite(lambda_min):
        lambda_min = -abs(spectrum.lambda_max) * 1e-6
    new = -lambda_min * SHIFT_SAFETY + LM_FRACTION * spectrum.mean_abs
    new = max(new, 2.0 * damping, 1e-12 * abs(spectrum.lambda_max))
    return new, lambda_min


# -- conjugate gradient --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CGResult:
    """Per right-hand side: iterations run, final relative residual, whether it stopped on curvature <= 0."""

    solution: torch.Tensor
    iterations: torch.Tensor
    residuals: torch.Tensor
    negative_curvature: torch.Tensor
    converged: torch.Tensor
    #: smallest Rayleigh quotient ``d^T (A + damping I) d / ||d||^2`` met among the search directions (an upper
    #: bound of the smallest eigenvalue of ``A + damping I``)
    min_rayleigh: float = math.inf


def conjugate_gradient(
    op: Operator,
    rhs: torch.Tensor,
    *,
    damping: float = 0.0,
    rtol: float = 1e-6,
    max_iter: int = 100,
    preconditioner: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> CGResult:
    """Solve ``(A + damping I) x = b`` for every row ``b`` of ``rhs`` by (preconditioned) conjugate gradient.

    One independent CG recurrence per row (own ``alpha``, ``beta``), advanced together so that each iteration
    costs one product ``op`` on the block of still-active rows. A row stops when its relative residual
    ``||b - (A + damping I) x|| / ||b||`` reaches ``rtol``, after ``max_iter`` iterations, or when it meets
    non-positive curvature ``p^T (A + damping I) p <= 0`` (then it keeps its last iterate: truncated CG,
    Steihaug 1983). ``preconditioner`` applies ``M^{-1}`` for a symmetric positive definite ``M ~ A + damping I``:
    a tensor of shape ``(p,)`` is the inverse of a positive diagonal, a callable maps rows ``(m, p)`` to rows.
    A zero row is solved by a zero row without any product.
    """
    if preconditioner is None:

        def apply(rows: torch.Tensor) -> torch.Tensor:
            return rows  # M = I: no copy (r is never modified in place after z is taken from it)

    elif isinstance(preconditioner, torch.Tensor):
        diagonal = preconditioner

        def apply(rows: torch.Tensor) -> torch.Tensor:
            return rows * diagonal
    else:
        apply = preconditioner
    m = rhs.shape[0]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    b_norm = rhs.norm(dim=1)
    z = apply(r)
    direction = z.clone()
    rz = (r * z).sum(dim=1)
    iterations = torch.zeros(m, dtype=torch.long)
    residuals = torch.zeros(m, dtype=torch.float64)
    negative = torch.zeros(m, dtype=torch.bool)
    min_rayleigh = math.inf
    active = b_norm > 0
    residuals[active.cpu()] = 1.0
    with tqdm(total=max_iter, desc="CG", disable=not progress, leave=False) as bar:
        for _ in range(max_iter):
            idx = active.nonzero().reshape(-1)
            if idx.numel() == 0:
                break
            d = direction[idx]
            ad = op(d) + damping * d
            curvature = (d * ad).sum(dim=1)
            rayleigh = curvature / (d * d).sum(dim=1)
            if bool(torch.isfinite(rayleigh).any()):
                min_rayleigh = min(min_rayleigh, float(rayleigh[torch.isfinite(rayleigh)].min()))
            ok = torch.isfinite(curvature) & (curvature > 0)
            if not bool(ok.all()):
                stopped = idx[~ok]
                negative[stopped.cpu()] = True
                active[stopped] = False
                idx, d, ad, curvature = idx[ok], d[ok], ad[ok], curvature[ok]
                if idx.numel() == 0:  # every active row stopped on curvature <= 0 in this iteration
                    bar.update(1)
                    continue
            alpha = rz[idx] / curvature
            x.index_add_(0, idx, alpha[:, None] * d)
            r_new = r[idx] - alpha[:, None] * ad
            r[idx] = r_new
            relative = r_new.norm(dim=1) / b_norm[idx]
            iterations[idx.cpu()] += 1
            residuals[idx.cpu()] = relative.double().cpu()
            z_new = apply(r_new)
            rz_new = (r_new * z_new).sum(dim=1)
            direction[idx] = z_new + (rz_new / rz[idx])[:, None] * d
            rz[idx] = rz_new
            active[idx[relative <= rtol]] = False
            bar.update(1)
    converged = (residuals <= rtol) & ~negative
    return CGResult(x, iterations, residuals, negative, converged, min_rayleigh)


__all__ = [
    "BREAKDOWN_RTOL",
    "LM_FRACTION",
    "NEGATIVE_POLICIES",
    "NEGATIVE_RTOL",
    "SHIFT_SAFETY",
    "SPECTRUM_STEPS",
    "CGResult",
    "KrylovBasis",
    "Operator",
    "SpectrumEstimate",
    "as_rows",
    "conjugate_gradient",
    "dof_damping",
    "estimate_spectrum",
    "lanczos",
    "mean_abs_eigenvalue",
    "positive_definite_damping",
    "raised_damping",
    "spectral_inverse",
    "zero_tolerance",
]
