"""How long a curvature route will take, predicted from a few cheap measurements (``curvature="auto"``).

:func:`predict_seconds` is pure arithmetic on a :class:`Probe`: the sizes of the problem and the measured cost of
the few kernels every route is made of, each timed once on a small batch by
:func:`datatrace.curvature.auto.measure_probe` and scaled to the whole training set. Notation: ``p`` parameters in
scope, ``n`` training examples, ``c`` outputs per example (the task's ``outputs``), ``B`` examples per batch.

* **A Hessian-vector pass** of ``k`` vectors over the data costs ``ceil(n / B) * ceil(k / chunk) * t_call + k *
  t_vec``: a fixed cost per batched call (the transforms, the forward graph) plus a marginal cost per vector. Both
  come from timing one small batch with 1 and with several vectors; Gauss-Newton-vector products cost about the
  same (a JVP, an output-space product and a VJP) and are predicted by the same numbers.
* **A dense eigendecomposition** of ``m x m`` takes ``EIGH_FLOPS * m^3`` flops at the measured ``eigh`` rate
  (symmetric QR with eigenvectors, Golub & Van Loan 2013, section 8.3: about ``9 m^3``) at the ``eigh`` rate of
  the probe (:func:`datatrace.curvature.auto.machine_rates`: a fixed fraction of the measured matrix-product
  rate, since the tridiagonal reduction is memory-bound).
* **exact** (:class:`~datatrace.curvature.dense.ExactHessian`): ``p`` Hessian columns, each a Hessian-vector
  product over the whole data, in chunks of ``DENSE_CHUNK`` vectors, then ``eigh(p)``.
* **gauss-newton** (:class:`~datatrace.curvature.dense.GaussNewton`): per-example output Jacobians, ``n c`` rows
  of length ``p`` (reverse mode: ``c`` per-example gradient passes), accumulated as ``J^T H_out J``, ``2 n c p^2``
  flops at the measured matrix-product rate, then ``eigh(p)``.
* **ekfac** (:class:`~datatrace.curvature.kfac.EKFAC`): two passes over the data (the factors, then the refitted
  eigenvalues), each a forward pass and one batched backward of ``c`` columns; a backward costs about a forward
  (Griewank & Walther 2008: a gradient is a small multiple of the function), so a pass is about ``(1 + c) / 2``
  batch-gradient passes; per dense layer
  with ``d_in`` inputs and ``d_out`` outputs ``4 n (d_in^2 + c d_out^2) + 2 n c d_in d_out`` flops for the factors
  and the rotated gradients (one location per example: a convolution's locations multiply the rotated part), and
  the factor eigendecompositions ``sum over layers of eigh(d_in) + eigh(d_out)``.
* **arnoldi** (:class:`~datatrace.curvature.arnoldi.Arnoldi`): ``min(p, 2 rank)`` Krylov steps, one
  Hessian-vector pass of one vector each (rank plus as many again for oversampling), the full
  reorthogonalisation ``2 steps^2 p`` flops, and ``eigh(steps)``.
* **cg** (:class:`~datatrace.curvature.cg.CG`): ``SPECTRUM_STEPS`` one-vector passes for its ``damping="auto"``
  Lanczos estimate at ``fit``, then at ``score`` ``CG_ITERATIONS`` passes over the data with every query
  (``queries`` vectors, one block). The iteration count is an assumption (CG needs about the square root of the
  condition number; a damped network typically converges in tens to a few hundred), so CG's prediction is the
  roughest, and it is the one route whose time grows with the number of queries.

These are predictions of the order of magnitude (the point is to tell 2 seconds from 20 minutes before starting),
and ``curvature="auto"`` records the actual seconds beside them (``info["auto_fit_seconds"]``) so the benchmark can
check them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from datatrace.errors import bad_value
from datatrace.linalg import SPECTRUM_STEPS

#: flops of a dense symmetric eigendecomposition with eigenvectors, as a multiple of ``m^3``
EIGH_FLOPS = 9.0
#: Hessian-vector products per batched call of the dense Hessian (``FunctionalModel.dense_hessian``'s chunk)
DENSE_CHUNK = 256
#: EK-FAC's passes over the data (factors, then eigenvalues)
EKFAC_PASSES = 2
#: Krylov steps per kept eigenpair in Arnoldi's default (``n_iter = 2 * rank``)
ARNOLDI_OVERSAMPLING = 2
#: CG iterations assumed per solve (module docstring)
CG_ITERATIONS = 100
#: the number of queries assumed when predicting CG, whose time grows with them (unknown at ``fit``)
DEFAULT_QUERIES = 200
#: the routes :func:`predict_seconds` knows
ROUTES = ("gauss-newton", "exact", "arnoldi", "ekfac", "cg")


@dataclass(frozen=True)
class Probe:
    """Sizes and measured kernel costs of one model and training set, all times in seconds.

    Attributes:
        num_params: ``p``, parameters in scope.
        n_train: ``n``, training examples.
        outputs: ``c``, outputs per example (``None`` when the task has no ``outputs``).
        batch_size: ``B``, examples per batch of the training data.
        grad_seconds: one batch-gradient pass (forward and backward of the summed loss) over the whole data.
        per_example_seconds: one pass of per-example gradients over the whole data.
        hvp_call_seconds: the fixed cost of one batched Hessian-vector call on one batch.
        hvp_vector_seconds: the marginal cost of one more vector in a Hessian-vector pass over the whole data.
        matmul_flops: measured float64 matrix-product rate (flop/s).
        eigh_flops: measured float64 ``eigh`` rate (flop/s, counting ``EIGH_FLOPS * m^3`` per call).
        layers: ``(d_in, d_out)`` per layer EK-FAC would cover (``d_in`` with the bias column), or ``None``.
        arnoldi_rank: Arnoldi's ``rank``.
        queries: right-hand sides CG is predicted to solve.
    """

    num_params: int
    n_train: int
    outputs: int | None
    batch_size: int
    grad_seconds: float
    per_example_seconds: float
    hvp_call_seconds: float
    hvp_vector_seconds: float
    matmul_flops: float
    eigh_flops: float
    layers: tuple[tuple[int, int], ...] | None = None
    arnoldi_rank: int = 200
    queries: int = DEFAULT_QUERIES


def eigh_seconds(size: int, probe: Probe) -> float:
    """Seconds of ``eigh`` on a ``size x size`` symmetric matrix."""
    return EIGH_FLOPS * float(size) ** 3 / probe.eigh_flops


def hvp_pass_seconds(vectors: int, probe: Probe, chunk: int | None = None) -> float:
    """Seconds of Hessian-vector products of ``vectors`` vectors over the whole data, ``chunk`` vectors per call
    (``None``: all in one call)."""
    calls = math.ceil(probe.n_train / probe.batch_size) * math.ceil(vectors / (chunk or max(vectors, 1)))
    return calls * probe.hvp_call_seconds + vectors * probe.hvp_vector_seconds


def predict_seconds(route_name: str, probe: Probe) -> float:
    """Predicted seconds of ``route_name`` on the problem ``probe`` describes (formulas: module docstring).

    ``inf`` for a route that cannot run there (Gauss-Newton and EK-FAC without task outputs, EK-FAC on layers it
    does not cover).
    """
    p, n, c = probe.num_params, probe.n_train, probe.outputs
    if route_name == "exact":
        return hvp_pass_seconds(p, probe, DENSE_CHUNK) + eigh_seconds(p, probe)
    if route_name == "gauss-newton":
        if c is None:
            return math.inf
        return (
            c * probe.per_example_seconds + 2.0 * n * c * p * p / probe.matmul_flops + eigh_seconds(p, probe)
        )
    if route_name == "ekfac":
        if c is None or probe.layers is None:
            return math.inf
        flops = sum(
            4 * n * (d_in**2 + c * d_out**2) + 2 * n * c * d_in * d_out for d_in, d_out in probe.layers
        )
        factors = sum(eigh_seconds(d_in, probe) + eigh_seconds(d_out, probe) for d_in, d_out in probe.layers)
        return EKFAC_PASSES * (1 + c) / 2 * probe.grad_seconds + flops / probe.matmul_flops + factors
    if route_name == "arnoldi":
        steps = p if probe.arnoldi_rank >= p else min(p, ARNOLDI_OVERSAMPLING * probe.arnoldi_rank)
        return (
            steps * hvp_pass_seconds(1, probe)
            + 2.0 * steps * steps * p / probe.matmul_flops
            + eigh_seconds(steps, probe)
        )
    if route_name == "cg":
        return SPECTRUM_STEPS * hvp_pass_seconds(1, probe) + CG_ITERATIONS * hvp_pass_seconds(
            probe.queries, probe
        )
    raise bad_value(
        "route_name", route_name, f"expected one of {ROUTES}", "predict one of those routes, e.g. 'ekfac'"
    )


__all__ = [
    "ARNOLDI_OVERSAMPLING",
    "CG_ITERATIONS",
    "DEFAULT_QUERIES",
    "DENSE_CHUNK",
    "EIGH_FLOPS",
    "ROUTES",
    "Probe",
    "eigh_seconds",
    "hvp_pass_seconds",
    "predict_seconds",
]
