"""Tasks: loss values by hand, weight-decay validation, and custom Task subclasses."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from datatrace import ClassificationTask, InfluenceFunction, ProjectedInfluence, RegressionTask, Task
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel
from datatrace.verification.training import fit_full_batch

F64 = torch.float64


class Fixed(nn.Module):
    """Returns a fixed output tensor whatever the input (indexed by the input's first column)."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs = nn.Parameter(outputs.clone())

    def forward(self, x):
        return self.outputs[x[:, 0].long()]


def idx(n):
    return torch.arange(n, dtype=F64)[:, None]


# -- ClassificationTask --------------------------------------------------------------------------------------------


def test_multiclass_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=F64)
    y = torch.tensor([1, 0])
    got = ClassificationTask().loss(Fixed(logits), (idx(2), y))
    expected = [
        -2.0 + math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)),
        0.0 + math.log(1.0 + math.exp(-1.0) + math.exp(3.0)),
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", ["(b,)", "(b, 1)"])
def test_binary_one_logit_is_logistic_loss(shape):
    z = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=F64)
    y = torch.tensor([1, 0, 0, 1])
    outputs = z if shape == "(b,)" else z[:, None]
    got = ClassificationTask().loss(Fixed(outputs), (idx(4), y))
    # y = 1: log(1 + e^-z); y = 0: log(1 + e^z)
    expected = [
        math.log1p(math.exp(-0.3)),
        math.log1p(math.exp(-1.2)),
        math.log1p(math.exp(2.0)),
        math.log(2.0),
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    # float labels work too for the binary case
    torch.testing.assert_close(ClassificationTask().loss(Fixed(outputs), (idx(4), y.double())), got)


def test_binary_logit_equals_two_class_softmax_with_logits_zero_and_z():
    z = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    y = torch.tensor([1, 0, 1])
    one = ClassificationTask().loss(Fixed(z[:, None]), (idx(3), y))
    two = ClassificationTask().loss(Fixed(torch.stack([torch.zeros(3, dtype=F64), z], 1)), (idx(3), y))
    torch.testing.assert_close(one, two, rtol=1e-14, atol=1e-15)


class TwoLogits(nn.Module):
    """The same classifier written with two logits, the first fixed at 0."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        z = self.lin(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_binary_influence_equals_two_class_softmax_influence():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=g, dtype=F64)
    y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=F64) > 0).long()
    task = ClassificationTask(weight_decay=0.1)
    one = fit_full_batch(nn.Linear(2, 1).double(), task, (X, y), tolerance_grad=1e-10)
    two = TwoLogits(one)
    s1 = InfluenceFunction(one, task, progress=False).fit((X, y))
    s2 = InfluenceFunction(
        two, ClassificationTask(weight_decay={"lin.weight": 0.1, "lin.bias": 0.1}), progress=False
    )
    s2.fit((X, y))
    assert s1.gradient_norm_ < 1e-8 and s2.gradient_norm_ < 1e-8
    torch.testing.assert_close(s1.train_grads_, s2.train_grads_, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        s1.score((X[:3], y[:3])).values, s2.score((X[:3], y[:3])).values, rtol=1e-10, atol=1e-15
    )
    assert s1.score((X[:3], y[:3])).values.abs().max() > 1e-4


def test_classification_rejects_bad_labels_and_shapes():
    logits = torch.zeros(3, 4, dtype=F64)
    task = ClassificationTask()
    with pytest.raises(ValueError, match=r"integer class labels.*LongTensor"):
        task.loss(Fixed(logits), (idx(3), torch.zeros(3, dtype=F64)))
    with pytest.raises(ValueError, match=r"returned 3 rows for a batch of 2 labels"):
        task.loss_from_outputs(logits, (idx(3), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"returned 3 logits for a batch of 2 labels"):
        task.loss_from_outputs(torch.zeros(3, 1), (idx(3), torch.zeros(2)))
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, classes\), got \(3, 2, 2\)"):
        task.loss_from_outputs(torch.zeros(3, 2, 2), (idx(3), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"batch has 1 element.*\(inputs, targets\)"):
        task.loss(Fixed(logits), (idx(3),))


def _binary_problem(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    y = (X[:, 0] > 0).long()
    return nn.Linear(3, 1).double(), X, y


def test_one_logit_refuses_a_label_outside_zero_and_one_naming_the_example():
    model, X, y = _binary_problem()
    y = y.clone()
    y[13] = 2  # the logistic loss would silently take 2 as a target (position 5 of the second batch)
    inf = InfluenceFunction(model, ClassificationTask(), progress=False, batch_size=8)
    with pytest.raises(
        ValueError, match=r"label 2 at example 13 .*outside the model's classes.*one logit.*0 or 1"
    ):
        inf.fit((X, y))


def test_minus_100_ignore_index_is_refused_not_scored_zero(classification_data):
    X, y = classification_data
    y = y.clone()
    y[7] = -100  # cross-entropy's ignore_index: the example would get zero loss and zero influence
    inf = InfluenceFunction(nn.Linear(3, 3).double(), ClassificationTask(), progress=False)
    with pytest.raises(ValueError, match=r"label -100 at example 7 .*negative.*ignore_index.*Fix: drop"):
        inf.fit((X, y))


def test_multiclass_label_at_or_above_the_number_of_logits_is_refused(classification_data):
    X, y = classification_data
    y = y.clone()
    y[[11, 40]] = 3
    inf = InfluenceFunction(nn.Linear(3, 3).double(), ClassificationTask(), progress=False)
    with pytest.raises(
        ValueError, match=r"label 3 at example 11 \(2 bad in its batch\).*3 logits: labels 0\.\.2"
    ):
        inf.fit((X, y))


def test_projected_influence_names_the_bad_label_by_its_example(classification_data):
    """The projected route checks its training batches with their indices too (it said "position 3")."""
    X, y = classification_data
    y = y.clone()
    y[43] = 3  # position 3 of the sixth batch of 8
    inf = ProjectedInfluence(nn.Linear(3, 3).double(), ClassificationTask(), progress=False, batch_size=8)
    with pytest.raises(ValueError, match=r"label 3 at example 43 \(1 bad in its batch\).*3 logits"):
        inf.fit((X, y))


def test_query_labels_are_checked_too(classification_data):
    X, y = classification_data
    torch.manual_seed(0)
    inf = InfluenceFunction(nn.Linear(3, 3).double(), ClassificationTask(), progress=False).fit((X, y))
    with pytest.raises(ValueError, match=r"label -1 at position 1 .*negative"):
        inf.score((X[:2], torch.tensor([0, -1])))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_narrow_integer_labels_give_the_int64_scores(classification_data, dtype):
    X, y = classification_data
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    task = ClassificationTask(weight_decay=0.1)
    ref = InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, y))
    got = InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, y.to(dtype)))
    torch.testing.assert_close(got.train_grads_, ref.train_grads_, rtol=0, atol=0)
    torch.testing.assert_close(
        got.score((X[:4], y[:4].to(dtype))).values, ref.score((X[:4], y[:4])).values, rtol=0, atol=0
    )


def test_check_batch_casts_labels_to_int64_and_keeps_valid_batches():
    model, X, y = _binary_problem()
    task = ClassificationTask()
    out = task.check_batch(model, (X, y.to(torch.int32)))
    assert out[1].dtype == torch.long and torch.equal(out[1], y) and out[0] is X
    floats = task.check_batch(model, (X, y.double()))  # 0.0 / 1.0 targets of the logistic loss are fine
    assert torch.equal(floats[1], y.double())
    assert Task().check_batch(model, (X, y)) == (X, y)  # the base task accepts anything


def test_fractional_and_float_multiclass_labels_are_refused(classification_data):
    X, y = classification_data
    model, Xb, yb = _binary_problem()
    soft = yb.double()
    soft[3] = 0.5
    with pytest.raises(ValueError, match=r"label 0.5 at position 3 .*not a whole number.*soft labels"):
        ClassificationTask().check_batch(model, (Xb, soft))
    with pytest.raises(ValueError, match=r"integer class labels for a model with 3 logits.*torch.float64"):
        ClassificationTask().check_batch(nn.Linear(3, 3).double(), (X, y.double()))


def test_a_column_of_class_labels_gives_the_scores_of_flat_labels(classification_data):
    """Labels of shape (n, 1) (a column, as pandas' df[["label"]] gives) are the same labels as (n,); they used to
    be refused inside the per-example pass with the shape of one example, (1, 1)."""
    X, y = classification_data
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    task = ClassificationTask(weight_decay=0.1)
    for route in ("exact", "ekfac"):
        flat = InfluenceFunction(model, task, curvature=route, progress=False).fit((X, y))
        col = InfluenceFunction(model, task, curvature=route, progress=False).fit((X, y[:, None]))
        torch.testing.assert_close(
            col.score((X[:4], y[:4, None])).values, flat.score((X[:4], y[:4])).values, rtol=0, atol=0
        )
    assert ClassificationTask().check_batch(model, (X, y[:, None].int()))[1].shape == y.shape


def test_one_hot_labels_are_refused_with_the_batch_shape_and_the_fix(classification_data):
    X, y = classification_data
    inf = InfluenceFunction(nn.Linear(3, 3).double(), ClassificationTask(), progress=False)
    with pytest.raises(
        ValueError, match=r"labels of shape \(60, 3\) .*one class index per example.*y\.argmax"
    ):
        inf.fit((X, F.one_hot(y, 3)))


# -- RegressionTask ------------------------------------------------------------------------------------------------


def test_regression_sums_squared_errors_over_outputs_without_half():
    outputs = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]], dtype=F64)
    y = torch.tensor([[0.5, 4.0], [0.0, 1.0], [3.0, 2.0]], dtype=F64)
    got = RegressionTask().loss(Fixed(outputs), (idx(3), y))
    expected = torch.tensor([0.25 + 4.0, 0.0 + 4.0, 0.0 + 1.0], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)


def test_regression_single_output_accepts_flat_targets():
    outputs = torch.tensor([[1.0], [2.0]], dtype=F64)
    got = RegressionTask().loss(Fixed(outputs), (idx(2), torch.tensor([0.0, 4.0], dtype=F64)))
    torch.testing.assert_close(got, torch.tensor([1.0, 4.0], dtype=F64))
    # integer targets are cast to the outputs' dtype
    got = RegressionTask().loss(Fixed(outputs), (idx(2), torch.tensor([0, 4])))
    assert got.dtype == F64


def test_regression_shape_mismatch():
    with pytest.raises(ValueError, match=r"outputs have shape \(2, 2\) but targets have shape \(2, 3\)"):
        RegressionTask().loss(Fixed(torch.zeros(2, 2, dtype=F64)), (idx(2), torch.zeros(2, 3, dtype=F64)))


# -- weight decay ---------------------------------------------------------------------------------------------------


def test_weight_decay_float_and_mapping():
    assert Task(weight_decay=0.1).weight_decay_for("anything") == 0.1
    assert Task().weight_decay == 0.0
    assert Task(weight_decay=np.float32(0.5)).weight_decay == 0.5
    task = Task(weight_decay={"fc.weight": 0.2, "fc.bias": 0, "other": np.float32(0.25)})
    assert task.weight_decay_for("fc.weight") == 0.2
    assert task.weight_decay_for("fc.bias") == 0.0
    assert task.weight_decay_for("other") == 0.25
    assert task.weight_decay_for("unlisted") == 0.0
    assert "weight_decay={'fc.weight': 0.2" in repr(task)


@pytest.mark.parametrize(
    "bad",
    [-0.1, float("nan"), float("inf"), -float("inf"), "strong", "0.1", None, [0.1], True, False, np.bool_(1)],
)
def test_weight_decay_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"weight_decay=.*is not allowed.*Fix"):
        ClassificationTask(weight_decay=bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", None, True, np.bool_(0)])
def test_weight_decay_mapping_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"weight_decay\['fc.bias'\]=.*is not allowed: expected a .*number"):
        RegressionTask(weight_decay={"fc.weight": 0.1, "fc.bias": bad})


def test_weight_decay_true_is_not_read_as_one():
    with pytest.raises(
        ValueError, match=r"weight_decay=True is not allowed.*bool.*True as 1.0.*Fix: pass the L2"
    ):
        Task(weight_decay=True)


def test_weight_decay_mapping_with_unknown_parameter_name_raises():
    model = nn.Linear(2, 1).double()
    with pytest.raises(
        ValueError, match=r"weight_decay names \['weigth'\].*allowed names are \['weight', 'bias'\]"
    ):
        FunctionalModel(model, RegressionTask(weight_decay={"weigth": 0.1}))


def test_weight_decay_enters_the_hessian():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g, dtype=F64)
    y = torch.randn(20, 1, generator=g, dtype=F64)
    model = nn.Linear(2, 1).double()
    H0 = FunctionalModel(model, RegressionTask()).dense_hessian(as_data_source((X, y)))
    H1 = FunctionalModel(model, RegressionTask(weight_decay={"weight": 0.3})).dense_hessian(
        as_data_source((X, y))
    )
    torch.testing.assert_close(
        H1 - H0, torch.diag(torch.tensor([0.3, 0.3, 0.0], dtype=F64)), rtol=0, atol=1e-14
    )


# -- custom tasks --------------------------------------------------------------------------------------------------


class LossOnly(Task):
    """Squared error written as loss() alone: no outputs/loss_from_outputs split."""

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum(dim=1)


def test_custom_task_with_only_loss_works_with_exact_curvature():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(25, 2, generator=g, dtype=F64)
    y = torch.randn(25, 1, generator=g, dtype=F64)
    model = nn.Linear(2, 1, bias=False).double()
    n, lam = 25, 0.2
    w = torch.linalg.solve(X.T @ X + n * lam / 2 * torch.eye(2, dtype=F64), X.T @ y)
    with torch.no_grad():
        model.weight.copy_(w.T)
    task = LossOnly(weight_decay=lam)
    assert not task.has_outputs
    assert task.describe_measurement() == "the query's loss"
    custom = InfluenceFunction(model, task, progress=False).fit((X, y))
    builtin = InfluenceFunction(model, RegressionTask(weight_decay=lam), progress=False).fit((X, y))
    torch.testing.assert_close(
        custom.score((X[:3], y[:3])).values, builtin.score((X[:3], y[:3])).values, rtol=1e-12, atol=1e-15
    )
    # and the closed form: (1/n) g_q^T H^{-1} g_i with H = (2/n) X^T X + lam I, g = 2 r x
    H = 2 / n * X.T @ X + lam * torch.eye(2, dtype=F64)
    G = 2 * (X @ w - y) * X
    torch.testing.assert_close(
        custom.score((X[:3], y[:3])).values, G[:3] @ torch.linalg.solve(H, G.T) / n, rtol=1e-8, atol=1e-15
    )


def test_custom_task_with_only_loss_gives_clear_error_for_gauss_newton(caplog):
    X = torch.randn(10, 2, dtype=F64)
    y = torch.randn(10, 1, dtype=F64)
    inf = InfluenceFunction(nn.Linear(2, 1).double(), LossOnly(), curvature="gauss-newton", progress=False)
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(
            ValueError, match=r"curvature='gauss-newton'.*LossOnly does not split its loss.*outputs"
        ),
    ):
        inf.fit((X, y))


def test_custom_measurement_is_used_and_described():
    class Prediction(RegressionTask):
        def measurement(self, model, batch):
            return model(batch[0])[:, 0]

    task = Prediction()
    assert task.describe_measurement() == "Prediction.measurement"
    assert task.has_outputs
    g = torch.Generator().manual_seed(2)
    X = torch.randn(15, 2, generator=g, dtype=F64)
    y = torch.randn(15, 1, generator=g, dtype=F64)
    Xt = torch.cat([X, torch.ones(15, 1, dtype=F64)], 1)
    wt = torch.linalg.lstsq(Xt, y).solution
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(wt[:2].T)
        model.bias.copy_(wt[2])
    inf = InfluenceFunction(model, task, progress=False).fit((X, y))
    scores = inf.score((X[:2], y[:2]))
    assert scores.measurement == "Prediction.measurement"
    # prediction change: grad f = [x, 1], params change = (X^T X)^{-1} x_i r_i (OLS)
    delta = (torch.linalg.solve(Xt.T @ Xt, Xt.T) * (Xt @ wt - y).T).T  # (n, 3)
    torch.testing.assert_close(scores.values, Xt[:2] @ delta.T, rtol=1e-8, atol=1e-14)


def test_base_task_without_loss_explains_what_to_define():
    with pytest.raises(NotImplementedError, match=r"Task must define loss\(model, batch\)"):
        Task().loss(nn.Linear(1, 1), (torch.zeros(1, 1), torch.zeros(1)))
    with pytest.raises(NotImplementedError, match=r"does not define outputs.*curvature='exact'"):
        Task().outputs(nn.Linear(1, 1), ())


def test_task_that_splits_outputs_gets_loss_for_free():
    class Split(Task):
        def outputs(self, model, batch):
            return model(batch[0])

        def loss_from_outputs(self, outputs, batch):
            return F.softplus(outputs[:, 0])

    task = Split()
    assert task.has_outputs
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    model = nn.Linear(1, 1).double()
    torch.testing.assert_close(task.loss(model, (x,)), F.softplus(model(x)[:, 0]))


# -- what algorithms ask of a task in the output space -------------------------------------------------------------


class Generic(Task):
    """Delegates the loss to a built-in task without inheriting its closed forms: Task's torch.func defaults."""

    def __init__(self, inner: Task) -> None:
        super().__init__()
        self.inner = inner

    def outputs(self, model, batch):
        return self.inner.outputs(model, batch)

    def loss_from_outputs(self, outputs, batch):
        return self.inner.loss_from_outputs(outputs, batch)


OUTPUT_CASES = [
    (ClassificationTask(), torch.randn(6, 4, dtype=F64), torch.arange(6) % 4),
    (ClassificationTask(), torch.randn(6, 1, dtype=F64), torch.arange(6) % 2),
    (RegressionTask(), torch.randn(6, 3, dtype=F64), torch.randn(6, 3, dtype=F64)),
]
OUTPUT_IDS = ["softmax", "logistic", "squared"]


@pytest.mark.parametrize(("task", "outputs", "target"), OUTPUT_CASES, ids=OUTPUT_IDS)
def test_output_hessian_factors_closed_forms_match_the_generic_default(task, outputs, target):
    batch = (outputs, target)
    L = task.output_hessian_factors(outputs, batch)
    G = Generic(task).output_hessian_factors(outputs, batch)
    assert L.shape == G.shape == (6, outputs.shape[1], outputs.shape[1])
    torch.testing.assert_close(G @ G.transpose(1, 2), L @ L.transpose(1, 2), rtol=0, atol=1e-12)
    for i in range(6):  # and both against an independent Hessian (forward over reverse)
        H = hessian(lambda o, i=i: task.loss_from_outputs(o[None], (None, target[i : i + 1]))[0])(outputs[i])
        torch.testing.assert_close(L[i] @ L[i].T, H.reshape(outputs[i].numel(), -1), rtol=0, atol=1e-12)

    class Subclass(type(task)):  # same loss, not the built-in method: the generic default
        def loss_from_outputs(self, outputs, batch):
            return super().loss_from_outputs(outputs, batch)

    S = Subclass().output_hessian_factors(outputs, batch)
    torch.testing.assert_close(S, G, rtol=0, atol=0)


@pytest.mark.parametrize(("task", "outputs", "target"), OUTPUT_CASES, ids=OUTPUT_IDS)
def test_output_gradient_by_hand(task, outputs, target):
    g = task.output_gradient(outputs, (outputs, target))
    if isinstance(task, RegressionTask):
        expected = 2 * (outputs - target)
    elif outputs.shape[1] == 1:
        expected = torch.sigmoid(outputs) - target[:, None].to(F64)
    else:
        expected = torch.softmax(outputs, dim=1) - F.one_hot(target, outputs.shape[1]).to(F64)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(Generic(task).output_gradient(outputs, (outputs, target)), g, rtol=0, atol=0)


@pytest.mark.parametrize(("task", "outputs", "target"), OUTPUT_CASES, ids=OUTPUT_IDS)
def test_sampled_targets_follow_the_predictive_distribution(task, outputs, target):
    """The sampled Fisher E_y[g g^T] (g = dl/do at sampled y) equals the output Hessian L L^T in expectation."""
    r = 20000
    o = outputs.repeat(r, 1)
    batch = (o, target.repeat(r, *(1 for _ in target.shape[1:])))
    generator = torch.Generator().manual_seed(0)
    sampled = task.sample_targets(o, batch, generator)
    assert sampled[1].dtype == target.dtype and sampled[1].shape == batch[1].shape
    g = task.output_gradient(o, sampled).reshape(r, 6, -1)
    fisher = torch.einsum("rbi,rbj->bij", g, g) / r
    L = task.output_hessian_factors(outputs, (outputs, target))
    torch.testing.assert_close(fisher, L @ L.transpose(1, 2), rtol=0, atol=0.05)
    again = task.sample_targets(o, batch, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], sampled[1])  # seeded


def test_sampling_needs_a_predictive_distribution():
    outputs, target = torch.randn(4, 3, dtype=F64), torch.arange(4) % 3
    with pytest.raises(ValueError, match=r"fisher='sampled'.*sample_targets"):
        Generic(ClassificationTask()).sample_targets(outputs, (outputs, target), torch.Generator())

    class Smoothed(ClassificationTask):  # a changed loss keeps no closed form
        def loss_from_outputs(self, outputs, batch):
            return F.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=0.1)

    with pytest.raises(ValueError, match=r"fisher='sampled'.*sample_targets"):
        Smoothed().sample_targets(outputs, (outputs, target), torch.Generator())
