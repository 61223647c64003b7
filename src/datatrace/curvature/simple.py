"""Cheap curvature routes: identity, diagonal and block-diagonal.

These trade accuracy for cost. With ``C`` the curvature they stand for and ``damping`` added to it, each answers
``solve(V)``: ``(C + damping I)^{-1} v`` for every row ``v``.

* :class:`Identity`: ``C = I``. Scores become ``(1/n) grad f_q . g_i / (1 + damping)``: plain gradient dot
  products (the single-checkpoint TracIn / "gradient similarity" form; Pruthi et al. 2020). Not in
  leave-one-out units unless the curvature really is the identity; a baseline.
* :class:`Diagonal`: ``C = diag(A)``, one of three diagonals (``matrix=``), chosen by cost:

  - ``"gauss-newton"`` (default): the exact diagonal of ``G = (1/n) sum_i J_i^T H_out_i J_i + diag(lambda)``,
    ``diag(G)_j = (1/n) sum_i sum_{k,l} J_i[k, j] H_out_i[k, l] J_i[l, j] + lambda_j``, from per-example output
    Jacobians: ``k`` backward passes per example (``k`` = outputs per example, e.g. classes). Positive
    semi-definite; the best diagonal for a classifier with a moderate number of classes.
  - ``"empirical-fisher"``: ``(1/n) sum_i g_i^2 + lambda`` (elementwise), from one pass of per-example
    gradients. Cheapest, works for any task; it is the Hessian's diagonal only as far as the empirical Fisher
    approximates the Hessian (well-specified models near a minimum).
  - ``"hessian"``: Hutchinson's estimator ``mean_s z_s * (H z_s)`` with ``n_probes`` Rademacher vectors from a
    seeded generator (Bekas, Kokiopoulou & Saad 2007): unbiased, exact when ``H`` is diagonal, with variance
    ``sum_{k != j} H_jk^2 / n_probes`` per entry. Costs ``n_probes`` Hessian-vector products per data pass.

  Negative and zero entries follow the dense routes' policy (``negative=``, pseudo-inverse of zeros, the same
  ``"auto"`` damping), reused from :mod:`datatrace.curvature.dense`.
* :class:`BlockDiagonal`: the dense route restricted to blocks (per module, or per parameter tensor): block
  ``b``'s matrix is the ``(b, b)`` sub-block of the Hessian (``base="exact"``) or Gauss-Newton matrix, formed
  from products with vectors supported on that block only (never the ``p x p`` matrix), eigendecomposed, and
  inverted with the dense routes' policy applied to the eigenvalues of all blocks together (one damping, one
  zero tolerance). Exact when the curvature is block diagonal, e.g. a single layer.
"""

from __future__ import annotations

import logging

import torch
from torch.func import jacrev, vmap
from tqdm.auto import tqdm

from datatrace.curvature.base import Curvature
from datatrace.curvature.dense import DEFAULT_MAX_DENSE_BYTES, NEGATIVE_POLICIES, spectral_inverse
from datatrace.curvature.iterative import (
    _as_rows,
    _check_damping,
    _check_random_state,
    _require_outputs,
    curvature_operator,
)
from datatrace.data import DataSource, as_data_source
from datatrace.distributed import distributed_sum
from datatrace.errors import NotFittedError, check_choice, check_finite, check_positive_int
from datatrace.gradients.functional import FunctionalModel, _Bound
from datatrace.params import ParamSpace

logger = logging.getLogger(__name__)

#: elements of the per-example output Jacobian ``(b, k, p)`` held at once by :func:`ggn_diagonal`
JACOBIAN_BUDGET = 2**25


# -- diagonal estimators ---------------------------------------------------------------------------------------
def ggn_diagonal(fmodel: FunctionalModel, data: DataSource, progress: bool = False) -> torch.Tensor:
    """The exact diagonal of the Gauss-Newton matrix ``G`` (regulariser included), shape ``(p,)``.

    ``diag(G)_j = (1/n) sum_i sum_{k,l} J_i[k, j] H_out_i[k, l] J_i[l, j] + lambda_j`` with per-example output
    Jacobians ``J_i`` (``vmap`` of ``jacrev``, in sub-batches of at most ``JACOBIAN_BUDGET`` elements) and
    output-space Hessians ``H_out_i`` of ``task.loss_from_outputs``.
    """
    _require_outputs(fmodel)
    task, p, n = fmodel.task, fmodel.num_params, len(data)
    out_module = _Bound(fmodel.model, task.outputs)

    def single_out(theta: torch.Tensor, *example: torch.Tensor) -> torch.Tensor:
        return fmodel._call(out_module, theta, tuple(t.unsqueeze(0) for t in example))[0].reshape(-1)

    def single_loss(o: torch.Tensor, shape: torch.Size, *example: torch.Tensor) -> torch.Tensor:
        return task.loss_from_outputs(o.reshape(1, *shape), tuple(t.unsqueeze(0) for t in example))[0]

    def batch_diagonal(batch: tuple) -> torch.Tensor:
        b = fmodel.prepare(batch)
        with torch.no_grad():
            outs = fmodel._call(out_module, fmodel.theta, b)
        shape = outs.shape[1:]
        k = max(1, int(shape.numel()))
        step = max(1, JACOBIAN_BUDGET // (k * p))
        dims = (None, *tuple(0 for _ in b))
        hess = vmap(
            jacrev(jacrev(lambda o, *ex: single_loss(o, shape, *ex))),
            in_dims=(0, *tuple(0 for _ in b)),
        )(outs.reshape(outs.shape[0], -1), *b)  # (b, k, k)
        part_sum = torch.zeros_like(fmodel.theta)
        for start in range(0, outs.shape[0], step):
            part = tuple(t[start : start + step] for t in b)
            jac = vmap(jacrev(single_out), in_dims=dims, chunk_size=fmodel.chunk_size)(fmodel.theta, *part)
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
    """Hutchinson's estimate ``mean_s z_s * (A z_s)`` of ``diag(A)`` with seeded Rademacher probes ``z_s``."""
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


# -- routes ----------------------------------------------------------------------------------------------------
class _Simple(Curvature):
    def _check_fitted(self) -> None:
        if not hasattr(self, "num_params_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet. Fix: call .fit(fmodel, data) first, or pass it "
                "to InfluenceFunction(curvature=...) which fits it."
            )

    def _rows(self, vectors: torch.Tensor) -> tuple[torch.Tensor, bool]:
        self._check_fitted()
        return _as_rows(vectors, self.num_params_, self.dtype_, self.device_)

    def _remember(self, fmodel: FunctionalModel) -> None:
        self.num_params_ = fmodel.num_params
        self.dtype_ = fmodel.dtype
        self.device_ = fmodel.device


class Identity(_Simple):
    """``C = I``: ``solve(v) = v / (1 + damping)``; influence scores become ``(1/n) grad f_q . g_i`` (damping 0).

    A baseline (gradient similarity, single-checkpoint TracIn with unit learning rate), not a leave-one-out
    estimate: it ignores curvature, so its numbers are off by the curvature's scale and direction. ``damping``
    ``"auto"`` is 0; a positive ``damping`` only rescales every score by ``1 / (1 + damping)``.
    """

    name = "identity"

    def __init__(self, damping: float | str = "auto") -> None:
        super().__init__()
        self.damping = _check_damping(damping)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Identity:
        self._remember(fmodel)
        self.damping_ = 0.0 if self.damping == "auto" else float(self.damping)
        self.info_ = {"route": self.name, "num_params": fmodel.num_params, "damping": self.damping_}
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = rows / (1.0 + self.damping_)
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = rows * (1.0 + self.damping_)
        return out[0] if one else out

    def __repr__(self) -> str:
        return f"Identity(damping={self.damping!r})"


DIAGONALS = ("gauss-newton", "empirical-fisher", "hessian")


class Diagonal(_Simple):
    """``C = diag(A)``: a diagonal of the curvature, inverted elementwise (see the module docstring).

    Args:
        matrix: ``"gauss-newton"`` (exact GGN diagonal, default; needs a task with ``outputs``),
            ``"empirical-fisher"`` (mean squared per-example gradient) or ``"hessian"`` (Hutchinson).
        damping: ``"auto"`` (0 unless an entry is negative, then ``0.01 * mean |d|``, as the dense routes) or a
            number ``>= 0``.
        negative: policy for negative entries (only the Hutchinson Hessian diagonal has them): ``"clip"``,
            ``"abs"`` or ``"keep"``.
        n_probes: Rademacher probes for ``matrix="hessian"``.
        random_state: seed of the probes.
    """

    name = "diagonal"

    def __init__(
        self,
        matrix: str = "gauss-newton",
        damping: float | str = "auto",
        negative: str = "clip",
        n_probes: int = 64,
        random_state: int = 0,
    ) -> None:
        super().__init__()
        self.matrix = check_choice("matrix", matrix, DIAGONALS)
        self.damping = _check_damping(damping)
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        self.n_probes = check_positive_int("n_probes", n_probes)
        self.random_state = _check_random_state(random_state)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Diagonal:
        source = as_data_source(data, "train")
        if self.matrix == "gauss-newton":
            _require_outputs(
                fmodel, fix="define both methods on the task, or use matrix='empirical-fisher' or 'hessian'"
            )
            diag = ggn_diagonal(fmodel, source, progress)
        elif self.matrix == "empirical-fisher":
            diag = empirical_fisher_diagonal(fmodel, source, progress)
        else:
            diag = hutchinson_diagonal(fmodel, source, "hessian", self.n_probes, self.random_state, progress)
        check_finite(
            diag, f"the {self.matrix} diagonal", "Fix: check the model's outputs and loss for NaN/inf."
        )
        inv, damping, info = spectral_inverse(diag, self.damping, self.negative, None, self.name)
        self._remember(fmodel)
        self.diagonal_ = diag
        self.inv_diagonal_ = inv
        self.damping_ = damping
        info.update({"matrix": self.matrix})
        if self.matrix == "hessian":
            info["n_probes"] = self.n_probes
        self.info_ = info
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = rows * self.inv_diagonal_
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = rows * (self.diagonal_ + self.damping_)
        return out[0] if one else out

    def __repr__(self) -> str:
        return f"Diagonal(matrix={self.matrix!r}, damping={self.damping!r}, negative={self.negative!r})"


def parameter_blocks(space: ParamSpace, blocks: str) -> list[tuple[str, torch.Tensor]]:
    """``(label, flat indices)`` of each block: one per parameter tensor (``"tensor"``) or per module
    (``"module"``: the tensors whose names share everything before the last dot, e.g. a layer's weight and bias)."""
    slices = space.slices()
    groups: dict[str, list[torch.Tensor]] = {}
    for name in space.names:
        label = name if blocks == "tensor" else (name.rsplit(".", 1)[0] if "." in name else name)
        s = slices[name]
        groups.setdefault(label, []).append(torch.arange(s.start, s.stop))
    return [(label, torch.cat(parts)) for label, parts in groups.items()]


class BlockDiagonal(_Simple):
    """The dense route restricted to diagonal blocks of the Hessian or Gauss-Newton matrix.

    Block ``b`` (a module's parameters, or one tensor) gets the matrix ``A_bb`` formed from products ``A e_j``
    for the unit vectors ``e_j`` of that block only (in chunks), eigendecomposed; the dense routes' eigenvalue
    policy (:meth:`~datatrace.curvature.dense.DenseCurvature._set_spectrum`: zero tolerance, ``negative=``,
    ``"auto"`` damping) runs once over the eigenvalues of all blocks, so every block shares one damping. Then
    ``solve(v)_b = U_b diag(phi(e_b)) U_b^T v_b``. Cross-block curvature is ignored; memory is ``O(sum |b|^2)``.

    Args:
        base: ``"exact"`` (Hessian blocks) or ``"gauss-newton"``.
        damping: ``"auto"`` or a number ``>= 0``.
        negative: ``"clip"``, ``"abs"`` or ``"keep"``.
        blocks: ``"module"`` (default; a layer's weight and bias together) or ``"tensor"``.
        rtol: relative tolerance for zero eigenvalues (``None``: the dense default).
        max_bytes: budget for the largest block (``3 |b|^2`` numbers) and one chunk of products.
    """

    name = "block-diagonal"

    def __init__(
        self,
        base: str = "exact",
        damping: float | str = "auto",
        negative: str = "clip",
        blocks: str = "module",
        rtol: float | None = None,
        max_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> None:
        super().__init__()
        self.base = check_choice("base", base, ("exact", "gauss-newton"))
        self.damping = _check_damping(damping)
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        self.blocks = check_choice("blocks", blocks, ("module", "tensor"))
        self.rtol = rtol
        self.max_bytes = check_positive_int("max_bytes", max_bytes)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> BlockDiagonal:
        source = as_data_source(data, "train")
        matrix = "hessian" if self.base == "exact" else "gauss-newton"
        if matrix == "gauss-newton":
            _require_outputs(fmodel, "base", fix="define both methods on the task, or use base='exact'")
        op = curvature_operator(fmodel, source, matrix)
        groups = parameter_blocks(fmodel.space, self.blocks)
        p = fmodel.num_params
        itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
        largest_label, largest = max(((label, len(idx)) for label, idx in groups), key=lambda t: t[1])
        if 3 * largest * largest * itemsize > self.max_bytes:
            raise MemoryError(
                f"block {largest_label!r} has {largest:,} parameters: its dense block needs about "
                f"{3 * largest**2 * itemsize / 1024**3:.1f} GiB, above max_bytes={self.max_bytes / 1024**3:.1f} GiB. "
                "Fix: use blocks='tensor', restrict params=, raise max_bytes, or use a matrix-free route."
            )
        step = max(1, min(fmodel.chunk_size or 256, self.max_bytes // (3 * p * itemsize)))
        evals, evecs = [], []
        with tqdm(total=p, desc="block curvature", disable=not progress, leave=False) as bar:
            for label, idx in groups:
                idx = idx.to(fmodel.device)
                rows = []
                for start in range(0, len(idx), step):
                    cols = idx[start : start + step]
                    unit = torch.zeros(len(cols), p, dtype=fmodel.dtype, device=fmodel.device)
                    unit[torch.arange(len(cols)), cols] = 1.0
                    rows.append(op(unit)[:, idx])
                    bar.update(len(cols))
                block = torch.cat(rows)
                block = 0.5 * (block + block.T)
                check_finite(
                    block,
                    f"the {self.base} curvature block {label!r}",
                    "Fix: check the model's outputs and loss for NaN/inf, or fit in float64.",
                )
                e, u = torch.linalg.eigh(block)
                evals.append(e)
                evecs.append(u)
        inv, damping, info = spectral_inverse(
            torch.cat(evals), self.damping, self.negative, self.rtol, self.name
        )
        inverse = torch.split(inv, [len(e) for e in evals])
        self._remember(fmodel)
        self.blocks_ = [(label, idx.to(fmodel.device)) for label, idx in groups]
        self.evals_ = evals
        self.evecs_ = evecs
        self.inv_evals_ = list(inverse)
        self.damping_ = damping
        info.update(
            {
                "base": self.base,
                "blocks": self.blocks,
                "num_blocks": len(groups),
                "largest_block": largest,
                "num_params": p,
            }
        )
        self.info_ = info
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = torch.zeros_like(rows)
        for (_, idx), u, inv in zip(self.blocks_, self.evecs_, self.inv_evals_):
            out[:, idx] = ((rows[:, idx] @ u) * inv) @ u.T
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self._rows(vectors)
        out = self.damping_ * rows
        for (_, idx), u, e in zip(self.blocks_, self.evecs_, self.evals_):
            out[:, idx] += ((rows[:, idx] @ u) * e) @ u.T
        return out[0] if one else out

    def __repr__(self) -> str:
        return (
            f"BlockDiagonal(base={self.base!r}, damping={self.damping!r}, negative={self.negative!r}, "
            f"blocks={self.blocks!r})"
        )


__all__ = [
    "BlockDiagonal",
    "Diagonal",
    "Identity",
    "empirical_fisher_diagonal",
    "ggn_diagonal",
    "hutchinson_diagonal",
    "parameter_blocks",
    "preconditioner_diagonal",
]
