"""Metagradient attribution: differentiate the recorded training run itself (Ilyas & Engstrom 2025, "MAGIC").

Influence functions linearise the *minimum* of the training objective; a model trained by Adam or SGD for a budget
never reached one. A recorded run (:class:`datatrace.Recorder`) is instead a known function ``theta_T(w)`` of the
training examples' weights ``w`` (all ones as trained): step ``t`` minimises ``(1/|B_t|) sum_{j in B_t} w_j
l(z_j) + L2``. :class:`Metagradient` differentiates the query measurement through every recorded optimizer step
(:mod:`datatrace.run.metagradient`) and reports

    score[q, i] = - d f_q(theta_T) / d w_i  ~  f_q(theta_T with i's loss terms removed from the run) - f_q(theta_T),

the first-order change when example ``i`` is dropped from the *same* run (same initialisation, order, minibatches,
dropout seeds): datatrace's leave-one-out sign and units (:data:`datatrace.scores.MEANING`). Its exact ground
truth is :func:`datatrace.verification.retrain.single_model_subsets`; against retraining with fresh seeds it is
one model's answer, like every single-model route.

The derivative describes removals only where the run is smooth in its data weights: ReLU-like activations and
max-pooling make every step's update jump when an example's weight changes (:mod:`datatrace.run.smoothness`);
``fit`` names such operations in a warning and ``Scores.metadata["non_smooth_operations"]`` (``None`` when the
model's forward pass could not be probed outside a training step).

Cost: a few training runs for one query, growing with the number of queries (each adds one vector-Jacobian
product per step); ``O(sqrt T)`` model states in memory (:mod:`datatrace.run.metagradient`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datatrace.attributors.base import Attributor, Measurement, default_memory_budget
from datatrace.data import DataLike, DataSource, as_data_source, cast_batch
from datatrace.errors import bad_value, check_bool
from datatrace.gradients.functional import BoundFunction
from datatrace.run.metagradient import metagradients
from datatrace.run.recording import Recording
from datatrace.run.replay import Replay
from datatrace.scores import Scores
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["QUERY_MEMORY_FACTOR", "Metagradient"]

#: adjoint copies of a training state that one query holds in a reverse pass (its adjoint, the vector-Jacobian
#: product's result and the batched product's intermediates)
QUERY_MEMORY_FACTOR = 4


class Metagradient(Attributor):
    """Scores from the exact derivative of the recorded training run (module docstring).

    Args:
        model: a model of the recorded architecture (its values are replaced by the recorded ones).
        task: the task whose loss the run minimised and whose measurement the queries use.
        recording: a :class:`~datatrace.run.recording.Recording` or its folder.
        segment: steps recomputed per reverse segment (default ``ceil(sqrt(T))``: ``O(sqrt T)`` states held).
        query_batch_size: queries sharing one reverse pass (default: all that fit half the default memory budget,
            each holding a few adjoint copies of a training state).
        hold_graphs: replay each reverse segment once, with its autograd graphs, and hold them for its reverse
            pass (saves one replay of every step). ``None``: when a segment's graphs fit half the default memory
            budget (:func:`~datatrace.run.metagradient.graph_bytes`); ``True``: always; ``False``: never (rebuild
            each step's graph in reverse order, holding states only).
        progress: show a tqdm bar per reverse pass.
    """

    fitted_attribute = "replay_"
    route = "metagradient (reverse-mode through the recorded training run)"
    supports_measurement = True
    removal_from_recorded_run = True

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        recording: Recording | str,
        *,
        segment: int | None = None,
        query_batch_size: int | None = None,
        hold_graphs: bool | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(task, Task):
            raise bad_value("task", task, "a datatrace.Task", "pass e.g. datatrace.ClassificationTask()")
        self.model = model
        self.task = task
        self.recording = recording if isinstance(recording, Recording) else Recording(recording)
        if segment is not None and (not isinstance(segment, int) or segment < 1):
            raise bad_value(
                "segment", segment, "a positive int or None", "leave it None for ceil(sqrt(steps))"
            )
        if query_batch_size is not None and (not isinstance(query_batch_size, int) or query_batch_size < 1):
            raise bad_value("query_batch_size", query_batch_size, "a positive int or None", "leave it None")
        if hold_graphs is not None and not isinstance(hold_graphs, bool):
            raise bad_value(
                "hold_graphs",
                hold_graphs,
                "True, False or None",
                "leave it None to hold graphs when they fit",
            )
        self.segment = segment
        self.query_batch_size = query_batch_size
        self.hold_graphs = hold_graphs
        self.progress = check_bool("progress", progress)
        self.last_run_: dict[str, Any] = {}

    # -- the contract --------------------------------------------------------------------------------------------
    def fit(self, train: DataLike) -> Metagradient:
        """Bind the training data the recording's indices refer to; nothing is computed until :meth:`score`."""
        self.replay_ = Replay(self.model, self.task, self.recording, train)
        self.n_train_ = self.recording.n_train
        self.non_smooth_ = self.replay_.non_smooth_operations()
        if self.non_smooth_:
            logger.warning(
                "metagradient: the model calls %s, whose derivative jumps, so the recorded run is not a "
                "differentiable function of the examples' weights: the scores are its exact derivative but predict "
                "removals less closely than on a smooth model (GELU, SiLU, tanh, average pooling); see "
                "datatrace.run.smoothness and benchmarks/README.md (bench_metagradient.py)",
                ", ".join(self.non_smooth_),
            )
        self._final_state = self.replay_.saved(self.recording.n_steps)
        return self

    @property
    def n_train(self) -> int:
        self.check_is_fitted()
        return int(self.n_train_)

    @property
    def fitted_model(self) -> nn.Module:
        """The recorded final model (a copy, eval mode)."""
        self.check_is_fitted()
        return self.replay_.model_at(self._final_state)

    @property
    def training_data(self) -> DataSource:
        self.check_is_fitted()
        return self.replay_.source

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """``values[q, i] = -d f_q / d w_i``: the first-order change of query ``q``'s measurement when example
        ``i`` is dropped from the recorded run."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        replay = self.replay_
        source = as_data_source(query, "query")
        fn = BoundFunction(replay.model, measurement or self.task.measurement)
        n_query = len(source)
        chunk = self.query_batch_size or self._default_query_batch(n_query)
        rows, held, worst, batched = [], 0, 0.0, True
        graph_budget = self._graph_budget()
        for start in range(0, n_query, chunk):
            idx = torch.arange(start, min(start + chunk, n_query))
            batch = cast_batch(source.get(idx), replay.dtype, replay.device)
            with tqdm(
                total=replay.n_steps,
                desc=f"metagradient (queries {start}-{int(idx[-1])})",
                disable=not self.progress,
                leave=False,
            ) as bar:
                result = metagradients(
                    replay,
                    lambda state, batch=batch: replay.evaluate(state, fn, batch),
                    len(idx),
                    segment=self.segment,
                    graph_budget=graph_budget,
                    progress=bar.update,
                )
            rows.append(-result.grads)
            held = max(held, result.max_states_held)
            worst = max(worst, result.replay_error)
            batched = batched and result.info["batched_queries"]
        self.last_run_ = {
            "steps": replay.n_steps,
            "segment": result.segment,
            "max_states_held": held,
            "replay_relative_error": worst,
            "reverse_passes": len(rows),
            "batched_queries": batched,
            "held_graphs": result.info["held_graphs"],
            "graph_bytes_per_step": result.info["graph_bytes_per_step"],
        }
        values = torch.cat(rows).to(torch.float64 if replay.dtype == torch.float64 else replay.dtype)
        return Scores(values, self.describe_measurement(measurement), self.metadata())

    def _graph_budget(self) -> int:
        """Bytes the reverse pass may spend on held graphs (``hold_graphs``: half the default budget, all, none)."""
        if self.hold_graphs is None:
            return default_memory_budget(self.replay_.device)[0] // 2
        return 2**62 if self.hold_graphs else 0

    def _default_query_batch(self, n_query: int) -> int:
        """As many queries per reverse pass as fit :data:`QUERY_MEMORY_FACTOR` adjoint copies of a training state
        each within half the default memory budget (:func:`~datatrace.attributors.base.default_memory_budget`;
        the other half is for held graphs)."""
        per_query = QUERY_MEMORY_FACTOR * self._final_state.nbytes()
        budget = default_memory_budget(self.replay_.device)[0] // 2
        fits = max(1, budget // max(per_query, 1))
        if fits < n_query:
            logger.info(
                "metagradient: %d queries per reverse pass (%d bytes of adjoints each, budget %d bytes)",
                fits,
                per_query,
                budget,
            )
        return int(min(n_query, fits))

    def self_influence(self) -> torch.Tensor:
        """The score of every training example on its own loss: one reverse pass per ``query_batch_size``
        training examples (as costly as scoring the whole training set as queries)."""
        self.check_is_fitted()
        logger.info("metagradient self-influence: %d training examples as queries", self.n_train)
        scores = self.score(self.replay_.source.subset(torch.arange(self.n_train)))
        return scores.values.diagonal().clone()

    def metadata(self) -> dict[str, Any]:
        return self.scores_metadata(
            None,
            recording=str(self.recording.folder),
            optimizer=self.recording.kind,
            removal="the example's loss terms dropped from the same run (same order, minibatches and seeds)",
            non_smooth_operations=None if self.non_smooth_ is None else list(self.non_smooth_),
            **self.last_run_,
        )
