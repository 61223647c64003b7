"""K-FAC and EK-FAC: Kronecker-factored curvature for the layers of :mod:`datatrace.capture.kinds` (Linear, Conv2d,
Conv1d, transformers' Conv1D).

For a layer ``y = W a (+ b)`` with per-example gradient ``G_i = sum_t s_it a_it^T`` (``s = dl/dy`` the
pre-activation output gradient, ``t`` the locations where the layer is applied: one for a dense layer on a vector,
the output pixels of a convolution, the tokens of a sequence), the layer's block of the data term of the curvature

    C_layer = (1/n) sum_i sum_c vec(G_ic) vec(G_ic)^T

is approximated by a Kronecker product of two small matrices (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions):

    A = (1 / (n T)) sum_i sum_t a_it a_it^T            (inputs; a 1 is appended when the bias is in scope)
    S = (1 / n)     sum_i sum_c sum_t s_ict s_ict^T     (output gradients, summed over locations)
    C_layer  ~  S (x) A                                 (torch's row-major layout of W: output unit first)

``c`` runs over *pseudo-gradients* that make ``sum_c s s^T`` an unbiased or exact stand-in for the Gauss-Newton
matrix, chosen by ``fisher=``:

* ``"ggn"`` (default): the output Hessian of every example, ``d^2 l_i / d o^2 = L_i L_i^T``, is factored exactly
  (:meth:`~datatrace.Task.output_hessian_factors`: closed forms for the built-in tasks, ``torch.func`` and ``eigh``
  otherwise) and its ``k`` columns are backpropagated. Then
  ``sum_c G_ic G_ic^T = J_i^T H_i J_i``: K-FAC's only approximation is the Kronecker factorisation, which is exact
  for a single linear layer with squared error (where ``H_i = 2 I`` for every example).
* ``"sampled"``: the true Fisher, with ``n_samples`` labels per example drawn from the model's predictive
  distribution (categorical for softmax, Bernoulli for one logit, Gaussian with variance 1/2 for
  :class:`~datatrace.RegressionTask`, whose loss has no factor 1/2: :meth:`~datatrace.Task.sample_targets`);
  seeded by ``random_state``. A custom task takes part by overriding ``sample_targets(outputs, batch, generator)``.
  An unbiased estimate of the GGN for these losses.
* ``"empirical"``: the gradients of the actual labels (the "empirical Fisher", Kunstner et al. 2019 explain why it
  is a poor curvature estimate away from a perfect fit; offered for comparison and for tasks without outputs).

**The weighted input factor** (``input_factor="weighted"``, EK-FAC's default). K-FAC's factorisation
``E[s s^T (x) a a^T] ~ E[s s^T] (x) E[a a^T]`` treats the output curvature of a row as independent of its input,
but the examples that carry curvature are the uncertain ones (a confident softmax has ``s ~ 0``), so the plain
mean ``A`` is dominated by inputs that contribute nothing. Weighting every row by the squared norm of its
pseudo-gradients,

    A_w = sum_{i,c,t} ||s_ict||^2 a_it a_it^T / sum_{i,c,t} ||s_ict||^2,

is one step of the power iteration for the nearest Kronecker product in Frobenius norm (Van Loan & Pitsianis
1993) started from ``S = I``, costs nothing extra (same pass, same hooks) and keeps the trace exact for dense
layers: ``tr(S (x) A_w) = (1/n) sum ||s||^2 ||a||^2``. EK-FAC only takes the eigenbasis from ``A``, so this
changes which basis its eigenvalues are refitted in. Against actual leave-one-out retraining it helps EK-FAC and
not K-FAC, whose eigenvalues are the products of the factors', so K-FAC keeps the mean by default (the rows
``kfac-weighted`` and ``ekfac-mean`` of ``benchmarks/bench_curvature.py``, benchmarks/README.md).

**EK-FAC** (George et al. 2018; Grosse et al. 2023, eq. 20) keeps the eigenbases ``Q_S``, ``Q_A`` of the two
factors but refits the eigenvalues as the second moments of the per-example pseudo-gradients in that basis,

    Lambda_jk = (1/n) sum_i sum_c ((Q_S^T G_ic Q_A)_jk)^2,

which is the best diagonal approximation of the true block in the Kronecker eigenbasis (in Frobenius norm), so
the trace of EK-FAC's block equals the trace of the true one. This needs a second pass over the data (the
eigenbases must be known first); the per-example gradients are formed from the same hooks, never with a
separate ``torch.func`` pass.

**The regulariser is exact.** The training objective's L2 term ``lambda`` (per parameter,
:meth:`~datatrace.Task.weight_decay_for`) is added to the eigenvalues, so ``solve`` returns
``(Q (Lambda + lambda_w + damping) Q^T)^{-1} v`` with ``Q = Q_S (x) Q_A`` applied as two matrix products per side,
never forming a Kronecker product. When a layer's bias has its own strength ``lambda_b != lambda_w`` (e.g.
scikit-learn's unpenalised intercept) the difference ``(lambda_b - lambda_w) E E^T`` (``E`` selects the bias
column) is a rank-``out`` correction whose Woodbury inverse is diagonal in the ``Q_S`` basis, so it is inverted
exactly at the cost of one more elementwise product: no approximation and no extra matrix products (where
``1 + delta w_k`` vanishes, an unpenalised bias in a direction without curvature or damping, that direction is
projected out, the pseudo-inverse; the one case left approximate is ``lambda_w + damping = 0 < lambda_b`` with a
zero data eigenvalue, which ``"auto"`` damping never produces).

Batches are whatever the data gives, tuples or dicts (a Dataset of dicts, the Hugging Face form): the route only
calls the task (``outputs``, ``loss``, ``output_hessian_factors``, ``sample_targets``) and repeats a batch for
``n_samples`` with :func:`datatrace.data.map_batch`, so a task that reads ``batch["input_ids"]`` takes part in every
``fisher=`` (``"sampled"`` needs its ``sample_targets`` to return the batch in its own form with new targets, as
:func:`datatrace.tasks.with_targets` does).

Layers are independent blocks (the curvature is block-diagonal across layers). A layer called several times in
one forward pass (weight sharing across calls) has its calls treated as further locations (the "expand" setting
of Eschenhagen et al. 2023), so its per-example gradient, and EK-FAC, stay exact sums over calls.

**Damping** (added to every eigenvalue on top of the regulariser): a float, or ``"auto"``. Because the
regulariser is already in the eigenvalues, damping is not needed to make the inverse exist; it only guards
directions whose approximate eigenvalue is near zero. ``"auto"`` therefore uses **0** where every parameter of the
layer is penalised (``lambda > 0``) and ``1e-3`` times the layer's mean eigenvalue otherwise. Zero eigenvalues
(e.g. the softmax's shift direction of an unpenalised bias, with damping 0) are dropped: a pseudo-inverse, as in
the dense routes. Away from a minimum of the objective (told by the attributor,
:class:`~datatrace.curvature.base.TrainingState`) ``"auto"`` is instead one damping for every layer that keeps
``KFAC_DOF_PER_OUTPUT`` effective directions per output column and location over all layers' eigenvalues
together (:func:`datatrace.linalg.dof_damping`; the count reaching the parameters means no damping): the columns are the model outputs
(the sampled Fisher: its draws, one per predictive distribution), times the most locations per example of any
layer (a convolution's pixels, a sequence's positions; 1 for a dense layer), since every column reaches every
location and the Kronecker factors spread the curvature over that many more directions. Without it a model
trained for a budget, with most examples fitted, gets near-zero eigenvalues whose inverse turns the scores into
noise.

Where ``lambda > 0`` extra damping only shrinks the scores and lowers their agreement with the exact Hessian;
with ``lambda = 0`` small fractions of the mean eigenvalue (up to ``1e-3``) are indistinguishable from each other
and larger ones hurt (``benchmarks/bench_curvature.py --damping-grid``).

**Accuracy to expect.** K-FAC is exact for a single dense layer with squared error; elsewhere its factorisation
``E[H_i (x) a_i a_i^T] ~ E[H_i] (x) E[a_i a_i^T]`` ignores that confident examples have small output curvature,
so it underestimates the curvature along gradient directions and its scores are larger than the exact ones; on a
network the last layer's block dominates the error, more than the block-diagonal structure. EK-FAC's eigenvalues
are the best diagonal in K-FAC's eigenbasis (its trace equals the true block's); it helps most when input
features have uneven scales. Use ``curvature="exact"`` or ``"gauss-newton"`` when the model is small enough, and
K-FAC/EK-FAC for rankings on models where nothing denser fits (benchmarks/README.md has the measured agreement).

**Scale: rankings, not leave-one-out units.** Gradients lie mostly along the directions of largest curvature
(the Gauss-Newton matrix is an average of outer products of the same kind of vectors), and any approximation
that spreads that curvature over other directions, here the Kronecker factorisation, K-FAC's eigenbasis (also
under EK-FAC's exact eigenvalues, the diagonal of the true block in that basis) and the blocks per layer,
underestimates it along the gradients: the scores come out larger than the Gauss-Newton ones, and more so for
convolutions (output gradients correlated across locations) and for layers whose inputs are large where the
model is confident. Nothing in the factors is mis-scaled: on one dense layer K-FAC equals its closed form
``E[L L^T] (x) E[a a^T]`` and EK-FAC's eigenvalues the exact diagonal (tests/curvature/test_curvature_kfac.py).
So :class:`~datatrace.InfluenceFunction` marks these scores ``metadata["units"] = "rank-only"`` and counts the
queries whose scores fall below minus their own loss. One regime is exact: with two softmax classes every
example's output Hessian is ``p1 p2 u u^T`` with the same ``u = (1, -1)``, so the last layer's block is exactly
``u u^T (x) (1/n) sum_i p1 p2 a_i a_i^T``, which ``input_factor="weighted"`` reproduces and the mean factor
does not (for such a model prefer ``input_factor="weighted"`` or EK-FAC).

**Under torch.distributed** (a process group the caller initialised, e.g. with ``torchrun``): each rank passes
over its own contiguous shard of the data (:func:`datatrace.distributed.shard_indices`) for the factors and for
EK-FAC's eigenvalues, and the sums (``A``, ``S``, the weights, the eigenvalues, the example counts) are
all-reduced in one collective per pass, so every rank fits the same factors as a single process would (up to the
order of float additions; ``info["examples_this_rank"]`` shows the split). ``fisher="sampled"`` draws from one
seeded stream per rank (``random_state + rank``), so its samples differ from a single process's (same
distribution). A failure on one rank raises on every rank instead of leaving the others waiting.

Every factor is accumulated and eigendecomposed in float64; the per-batch products and the basis rotations (the
bulk of the work) run in the working dtype of the model when it is float32 or lower (in float32 then), whose
rounding is already in the gradients they rotate, and in float64 for a float64 model. Non-finite factors raise a ``FloatingPointError``
naming the layer. Parameters in scope that do not belong to a supported module (LayerNorm, embeddings, a bare
``nn.Parameter``, a weight shared by two modules) raise a ``ValueError`` naming them. On the first batch the
per-example gradients rebuilt from the hooks are checked against autograd's batch gradient, which catches weights
used outside their module's forward.

Example:
    >>> import torch, datatrace
    >>> from datatrace.curvature.kfac import EKFAC
    >>> X, y = torch.randn(60, 4, dtype=torch.float64), torch.arange(60) % 3
    >>> model = torch.nn.Linear(4, 3).double()
    >>> inf = datatrace.InfluenceFunction(model, datatrace.ClassificationTask(weight_decay=1e-2),
    ...                                  curvature=EKFAC(), progress=False).fit((X, y))
    >>> inf.score((X[:2], y[:2])).values.shape
    torch.Size([2, 60])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from datatrace.capture.engine import (
    CHUNK_ELEMENTS,
    Backprop,
    Layer,
    Recording,
    check_gradients,
    first_nonfinite,
    recording,
)
from datatrace.capture.engine import find_layers as engine_find_layers
from datatrace.capture.kinds import SUPPORTED_LAYERS, weight_decay_per_tensor
from datatrace.curvature.base import Curvature
from datatrace.curvature.registry import matrix_free_names
from datatrace.data import DataSource, map_batch
from datatrace.distributed import all_reduce_sum, distributed_sum, world
from datatrace.errors import bad_value, check_choice, check_nonnegative_float, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.linalg import dof_damping, zero_tolerance
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

FISHER_TYPES = ("ggn", "sampled", "empirical")
INPUT_FACTORS = ("weighted", "mean")
#: fisher="ggn" backpropagates one pseudo-gradient per output; above this many outputs use fisher="sampled"
MAX_GGN_OUTPUTS = 1024


def default_fisher(task: Task, outputs: int | None) -> str:
    """The Fisher a route takes by default for a model with ``outputs`` outputs per example: ``"sampled"`` when
    the exact output Hessian would be refused (more than :data:`MAX_GGN_OUTPUTS`: a language model's positions x
    vocabulary) and the task can sample targets, else ``"ggn"``."""
    samples = type(task).sample_targets is not Task.sample_targets
    return "sampled" if outputs is not None and outputs > MAX_GGN_OUTPUTS and samples else "ggn"


#: away from a minimum, K-FAC/EK-FAC's "auto" damping keeps this many effective directions per model output (more
#: than the dense routes' ten: the Kronecker eigenvalues spread the spectrum, so the same count damps too much)
KFAC_DOF_PER_OUTPUT = 75
#: ... and at most this fraction of the parameters in scope (1: once the count reaches them, no damping; the dense
#: routes stop at half, :meth:`~datatrace.curvature.base.TrainingState.dof_target`)
KFAC_DOF_MAX_FRACTION = 1.0
#: "auto" damping, as a fraction of the layer's mean eigenvalue, used when the regulariser does not bound the
#: eigenvalues away from zero
AUTO_DAMPING_FRACTION = 1e-3
SUPPORTED_MODULES = SUPPORTED_LAYERS


# -- layers --------------------------------------------------------------------------------------------------------


@dataclass
class _Layer(Layer):
    """A supported layer (:class:`~datatrace.capture.engine.Layer`) and what K-FAC learned about it (float64)."""

    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    locations: int = 0
    examples: int = 0
    calls: int = 0
    Q_A: torch.Tensor | None = None
    Q_S: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None  # (out, in') data-term eigenvalues in the Q_S (x) Q_A basis
    inv: torch.Tensor | None = None  # (out, in') 1 / (eigenvalue + lambda + damping), 0 where dropped
    bias_row: torch.Tensor | None = None  # last row of Q_A, when a Woodbury bias correction is needed
    bias_correction: torch.Tensor | None = None  # (out,) diagonal of the Woodbury term in the Q_S basis
    lam: float = 0.0
    lam_bias: float = 0.0
    damping: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _real_positions(mask: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor | None:
    """The task's position mask ``(b, T)`` laid over a layer's input rows ``(b, T', in')`` (``T'`` = calls x ``T``
    for a layer called several times), or ``None`` when there is no mask or the layer's rows are not positions of
    the sequence (an image, a pooled vector)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != a.shape[0] or mask.shape[1] == 0:
        return None
    if a.shape[1] % mask.shape[1]:
        return None
    return mask.to(a.device).repeat(1, a.shape[1] // mask.shape[1])


def _other_routes() -> str:
    names = [n for n in matrix_free_names() if "kfac" not in n]
    if names:
        return "a matrix-free route (" + ", ".join(f"curvature={n!r}" for n in names) + ")"
    return "curvature='cg' (matrix-free) where available, or curvature='exact' / 'gauss-newton' for a small model"


def find_layers(fmodel: FunctionalModel) -> list[_Layer]:
    """The supported modules owning the parameters in scope, in model order.

    Raises a ValueError naming every parameter in scope that no supported module owns (or that two modules
    share), and for grouped convolutions.
    """
    layers, listed = engine_find_layers(fmodel, "K-FAC here", f"use {_other_routes()}", _Layer)
    if listed:
        raise ValueError(
            f"K-FAC covers parameters of {SUPPORTED_MODULES} only, each owned by a single module, but these "
            f"parameters in scope are not: {listed[:12]}{' ...' if len(listed) > 12 else ''}. Fix: exclude them "
            f"with params= (e.g. params={[layer.name for layer in layers][:4] or ['<layer name>']}), or use "
            f"{_other_routes()}."
        )
    return layers


# -- the route -------------------------------------------------------------------------------------------------------


class KFAC(Curvature):
    """Kronecker-factored curvature ``S (x) A`` per layer, plus the exact regulariser and damping.

    Args:
        fisher: ``"ggn"`` (exact output-space Gauss-Newton, the default), ``"sampled"`` (true Fisher with
            ``n_samples`` labels drawn from the model per example) or ``"empirical"`` (gradients of the labels).
        damping: added to every eigenvalue on top of the regulariser; ``"auto"`` (module docstring) or a float.
        n_samples: labels sampled per example for ``fisher="sampled"``.
        random_state: seed of those samples (an int; ``None`` draws a fresh seed).
        input_factor: ``"mean"`` (the classic ``A = E[a a^T]``) or ``"weighted"`` (``A`` weighted by the squared
            norm of each row's output pseudo-gradients; module docstring); ``None``: the route's default, ``"mean"``
            for K-FAC and ``"weighted"`` for EK-FAC.

    After ``fit``: ``layers_`` (per layer factors and eigendecompositions), ``info`` (per-layer damping,
    factor sizes, eigenvalue ranges).
    """

    name = "kfac"
    layers_only = True
    _refit_eigenvalues = False
    _default_input_factor = "mean"

    def __init__(
        self,
        fisher: str = "ggn",
        damping: float | str = "auto",
        n_samples: int = 1,
        random_state: int | None = 0,
        input_factor: str | None = None,
    ) -> None:
        super().__init__()
        self.fisher = check_choice("fisher", fisher, FISHER_TYPES)
        if input_factor is None:
            input_factor = self._default_input_factor
        self.input_factor = check_choice("input_factor", input_factor, INPUT_FACTORS)
        if damping != "auto":
            damping = check_nonnegative_float("damping", damping)
        self.damping = damping
        self.n_samples = check_positive_int("n_samples", n_samples)
        if random_state is not None and (
            isinstance(random_state, bool) or not isinstance(random_state, int) or random_state < 0
        ):
            raise bad_value(
                "random_state", random_state, "expected an int >= 0 or None", "pass e.g. random_state=0"
            )
        self.random_state = random_state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fisher={self.fisher!r}, damping={self.damping!r}, "
            f"n_samples={self.n_samples!r}, random_state={self.random_state!r}, "
            f"input_factor={self.input_factor!r})"
        )

    # -- fitting ----------------------------------------------------------------------------------------------------
    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> KFAC:
        if self.fisher != "empirical" and not fmodel.task.has_outputs:
            raise bad_value(
                "fisher",
                self.fisher,
                f"{type(fmodel.task).__name__} does not split its loss into outputs(model, batch) and "
                "loss_from_outputs(outputs, batch), which the Gauss-Newton and sampled Fisher need",
                "define both methods on the task, or use fisher='empirical'",
            )
        layers = find_layers(fmodel)
        compute = torch.float64 if fmodel.dtype == torch.float64 else torch.float32
        self._compute_dtype = compute
        seed = self.random_state if self.random_state is not None else int(torch.randint(0, 2**62, ()).item())
        self._seed = seed
        self._backprop = Backprop("K-FAC")

        for layer in layers:
            layer.A = torch.zeros(layer.a_dim, layer.a_dim, dtype=torch.float64, device=fmodel.device)
            layer.S = torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64, device=fmodel.device)

        weighted = self.input_factor == "weighted"
        weight_totals = torch.zeros(len(layers), dtype=torch.float64, device=fmodel.device)
        position = {id(layer): i for i, layer in enumerate(layers)}

        def accumulate(layer: _Layer, a: torch.Tensor, s: torch.Tensor, first_chunk: bool) -> None:
            a_c = a.to(compute).reshape(-1, a.shape[-1])
            s_stack = s.to(compute)  # (columns, b, T, out)
            if weighted:  # rows weighted by the squared norm of their output pseudo-gradients (all columns)
                w = (s_stack * s_stack).sum(dim=(0, -1)).reshape(-1)
                layer.A += ((a_c * w[:, None]).T @ a_c).to(torch.float64)
                weight_totals[position[id(layer)]] += w.to(torch.float64).sum()
            elif first_chunk:
                layer.A += (a_c.T @ a_c).to(torch.float64)
            s_c = s_stack.reshape(-1, layer.out_dim)
            layer.S += (s_c.T @ s_c).to(torch.float64)

        self._walk(fmodel, layers, data, progress, "K-FAC factors", accumulate, check=True)
        _reduce_over_ranks([t for layer in layers for t in (layer.A, layer.S)] + [weight_totals])
        for i, layer in enumerate(layers):
            if weighted:
                total = float(weight_totals[i])
                layer.A /= total if total > 0 else 1.0
            else:
                layer.A /= max(layer.locations, 1)
            layer.S /= max(layer.examples, 1)
            for what, factor in (("input factor A", layer.A), ("output-gradient factor S", layer.S)):
                _check_factor(factor, layer, what)
            if layer.calls == 0:
                logger.warning(
                    "K-FAC: layer %r was never called in the forward pass; its curvature is the regulariser "
                    "alone. Check that the model uses it.",
                    layer.name,
                )
            e_A, layer.Q_A = _eigh(layer.A)
            e_S, layer.Q_S = _eigh(layer.S)
            layer.eigenvalues = torch.outer(e_S, e_A)

        if self._refit_eigenvalues:
            for layer in layers:
                layer.eigenvalues = torch.zeros_like(layer.eigenvalues)
                layer.examples = 0

            bases = {id(layer): (layer.Q_A.to(compute), layer.Q_S.to(compute)) for layer in layers}

            def project(layer: _Layer, a: torch.Tensor, s: torch.Tensor, first_chunk: bool) -> None:
                q_a, q_s = bases[id(layer)]
                a_rot = a.to(compute) @ q_a  # (b, T, in')
                s_rot = s.to(compute) @ q_s  # (columns, b, T, out)
                if a_rot.shape[1] == 1:  # rank one per example: (Q_S^T s a^T Q_A)^2 = (s')^2 (a')^2^T
                    layer.eigenvalues += ((s_rot[:, :, 0] ** 2).sum(dim=0).T @ (a_rot[:, 0] ** 2)).to(
                        torch.float64
                    )
                    return
                per = max(1, CHUNK_ELEMENTS // max(1, layer.out_dim * layer.a_dim))  # (column, example) pairs
                b = a_rot.shape[0]
                if (
                    per >= 2 * b
                ):  # several columns in one product (many outputs: fisher="ggn" on a sequence model)
                    step = per // b
                    for start in range(0, s_rot.shape[0], step):
                        g = torch.einsum("cbto,bti->cboi", s_rot[start : start + step], a_rot)
                        layer.eigenvalues += (g * g).sum(dim=(0, 1)).to(torch.float64)
                    return
                for s_col in s_rot:
                    for start in range(0, b, per):
                        g = torch.einsum(
                            "bto,bti->boi", s_col[start : start + per], a_rot[start : start + per]
                        )
                        layer.eigenvalues += (g * g).sum(dim=0).to(torch.float64)

            self._walk(fmodel, layers, data, progress, "EK-FAC eigenvalues", project, check=False)
            _reduce_over_ranks([layer.eigenvalues for layer in layers])
            for layer in layers:
                layer.eigenvalues /= max(layer.examples, 1)
                _check_factor(layer.eigenvalues, layer, "refitted eigenvalues")

        self._set_inverse(fmodel, layers)
        self._fmodel_space = fmodel.space
        self.layers_ = layers
        return self

    def _walk(
        self,
        fmodel: FunctionalModel,
        layers: list[_Layer],
        data: DataSource,
        progress: bool,
        desc: str,
        consume: Any,
        check: bool,
    ) -> None:
        """One pass over this rank's shard of the data (all of it in a single process): for each batch, hand
        every layer its rows ``a`` and pseudo-gradients ``s``; then the example counts are summed over ranks (the
        caller reduces what ``consume`` accumulated). A failure on one rank raises on every rank."""
        rank, _, _ = world()
        # one stream of samples per rank (fisher="sampled"); a single process is rank 0, the plain seed
        generator = torch.Generator(device=fmodel.device).manual_seed(self._seed + rank)
        for layer in layers:
            layer.locations = layer.examples = layer.calls = 0
        first = [check]

        def step(idx: torch.Tensor, raw: tuple) -> torch.Tensor:
            self._batch(fmodel, layers, fmodel.prepare(raw), len(idx), generator, first[0], consume)
            first[0] = False
            return torch.zeros(1, dtype=torch.float64, device=fmodel.device)

        distributed_sum(step, data, with_indices=True, device=fmodel.device, progress=progress, desc=desc)
        self._examples_this_rank = max((layer.examples for layer in layers), default=0)
        counts = torch.tensor(
            [[layer.examples, layer.locations, layer.calls, layer.calls > 0] for layer in layers],
            dtype=torch.float64,
            device=fmodel.device,
        )
        _reduce_over_ranks([counts])
        for layer, (examples, locations, calls, ranks_calling) in zip(layers, counts.tolist()):
            layer.examples, layer.locations = round(examples), round(locations)
            # every rank with a non-empty shard sees the same number of calls per forward pass
            layer.calls = round(calls / ranks_calling) if ranks_calling else 0

    def _batch(
        self,
        fmodel: FunctionalModel,
        layers: list[_Layer],
        batch: tuple | dict,
        b: int,
        generator: torch.Generator,
        check: bool,
        consume: Any,
    ) -> None:
        """Forward once with hooks, backpropagate every pseudo-gradient column, hand the rows to ``consume``."""
        task = fmodel.task
        with torch.enable_grad(), recording(layers, "K-FAC") as rec:
            if self.fisher == "empirical":
                root = task.loss(fmodel.model, batch).reshape(b, 1)
            else:
                outputs = task.outputs(fmodel.model, batch)
                root = outputs.reshape(b, -1)
            if not bool(torch.isfinite(root.detach()).all()):
                _diagnose_forward(layers, rec, root.detach(), self.fisher)
            if self.fisher == "empirical":
                columns = torch.ones_like(root).unsqueeze(0)
                true_grad = columns[0]
            else:
                columns = self._columns(task, outputs, batch, generator)
                true_grad = task.output_gradient(outputs, batch) if check else None
        if check:
            check_gradients(
                fmodel, layers, rec, root, true_grad, "K-FAC", f"use {_other_routes()}", skip_nonfinite=True
            )
        inputs: list[torch.Tensor | None] = []
        mask = task.position_mask(batch)
        for i, layer in enumerate(layers):
            layer.examples += b
            a = rec.inputs(i)
            if a is not None:
                if a.shape[0] != b:
                    raise ValueError(
                        f"layer {layer.name!r} saw {a.shape[0]} rows for a batch of {b} examples: K-FAC "
                        "needs the batch axis first in every supported layer's input. Fix: exclude this "
                        f"layer with params=, or use {_other_routes()}."
                    )
                layer.calls = max(layer.calls, len(rec.calls[i]))
                real = _real_positions(mask, a)
                if real is None:
                    layer.locations += a.shape[0] * a.shape[1]
                else:  # padded positions are not data: zero rows (their output gradients are zero too)
                    a = a * real.unsqueeze(-1).to(a.dtype)
                    layer.locations += int(real.sum())
            inputs.append(a)
        first_chunk = True
        for _, count, grads in self._backprop.chunks(root, rec.outputs(), columns):
            s_rows = rec.output_rows(layers, grads, count)
            for layer, a, s in zip(layers, inputs, s_rows):
                if a is not None:
                    consume(layer, a, s, first_chunk)
            first_chunk = False

    def _columns(
        self, task: Task, outputs: torch.Tensor, batch: tuple | dict, generator: torch.Generator
    ) -> torch.Tensor:
        """Pseudo-gradients in the output space, ``(columns, b, k)``: ``sum_c col col^T`` is the output curvature."""
        b = outputs.shape[0]
        k = outputs[0].numel()
        if self.fisher == "ggn":
            if k > MAX_GGN_OUTPUTS:
                raise bad_value(
                    "fisher",
                    "ggn",
                    f"the model has {k} outputs per example; fisher='ggn' forms the {k} x {k} output Hessian "
                    f"and backpropagates {k} pseudo-gradients per batch (limit {MAX_GGN_OUTPUTS})",
                    "use fisher='sampled' (unbiased, one backward pass per sample)",
                )
            factors = task.output_hessian_factors(outputs, batch)  # (b, k, k)
            keep = factors.abs().amax(dim=(0, 1)) > 0
            return factors[:, :, keep].permute(2, 0, 1)
        # all samples at once: the batch repeated n_samples times (sample-major), one loss and one gradient call
        r = self.n_samples
        repeated = outputs.detach().repeat(r, *(1 for _ in outputs.shape[1:]))
        batch_r = map_batch(lambda t: t.repeat(r, *(1 for _ in t.shape[1:])) if t.dim() else t, batch)
        sampled = task.sample_targets(repeated, batch_r, generator)  # the batch's own form: tuple or dict
        return task.output_gradient(repeated, sampled).reshape(r, b, -1) / math.sqrt(r)

    def _set_inverse(self, fmodel: FunctionalModel, layers: list[_Layer]) -> None:
        """Per layer: regulariser, damping and the (pseudo-)inverse eigenvalues, plus the Woodbury bias term."""
        dampings = []
        summary: dict[str, Any] = {}
        target = None
        if self.damping == "auto" and self.training_state is not None:
            # the outputs the curvature sees per example: every output (the exact output Hessian, or the empirical
            # gradient's), or, for the sampled Fisher, its draws (n_samples per predictive distribution)
            if self.fisher == "sampled":
                columns = self.n_samples * self.training_state.distributions
            else:  # every output column reaches each location of a layer (a convolution's pixels, a sequence's
                # positions): the Kronecker factors spread the curvature over that many more directions
                locations = max((layer.locations / max(layer.examples, 1) for layer in layers), default=1.0)
                columns = round(self.training_state.outputs * max(1.0, locations))
            target = self.training_state.dof_target(
                fmodel.num_params, KFAC_DOF_PER_OUTPUT, columns, max_fraction=KFAC_DOF_MAX_FRACTION
            )
        shared = None
        if target is not None:  # away from a minimum: one damping for all layers from all their eigenvalues
            curvatures = []
            for layer in layers:
                lam = weight_decay_per_tensor(fmodel, layer.params, "K-FAC")
                lam_w = lam[layer.weight] if layer.weight is not None else lam[layer.bias]
                curvatures.append((layer.eigenvalues.clamp(min=0.0) + lam_w).reshape(-1))
            shared = dof_damping(torch.cat(curvatures), target) if curvatures else 0.0
        for layer in layers:
            lam = weight_decay_per_tensor(fmodel, layer.params, "K-FAC")
            lam_w = lam[layer.weight] if layer.weight is not None else lam[layer.bias]
            lam_b = lam[layer.bias] if layer.bias is not None else lam_w
            layer.lam, layer.lam_bias = lam_w, lam_b
            ev = layer.eigenvalues.clamp(min=0.0)
            top = float(ev.max()) if ev.numel() else 0.0
            tol = zero_tolerance(max(ev.shape), torch.float64) * top
            ev = torch.where(ev > tol, ev, torch.zeros_like(ev))
            layer.eigenvalues = ev
            if shared is not None:
                damping = shared
            elif self.damping == "auto":
                floor = min(lam_w, lam_b) if layer.bias is not None and layer.weight is not None else lam_w
                mean = float(ev.mean()) if ev.numel() else 0.0
                damping = 0.0 if floor > 0 else AUTO_DAMPING_FRACTION * mean
            else:
                damping = float(self.damping)
            layer.damping = damping
            dampings.append(damping)
            denom = ev + lam_w + damping
            dropped = denom <= tol
            layer.inv = torch.where(dropped, torch.zeros_like(denom), 1.0 / torch.where(dropped, 1.0, denom))
            delta = lam_b - lam_w
            if layer.bias is not None and layer.weight is not None and delta != 0.0:
                # (M + delta E E^T)^{-1} = M^{-1} - M^{-1} E [delta (I + delta E^T M^{-1} E)^{-1}] E^T M^{-1}
                # with E^T M^{-1} E = Q_S diag(w) Q_S^T, w_k = sum_l r_l^2 / D_kl, r = last row of Q_A.
                # Where 1 + delta w_k vanishes (an unpenalised bias, no damping, no data curvature: softmax's
                # shift direction), the matrix is singular there and the limit c_k = 1 / w_k projects that
                # direction out: the pseudo-inverse, as for the dense routes.
                r = layer.Q_A[-1]
                w = layer.inv @ (r * r)
                gap = 1.0 + delta * w
                singular = gap.abs() <= 1e-10 * (1.0 + abs(delta) * w)
                layer.bias_row = r
                layer.bias_correction = torch.where(
                    singular, 1.0 / torch.where(w > 0, w, 1.0), delta / torch.where(singular, 1.0, gap)
                )
                bias_dropped = int(singular.sum())
            else:
                layer.bias_row = layer.bias_correction = None
                bias_dropped = 0
            layer.info = {
                "module": layer.name,
                "type": type(layer.module).__name__,
                "params": layer.params,
                "A_size": layer.a_dim,
                "S_size": layer.out_dim,
                "locations_per_example": layer.locations / max(layer.examples, 1),
                "calls_per_forward": layer.calls,
                "weight_decay": lam_w,
                "bias_weight_decay": lam_b if layer.bias is not None else None,
                "damping": damping,
                "eigenvalue_min": float(ev.min()) if ev.numel() else 0.0,
                "eigenvalue_max": top,
                "eigenvalue_mean": float(ev.mean()) if ev.numel() else 0.0,
                "num_dropped": int(dropped.sum()) + bias_dropped,
            }
            summary[layer.name] = layer.info
        self.info_ = {
            "route": self.name,
            "fisher": self.fisher,
            "n_samples": self.n_samples if self.fisher == "sampled" else None,
            "num_params": fmodel.num_params,
            "num_layers": len(layers),
            "damping": self.damping if self.damping != "auto" else "auto",
            "damping_rule": (
                f"dof={target:g}"
                if target is not None
                else "at-minimum"
                if self.damping == "auto"
                else "given"
            ),
            "damping_min": min(dampings) if dampings else 0.0,
            "damping_max": max(dampings) if dampings else 0.0,
            "num_zero_dropped": sum(int(layer.info["num_dropped"]) for layer in layers),
            "input_factor": self.input_factor,
            "examples": max((layer.examples for layer in layers), default=0),
            "examples_this_rank": self._examples_this_rank,
            "world_size": world()[1],
            "layers": summary,
        }
        logger.info("%s fitted on %d layer(s): %s", self.name, len(layers), self.info_)

    # -- applying ---------------------------------------------------------------------------------------------------
    def _apply(self, vectors: torch.Tensor, inverse: bool) -> torch.Tensor:
        self.check_fitted("layers_")
        space = self._fmodel_space
        if isinstance(vectors, torch.Tensor) and vectors.dim() == 1 and vectors.shape[0] == space.numel:
            return self._apply(vectors[None], inverse)[0]
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != space.numel:
            raise bad_value(
                "vectors",
                vectors,
                f"expected shape (m, {space.numel}) or ({space.numel},) in the flat parameter space",
                "pass one row per vector",
            )
        if vectors.shape[0] == 0:  # nothing to solve (e.g. a rank with an empty shard)
            return vectors.clone()
        compute = getattr(self, "_compute_dtype", torch.float64)
        v = vectors.to(compute)
        blocks = space.unflatten(v)
        shapes = dict(zip(space.names, space.shapes))
        result: dict[str, torch.Tensor] = {}
        for layer in self.layers_:
            M = layer.gather(blocks, lead=1)  # (m, out, in')
            q_s, q_a = layer.Q_S.to(compute), layer.Q_A.to(compute)
            X = q_s.T @ M @ q_a
            if inverse:
                inv = layer.inv.to(compute)
                Y = X * inv
                if layer.bias_correction is not None:
                    row = layer.bias_row.to(compute)
                    z = layer.bias_correction.to(compute) * (Y @ row)  # (m, out) in the Q_S basis
                    Y = Y - z.unsqueeze(-1) * row * inv
                out = q_s @ Y @ q_a.T
            else:
                out = q_s @ (X * layer.eigenvalues.to(compute)) @ q_a.T + (layer.lam + layer.damping) * M
                if layer.bias is not None and layer.weight is not None:
                    out[..., -1] += (layer.lam_bias - layer.lam) * M[..., -1]
            result.update(layer.scatter(out, shapes))
        return space.flatten(result, batch_dims=1).to(vectors.dtype)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + damping I)^{-1} v`` per row, ``C`` the layer-block-diagonal Kronecker curvature plus
        regulariser (exact Woodbury bias term); zero eigenvalues without regulariser or damping are dropped."""
        return self._apply(vectors, inverse=True)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + damping I) v`` per row (for tests and diagnostics)."""
        return self._apply(vectors, inverse=False)


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC (George et al. 2018): K-FAC's eigenbases, eigenvalues refitted per layer as
    ``Lambda_jk = (1/n) sum_i sum_c ((Q_S^T G_ic Q_A)_jk)^2`` (Grosse et al. 2023, eq. 20). Same arguments as
    :class:`KFAC`, except that ``input_factor`` defaults to ``"weighted"`` (module docstring: the eigenbasis of
    the output-curvature-weighted input factor is closer to the true one); costs a second pass over the data."""

    name = "ekfac"
    _refit_eigenvalues = True
    _default_input_factor = "weighted"


# -- helpers ----------------------------------------------------------------------------------------------------------


def _reduce_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks of an initialised process group, in place (one collective for all of
    them); a no-op in a single process."""
    if not tensors or not world()[2]:
        return
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def _check_factor(factor: torch.Tensor, layer: _Layer, what: str) -> None:
    bad = ~torch.isfinite(factor)
    if bool(bad.any()):
        raise FloatingPointError(
            f"K-FAC's {what} of layer {layer.name!r} ({type(layer.module).__name__}, parameters {layer.params}) "
            f"has {int(bad.sum())} non-finite value(s) of {factor.numel()}, so it cannot be eigendecomposed. "
            "Its inputs or output gradients overflowed or are NaN on the training data. Fix: check the model's "
            "weights and activations in and before that layer (a diverged training run, an inf in the data or "
            "a log(0) in the loss), fit in float64 (dtype=torch.float64), or exclude the layer with params=."
        )


def _diagnose_forward(layers: list[_Layer], rec: Recording, root: torch.Tensor, fisher: str) -> None:
    """Raise a FloatingPointError naming the first layer of the forward pass whose input or output is not finite."""
    bad_rows = (~torch.isfinite(root.reshape(root.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
    what = "loss" if fisher == "empirical" else "outputs"
    raise FloatingPointError(
        f"K-FAC: the model's {what} are not finite for {len(bad_rows)} example(s) of a batch (positions "
        f"{bad_rows[:8]} in the batch); the first non-finite value appears {first_nonfinite(layers, rec)}. Fix: "
        "check that layer's weights (a diverged training run leaves NaN/inf), the data, and the loss; fitting in "
        "float64 avoids overflow."
    )


def _eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD factor; rounding-level negative eigenvalues become 0."""
    evals, evecs = torch.linalg.eigh(0.5 * (factor + factor.T))
    return evals.clamp(min=0.0), evecs


__all__ = [
    "EKFAC",
    "FISHER_TYPES",
    "KFAC",
    "default_fisher",
    "find_layers",
]
