"""The layer-capture engine against torch.func: per-example gradients rebuilt from the hooks' rows, the kinds table,
the layout of a layer's parameter matrix, the batched backward and its per-column fallback, the self-check."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datatrace.capture.engine import Backprop, Layer, check_gradients, find_layers, recording
from datatrace.capture.kinds import KINDS, LayerKind, layer_kind
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.tasks import ClassificationTask, RegressionTask, Task

DT = torch.float64


class Conv1D(nn.Module):
    """Stand-in for transformers' Conv1D: weight (nx, nf), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1, x.shape[-1]) @ self.weight + self.bias).reshape(*x.shape[:-1], self.nf)


class Tokens(nn.Module):
    """Linear and Conv1D applied to every token, then mean pooling: T = 4 locations per example."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.head = Conv1D(2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x))).mean(dim=1)


class Conv(nn.Module):
    """A strided, padded Conv2d (reflect padding) feeding a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Signal(nn.Module):
    """A dilated, strided nn.Conv1d (circular padding) feeding a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="circular")
        self.head = nn.Linear(3 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Repeated(nn.Module):
    """One nn.Linear called twice per forward: its calls are further locations."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def problem(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    if name == "tokens":
        return Tokens(), (
            torch.randn(6, 4, 3, generator=g, dtype=DT),
            torch.randn(6, 2, generator=g, dtype=DT),
        )
    if name == "conv2d":
        return Conv(), (
            torch.randn(6, 2, 6, 6, generator=g, dtype=DT),
            torch.randn(6, 2, generator=g, dtype=DT),
        )
    if name == "conv1d":
        return Signal(), (
            torch.randn(6, 2, 9, generator=g, dtype=DT),
            torch.randn(6, 2, generator=g, dtype=DT),
        )
    return Repeated(), (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT))


def fmodel_of(model: nn.Module, task: Task, params=None) -> FunctionalModel:
    return FunctionalModel(prepare_model(model, DT), task, params)


def per_example_grads(model: nn.Module, task: Task, batch: tuple) -> dict[str, torch.Tensor]:
    """Per-example gradients of the loss by torch.func, independently of the hooks."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(ps, x, y):
        outputs = functional_call(model, ps, (x[None],))
        return task.loss_from_outputs(outputs, (x[None], y[None]))[0]

    return vmap(grad(single), in_dims=(None, 0, 0))(params, *batch)


def rows_and_grads(fm: FunctionalModel, layers: list[Layer], batch: tuple, batched: bool = True):
    """Hooks' rows a (b, T, in') and s (b, T, out) of the loss of every example (one column: ones)."""
    with torch.enable_grad(), recording(layers, "test") as rec:
        root = fm.task.loss(fm.model, batch)
    backprop = Backprop("test")
    backprop.batched = batched
    chunks = list(backprop.chunks(root, rec.outputs(), torch.ones_like(root)[None]))
    assert [(start, count) for start, count, _ in chunks] == [(0, 1)]
    s_rows = rec.output_rows(layers, chunks[0][2], 1)
    return [rec.inputs(i) for i in range(len(layers))], [s[0] for s in s_rows]


# -- the kinds table -------------------------------------------------------------------------------------------------


def test_kinds_table_and_lookup():
    assert set(KINDS) >= {nn.Linear, nn.Conv2d, nn.Conv1d}
    assert all(isinstance(k, LayerKind) for k in KINDS.values())
    assert layer_kind(nn.Linear(2, 3)).name == "linear"
    assert layer_kind(nn.Conv2d(1, 2, 3)).name == "conv2d"
    assert layer_kind(nn.Conv1d(1, 2, 3)).name == "torch_conv1d"
    assert layer_kind(Conv1D(2, 3)).name == "conv1d"  # recognised by class name (transformers is optional)

    class MyLinear(nn.Linear):
        pass

    assert layer_kind(MyLinear(2, 3)).name == "linear"  # subclasses through the class hierarchy
    for module in (nn.LayerNorm(3), nn.Embedding(4, 2), nn.Tanh()):
        assert layer_kind(module) is None


@pytest.mark.parametrize("name", ["tokens", "conv2d", "conv1d", "repeated"])
def test_gather_and_scatter_are_inverse_and_match_the_weight_layout(name):
    model, _ = problem(name)
    fm = fmodel_of(model, RegressionTask())
    layers, uncovered = find_layers(fm, "test", "nothing")
    assert uncovered == []
    shapes = dict(zip(fm.space.names, fm.space.shapes))
    blocks = {n: torch.randn(5, *shapes[n], dtype=DT) for n in fm.space.names}
    for layer in layers:
        M = layer.gather(blocks, lead=1)
        assert M.shape == (5, layer.out_dim, layer.a_dim)
        back = layer.scatter(M, shapes)
        assert set(back) == set(layer.params)
        for n in layer.params:
            assert torch.equal(back[n], blocks[n])
        w = blocks[layer.weight]  # y = W a: row o of M is output unit o's incoming weights
        W = w.transpose(-1, -2) if layer.kind == "conv1d" else w.reshape(5, layer.out_dim, -1)
        assert torch.equal(M[..., : layer.in_dim], W)
        assert torch.equal(M[..., -1], blocks[layer.bias])


# -- rows rebuild the per-example gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name", ["tokens", "conv2d", "conv1d", "repeated"])
def test_rows_rebuild_per_example_gradients(name, batched):
    """sum_t s_t a_t^T over locations (and calls) is each example's gradient, as torch.func computes it."""
    model, batch = problem(name)
    task = RegressionTask()
    fm = fmodel_of(model, task)
    layers, _ = find_layers(fm, "test", "nothing")
    a_rows, s_rows = rows_and_grads(fm, layers, batch, batched)
    expected = per_example_grads(fm.model, task, batch)
    for layer, a, s in zip(layers, a_rows, s_rows):
        rebuilt = torch.einsum("bto,bti->boi", s, a)
        true = layer.gather({n: expected[n] for n in layer.params}, lead=1)
        torch.testing.assert_close(rebuilt, true, rtol=1e-12, atol=1e-14)
    if name == "repeated":
        assert a_rows[0].shape[1] == 2  # two calls, two locations


def test_batched_backward_and_per_column_fallback_agree():
    model, batch = problem("conv2d")
    fm = fmodel_of(model, ClassificationTask())
    layers, _ = find_layers(fm, "test", "nothing")
    X = batch[0]
    results = []
    for batched in (True, False):
        with torch.enable_grad(), recording(layers, "test") as rec:
            outputs = fm.model(X)
        columns = torch.randn(3, *outputs.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
        backprop = Backprop("test", chunk_elements=10**9)
        backprop.batched = batched
        rows = []
        for start, count, grads in backprop.chunks(outputs, rec.outputs(), columns):
            rows.append((start, count, rec.output_rows(layers, grads, count)))
        results.append(rows)
    batched_rows, single_rows = results
    assert [(s, c) for s, c, _ in batched_rows] == [(0, 3)]
    assert [(s, c) for s, c, _ in single_rows] == [(0, 1), (1, 1), (2, 1)]
    for i in range(len(layers)):
        stacked = torch.cat([r[i] for _, _, r in single_rows])
        torch.testing.assert_close(batched_rows[0][2][i], stacked, rtol=1e-12, atol=1e-14)


def test_hooks_are_removed_also_when_the_forward_raises():
    model, _ = problem("tokens")
    fm = fmodel_of(model, RegressionTask())
    layers, _ = find_layers(fm, "test", "nothing")
    with pytest.raises(ValueError, match="needs a leading batch axis"), recording(layers, "test"):
        fm.model(torch.zeros(3, dtype=DT))
    assert all(not m._forward_hooks for m in fm.model.modules())


# -- coverage and the self-check ------------------------------------------------------------------------------------


def test_find_layers_reports_uncovered_and_shared_parameters():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight
            self.norm = nn.LayerNorm(3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.norm(self.b(self.a(x))))

    fm = fmodel_of(Mixed(), RegressionTask())
    layers, uncovered = find_layers(fm, "test", "nothing")
    assert [layer.name for layer in layers] == ["out"]
    assert uncovered[0].startswith("a.weight (shared by modules ['a', 'b'])")
    assert "norm.weight" in uncovered and "norm.bias" in uncovered
    fm = fmodel_of(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), RegressionTask())
    with pytest.raises(
        ValueError, match=r"grouped Conv2d \(groups=2\); route X supports groups=1.*, or use Y\."
    ):
        find_layers(fm, "route X", "use Y")
    layers, uncovered = find_layers(
        fm, "route X", "use Y", lenient=True
    )  # a default scope: left out, with why
    assert layers == [] and uncovered == [
        "0.weight (grouped Conv2d (groups=2): not supported)",
        "0.bias (grouped Conv2d (groups=2): not supported)",
    ]


def test_self_check_catches_a_weight_used_outside_its_module():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight

    for model, ok in ((nn.Linear(3, 3), True), (Functional(), False)):
        fm = fmodel_of(model, RegressionTask())
        layers, _ = find_layers(fm, "test", "nothing")
        X = torch.randn(5, 3, dtype=DT)
        with torch.enable_grad(), recording(layers, "Route") as rec:
            root = fm.model(X)
        column = torch.randn_like(root)
        if ok:
            check_gradients(fm, layers, rec, root, column, "Route", "another route", skip_nonfinite=False)
        else:
            with pytest.raises(
                ValueError, match=r"Route's hooks on layer 'fc' do not reproduce.*another route"
            ):
                check_gradients(fm, layers, rec, root, column, "Route", "another route", skip_nonfinite=False)


# -- nn.Conv1d: one table entry, exact where K-FAC is exact ------------------------------------------------------------


@pytest.mark.parametrize("route", [KFAC, EKFAC])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {"stride": 2, "padding": 1, "dilation": 2},
        {"padding": 2, "padding_mode": "circular"},
        {"padding": "same"},
    ],
    ids=["strided", "circular", "same"],
)
def test_kfac_on_a_single_conv1d_with_squared_error_is_the_gauss_newton(route, bias, options):
    """One nn.Conv1d with squared error on every output: each location's output Hessian is 2 I, so S (x) A (the
    locations as further rows of A, S summed over them) equals the dense Gauss-Newton matrix."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, bias=bias, **options), nn.Flatten()).double()
    X = torch.randn(30, 2, 9, generator=g, dtype=DT)
    with torch.no_grad():
        Y = torch.randn(*model(X).shape, generator=g, dtype=DT)
    fm = fmodel_of(model, RegressionTask(weight_decay=0.1))
    data = as_data_source((X, Y), batch_size=8)
    curv = route(damping=0.01).fit(fm, data, progress=False)
    G = fm.dense_gauss_newton(data) + 0.01 * torch.eye(fm.num_params, dtype=DT)
    D = curv.matvec(torch.eye(fm.num_params, dtype=DT))
    assert float((D - G).norm() / G.norm()) < 1e-10
    V = torch.randn(4, fm.num_params, generator=g, dtype=DT)
    torch.testing.assert_close(curv.solve(V), torch.linalg.solve(G, V.T).T, rtol=1e-8, atol=1e-10)
