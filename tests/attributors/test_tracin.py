"""TracIn against closed forms: one gradient step with and without an example, and plain autograd dot products."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

from datatrace import ClassificationTask, NotFittedError, RegressionTask, Scores
from datatrace.attributors.tracin import TracIn, load_checkpoint

# -- independent helpers (autograd only, no datatrace code) ------------------------------------------------------


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state_of(model).items()
    }


def autograd_rows(model, state, loss_fn, X, y) -> torch.Tensor:
    """Per-example gradients, one autograd call per example, flattened in named_parameters order."""
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    rows = []
    for j in range(X.shape[0]):
        out = functional_call(model, params, (X[j : j + 1],))
        (loss,) = loss_fn(out, y[j : j + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def sq(out, y):
    return ((out - y) ** 2).sum(dim=1)


def mean_loss(model, state, loss_fn, X, y, weights=None) -> torch.Tensor:
    out = functional_call(model, state, (X,))
    losses = loss_fn(out, y)
    if weights is not None:
        losses = losses * weights
    return losses.sum() / X.shape[0]


def gd_step(model, state, loss_fn, X, y, eta, wd, weights=None) -> dict[str, torch.Tensor]:
    """theta - eta * grad[(1/n) sum_j w_j l_j + wd/2 ||theta||^2]: one full-batch step on mean losses."""
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    objective = mean_loss(model, params, loss_fn, X, y, weights)
    objective = objective + 0.5 * wd * sum((p * p).sum() for p in params.values())
    grads = torch.autograd.grad(objective, list(params.values()))
    return {k: (p - eta * g).detach() for (k, p), g in zip(params.items(), grads)}


# -- the closed form: one full-batch gradient step -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_one_gradient_step_first_order_effect(kind, classification_data, regression_data, make_mlp):
    """From one checkpoint, take a full-batch GD step with and without example i (its term dropped, 1/n kept).
    The actual change of the query loss after the step, divided by TracIn's score with that eta, tends to 1 as
    eta -> 0, with an error that shrinks linearly in eta; the sign says removal raises the loss of a proponent."""
    if kind == "classification":
        X, y = classification_data
        model, task, loss_fn = make_mlp(seed=3), ClassificationTask(weight_decay=0.01), ce
    else:
        X, y = regression_data
        model, task, loss_fn = make_mlp(k=1, seed=4), RegressionTask(weight_decay=0.01), sq
    n = X.shape[0]
    Xq, yq = X[:3] + 0.1, y[:3]
    theta0 = state_of(model)
    train_ids = [0, 5, 17]
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        tracin = TracIn(model, task, [theta0], [eta], batch_size_train="full", progress=False).fit((X, y))
        predicted = tracin.score((Xq, yq)).values[:, train_ids]
        theta1 = gd_step(model, theta0, loss_fn, X, y, eta, 0.01)
        base = loss_fn(functional_call(model, theta1, (Xq,)), yq)
        actual = torch.empty_like(predicted)
        for col, i in enumerate(train_ids):
            weights = torch.ones(n, dtype=X.dtype)
            weights[i] = 0.0
            theta1_minus_i = gd_step(model, theta0, loss_fn, X, y, eta, 0.01, weights)
            actual[:, col] = loss_fn(functional_call(model, theta1_minus_i, (Xq,)), yq) - base
        errors.append(float((actual / predicted - 1).abs().max()))
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1]  # first order: error ~ eta


def test_scores_are_weighted_gradient_dot_products(classification_data, make_mlp):
    """Several checkpoints: score = sum_c eta_c / B * G_q(theta_c) G_train(theta_c)^T with plain autograd rows."""
    X, y = classification_data
    model = make_mlp(seed=1)
    ckpts = [perturbed(model, 0.3, s) for s in range(3)]
    rates, B = [0.5, 0.2, 0.05], 8
    Xq, yq = X[:4] * 0.9, y[:4]
    tracin = TracIn(
        model, ClassificationTask(), ckpts, rates, batch_size_train=B, batch_size=7, progress=False
    )
    scores = tracin.fit((X, y)).score((Xq, yq))
    expected = torch.zeros(4, X.shape[0], dtype=torch.float64)
    self_expected = torch.zeros(X.shape[0], dtype=torch.float64)
    for state, rate in zip(ckpts, rates):
        G = autograd_rows(model, state, ce, X, y)
        Q = autograd_rows(model, state, ce, Xq, yq)
        expected += rate / B * Q @ G.T
        self_expected += rate / B * (G * G).sum(dim=1)
    assert isinstance(scores, Scores)
    assert scores.values.shape == (4, X.shape[0])
    torch.testing.assert_close(scores.values, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tracin.self_influence(), self_expected, rtol=1e-10, atol=1e-14)
    # self-influence is the diagonal of the train x train scores (measurement = loss)
    torch.testing.assert_close(
        tracin.score((X, y)).values.diagonal(), tracin.self_influence(), rtol=1e-12, atol=0
    )
    assert scores.metadata["estimator"] == "TracIn"
    assert scores.metadata["step_weights"] == pytest.approx([r / B for r in rates])


def test_full_batch_equals_explicit_n_and_scalar_rate(regression_data, make_linear):
    X, y = regression_data
    model = make_linear()
    ckpts = [perturbed(model, 0.5, 0), perturbed(model, 0.5, 1)]
    full = TracIn(model, RegressionTask(), ckpts, 0.1, batch_size_train="full", progress=False).fit((X, y))
    explicit = TracIn(model, RegressionTask(), ckpts, [0.1, 0.1], batch_size_train=len(X), progress=False)
    explicit.fit((X, y))
    torch.testing.assert_close(full.score((X[:3], y[:3])).values, explicit.score((X[:3], y[:3])).values)
    folded = TracIn(model, RegressionTask(), ckpts, 0.1 / len(X), batch_size_train=1, progress=False).fit(
        (X, y)
    )
    torch.testing.assert_close(full.self_influence(), folded.self_influence(), rtol=1e-12, atol=0)


def test_params_scope_restricts_the_gradient(classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp(seed=2)
    ckpts = [perturbed(model, 0.2, 5)]
    tracin = TracIn(model, ClassificationTask(), ckpts, [1.0], batch_size_train=1, params="2", progress=False)
    values = tracin.fit((X, y)).score((X[:2], y[:2])).values
    G = autograd_rows(model, ckpts[0], ce, X, y)[:, -15:]  # layer "2": weight (3x4) and bias (3)
    Q = autograd_rows(model, ckpts[0], ce, X[:2], y[:2])[:, -15:]
    torch.testing.assert_close(values, Q @ G.T, rtol=1e-10, atol=1e-14)
    assert tracin.train_grads_.shape == (1, X.shape[0], 15)


def test_user_model_is_not_modified(classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp(seed=2)
    before = state_of(model)
    TracIn(
        model, ClassificationTask(), [perturbed(model, 1.0, 0)], [0.1], batch_size_train=4, progress=False
    ).fit((X, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- projections ---------------------------------------------------------------------------------------------------


class GaussianProjector:
    """A fixed Gaussian map R^p -> R^k scaled by 1/sqrt(k) (duck-typed, as datatrace's projectors)."""

    def __init__(self, p: int, k: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(p, k, generator=g, dtype=torch.float64) / k**0.5

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.matrix


def test_projector_is_applied_to_train_and_query_rows(classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp(seed=1)
    ckpts = [perturbed(model, 0.3, 0), perturbed(model, 0.3, 1)]
    p = sum(v.numel() for v in model.parameters())
    proj = GaussianProjector(p, 6)
    tracin = TracIn(
        model, ClassificationTask(), ckpts, [0.1, 0.2], batch_size_train=2, projector=proj, progress=False
    )
    values = tracin.fit((X, y)).score((X[:3], y[:3])).values
    expected = sum(
        rate
        / 2
        * (autograd_rows(model, s, ce, X[:3], y[:3]) @ proj.matrix)
        @ (autograd_rows(model, s, ce, X, y) @ proj.matrix).T
        for s, rate in zip(ckpts, [0.1, 0.2])
    )
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-14)
    assert tracin.train_grads_.shape == (2, X.shape[0], 6)
    assert tracin.score((X[:1], y[:1])).metadata["projected_dim"] == 6


def test_orthogonal_projector_changes_nothing_and_callables_work(regression_data, make_mlp):
    X, y = regression_data
    model = make_mlp(k=1, seed=0)
    p = sum(v.numel() for v in model.parameters())
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ckpts = [perturbed(model, 0.2, 3)]
    plain = TracIn(model, RegressionTask(), ckpts, [0.1], batch_size_train=5, progress=False).fit((X, y))
    rotated = TracIn(
        model, RegressionTask(), ckpts, [0.1], batch_size_train=5, projector=lambda g: g @ q, progress=False
    )
    rotated.fit((X, y))
    torch.testing.assert_close(rotated.score((X[:4], y[:4])).values, plain.score((X[:4], y[:4])).values)


def test_random_projector_of_the_library(classification_data, make_mlp):
    """datatrace's RandomProjector: refitted at each checkpoint to the same matrix P, scores = sum_c w_c (P^T q)(P^T g)."""
    projection = pytest.importorskip("datatrace.projection")
    X, y = classification_data
    model = make_mlp(d=3, h=8, k=3, seed=0)
    ckpts = [perturbed(model, 0.2, 0), perturbed(model, 0.2, 1)]
    proj = projection.RandomProjector(dim=10, random_state=3)
    tracin = TracIn(
        model, ClassificationTask(), ckpts, [0.3, 0.1], batch_size_train=2, projector=proj, progress=False
    )
    values = tracin.fit((X, y)).score((X[:3], y[:3])).values
    assert not hasattr(proj, "dim_")  # the user's projector is copied, not fitted in place
    P = tracin.projector_.matrix().to(torch.float64)
    assert P.shape == (sum(v.numel() for v in model.parameters()), 10)
    expected = sum(
        rate / 2 * (autograd_rows(model, s, ce, X[:3], y[:3]) @ P) @ (autograd_rows(model, s, ce, X, y) @ P).T
        for s, rate in zip(ckpts, [0.3, 0.1])
    )
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-13)
    meta = tracin.score((X[:1], y[:1])).metadata
    assert meta["projected_dim"] == 10 and meta["projection"]["type"] == "RandomProjector"


def test_random_projection_estimates_the_full_scores(classification_data, make_mlp):
    projection = pytest.importorskip("datatrace.projection")
    X, y = classification_data
    model = make_mlp(d=3, h=32, k=3, seed=0)  # p = 227
    ckpts = [perturbed(model, 0.2, 0)]
    plain = TracIn(model, ClassificationTask(), ckpts, [1.0], batch_size_train=1, progress=False).fit((X, y))
    proj = projection.RandomProjector(dim=200, random_state=0)
    projected = TracIn(
        model, ClassificationTask(), ckpts, [1.0], batch_size_train=1, projector=proj, progress=False
    )
    projected.fit((X, y))
    exact, approx = plain.score((X[:5], y[:5])).values, projected.score((X[:5], y[:5])).values
    assert float(torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]) > 0.9
    ratio = projected.self_influence() / plain.self_influence()
    assert abs(float(ratio.mean()) - 1.0) < 0.1  # E ||P^T g||^2 = ||g||^2


def test_factorized_projector_never_needs_full_gradients(classification_data, make_mlp):
    """LoGra's projected VJPs equal the Kronecker projection of the full gradient (the projector's own project())."""
    projection = pytest.importorskip("datatrace.projection")
    X, y = classification_data
    model = make_mlp(d=3, h=8, k=3, seed=0)
    ckpts = [perturbed(model, 0.2, 0), perturbed(model, 0.2, 1)]
    proj = projection.FactorizedProjector(dim_in=3, dim_out=2, random_state=1)
    tracin = TracIn(
        model, ClassificationTask(), ckpts, [0.3, 0.1], batch_size_train=2, projector=proj, progress=False
    )
    values = tracin.fit((X, y)).score((X[:3], y[:3])).values
    reference = tracin.projector_  # fitted to the last checkpoint; its map is the same at every checkpoint
    expected = sum(
        rate
        / 2
        * reference.project(autograd_rows(model, s, ce, X[:3], y[:3]))
        @ reference.project(autograd_rows(model, s, ce, X, y)).T
        for s, rate in zip(ckpts, [0.3, 0.1])
    )
    torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-12)


# -- checkpoints from files ----------------------------------------------------------------------------------------


def test_checkpoints_from_torch_save_and_safetensors_files(tmp_path, classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp(seed=1)
    ckpts = [perturbed(model, 0.3, s) for s in range(2)]
    pt = tmp_path / "epoch0.pt"
    torch.save(ckpts[0], pt)
    st = tmp_path / "epoch1.safetensors"
    save_file({k: v.float().contiguous() for k, v in ckpts[1].items()}, str(st))  # float32 on disk
    st_other_suffix = tmp_path / "epoch1.bin"
    save_file({k: v.contiguous() for k, v in ckpts[1].items()}, str(st_other_suffix))
    in_memory = TracIn(model, ClassificationTask(), ckpts, [0.1, 0.1], batch_size_train=4, progress=False)
    from_files = TracIn(
        model, ClassificationTask(), [pt, str(st)], [0.1, 0.1], batch_size_train=4, progress=False
    )
    a = in_memory.fit((X, y)).score((X[:3], y[:3])).values
    b = from_files.fit((X, y)).score((X[:3], y[:3])).values
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)  # the safetensors copy was float32
    assert load_checkpoint(st_other_suffix).keys() == ckpts[1].keys()
    assert from_files.train_grads_.dtype == torch.float64


def test_pickled_objects_are_refused(tmp_path, make_mlp):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*never unpickles"):
        load_checkpoint(path, "checkpoints[0]")


def test_nested_training_checkpoint_gets_a_hint(tmp_path, make_mlp):
    model = make_mlp()
    path = tmp_path / "trainer.pt"
    torch.save({"model": model.state_dict(), "epoch": torch.tensor(3)}, path)
    with pytest.raises(ValueError, match=r"nested under \['model'\].*\['model'\]"):
        load_checkpoint(path, "checkpoints[0]")


def test_missing_file_is_reported_before_any_work(tmp_path, classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp()
    tracin = TracIn(
        model, ClassificationTask(), [state_of(model), tmp_path / "nope.pt"], [0.1, 0.1], batch_size_train=1
    )
    with pytest.raises(FileNotFoundError, match=r"checkpoints\[1\].*nope\.pt.*not an existing file"):
        tracin.fit((X, y))


def test_mismatched_checkpoint_keys_are_named(classification_data, make_mlp):
    X, y = classification_data
    model = make_mlp()
    missing = state_of(model)
    del missing["2.weight"]
    tracin = TracIn(model, ClassificationTask(), [missing], [0.1], batch_size_train=1, progress=False)
    with pytest.raises(
        ValueError, match=r"checkpoints\[0\] lacks the parameter\(s\) in scope \['2.weight'\]"
    ):
        tracin.fit((X, y))
    extra = {**state_of(model), "3.weight": torch.zeros(2)}
    tracin = TracIn(model, ClassificationTask(), [extra], [0.1], batch_size_train=1, progress=False)
    with pytest.raises(ValueError, match=r"does not know \['3.weight'\]"):
        tracin.fit((X, y))
    ddp = {"module." + k: v for k, v in state_of(model).items()}
    tracin = TracIn(model, ClassificationTask(), [ddp], [0.1], batch_size_train=1, progress=False)
    with pytest.raises(ValueError, match=r"lacks.*'0.weight'.*'module.0.weight'.*DistributedDataParallel"):
        tracin.fit((X, y))
    wrong = {**state_of(model), "0.bias": torch.zeros(7, dtype=torch.float64)}
    tracin = TracIn(model, ClassificationTask(), [wrong], [0.1], batch_size_train=1, progress=False)
    with pytest.raises(ValueError, match=r"wrong shape \(0.bias: \(7,\) instead of \(4,\)\)"):
        tracin.fit((X, y))


def test_out_of_scope_entries_may_be_left_out_with_a_warning(classification_data, make_mlp, caplog):
    X, y = classification_data
    model = make_mlp()
    ckpt = {k: v for k, v in perturbed(model, 0.2, 0).items() if k.startswith("2.")}
    tracin = TracIn(
        model, ClassificationTask(), [ckpt], [1.0], batch_size_train=1, params="2", progress=False
    )
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.tracin"):
        values = tracin.fit((X, y)).score((X[:2], y[:2])).values
    assert "0.weight" in caplog.text
    full = {**state_of(model), **ckpt}
    G = autograd_rows(model, full, ce, X, y)[:, -15:]
    Q = autograd_rows(model, full, ce, X[:2], y[:2])[:, -15:]
    torch.testing.assert_close(values, Q @ G.T, rtol=1e-10, atol=1e-14)


# -- argument validation -------------------------------------------------------------------------------------------


def test_learning_rates_length_mismatch(make_mlp):
    model = make_mlp()
    ckpts = [state_of(model)] * 3
    with pytest.raises(
        ValueError, match=r"learning_rates=\[0.1, 0.1\].*3 checkpoint\(s\) but 2 rate\(s\).*Fix"
    ):
        TracIn(model, ClassificationTask(), ckpts, [0.1, 0.1], batch_size_train=1)
    with pytest.raises(ValueError, match=r"learning_rates\[1\]=-0.1.*finite number >= 0"):
        TracIn(model, ClassificationTask(), ckpts, [0.1, -0.1, 0.1], batch_size_train=1)
    with pytest.raises(ValueError, match=r"learning_rates\[0\]='fast'"):
        TracIn(model, ClassificationTask(), ckpts, ["fast", 0.1, 0.1], batch_size_train=1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size_train": 0}, r"batch_size_train=0.*integer >= 1"),
        ({"batch_size_train": "all"}, r"batch_size_train='all'.*'full'"),
        ({"batch_size_train": 1, "projector": 3}, r"projector=3.*project\(grads\)"),
        ({"batch_size_train": 1, "dtype": torch.int64}, r"dtype=torch.int64"),
        ({"batch_size_train": 1, "batch_size": -2}, r"batch_size=-2"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, pattern, make_mlp):
    model = make_mlp()
    with pytest.raises(ValueError, match=pattern):
        TracIn(model, ClassificationTask(), [state_of(model)], [0.1], **kwargs)


def test_bad_checkpoint_containers(make_mlp):
    model = make_mlp()
    with pytest.raises(ValueError, match=r"wrap a single checkpoint in a list"):
        TracIn(model, ClassificationTask(), state_of(model), [0.1], batch_size_train=1)
    with pytest.raises(ValueError, match=r"checkpoints=\[\].*at least one"):
        TracIn(model, ClassificationTask(), [], [], batch_size_train=1)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]=3"):
        TracIn(model, ClassificationTask(), [state_of(model), 3], [0.1, 0.1], batch_size_train=1)
    with pytest.raises(TypeError, match="batch_size_train"):
        TracIn(
            model, ClassificationTask(), [state_of(model)], [0.1]
        )  # required: a wrong B rescales everything


def test_not_fitted(make_mlp):
    model = make_mlp()
    tracin = TracIn(model, ClassificationTask(), [state_of(model)], [0.1], batch_size_train=1)
    with pytest.raises(NotFittedError, match=r"call \.fit\(train\)"):
        tracin.score((torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)))
    with pytest.raises(NotFittedError):
        tracin.self_influence()


def test_data_that_does_not_fit_the_model_is_explained(classification_data, make_mlp):
    _, y = classification_data
    model = make_mlp()
    tracin = TracIn(model, ClassificationTask(), [state_of(model)], [0.1], batch_size_train=1, progress=False)
    with pytest.raises(
        ValueError, match=r"batch of train data at checkpoint 0 failed.*shapes \[\(60, 5\), \(60,\)\]"
    ):
        tracin.fit((torch.zeros(60, 5, dtype=torch.float64), y))
