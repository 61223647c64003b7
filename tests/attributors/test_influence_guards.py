"""InfluenceFunction's guards: sets of indices, the memory budget of the n x p training gradients (checked before
the gradient pass, with the curvature route's own need), and out-of-memory errors that are never reported as a
data mismatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import datatrace.attributors.base as attributor_base
from datatrace import ClassificationTask, InfluenceFunction, RegressionTask
from datatrace.attributors.base import FALLBACK_MEMORY_BYTES, MEMORY_FRACTION, default_memory_budget
from datatrace.curvature import ExactHessian
from datatrace.gradients.functional import FunctionalModel
from datatrace.verification.training import fit_full_batch

F64 = torch.float64
ALLOCATOR = "DefaultCPUAllocator: not enough memory: you tried to allocate 8000000000 bytes."


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(30) % 3
    X = torch.eye(3, dtype=F64)[y] + torch.randn(30, 3, generator=g, dtype=F64)
    task = ClassificationTask(weight_decay=0.1)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(3, 3).double(), task, (X, y), tolerance_grad=1e-10, max_iter=500)
    return X, y, InfluenceFunction(model, task, progress=False).fit((X, y))


# -- case 7: removal of a set -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("indices", "repeated"), [([3, 3], 3), ([1, 4, 7, 4], 4), ([2, -28], 2)])
def test_removal_params_refuses_a_repeated_index(fitted, indices, repeated):
    _, _, inf = fitted
    with pytest.raises(
        ValueError, match=rf"indices=.*is not allowed.*index {repeated} is repeated.*twice.*Fix"
    ):
        inf.removal_params(indices)


def test_removal_params_of_a_set_is_the_sum_of_its_rows(fitted):
    _, _, inf = fitted
    rows = inf.params_change([3, 8])
    group = inf.removal_params([8, 3])
    for name in rows:
        torch.testing.assert_close(group[name], rows[name].sum(0), rtol=1e-12, atol=1e-15)


def test_params_change_is_per_index_so_a_repeat_is_the_same_row(fitted):
    """params_change answers each index on its own (no sum), so a repeated index is a repeated row, not a
    double count."""
    _, _, inf = fitted
    rows = inf.params_change([3, 3, 5])
    for value in rows.values():
        assert torch.equal(value[0], value[1])
        assert value.shape[0] == 3


# -- case 12: the memory budget of the training gradients -------------------------------------------------------


def _no_gradient_pass(monkeypatch):
    def forbidden(self, batch):
        raise AssertionError("the gradient pass ran before the size check")

    monkeypatch.setattr(FunctionalModel, "per_example_grads", forbidden)


def test_kept_training_gradients_above_max_bytes_are_refused_before_the_gradient_pass(
    monkeypatch, regression_data
):
    X, y = regression_data  # 40 examples x 4 parameters in float64: 1,280 bytes
    _no_gradient_pass(monkeypatch)
    inf = InfluenceFunction(
        nn.Linear(3, 1).double(), RegressionTask(), progress=False, max_bytes=1000, keep_gradients=True
    )
    with pytest.raises(MemoryError) as info:
        inf.fit((X, y))
    message = str(info.value)
    assert "40 x 4 matrix" in message and "1.2 KiB" in message and "max_bytes=1,000 bytes (given)" in message
    assert "ProjectedInfluence(..., store_dir=...)" in message and "params=" in message
    assert "raise max_bytes" in message and "check that the model" not in message
    assert "keep_gradients='auto' or False" in message


def test_a_budget_that_fits_changes_nothing(regression_data):
    X, y = regression_data
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    exact = InfluenceFunction(model, RegressionTask(), progress=False, max_bytes=1280).fit((X, y))
    default = InfluenceFunction(model, RegressionTask(), progress=False).fit((X, y))
    assert torch.equal(exact.score((X[:3], y[:3])).values, default.score((X[:3], y[:3])).values)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "4GiB"])
def test_max_bytes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"max_bytes=.*is not allowed: expected an integer >= 1"):
        InfluenceFunction(nn.Linear(3, 1).double(), RegressionTask(), max_bytes=bad)


def test_default_budget_without_psutil_is_the_fixed_fallback(monkeypatch):
    monkeypatch.setattr(attributor_base, "psutil", None)
    assert default_memory_budget("cpu") == (
        FALLBACK_MEMORY_BYTES,
        "the fixed default used when psutil is not installed",
    )
    assert FALLBACK_MEMORY_BYTES == 4 * 1024**3


def test_default_budget_is_a_share_of_the_available_memory(monkeypatch, regression_data):
    class FakePsutil:
        @staticmethod
        def virtual_memory():
            return type("Memory", (), {"available": 2000})()

    monkeypatch.setattr(attributor_base, "psutil", FakePsutil)
    assert default_memory_budget()[0] == int(MEMORY_FRACTION * 2000)
    X, y = regression_data  # 1,280 bytes of gradients > 1,000 bytes of budget
    _no_gradient_pass(monkeypatch)
    with pytest.raises(MemoryError, match=r"max_bytes=1,000 bytes \(0.5 of the machine's available memory\)"):
        InfluenceFunction(
            nn.Linear(3, 1).double(), RegressionTask(), progress=False, keep_gradients=True
        ).fit((X, y))


def test_dense_route_size_is_checked_before_the_gradient_pass(monkeypatch, regression_data):
    X, y = regression_data
    _no_gradient_pass(monkeypatch)
    route = ExactHessian(max_bytes=100)  # the 4 x 4 Hessian with eigenvectors and workspace needs 384 bytes
    inf = InfluenceFunction(nn.Linear(3, 1).double(), RegressionTask(), curvature=route, progress=False)
    with pytest.raises(
        MemoryError, match=r"curvature='exact' forms a dense 4 x 4 matrix.*max_bytes=100 bytes"
    ):
        inf.fit((X, y))


@pytest.mark.parametrize("bad", [True, 0, 1e9])
def test_dense_route_max_bytes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"max_bytes=.*is not allowed: expected an integer >= 1"):
        ExactHessian(max_bytes=bad)


# -- case 12: out of memory is not a data mismatch --------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [RuntimeError(ALLOCATOR), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")]
)
def test_out_of_memory_in_the_gradient_pass_is_reported_as_memory(monkeypatch, regression_data, error):
    X, y = regression_data

    def oom(self, batch):
        raise error

    monkeypatch.setattr(FunctionalModel, "per_example_grads", oom)
    inf = InfluenceFunction(nn.Linear(3, 1).double(), RegressionTask(), progress=False)
    with pytest.raises(MemoryError) as info:
        inf.fit((X, y))
    message = str(info.value)
    assert "ran out of memory" in message and "not a problem with the data" in message
    assert "lower batch_size" in message and "check that the model" not in message
    assert info.value.__cause__ is error


def test_out_of_memory_on_queries_is_reported_as_memory(monkeypatch, fitted):
    X, y, inf = fitted

    def oom(self, batch, measurement=None):
        raise RuntimeError(ALLOCATOR)

    monkeypatch.setattr(FunctionalModel, "per_example_measurement_grads", oom)
    with pytest.raises(MemoryError, match=r"ran out of memory .*query examples.*not a problem with the data"):
        inf.score((X[:2], y[:2]))


def test_a_real_data_mismatch_still_blames_the_data(regression_data):
    X, y = regression_data
    inf = InfluenceFunction(nn.Linear(3, 1).double(), RegressionTask(), progress=False)
    with pytest.raises(ValueError, match=r"check that the model, the task and the data agree"):
        inf.fit((torch.cat([X, X], 1), y))
