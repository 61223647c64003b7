"""Per-example gradients, objective gradient, HVPs and dense curvature against independent float64 oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.tasks import ClassificationTask, RegressionTask, Task
from datatrace.verification.training import fit_full_batch

# -- independent helpers (no datatrace code) ---------------------------------------------------------------------


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model: torch.nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    assert start == theta.numel()
    return out


def with_params(model: torch.nn.Module, theta: torch.Tensor) -> torch.nn.Module:
    clone = prepare_model(model, torch.float64)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.clone(), clone.parameters())
    return clone


def fd_per_example(model, task_loss, batch, h=1e-6) -> torch.Tensor:
    """Central finite differences of every example's loss w.r.t. every parameter: shape (b, p)."""
    theta = flat_params(model)
    cols = []
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = h
        plus = task_loss(with_params(model, theta + e), batch)
        minus = task_loss(with_params(model, theta - e), batch)
        cols.append((plus - minus).detach() / (2 * h))
    return torch.stack(cols, dim=1)


def mlp_objective(model, X, y, wd: float):
    """L(theta) for a classifier with cross-entropy, written from scratch."""

    def f(theta):
        logits = functional_call(model, unflatten(model, theta), (X,))
        return F.cross_entropy(logits, y) + 0.5 * wd * (theta * theta).sum()

    return f


# -- per-example gradients ---------------------------------------------------------------------------------------


def test_per_example_grads_match_finite_differences_mlp_cross_entropy(make_mlp, classification_data):
    X, y = classification_data
    X, y = X[:7], y[:7]
    model = make_mlp()
    task = ClassificationTask()
    fm = FunctionalModel(prepare_model(model, torch.float64), task)
    grads = fm.per_example_grads((X, y))
    assert grads.shape == (7, sum(p.numel() for p in model.parameters()))
    expected = fd_per_example(model, task.loss, (X, y))
    torch.testing.assert_close(grads, expected, rtol=1e-7, atol=1e-8)
    # the rows are different per example (not a broadcast mean)
    assert not torch.allclose(grads[0], grads[1])


def test_per_example_grads_match_finite_differences_linear_squared_error(make_linear):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    model = make_linear(3, 2)
    task = RegressionTask()
    fm = FunctionalModel(prepare_model(model, torch.float64), task)
    grads = fm.per_example_grads((X, y))
    torch.testing.assert_close(grads, fd_per_example(model, task.loss, (X, y)), rtol=1e-7, atol=1e-8)
    # closed form: d/dW sum_k (W x + b - y)_k^2 = 2 r x^T, d/db = 2 r
    r = model(X).detach() - y
    closed = torch.cat([(2 * r[:, :, None] * X[:, None, :]).reshape(6, -1), 2 * r], dim=1)
    torch.testing.assert_close(grads, closed, rtol=1e-12, atol=1e-12)


def test_float32_inputs_are_cast_to_the_working_dtype(make_linear, regression_data):
    X, y = regression_data
    fm = FunctionalModel(prepare_model(make_linear(), torch.float64), RegressionTask())
    g64 = fm.per_example_grads((X, y))
    g32 = fm.per_example_grads((X.float(), y.float()))
    assert g32.dtype == torch.float64
    torch.testing.assert_close(g32, g64, rtol=1e-6, atol=1e-6)


class MarginTask(ClassificationTask):
    """Measurement: the logit of the true class minus the largest other one, smoothed (not the loss)."""

    def measurement(self, model, batch):
        x, y = batch
        z = model(x)
        true = z.gather(1, y[:, None])[:, 0]
        return true - torch.logsumexp(z, dim=1) + 0.5 * z.pow(2).sum(dim=1)


def test_measurement_grads_match_finite_differences(make_mlp, classification_data):
    X, y = classification_data
    X, y = X[:5], y[:5]
    model = make_mlp(seed=2)
    task = MarginTask()
    fm = FunctionalModel(prepare_model(model, torch.float64), task)
    got = fm.per_example_measurement_grads((X, y))
    torch.testing.assert_close(got, fd_per_example(model, task.measurement, (X, y)), rtol=1e-7, atol=1e-8)
    # differs from the loss gradients, so the measurement really was used
    assert not torch.allclose(got, fm.per_example_grads((X, y)))
    # default measurement is the loss
    fm_default = FunctionalModel(prepare_model(model, torch.float64), ClassificationTask())
    torch.testing.assert_close(
        fm_default.per_example_measurement_grads((X, y)), fm_default.per_example_grads((X, y))
    )


# -- objective gradient ------------------------------------------------------------------------------------------


def test_objective_grad_is_mean_grad_plus_weight_decay(make_mlp, classification_data):
    X, y = classification_data
    wd = 0.3
    model = make_mlp()
    fm = FunctionalModel(prepare_model(model, torch.float64), ClassificationTask(weight_decay=wd))
    source = as_data_source((X, y), batch_size=7)  # several batches, last one partial
    got = fm.objective_grad(source)
    expected = fm.per_example_grads((X, y)).mean(dim=0) + wd * flat_params(model)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and against autograd of the from-scratch objective
    theta = flat_params(model).requires_grad_(True)
    (auto,) = torch.autograd.grad(mlp_objective(model, X, y, wd)(theta), theta)
    torch.testing.assert_close(got, auto, rtol=1e-10, atol=1e-12)


def test_objective_grad_weight_decay_mapping_penalises_only_named_params(make_linear, regression_data):
    X, y = regression_data
    model = make_linear()
    fm = FunctionalModel(prepare_model(model, torch.float64), RegressionTask(weight_decay={"weight": 0.7}))
    got = fm.objective_grad(as_data_source((X, y)))
    reg = torch.tensor([0.7, 0.7, 0.7, 0.0], dtype=torch.float64)
    expected = fm.per_example_grads((X, y)).mean(0) + reg * flat_params(model)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_objective_grad_vanishes_at_lbfgs_minimum(make_mlp, classification_data):
    X, y = classification_data
    task = ClassificationTask(weight_decay=0.05)
    start = make_mlp()
    before = FunctionalModel(prepare_model(start, torch.float64), task).objective_grad(as_data_source((X, y)))
    trained = fit_full_batch(start, task, (X, y), tolerance_grad=1e-10, max_iter=2000)
    after = FunctionalModel(prepare_model(trained, torch.float64), task).objective_grad(
        as_data_source((X, y))
    )
    assert before.norm() > 1e-2
    assert after.abs().max() < 1e-8


# -- Hessian-vector products and dense curvature ------------------------------------------------------------------


def test_hvp_matches_finite_differences_of_objective_grad(make_mlp, classification_data):
    X, y = classification_data
    task = ClassificationTask(weight_decay=0.1)
    model = make_mlp()
    source = as_data_source((X, y), batch_size=25)
    fm = FunctionalModel(prepare_model(model, torch.float64), task)
    theta = flat_params(model)
    V = torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = fm.hvp(V, source)
    assert got.shape == V.shape
    h = 1e-5
    for v, hv in zip(V, got):
        plus = FunctionalModel(with_params(model, theta + h * v), task).objective_grad(source)
        minus = FunctionalModel(with_params(model, theta - h * v), task).objective_grad(source)
        torch.testing.assert_close(hv, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)


def test_dense_hessian_matches_autograd_hessian(make_mlp, classification_data):
    X, y = classification_data
    wd = 0.2
    model = make_mlp()
    fm = FunctionalModel(
        prepare_model(model, torch.float64), ClassificationTask(weight_decay=wd), chunk_size=5
    )
    H = fm.dense_hessian(as_data_source((X, y), batch_size=16))
    expected = torch.autograd.functional.hessian(mlp_objective(model, X, y, wd), flat_params(model))
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H, H.T, rtol=0, atol=0)


def test_gauss_newton_equals_hessian_for_linear_least_squares(make_linear):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    fm = FunctionalModel(prepare_model(make_linear(3, 2), torch.float64), RegressionTask(weight_decay=0.1))
    source = as_data_source((X, y), batch_size=8)
    H = fm.dense_hessian(source)
    G = fm.dense_gauss_newton(source)
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)
    # closed form: (2/n) kron(I_k, [X 1]^T [X 1]) rearranged to the (weight, bias) order, plus lambda I
    Xt = torch.cat([X, torch.ones(30, 1, dtype=X.dtype)], 1)
    J = torch.stack(
        [torch.cat([torch.kron(torch.eye(2, dtype=X.dtype), x[None, :3]), torch.eye(2)], 1) for x in Xt]
    )
    closed = 2 * torch.einsum("nkp,nkq->pq", J, J) / 30 + 0.1 * torch.eye(8, dtype=X.dtype)
    torch.testing.assert_close(G, closed, rtol=1e-12, atol=1e-12)


def test_gauss_newton_closed_form_multinomial_logistic_regression(make_linear, classification_data):
    X, y = classification_data
    n, d, c, wd = X.shape[0], X.shape[1], 3, 0.01
    model = make_linear(d, c, seed=7)
    fm = FunctionalModel(prepare_model(model, torch.float64), ClassificationTask(weight_decay=wd))
    source = as_data_source((X, y), batch_size=17)
    G = fm.dense_gauss_newton(source)
    # o = W x + b; J_i = [I_c (x) x_i^T, I_c]; d^2 CE / do^2 = diag(p) - p p^T
    p = torch.softmax(model(X).detach(), dim=1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eye = torch.eye(c, dtype=X.dtype)
    J = torch.stack([torch.cat([torch.kron(eye, x[None, :]), eye], dim=1) for x in X])  # (n, c, c*d + c)
    closed = torch.einsum("nkp,nkl,nlq->pq", J, A, J) / n + wd * torch.eye(c * d + c, dtype=X.dtype)
    torch.testing.assert_close(G, closed, rtol=1e-10, atol=1e-12)
    # the weight-weight block is X^T diag(p_k) - p_k p_l X per class pair
    k, m = 0, 1
    block = G[k * d : (k + 1) * d, m * d : (m + 1) * d]
    torch.testing.assert_close(block, X.T @ (A[:, k, m, None] * X) / n, rtol=1e-10, atol=1e-12)
    # outputs are linear in the parameters, so the Gauss-Newton matrix is the exact Hessian
    torch.testing.assert_close(G, fm.dense_hessian(source), rtol=1e-10, atol=1e-12)


def test_gauss_newton_is_psd_on_mlp_while_hessian_is_not(make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp(h=5, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # far from a minimum, saturated tanh units: indefinite Hessian
    fm = FunctionalModel(prepare_model(model, torch.float64), ClassificationTask())
    source = as_data_source((X, y))
    G = fm.dense_gauss_newton(source)
    H = fm.dense_hessian(source)
    g_eig = torch.linalg.eigvalsh(G)
    h_eig = torch.linalg.eigvalsh(H)
    assert g_eig.min() >= -1e-10 * g_eig.max()
    assert h_eig.min() < -1e-3 * h_eig.max()  # the check above is not vacuous
    assert not torch.allclose(G, H)


def test_params_selection_gives_sub_block_of_full_hessian(make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp()
    task = ClassificationTask(weight_decay={"0.weight": 0.1, "2.weight": 0.2, "2.bias": 0.3})
    source = as_data_source((X, y))
    full = FunctionalModel(prepare_model(model, torch.float64), task)
    last = FunctionalModel(prepare_model(model, torch.float64), task, params="2")
    assert last.space.names == ("2.weight", "2.bias")
    H_full = full.dense_hessian(source)
    H_last = last.dense_hessian(source)
    sl = full.space.slices()
    start, stop = sl["2.weight"].start, sl["2.bias"].stop
    assert H_last.shape == (stop - start, stop - start)
    torch.testing.assert_close(H_last, H_full[start:stop, start:stop], rtol=1e-10, atol=1e-12)
    # gradients too are the matching columns
    torch.testing.assert_close(
        last.per_example_grads((X, y)), full.per_example_grads((X, y))[:, start:stop], rtol=1e-12, atol=1e-14
    )
    # a non-contiguous selection by wildcard: both weight matrices
    weights = FunctionalModel(prepare_model(model, torch.float64), task, params="*.weight")
    idx = torch.cat(
        [
            torch.arange(sl["0.weight"].start, sl["0.weight"].stop),
            torch.arange(sl["2.weight"].start, sl["2.weight"].stop),
        ]
    )
    torch.testing.assert_close(weights.dense_hessian(source), H_full[idx][:, idx], rtol=1e-10, atol=1e-12)
    G_full = full.dense_gauss_newton(source)
    torch.testing.assert_close(
        last.dense_gauss_newton(source), G_full[start:stop, start:stop], rtol=1e-10, atol=1e-12
    )


def test_params_selection_unknown_name_raises(make_mlp):
    with pytest.raises(ValueError, match=r"params='nope'.*available names"):
        FunctionalModel(make_mlp(), ClassificationTask(), params="nope")


def test_model_in_eval_mode_for_gradients(classification_data):
    """Dropout must be off: gradients are deterministic and match a dropout-free model."""
    X, y = classification_data
    torch.manual_seed(0)
    with_dropout = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 3)
    ).double()
    with_dropout.train()
    plain = torch.nn.Sequential(with_dropout[0], torch.nn.Identity(), with_dropout[2])
    fm = FunctionalModel(prepare_model(with_dropout, torch.float64), ClassificationTask())
    ref = FunctionalModel(prepare_model(plain, torch.float64), ClassificationTask())
    torch.testing.assert_close(fm.per_example_grads((X, y)), ref.per_example_grads((X, y)))
    assert with_dropout.training  # the user's model is untouched


class ScalarLossTask(Task):
    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)  # mean over the batch: wrong


def test_scalar_loss_is_rejected(make_linear, regression_data):
    X, y = regression_data
    fm = FunctionalModel(prepare_model(make_linear(), torch.float64), ScalarLossTask())
    with pytest.raises(ValueError, match=r"one value per example.*reduction='none'"):
        fm.per_example_grads((X, y))


def test_per_example_gradients_of_a_big_model_are_computed_a_few_examples_at_a_time(monkeypatch, caplog):
    """The pass is split when the batch's gradient copies would exceed PER_EXAMPLE_BYTES; the rows are the same."""
    import logging

    from datatrace.gradients import functional

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    X, y = torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3
    fmodel = functional.FunctionalModel(model, ClassificationTask())
    whole = fmodel.per_example_grads((X, y))
    per_example = functional.PER_EXAMPLE_COPIES * fmodel.num_params * 8
    monkeypatch.setattr(functional, "PER_EXAMPLE_BYTES", 3 * per_example)
    split = functional.FunctionalModel(model, ClassificationTask())
    assert split.rows_per_pass() == 3
    with caplog.at_level(logging.INFO, logger="datatrace.gradients.functional"):
        rows = split.per_example_grads((X, y))
    assert torch.allclose(rows, whole, rtol=1e-12, atol=1e-14)
    assert "3 examples at a time" in caplog.text
