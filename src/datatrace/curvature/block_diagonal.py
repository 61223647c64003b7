"""``curvature="block-diagonal"``: the dense route restricted to diagonal blocks (per module or per tensor).

Block ``b``'s matrix ``A_bb`` is the ``(b, b)`` sub-block of the Hessian (``base="exact"``) or Gauss-Newton
matrix, formed from products ``A e_j`` with unit vectors of that block only (never the ``p x p`` matrix;
:func:`datatrace.gradients.products.curvature_operator`), eigendecomposed, and inverted with
:func:`datatrace.linalg.spectral_inverse` applied to the eigenvalues of all blocks together (one damping, one zero
tolerance). Exact when the curvature is block diagonal, e.g. a single layer; memory ``O(sum |b|^2)``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from datatrace.curvature.base import DEFAULT_MAX_DENSE_BYTES, Curvature, check_damping, check_rtol
from datatrace.data import DataSource, as_data_source
from datatrace.errors import check_choice, check_finite, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import curvature_operator, require_outputs
from datatrace.linalg import NEGATIVE_POLICIES, spectral_inverse
from datatrace.params import ParamSpace


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


class BlockDiagonal(Curvature):
    """The dense route restricted to diagonal blocks of the Hessian or Gauss-Newton matrix.

    Block ``b`` (a module's parameters, or one tensor) gets the matrix ``A_bb`` formed from products ``A e_j``
    for the unit vectors ``e_j`` of that block only (in chunks), eigendecomposed; the dense routes' eigenvalue
    policy (:func:`~datatrace.linalg.spectral_inverse`: zero tolerance, ``negative=``,
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
        self.damping = check_damping(damping)
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        self.blocks = check_choice("blocks", blocks, ("module", "tensor"))
        self.rtol = check_rtol(rtol)
        self.max_bytes = check_positive_int("max_bytes", max_bytes)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> BlockDiagonal:
        source = as_data_source(data, "train")
        matrix = "hessian" if self.base == "exact" else "gauss-newton"
        if matrix == "gauss-newton":
            require_outputs(fmodel, "base", fix="define both methods on the task, or use base='exact'")
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
        self.remember_shape(fmodel)
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
        rows, one = self.rows(vectors)
        out = torch.zeros_like(rows)
        for (_, idx), u, inv in zip(self.blocks_, self.evecs_, self.inv_evals_):
            out[:, idx] = ((rows[:, idx] @ u) * inv) @ u.T
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        out = self.damping_ * rows
        for (_, idx), u, e in zip(self.blocks_, self.evecs_, self.evals_):
            out[:, idx] += ((rows[:, idx] @ u) * e) @ u.T
        return out[0] if one else out

    def __repr__(self) -> str:
        return (
            f"BlockDiagonal(base={self.base!r}, damping={self.damping!r}, negative={self.negative!r}, "
            f"blocks={self.blocks!r})"
        )


__all__ = ["BlockDiagonal", "parameter_blocks"]
