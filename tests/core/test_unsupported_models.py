"""Models and data forms the default route could not trace: attention without forward-mode AD, recurrent layers
that ``vmap`` cannot batch, half-precision models; each gives the correct answer (checked against plain autograd
and finite differences in float64) or an error naming what is unsupported and the fix."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

import datatrace
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.gradients.products import ggn_vp
from datatrace.verification.training import fit_full_batch

WD = 0.1


class Attention(nn.Module):
    """A sequence classifier with ``nn.MultiheadAttention`` (fused SDPA kernel: no forward-mode AD on CPU)."""

    def __init__(self, d: int = 3, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d, e)
        self.attention = nn.MultiheadAttention(e, 2, batch_first=True)
        self.head = nn.Linear(e, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.head(a.mean(dim=1))


class ScaledDotProduct(nn.Module):
    """The same with ``F.scaled_dot_product_attention`` called directly."""

    def __init__(self, d: int = 3, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * e)
        self.head = nn.Linear(e, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (t.reshape(b, length, 2, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, length, e / heads): the fused kernel
        return self.head(a.transpose(1, 2).reshape(b, length, -1).mean(dim=1))


class Recurrent(nn.Module):
    """A sequence classifier on the last state of an ``nn.LSTM`` / ``GRU`` / ``RNN``."""

    def __init__(self, cell: type[nn.Module], d: int = 3, h: int = 3, k: int = 2) -> None:
        super().__init__()
        self.rnn = cell(d, h, batch_first=True)
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequences(n: int = 16, length: int = 4, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, length, d, generator=g, dtype=torch.float64)
    y = (X[:, :, 0].sum(dim=1) > 0).long()
    flip = torch.randperm(n, generator=g)[: n // 4]
    y[flip] = 1 - y[flip]  # not separable: a finite minimum
    return X, y


def trained(model: nn.Module, data: tuple) -> nn.Module:
    task = datatrace.ClassificationTask(weight_decay=WD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's "no batching rule" performance note
        return fit_full_batch(model.double(), task, data, max_iter=500)


# -- independent oracles: plain autograd on the model, no datatrace code ------------------------------------------
def named(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def theta_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def example_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One backward pass per example (plain autograd), shape (n, p)."""
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        F.cross_entropy(model(X[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def objective_gradient(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    t = theta.detach().requires_grad_(True)
    loss = F.cross_entropy(functional_call(model, named(model, t), (X,)), y) + 0.5 * WD * (t * t).sum()
    return torch.autograd.grad(loss, t)[0]


def fd_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the objective's gradient (first derivatives only), symmetrised."""
    theta = theta_of(model)
    cols = []
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = h
        cols.append(
            (objective_gradient(model, X, y, theta + e) - objective_gradient(model, X, y, theta - e))
            / (2 * h)
        )
    H = torch.stack(cols, dim=1)
    return 0.5 * (H + H.T)


def influence_oracle(model: nn.Module, X: torch.Tensor, y: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``score[q, i] = (1/n) g_q^T H^-1 g_i`` (queries = the training set)."""
    G = example_grads(model, X, y)
    return G @ torch.linalg.solve(H, G.T) / len(X)


# -- case 13: attention without forward-mode AD ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [Attention, ScaledDotProduct], ids=["MultiheadAttention", "sdpa"])
def test_attention_hvp_falls_back_to_double_backward_and_matches_finite_differences(make, caplog):
    torch.manual_seed(0)
    X, y = sequences()
    model = make().double().eval()
    fmodel = FunctionalModel(
        prepare_model(model, torch.float64), datatrace.ClassificationTask(weight_decay=WD)
    )
    data = as_data_source((X, y), batch_size=6)  # several batches: the switch happens once
    V = torch.randn(3, fmodel.num_params, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="datatrace.gradients.functional"):
        hv = fmodel.hvp(V, data)
        fmodel.hvp(V, data)
    assert fmodel.hvp_mode == "reverse-over-reverse"
    assert caplog.text.count("Hessian-vector products use double backward") == 1
    assert "forward AD" in caplog.text  # the reason: PyTorch's own words
    torch.testing.assert_close(hv, V @ fd_hessian(model, X, y), rtol=1e-6, atol=1e-7)


def test_exact_on_multihead_attention_gives_the_exact_influence():
    torch.manual_seed(0)
    X, y = sequences()
    model = trained(Attention(), (X, y))
    H = fd_hessian(model, X, y)
    assert torch.linalg.eigvalsh(H).min() > 0  # a true minimum: the exact answer needs no damping
    task = datatrace.ClassificationTask(weight_decay=WD)
    inf = datatrace.InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, y))
    assert inf.curvature_.info["damping"] == 0.0
    torch.testing.assert_close(inf.fmodel_.dense_hessian(inf.train_), H, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        inf.score((X, y)).values, influence_oracle(model, X, y, H), rtol=1e-5, atol=1e-8
    )


def test_gauss_newton_products_fall_back_to_reverse_mode_on_attention():
    torch.manual_seed(0)
    X, y = sequences(n=8)
    fmodel = FunctionalModel(
        prepare_model(Attention(), torch.float64), datatrace.ClassificationTask(weight_decay=WD)
    )
    V = torch.randn(2, fmodel.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = fmodel.dense_gauss_newton(as_data_source((X, y)))
    torch.testing.assert_close(ggn_vp(fmodel, V, (X, y)), V @ dense)
    assert fmodel.hvp_mode == "reverse-over-reverse"


def test_reverse_mode_products_equal_forward_mode_on_an_mlp(make_mlp, classification_data):
    """The fallback formulas on a model where both modes work: the same H v and G v."""
    task = datatrace.ClassificationTask(weight_decay=WD)
    data = as_data_source(classification_data, batch_size=25)
    forward = FunctionalModel(make_mlp(), task)
    reverse = FunctionalModel(make_mlp(), task)
    reverse.hvp_mode = "reverse-over-reverse"
    V = torch.randn(4, forward.num_params, dtype=torch.float64)
    torch.testing.assert_close(reverse.hvp(V, data), forward.hvp(V, data))
    torch.testing.assert_close(ggn_vp(reverse, V, data), ggn_vp(forward, V, data))


class _CubeNoSecondDerivative(torch.autograd.Function):
    """x**3 with a backward that cannot be differentiated again and no forward-mode rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class _Cubic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CubeNoSecondDerivative.apply(self.linear(x))


def test_model_without_any_second_derivative_says_so_and_names_first_order_routes(classification_data):
    fmodel = FunctionalModel(prepare_model(_Cubic(), torch.float64), datatrace.ClassificationTask())
    with pytest.raises(RuntimeError, match=r"failed both by forward-over-reverse.*Fix: .*'ekfac'"):
        fmodel.hvp(torch.ones(1, fmodel.num_params, dtype=torch.float64), as_data_source(classification_data))


# -- case 14: recurrent layers that vmap cannot batch ---------------------------------------------------------------
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_per_example_grads_fall_back_to_a_loop(cell, caplog):
    torch.manual_seed(0)
    X, y = sequences(n=6)
    model = Recurrent(cell).double().eval()
    fmodel = FunctionalModel(prepare_model(model, torch.float64), datatrace.ClassificationTask())
    with caplog.at_level(logging.INFO, logger="datatrace.gradients.functional"):
        rows = fmodel.per_example_grads((X[:3], y[:3]))
        rows = torch.cat([rows, fmodel.per_example_grads((X[3:], y[3:]))])
    torch.testing.assert_close(rows, example_grads(model, X, y))
    if not fmodel.vmap_examples:  # the models vmap cannot batch on this torch: the switch is logged once
        assert caplog.text.count("vmap cannot batch") == 1


def test_lstm_influence_equals_plain_autograd():
    torch.manual_seed(0)
    X, y = sequences()
    model = trained(Recurrent(nn.LSTM), (X, y))
    H = torch.autograd.functional.hessian(
        lambda t: (
            F.cross_entropy(functional_call(model, named(model, t), (X,)), y) + 0.5 * WD * (t * t).sum()
        ),
        theta_of(model),
    )
    assert torch.linalg.eigvalsh(H).min() > 0
    inf = datatrace.InfluenceFunction(
        model, datatrace.ClassificationTask(weight_decay=WD), curvature="exact", progress=False
    ).fit((X, y))
    assert inf.curvature_.info["damping"] == 0.0
    torch.testing.assert_close(
        inf.score((X, y)).values, influence_oracle(model, X, y, H), rtol=1e-6, atol=1e-9
    )


def test_loop_fallback_keeps_the_tasks_own_error():
    """A task that is wrong for the data is not hidden by the fallback: the loop's own error is raised."""
    model = Recurrent(nn.LSTM).double()
    fmodel = FunctionalModel(prepare_model(model, torch.float64), datatrace.ClassificationTask())
    X, y = sequences(n=4, d=5)  # the LSTM expects 3 features
    with pytest.raises(RuntimeError, match=r"input\.size"):
        fmodel.per_example_grads((X, y))


class _OutOfMemoryOnce(nn.Module):
    """Runs out of memory on its first call only (the batched attempt); a retry would succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes.")
        return self.linear(x)


def test_running_out_of_memory_is_not_taken_for_a_model_vmap_cannot_batch(regression_data):
    """Memory is the machine's problem: no silent switch to the slow loop or to double backward."""
    fmodel = FunctionalModel(prepare_model(_OutOfMemoryOnce(), torch.float64), datatrace.RegressionTask())
    with pytest.raises(RuntimeError, match=r"^DefaultCPUAllocator: not enough memory"):
        fmodel.per_example_grads(regression_data)
    fmodel.model.calls = 0
    with pytest.raises(RuntimeError, match=r"^DefaultCPUAllocator: not enough memory"):
        fmodel.hvp(torch.ones(1, fmodel.num_params, dtype=torch.float64), as_data_source(regression_data))
    assert fmodel.vmap_examples and fmodel.hvp_mode == "forward-over-reverse"


# -- case 16: half-precision models --------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_model_with_dtype_none_is_refused_up_front(half, classification_data):
    model = nn.Linear(3, 3).to(half)
    inf = datatrace.InfluenceFunction(model, datatrace.ClassificationTask(), dtype=None, progress=False)
    with pytest.raises(ValueError, match=rf"dtype=None .*{half}.*Fix: pass dtype=torch.float64"):
        inf.fit(classification_data)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_dtype_is_refused_at_construction(half):
    with pytest.raises(ValueError, match=rf"dtype={half} .*half precision.*Fix: pass dtype=torch.float64"):
        datatrace.InfluenceFunction(nn.Linear(3, 3), datatrace.ClassificationTask(), dtype=half)


def test_dtype_none_keeps_a_float32_model(classification_data):
    model = nn.Linear(3, 3)
    inf = datatrace.InfluenceFunction(
        model, datatrace.ClassificationTask(weight_decay=WD), dtype=None, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf.fit(classification_data)
    assert inf.fmodel_.dtype == torch.float32


# -- case 15: a Dataset of dicts (the Hugging Face form) ------------------------------------------------------------
class DictDataset(torch.utils.data.Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.X[i], "y": self.y[i]}


class DictTask(datatrace.Task):
    """Reads ``batch["x"]`` and ``batch["y"]``."""

    def outputs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss_from_outputs(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["y"], reduction="none")


@pytest.mark.parametrize("curvature", ["exact", "gauss-newton", "cg", "diagonal"])
def test_dict_batches_give_the_scores_of_the_tuple_form(curvature, make_mlp, classification_data):
    X, y = classification_data
    model = make_mlp()
    dicts = datatrace.InfluenceFunction(model, DictTask(weight_decay=WD), curvature=curvature, progress=False)
    dicts.fit(DictDataset(X, y))
    tuples = datatrace.InfluenceFunction(
        model, datatrace.ClassificationTask(weight_decay=WD), curvature=curvature, progress=False
    ).fit((X, y))
    torch.testing.assert_close(
        dicts.score(DictDataset(X[:5], y[:5])).values, tuples.score((X[:5], y[:5])).values
    )
    torch.testing.assert_close(dicts.self_influence(), tuples.self_influence())


@pytest.mark.parametrize("route", ["kfac", "ekfac", "projected"])
def test_layer_routes_give_the_scores_of_the_tuple_form_on_dict_batches(route, make_mlp, classification_data):
    """K-FAC, EK-FAC and the factorised projection read dict batches through the task, as the other routes."""
    X, y = classification_data
    model = make_mlp()

    def make(task):
        if route == "projected":
            return datatrace.ProjectedInfluence(model, task, progress=False)
        return datatrace.InfluenceFunction(model, task, curvature=route, progress=False)

    dicts = make(DictTask(weight_decay=WD)).fit(DictDataset(X, y))
    tuples = make(datatrace.ClassificationTask(weight_decay=WD)).fit((X, y))
    torch.testing.assert_close(
        dicts.score(DictDataset(X[:5], y[:5])).values, tuples.score((X[:5], y[:5])).values
    )


def test_dict_batches_with_a_tuple_task_name_the_form_and_the_fix(make_mlp, classification_data):
    X, y = classification_data
    inf = datatrace.InfluenceFunction(make_mlp(), datatrace.ClassificationTask(), progress=False)
    with pytest.raises(
        ValueError,
        match=r"input_key=None.*dicts with keys \['x', 'y'\].*Fix: pass "
        r"ClassificationTask\(input_key=..., target_key=...\)",
    ):
        inf.fit(DictDataset(X, y))


# -- case 17: nn.EmbeddingBag outside the parameters in scope ------------------------------------------------------
class Bag(nn.Module):
    """Bag-of-tokens classifier: ``nn.EmbeddingBag`` (mean) then a linear head."""

    def __init__(self, vocab: int = 12, e: int = 3, k: int = 3) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, e, mode="mean")
        self.head = nn.Linear(e, k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


def tokens(n: int = 30, length: int = 5, vocab: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_embedding_bag_out_of_scope_gives_the_exact_influence_of_the_head():
    """Out-of-scope parameters are constants: ``nn.EmbeddingBag``'s weight left requiring grad made every
    ``torch.func.grad`` fail ("Autograd not support dtype: Long") once ``params=`` (or a K-FAC route's default
    scope) excluded it. Oracle: logistic regression of the head on the fixed bag features, by plain autograd."""
    torch.manual_seed(0)
    X, y = tokens()
    model = Bag().double()
    features = model.bag(X).detach()
    head = model.head

    def loss(t: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        out = functional_call(head, named(head, t), (features[rows],))
        return F.cross_entropy(out, y[rows], reduction="sum")

    theta = theta_of(head)
    H = torch.autograd.functional.hessian(lambda t: loss(t) / len(X) + 0.5 * WD * (t * t).sum(), theta)
    t = theta.clone().requires_grad_(True)
    G = torch.stack([torch.autograd.grad(loss(t, slice(i, i + 1)), t)[0] for i in range(len(X))])
    oracle = G[:4] @ torch.linalg.solve(H, G.T) / len(X)
    task = datatrace.ClassificationTask(weight_decay=WD)
    inf = datatrace.InfluenceFunction(
        model, task, curvature="exact", damping=0.0, params=["head"], progress=False
    ).fit((X, y))
    torch.testing.assert_close(inf.score((X[:4], y[:4])).values, oracle, rtol=1e-8, atol=1e-12)
    # EK-FAC covers the head by itself (EmbeddingBag is not a layer it supports): the scores of a frozen bag
    frozen = copy.deepcopy(model).requires_grad_(False)
    frozen.head.requires_grad_(True)
    ekfac = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit((X, y))
    ref = datatrace.InfluenceFunction(frozen, task, curvature="ekfac", progress=False).fit((X, y))
    torch.testing.assert_close(ekfac.score((X[:4], y[:4])).values, ref.score((X[:4], y[:4])).values)


# -- case 18: models that cannot be differentiated or have no values -----------------------------------------------
class Packed(nn.Module):
    """An LSTM over packed sequences (``pack_padded_sequence``); the lengths are the last input channel."""

    def __init__(self, d: int = 2, h: int = 3, k: int = 2) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, h, batch_first=True)
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = x[:, 0, -1].long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            x[..., :-1], lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def test_packed_sequences_are_refused_naming_the_cause_and_the_padded_rewrite():
    """torch.func cannot run a packed LSTM (its kernel reads raw memory); the error said to check the data."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 5, (8,), generator=g)
    X = torch.randn(8, 4, 3, generator=g, dtype=torch.float64)
    X[..., -1] = lengths[:, None].double()
    y = torch.randint(0, 2, (8,), generator=g)
    for make in (datatrace.InfluenceFunction, datatrace.ProjectedInfluence):
        with pytest.raises(
            ValueError, match=r"pack_padded_sequence.*Fix: run the recurrent layer on the padded"
        ):
            make(Packed().double(), datatrace.ClassificationTask(), progress=False).fit((X, y))


def test_a_model_on_the_meta_device_is_refused_at_construction():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    task = datatrace.ClassificationTask()
    pattern = (
        r"model=\"a model on the 'meta' device\" is not allowed: 4 of its tensors \(0\.weight.*Fix: load"
    )
    with pytest.raises(ValueError, match=pattern):
        datatrace.InfluenceFunction(model, task)
    with pytest.raises(ValueError, match=pattern):
        datatrace.ProjectedInfluence(model, task)
    with pytest.raises(ValueError, match=pattern):
        datatrace.TracIn(model, task, [{}], 0.1, batch_size_train=1)
