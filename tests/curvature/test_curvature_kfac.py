"""K-FAC and EK-FAC against float64 oracles: the dense Gauss-Newton matrix, torch.func per-example gradients,
hand-computed Kronecker factors, and the regimes where the Kronecker factorisation is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datatrace import ClassificationTask, InfluenceFunction, RegressionTask, Task
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.verification.training import fit_full_batch

DT = torch.float64

# -- helpers ----------------------------------------------------------------------------------------------------------


def fmodel_of(model: nn.Module, task: Task, params=None) -> FunctionalModel:
    return FunctionalModel(prepare_model(model, DT), task, params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def dense_of(curv: KFAC, p: int) -> torch.Tensor:
    """The p x p matrix (C + damping I) of a fitted route, column by column through matvec."""
    return curv.matvec(torch.eye(p, dtype=DT))


def layer_block(fm: FunctionalModel, layer) -> slice:
    sl = fm.space.slices()
    starts = [sl[n].start for n in layer.params]
    stops = [sl[n].stop for n in layer.params]
    assert max(stops) - min(starts) == sum(
        s - t for s, t in zip(stops, starts)
    )  # contiguous in the flat space
    return slice(min(starts), max(stops))


def eigenbasis_in_flat_space(layer, fm: FunctionalModel) -> torch.Tensor:
    """Columns: the Kronecker eigenvectors Q_S[:, j] Q_A[:, k]^T of a layer, written in the flat parameter layout
    (built from the parameters' own shapes, independently of the route's gather/scatter code)."""
    names = layer.params
    shapes = dict(zip(fm.space.names, fm.space.shapes))
    cols = []
    for j in range(layer.Q_S.shape[1]):
        for k in range(layer.Q_A.shape[1]):
            mat = torch.outer(layer.Q_S[:, j], layer.Q_A[:, k])  # (out, in')
            parts = []
            if layer.weight is not None:
                w = mat[:, : layer.in_dim]
                if layer.kind == "conv1d":
                    parts.append(w.T.reshape(-1))
                else:
                    parts.append(w.reshape(shapes[layer.weight]).reshape(-1))
            if layer.bias is not None:
                parts.append(mat[:, -1])
            order = [fm.space.names.index(n) for n in names]
            parts = [p for _, p in sorted(zip(order, parts), key=lambda t: t[0])]
            cols.append(torch.cat(parts))
    return torch.stack(cols, dim=1)


class Conv1D(nn.Module):
    """Stand-in for transformers' Conv1D: weight (nx, nf), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.shape[:-1], self.nf)
        x = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return x.reshape(size_out)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def mlp_classification():
    """A 3-5-3 tanh MLP, briefly trained on 60 examples of 3 classes (the identities below hold anywhere)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 3
    X = torch.eye(3, dtype=DT)[y] * 1.5 + torch.randn(60, 3, generator=g, dtype=DT)
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model = fit_full_batch(model, task, (X, y), max_iter=30)
    return model, task, (X, y)


# -- exactness where K-FAC is exact -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", [KFAC, EKFAC])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1, {"weight": 0.3}, {"weight": 0.05, "bias": 0.4}])
def test_single_linear_squared_error_equals_dense_gauss_newton(route, bias, weight_decay):
    """One nn.Linear with squared error: every example's output Hessian is 2 I, so S (x) A is the GGN exactly;
    the regulariser (also a bias strength that differs from the weight's: the Woodbury term) is exact too."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 4, generator=g, dtype=DT), torch.randn(50, 3, generator=g, dtype=DT)
    if isinstance(weight_decay, dict) and not bias:
        weight_decay = {k: v for k, v in weight_decay.items() if k != "bias"}
    torch.manual_seed(0)
    fm = fmodel_of(nn.Linear(4, 3, bias=bias), RegressionTask(weight_decay=weight_decay))
    data = as_data_source((X, Y), batch_size=16)  # several batches
    damping = 0.01
    curv = route(damping=damping).fit(fm, data, progress=False)
    G = fm.dense_gauss_newton(data) + damping * torch.eye(fm.num_params, dtype=DT)
    V = torch.randn(6, fm.num_params, generator=g, dtype=DT)
    assert rel(curv.solve(V), torch.linalg.solve(G, V.T).T) < 1e-8
    assert rel(dense_of(curv, fm.num_params), G) < 1e-10


@pytest.mark.parametrize("params", [["weight"], ["bias"]])
def test_weight_or_bias_alone_in_scope_is_exact(params):
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(40, 2, generator=g, dtype=DT)
    torch.manual_seed(1)
    fm = fmodel_of(nn.Linear(3, 2), RegressionTask(weight_decay=0.2), params=params)
    data = as_data_source((X, Y))
    curv = KFAC(damping=0.0).fit(fm, data, progress=False)
    G = fm.dense_gauss_newton(data)
    V = torch.randn(3, fm.num_params, generator=g, dtype=DT)
    assert rel(curv.solve(V), torch.linalg.solve(G, V.T).T) < 1e-8


def test_ekfac_eigenvalues_equal_kfac_where_kfac_is_exact():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, 2, generator=g, dtype=DT)
    fm = fmodel_of(nn.Linear(3, 2), RegressionTask())
    data = as_data_source((X, Y))
    k = KFAC().fit(fm, data, progress=False).layers_[0]
    e = EKFAC().fit(fm, data, progress=False).layers_[0]
    assert rel(e.eigenvalues, k.eigenvalues) < 1e-10


def test_conv2d_covering_the_whole_image_is_exact():
    """A Conv2d with one output location is a dense layer: K-FAC is exact for it with squared error."""
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(30, 2, 3, 3, generator=g, dtype=DT), torch.randn(30, 4, generator=g, dtype=DT)
    torch.manual_seed(3)
    fm = fmodel_of(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten()), RegressionTask(weight_decay=0.1))
    data = as_data_source((X, Y))
    curv = KFAC(damping=0.0).fit(fm, data, progress=False)
    G = fm.dense_gauss_newton(data)
    V = torch.randn(3, fm.num_params, generator=g, dtype=DT)
    assert rel(curv.solve(V), torch.linalg.solve(G, V.T).T) < 1e-8


# -- the eigenvalue correction and the three Fisher types against dense oracles ---------------------------------------


def test_ekfac_eigenvalues_are_the_diagonal_of_the_gauss_newton_in_the_kronecker_basis(mlp_classification):
    """EK-FAC (fisher='ggn') refits Lambda = diag(Q^T G_layer Q): checked against the dense GGN block for every
    layer of a 2-layer MLP (this pins down the pseudo-gradients, the layout and the eigenvalue correction)."""
    model, task, data = mlp_classification
    fm = fmodel_of(model, task)
    source = as_data_source(data, batch_size=25)
    curv = EKFAC().fit(fm, source, progress=False)
    G = fm.dense_gauss_newton(source) - torch.diag(fm.regularizer)
    for layer in curv.layers_:
        block = layer_block(fm, layer)
        Q = eigenbasis_in_flat_space(layer, fm)
        expected = torch.diagonal(Q.T @ G[block, block] @ Q).reshape(layer.eigenvalues.shape)
        assert rel(layer.eigenvalues, expected) < 1e-10
        assert torch.trace(G[block, block]) == pytest.approx(float(layer.eigenvalues.sum()), rel=1e-10)


def test_empirical_fisher_is_the_mean_of_per_example_gradient_outer_products(mlp_classification):
    model, task, data = mlp_classification
    fm = fmodel_of(model, task)
    source = as_data_source(data, batch_size=25)
    grads = fm.per_example_grads(data)
    F_emp = grads.T @ grads / grads.shape[0]
    curv = EKFAC(fisher="empirical").fit(fm, source, progress=False)
    for layer in curv.layers_:
        block = layer_block(fm, layer)
        Q = eigenbasis_in_flat_space(layer, fm)
        expected = torch.diagonal(Q.T @ F_emp[block, block] @ Q).reshape(layer.eigenvalues.shape)
        assert rel(layer.eigenvalues, expected) < 1e-10
    # K-FAC's output factor of the last layer is the mean of (dl/dlogits)(dl/dlogits)^T
    X, y = data
    logits = model(X).detach()
    s = torch.softmax(logits, dim=1) - F.one_hot(y, 3).to(DT)
    kfac = KFAC(fisher="empirical").fit(fm, source, progress=False)
    assert rel(kfac.layers_[-1].S, s.T @ s / len(y)) < 1e-10


def test_sampled_fisher_converges_to_the_gauss_newton(mlp_classification):
    """Softmax: the sampled-label output factor is an unbiased estimate of the GGN's, error ~ 1/sqrt(n_samples)."""
    model, task, data = mlp_classification
    fm = fmodel_of(model, task)
    source = as_data_source(data)
    exact = KFAC(fisher="ggn").fit(fm, source, progress=False)
    errors = []
    for n_samples in (1, 16, 256):  # 60 examples x n_samples labels
        sampled = KFAC(fisher="sampled", n_samples=n_samples, random_state=0).fit(fm, source, progress=False)
        errors.append(max(rel(s.S, e.S) for s, e in zip(sampled.layers_, exact.layers_)))
        for s, e in zip(sampled.layers_, exact.layers_):
            assert torch.equal(s.A, e.A)  # the inputs do not depend on the labels
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_sampled_fisher_for_one_logit_and_regression(kind):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(60, 3, generator=g, dtype=DT)
    torch.manual_seed(4)
    if kind == "logistic":
        model, task, y = nn.Linear(3, 1), ClassificationTask(), (X[:, 0] > 0).long()
    else:
        model, task, y = nn.Linear(3, 2), RegressionTask(), torch.randn(60, 2, generator=g, dtype=DT)
    fm = fmodel_of(model, task)
    source = as_data_source((X, y))
    exact = KFAC().fit(fm, source, progress=False).layers_[0].S
    sampled = KFAC(fisher="sampled", n_samples=400).fit(fm, source, progress=False).layers_[0].S
    assert rel(sampled, exact) < 0.05


def test_sampling_is_seeded(mlp_classification):
    model, task, data = mlp_classification
    fm = fmodel_of(model, task)
    source = as_data_source(data)
    a = KFAC(fisher="sampled", random_state=7).fit(fm, source, progress=False).layers_[0].S
    b = KFAC(fisher="sampled", random_state=7).fit(fm, source, progress=False).layers_[0].S
    c = KFAC(fisher="sampled", random_state=8).fit(fm, source, progress=False).layers_[0].S
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("input_factor", ["mean", "weighted"])
@pytest.mark.parametrize("problem", ["mlp", "logistic"])
def test_ekfac_is_at_least_as_close_to_the_gauss_newton_as_kfac(
    problem, input_factor, mlp_classification, classification_data
):
    """Same eigenbasis, Frobenius-optimal diagonal: per layer, ||EKFAC - G|| <= ||KFAC - G||."""
    if problem == "mlp":
        model, task, data = mlp_classification
    else:
        data, task = classification_data, ClassificationTask(weight_decay=1e-2)
        torch.manual_seed(0)
        model = fit_full_batch(nn.Linear(3, 3).double(), task, data, max_iter=30)
    fm = fmodel_of(model, task)
    source = as_data_source(data)
    G = fm.dense_gauss_newton(source)
    k, e = (
        KFAC(damping=0.0, input_factor=input_factor).fit(fm, source, progress=False),
        EKFAC(damping=0.0, input_factor=input_factor).fit(fm, source, progress=False),
    )
    Mk, Me = dense_of(k, fm.num_params), dense_of(e, fm.num_params)
    for layer in k.layers_:
        b = layer_block(fm, layer)
        assert (Me[b, b] - G[b, b]).norm() <= (Mk[b, b] - G[b, b]).norm() * (1 + 1e-12)


def test_weighted_input_factor_against_its_closed_form(mlp_classification):
    """``input_factor="weighted"``: A_w = sum_i tr(H_i) a_i a_i^T / sum_i tr(H_i) for the last layer (its GGN
    pseudo-gradients are the columns of the output-Hessian factor, so sum_c ||s_ic||^2 = tr(H_i)), S unchanged,
    and the K-FAC block's trace equals the exact Gauss-Newton block's (exact for a dense layer)."""
    model, task, data = mlp_classification
    X = data[0]
    fm = fmodel_of(model, task)
    source = as_data_source(data, batch_size=25)
    weighted = KFAC(input_factor="weighted").fit(fm, source, progress=False)
    mean = KFAC().fit(fm, source, progress=False)
    with torch.no_grad():
        hidden = torch.tanh(model[0](X))
        p = torch.softmax(model(X), dim=1)
    a = torch.cat([hidden, torch.ones(len(X), 1, dtype=DT)], dim=1)
    tr_h = (p * (1 - p)).sum(dim=1)  # tr(diag(p) - p p^T)
    expected = (a * tr_h[:, None]).T @ a / tr_h.sum()
    last_w, last_m = weighted.layers_[1], mean.layers_[1]
    assert rel(last_w.A, expected) < 1e-10
    assert rel(last_m.A, a.T @ a / len(X)) < 1e-10
    assert rel(last_w.S, last_m.S) < 1e-12
    G = fm.dense_gauss_newton(source) - torch.diag(fm.regularizer)
    for layer in weighted.layers_:
        b = layer_block(fm, layer)
        kron_trace = float(torch.trace(layer.S) * torch.trace(layer.A))
        assert kron_trace == pytest.approx(float(torch.trace(G[b, b])), rel=1e-10)
    # EK-FAC uses the weighted factor by default, K-FAC the mean
    assert EKFAC().input_factor == "weighted" and KFAC().input_factor == "mean"


def softmax_linear(k: int, seed: int):
    """One nn.Linear(4, k) with softmax cross-entropy, briefly trained on 40 examples, and its data source."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(40) % k
    X = torch.randn(40, 4, generator=g, dtype=DT) * torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=DT)
    X[:, :k] += 1.5 * torch.eye(k, 4, dtype=DT)[y][:, :k]
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(seed)
    model = fit_full_batch(nn.Linear(4, k).double(), task, (X, y), max_iter=40)
    return model, task, (X, y)


@pytest.mark.parametrize("fisher", ["ggn", "sampled"])
def test_single_softmax_linear_kfac_equals_its_closed_form(fisher):
    """One nn.Linear with softmax cross-entropy: K-FAC (mean input factor) is, in closed form,
    ``E[diag(p) - p p^T] (x) E[a a^T] + lambda I`` with ``a = [x, 1]``: the exact expected output factor (the
    sampled Fisher converges to it, here with many samples) and the mean input factor, scaled by 1/n each, and
    the regulariser added once. The output factor has the softmax's null vector 1 (shift invariance): a
    gradient of the loss never has a component along it, so solving with the pseudo-inverse there is exact."""
    model, task, data = softmax_linear(3, seed=7)
    X = data[0]
    fm = fmodel_of(model, task)
    source = as_data_source(data, batch_size=16)  # several batches: the 1/n is over all of them
    kw = {"n_samples": 4000} if fisher == "sampled" else {}
    curv = KFAC(fisher=fisher, damping=0.0, **kw).fit(fm, source, progress=False)
    with torch.no_grad():
        p = torch.softmax(model(X), dim=1)
    a = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], dim=1)
    S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(dim=0)
    A = a.T @ a / len(X)
    C = torch.kron(S, A) + 1e-2 * torch.eye(
        fm.num_params, dtype=DT
    )  # flat layout: weight (out, in) then bias
    perm = torch.tensor([o * 5 + i for o in range(3) for i in range(4)] + [o * 5 + 4 for o in range(3)])
    C = C[perm][:, perm]
    tol = 0.05 if fisher == "sampled" else 1e-10
    assert rel(curv.layers_[0].S, S) < tol
    assert rel(curv.layers_[0].A, A) < 1e-12
    assert rel(dense_of(curv, fm.num_params), C) < tol
    assert float(torch.linalg.eigvalsh(curv.layers_[0].S)[0]) == pytest.approx(0.0, abs=1e-12)
    if fisher == "ggn":  # the solve is the closed form's inverse on loss gradients
        grads = fm.per_example_grads(data)
        assert rel(curv.solve(grads), torch.linalg.solve(C, grads.T).T) < 1e-8


def test_two_class_softmax_weighted_kronecker_factor_is_exact():
    """With two softmax classes every example's output Hessian is ``p1 p2 u u^T``, ``u = (1, -1)``: one shared
    direction, so the layer's Gauss-Newton block is exactly ``u u^T (x) (1/n) sum_i p1 p2 a a^T``. The weighted
    input factor reproduces it exactly; the mean factor ``E[p1 p2] u u^T (x) E[a a^T]`` does not (confident
    examples with large inputs carry no curvature), which is the Kronecker factorisation's error, not a bug."""
    model, task, data = softmax_linear(2, seed=8)
    fm = fmodel_of(model, task)
    source = as_data_source(data, batch_size=16)
    G = fm.dense_gauss_newton(source)
    weighted = KFAC(input_factor="weighted", damping=0.0).fit(fm, source, progress=False)
    mean = KFAC(damping=0.0).fit(fm, source, progress=False)
    ekfac = EKFAC(input_factor="mean", damping=0.0).fit(fm, source, progress=False)
    assert rel(dense_of(weighted, fm.num_params), G) < 1e-10
    assert rel(dense_of(mean, fm.num_params), G) > 0.05
    # EK-FAC's eigenvalues are the exact diagonal in the mean factor's basis, not the exact matrix: still an error
    assert rel(dense_of(ekfac, fm.num_params), G) > 1e-3


def test_ekfac_eigenvalues_for_a_convolution_with_the_gauss_newton(cnn_problem):
    """Over several output locations (spatially correlated output gradients), EK-FAC's refitted eigenvalues are
    still exactly the diagonal of the dense Gauss-Newton block in the Kronecker eigenbasis, and its trace: the
    eigenvalue correction uses per-example gradients summed over locations, never batch gradients."""
    fm = fmodel_of(cnn_problem.model, cnn_problem.task)
    source = as_data_source(cnn_problem.train, batch_size=16)
    curv = EKFAC().fit(fm, source, progress=False)
    G = fm.dense_gauss_newton(source) - torch.diag(fm.regularizer)
    assert curv.layers_[0].locations / curv.layers_[0].examples > 1  # a convolution over several locations
    for layer in curv.layers_:
        block = layer_block(fm, layer)
        Q = eigenbasis_in_flat_space(layer, fm)
        expected = torch.diagonal(Q.T @ G[block, block] @ Q).reshape(layer.eigenvalues.shape)
        assert rel(layer.eigenvalues, expected) < 1e-10


# -- convolutions, Conv1D, sequences, repeated calls ------------------------------------------------------------------


def patches_by_hand(x: torch.Tensor, conv: nn.Conv2d, out_hw: tuple[int, int]) -> torch.Tensor:
    """Every receptive field as a row (channel-major, as weight.reshape(out, -1)), by explicit slicing."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        ph, pw = conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    rows = []
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            field = xp[
                :, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw
            ]
            rows.append(field.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)  # (b, T, C*kh*kw)


@pytest.mark.parametrize(
    "conv_args",
    [
        {"padding": 1},
        {"stride": 2},
        {"dilation": 2, "padding": 2},
        {"padding": "same", "padding_mode": "reflect"},
    ],
)
def test_conv2d_factors_and_per_example_gradients(conv_args):
    """KFC (Grosse & Martens 2016): A = mean over examples and locations of patch outer products,
    S = (1/n) sum_i sum_t s s^T; sum_t s_t a_t^T is the true per-example gradient (EK-FAC's refit)."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(12, 2, 5, 5, generator=g, dtype=DT), torch.arange(12) % 3
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, **conv_args)
    h = conv(torch.zeros(1, 2, 5, 5)).shape[-2:]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * h[0] * h[1], 3)).double()
    task = ClassificationTask()
    fm = fmodel_of(model, task, params=["0"])
    source = as_data_source((X, y), batch_size=5)
    curv = KFAC(fisher="empirical").fit(fm, source, progress=False)
    layer = curv.layers_[0]
    a = patches_by_hand(X, model[0], tuple(h))
    a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=DT)], dim=-1)
    assert rel(layer.A, torch.einsum("bti,btj->ij", a, a) / (a.shape[0] * a.shape[1])) < 1e-12
    out = model[0](X).detach().requires_grad_(True)
    loss = task.loss_from_outputs(model[1:](out), (X, y)).sum()
    (s,) = torch.autograd.grad(loss, out)
    s = s.reshape(12, 3, -1).transpose(1, 2)
    assert rel(layer.S, torch.einsum("bto,btp->op", s, s) / 12) < 1e-12
    # per-example gradients, through EK-FAC's eigenvalues and against torch.func
    ekfac = EKFAC(fisher="empirical").fit(fm, source, progress=False)
    grads = fm.per_example_grads((X, y))
    Q = eigenbasis_in_flat_space(ekfac.layers_[0], fm)
    expected = ((grads @ Q) ** 2).mean(dim=0).reshape(ekfac.layers_[0].eigenvalues.shape)
    assert rel(ekfac.layers_[0].eigenvalues, expected) < 1e-10


def test_conv1d_stand_in_matches_transposed_linear():
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(40, 4, generator=g, dtype=DT), torch.arange(40) % 3
    torch.manual_seed(6)
    hf = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(hf[i].weight.T)
            lin[i].bias.copy_(hf[i].bias)
    task = ClassificationTask(weight_decay={"0.weight": 0.1, "2.weight": 0.05})  # biases unpenalised
    for route in (KFAC, EKFAC):
        a = InfluenceFunction(hf, task, curvature=route(), progress=False).fit((X, y))
        b = InfluenceFunction(lin, task, curvature=route(), progress=False).fit((X, y))
        assert rel(a.score((X[:5], y[:5])).values, b.score((X[:5], y[:5])).values) < 1e-10


class SequenceModel(nn.Module):
    """A dense layer applied to every token (T = 4 locations), then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.head = Conv1D(2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x))).mean(dim=1)


class Repeated(nn.Module):
    """One nn.Linear called twice per forward (weight sharing across calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("kind", ["sequence", "repeated"])
def test_per_example_gradients_over_tokens_and_repeated_calls(kind):
    """EK-FAC's eigenvalues are the second moments of the true per-example gradients (summed over tokens and
    over the calls of a shared layer) in the Kronecker basis, for every layer."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    if kind == "sequence":
        model, X = SequenceModel().double(), torch.randn(20, 4, 3, generator=g, dtype=DT)
        Y = torch.randn(20, 2, generator=g, dtype=DT)
    else:
        model, X = Repeated().double(), torch.randn(20, 3, generator=g, dtype=DT)
        Y = torch.randn(20, 3, generator=g, dtype=DT)
    fm = fmodel_of(model, RegressionTask())
    source = as_data_source((X, Y), batch_size=8)
    curv = EKFAC(fisher="empirical").fit(fm, source, progress=False)
    grads = fm.per_example_grads((X, Y))
    for layer in curv.layers_:
        block = layer_block(fm, layer)
        Q = eigenbasis_in_flat_space(layer, fm)
        expected = ((grads[:, block] @ Q) ** 2).mean(dim=0).reshape(layer.eigenvalues.shape)
        assert rel(layer.eigenvalues, expected) < 1e-10
    assert curv.info["layers"][curv.layers_[0].name]["locations_per_example"] == (
        4 if kind == "sequence" else 2
    )


# -- errors, hooks, info ----------------------------------------------------------------------------------------------


def test_non_finite_forward_names_the_layer(make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp(3, 4, 3)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    fm = fmodel_of(model, ClassificationTask())
    with pytest.raises(FloatingPointError, match=r"layer '2'.*input\s+is finite but its output is not"):
        KFAC().fit(fm, as_data_source((X, y)), progress=False)
    assert no_hooks(fm.model)


def test_non_finite_factor_names_the_layer():
    """Inputs near 1e160 are finite but their outer products overflow: the factor check names the layer."""
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randn(10, 3, generator=g, dtype=DT) * 1e160, torch.randn(10, 1, generator=g, dtype=DT)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1e-170)
    fm = fmodel_of(model, RegressionTask())
    with pytest.raises(FloatingPointError, match=r"input factor A of layer '0'.*Fix:"):
        EKFAC().fit(fm, as_data_source((X, Y)), progress=False)
    assert no_hooks(fm.model)


def test_unsupported_parameters_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    fm = fmodel_of(model, RegressionTask())
    with pytest.raises(ValueError, match=r"'1\.weight', '1\.bias'.*params="):
        KFAC().fit(fm, as_data_source((torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT))))
    # excluding them works
    fm = fmodel_of(model, RegressionTask(), params=["0", "2"])
    KFAC().fit(fm, as_data_source((torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT))), progress=False)


def test_shared_and_functionally_used_weights_are_rejected():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.fc.weight)

    data = as_data_source((torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)))
    with pytest.raises(ValueError, match=r"a\.weight \(shared by modules \['a', 'b'\]\)"):
        KFAC().fit(fmodel_of(Tied(), RegressionTask()), data)
    fm = fmodel_of(Functional(), RegressionTask())
    with pytest.raises(ValueError, match=r"layer 'fc' do not reproduce the gradient"):
        KFAC().fit(fm, data, progress=False)
    assert no_hooks(fm.model)


def test_task_without_outputs_needs_empirical_fisher(regression_data):
    class LossOnly(Task):
        def loss(self, model, batch):
            return ((model(batch[0]) - batch[1]) ** 2).sum(dim=1)

    X, y = regression_data
    fm = fmodel_of(nn.Linear(3, 1), LossOnly())
    with pytest.raises(ValueError, match=r"fisher='ggn'.*fisher='empirical'"):
        KFAC().fit(fm, as_data_source((X, y)))
    KFAC(fisher="empirical").fit(fm, as_data_source((X, y)), progress=False)


def test_sampled_fisher_needs_a_predictive_distribution(regression_data):
    class Huber(RegressionTask):
        def loss_from_outputs(self, outputs, batch):
            return F.huber_loss(outputs, batch[1].to(outputs.dtype), reduction="none").sum(dim=1)

    X, y = regression_data
    with pytest.raises(ValueError, match=r"fisher='sampled'.*sample_targets"):
        KFAC(fisher="sampled").fit(fmodel_of(nn.Linear(3, 1), Huber()), as_data_source((X, y)))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"fisher": "true"}, r"fisher='true'.*'ggn', 'sampled', 'empirical'"),
        ({"damping": -1.0}, r"damping=-1\.0"),
        ({"n_samples": 0}, r"n_samples=0"),
        ({"random_state": "x"}, r"random_state='x'"),
        ({"input_factor": "true"}, r"input_factor='true'.*'weighted', 'mean'"),
    ],
)
def test_constructor_validates(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        KFAC(**kwargs)


def test_info_and_auto_damping(make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp(3, 4, 3)
    # regulariser on every parameter: no damping needed
    fm = fmodel_of(model, ClassificationTask(weight_decay=1e-2))
    curv = EKFAC().fit(fm, as_data_source((X, y)), False)
    assert no_hooks(fm.model)
    info = curv.info
    assert info["route"] == "ekfac" and info["fisher"] == "ggn" and info["damping"] == "auto"
    assert info["damping_max"] == 0.0
    first = info["layers"]["0"]
    assert (first["A_size"], first["S_size"], first["params"]) == (4, 4, ["0.weight", "0.bias"])
    assert 0.0 <= first["eigenvalue_min"] <= first["eigenvalue_max"]
    # no regulariser: a small damping relative to each layer's mean eigenvalue
    curv = KFAC().fit(fmodel_of(model, ClassificationTask()), as_data_source((X, y)), False)
    for layer in curv.layers_:
        assert layer.damping == pytest.approx(1e-3 * float(layer.eigenvalues.mean()))
        assert layer.damping > 0
    # an explicit damping is used as given
    assert KFAC(damping=0.5).fit(fmodel_of(model, ClassificationTask()), as_data_source((X, y)), False).info[
        "damping_max"
    ] == pytest.approx(0.5)


def test_float32_model_is_supported(make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp(3, 4, 3).float()
    inf = InfluenceFunction(
        model, ClassificationTask(weight_decay=1e-2), curvature=EKFAC(), dtype=None, progress=False
    )
    scores = inf.fit((X.float(), y)).score((X[:3].float(), y[:3])).values
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


# -- end to end -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ekfac_influence_on_digits_logistic_regression_agrees_with_exact():
    """Multinomial logistic regression on a digits subset: EK-FAC scores vs the exact Hessian's.
    Measured: Pearson 0.992 (K-FAC 0.992), self-influence 0.984, with weight decay 0.1 (0.93-0.95 at 1e-2,
    0.92-0.94 at 1e-3: see the module docstring)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X, y = torch.tensor(digits.data / 16.0), torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:200], perm[1000:1030]
    task = ClassificationTask(weight_decay=0.1)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(64, 10).double(), task, (X[train], y[train]), tolerance_grad=1e-7)
    exact = InfluenceFunction(model, task, progress=False).fit((X[train], y[train]))
    ekfac = InfluenceFunction(model, task, curvature=EKFAC(), progress=False).fit((X[train], y[train]))
    reference = exact.score((X[test], y[test])).values
    scores = ekfac.score((X[test], y[test])).values
    assert pearson(scores, reference) > 0.95
    assert pearson(ekfac.self_influence(), exact.self_influence()) > 0.95


@pytest.mark.parametrize("route", [KFAC, EKFAC])
def test_unpenalised_bias_without_damping_is_a_pseudo_inverse(route, classification_data):
    """Softmax with a penalised weight and an unpenalised bias (scikit-learn's convention) and no damping: the
    bias's shift direction has zero curvature; solve is the pseudo-inverse of the route's own matrix."""
    X, y = classification_data
    torch.manual_seed(0)
    fm = fmodel_of(nn.Linear(3, 3), ClassificationTask(weight_decay={"weight": 0.1}))
    curv = route(damping=0.0).fit(fm, as_data_source((X, y)), progress=False)
    V = torch.randn(4, fm.num_params, generator=torch.Generator().manual_seed(0), dtype=DT)
    solved = curv.solve(V)
    assert torch.isfinite(solved).all()
    assert rel(solved, V @ torch.linalg.pinv(dense_of(curv, fm.num_params), hermitian=True)) < 1e-8
    assert curv.info["num_zero_dropped"] == 1


@pytest.mark.parametrize("route", [KFAC, EKFAC])
def test_zero_rows_solve_and_empty_index_lists(route, mlp_classification):
    """A rank with an empty shard, or CG's last block of rows, hands the route zero rows: nothing to solve."""
    model, task, data = mlp_classification
    fm = fmodel_of(model, task)
    curv = route().fit(fm, as_data_source(data), progress=False)
    empty = torch.zeros(0, fm.num_params, dtype=DT)
    assert curv.solve(empty).shape == (0, fm.num_params)
    assert curv.matvec(empty).shape == (0, fm.num_params)
    inf = InfluenceFunction(model, task, curvature=route(), progress=False).fit(data)
    assert all(v.shape[0] == 0 for v in inf.params_change([]).values())
    assert all(float(v.abs().sum()) == 0.0 for v in inf.removal_params([]).values())


@pytest.mark.parametrize("route", ["kfac", "ekfac"])
def test_float32_working_dtype_rotates_in_float32_and_agrees_with_float64(cnn_problem, route):
    """A float32 model's per-batch products and basis rotations run in float32 (factors and eigendecompositions
    stay float64): the scores agree with the float64 fit to float32 accuracy."""
    import datatrace

    p = cnn_problem
    runs = {}
    for dtype in (torch.float32, torch.float64):
        inf = datatrace.InfluenceFunction(p.model, p.task, curvature=route, dtype=dtype, progress=False)
        inf.fit(p.train)
        assert inf.curvature_._compute_dtype == dtype
        assert inf.curvature_.layers_[0].Q_A.dtype == torch.float64
        runs[dtype] = inf.score(p.query).values.double()
    f32, f64 = runs[torch.float32], runs[torch.float64]
    assert float((f32 - f64).norm() / f64.norm()) < 1e-4
