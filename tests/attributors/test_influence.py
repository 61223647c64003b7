"""InfluenceFunction against closed forms (OLS, ridge), exact leave-one-out and actual retraining, plus bad input.

Conventions (datatrace.tasks / design notes): L(theta) = (1/n) sum_i l_i + sum_b lambda_b/2 ||theta_b||^2, H its
Hessian, params_change_i = (1/n) H^{-1} g_i ~ theta_{-i} - theta_hat and score[q, i] = grad f_q^T params_change_i.
RegressionTask's loss is (x^T w - y)^2 (no 1/2), so H = (2/n) X^T X + lambda I and g_i = 2 r_i x_i, r = Xw - y.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from datatrace import ClassificationTask, InfluenceFunction, NotFittedError, RegressionTask, Scores, Task
from datatrace.curvature import ExactHessian, GaussNewton
from datatrace.linalg import dof_damping
from datatrace.verification.training import fit_full_batch

F64 = torch.float64


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_change(change: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    """Rows of a params_change dict, flattened in the model's parameter order: shape (m, p)."""
    return torch.cat(
        [change[name].reshape(change[name].shape[0], -1) for name, _ in model.named_parameters()], 1
    )


def ridge_problem(n=30, d=3, lam=0.4, seed=0, bias=False):
    """A linear model set to the exact minimiser of (1/n) sum (x^T w - y)^2 + lam/2 ||w||^2 (closed form)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 0.5][:d], dtype=F64) + 0.3
    y = X @ torch.randn(d, 1, generator=g, dtype=F64) + 0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=bias).double()
    w = torch.linalg.solve(X.T @ X + n * lam / 2 * torch.eye(d, dtype=F64), X.T @ y)
    with torch.no_grad():
        model.weight.copy_(w.T)
    return model, X, y, w


# -- closed forms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_ridge_params_change_and_score_match_closed_form(lam):
    n = 30
    model, X, y, w = ridge_problem(n=n, lam=lam)
    g = torch.Generator().manual_seed(9)
    Xq = torch.randn(4, 3, generator=g, dtype=F64)
    yq = torch.randn(4, 1, generator=g, dtype=F64)
    inf = InfluenceFunction(model, RegressionTask(weight_decay=lam), progress=False).fit((X, y))

    H = 2 / n * X.T @ X + lam * torch.eye(3, dtype=F64)
    r = X @ w - y  # (n, 1)
    G = 2 * r * X  # per-example gradients (n, d)
    delta = torch.linalg.solve(H, G.T).T / n  # (n, d): theta_{-i} - theta_hat
    Gq = 2 * (Xq @ w - yq) * Xq
    expected_scores = Gq @ delta.T

    change = inf.params_change(range(n))
    assert set(change) == {"weight"} and change["weight"].shape == (n, 1, 3)
    torch.testing.assert_close(change["weight"][:, 0], delta, rtol=1e-8, atol=1e-14)
    scores = inf.score((Xq, yq))
    assert isinstance(scores, Scores) and scores.values.shape == (4, n)
    torch.testing.assert_close(scores.values, expected_scores, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(inf.train_grads_, G, rtol=1e-10, atol=1e-14)
    # self-influence (1/n) g_i^T H^{-1} g_i, by hand
    torch.testing.assert_close(inf.self_influence(), (G * delta).sum(1), rtol=1e-8, atol=1e-14)
    assert inf.gradient_norm_ < 1e-10


def test_ols_influence_is_first_order_exact_leave_one_out():
    """Exact OLS LOO: theta_{-i} - theta_hat = (X^T X)^{-1} x_i r_i / (1 - h_ii) (Sherman-Morrison), while the
    influence function gives (X^T X)^{-1} x_i r_i: their ratio is exactly 1 - h_ii -> 1 for low leverage."""
    n = 200
    model, X, y, w = ridge_problem(n=n, lam=0.0, seed=1)
    inf = InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))
    idx = list(range(0, n, 10))
    est = inf.params_change(idx)["weight"][:, 0]  # (m, d)

    h = torch.einsum("ij,jk,ik->i", X, torch.linalg.inv(X.T @ X), X)
    refit = []
    for i in idx:
        keep = torch.arange(n) != i
        refit.append(torch.linalg.lstsq(X[keep], y[keep]).solution[:, 0] - w[:, 0])
    exact = torch.stack(refit)
    # Sherman-Morrison identity ties the two exactly
    torch.testing.assert_close(est / (1 - h[idx, None]), exact, rtol=1e-8, atol=1e-13)
    # first order: the ratio |est| / |exact| is 1 - h_ii, close to 1 for these low-leverage points
    ratio = est.norm(dim=1) / exact.norm(dim=1)
    assert h.max() < 0.1
    torch.testing.assert_close(ratio, 1 - h[idx], rtol=1e-8, atol=0)
    assert (ratio - 1).abs().max() < 0.1
    # same direction
    assert torch.all((est * exact).sum(1) > 0.999 * est.norm(dim=1) * exact.norm(dim=1))


def test_weight_decay_mapping_with_unpenalised_bias_matches_closed_form():
    n, d, lam = 40, 3, 0.6
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, d, generator=g, dtype=F64) + 1.0
    y = X @ torch.randn(d, 1, generator=g, dtype=F64) + 2.0 + 0.3 * torch.randn(n, 1, generator=g, dtype=F64)
    Xt = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
    D = torch.diag(torch.tensor([lam] * d + [0.0], dtype=F64))
    wt = torch.linalg.solve(Xt.T @ Xt + n / 2 * D, Xt.T @ y)  # (d+1, 1)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(wt[:d].T)
        model.bias.copy_(wt[d])
    inf = InfluenceFunction(model, RegressionTask(weight_decay={"weight": lam}), progress=False).fit((X, y))
    assert inf.gradient_norm_ < 1e-10  # the mapping's objective is the one the closed form minimised

    H = 2 / n * Xt.T @ Xt + D
    G = 2 * (Xt @ wt - y) * Xt
    delta = torch.linalg.solve(H, G.T).T / n
    change = inf.params_change(torch.arange(n))
    torch.testing.assert_close(change["weight"][:, 0], delta[:, :d], rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(change["bias"][:, 0], delta[:, d], rtol=1e-8, atol=1e-14)
    # a float weight decay would penalise the bias too and give a different answer
    other = InfluenceFunction(model, RegressionTask(weight_decay=lam), progress=False).fit((X, y))
    assert not torch.allclose(other.params_change([0])["bias"], change["bias"][:1])


def test_gauss_newton_equals_exact_on_linear_least_squares():
    model, X, y, _ = ridge_problem(lam=0.2, seed=3)
    task = RegressionTask(weight_decay=0.2)
    exact = InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, y))
    gn = InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit((X, y))
    torch.testing.assert_close(
        gn.score((X[:5], y[:5])).values, exact.score((X[:5], y[:5])).values, rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(gn.curvature_.matrix_, exact.curvature_.matrix_, rtol=1e-12, atol=1e-14)


# -- properties --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logreg():
    """L2 multinomial logistic regression trained to a tight minimum, and its fitted InfluenceFunction (shared by
    the tests of this module, which only read it)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 3
    X = torch.eye(3, dtype=F64)[y] * 1.5 + torch.randn(60, 3, generator=g, dtype=F64)
    task = ClassificationTask(weight_decay=0.05)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(3, 3).double(), task, (X, y), tolerance_grad=1e-10, max_iter=1000)
    return model, task, X, y, InfluenceFunction(model, task, progress=False).fit((X, y))


def test_self_influence_positive_and_equals_diagonal_of_train_scores(logreg):
    _, _, X, y, inf = logreg
    si = inf.self_influence()
    assert si.shape == (len(X),)
    assert torch.all(si > 0)
    torch.testing.assert_close(si, torch.diagonal(inf.score((X, y)).values), rtol=1e-10, atol=1e-15)


def test_removal_params_is_sum_of_params_change(logreg):
    model, _, _, _, inf = logreg
    idx = [3, 7, 12, 11, -1]  # any order; negative indices count from the end
    rows = inf.params_change(idx)
    group = inf.removal_params(idx)
    assert set(group) == {"weight", "bias"}
    for name, p in model.named_parameters():
        assert rows[name].shape == (5, *p.shape)
        assert group[name].shape == p.shape
        torch.testing.assert_close(group[name], rows[name].sum(0), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(rows["bias"][4], inf.params_change([len(inf.train_grads_) - 1])["bias"][0])


def test_user_model_is_not_modified_and_float32_model_works(classification_data):
    X, y = classification_data
    torch.manual_seed(0)
    model = nn.Linear(3, 3)  # float32
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    inf = InfluenceFunction(model, ClassificationTask(weight_decay=0.1), progress=False).fit((X.float(), y))
    assert inf.train_grads_.dtype == F64
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_all_input_kinds_give_identical_scores_in_index_order():
    model, X, y, _ = ridge_problem(n=23, lam=0.3, seed=4)
    task = RegressionTask(weight_decay=0.3)
    Xq, yq = X[:6] + 0.1, y[:6]
    torch.manual_seed(123)
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True)
    assert not torch.equal(torch.cat([b[1] for b in loader]), y)  # the loader itself does shuffle
    kinds = {
        "tensors": (X, y),
        "numpy": (X.numpy(), y.numpy()),
        "dataset": TensorDataset(X, y),
        "shuffled loader": loader,
    }
    queries = {
        "tensors": (Xq, yq),
        "numpy": (Xq.numpy(), yq.numpy()),
        "dataset": TensorDataset(Xq, yq),
        "shuffled loader": DataLoader(TensorDataset(Xq, yq), batch_size=4, shuffle=True),
    }
    ref = InfluenceFunction(model, task, progress=False).fit((X, y))
    ref_values = ref.score((Xq, yq)).values
    # not symmetric in the train index, so a permutation would be caught
    assert (ref_values[:, 1:] - ref_values[:, :-1]).abs().min() > 0
    for name, train in kinds.items():
        inf = InfluenceFunction(model, task, progress=False).fit(train)
        torch.testing.assert_close(inf.train_grads_, ref.train_grads_, rtol=0, atol=0, msg=name)
        for qname, query in queries.items():
            torch.testing.assert_close(
                inf.score(query).values, ref_values, rtol=1e-12, atol=0, msg=f"{name}/{qname}"
            )
        torch.testing.assert_close(inf.self_influence(), ref.self_influence(), rtol=1e-12, atol=0)


def test_batch_size_does_not_change_scores(logreg):
    model, task, X, y, inf = logreg
    small = InfluenceFunction(model, task, batch_size=7, progress=False).fit((X, y))
    torch.testing.assert_close(
        small.score((X[:4], y[:4])).values, inf.score((X[:4], y[:4])).values, rtol=1e-10, atol=1e-15
    )


def test_non_minimum_model_warns_with_gradient_norm_and_still_scores(classification_data, caplog):
    X, y = classification_data
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()  # untrained
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        inf = InfluenceFunction(model, ClassificationTask(weight_decay=0.1), progress=False).fit((X, y))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "not at a minimum" in text and "||grad L||" in text
    assert f"{inf.gradient_norm_:.3g}" in text
    assert inf.gradient_norm_ > 1e-2
    values = inf.score((X[:3], y[:3])).values
    assert values.shape == (3, len(X)) and torch.isfinite(values).all()
    assert values.abs().max() > 0
    assert inf.score((X[:3], y[:3])).metadata["gradient_norm"] == inf.gradient_norm_


def test_minimum_model_does_not_warn(logreg, caplog):
    model, task, X, y, _ = logreg
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        InfluenceFunction(model, task, progress=False).fit((X, y))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- actual retraining -------------------------------------------------------------------------------------------


def _retrain_problem():
    g = torch.Generator().manual_seed(0)
    n, lam = 100, 0.2
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=F64)
    y = torch.arange(n) % 3
    X = centres[y] * 1.5 + torch.randn(n, 2, generator=g, dtype=F64)
    yq = torch.arange(6) % 3
    Xq = centres[yq] + torch.randn(6, 2, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = fit_full_batch(
        nn.Linear(2, 3).double(),
        ClassificationTask(weight_decay=lam),
        (X, y),
        tolerance_grad=1e-10,
        max_iter=1000,
    )
    return model, X, y, Xq, yq, lam


def _loo(model, task, X, y, Xq, yq, remove):
    base_loss = task.loss(model, (Xq, yq)).detach()
    loss_change, param_change = [], []
    for i in remove:
        keep = torch.arange(len(X)) != i
        m = fit_full_batch(model, task, (X[keep], y[keep]), tolerance_grad=1e-10, max_iter=1000)
        loss_change.append(task.loss(m, (Xq, yq)).detach() - base_loss)
        param_change.append(flat(m) - flat(model))
    return torch.stack(loss_change, 1), torch.stack(param_change)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.mark.slow
def test_matches_actual_leave_one_out_retraining_on_logistic_regression(caplog):
    """Sign and units against actual retraining (L2 multinomial logistic regression, exact Hessian).

    The influence function linearises removal at fixed normalisation: the eps = -1 objective is
    (1/n) sum_{j != i} l_j + lam/2 ||theta||^2, whose minimiser is the minimiser of the retraining objective on the
    n - 1 remaining points with weight decay lam * n / (n - 1). That is the retrain compared here.
    """
    model, X, y, Xq, yq, lam = _retrain_problem()
    n = len(X)
    task = ClassificationTask(weight_decay=lam)
    inf = InfluenceFunction(model, task, progress=False).fit((X, y))
    si = inf.self_influence()
    remove = [*torch.argsort(si, descending=True)[:2].tolist(), 0, 1, 2, 3, 4, 5]
    with caplog.at_level(logging.ERROR):  # L-BFGS stopping at 1e-9 instead of 1e-10 is fine here
        actual_loss, actual_params = _loo(
            model, ClassificationTask(weight_decay=lam * n / (n - 1)), X, y, Xq, yq, remove
        )
    pred_loss = inf.score((Xq, yq)).values[:, remove]
    pred_params = flat_change(inf.params_change(remove), model)

    assert _pearson(pred_loss, actual_loss) > 0.99
    assert _pearson(pred_params, actual_params) > 0.99
    # units: least-squares slope of predicted on actual within 10% of 1, and every removal's parameter change
    slope = float((pred_loss * actual_loss).sum() / (actual_loss**2).sum())
    assert 0.9 < slope < 1.1
    rel_err = (pred_params - actual_params).norm(dim=1) / actual_params.norm(dim=1)
    assert rel_err.max() < 0.1
    # signs of the largest effects agree
    big = actual_loss.abs() > 0.2 * actual_loss.abs().max()
    assert big.sum() >= 5
    assert torch.equal(torch.sign(pred_loss[big]), torch.sign(actual_loss[big]))
    # self-influence is the removed example's own loss change
    own_loss = []
    for k, i in enumerate(remove[:3]):
        m_params = flat(model) + actual_params[k]
        m = nn.Linear(2, 3).double()
        torch.nn.utils.vector_to_parameters(m_params, m.parameters())
        own_loss.append(
            float(
                task.loss(m, (X[i : i + 1], y[i : i + 1]))[0]
                - task.loss(model, (X[i : i + 1], y[i : i + 1]))[0]
            )
        )
    torch.testing.assert_close(si[remove[:3]], torch.tensor(own_loss, dtype=F64), rtol=0.1, atol=0)


@pytest.mark.slow
def test_plain_retraining_differs_by_the_weight_decay_renormalisation_term(caplog):
    """Retraining on n - 1 points with the *same* weight decay renormalises the data term (1/(n-1)): to first order
    theta_{-i} - theta_hat = (1/n) H^{-1} (g_i + lam theta_hat), i.e. params_change plus a shift that is the same
    for every i. This pins down the convention; the shift is not small next to low-influence examples."""
    model, X, y, Xq, yq, lam = _retrain_problem()
    n = len(X)
    task = ClassificationTask(weight_decay=lam)
    inf = InfluenceFunction(model, task, progress=False).fit((X, y))
    remove = [0, 1, 2, 3]
    with caplog.at_level(logging.ERROR):
        actual_loss, actual_params = _loo(model, task, X, y, Xq, yq, remove)
    shift = inf.curvature_.solve((lam * flat(model))[None])[0] / n
    pred_params = flat_change(inf.params_change(remove), model)
    rel_err = (pred_params + shift - actual_params).norm(dim=1) / actual_params.norm(dim=1)
    assert rel_err.max() < 0.1
    pred_loss = inf.score((Xq, yq)).values[:, remove] + (inf.query_gradients((Xq, yq)) @ shift)[:, None]
    assert _pearson(pred_loss, actual_loss) > 0.99
    # the shift matters: without it some removal is off by more than 10%
    assert ((pred_params - actual_params).norm(dim=1) / actual_params.norm(dim=1)).max() > 0.1


# -- indefinite Hessian: negative-eigenvalue policies ------------------------------------------------------------


def _indefinite_mlp(classification_data):
    X, y = classification_data
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model, X, y


def _hessian_by_autograd(model, X, y, lam):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def objective(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (X,)), y) + 0.5 * lam * (theta * theta).sum()

    return torch.autograd.functional.hessian(objective, flat(model))


@pytest.mark.parametrize(
    ("negative", "damping"),
    [
        ("clip", 0.0),
        ("clip", 0.3),
        ("abs", 0.0),
        ("abs", 0.3),
        ("keep", 0.3),
        ("keep", 0.0),
        ("clip", "auto"),
    ],
)
def test_negative_eigenvalue_policies_match_hand_built_eigen_inverse(
    classification_data, negative, damping, caplog
):
    model, X, y = _indefinite_mlp(classification_data)
    lam = 0.01
    task = ClassificationTask(weight_decay=lam)
    with caplog.at_level(logging.ERROR):  # not a minimum: expected
        inf = InfluenceFunction(
            model, task, curvature=ExactHessian(damping=damping, negative=negative), progress=False
        )
        inf.fit((X, y))

    H = _hessian_by_autograd(model, X, y, lam)
    e, U = torch.linalg.eigh(H)
    assert e.min() < -1e-3 * e.max()  # really indefinite
    tol = max(len(e), 10) * torch.finfo(F64).eps * 10 * float(e.abs().max())
    d = damping
    if damping == "auto":  # away from a minimum: the effective-directions rule on the eigenvalues
        state = inf.curvature_.training_state
        assert not state.at_minimum and state.outputs == 3
        d = dof_damping(e, state.dof_target(len(e)))
        assert inf.curvature_.info["damping_rule"] == f"dof={state.dof_target(len(e)):g}"
    effective = {"clip": e.clamp(min=0), "abs": e.abs(), "keep": e}[negative] + d
    keep = (e.abs() > tol) & (effective.abs() > tol)
    assert (effective[keep].abs() > 1e-4).all()  # the comparison below is well conditioned
    phi = torch.where(keep, 1 / torch.where(keep, effective, torch.ones_like(effective)), torch.zeros_like(e))
    H_inv = U @ torch.diag(phi) @ U.T

    assert inf.curvature_.damping_ == pytest.approx(d, rel=1e-10)
    assert inf.curvature_.info["num_negative"] == int((e < -tol).sum()) > 0
    Q = inf.query_gradients((X[:5], y[:5]))
    expected = Q @ H_inv @ inf.train_grads_.T / len(X)
    torch.testing.assert_close(inf.score((X[:5], y[:5])).values, expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(inf.curvature_.solve(Q), Q @ H_inv, rtol=1e-7, atol=1e-10)
    if negative == "clip" and damping == 0.0:
        # negative directions are dropped: the solve has no component along them
        neg = U[:, e < -tol]
        assert (inf.curvature_.solve(Q) @ neg).abs().max() < 1e-8 * Q.abs().max()


def test_policies_differ_on_an_indefinite_hessian(classification_data, caplog):
    model, X, y = _indefinite_mlp(classification_data)
    results = {}
    with caplog.at_level(logging.ERROR):
        for negative in ("clip", "abs", "keep"):
            inf = InfluenceFunction(
                model,
                ClassificationTask(),
                curvature=ExactHessian(damping=0.3, negative=negative),
                progress=False,
            ).fit((X, y))
            results[negative] = inf.score((X[:3], y[:3])).values
    assert not torch.allclose(results["clip"], results["abs"])
    assert not torch.allclose(results["clip"], results["keep"])
    # "abs" keeps a positive-definite inverse: self-influence is positive
    inf = InfluenceFunction(
        model, ClassificationTask(), curvature=ExactHessian(damping=0.0, negative="abs"), progress=False
    )
    with caplog.at_level(logging.ERROR):
        inf.fit((X, y))
    assert (inf.self_influence() > 0).all()


def test_auto_damping_is_zero_for_convex_objective(logreg):
    inf = logreg[-1]
    assert inf.curvature_.damping_ == 0.0
    assert inf.curvature_.info["num_negative"] == 0
    assert inf.score((logreg[2][:2], logreg[3][:2])).metadata["curvature"]["damping"] == 0.0


def test_explicit_damping_is_added_to_the_curvature(logreg):
    model, task, X, y, inf = logreg
    damped = InfluenceFunction(model, task, damping=0.5, progress=False).fit((X, y))
    H = inf.curvature_.matrix_
    expected = torch.linalg.solve(H + 0.5 * torch.eye(len(H), dtype=F64), inf.train_grads_[:4].T).T / len(X)
    torch.testing.assert_close(
        flat_change(damped.params_change(range(4)), model), expected, rtol=1e-9, atol=1e-15
    )


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small(regression_data):
    X, y = regression_data
    torch.manual_seed(0)
    return nn.Linear(3, 1).double(), X, y


def test_wrong_input_width_names_train_and_shapes(small):
    model, X, y = small
    inf = InfluenceFunction(model, RegressionTask(), progress=False)
    with pytest.raises(
        ValueError, match=r"batch of train failed.*shapes \[\(40, 4\), \(40, 1\)\].*input width"
    ):
        inf.fit((torch.cat([X, X[:, :1]], 1), y))


def test_wrong_query_width_names_query(small, caplog):
    model, X, y = small
    with caplog.at_level(logging.ERROR):
        inf = InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))
    with pytest.raises(ValueError, match=r"batch of query failed"):
        inf.score((X[:, :2], y))


def test_mismatched_lengths_in_data_tuple(small):
    model, X, y = small
    with pytest.raises(ValueError, match=r"train has elements of different lengths \[40, 39\]"):
        InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y[:-1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_says_where(small, bad):
    model, X, y = small
    X = X.clone()
    X[5, 2] = bad
    with pytest.raises(FloatingPointError, match=r"train\[0\] contains 1 non-finite value.*index \(5, 2\)"):
        InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))
    y = y.clone()
    y[7, 0] = bad
    with pytest.raises(FloatingPointError, match=r"train\[1\].*index \(7, 0\)"):
        InfluenceFunction(model, RegressionTask(), progress=False).fit((X.nan_to_num(), y))


def test_non_finite_query_says_where(small, caplog):
    model, X, y = small
    with caplog.at_level(logging.ERROR):
        inf = InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))
    Xq = X[:3].clone()
    Xq[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"query\[0\].*index \(1, 0\)"):
        inf.score((Xq, y[:3]))


def test_nan_in_model_parameters(small):
    model, X, y = small
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model's parameters contains 1 non-finite"):
        InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))


class SqrtModel(nn.Module):
    """sqrt(w . x): finite output 0 but infinite gradient where w . x == 0."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return torch.sqrt(self.lin(x))


def test_nan_gradient_names_the_example():
    X = torch.tensor([[2.0, 1.0], [3.0, 1.0], [1.0, 1.0], [4.0, 1.0]], dtype=F64)
    y = torch.ones(4, 1, dtype=F64)
    with pytest.raises(FloatingPointError, match=r"gradient of train example 2 is not finite"):
        InfluenceFunction(SqrtModel(), RegressionTask(), progress=False).fit((X, y))


@pytest.mark.parametrize(
    "empty", [(torch.zeros(0, 3, dtype=F64), torch.zeros(0, 1, dtype=F64)), TensorDataset(torch.zeros(0, 3))]
)
def test_empty_data(small, empty):
    model, _, _ = small
    with pytest.raises(ValueError, match=r"train is empty \(0 examples\)"):
        InfluenceFunction(model, RegressionTask(), progress=False).fit(empty)


def test_indices_out_of_range(logreg):
    inf = logreg[-1]
    n = len(inf.train_grads_)
    with pytest.raises(IndexError, match=rf"indices contains {n}, out of range for {n} training examples"):
        inf.params_change([0, n])
    with pytest.raises(IndexError, match=r"indices contains -61"):
        inf.removal_params([-61])
    with pytest.raises(ValueError, match=r"indices=.*integer indices"):
        inf.params_change([0.5, 1.5])


def test_unknown_curvature_name(small):
    model, _, _ = small
    with pytest.raises(ValueError, match=r"curvature='hessian' is not allowed.*'exact'"):
        InfluenceFunction(model, RegressionTask(), curvature="hessian")


@pytest.mark.parametrize("damping", [-1.0, "big", float("nan"), float("inf"), None])
def test_bad_damping(small, damping):
    model, _, _ = small
    with pytest.raises(ValueError, match=r"damping=.*non-negative"):
        InfluenceFunction(model, RegressionTask(), damping=damping)


def test_damping_with_a_curvature_instance_is_not_silently_ignored(small):
    model, _, _ = small
    with pytest.raises(
        ValueError, match=r"damping=0.5 is not allowed.*own damping.*ExactHessian\(damping=\.\.\.\)"
    ):
        InfluenceFunction(model, RegressionTask(), curvature=ExactHessian(), damping=0.5)
    InfluenceFunction(model, RegressionTask(), curvature=ExactHessian(damping=0.5))  # the supported spelling


def test_bad_negative_policy():
    with pytest.raises(ValueError, match=r"negative='flip'.*'clip', 'abs', 'keep'"):
        ExactHessian(negative="flip")


def test_bad_task_model_and_dtype(small):
    model, _, _ = small
    with pytest.raises(ValueError, match=r"task=.*expected a datatrace.Task"):
        InfluenceFunction(model, nn.MSELoss())
    with pytest.raises(ValueError, match=r"model=.*torch.nn.Module"):
        InfluenceFunction(lambda x: x, RegressionTask())
    with pytest.raises(ValueError, match=r"dtype=.*floating"):
        InfluenceFunction(model, RegressionTask(), dtype=torch.int64)


@pytest.mark.parametrize(
    "call",
    [
        lambda inf, X, y: inf.score((X, y)),
        lambda inf, X, y: inf.self_influence(),
        lambda inf, X, y: inf.params_change([0]),
        lambda inf, X, y: inf.removal_params([0]),
        lambda inf, X, y: inf.query_gradients((X, y)),
    ],
)
def test_methods_before_fit_raise_not_fitted(small, call):
    model, X, y = small
    with pytest.raises(NotFittedError, match=r"not fitted yet.*fit\(train\)"):
        call(InfluenceFunction(model, RegressionTask()), X, y)


def test_model_too_large_for_dense_curvature(classification_data):
    X, y = classification_data
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()  # p = 31
    inf = InfluenceFunction(
        model, ClassificationTask(), curvature=ExactHessian(max_bytes=10_000), progress=False
    )
    # 3 * 31 * 31 * 8 bytes = 23,064 bytes = 22.5 KiB
    with pytest.raises(MemoryError, match=r"31 x 31.*22\.5 KiB.*9\.8 KiB.*params=.*max_bytes") as info:
        inf.fit((X, y))
    assert "exact" in str(info.value)
    with pytest.raises(MemoryError, match=r"gauss-newton"):
        InfluenceFunction(
            model, ClassificationTask(), curvature=GaussNewton(max_bytes=10_000), progress=False
        ).fit((X, y))
    # params= brings it within the budget: the last layer has 15 parameters (5,400 bytes)
    InfluenceFunction(
        model, ClassificationTask(), curvature=ExactHessian(max_bytes=10_000), params="2", progress=False
    ).fit((X, y))


class ScalarLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)  # averaged over the batch


def test_scalar_loss_task_is_rejected(small):
    model, X, y = small
    with pytest.raises(ValueError, match=r"one value per example, shape \(batch_size,\).*reduction='none'"):
        InfluenceFunction(model, ScalarLoss(), progress=False).fit((X, y))


def test_scores_metadata_is_json_ready(logreg, tmp_path):
    _, _, X, y, inf = logreg
    scores = inf.score((X[:2], y[:2]))
    meta = scores.metadata
    assert meta["estimator"] == "InfluenceFunction" and meta["n_train"] == len(X) and meta["num_params"] == 12
    assert meta["dtype"] == "torch.float64" and meta["curvature"]["route"] == "gauss-newton"  # auto's first
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in meta["curvature"].values())
    scores.save(tmp_path / "s.safetensors")
    back = Scores.load(tmp_path / "s.safetensors")
    assert back.metadata == meta


def test_auto_says_its_route_and_why_before_the_work_and_is_silenced_with_progress(logreg_problem, capsys):
    p = logreg_problem
    InfluenceFunction(p.model, p.task, progress=True).fit(p.train)
    err = capsys.readouterr().err
    line = "datatrace: curvature='auto' chose 'gauss-newton' (15 parameters: gauss-newton predicted"
    assert line in err
    assert err.index(line) < err.index("training gradients")  # before the long work starts
    InfluenceFunction(p.model, p.task, progress=False).fit(p.train)
    assert "curvature='auto'" not in capsys.readouterr().err
