"""ProjectedInfluence: exact against Gauss-Newton influence when the projection is invertible, close to it with a
few hundred dimensions, the same through a store, resumable, refusing foreign stores, and costing no training
pass for new queries."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import datatrace
from datatrace import NotFittedError
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.attributors.trak import TRAK
from datatrace.errors import StoreMismatchError
from datatrace.projection import FactorizedProjector, RandomProjector
from datatrace.verification.training import fit_full_batch


def row_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(a.shape[0])]))


@pytest.fixture(scope="module")
def logreg():
    """Multinomial logistic regression (float64) trained to a tight minimum, 4 features, 3 classes."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=g, dtype=torch.float64)
    y = (X[:, :3] + 0.7 * torch.randn(90, 3, generator=g, dtype=torch.float64)).argmax(1)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(4, 3).double(), task, (X, y), max_iter=500, tolerance_grad=1e-12)
    return model, task, (X, y), (X[:7], y[:7])


@pytest.fixture(scope="module")
def mlp_problem():
    """A small float64 MLP (p = 724) on synthetic 4-class data, roughly trained (influence formulas do not need a
    minimum to agree with each other)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(150, 10, generator=g, dtype=torch.float64)
    W = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = (X @ W + 0.5 * torch.randn(150, 4, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 48), nn.Tanh(), nn.Linear(48, 4)).double()
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    model = fit_full_batch(model, task, (X, y), max_iter=150, tolerance_grad=1e-9)
    return model, task, (X, y), (X[150 - 12 :], y[150 - 12 :])


class Counting(nn.Module):
    """Wraps a model and records the batch size of every forward call made outside torch.func transforms."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return self.inner(x)


# -- exactness -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "projector",
    [
        RandomProjector(dim=40, random_state=1),  # k > p = 15: invertible on the parameter space
        RandomProjector(dim=30, kind="rademacher", random_state=2),
        RandomProjector(dim="auto"),  # reaches p: identity
        RandomProjector(kind="identity"),
        FactorizedProjector(dim_in=100, dim_out=100),  # both sides unprojected
    ],
    ids=["gaussian-k>p", "rademacher-k>p", "auto-identity", "identity", "factorized-full"],
)
def test_invertible_projection_equals_gauss_newton_influence_exactly(logreg, projector):
    model, task, train, query = logreg
    ref = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit(train)
    expected = ref.score(query).values
    inf = ProjectedInfluence(model, task, projector=projector, dtype=torch.float64, progress=False).fit(train)
    got = inf.score(query)
    scale = float(expected.abs().max())
    assert float((got.values - expected).abs().max()) <= 1e-8 * scale
    assert torch.allclose(inf.self_influence(), ref.self_influence(), rtol=1e-8, atol=1e-10 * scale)
    assert got.metadata["estimator"] == "ProjectedInfluence" and got.metadata["damping"] == 0.0
    assert inf.info["solver"] == ("eigh" if inf.dim_ > 15 else "cholesky")  # k > p can be singular


def test_pseudo_inverse_without_regulariser_matches_gauss_newton(logreg):
    """No weight decay, no damping: the softmax's shift invariance makes the curvature singular; both routes drop
    the same null space (a pseudo-inverse) and agree."""
    model, _, train, query = logreg
    task = datatrace.ClassificationTask()
    ref = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", damping=0.0, progress=False)
    expected = ref.fit(train).score(query).values
    inf = ProjectedInfluence(
        model, task, projector=RandomProjector(dim="auto"), damping=0.0, dtype=torch.float64, progress=False
    ).fit(train)
    assert (
        inf.info["solver"] == "eigh"
        and inf.info["num_zero_dropped"] == ref.curvature_.info["num_zero_dropped"]
    )
    assert inf.info["num_zero_dropped"] >= 4
    assert float((inf.score(query).values - expected).abs().max()) <= 1e-7 * float(expected.abs().max())


def test_invertible_projection_is_exact_on_a_network_too(mlp_problem):
    """The projected GGN solve is exact whenever P has full row rank, convex or not."""
    model, task, train, query = mlp_problem
    expected = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False)
    expected = expected.fit(train).score(query).values
    inf = ProjectedInfluence(
        model, task, projector=FactorizedProjector(100, 100), dtype=torch.float64, progress=False
    )
    got = inf.fit(train).score(query).values
    assert float((got - expected).abs().max()) <= 1e-8 * float(expected.abs().max())


def test_regularizer_options_agree_when_nothing_is_projected_away(logreg, mlp_problem):
    model, task, train, query = logreg
    kwargs = {"dtype": torch.float64, "progress": False}
    a = ProjectedInfluence(model, task, projector=RandomProjector(dim=40), regularizer="projected", **kwargs)
    b = ProjectedInfluence(model, task, projector=RandomProjector(dim=40), **kwargs)
    assert torch.allclose(a.fit(train).score(query).values, b.fit(train).score(query).values, rtol=1e-9)
    model, task, train, query = mlp_problem
    a = ProjectedInfluence(model, task, projector=RandomProjector(dim=64), regularizer="projected", **kwargs)
    b = ProjectedInfluence(model, task, projector=RandomProjector(dim=64), **kwargs)
    a, b = a.fit(train), b.fit(train)
    assert a.info["regularizer"] == "projected" and b.info["regularizer"] == "rescaled"
    # the rescaled regulariser is 64/724 of the projected model's: a smaller trace
    assert b.info["regularizer_trace"] == pytest.approx(a.info["regularizer_trace"] * 64 / 724, rel=1e-12)
    with pytest.raises(ValueError, match="regularizer='ridge'"):
        ProjectedInfluence(model, task, regularizer="ridge")


def test_few_hundred_gaussian_dims_correlate_with_unprojected_gauss_newton(mlp_problem):
    model, task, train, query = mlp_problem
    ref = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False)
    ref_values = ref.fit(train).score(query).values
    for projector in (RandomProjector(dim=300, random_state=0), FactorizedProjector(dim_in=16, dim_out=16)):
        inf = ProjectedInfluence(model, task, projector=projector, dtype=torch.float64, progress=False).fit(
            train
        )
        assert inf.dim_ < 0.45 * 724
        assert row_corr(inf.score(query).values, ref_values) > 0.9


# -- store, reuse, resumption --------------------------------------------------------------------------------------


def test_store_gives_the_same_scores_and_a_second_fit_costs_no_training_pass(tmp_path, mlp_problem):
    model, task, train, query = mlp_problem
    counted = Counting(model)
    n = len(train[0])
    kwargs = {
        "projector": FactorizedProjector(8, 8),
        "dtype": torch.float64,
        "progress": False,
        "batch_size": 200,
    }
    memory = ProjectedInfluence(counted, task, **kwargs).fit(train)
    stored = ProjectedInfluence(counted, task, store_dir=tmp_path / "s", chunk_size=40, **kwargs).fit(train)
    assert stored.store_.n_chunks == 4 and stored.store_.complete
    assert torch.allclose(stored.score(query).values, memory.score(query).values, rtol=1e-10, atol=1e-14)

    # the private copies made by fit carry the counter list: count forward calls on the training set (size n)
    second = ProjectedInfluence(counted, task, store_dir=tmp_path / "s", chunk_size=40, **kwargs)
    second.fit(train)
    copy_calls = second.fmodel_.model.calls
    # fit read features and curvature from the store: no pass over the training set, only fisher="auto"'s one
    # forward pass of one example (its output size decides between the exact and the sampled Fisher)
    assert copy_calls == [1]
    copy_calls.clear()
    values = second.score(query).values
    other_query = (train[0][:5], train[1][:5])
    second.score(other_query)
    second.top_k(query, 3)
    assert n not in copy_calls and all(c <= len(query[0]) for c in copy_calls)
    assert (
        second.info["train_examples_processed"] == 0
    )  # nothing recomputed: features and curvature from disk
    assert torch.allclose(values, memory.score(query).values, rtol=1e-10, atol=1e-14)


def test_second_query_set_costs_no_training_backward_pass(mlp_problem):
    model, task, train, query = mlp_problem
    inf = ProjectedInfluence(
        Counting(model), task, projector=RandomProjector(dim=64), progress=False, batch_size=500
    )
    inf.fit(train)
    n = len(train[0])
    assert n in inf.fmodel_.model.calls  # fitting did run on the training set (one batch of n)
    processed = inf.info["train_examples_processed"]
    inf.fmodel_.model.calls.clear()
    inf.score(query)
    inf.score((train[0][:3], train[1][:3]))
    inf.self_influence()
    assert n not in inf.fmodel_.model.calls
    assert inf.info["train_examples_processed"] == processed == n


class FailingTask(datatrace.ClassificationTask):
    """Raises once when it sees a marked training batch (simulates an interruption in a given chunk)."""

    def __init__(self, fail_at_row: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_at_row = fail_at_row

    def outputs(self, model, batch):
        x = batch[0]
        if self.fail_at_row is not None and x.shape[0] > 1 and bool((x[:, -1] == self.fail_at_row).any()):
            self.fail_at_row = None
            raise KeyboardInterrupt("simulated interruption")
        return model(x)

    def __repr__(self) -> str:  # the same task for the store's fingerprint, failing or not
        return f"ClassificationTask(weight_decay={self.weight_decay!r})"


def test_interrupted_fit_resumes_from_completed_chunks(tmp_path, mlp_problem):
    model, _, (X, y), _ = mlp_problem
    X = torch.cat([X, torch.arange(len(X), dtype=X.dtype)[:, None]], dim=1)  # last column: the row number
    marked = nn.Sequential(Drop(), model)
    kwargs = {
        "projector": RandomProjector(dim=32),
        "dtype": torch.float64,
        "progress": False,
        "batch_size": 10,
    }
    kwargs |= {"store_dir": tmp_path / "r", "chunk_size": 20}
    failing = FailingTask(fail_at_row=65, weight_decay=1e-2)  # row 65 is in chunk 3
    with pytest.raises(KeyboardInterrupt):
        ProjectedInfluence(marked, failing, **kwargs).fit((X, y))
    resumed = ProjectedInfluence(marked, FailingTask(None, weight_decay=1e-2), **kwargs).fit((X, y))
    assert resumed.info["train_examples_processed"] == 150 - 60  # chunks 0-2 were reused
    fresh = ProjectedInfluence(
        marked, FailingTask(None, weight_decay=1e-2), **{**kwargs, "store_dir": tmp_path / "f"}
    ).fit((X, y))
    q = (X[:5], y[:5])
    assert torch.allclose(resumed.score(q).values, fresh.score(q).values, rtol=1e-10, atol=1e-14)


class Drop(nn.Module):
    """Drops the marker column."""

    def forward(self, x):
        return x[:, :-1]


def test_refuses_a_store_of_another_model_or_projection(tmp_path, logreg):
    model, task, train, _ = logreg
    kwargs = {"dtype": torch.float64, "progress": False, "store_dir": tmp_path / "x"}
    ProjectedInfluence(model, task, projector=RandomProjector(dim=8, random_state=0), **kwargs).fit(train)
    other = nn.Linear(4, 3).double()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.bias[0] += 1e-6
    with pytest.raises(StoreMismatchError, match="different model"):
        ProjectedInfluence(other, task, projector=RandomProjector(dim=8, random_state=0), **kwargs).fit(train)
    with pytest.raises(StoreMismatchError, match=r"different projection.*random_state: stored 0 vs now 1"):
        ProjectedInfluence(model, task, projector=RandomProjector(dim=8, random_state=1), **kwargs).fit(train)
    X, y = train
    with pytest.raises(StoreMismatchError, match="different training data"):
        ProjectedInfluence(model, task, projector=RandomProjector(dim=8), **kwargs).fit((X * 1.01, y))
    with pytest.raises(StoreMismatchError, match="different task"):
        wd = datatrace.ClassificationTask(weight_decay=0.5)
        ProjectedInfluence(model, wd, projector=RandomProjector(dim=8), **kwargs).fit(train)


# -- outputs -------------------------------------------------------------------------------------------------------


def test_top_k_and_self_influence_agree_with_dense_scores(mlp_problem, tmp_path):
    model, task, train, query = mlp_problem
    inf = ProjectedInfluence(
        model,
        task,
        projector=RandomProjector(dim=50),
        dtype=torch.float64,
        store_dir=tmp_path / "t",
        chunk_size=32,
        progress=False,
    ).fit(train)
    dense = inf.score(query).values
    top = inf.proponents_opponents(query, 5)
    v, i = torch.topk(dense, 5, dim=1)
    assert torch.equal(top.proponents.indices, i) and torch.allclose(top.proponents.values, v)
    v, i = torch.topk(-dense, 5, dim=1)
    assert torch.equal(top.opponents.indices, i) and torch.allclose(top.opponents.values, -v)
    self_inf = inf.self_influence()
    on_train = inf.score(train).values
    assert torch.allclose(self_inf, torch.diagonal(on_train), rtol=1e-10)
    assert bool((self_inf > 0).all())  # positive definite projected curvature


@pytest.mark.parametrize("feature_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_correlate_with_float32(mlp_problem, feature_dtype):
    model, task, train, query = mlp_problem
    model32 = model.float()  # fit_full_batch returned a private copy; float() here is on the fixture's copy
    try:
        base = ProjectedInfluence(model32, task, projector=RandomProjector(dim=128), progress=False).fit(
            train
        )
        half = ProjectedInfluence(
            model32, task, projector=RandomProjector(dim=128), feature_dtype=feature_dtype, progress=False
        ).fit(train)
        assert half.train_features_.dtype == feature_dtype
        got, ref = half.score(query).values, base.score(query).values
        assert got.dtype == torch.float32
        assert row_corr(got, ref) >= 0.95
    finally:
        model.double()


def test_empirical_fisher_and_sketched_ggn(mlp_problem):
    model, task, train, query = mlp_problem
    kwargs = {"projector": RandomProjector(dim=64), "dtype": torch.float64, "progress": False}
    exact = ProjectedInfluence(model, task, **kwargs).fit(train)
    sketched = ProjectedInfluence(model, task, ggn_samples=64, **kwargs).fit(train)
    # the Rademacher sketch of the output Hessian is unbiased: with many samples the curvature is close
    A, B = exact.curvature_matrix_, sketched.curvature_matrix_
    assert float((A - B).norm() / A.norm()) < 0.15
    assert row_corr(sketched.score(query).values, exact.score(query).values) > 0.95
    empirical = ProjectedInfluence(model, task, fisher="empirical", **kwargs).fit(train)
    assert empirical.score(query).values.shape == (12, 150)


def test_trak_ensemble_averages_member_scores(mlp_problem, tmp_path):
    model, task, train, query = mlp_problem
    other = fit_full_batch(model, datatrace.ClassificationTask(weight_decay=2e-2), train, max_iter=30)
    kwargs = {"projector": RandomProjector(dim=32), "dtype": torch.float64, "progress": False}
    ens = TRAK([model, other], task, store_dir=tmp_path / "trak", **kwargs).fit(train)
    single = [ProjectedInfluence(m, task, **kwargs).fit(train).score(query).values for m in (model, other)]
    got = ens.score(query).values
    assert torch.allclose(got, (single[0] + single[1]) / 2, rtol=1e-9, atol=1e-14)
    top = ens.proponents_opponents(query, 4)
    assert torch.equal(top.proponents.indices, torch.topk(got, 4, dim=1).indices)
    assert (tmp_path / "trak" / "model-1" / "manifest.json").exists()


# -- validation and diagnostics ------------------------------------------------------------------------------------


def test_not_fitted_and_argument_errors(logreg):
    model, task, train, query = logreg
    with pytest.raises(NotFittedError, match=r"call \.fit"):
        ProjectedInfluence(model, task).score(query)
    with pytest.raises(ValueError, match="projector='big'"):
        ProjectedInfluence(model, task, projector="big")
    with pytest.raises(ValueError, match="damping=-1"):
        ProjectedInfluence(model, task, damping=-1)
    with pytest.raises(ValueError, match="fisher='fisher'"):
        ProjectedInfluence(model, task, fisher="fisher")
    with pytest.raises(ValueError, match=r"dtype=torch\.int8"):
        ProjectedInfluence(model, task, feature_dtype=torch.int8)

    class LossOnly(datatrace.Task):
        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="fisher='empirical'"):
        ProjectedInfluence(model, LossOnly())
    inf = ProjectedInfluence(model, LossOnly(), fisher="empirical", dtype=torch.float64, progress=False)
    assert inf.fit(train).score(query).values.shape == (7, 90)


def test_auto_projector_and_damping(logreg, caplog):
    model, _, train, _ = logreg
    task = datatrace.ClassificationTask(weight_decay={"weight": 1e-2})  # bias unpenalised
    with caplog.at_level(logging.INFO, logger="datatrace"):
        inf = ProjectedInfluence(model, task, dtype=torch.float64, progress=False).fit(train)
    assert isinstance(inf.projector_, FactorizedProjector)
    assert "FactorizedProjector" in caplog.text
    assert inf.damping_ > 0  # not every parameter is penalised
    assert inf.info["damping_policy"] == "auto"


def test_warns_when_the_model_is_not_at_a_minimum(logreg, caplog):
    _, task, train, _ = logreg
    torch.manual_seed(3)
    untrained = nn.Linear(4, 3).double()
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.projected"):
        ProjectedInfluence(untrained, task, dtype=torch.float64, progress=False).fit(train)
    assert "not at a minimum" in caplog.text


def test_features_above_max_bytes_go_to_a_temporary_store_removed_with_the_attributor(mlp_problem, caplog):
    import gc
    import os

    model, task, train, query = mlp_problem
    args = {"projector": RandomProjector(dim=64, random_state=3), "dtype": torch.float64, "progress": False}
    memory = ProjectedInfluence(model, task, **args).fit(train)
    assert memory.store_ is None
    need = 150 * 64 * 8
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.projected"):
        spilled = ProjectedInfluence(model, task, max_bytes=need - 1, **args).fit(train)
    assert spilled.store_ is not None and spilled.train_features_ is None
    folder = str(spilled.store_.path)
    assert any(
        "temporary on-disk store" in r.getMessage() and "store_dir=" in r.getMessage() for r in caplog.records
    )
    torch.testing.assert_close(
        spilled.score(query).values, memory.score(query).values, rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(spilled.self_influence(), memory.self_influence(), rtol=1e-10, atol=1e-14)
    kept = ProjectedInfluence(model, task, max_bytes=need, **args).fit(train)
    assert kept.store_ is None
    assert os.path.isdir(folder)
    del spilled
    gc.collect()
    assert not os.path.exists(folder)
    with pytest.raises(ValueError, match=r"max_bytes=0 is not allowed"):
        ProjectedInfluence(model, task, max_bytes=0)


def test_the_sampled_fisher_estimates_the_gauss_newton_matrix(mlp_problem):
    """fisher='sampled': the projected gradients at targets drawn from the model; with m draws per example their
    mean outer product is an unbiased estimate of the projected Gauss-Newton matrix (E_y[g g^T] = J^T H J for a
    softmax cross-entropy), so it approaches fisher='ggn' (relative Frobenius error ~ 1/sqrt(n m))."""
    model, task, train, query = mlp_problem
    kwargs = {"projector": RandomProjector(dim=48, random_state=2), "dtype": torch.float64, "progress": False}
    ggn = ProjectedInfluence(model, task, fisher="ggn", damping=1e-3, **kwargs).fit(train)
    errors = {}
    for m in (8, 128):
        sampled = ProjectedInfluence(model, task, fisher="sampled", ggn_samples=m, damping=1e-3, **kwargs)
        sampled.fit(train)
        difference = sampled.curvature_matrix_ - ggn.curvature_matrix_
        errors[m] = float(difference.norm() / ggn.curvature_matrix_.norm())
    assert errors[128] < 0.12 and errors[128] < 0.7 * errors[8]  # falls like 1/sqrt(m)
    assert sampled.fisher_ == "sampled" and ggn.fisher_ == "ggn"
    assert sampled.score(query).metadata["route"] == "projected sampled Fisher"
    r = np.corrcoef(sampled.score(query).values.ravel(), ggn.score(query).values.ravel())[0, 1]
    assert r > 0.98
    auto = ProjectedInfluence(model, task, **kwargs).fit(train)  # 4 outputs: the exact Gauss-Newton
    assert auto.fisher_ == "ggn"
    torch.testing.assert_close(
        auto.score(query).values,
        ProjectedInfluence(model, task, fisher="ggn", **kwargs).fit(train).score(query).values,
    )
