"""Curvature-vector products and curvature diagonals of the training objective, computed with ``torch.func``.

With ``L(theta) = (1/n) sum_i l(z_i, theta) + sum_b lambda_b/2 ||theta_b||^2`` (the regulariser belongs to the
curvature; conventions in :mod:`datatrace.scores`), two matrices ``A`` are offered by name (``matrix=``):

* ``"hessian"``: ``A = H``, by forward-over-reverse products (:meth:`FunctionalModel.hvp`, Pearlmutter 1994);
* ``"gauss-newton"``: ``A = G = (1/n) sum_i J_i^T H_out_i J_i + diag(lambda)``, the generalised Gauss-Newton
  matrix (Schraudolph 2002; Martens 2020), by :func:`ggn_vp`: a JVP through ``task.outputs``, the output-space
  Hessian of ``task.loss_from_outputs``, a VJP back. ``G`` is positive semi-definite for losses convex in the
  outputs.

:func:`curvature_operator` turns either into an :data:`~datatrace.linalg.Operator` for the solvers of
:mod:`datatrace.linalg`. Three diagonals of the curvature: :func:`ggn_diagonal` (exact, from per-example output
Jacobians), :func:`empirical_fisher_diagonal` (``(1/n) sum_i g_i^2 + lambda``) and :func:`hutchinson_diagonal`
(``mean_s z_s * (A z_s)`` with Rademacher probes; Bekas, Kokiopoulou & Saad 2007).
"""

from __future__ import annotations

import logging

import torch
from torch.func import grad, jacrev, jvp, vjp, vmap
from tqdm.auto import tqdm

from datatrace.data import DataLike, DataSource, as_data_source, map_batch, take_examples
from datatrace.distributed import distributed_sum
from datatrace.errors import bad_value, check_choice, is_out_of_memory
from datatrace.gradients.functional import BoundFunction, FunctionalModel, second_order_kernels
from datatrace.linalg import Operator, as_rows

logger = logging.getLogger(__name__)

#: curvature matrices the matrix-free routes can work with
MATRICES = ("hessian", "gauss-newton")
#: elements of the per-example output Jacobian ``(b, k, p)`` held at once by :func:`ggn_diagonal`
JACOBIAN_BUDGET = 2**25


def require_outputs(
    fmodel: FunctionalModel,
    argument: str = "matrix",
    value: str = "gauss-newton",
    fix: str = "define both methods on the task, or use matrix='hessian'",
) -> None:
    """Raise (naming ``argument=value`` and ``fix``) unless the task splits its loss into ``outputs`` and
    ``loss_from_outputs``, which Gauss-Newton products need."""
    if not fmodel.task.has_outputs:
        raise bad_value(
            argument,
            value,
            f"{type(fmodel.task).__name__} does not split its loss into outputs(model, batch) and "
            "loss_from_outputs(outputs, batch), which Gauss-Newton products need",
            fix,
        )


def ggn_vp(fmodel: FunctionalModel, vectors: torch.Tensor, data: DataLike) -> torch.Tensor:
    """Generalised Gauss-Newton products ``G v`` for each row ``v`` of ``vectors`` (shape ``(m, p)`` or ``(p,)``).

    ``G v = (1/n) sum_i J_i^T H_out_i J_i v + diag(lambda) v`` with ``o_i = task.outputs`` of example ``i``,
    ``J_i = d o_i / d theta`` and ``H_out_i = d^2 l_i / d o_i^2`` (Schraudolph 2002; Martens 2020). Computed per
    batch as a JVP through the outputs (``J v``), an output-space Hessian-vector product of
    ``loss_from_outputs`` (``H_out J v``) and a VJP (``J^T H_out J v``), vmapped over the rows; no Jacobian or
    ``p x p`` matrix is formed. Where forward-mode AD is missing for an operation of the model, the same
    products by reverse mode only (:func:`_ggn_reverse`), chosen once per model and logged. Matches :meth:`FunctionalModel.dense_gauss_newton` ``@ v``.

    Example:
        >>> Gv = ggn_vp(fmodel, torch.randn(3, fmodel.num_params, dtype=fmodel.dtype), (X, y))  # doctest: +SKIP
    """
    require_outputs(
        fmodel, "fmodel.task", fmodel.task, "define both methods on the task, or use fmodel.hvp (the Hessian)"
    )
    source = as_data_source(data, "data")
    rows, one = as_rows(vectors, fmodel.num_params, fmodel.dtype, fmodel.device)
    n = len(source)
    out_module = BoundFunction(fmodel.model, fmodel.task.outputs)

    def batch_product(batch: tuple) -> torch.Tensor:
        b = fmodel.prepare(batch)
        if fmodel.hvp_mode == "forward-over-reverse":
            try:
                return _ggn_forward(fmodel, out_module, rows, b) / n
            except RuntimeError as err:
                if is_out_of_memory(err):  # memory, not a transform the model lacks
                    raise
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                result = _ggn_reverse(fmodel, out_module, rows, b) / n
                fmodel.hvp_mode = "reverse-over-reverse"
                logger.info(
                    "forward-mode AD fails for %s (%s); Gauss-Newton-vector products use reverse mode only "
                    "(J v as the derivative of a VJP; the same matrix) from now on.",
                    type(fmodel.model).__name__,
                    first,
                )
                return result
        return _ggn_reverse(fmodel, out_module, rows, b) / n

    # each rank sums its shard under torch.distributed (datatrace.distributed); the regulariser is added once
    data_term = distributed_sum(
        batch_product, source, device=fmodel.device, desc="Gauss-Newton-vector products"
    )
    result = (rows * fmodel.regularizer + data_term).detach()
    return result[0] if one else result


def _ggn_forward(
    fmodel: FunctionalModel, out_module: BoundFunction, rows: torch.Tensor, b: tuple
) -> torch.Tensor:
    """``sum_i J_i^T H_out_i J_i v`` over one batch: a JVP, an output-space JVP of the loss gradient, a VJP."""
    task, theta = fmodel.task, fmodel.theta

    def outputs(t: torch.Tensor) -> torch.Tensor:
        return fmodel.call(out_module, t, b)

    def loss_grad(o: torch.Tensor) -> torch.Tensor:
        return grad(lambda o_: task.loss_from_outputs(o_, b).sum())(o)

    outs, pullback = vjp(outputs, theta)

    def product(v: torch.Tensor) -> torch.Tensor:
        jv = jvp(outputs, (theta,), (v,))[1]
        hjv = jvp(loss_grad, (outs,), (jv,))[1]
        return pullback(hjv)[0]

    return vmap(product, chunk_size=fmodel.chunk_size)(rows)


def _ggn_reverse(
    fmodel: FunctionalModel, out_module: BoundFunction, rows: torch.Tensor, b: tuple
) -> torch.Tensor:
    """The same products by reverse mode only, for models without forward-mode AD: ``J v`` is the derivative of
    the VJP ``u -> J^T u`` (linear in ``u``) along ``v``; ``H_out (J v)`` a double backward of the loss in the
    outputs; ``J^T (.)`` a VJP. One backward pass of each kind per row."""
    with second_order_kernels(), torch.enable_grad():
        theta = fmodel.theta.detach().requires_grad_(True)
        outs = fmodel.call(out_module, theta, b)
        u = torch.zeros_like(outs, requires_grad=True)
        (jt_u,) = torch.autograd.grad(outs, theta, u, create_graph=True)
        o = outs.detach().requires_grad_(True)
        (g_o,) = torch.autograd.grad(fmodel.task.loss_from_outputs(o, b).sum(), o, create_graph=True)
        result = []
        for v in rows:
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (hjv,) = torch.autograd.grad(g_o, o, jv, retain_graph=True)
            result.append(torch.autograd.grad(outs, theta, hjv, retain_graph=True)[0])
        return torch.stack(result)


def curvature_operator(fmodel: FunctionalModel, data: DataSource, matrix: str) -> Operator:
    """``V -> A V`` (rows) for ``A`` the objective's Hessian (``"hessian"``) or Gauss-Newton matrix."""
    check_choice("matrix", matrix, MATRICES)
    if matrix == "hessian":
        return lambda v: fmodel.hvp(v, data)
    require_outputs(fmodel)
    return lambda v: ggn_vp(fmodel, v, data)


# -- diagonals -----------------------------------------------------------------------------------------------------
def ggn_diagonal(fmodel: FunctionalModel, data: DataSource, progress: bool = False) -> torch.Tensor:
    """The exact diagonal of the Gauss-Newton matrix ``G`` (regulariser included), shape ``(p,)``.

    ``diag(G)_j = (1/n) sum_i sum_{k,l} J_i[k, j] H_out_i[k, l] J_i[l, j] + lambda_j`` with per-example output
    Jacobians ``J_i`` (``vmap`` of ``jacrev``, in sub-batches of at most ``JACOBIAN_BUDGET`` elements) and
    output-space Hessians ``H_out_i`` of ``task.loss_from_outputs``: ``k`` backward passes per example.
    """
    require_outputs(fmodel)
    task, p, n = fmodel.task, fmodel.num_params, len(data)
    out_module = BoundFunction(fmodel.model, task.outputs)

    def single_out(theta: torch.Tensor, example: tuple | dict) -> torch.Tensor:
        return fmodel.call(out_module, theta, map_batch(lambda t: t.unsqueeze(0), example))[0].reshape(-1)

    def single_loss(o: torch.Tensor, shape: torch.Size, example: tuple | dict) -> torch.Tensor:
        return task.loss_from_outputs(o.reshape(1, *shape), map_batch(lambda t: t.unsqueeze(0), example))[0]

    def batch_diagonal(batch: tuple) -> torch.Tensor:
        b = fmodel.prepare(batch)
        with torch.no_grad():
            outs = fmodel.call(out_module, fmodel.theta, b)
        shape = outs.shape[1:]
        k = max(1, int(shape.numel()))
        step = max(1, JACOBIAN_BUDGET // (k * p))
        hess = fmodel.over_examples(
            jacrev(jacrev(lambda o, ex: single_loss(o, shape, ex))),
            (),
            (outs.reshape(outs.shape[0], -1), b),
        )  # (b, k, k)
        part_sum = torch.zeros_like(fmodel.theta)
        for start in range(0, outs.shape[0], step):
            part = take_examples(b, slice(start, start + step))
            jac = fmodel.over_examples(jacrev(single_out), (fmodel.theta,), (part,))
            part_sum += torch.einsum("bkp,bkl,blp->p", jac, hess[start : start + step], jac)
        return part_sum

    # each rank sums its shard under torch.distributed (datatrace.distributed); the regulariser is added once
    total = distributed_sum(
        batch_diagonal, data, device=fmodel.device, progress=progress, desc="Gauss-Newton diagonal"
    )
    return (total / n + fmodel.regularizer).detach()


def empirical_fisher_diagonal(
    fmodel: FunctionalModel, data: DataSource, progress: bool = False
) -> torch.Tensor:
    """``(1/n) sum_i g_i^2 + lambda`` (elementwise) with ``g_i`` the per-example loss gradients, shape ``(p,)``."""
    total = distributed_sum(
        lambda batch: (fmodel.per_example_grads(batch) ** 2).sum(dim=0),
        data,
        device=fmodel.device,
        progress=progress,
        desc="empirical Fisher diagonal",
    )
    return (total / len(data) + fmodel.regularizer).detach()


def hutchinson_diagonal(
    fmodel: FunctionalModel,
    data: DataSource,
    matrix: str = "hessian",
    n_probes: int = 64,
    random_state: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Hutchinson's estimate ``mean_s z_s * (A z_s)`` of ``diag(A)`` with seeded Rademacher probes ``z_s``:
    unbiased, exact when ``A`` is diagonal, variance ``sum_{k != j} A_jk^2 / n_probes`` per entry."""
    op = curvature_operator(fmodel, data, matrix)
    generator = torch.Generator().manual_seed(int(random_state))
    p = fmodel.num_params
    total = torch.zeros_like(fmodel.theta)
    step = 16
    with tqdm(total=n_probes, desc="Hutchinson diagonal", disable=not progress, leave=False) as bar:
        for start in range(0, n_probes, step):
            count = min(step, n_probes - start)
            z = torch.randint(0, 2, (count, p), generator=generator).to(fmodel.theta) * 2 - 1
            total += (z * op(z)).sum(dim=0)
            bar.update(count)
    return total / n_probes


def preconditioner_diagonal(
    fmodel: FunctionalModel, data: DataSource, progress: bool = False
) -> torch.Tensor:
    """A positive diagonal for preconditioning: the Gauss-Newton diagonal, or the empirical-Fisher one for a
    task without ``outputs``."""
    if fmodel.task.has_outputs:
        return ggn_diagonal(fmodel, data, progress)
    return empirical_fisher_diagonal(fmodel, data, progress)


__all__ = [
    "JACOBIAN_BUDGET",
    "MATRICES",
    "Operator",
    "curvature_operator",
    "empirical_fisher_diagonal",
    "ggn_diagonal",
    "ggn_vp",
    "hutchinson_diagonal",
    "preconditioner_diagonal",
    "require_outputs",
]
