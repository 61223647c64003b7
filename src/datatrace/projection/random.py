"""Seeded random projections of per-example gradients: the :class:`Projector` interface and the flat
(Johnson-Lindenstrauss) :class:`RandomProjector`.

A projector maps a parameter-space vector ``g`` (length ``p``, the flat layout of
:class:`~datatrace.params.ParamSpace`) to ``P^T g`` (length ``k << p``). Projected-gradient attributors store
``phi_i = P^T grad l_i`` once per training example and answer queries with products in the ``k``-dimensional space
(:mod:`datatrace.projection.store`, :mod:`datatrace.attributors.projected`). The per-layer factorised projection
(LoGra) is :mod:`datatrace.projection.factorized`.

:class:`RandomProjector` (``kind=``)
    A dense ``p x k`` matrix with i.i.d. entries, scaled so that ``E ||P^T g||^2 = ||g||^2`` for every ``g``:

    * ``"gaussian"``: ``N(0, 1/k)`` (Johnson & Lindenstrauss 1984; Dasgupta & Gupta 2003);
    * ``"rademacher"``: ``+-1/sqrt(k)`` with probability 1/2 each (Achlioptas 2003);
    * ``"sparse"``: ``+-sqrt(1/(s k))`` with probability ``s/2`` each and 0 otherwise, ``s = density`` (Achlioptas
      2003 uses ``s = 1/3``; the "very sparse" projections of Li, Hastie & Church 2006 use ``s = 1/sqrt(p)``, the
      default ``density="auto"``). Kept as a sparse matrix: memory and work ``O(sqrt(p) k)`` instead of ``O(p k)``.

    ``P`` is generated from the seed in blocks of :data:`ROWS_PER_SEED` rows, block ``j`` from its own derived seed
    (sha256 of ``(random_state, j)``) with torch's CPU generator in float32, so the same ``(random_state, kind,
    dim, density)`` gives the same matrix on every machine and device, and a ``p x k`` matrix never has to be held
    at once: when it is larger than ``max_cached_bytes`` it is regenerated block by block for every product
    (correct but slow; prefer ``kind="sparse"`` or the factorised projector for large models).

    ``dim="auto"`` uses the Johnson-Lindenstrauss bound for ``n`` points (the training set) and distortion ``eps``
    (Dasgupta & Gupta 2003, the bound scikit-learn's ``johnson_lindenstrauss_min_dim`` uses)::

        k >= 4 ln(n) / (eps^2 / 2 - eps^3 / 3)

    capped at ``max_dim`` (default 4096) and at ``p``; when the bound reaches ``p`` no projection is made (the
    identity, exact). The choice is logged.

Every projector computes *projected vector-Jacobian products* (:meth:`Projector.project_vjps`): rows ``P^T J_i^T c``
for output-space cotangents ``c`` of each example (``c = dl/do`` gives the projected gradient; the columns of a
factor of the output Hessian, :meth:`~datatrace.Task.output_hessian_factors`, give the projected Gauss-Newton
pseudo-gradients), and projects any flat parameter-space vector (:meth:`Projector.project`) and the regulariser
``P^T diag(lambda) P`` (:meth:`Projector.regularizer_matrix`).

Example:
    >>> import torch, datatrace
    >>> from datatrace.projection.random import RandomProjector
    >>> from datatrace.gradients.functional import FunctionalModel
    >>> fmodel = FunctionalModel(torch.nn.Linear(20, 3), datatrace.ClassificationTask())
    >>> proj = RandomProjector(dim=8, random_state=0).fit(fmodel, n_points=100)
    >>> proj.project(torch.randn(5, 63)).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap

from datatrace.data import map_batch, take_examples
from datatrace.errors import bad_value, check_choice, check_positive_int
from datatrace.gradients.functional import BoundFunction, FunctionalModel

logger = logging.getLogger(__name__)

PROJECTION_KINDS = ("gaussian", "rademacher", "sparse")
ROOTS = ("outputs", "loss", "measurement")
#: default distortion of dim="auto"
DEFAULT_EPS = 0.1
#: default cap of dim="auto"
DEFAULT_MAX_DIM = 4096
#: rows of a flat projection matrix generated from one derived seed
ROWS_PER_SEED = 1024
#: a flat projection matrix up to this size is generated once and kept (on the model's device)
DEFAULT_MAX_CACHED_BYTES = 2**30
#: RandomProjector: per-example vjp rows x p elements computed at once
_VJP_ELEMENTS = 2**25

Cotangents = Callable[[torch.Tensor], torch.Tensor]


# -- helpers -------------------------------------------------------------------------------------------------------


def jl_dim(n_points: int, eps: float = DEFAULT_EPS) -> int:
    """The Johnson-Lindenstrauss dimension ``ceil(4 ln(n) / (eps^2/2 - eps^3/3))`` (Dasgupta & Gupta 2003) that
    preserves all pairwise distances of ``n`` points within a factor ``1 +- eps`` with high probability."""
    n_points = check_positive_int("n_points", n_points)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 < eps < 1.0:
        raise bad_value("eps", eps, "expected a distortion strictly between 0 and 1", "pass e.g. eps=0.1")
    return max(1, math.ceil(4.0 * math.log(max(n_points, 2)) / (eps**2 / 2.0 - eps**3 / 3.0)))


def derive_seed(random_state: int, *keys: Any) -> int:
    """A 63-bit seed derived from ``random_state`` and ``keys`` (stable across runs, platforms and versions)."""
    text = json.dumps([int(random_state), *[str(k) for k in keys]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def random_matrix(rows: int, cols: int, kind: str, seed: int, density: float = 1.0) -> torch.Tensor:
    """A ``rows x cols`` float32 CPU matrix of i.i.d. entries with ``E[x^2] = 1/cols`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    if kind == "rademacher":
        return (torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.float32) * 2.0 - 1.0) / math.sqrt(
            cols
        )
    if kind == "sparse":
        u = torch.rand(rows, cols, generator=g)
        scale = math.sqrt(1.0 / (density * cols))
        return ((u < density / 2).float() - (u >= 1.0 - density / 2).float()) * scale
    raise bad_value("kind", kind, f"expected one of {list(PROJECTION_KINDS)}", "pass kind='gaussian'")


def check_density(density: Any) -> float | str:
    if density == "auto":
        return "auto"
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise bad_value("density", density, "expected 'auto' or a number in (0, 1]", "pass e.g. density=1/3")
    return float(density)


def check_dim(name: str, dim: Any) -> int | str:
    if dim == "auto":
        return "auto"
    return check_positive_int(name, dim)


def check_seed(random_state: Any) -> int:
    if isinstance(random_state, bool) or not isinstance(random_state, int) or random_state < 0:
        raise bad_value(
            "random_state", random_state, "expected a non-negative int", "pass e.g. random_state=0"
        )
    return random_state


def _root_module(fmodel: FunctionalModel, root: str) -> nn.Module:
    check_choice("root", root, ROOTS)
    if root == "loss":
        return fmodel.loss_module
    if root == "measurement":
        return fmodel.measurement_module
    return BoundFunction(fmodel.model, fmodel.task.outputs)


def cotangents_for(root: str, outputs: torch.Tensor, cotangents: Cotangents | None) -> torch.Tensor:
    b = outputs.shape[0]
    if root == "outputs":
        if cotangents is None:
            raise bad_value(
                "cotangents", None, "root='outputs' needs output-space cotangents", "pass a callable"
            )
        cot = cotangents(outputs.detach())
        width = outputs[0].numel()
        if cot.dim() != 3 or cot.shape[0] != b or cot.shape[2] != width:
            raise bad_value(
                "cotangents", cot, f"expected shape (batch={b}, columns, outputs={width})", "return (b, c, K)"
            )
        return cot.to(outputs.dtype)
    if outputs.shape != (b,) and outputs.numel() != b:
        raise ValueError(
            f"the task's {root} returned shape {tuple(outputs.shape)} for a batch of {b}; it must return one value "
            "per example, shape (batch_size,). Fix: use reduction='none' and do not average over the batch."
        )
    return torch.ones(b, 1, 1, dtype=outputs.dtype, device=outputs.device)


# -- the interface -------------------------------------------------------------------------------------------------


class Projector(ABC):
    """Base class. Constructors only store settings; :meth:`fit` binds the projector to a model's parameter space
    and a number of points (for ``"auto"`` dimensions); learned state ends in ``_`` (``dim_``...)."""

    @abstractmethod
    def fit(self, fmodel: FunctionalModel, n_points: int) -> Projector:
        """Choose dimensions and draw the projection for the parameters in scope of ``fmodel``; return ``self``."""

    @abstractmethod
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """``P^T v`` for each row ``v`` of ``vectors`` (shape ``(m, p)`` in the flat parameter layout) -> ``(m, k)``."""

    @abstractmethod
    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        """Projected per-example vector-Jacobian products, shape ``(b, c, k)``.

        ``root="loss"`` / ``"measurement"``: ``P^T grad l_i`` (``c = 1``). ``root="outputs"``: ``P^T J_i^T C_i[c]``
        for the cotangents ``C = cotangents(outputs)`` of shape ``(b, c, K)`` (``K`` outputs per example), with
        ``J_i`` the Jacobian of example ``i``'s outputs. ``batch`` must already be cast to the model's dtype/device.
        """

    @abstractmethod
    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        """``P^T diag(lambda) P`` (``k x k``, float64), ``lambda`` the task's weight decay per parameter.

        ``rescaled=True`` multiplies it by the fraction of dimensions kept, ``min(1, k/p)`` (per layer and side
        for the factorised projection): with ``E[P P^T] = I``, ``P^T diag(lambda) P ~ mean(lambda) (p/k) I`` for
        ``k < p``, ``p/k`` times the regulariser that the projected gradients (whose inner products the
        projection preserves) see in the full space; the rescaled matrix is ``~ mean(lambda) I``. Identical to
        the unscaled one when nothing is projected away (``k >= p``).
        """

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON facts that identify the fitted projection (for stores): same fingerprint, same matrix."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "dim_"):
            raise RuntimeError(
                f"this {type(self).__name__} is not fitted. Fix: call .fit(fmodel, n_points) first (attributors "
                "do this in their own fit)."
            )


# -- flat projections ----------------------------------------------------------------------------------------------


class RandomProjector(Projector):
    """A seeded ``p x k`` random projection of flat per-example gradients (see the module docstring).

    Args:
        dim: ``k``, or ``"auto"`` (Johnson-Lindenstrauss bound for the number of training examples, capped).
        kind: ``"gaussian"`` (default), ``"rademacher"``, ``"sparse"``, or ``"identity"`` (no projection,
            ``k = p``: projected influence is then exactly the unprojected Gauss-Newton influence, with the store
            and a Cholesky solve; ``dim`` must be ``"auto"``).
        random_state: non-negative int seed; the matrix is a function of it (and of ``kind``, ``dim``,
            ``density`` and ``p``) only.
        eps: distortion for ``dim="auto"``.
        max_dim: cap of ``dim="auto"``.
        density: non-zero fraction for ``kind="sparse"``; ``"auto"`` is ``1/sqrt(p)`` (Li et al. 2006).
        max_cached_bytes: keep the generated matrix (on the model's device) if it is at most this large.

    After :meth:`fit`: ``dim_``, ``kind_`` (``"identity"`` when ``dim="auto"`` reached ``p``), ``density_``,
    ``num_params_``.
    """

    def __init__(
        self,
        dim: int | str = "auto",
        kind: str = "gaussian",
        random_state: int = 0,
        *,
        eps: float = DEFAULT_EPS,
        max_dim: int = DEFAULT_MAX_DIM,
        density: float | str = "auto",
        max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
    ) -> None:
        self.dim = check_dim("dim", dim)
        self.kind = check_choice("kind", kind, (*PROJECTION_KINDS, "identity"))
        if self.kind == "identity" and self.dim != "auto":
            raise bad_value(
                "dim", dim, "kind='identity' keeps all p dimensions", "leave dim='auto' with kind='identity'"
            )
        self.random_state = check_seed(random_state)
        jl_dim(2, eps)  # validates eps
        self.eps = eps
        self.max_dim = check_positive_int("max_dim", max_dim)
        self.density = check_density(density)
        self.max_cached_bytes = check_positive_int("max_cached_bytes", max_cached_bytes, minimum=0)

    def __repr__(self) -> str:
        return (
            f"RandomProjector(dim={self.dim!r}, kind={self.kind!r}, random_state={self.random_state!r}, "
            f"eps={self.eps!r}, max_dim={self.max_dim!r}, density={self.density!r})"
        )

    def fit(self, fmodel: FunctionalModel, n_points: int) -> RandomProjector:
        p = fmodel.num_params
        self.fmodel_ = fmodel
        self.num_params_ = p
        self.kind_ = self.kind
        if self.kind == "identity":
            k = p
        elif self.dim == "auto":
            bound = jl_dim(n_points, self.eps)
            k = min(bound, self.max_dim, p)
            if k >= p:
                self.kind_ = "identity"
            logger.info(
                "RandomProjector(dim='auto'): Johnson-Lindenstrauss bound 4 ln(n)/(eps^2/2 - eps^3/3) = %d for "
                "n=%d, eps=%g; capped at max_dim=%d and p=%d -> dim=%d%s.",
                bound,
                n_points,
                self.eps,
                self.max_dim,
                p,
                k,
                " (no projection: identity)" if self.kind_ == "identity" else "",
            )
        else:
            k = int(self.dim)
            if k >= p:
                logger.info(
                    "RandomProjector: dim=%d >= p=%d parameters; the projection is invertible on its range, so "
                    "projected influence is exact, but the projection saves nothing.",
                    k,
                    p,
                )
        self.dim_ = k
        self.density_ = (
            (1.0 / math.sqrt(p) if self.density == "auto" else float(self.density))
            if self.kind_ == "sparse"
            else 1.0
        )
        self.dtype_ = fmodel.dtype
        self.device_ = fmodel.device
        self._cached: torch.Tensor | None = None
        self._cached_sparse_t: torch.Tensor | None = None
        if self.kind_ == "identity":
            return self
        itemsize = torch.empty((), dtype=self.dtype_).element_size()
        if self.kind_ == "sparse":
            nnz = p * k * self.density_
            if nnz * (itemsize + 8) <= self.max_cached_bytes:
                self._cached_sparse_t = self._build_sparse_t()
        elif p * k * itemsize <= self.max_cached_bytes:
            self._cached = torch.cat([block for _, _, block in self._blocks()])
        if self._cached is None and self._cached_sparse_t is None:
            logger.warning(
                "RandomProjector: the %d x %d projection matrix (%.1f GiB) exceeds max_cached_bytes=%d, so it is "
                "regenerated block by block for every product: correct but slow. Fix: kind='sparse', a smaller dim, "
                "FactorizedProjector (no p x k matrix at all), or a larger max_cached_bytes.",
                p,
                k,
                p * k * itemsize / 1024**3,
                self.max_cached_bytes,
            )
        return self

    def _blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(row_start, row_stop, dense block)`` of ``P`` in the working dtype, on the model's device."""
        p, k = self.num_params_, self.dim_
        for j, start in enumerate(range(0, p, ROWS_PER_SEED)):
            stop = min(p, start + ROWS_PER_SEED)
            seed = derive_seed(self.random_state, "flat", self.kind_, k, j)
            block = random_matrix(stop - start, k, self.kind_, seed, self.density_)
            yield start, stop, block.to(device=self.device_, dtype=self.dtype_)

    def _build_sparse_t(self) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for start, _, block in self._blocks():
            nz = block.nonzero()
            rows.append(nz[:, 0] + start)
            cols.append(nz[:, 1])
            vals.append(block[nz[:, 0], nz[:, 1]])
        index = torch.stack([torch.cat(cols), torch.cat(rows)])  # (k, p) = P^T
        coo = torch.sparse_coo_tensor(
            index, torch.cat(vals), (self.dim_, self.num_params_), check_invariants=True
        )
        return coo.coalesce()

    def matrix(self) -> torch.Tensor:
        """The dense ``p x k`` matrix ``P`` (for tests and small models)."""
        self._check_fitted()
        if self.kind_ == "identity":
            return torch.eye(self.num_params_, dtype=self.dtype_, device=self.device_)
        if self._cached is not None:
            return self._cached
        return torch.cat([block for _, _, block in self._blocks()])

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params_:
            raise bad_value(
                "vectors",
                vectors,
                f"expected shape (m, {self.num_params_}) in the flat parameter layout",
                "reshape",
            )
        v = vectors.to(device=self.device_, dtype=self.dtype_)
        if self.kind_ == "identity":
            return v.clone()
        if self._cached is not None:
            return v @ self._cached
        if self._cached_sparse_t is not None:
            return torch.sparse.mm(self._cached_sparse_t, v.T.contiguous()).T
        out = torch.zeros(v.shape[0], self.dim_, dtype=v.dtype, device=v.device)
        for start, stop, block in self._blocks():
            out += v[:, start:stop] @ block
        return out

    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        self._check_fitted()
        fmodel = self.fmodel_
        module = _root_module(fmodel, root)
        with torch.no_grad():
            outputs = fmodel.call(module, fmodel.theta, batch)
        cot = cotangents_for(root, outputs, cotangents)  # (b, c, K)
        b, c = cot.shape[0], cot.shape[1]
        scalar = root != "outputs"

        def single(theta: torch.Tensor, cot_i: torch.Tensor, example: tuple | dict) -> torch.Tensor:
            ex = map_batch(lambda t: t.unsqueeze(0), example)  # one example, in the batch's own form

            def f(t: torch.Tensor) -> torch.Tensor:
                out = fmodel.call(module, t, ex)
                if scalar and out.shape != (1,):
                    raise ValueError(
                        f"the task's {root} returned shape {tuple(out.shape)} for a batch of one example; it must "
                        "return one value per example, shape (batch_size,). Fix: use reduction='none'."
                    )
                return out.reshape(-1)

            _, pullback = vjp(f, theta)
            return vmap(lambda v: pullback(v)[0])(cot_i)

        per = max(1, _VJP_ELEMENTS // max(1, c * self.num_params_))
        parts = []
        for start in range(0, b, per):
            sl = slice(start, start + per)
            # vmap over examples, or one example at a time where the model defeats vmap (FunctionalModel)
            grads = fmodel.over_examples(
                single, (fmodel.theta,), (cot[sl], take_examples(batch, sl))
            ).detach()  # (b', c, p)
            parts.append(
                self.project(grads.reshape(-1, self.num_params_)).reshape(grads.shape[0], c, self.dim_)
            )
        return torch.cat(parts)

    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        self._check_fitted()
        lam = self.fmodel_.regularizer.to(torch.float64)
        k = self.dim_
        if self.kind_ == "identity":
            return torch.diag(lam)
        out = torch.zeros(k, k, dtype=torch.float64, device=self.device_)
        if not bool((lam != 0).any()):
            return out
        if self._cached is not None:
            P = self._cached.to(torch.float64)
            out = (P * lam[:, None]).T @ P
        else:
            for start, stop, block in self._blocks():
                B = block.to(torch.float64)
                out += (B * lam[start:stop, None]).T @ B
        return out * min(1.0, k / self.num_params_) if rescaled else out

    def fingerprint(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": "RandomProjector",
            "kind": self.kind_,
            "dim": self.dim_,
            "random_state": self.random_state,
            "density": self.density_,
            "num_params": self.num_params_,
            "rows_per_seed": ROWS_PER_SEED,
            "generator": "torch.Generator(cpu) float32, seeds derive_seed(random_state, 'flat', kind, dim, block)",
        }


__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MAX_DIM",
    "PROJECTION_KINDS",
    "ROOTS",
    "Cotangents",
    "Projector",
    "RandomProjector",
    "check_density",
    "check_dim",
    "check_seed",
    "cotangents_for",
    "derive_seed",
    "jl_dim",
    "random_matrix",
]
