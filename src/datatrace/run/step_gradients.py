"""Projected per-example gradients collected during training, for TracIn without a second pass over the data.

At step ``t`` the recorder computes, for each example ``i`` of the minibatch ``B_t``, ``phi_{t,i} = P^T grad_theta
l(z_i, theta_t)`` at the parameters the step starts from (model in eval mode, so that the row is a deterministic
function of ``theta_t``; the step itself still runs in training mode), with one seeded random projection ``P``
(:class:`~datatrace.projection.random.RandomProjector`, ``E ||P^T g||^2 = ||g||^2``). Rows are written with each
saved state as ``grads-<t>.safetensors`` (rows, example indices, step numbers) and listed with their sha256 in the
manifest. :class:`datatrace.attributors.tracin_recorded.RecordedTracIn` turns them into scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from datatrace.gradients.functional import FunctionalModel, eval_mode
from datatrace.projection.random import RandomProjector
from datatrace.tasks import Task

__all__ = ["GradientTrace", "load_rows"]


class GradientTrace:
    """Accumulates ``(step, example, P^T grad l)`` rows and writes them in files, one per saved state."""

    def __init__(
        self, model: nn.Module, task: Task, names: list[str], dim: int, seed: int, n_train: int
    ) -> None:
        self.model = model
        self.fmodel = FunctionalModel(model, task, params=names)
        self.projector = RandomProjector(dim=dim, random_state=seed).fit(self.fmodel, n_points=n_train)
        self.names = names
        self._rows: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._steps: list[torch.Tensor] = []

    def fingerprint(self) -> dict[str, Any]:
        return {"params": self.names, **self.projector.fingerprint()}

    def add(self, t: int, indices: list[int], batch: tuple | dict) -> None:
        """Rows of step ``t``'s minibatch at the model's current parameters."""
        params = dict(self.model.named_parameters())
        self.fmodel.theta = self.fmodel.space.flatten({n: params[n].detach() for n in self.names})
        with eval_mode(self.model):
            grads = self.fmodel.per_example_grads(batch)
        self._rows.append(self.projector.project(grads).detach().cpu())
        self._indices.append(torch.as_tensor(indices, dtype=torch.long))
        self._steps.append(torch.full((len(indices),), t, dtype=torch.long))

    def pending(self) -> bool:
        return bool(self._rows)

    def write(self, path: str | Path) -> None:
        """Write the pending rows to ``path`` (safetensors) and forget them."""
        save_file(
            {
                "rows": torch.cat(self._rows).contiguous(),
                "indices": torch.cat(self._indices),
                "steps": torch.cat(self._steps),
            },
            str(path),
        )
        self._rows, self._indices, self._steps = [], [], []


def load_rows(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, indices, steps)`` of one file written by :meth:`GradientTrace.write`."""
    data = load_file(str(path))
    return data["rows"], data["indices"], data["steps"]
