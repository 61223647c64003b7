"""Random projections: JL scaling (statistically, fixed seeds), determinism, block generation, and the factorised
LoGra projection against the explicit Kronecker projection of full per-example gradients from torch.func."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.projection.factorized import FactorizedProjector
from datatrace.projection.random import ROWS_PER_SEED, RandomProjector, jl_dim, random_matrix
from datatrace.tasks import ClassificationTask, RegressionTask

# -- helpers (independent of datatrace's projection code) ----------------------------------------------------------


class Conv1D(nn.Module):
    """Hugging Face's transposed dense layer: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class SeqModel(nn.Module):
    """Tokens (b, T, d) -> Linear -> tanh -> Conv1D -> mean over tokens -> logits: per-example gradients are sums
    over tokens, so the factorised projection must sum outer products over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.proj = Conv1D(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc(x))).mean(dim=1)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def flat_per_example_grads(model: nn.Module, task, batch) -> torch.Tensor:
    """Full per-example gradients (b, p) in named_parameters order, with torch.func."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(ps, *example):
        out = functional_call(model, ps, (example[0].unsqueeze(0),))
        return task.loss_from_outputs(out, tuple(t.unsqueeze(0) for t in example))[0]

    g = vmap(grad(single), in_dims=(None, *(0 for _ in batch)))(params, *batch)
    return torch.cat([g[n].reshape(len(batch[0]), -1) for n in names], dim=1)


def layer_matrix(model: nn.Module, flat_row: torch.Tensor, layer_name: str, kind: str) -> torch.Tensor:
    """The (d_out, d_in + 1) matrix [G_W, g_b] of one layer from a flat gradient row."""
    blocks, start = {}, 0
    for n, p in model.named_parameters():
        blocks[n] = flat_row[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    W, b = blocks[f"{layer_name}.weight"], blocks[f"{layer_name}.bias"]
    W = W.T if kind == "conv1d" else W.reshape(W.shape[0], -1)
    return torch.cat([W, b[:, None]], dim=1)


def kronecker_features(model, flat_grads, projector, kinds) -> torch.Tensor:
    """(P_out (x) P_in)^T vec_row([G_W, g_b]) per layer, concatenated: the explicit Kronecker projection."""
    rows = []
    for row in flat_grads:
        parts = []
        for layer in projector.layers_:
            G = layer_matrix(model, row, layer.name, kinds[layer.name])
            P_in = layer.P_in if layer.P_in is not None else torch.eye(G.shape[1], dtype=G.dtype)
            P_out = layer.P_out if layer.P_out is not None else torch.eye(G.shape[0], dtype=G.dtype)
            K = torch.kron(P_out, P_in)  # (d_out * d_in', k_out * k_in)
            parts.append(K.T @ G.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def fmodel_of(model: nn.Module, task, params=None) -> FunctionalModel:
    return FunctionalModel(prepare_model(model, torch.float64), task, params)


# -- Johnson-Lindenstrauss dimension -------------------------------------------------------------------------------


def test_jl_dim_formula_and_sklearn_agree():
    from sklearn.random_projection import johnson_lindenstrauss_min_dim

    for n, eps in [(100, 0.1), (10_000, 0.2), (1_000_000, 0.3)]:
        expected = 4 * math.log(n) / (eps**2 / 2 - eps**3 / 3)
        assert jl_dim(n, eps) == math.ceil(expected)
        assert abs(jl_dim(n, eps) - int(johnson_lindenstrauss_min_dim(n, eps=eps))) <= 1


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, "x"])
def test_jl_dim_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps="):
        jl_dim(10, eps)


def test_auto_dim_is_capped_logged_and_identity_when_it_reaches_p(caplog, make_mlp):
    task = ClassificationTask()
    fmodel = fmodel_of(make_mlp(d=3, h=4, k=3), task)  # p = 31
    with caplog.at_level(logging.INFO, logger="datatrace.projection.random"):
        proj = RandomProjector(dim="auto").fit(fmodel, n_points=1000)
    assert proj.kind_ == "identity" and proj.dim_ == 31
    assert "Johnson-Lindenstrauss" in caplog.text and "identity" in caplog.text
    X = torch.randn(7, 31, dtype=torch.float64)
    assert torch.equal(proj.project(X), X)
    big = fmodel_of(nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 3)).double(), task)
    proj = RandomProjector(dim="auto", max_dim=500).fit(big, n_points=1000)
    assert proj.dim_ == 500 and proj.kind_ == "gaussian"
    proj = RandomProjector(dim="auto", eps=0.5).fit(big, n_points=1000)
    assert proj.dim_ == jl_dim(1000, 0.5)
    proj = RandomProjector(kind="identity").fit(big, n_points=1000)
    assert proj.kind_ == "identity" and proj.dim_ == big.num_params
    with pytest.raises(ValueError, match="dim=10"):
        RandomProjector(dim=10, kind="identity")


# -- flat random projections ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_norms_are_preserved_in_expectation(kind):
    """E ||P^T g||^2 = ||g||^2: averaged over 200 vectors the ratio is 1 within a few standard errors, and the
    spread of single ratios matches JL (about sqrt(2/k))."""
    p, k = 2000, 300
    P = random_matrix(p, k, kind, seed=123, density=1 / math.sqrt(p) if kind == "sparse" else 1.0).double()
    g = torch.randn(200, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio = (g @ P).pow(2).sum(1) / g.pow(2).sum(1)
    assert abs(float(ratio.mean()) - 1.0) < 4 * math.sqrt(2 / k) / math.sqrt(200) + 0.02
    assert 0.5 * math.sqrt(2 / k) < float(ratio.std()) < 2.0 * math.sqrt(2 / k)
    # over independent matrices, a fixed vector's squared norm is unbiased
    v = g[0]
    ratios = [
        float(
            (v @ random_matrix(p, 50, kind, seed=s, density=0.05 if kind == "sparse" else 1.0).double())
            .pow(2)
            .sum()
        )
        / float(v.pow(2).sum())
        for s in range(100)
    ]
    assert abs(sum(ratios) / 100 - 1.0) < 4 * math.sqrt(2 / 50) / 10


def test_sparse_matrix_has_the_requested_density_and_values():
    density, k = 0.05, 200
    P = random_matrix(4000, k, "sparse", seed=1, density=density)
    nz = P[P != 0]
    assert abs(nz.numel() / P.numel() - density) < 0.005
    assert torch.allclose(nz.abs(), torch.full_like(nz, math.sqrt(1 / (density * k))))
    assert abs(float((nz > 0).float().mean()) - 0.5) < 0.03


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_projection_is_seeded_block_generated_and_cache_independent(kind):
    task = RegressionTask()
    model = nn.Sequential(nn.Linear(60, 40), nn.Tanh(), nn.Linear(40, 2)).double()  # p = 2522 > ROWS_PER_SEED
    fmodel = fmodel_of(model, task)
    assert fmodel.num_params > 2 * ROWS_PER_SEED
    cached = RandomProjector(dim=64, kind=kind, random_state=7).fit(fmodel, 10)
    uncached = RandomProjector(dim=64, kind=kind, random_state=7, max_cached_bytes=0).fit(fmodel, 10)
    again = RandomProjector(dim=64, kind=kind, random_state=7).fit(fmodel, 10)
    other = RandomProjector(dim=64, kind=kind, random_state=8).fit(fmodel, 10)
    V = torch.randn(5, fmodel.num_params, dtype=torch.float64)
    assert torch.allclose(cached.project(V), uncached.project(V), rtol=1e-12, atol=1e-12)
    assert torch.equal(cached.matrix(), again.matrix())
    assert not torch.allclose(cached.project(V), other.project(V))
    assert cached.fingerprint() == again.fingerprint() != other.fingerprint()
    assert torch.allclose(cached.project(V), V @ cached.matrix(), rtol=1e-12, atol=1e-12)


def test_random_projector_vjps_equal_projected_torch_func_gradients(classification_data, make_mlp):
    X, y = classification_data
    task = ClassificationTask(weight_decay={"0.weight": 0.1, "2.bias": 0.03})
    model = make_mlp()
    fmodel = fmodel_of(model, task)
    proj = RandomProjector(dim=20, random_state=3).fit(fmodel, len(X))
    full = flat_per_example_grads(model, task, (X, y))
    got = proj.project_vjps((X, y), "loss")
    assert got.shape == (60, 1, 20)
    assert torch.allclose(got[:, 0], full @ proj.matrix(), atol=1e-12)
    # output-space cotangents: rows P^T J_i^T c
    cot = torch.randn(60, 2, 3, dtype=torch.float64)

    def outputs(ps, x):
        return functional_call(model, ps, (x.unsqueeze(0),))[0]

    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(outputs), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[n].reshape(60, 3, -1) for n, _ in model.named_parameters()], dim=2)  # (b, K, p)
    expected = torch.einsum("bck,bkp->bcp", cot, J) @ proj.matrix()
    got = proj.project_vjps((X, y), "outputs", lambda o: cot)
    assert torch.allclose(got, expected, atol=1e-12)
    # P^T diag(lambda) P
    P = proj.matrix()
    assert torch.allclose(proj.regularizer_matrix(), (P * fmodel.regularizer[:, None]).T @ P, atol=1e-13)
    # rescaled: times the fraction of dimensions kept
    assert fmodel.num_params == 31
    assert torch.allclose(proj.regularizer_matrix(rescaled=True), proj.regularizer_matrix() * 20 / 31)


# -- factorised (LoGra) projections --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_factorized_equals_explicit_kronecker_projection_mlp(classification_data, make_mlp, kind):
    X, y = classification_data
    task = ClassificationTask()
    model = make_mlp(d=3, h=5, k=3)
    proj = FactorizedProjector(dim_in=2, dim_out=2, kind=kind, random_state=4).fit(
        fmodel_of(model, task), len(X)
    )
    assert [(la.k_out, la.k_in) for la in proj.layers_] == [(2, 2), (2, 2)]
    assert proj.dim_ == 8
    full = flat_per_example_grads(model, task, (X, y))
    expected = kronecker_features(model, full, proj, {"0": "linear", "2": "linear"})
    got = proj.project_vjps((X, y), "loss")[:, 0]
    assert torch.allclose(got, expected, atol=1e-12)
    # project() of the flat full gradient is the same linear map
    assert torch.allclose(proj.project(full), expected, atol=1e-12)


def test_factorized_on_token_sequences_with_conv1d_sums_over_positions():
    torch.manual_seed(0)
    model = SeqModel().double()
    X = torch.randn(9, 7, 5, dtype=torch.float64)  # 7 tokens per example
    y = torch.arange(9) % 4
    task = ClassificationTask()
    proj = FactorizedProjector(dim_in=3, dim_out=2, random_state=1).fit(fmodel_of(model, task), 9)
    full = flat_per_example_grads(model, task, (X, y))
    expected = kronecker_features(model, full, proj, {"fc": "linear", "proj": "conv1d"})
    assert torch.allclose(proj.project_vjps((X, y), "loss")[:, 0], expected, atol=1e-12)
    assert torch.allclose(proj.project(full), expected, atol=1e-12)


def test_factorized_on_conv2d_patches():
    torch.manual_seed(0)
    model = ConvNet().double()
    X = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.arange(6) % 4
    task = ClassificationTask()
    proj = FactorizedProjector(dim_in=4, dim_out=2, random_state=2).fit(fmodel_of(model, task), 6)
    assert proj.layers_[0].P_in is not None and proj.layers_[0].P_in.shape == (2 * 9 + 1, 4)
    full = flat_per_example_grads(model, task, (X, y))
    expected = kronecker_features(model, full, proj, {"conv": "conv2d", "head": "linear"})
    assert torch.allclose(proj.project_vjps((X, y), "loss")[:, 0], expected, atol=1e-12)


def test_factorized_pseudo_gradients_and_regularizer(classification_data, make_mlp):
    X, y = classification_data
    task = ClassificationTask(weight_decay={"0.weight": 0.1, "0.bias": 0.02, "2.weight": 0.05})
    model = make_mlp(d=3, h=5, k=3)
    fmodel = fmodel_of(model, task)
    proj = FactorizedProjector(dim_in=3, dim_out=2, random_state=5).fit(fmodel, len(X))
    cot = torch.randn(60, 3, 3, dtype=torch.float64)

    def outputs(ps, x):
        return functional_call(model, ps, (x.unsqueeze(0),))[0]

    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(outputs), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[n].reshape(60, 3, -1) for n, _ in model.named_parameters()], dim=2)
    vjps = torch.einsum("bck,bkp->bcp", cot, J)  # full pseudo-gradients (b, c, p)
    expected = proj.project(vjps.reshape(-1, vjps.shape[-1])).reshape(60, 3, -1)
    assert torch.allclose(proj.project_vjps((X, y), "outputs", lambda o: cot), expected, atol=1e-12)
    # regulariser: P^T diag(lambda) P with P the explicit p x k matrix of the projection
    P = proj.project(torch.eye(fmodel.num_params, dtype=torch.float64))
    R = proj.regularizer_matrix()
    assert torch.allclose(R, (P * fmodel.regularizer[:, None]).T @ P, atol=1e-13)
    # rescaled per layer by the kept fractions of each side: layer 0 (4 -> 3 inputs, 5 -> 2 outputs),
    # layer 2 (6 -> 3 inputs, 3 -> 2 outputs)
    Rs = proj.regularizer_matrix(rescaled=True)
    assert torch.allclose(Rs[:6, :6], R[:6, :6] * (3 / 4) * (2 / 5))
    assert torch.allclose(Rs[6:, 6:], R[6:, 6:] * (3 / 6) * (2 / 3))


def test_factorized_auto_dims_meet_the_jl_target(make_mlp):
    task = ClassificationTask()
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    proj = FactorizedProjector(max_dim=1000).fit(fmodel_of(model, task), n_points=500)
    assert proj.dim_ <= 1000
    width = proj.layers_[0].k_in
    bigger = sum(min(width + 1, la.a_dim) * min(width + 1, la.d_out) for la in proj.layers_)
    assert bigger > 1000  # the largest width that fits
    small = FactorizedProjector().fit(fmodel_of(make_mlp(), task), n_points=500)
    assert all(la.P_in is None and la.P_out is None for la in small.layers_)  # identity: nothing to project


def test_factorized_rejects_parameters_outside_supported_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    fmodel = fmodel_of(model, ClassificationTask())
    with pytest.raises(ValueError, match=r"1\.weight.*1\.bias.*params="):
        FactorizedProjector(dim_in=2, dim_out=2).fit(fmodel, 10)
    # restricting the scope works
    fmodel = fmodel_of(model, ClassificationTask(), params=["0", "2"])
    assert FactorizedProjector(dim_in=2, dim_out=2).fit(fmodel, 10).dim_ == 8


def test_factorized_detects_weights_used_outside_their_module():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight  # the weight is also used functionally

    model = Tied().double()
    fmodel = fmodel_of(model, ClassificationTask())
    proj = FactorizedProjector(dim_in=2, dim_out=2).fit(fmodel, 10)
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.arange(4) % 3
    with pytest.raises(ValueError, match="do not reproduce the gradient"):
        proj.project_vjps((X, y), "loss")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim=0"),
        ({"dim": "big"}, "dim='big'"),
        ({"kind": "orthogonal"}, "kind='orthogonal'"),
        ({"random_state": -1}, "random_state=-1"),
        ({"density": 2.0}, "density=2.0"),
    ],
)
def test_random_projector_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomProjector(**kwargs)


def test_unfitted_projector_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        RandomProjector(dim=4).project(torch.zeros(1, 3))
