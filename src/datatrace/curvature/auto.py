"""``curvature="auto"``: the most accurate route that fits the memory and the time budget, chosen before the work.

The candidates are tried in the order :data:`AUTO_ORDER`, by mean accuracy (LDS) against retraining over the
realistic-model catalogue (``benchmarks/realistic.py``, ``benchmarks/bench_catalogue.py``: float32 models trained
by Adam for a budget): the Gauss-Newton matrix before the Hessian (positive semi-definite, no exploding inverse of
negative curvature on a model that is not at a minimum), EK-FAC before the Krylov routes (seconds instead of
hundreds of sequential passes); the first that can run on the model, fits ``max_bytes`` and is predicted to
finish within ``time_budget`` seconds is chosen:

* **can run**: Gauss-Newton and EK-FAC need a task with ``outputs`` / ``loss_from_outputs``; EK-FAC needs every
  parameter in scope in a layer it supports (Linear, Conv2d, Conv1D), with tuple or dict batches alike. EK-FAC
  uses the exact output-space Gauss-Newton (``fisher="ggn"``, one backward pass per output) up to
  :data:`~datatrace.curvature.kfac.MAX_GGN_OUTPUTS` outputs per example, and above it (a language model's
  positions x vocabulary) the sampled Fisher (``fisher="sampled"``, one backward pass) when the task can sample
  targets, as :class:`~datatrace.hf.CausalLMTask` does; its time is predicted for the Fisher it will use;
* **fits memory**: the dense routes (exact, gauss-newton) keep ``3 p^2`` numbers (matrix, eigenvectors,
  workspace), Arnoldi a float64 basis of ``steps x p`` twice; EK-FAC (per-layer factors) and CG (a few vectors)
  are bounded and always fit;
* **fits time**: :func:`datatrace.curvature.cost.predict_seconds` (or the ``cost_model`` given) on a
  :class:`~datatrace.curvature.cost.Probe` that :func:`measure_probe` takes with ten small calls whatever the
  size of the data: gradient and Hessian-vector products on one small batch, timed and scaled to the data, and
  the device's matrix-product rate, timed once per process. Without the budget (``time_budget=None``) no probe
  is taken and the choice is by memory alone, the rule ``auto`` had before it predicted time.

When no candidate fits the budget and the user left the parameters to datatrace (``params=None``) on a model with
parameters EK-FAC does not cover (LayerNorm, embeddings, attention's packed projections), EK-FAC on the layers it
supports is taken if it fits the budget or beats the fastest full candidate (the attributor then narrows the scope
to them and says which parameters it leaves out: :mod:`datatrace.capture.scope`). Otherwise the predicted-fastest
candidate that fits memory is taken, and the reason says so.
CG, which needs no structure and bounded memory, is the last resort when nothing else can run.

Models the default products cannot transform are handled below this level (:mod:`datatrace.gradients.functional`):
an attention layer without forward-mode AD gets double-backward Hessian-vector products, a recurrent layer that
``vmap`` cannot batch gets per-example loops, so every choice above stays available to them.

The chosen route is built by name through :mod:`datatrace.curvature.registry`; its ``info`` is reported with
``"auto_choice"``, ``"auto_reason"``, ``"auto_predicted_seconds"`` (per candidate) and ``"auto_fit_seconds"`` (the
actual seconds of the route's ``fit``) added.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Subset

from datatrace.capture.scope import Scope, supported_scope
from datatrace.curvature.base import DEFAULT_MAX_DENSE_BYTES, Curvature, format_bytes
from datatrace.curvature.cost import ARNOLDI_OVERSAMPLING, DEFAULT_QUERIES, Probe, predict_seconds
from datatrace.curvature.kfac import MAX_GGN_OUTPUTS, default_fisher, find_layers
from datatrace.curvature.registry import make_curvature
from datatrace.data import DataSource
from datatrace.distributed import all_reduce_sum, local_only, world
from datatrace.errors import bad_value, check_nonnegative_float, check_positive_int, is_out_of_memory
from datatrace.gradients.functional import FunctionalModel

logger = logging.getLogger(__name__)

#: the candidates, most accurate first; auto takes the first that can run, fits memory and fits the time budget
AUTO_ORDER = ("gauss-newton", "exact", "ekfac", "arnoldi", "cg")
#: Arnoldi's rank when auto builds it
ARNOLDI_RANK = 200
#: examples in the probe's batch
PROBE_EXAMPLES = 64
#: vectors in the probe's second Hessian-vector product (the first has one: the difference is the marginal cost)
PROBE_VECTORS = 16
#: the same when Hessian-vector products fall back to double backward (a model without forward-mode AD, e.g. SDPA
#: attention): that runs one backward pass per vector over one graph, so its cost is linear in the vectors and two
#: separate the graph from the per-vector pass (sixteen would cost eight times as much and tell nothing more)
PROBE_VECTORS_REVERSE = 2
#: side of the matrix product that measures the flop rate
RATE_SIZE = 512
#: how many times slower than the ``RATE_SIZE`` product a large float64 ``eigh`` runs, per ``cost.EIGH_FLOPS m^3``
#: flop: about as fast (a large product runs several times faster than this medium one, but LAPACK's ``syevd``
#: spends half its time in memory-bound matrix-vector work, which cancels that gain)
EIGH_SLOWDOWN = 1.0

#: ``(route_name, probe) -> predicted seconds``
CostModel = Callable[[str, Probe], float]

_RATES: dict[str, float] = {}


def machine_rates(device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(matmul_flops, eigh_flops)`` on ``device``: the float64 matrix-product rate, timed once per process and
    device on a ``RATE_SIZE``-square product (tens of milliseconds) and cached, and the ``eigh`` rate taken as
    ``1 / EIGH_SLOWDOWN`` of it. ``eigh`` is not timed itself: a small one runs far below the rate of the large
    ones it must predict (its tridiagonal reduction is a sequence of small matrix-vector steps), and it is the
    kernel that suffers most when other processes share the cores."""
    device = torch.device(device)
    key = str(device)
    if key not in _RATES:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(RATE_SIZE, RATE_SIZE, dtype=torch.float64, generator=gen).to(device)
        _RATES[key] = 2 * RATE_SIZE**3 / _best(lambda: a @ a, 2, device)
    return _RATES[key], _RATES[key] / EIGH_SLOWDOWN


def _best(fn: Callable[[], Any], repeats: int, device: torch.device | None = None) -> float:
    """The shortest of ``repeats`` timings of ``fn`` (the first call may pay one-time set-up), at least 1 us."""
    cuda = device is not None and device.type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-6)


def probe_source(data: DataSource, size: int) -> DataSource:
    """The first ``size`` examples of ``data``, in its own form and with its own collate function."""
    if data.tensors is not None:
        return dataclasses.replace(data, tensors=tuple(t[:size] for t in data.tensors), batch_size=size)
    return dataclasses.replace(data, dataset=Subset(data.dataset, list(range(size))), batch_size=size)


def measure_probe(fmodel: FunctionalModel, data: DataSource, queries: int = DEFAULT_QUERIES) -> Probe:
    """The :class:`~datatrace.curvature.cost.Probe` of ``fmodel`` on ``data``: sizes, and timings on the first
    ``PROBE_EXAMPLES`` examples, each the shorter of two calls (the first of a kind may pay one-time set-up), ten
    calls in all:

    * batch gradients of ``PROBE_EXAMPLES / 4`` and of ``PROBE_EXAMPLES`` examples: ``t(b) = call + b * m``
      separates the fixed cost of a call from the cost per example, so a pass over the data in batches of ``B``
      is ``ceil(n / B) * call + n * m`` (a small probe batch scaled by ``n / b`` would count the fixed cost
      ``n / b`` times);
    * per-example gradients of ``PROBE_EXAMPLES`` examples, scaled the same way with the same fixed cost;
    * Hessian-vector products with one and with ``PROBE_VECTORS`` vectors (``PROBE_VECTORS_REVERSE`` when they
      use double backward, one pass per vector): the fixed cost of a call and the marginal cost of a vector.

    A model without second derivatives gets infinite Hessian-vector costs (the routes that need them are then
    predicted never to finish).

    Under torch.distributed every rank times its own probe and the timings are averaged over the ranks (one
    all-reduce), so that every rank predicts, and chooses, the same route; a probe that fails on any rank raises
    on every rank."""
    n = len(data)
    size = min(n, PROBE_EXAMPLES)
    quarter = max(1, size // 4)
    calls = math.ceil(n / data.batch_size)
    error: Exception | None = None
    outputs = None
    try:
        timings = _timings(fmodel, data, size, quarter)
        if fmodel.task.has_outputs:
            with torch.no_grad():
                first = fmodel.task.outputs(fmodel.model, fmodel.prepare(data.get([0])))
            outputs = max(1, int(first[0].numel()))
    except Exception as err:  # reported on every rank below
        error, timings = err, [0.0] * 7
    _, world_size, distributed = world()
    values = torch.tensor([*timings, float(error is not None)], dtype=torch.float64)
    if distributed:
        values = all_reduce_sum(values)
        values[:-1] /= world_size
    if bool(values[-1] > 0):
        raise RuntimeError(f"the timing probe failed: {error or 'on another rank'}") from error
    t_small, t_tiny, t_rows, t_one, t_several, matmul, vectors = (float(v) for v in values[:-1])
    # t = call + work * marginal. Timing noise can make a difference tiny or negative (keep a tenth of the call as
    # a floor) or larger than the call itself (cap at the whole call per unit of work, the naive scaling)
    per_example = min(max(t_small - t_tiny, 0.1 * t_small) / max(size - quarter, 1), t_small / size)
    call = max(t_small - per_example * size, 0.0)
    per_row = max(t_rows - call, 0.1 * t_rows) / size
    marginal, hvp_call = math.inf, math.inf  # no Hessian-vector products for this model
    if math.isfinite(t_one) and math.isfinite(t_several):
        marginal = (
            min(max(t_several - t_one, 0.1 * t_several) / max(vectors - 1, 1), t_several / max(vectors, 1))
            / size
        )
        hvp_call = max(t_one - marginal * size, 0.0)
    layers = None
    if ekfac_obstacle(fmodel, data) is None:
        layers = tuple((layer.a_dim, layer.out_dim) for layer in find_layers(fmodel))
    return Probe(
        num_params=fmodel.num_params,
        n_train=n,
        outputs=outputs,
        batch_size=data.batch_size,
        grad_seconds=calls * call + n * per_example,
        per_example_seconds=calls * call + n * per_row,
        hvp_call_seconds=hvp_call,
        hvp_vector_seconds=marginal * n,
        matmul_flops=matmul,
        eigh_flops=matmul / EIGH_SLOWDOWN,
        layers=layers,
        arnoldi_rank=ARNOLDI_RANK,
        queries=queries,
    )


def _timings(fmodel: FunctionalModel, data: DataSource, size: int, quarter: int) -> list[float]:
    """This process's probe timings (:func:`measure_probe`), its matrix-product rate and the number of vectors of
    the second Hessian-vector timing, no collective."""
    small, tiny = probe_source(data, size), probe_source(data, quarter)
    batch = small.get(list(range(size)))
    device, p = fmodel.device, fmodel.num_params
    with local_only():
        t_small = _best(lambda: fmodel.objective_grad(small), 2, device)
        t_tiny = _best(lambda: fmodel.objective_grad(tiny), 2, device)
        t_rows = _best(lambda: fmodel.per_example_grads(batch), 2, device)
        one = torch.zeros(1, p, dtype=fmodel.dtype, device=device)
        vectors = PROBE_VECTORS
        try:
            t_one = _best(lambda: fmodel.hvp(one, small), 2, device)
            if fmodel.hvp_mode != "forward-over-reverse":  # known after the first call
                vectors = PROBE_VECTORS_REVERSE
            several = torch.zeros(vectors, p, dtype=fmodel.dtype, device=device)
            t_several = _best(lambda: fmodel.hvp(several, small), 2, device)
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise
            logger.info("curvature='auto': no Hessian-vector products for this model (%s)", err)
            t_one = t_several = math.inf
    return [t_small, t_tiny, t_rows, t_one, t_several, machine_rates(device)[0], float(vectors)]


def ekfac_obstacle(fmodel: FunctionalModel, data: DataSource) -> str | None:
    """Why EK-FAC cannot run on ``fmodel`` and ``data`` (in words), or ``None`` when it can."""
    if not fmodel.task.has_outputs:
        return f"{type(fmodel.task).__name__} has no outputs/loss_from_outputs split"
    try:
        find_layers(fmodel)
    except ValueError as err:  # a parameter outside the layers EK-FAC supports: name them, briefly
        message = str(err).split(". Fix")[0]
        names = message.split("are not: ")
        return f"parameters outside the layers it supports: {names[1]}" if len(names) == 2 else message
    return None


def first_output_size(fmodel: FunctionalModel, data: DataSource) -> int | None:
    """``task.outputs`` per example (all of them, padding included: what ``fisher="ggn"`` backpropagates) on the
    first example; ``None`` without outputs or data."""
    if not fmodel.task.has_outputs or len(data) == 0:
        return None
    with torch.no_grad():
        outputs = fmodel.task.outputs(fmodel.model, fmodel.prepare(data.get([0])))
    return max(1, int(outputs[0].numel()))


def supported_part(fmodel: FunctionalModel, data: DataSource) -> Scope | None:
    """The part of a default-scope model (``params=None``) that EK-FAC covers when it cannot cover all of it: its
    :class:`~datatrace.capture.scope.Scope`, or ``None`` when the user chose the parameters, EK-FAC cannot run
    for another reason, or no supported layer runs."""
    if not (fmodel.default_scope and fmodel.task.has_outputs):
        return None
    try:
        part = supported_scope(fmodel, data, "EK-FAC", "choose the parameters with params=")
    except ValueError:  # e.g. a grouped convolution
        return None
    return part if part.covered else None


def route_bytes(name: str, fmodel: FunctionalModel) -> int:
    """Memory a candidate keeps that grows faster than ``p``: the dense routes' ``3 p^2`` numbers, Arnoldi's
    float64 basis; 0 for the bounded routes (EK-FAC's factors, CG's vectors)."""
    p = fmodel.num_params
    if name in ("exact", "gauss-newton"):
        return 3 * p * p * torch.empty((), dtype=fmodel.dtype).element_size()
    if name == "arnoldi":
        steps = p if ARNOLDI_RANK >= p else min(p, ARNOLDI_OVERSAMPLING * ARNOLDI_RANK)
        return steps * p * 8 * 2
    return 0


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "never (cannot run)"
    return f"{value:.2g} s" if value < 10 else f"{value:,.0f} s"


class AutoCurvature(Curvature):
    """Pick the most accurate route that fits memory and the time budget (see the module docstring).

    Args:
        damping: passed to the chosen route (``"auto"``: the route's own rule).
        max_bytes: memory budget of the routes whose memory grows faster than the parameters (dense, Arnoldi).
        time_budget: seconds a route may be predicted to take; ``None``: no time limit (memory alone decides).
        cost_model: ``(route_name, probe) -> seconds``; default :func:`datatrace.curvature.cost.predict_seconds`.
    """

    name = "auto"

    def __init__(
        self,
        damping: float | str = "auto",
        max_bytes: int = DEFAULT_MAX_DENSE_BYTES,
        time_budget: float | None = 30.0,
        cost_model: CostModel | None = None,
    ) -> None:
        super().__init__()
        if damping != "auto":
            damping = check_nonnegative_float("damping", damping)
        self.damping = damping
        self.max_bytes = check_positive_int("max_bytes", max_bytes)
        if time_budget is not None:
            time_budget = check_nonnegative_float("time_budget", time_budget)
        self.time_budget = time_budget
        if cost_model is not None and not callable(cost_model):
            raise bad_value(
                "cost_model",
                cost_model,
                "expected a callable (route_name, probe) -> seconds, or None",
                "pass a function, or None for datatrace.curvature.cost.predict_seconds",
            )
        self.cost_model = cost_model
        self._outputs: int | None = None  # outputs per example of the model being chosen for
        self._data: DataSource | None = None

    def __getattr__(self, name: str) -> Any:
        """Fitted attributes of the chosen route (``damping_``, ``evals_``, ...) read through ``auto``."""
        route = self.__dict__.get("route_")
        if route is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(route, name)

    def _ekfac_fisher(self, fmodel: FunctionalModel, outputs: int | None) -> str:
        """``"sampled"`` when the exact output Hessian is refused (more than ``MAX_GGN_OUTPUTS`` outputs per
        example) and the task can sample targets (a language model), else ``"ggn"``."""
        return default_fisher(fmodel.task, outputs)

    def _ekfac_probe(self, fmodel: FunctionalModel, probe: Probe) -> Probe:
        """The probe EK-FAC's time is predicted from: one backward column per example with the sampled Fisher."""
        if self._ekfac_fisher(fmodel, probe.outputs) == "sampled":
            return dataclasses.replace(probe, outputs=1)
        return probe

    def _build(self, name: str, fmodel: FunctionalModel) -> Curvature:
        if name == "ekfac":
            if self._outputs is None:
                self._outputs = first_output_size(fmodel, self._data)
            return make_curvature(
                name, damping=self.damping, fisher=self._ekfac_fisher(fmodel, self._outputs)
            )
        if name in ("exact", "gauss-newton"):
            return make_curvature(name, damping=self.damping, max_bytes=self.max_bytes)
        if name == "arnoldi":
            return make_curvature(name, damping=self.damping, rank=ARNOLDI_RANK, max_bytes=self.max_bytes)
        if name == "cg":
            matrix = "gauss-newton" if fmodel.task.has_outputs else "hessian"
            return make_curvature("cg", matrix=matrix, damping=self.damping)
        return make_curvature(name, damping=self.damping)

    def _choose(self, fmodel: FunctionalModel, data: DataSource) -> tuple[Curvature, str, dict[str, float]]:
        p = fmodel.num_params
        # outputs per example (EK-FAC's Fisher): from the probe, or asked when EK-FAC is built without one
        self._outputs, self._data = None, data
        fitting, notes = [], []
        ekfac_reason = ekfac_obstacle(fmodel, data)
        for name in AUTO_ORDER:
            if name == "gauss-newton" and not fmodel.task.has_outputs:
                notes.append(f"gauss-newton needs task outputs ({type(fmodel.task).__name__} has none)")
            elif name == "ekfac" and ekfac_reason is not None:
                notes.append(f"EK-FAC cannot cover them all ({ekfac_reason})")
            elif route_bytes(name, fmodel) > self.max_bytes:
                need = format_bytes(route_bytes(name, fmodel))
                notes.append(f"{name} needs {need} > max_bytes {format_bytes(self.max_bytes)}")
            else:
                fitting.append(name)
        head = f"{p:,} parameters"
        if not fitting:  # CG: no structure, bounded memory
            return self._build("cg", fmodel), f"{head}: {'; '.join(notes)}: conjugate gradient", {}
        if self.time_budget is None:
            notes.append(f"{fitting[0]} fits (no time budget)")
            return self._build(fitting[0], fmodel), f"{head}: {'; '.join(notes)}", {}
        try:
            probe = measure_probe(fmodel, data)
        except RuntimeError as err:  # the gradient pass reports the model's error with the example's index
            notes.append(
                f"the timing probe failed ({type(err).__name__}), so memory alone decides: {fitting[0]}"
            )
            return self._build(fitting[0], fmodel), f"{head}: {'; '.join(notes)}", {}
        self._outputs = probe.outputs
        cost = self.cost_model or predict_seconds
        predicted = {
            name: float(cost(name, self._ekfac_probe(fmodel, probe) if name == "ekfac" else probe))
            for name in fitting
        }
        for name in fitting:
            if predicted[name] <= self.time_budget:
                notes.append(f"{name} predicted {_seconds(predicted[name])} <= budget {self.time_budget:g} s")
                return self._build(name, fmodel), f"{head}: {'; '.join(notes)}", predicted
            notes.append(f"{name} predicted {_seconds(predicted[name])} > budget {self.time_budget:g} s")
        fastest = min(fitting, key=lambda name: predicted[name])
        part = None if ekfac_reason is None else supported_part(fmodel, data)
        if part is not None:  # EK-FAC on the layers it supports, the rest of the model held fixed
            narrowed = FunctionalModel(fmodel.model, fmodel.task, list(part.covered), fmodel.chunk_size)
            layers = tuple((layer.a_dim, layer.out_dim) for layer in find_layers(narrowed))
            seconds = float(
                cost("ekfac", self._ekfac_probe(fmodel, dataclasses.replace(probe, layers=layers)))
            )
            predicted["ekfac"] = seconds
            if seconds <= self.time_budget or seconds < predicted[fastest]:
                notes.append(
                    f"none on all parameters fits the budget: EK-FAC on its {len(part.covered)} supported "
                    f"parameter tensors ({narrowed.num_params:,} of {p:,} values), predicted {_seconds(seconds)}"
                )
                return self._build("ekfac", fmodel), f"{head}: {'; '.join(notes)}", predicted
        if not math.isfinite(predicted[fastest]):
            fastest = fitting[0]
        notes.append(f"none fits the budget: the predicted-fastest, {fastest}")
        return self._build(fastest, fmodel), f"{head}: {'; '.join(notes)}", predicted

    def choose(self, fmodel: FunctionalModel, data: DataSource) -> tuple[Curvature, str]:
        """Choose the route for ``fmodel`` and ``data`` (sizes and a probe of well under a second) and keep the
        choice for :meth:`fit`; returns the unfitted route and the reason in words, so callers can say it before
        the work."""
        # keyed by the model copy, not ``fmodel``: the attributor may narrow the scope of the chosen route
        # (EK-FAC on its supported layers) and fit it on a new FunctionalModel of the same model
        if getattr(self, "choice_", None) is None or self.choice_[0] is not fmodel.model:
            route, reason, predicted = self._choose(fmodel, data)
            if route.name == "ekfac" and route.fisher != "ggn":
                reason += (
                    f"; EK-FAC with fisher={route.fisher!r} ({self._outputs:,} outputs per example > "
                    f"{MAX_GGN_OUTPUTS:,}, the limit of the exact output Hessian)"
                )
            logger.info("curvature='auto' chose %r: %s", route.name, reason)
            self.choice_ = (fmodel.model, route, reason, predicted)
        return self.choice_[1], self.choice_[2]

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> AutoCurvature:
        route, reason = self.choose(fmodel, data)
        route.training_state = self.training_state
        start = time.perf_counter()
        route.fit(fmodel, data, progress=progress)
        seconds = time.perf_counter() - start
        self.route_ = route
        self.info_ = {
            **route.info,
            "auto_choice": route.name,
            "auto_reason": reason,
            "auto_predicted_seconds": dict(self.choice_[3]),
            "auto_fit_seconds": seconds,
        }
        predicted = self.choice_[3].get(route.name)
        if predicted is not None:
            logger.info("curvature='auto': %s took %.3g s (predicted %.3g s)", route.name, seconds, predicted)
        return self

    @property
    def collective_solve(self) -> bool:  # type: ignore[override]
        """The chosen route's (False before ``fit``)."""
        route = getattr(self, "route_", None)
        return bool(getattr(route, "collective_solve", False))

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("route_")
        return self.route_.solve(vectors)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("route_")
        return self.route_.matvec(vectors)

    def __repr__(self) -> str:
        return f"AutoCurvature(damping={self.damping!r}, time_budget={self.time_budget!r})"


__all__ = [
    "ARNOLDI_RANK",
    "AUTO_ORDER",
    "AutoCurvature",
    "CostModel",
    "ekfac_obstacle",
    "measure_probe",
    "supported_part",
]
