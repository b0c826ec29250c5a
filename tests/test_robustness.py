"""Edge cases found by fuzzing: double backward, NaN ordering, integer
overflow, mixed devices, error names, huge E, empty and zero-byte tensors.
Expected values are worked by hand or come from moe_routing.reference."""
import math
import subprocess
import sys
import time

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

ops = torch.ops.moe_routing
nan, inf = math.nan, math.inf


def run_isolated(code):
    """Runs code in a fresh interpreter (a crash must not take pytest down)."""
    return subprocess.run([sys.executable, "-c", "import torch, moe_routing as mr\n" + code],
                          capture_output=True, text=True, timeout=120)


# --- 1. double backward -----------------------------------------------------

def _second_backward_raises(output, inputs, op):
    grads = torch.autograd.grad(output, inputs, create_graph=True)
    total = sum(g.sum() for g in grads if g is not None and g.requires_grad)
    with pytest.raises(RuntimeError, match=rf"moe_routing::{op}: double backward is not supported"):
        total.backward()


def test_double_backward_route_raises():
    logits = torch.randn(5, 6, requires_grad=True)
    w, _, s = mr.route(logits, 2)
    _second_backward_raises((w * torch.randn_like(w)).sum() + (s * s).sum(), [logits], "route_backward")


def test_double_backward_combine_raises():
    slots = mr.plan(torch.tensor([[0, 1], [1, 2], [2, 0]]), 3, 2).slots
    rows = torch.randn(6, 4, requires_grad=True)
    w = torch.rand(3, 2, requires_grad=True)
    _second_backward_raises((mr.combine(rows, slots, w) ** 2).sum(), [rows, w], "combine_backward")


def test_double_backward_losses_raise():
    scores = torch.softmax(torch.randn(6, 4), -1).requires_grad_()
    experts = torch.tensor([[0], [1], [2], [3], [0], [1]])
    _second_backward_raises(mr.load_balancing_loss(scores, experts) ** 2, [scores],
                            "load_balancing_loss_backward")
    logits = torch.randn(6, 4, requires_grad=True)
    _second_backward_raises(mr.z_loss(logits), [logits], "z_loss_backward")


def test_double_backward_expert_choice_and_grouped_mm_raise():
    scores = torch.rand(6, 3, requires_grad=True)
    _second_backward_raises((mr.expert_choice(scores, 2).weights ** 2).sum(), [scores],
                            "expert_choice_backward")
    x = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(2, 3, 4, requires_grad=True)
    out = mr.grouped_mm(x, weight, torch.tensor([2, 2]))
    _second_backward_raises((out ** 2).sum(), [x, weight], "grouped_mm_backward")


def test_dispatch_is_twice_differentiable():
    slots = torch.tensor([[0, 3], [-1, 1], [2, -1]])
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: mr.dispatch(x, slots, 5), (x,))
    # d/dx sum(dispatch(x)^2) = 2 x * (kept choices of the token): again in x, 2 * kept.
    g, = torch.autograd.grad((mr.dispatch(x, slots, 5) ** 2).sum(), x, create_graph=True)
    g.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[4.0, 4.0], [2.0, 2.0], [2.0, 2.0]],
                                                    dtype=torch.float64))
