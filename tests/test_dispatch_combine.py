"""dispatch and combine: reference match over dtypes and layouts, gradients, determinism, opcheck."""
import itertools

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import (FLOAT_DTYPES, assert_close_on, assert_close_to_exact_on, combine_abs_terms,
                      combine_weight_grad_abs_terms, cpu, noncontiguous, on, random_experts, random_mask)

# (T, H, E, k, capacity or None for dropless)
SHAPES = [(0, 8, 4, 2, 4), (1, 1, 1, 1, 1), (1, 7, 8, 8, None), (37, 64, 8, 2, 5),
          (300, 1000, 16, 3, None), (256, 96, 256, 8, 6), (513, 33, 8, 1, 40)]


def make_plan(T, E, k, capacity, seed=0, masked=False, device="cpu"):
    """slots (planned on the CPU, then moved: these tests do not depend on
    plan's kernel for the device) and the number of rows."""
    experts = random_experts(T, E, k, seed=seed)
    mask = random_mask(T, seed=seed) if masked else None
    slots = mr.plan(experts, E, capacity, mask=mask).slots
    num_rows = T * k if capacity is None else E * capacity
    return on(device, slots), num_rows


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(x, slots, num_rows, expert_out, weights) on device over shapes,
    layouts and padding (made on the CPU: the same values on every device)."""
    for i, ((T, H, E, k, capacity), masked) in enumerate(itertools.product(SHAPES, [False, True])):
        slots, num_rows = make_plan(T, E, k, capacity, seed=i, masked=masked, device=device)
        x = on(device, torch.randn(T, H).to(dtype))
        expert_out = on(device, torch.randn(num_rows, H).to(dtype))
        weights = on(device, torch.rand(T, k))
        if i % 2:
            x, expert_out = noncontiguous(x), noncontiguous(expert_out)
        if capacity is not None and i % 3 == 0:
            expert_out = expert_out.view(E, capacity, H)  # the [E, C, H] form
        yield (x.requires_grad_(requires_grad), slots, num_rows, expert_out.requires_grad_(requires_grad),
               weights.requires_grad_(requires_grad))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dispatch_matches_reference(device, dtype):
    for x, slots, num_rows, _, _ in sample_inputs(device, dtype=dtype):
        out = mr.dispatch(x, slots, num_rows)
        assert out.dtype == dtype and out.shape == (num_rows, x.shape[1]) and out.device == x.device
        assert torch.equal(out.cpu(), ref.dispatch(*cpu(x, slots), num_rows))  # a copy: exact


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_combine_matches_reference(device, dtype):
    for _, slots, _, expert_out, weights in sample_inputs(device, dtype=dtype):
        y = mr.combine(expert_out, slots, weights)
        assert y.dtype == dtype and y.shape == (slots.shape[0], expert_out.shape[-1])
        assert y.device == expert_out.device
        assert_close_on(device, y, ref.combine(*cpu(expert_out, slots, weights)),
                        abs_sum=combine_abs_terms(expert_out, slots, weights), n=slots.shape[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference(device, dtype):
    # Gradients against the reference run in float64 on the same values (on the CPU).
    for x, slots, num_rows, expert_out, weights in sample_inputs(device, dtype=dtype):
        leaves = [t.detach().clone().requires_grad_() for t in (x, expert_out, weights)]
        exact = [t.detach().cpu().double().requires_grad_() for t in (x, expert_out, weights)]
        gd = torch.randn(num_rows, x.shape[1]).to(dtype)
        gy = torch.randn(slots.shape[0], x.shape[1]).to(dtype)
        for (xx, eo, w), fns, s in [(leaves, mr, slots), (exact, ref, slots.cpu())]:
            dispatched, combined = fns.dispatch(xx, s, num_rows), fns.combine(eo, s, w)
            torch.autograd.backward([dispatched, combined], [on(xx.device, gd.to(dispatched.dtype)),
                                                             on(xx.device, gy.to(combined.dtype))])
        # The sums behind each gradient: x's over its k rows of gd, expert_out's
        # none (weight times gy), the weights' over H (a dot product of gy and a row).
        terms = [(combine_abs_terms(gd, slots), slots.shape[1]), (None, 1),
                 (combine_weight_grad_abs_terms(gy, expert_out, slots), x.shape[1])]
        for a, b, (abs_sum, n) in zip(leaves, exact, terms):
            assert a.grad.dtype == a.dtype and a.grad.shape == b.shape and a.grad.device == a.device
            assert_close_to_exact_on(device, a.grad, b.grad, dtype if a.dtype == dtype else a.dtype,
                                     abs_sum=abs_sum, n=n)


def test_dropped_token_gets_zeros_and_unfilled_rows_are_zero(device):
    x = torch.randn(3, 4, device=device)
    slots = torch.tensor([[0], [-1], [2]], device=device)
    out = mr.dispatch(x, slots, 4)
    assert torch.equal(out[1].cpu(), torch.zeros(4)) and torch.equal(out[3].cpu(), torch.zeros(4))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    y = mr.combine(out, slots, torch.full((3, 1), 2.0, device=device))
    assert torch.equal(y[1].cpu(), torch.zeros(4))
    torch.testing.assert_close(y[0], 2 * x[0])


def test_combine_accumulates_in_float32(device):
    # bf16 rows whose sum needs float32: 256 + 1 + 1 is 258 in float32 but
    # (256 + 1) + 1 rounds to 256 at each step in bf16.
    rows = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16, device=device)
    slots = torch.tensor([[0, 1, 2]], device=device)
    y = mr.combine(rows, slots, torch.ones(1, 3, device=device))
    assert y.item() == 258.0


def test_gradcheck(device):
    T, H, E, k, C = 9, 5, 4, 2, 3
    slots, num_rows = make_plan(T, E, k, C, masked=True, device=device)
    x = torch.randn(T, H, dtype=torch.float64, device=device, requires_grad=True)
    expert_out = torch.randn(num_rows, H, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mr.dispatch(x, slots, num_rows), (x,))
    assert torch.autograd.gradcheck(lambda eo, w: mr.combine(eo, slots, w), (expert_out, weights))
    eo3 = expert_out.detach().view(E, C, H).requires_grad_()
    assert torch.autograd.gradcheck(lambda eo, w: mr.combine(eo, slots, w), (eo3, weights))


def test_bitwise_deterministic_across_thread_counts():
    slots, num_rows = make_plan(2000, 8, 2, None, seed=5)
    expert_out = torch.randn(num_rows, 200, requires_grad=True)
    weights = torch.rand(2000, 2, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            y = mr.combine(expert_out, slots, weights)
            g_eo, g_w = torch.autograd.grad((y * y).sum(), (expert_out, weights))
            results.append((y, g_eo, g_w))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for dtype in (torch.float32, torch.bfloat16):
        for x, slots, num_rows, expert_out, weights in list(sample_inputs(device, requires_grad, dtype))[::3]:
            torch.library.opcheck(torch.ops.moe_routing.dispatch, (x, slots, num_rows))
            torch.library.opcheck(torch.ops.moe_routing.combine, (expert_out, slots, weights))
