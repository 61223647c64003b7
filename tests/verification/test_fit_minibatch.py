"""fit_minibatch: the realistic training recipe (Adam/AdamW/SGD on shuffled minibatches), deterministic by seed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from datatrace import ClassificationTask
from datatrace.verification.training import fit_minibatch


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    return x, x[:, :3].argmax(dim=1)  # learnable labels


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_same_seed_same_model_other_seed_other_model(optimizer: str) -> None:
    data, task = _data(), ClassificationTask(weight_decay=1e-3)
    a = fit_minibatch(_model(), task, data, epochs=3, batch_size=16, optimizer=optimizer, lr=1e-2, seed=1)
    b = fit_minibatch(_model(), task, data, epochs=3, batch_size=16, optimizer=optimizer, lr=1e-2, seed=1)
    c = fit_minibatch(_model(), task, data, epochs=3, batch_size=16, optimizer=optimizer, lr=1e-2, seed=2)
    for pa, pb, _pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    assert not a.training  # returned in eval mode


def test_training_lowers_the_objective_and_leaves_the_input_model_alone() -> None:
    data, task = _data(), ClassificationTask()
    model = _model()
    before = copy.deepcopy(model.state_dict())
    trained = fit_minibatch(model, task, data, epochs=30, batch_size=16, lr=1e-2, seed=0)
    model.eval()
    assert task.loss(trained, data).mean() < 0.5 * task.loss(model, data).mean()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_one_sgd_step_is_the_minibatch_objective_with_the_task_l2() -> None:
    """One epoch of one full batch without momentum: theta - lr * grad(mean loss + lambda/2 ||theta||^2)."""
    x, y = _data(8)
    task = ClassificationTask(weight_decay=0.5)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    expected = copy.deepcopy(model)
    loss = task.loss(expected, (x, y)).mean() + 0.25 * sum((p * p).sum() for p in expected.parameters())
    grads = torch.autograd.grad(loss, list(expected.parameters()))
    trained = fit_minibatch(
        model, task, (x, y), epochs=1, batch_size=8, lr=0.1, optimizer="sgd", momentum=0.0
    )
    for p, e, g in zip(trained.parameters(), expected.parameters(), grads, strict=True):
        torch.testing.assert_close(p, e - 0.1 * g)


def test_init_reinitialises_under_the_seed() -> None:
    data, task = _data(), ClassificationTask()

    def init(m: nn.Module) -> None:
        for layer in m.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    a = fit_minibatch(_model(), task, data, epochs=1, init=init, seed=3)
    b = fit_minibatch(
        nn.Sequential(*[copy.deepcopy(m) for m in _model()]), task, data, epochs=1, init=init, seed=3
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"optimizer": "lbfgs"}, "optimizer"), ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size")],
)
def test_bad_settings_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fit_minibatch(_model(), ClassificationTask(), _data(), **kwargs)
