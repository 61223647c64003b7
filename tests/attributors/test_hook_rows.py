"""Per-example gradients from the layers' hooks where ``vmap`` cannot batch the model (data-dependent control
flow, as in BERT's attention-mask code): the same scores as one example at a time, the switch checked once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import datatrace


class Branchy(nn.Module):
    """Linear layers only, with a Python branch on a tensor's value (``vmap`` refuses ``.item()``)."""

    def __init__(self, couple: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        self.couple = couple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if float(x.abs().max().item()) > 1e6:  # never taken; breaks vmap
            h = h * 0
        if (
            self.couple
        ):  # examples interact: each row minus the batch mean (the hooks' sums then mix examples)
            h = h - 0.5 * h.mean(dim=0, keepdim=True)
        return self.b(h)


class Plain(Branchy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("curvature", ["gauss-newton", "ekfac"])
def test_hook_rows_give_the_scores_of_a_model_vmap_can_batch(curvature: str) -> None:
    torch.manual_seed(0)
    branchy = Branchy().double()
    plain = Plain().double()
    plain.load_state_dict(branchy.state_dict())
    train, query = _data(40, 1), _data(6, 2)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    got = datatrace.InfluenceFunction(branchy, task, curvature=curvature, progress=False).fit(train)
    want = datatrace.InfluenceFunction(plain, task, curvature=curvature, progress=False).fit(train)
    assert not got.fmodel_.vmap_examples and got.fmodel_._layer_rows_checked  # the hooks did the rows
    assert want.fmodel_.vmap_examples
    torch.testing.assert_close(got.local_grads_, want.local_grads_, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.score(query).values, want.score(query).values, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.self_influence(), want.self_influence(), rtol=1e-8, atol=1e-12)


def test_examples_that_interact_fall_back_to_one_example_at_a_time(caplog) -> None:
    """The hooks' rows of a batch-coupled forward are not per-example gradients: the check catches it and the
    loop's rows (each example alone, as every route sees it) are used."""
    torch.manual_seed(0)
    model = Branchy(couple=True).double()
    train = _data(30, 3)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    with caplog.at_level("INFO", logger="datatrace"):
        inf = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit(train)
    assert inf.fmodel_.layer_rows is None and "differ from per-example autograd" in caplog.text
    x, y = train
    for i in (0, 7):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want = torch.cat(
            [p.grad.reshape(-1) for p in (model.a.weight, model.a.bias, model.b.weight, model.b.bias)]
        )
        torch.testing.assert_close(inf.local_grads_[i], want, rtol=1e-10, atol=1e-12)
