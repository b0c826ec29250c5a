"""dispatch and combine: reference match over dtypes and layouts, gradients, determinism, opcheck."""
import itertools

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import FLOAT_DTYPES, assert_close, assert_close_to_exact, noncontiguous, random_experts, random_mask

# (T, H, E, k, capacity or None for dropless)
SHAPES = [(0, 8, 4, 2, 4), (1, 1, 1, 1, 1), (1, 7, 8, 8, None), (37, 64, 8, 2, 5),
          (300, 1000, 16, 3, None), (256, 96, 256, 8, 6), (513, 33, 8, 1, 40)]


def make_plan(T, E, k, capacity, seed=0, masked=False):
    experts = random_experts(T, E, k, seed=seed)
    mask = random_mask(T, seed=seed) if masked else None
    slots = mr.plan(experts, E, capacity, mask=mask).slots
    num_rows = T * k if capacity is None else E * capacity
    return slots, num_rows


def sample_inputs(dtype):
    """(x, slots, num_rows, expert_out, weights) over shapes, layouts and padding."""
    for i, ((T, H, E, k, capacity), masked) in enumerate(itertools.product(SHAPES, [False, True])):
        slots, num_rows = make_plan(T, E, k, capacity, seed=i, masked=masked)
        x = torch.randn(T, H).to(dtype)
        expert_out = torch.randn(num_rows, H).to(dtype)
        weights = torch.rand(T, k)
        if i % 2:
            x, expert_out = noncontiguous(x), noncontiguous(expert_out)
        if capacity is not None and i % 3 == 0:
            expert_out = expert_out.view(E, capacity, H)  # the [E, C, H] form
        yield x, slots, num_rows, expert_out, weights


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dispatch_matches_reference(dtype):
    for x, slots, num_rows, _, _ in sample_inputs(dtype):
        out = mr.dispatch(x, slots, num_rows)
        assert out.dtype == dtype and out.shape == (num_rows, x.shape[1])
        assert torch.equal(out, ref.dispatch(x, slots, num_rows))  # a copy: exact


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_combine_matches_reference(dtype):
    for _, slots, _, expert_out, weights in sample_inputs(dtype):
        y = mr.combine(expert_out, slots, weights)
        assert y.dtype == dtype and y.shape == (slots.shape[0], expert_out.shape[-1])
        assert_close(y, ref.combine(expert_out, slots, weights))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference(dtype):
    # Gradients against the reference run in float64 on the same values.
    for x, slots, num_rows, expert_out, weights in sample_inputs(dtype):
        leaves = [t.detach().clone().requires_grad_() for t in (x, expert_out, weights)]
        exact = [t.detach().double().requires_grad_() for t in (x, expert_out, weights)]
        gd = torch.randn(num_rows, x.shape[1]).to(dtype)
        gy = torch.randn(slots.shape[0], x.shape[1]).to(dtype)
        for (xx, eo, w), fns in [(leaves, mr), (exact, ref)]:
            dispatched, combined = fns.dispatch(xx, slots, num_rows), fns.combine(eo, slots, w)
            torch.autograd.backward([dispatched, combined],
                                    [gd.to(dispatched.dtype), gy.to(combined.dtype)])
        for a, b in zip(leaves, exact):
            assert a.grad.dtype == a.dtype and a.grad.shape == b.shape
            assert_close_to_exact(a.grad, b.grad, dtype if a.dtype == dtype else a.dtype)


def test_dropped_token_gets_zeros_and_unfilled_rows_are_zero():
    x = torch.randn(3, 4)
    slots = torch.tensor([[0], [-1], [2]])
    out = mr.dispatch(x, slots, 4)
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[3], torch.zeros(4))
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    y = mr.combine(out, slots, torch.full((3, 1), 2.0))
    assert torch.equal(y[1], torch.zeros(4))
    torch.testing.assert_close(y[0], 2 * x[0])


def test_combine_accumulates_in_float32():
    # bf16 rows whose sum needs float32: 256 + 1 + 1 is 258 in float32 but
    # (256 + 1) + 1 rounds to 256 at each step in bf16.
    rows = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16)
    slots = torch.tensor([[0, 1, 2]])
    y = mr.combine(rows, slots, torch.ones(1, 3))
    assert y.item() == 258.0


def test_gradcheck():
    T, H, E, k, C = 9, 5, 4, 2, 3
    slots, num_rows = make_plan(T, E, k, C, masked=True)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    expert_out = torch.randn(num_rows, H, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
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
def test_opcheck(requires_grad):
    for dtype in (torch.float32, torch.bfloat16):
        for x, slots, num_rows, expert_out, weights in list(sample_inputs(dtype))[::3]:
            x, expert_out, weights = (t.detach().clone().requires_grad_(requires_grad)
                                      for t in (x, expert_out, weights))
            torch.library.opcheck(torch.ops.moe_routing.dispatch, (x, slots, num_rows))
            torch.library.opcheck(torch.ops.moe_routing.combine, (expert_out, slots, weights))
