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


# --- 4. mixed devices -------------------------------------------------------

def _calls():
    """(op, function, tensor arguments) for every op, forward and backward."""
    T, E, k, H = 4, 3, 2, 5
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    slots = mr.plan(experts, E, 2).slots
    w, e, s = mr.route(torch.randn(T, E), k)
    mask = torch.ones(T, dtype=torch.bool)
    return [
        ("route", lambda l, b: ops.route(l, 1, bias=b), [torch.randn(T, E), torch.zeros(E)]),
        ("route_backward", lambda gw, gs, w, e, s: ops.route_backward(gw, gs, w, e, s, "softmax", True, 1.0, torch.float32),
         [w, s, w, e, s]),
        ("plan", lambda e, w, m: ops.plan(e, E, 2, weights=w, priority="score", mask=m), [experts, w, mask]),
        ("dispatch", lambda x, s: ops.dispatch(x, s, 6), [torch.randn(T, H), slots]),
        ("dispatch_backward", ops.dispatch_backward, [torch.randn(6, H), slots]),
        ("combine", ops.combine, [torch.randn(6, H), slots, w]),
        ("combine_backward", ops.combine_backward, [torch.randn(T, H), torch.randn(6, H), slots, w]),
        ("load_balancing_loss", lambda s, e, m: ops.load_balancing_loss(s, e, mask=m), [s, e, mask]),
        ("load_balancing_loss_backward", lambda g, s, e, m: ops.load_balancing_loss_backward(g, s, e, m, None),
         [torch.tensor(1.0), s, e, mask]),
        ("z_loss", lambda l, m: ops.z_loss(l, mask=m), [torch.randn(T, E), mask]),
        ("z_loss_backward", ops.z_loss_backward, [torch.tensor(1.0), torch.randn(T, E), mask]),
        ("expert_choice", lambda s, m: ops.expert_choice(s, 2, mask=m), [s, mask]),
        ("expert_choice_backward", lambda g, t: ops.expert_choice_backward(g, t, T),
         [torch.rand(E, 2), torch.zeros(E, 2, dtype=torch.long)]),
        ("grouped_mm", ops.grouped_mm, [torch.randn(T, H), torch.randn(2, H, 3), torch.tensor([1, 2])]),
        ("grouped_mm_backward", ops.grouped_mm_backward,
         [torch.randn(T, 3), torch.randn(T, H), torch.randn(2, H, 3), torch.tensor([1, 2])]),
    ]


CALLS = [(op, i) for op, _, args in _calls() for i in range(len(args))]


@pytest.mark.parametrize("op,position", CALLS, ids=[f"{op}-{i}" for op, i in CALLS])
def test_mixed_devices_are_rejected(op, position):
    _, fn, args = next(c for c in _calls() if c[0] == op)
    fn(*args)  # all on the CPU: fine
    args = list(args)
    args[position] = args[position].to("meta")
    with pytest.raises(RuntimeError, match=rf"moe_routing::{op}: \w+ must be on (cpu|meta) like the other inputs"):
        fn(*args)


# --- 5. error names ---------------------------------------------------------

def test_backward_errors_name_the_backward_op():
    slots = torch.tensor([[0], [1]])
    with pytest.raises(RuntimeError, match=r"moe_routing::combine_backward: weights must have the shape of slots"):
        ops.combine_backward(torch.randn(2, 3), torch.randn(2, 3), slots, torch.rand(2, 2))
    with pytest.raises(RuntimeError, match=r"moe_routing::grouped_mm_backward: weight must be \[E, H=3, F\]"):
        ops.grouped_mm_backward(torch.randn(4, 2), torch.randn(4, 3), torch.randn(2, 4, 2), torch.tensor([1, 1]))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_loss_backwards_check_grad_is_scalar(device):
    scores = torch.rand(4, 3, device=device)
    experts = torch.zeros(4, 1, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"moe_routing::load_balancing_loss_backward: grad must be a scalar"):
        ops.load_balancing_loss_backward(torch.ones(2, device=device), scores, experts, None, None)
    with pytest.raises(RuntimeError, match=r"moe_routing::z_loss_backward: grad must be a scalar"):
        ops.z_loss_backward(torch.ones(2, device=device), scores, None)


# --- 7. z_loss with no expert column -----------------------------------------

@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_z_loss_needs_an_expert_column(device):
    with pytest.raises(RuntimeError, match=r"moe_routing::z_loss: logits must have at least one expert column"):
        mr.z_loss(torch.randn(3, 0, device=device))
    with pytest.raises(ValueError, match=r"z_loss: logits must have at least one expert column"):
        ref.z_loss(torch.randn(3, 0))
