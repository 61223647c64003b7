"""The differentiable optimizer steps of a replay against torch.optim, and their batched derivatives."""

from __future__ import annotations

import warnings

import pytest
import torch

from datatrace.run.optimizers import initial_state, optimizer_step


def adam_hyper() -> dict:
    return {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def test_adam_step_equals_torch_optim_bit_for_bit_including_zero_gradients():
    torch.manual_seed(0)
    param = torch.randn(40)
    grads = [torch.randn(40) for _ in range(3)]
    for g in grads:
        g[:7] = 0.0  # entries that never get a gradient: v stays 0, sqrt(v) must be exactly 0
    live = torch.nn.Parameter(param.clone())
    opt = torch.optim.Adam([live], **adam_hyper())
    p, state = param.clone(), initial_state("adam", adam_hyper(), param)
    for g in grads:
        live.grad = g.clone()
        opt.step()
        (p,), (state,) = optimizer_step("adam", adam_hyper(), [p], [g], [state])
        assert torch.equal(p, live.detach())


def test_adam_step_has_a_finite_derivative_where_v_is_zero_and_batches_without_a_fallback():
    torch.manual_seed(1)
    param = torch.randn(30, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(30, dtype=torch.float64)
    grad[:5] = 0.0
    grad.requires_grad_(True)
    state = initial_state("adam", adam_hyper(), param)
    (new,), _ = optimizer_step("adam", adam_hyper(), [param], [grad], [state])
    cotangents = torch.randn(4, 30, dtype=torch.float64)
    show_fallbacks = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
    if show_fallbacks is None:
        pytest.skip("this torch cannot report vmap fallbacks")
    show_fallbacks(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a vmap fallback (a loop over the rows) warns
            batched = torch.autograd.grad(new, grad, cotangents, is_grads_batched=True, retain_graph=True)[0]
    finally:
        show_fallbacks(False)
    rows = torch.stack([torch.autograd.grad(new, grad, c, retain_graph=True)[0] for c in cotangents])
    assert torch.isfinite(batched).all()
    assert torch.allclose(batched, rows, rtol=1e-12, atol=1e-14)
    # first Adam step: the update is -lr * g / (|g| + eps), flat in g away from 0; at g = 0 its derivative is
    # lr / eps, and the zero-safe sqrt keeps it finite there
    largest = float(batched[:, :5].abs().max())
    assert largest == pytest.approx(0.01 / 1e-8 * float(cotangents[:, :5].abs().max()), rel=1e-6)
