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

from conftest import DEVICES, on

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


def test_double_backward_route_raises(device):
    logits = torch.randn(5, 6, device=device, requires_grad=True)
    w, _, s = mr.route(logits, 2)
    _second_backward_raises((w * torch.randn_like(w)).sum() + (s * s).sum(), [logits], "route_backward")


def test_double_backward_combine_raises(device):
    slots = mr.plan(torch.tensor([[0, 1], [1, 2], [2, 0]], device=device), 3, 2).slots
    rows = torch.randn(6, 4, device=device, requires_grad=True)
    w = torch.rand(3, 2, device=device, requires_grad=True)
    _second_backward_raises((mr.combine(rows, slots, w) ** 2).sum(), [rows, w], "combine_backward")


def test_double_backward_losses_raise(device):
    scores = torch.softmax(torch.randn(6, 4, device=device), -1).requires_grad_()
    experts = torch.tensor([[0], [1], [2], [3], [0], [1]], device=device)
    _second_backward_raises(mr.load_balancing_loss(scores, experts) ** 2, [scores],
                            "load_balancing_loss_backward")
    logits = torch.randn(6, 4, device=device, requires_grad=True)
    _second_backward_raises(mr.z_loss(logits), [logits], "z_loss_backward")


def test_double_backward_expert_choice_and_grouped_mm_raise(device):
    scores = torch.rand(6, 3, device=device, requires_grad=True)
    _second_backward_raises((mr.expert_choice(scores, 2).weights ** 2).sum(), [scores],
                            "expert_choice_backward")
    x = torch.randn(5, 3, device=device, requires_grad=True)
    weight = torch.randn(2, 3, 4, device=device, requires_grad=True)
    out = mr.grouped_mm(x, weight, torch.tensor([2, 2], device=device))
    _second_backward_raises((out ** 2).sum(), [x, weight], "grouped_mm_backward")


def test_dispatch_is_twice_differentiable(device):
    slots = torch.tensor([[0, 3], [-1, 1], [2, -1]], device=device)
    x = torch.randn(3, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: mr.dispatch(x, slots, 5), (x,))
    # d/dx sum(dispatch(x)^2) = 2 x * (kept choices of the token): again in x, 2 * kept.
    g, = torch.autograd.grad((mr.dispatch(x, slots, 5) ** 2).sum(), x, create_graph=True)
    g.sum().backward()
    torch.testing.assert_close(x.grad.cpu(), torch.tensor([[4.0, 4.0], [2.0, 2.0], [2.0, 2.0]],
                                                          dtype=torch.float64))


# --- 2. NaN ranks last ------------------------------------------------------

def test_route_nan_logit_ranks_last_sigmoid(device):
    out = mr.route(torch.tensor([[nan, 1.0, 0.5]], device=device), 1, score="sigmoid")
    assert out.experts.tolist() == [[1]]
    # sigmoid scores (0, nan, 0.5 after sigmoid of -inf, nan, 0): -inf beats NaN.
    out = mr.route(torch.tensor([[-inf, nan, 0.0]], device=device), 3, score="sigmoid", normalize=False)
    assert out.experts.tolist() == [[2, 0, 1]]


def test_route_nan_bias_demotes_only_its_expert(device):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], device=device))
    out = mr.route(logits, 2, bias=torch.tensor([nan, 0.0, 0.0], device=device))
    assert out.experts.tolist() == [[1, 2]]
    torch.testing.assert_close(out.weights.cpu(), torch.tensor([[0.6, 0.4]]))


def test_route_softmax_nan_row_takes_lowest_indices(device):
    out = mr.route(torch.tensor([[1.0, nan, 2.0, 0.0]], device=device), 2)
    assert out.experts.tolist() == [[0, 1]]  # every score NaN: ties, lower index first
    assert out.scores.isnan().all()


def test_route_nan_groups(device):
    # Groups of 2 (sigmoid scores): g0 = (nan, .9): NaN score, ranks last; g1 = (.6, .5); g2 = (.2, .1).
    s = torch.tensor([[nan, 0.9, 0.6, 0.5, 0.2, 0.1]], dtype=torch.float64)
    out = mr.route(torch.logit(s).to(device), 2, score="sigmoid", num_groups=3, topk_groups=2)
    assert out.experts.tolist() == [[2, 3]]
    assert torch.equal(out.experts.cpu(), ref.route(torch.logit(s), 2, score="sigmoid", num_groups=3,
                                                    topk_groups=2)[1])


# CUDA's route takes k <= 32.
ADVERSARIAL = [(d, k) for d in DEVICES for k in (3, 33, 64) if d == "cpu" or k <= 32]


@pytest.mark.parametrize("device,k", ADVERSARIAL, ids=[f"{d}-{k}" for d, k in ADVERSARIAL])
def test_route_adversarial_values_match_reference(device, k):
    g = torch.Generator().manual_seed(k)
    palette = torch.tensor([nan, inf, -inf, 0.0, 1.0, -1.0, 1e30, -1e30])
    logits = palette[torch.randint(0, len(palette), (40, 64), generator=g)]
    bias = palette[torch.randint(0, len(palette), (64,), generator=g)] * 1e-3
    for kw in [dict(score="sigmoid"), dict(score="sigmoid", bias=bias),
               dict(score="sigmoid", bias=bias, num_groups=4, topk_groups=4 if k > 48 else 3),
               dict(score="softmax")]:
        out = mr.route(on(device, logits), k, **{n: on(device, v) if isinstance(v, torch.Tensor) else v
                                                 for n, v in kw.items()})
        expected = ref.route(logits, k, **kw)
        assert torch.equal(out.experts.cpu(), expected[1]), kw
        torch.testing.assert_close(out.scores.cpu(), expected[2], equal_nan=True)
        torch.testing.assert_close(out.weights.cpu(), expected[0], equal_nan=True)


def test_expert_choice_never_takes_nan_or_minus_inf(device):
    scores = torch.tensor([[nan, 0.1], [-inf, 0.2], [0.5, nan], [inf, -inf]], dtype=torch.float64)
    out = mr.expert_choice(on(device, scores), 3)
    assert out.tokens.tolist() == [[3, 2, -1], [1, 0, -1]]
    assert out.weights.tolist() == [[inf, 0.5, 0.0], [0.2, 0.1, 0.0]]
    expected = ref.expert_choice(scores, 3)
    assert torch.equal(out.tokens.cpu(), expected[1]) and torch.equal(out.weights.cpu(), expected[0])


@pytest.mark.parametrize("priority", ["score", "batch"])
def test_plan_nan_weights_rank_last(device, priority):
    experts = torch.zeros(4, 1, dtype=torch.long)
    weights = torch.tensor([[nan], [0.2], [0.9], [nan]])
    out = mr.plan(on(device, experts), 1, 2, weights=on(device, weights), priority=priority)
    # The two heaviest (.9 and .2) survive; "score" keeps choice (token) order, "batch" weight order.
    assert out.slots[:, 0].tolist() == ([-1, 0, 1, -1] if priority == "score" else [-1, 1, 0, -1])
    expected = ref.plan(experts, 1, 2, weights=weights, priority=priority)
    assert torch.equal(out.slots.cpu(), expected[0])



@pytest.mark.parametrize("priority", ["score", "batch"])
def test_plan_nan_weights_rank_last_in_long_sorts(device, priority):
    """300 assignments: long enough for a radix sort on CUDA, where a negated
    NaN (sign bit set) could sort first. NaN, -0/+0 and ties against the reference."""
    g = torch.Generator().manual_seed(3)
    experts = torch.randint(0, 3, (300, 2), generator=g)
    experts[:, 1] = (experts[:, 0] + 1) % 3
    weights = torch.randint(0, 4, (300, 2), generator=g).double() / 4
    weights[::7] = nan
    weights[1::11, 0] = nan
    weights[2::13] = -0.0
    out = mr.plan(on(device, experts), 3, 60, weights=on(device, weights), priority=priority)
    expected = ref.plan(experts, 3, 60, weights=weights, priority=priority)
    assert torch.equal(out.slots.cpu(), expected[0])
    assert (out.slots.cpu()[::7] == -1).all()  # all-NaN tokens lose every place (capacity 60 < 200 each)


def test_expert_choice_never_takes_nan_in_long_sorts(device):
    scores = torch.rand(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scores[::3, 0] = nan
    scores[0, :] = nan
    out = mr.expert_choice(on(device, scores), 150)
    expected = ref.expert_choice(scores, 150)
    assert torch.equal(out.tokens.cpu(), expected[1]) and torch.equal(out.weights.cpu(), expected[0])
    assert not (out.tokens.cpu()[0] % 3 == 0).any() and out.tokens[0, -1].item() == -1

# --- 3. integer overflow ----------------------------------------------------

def test_capacity_huge_arguments():
    result = run_isolated("print(mr.capacity(10, 2**58, 1, 1.0), mr.capacity(10**7, 1, 1, 1e6))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", str(10**7)]
    for args in [(2**62, 2**62, 2**62, 1e6), (2**40, 3, 2, 1.000001), (10**15, 2**50, 7, 0.5, 0),
                 (2**63 - 1, 1, 1, 1.0), (12345, 2**62, 2**61, 1e6)]:
        assert mr.capacity(*args) == ref.capacity(*args), args


def test_capacity_symbolic_token_count():
    def f(x):
        return x.new_zeros(mr.capacity(x.shape[0], 2**58, 2**57, 1.5, 0))

    compiled = torch.compile(f, backend="eager", dynamic=True, fullgraph=True)
    for T in (5, 1000):
        assert compiled(torch.zeros(T)).shape[0] == ref.capacity(T, 2**58, 2**57, 1.5, 0)


def test_plan_capacity_that_overflows_slots(device):
    experts = torch.tensor([[0], [3]], device=device)
    with pytest.raises(RuntimeError, match=r"moe_routing::plan: num_experts \* capacity must fit in int64"):
        mr.plan(experts, 4, 2**62)
    out = mr.plan(experts, 2**2, 2**60)  # 4 * 2**60 fits: slots e * C + c
    assert out.slots.tolist() == [[0], [3 * 2**60]]


# --- 4. mixed devices -------------------------------------------------------

def _calls(device="cpu"):
    """(op, function, tensor arguments on device) for every op, forward and backward."""
    T, E, k, H = 4, 3, 2, 5
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=device)
    slots = mr.plan(experts, E, 2).slots
    w, e, s = mr.route(torch.randn(T, E, device=device), k)
    mask = torch.ones(T, dtype=torch.bool, device=device)
    return [(op, fn, [on(device, t) for t in args]) for op, fn, args in [
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
    ]]


CALLS = [(op, i) for op, _, args in _calls() for i in range(len(args))]


@pytest.mark.parametrize("op,position", CALLS, ids=[f"{op}-{i}" for op, i in CALLS])
def test_mixed_devices_are_rejected(device, op, position):
    # On the CPU a meta tensor stands in for a second device; on CUDA the CPU is the second device.
    _, fn, args = next(c for c in _calls(device) if c[0] == op)
    fn(*args)  # all on one device: fine
    args = list(args)
    args[position] = args[position].to("meta" if device == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match=rf"moe_routing::{op}: \w+ must be on (cpu|meta|cuda:\d+) like the "
                                           rf"other inputs, got (cpu|meta|cuda:\d+)"):
        fn(*args)


# --- 5. error names ---------------------------------------------------------

def test_backward_errors_name_the_backward_op(device):
    slots = torch.tensor([[0], [1]], device=device)
    with pytest.raises(RuntimeError, match=r"moe_routing::combine_backward: weights must have the shape of slots"):
        ops.combine_backward(*on(device, torch.randn(2, 3), torch.randn(2, 3)), slots, on(device, torch.rand(2, 2)))
    with pytest.raises(RuntimeError, match=r"moe_routing::grouped_mm_backward: weight must be \[E, H=3, F\]"):
        ops.grouped_mm_backward(*on(device, torch.randn(4, 2), torch.randn(4, 3), torch.randn(2, 4, 2),
                                    torch.tensor([1, 1])))


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_loss_backwards_check_grad_is_scalar(device):
    scores = torch.rand(4, 3, device=device)
    experts = torch.zeros(4, 1, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"moe_routing::load_balancing_loss_backward: grad must be a scalar"):
        ops.load_balancing_loss_backward(torch.ones(2, device=device), scores, experts, None, None)
    with pytest.raises(RuntimeError, match=r"moe_routing::z_loss_backward: grad must be a scalar"):
        ops.z_loss_backward(torch.ones(2, device=device), scores, None)


# --- 6. huge E --------------------------------------------------------------

def test_route_k_equals_huge_e_is_fast():
    E = 2**16
    logits = torch.randn(8, E)
    logits[:, ::7] = 0.25  # ties
    logits[:, 5::11] = nan
    start = time.perf_counter()
    out = mr.route(logits, E, score="sigmoid")
    assert time.perf_counter() - start < 5.0
    assert torch.equal(out.experts, ref.route(logits, E, score="sigmoid")[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_route_limits_are_clear_errors():
    with pytest.raises(RuntimeError, match=r"moe_routing::route: on CUDA E must be <= 1024, got 2048"):
        mr.route(torch.randn(2, 2048, device="cuda"), 1)
    with pytest.raises(RuntimeError, match=r"moe_routing::route: on CUDA k must be <= 32, got 33"):
        mr.route(torch.randn(2, 64, device="cuda"), 33)
    with pytest.raises(RuntimeError, match=r"moe_routing::route: on CUDA num_groups must be <= 32, got 64"):
        mr.route(torch.randn(2, 64, device="cuda"), 1, num_groups=64)


# --- 7. z_loss with no expert column -----------------------------------------

@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_z_loss_needs_an_expert_column(device):
    with pytest.raises(RuntimeError, match=r"moe_routing::z_loss: logits must have at least one expert column"):
        mr.z_loss(torch.randn(3, 0, device=device))
    with pytest.raises(ValueError, match=r"z_loss: logits must have at least one expert column"):
        ref.z_loss(torch.randn(3, 0))


# --- 8. expert_choice_backward sums repeated tokens --------------------------

def test_expert_choice_backward_sums_repeated_tokens(device):
    grad = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    tokens = torch.tensor([[0, 0, 1], [2, -1, 2]])
    out = ops.expert_choice_backward(*on(device, grad, tokens), 3)
    assert out.tolist() == [[3.0, 0.0], [4.0, 0.0], [0.0, 40.0]]
    assert torch.equal(out.cpu(), ref.expert_choice_backward(grad, tokens, 3))


# --- 9. empty outputs, huge sizes --------------------------------------------

def test_zero_byte_tensors_return_at_once(device):
    d = dict(device=device)
    torch.zeros(1, **d).sum().item()  # start the device (a CUDA context) before the clock
    start = time.perf_counter()
    y = mr.combine(torch.empty(8, 0, **d), torch.empty(2**40, 0, dtype=torch.long, **d), torch.empty(2**40, 0, **d))
    assert y.shape == (2**40, 0) and y.device == torch.empty(0, **d).device
    assert mr.dispatch(torch.randn(4, 0, **d), torch.full((4, 1), -1, **d), 2**31).shape == (2**31, 0)
    assert ops.dispatch_backward(torch.empty(3, 0, **d), torch.empty(2**40, 0, dtype=torch.long, **d)).shape == (
        2**40, 0)
    slots = torch.tensor([[2**39], [-1]], **d)
    g_rows, g_w = ops.combine_backward(torch.empty(2, 0, **d), torch.empty(2**40, 0, **d), slots,
                                       torch.ones(2, 1, **d))
    assert g_rows.shape == (2**40, 0) and g_w.tolist() == [[0.0], [0.0]]
    loss = mr.load_balancing_loss(torch.empty(0, 4, **d), torch.empty(0, 2, dtype=torch.long, **d), seq_len=2**40)
    assert loss.item() == 0.0
    out = mr.plan(torch.empty(2**40, 0, dtype=torch.long, **d), 3, 2)
    assert out.slots.shape == (2**40, 0) and out.load.tolist() == [0, 0, 0]
    assert time.perf_counter() - start < 5.0


def test_zero_byte_outputs_still_check_slots():
    with pytest.raises(RuntimeError, match=r"moe_routing::dispatch: slots must be unique, but row 7 is assigned twice"):
        mr.dispatch(torch.randn(2, 0), torch.tensor([[7], [7]]), 2**31)
    with pytest.raises(RuntimeError, match=r"moe_routing::combine: slots must be -1 \(dropped\) or in \[0, num_rows=4\), got 4"):
        mr.combine(torch.randn(4, 0), torch.tensor([[4]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match=r"moe_routing::combine_backward: slots must be unique"):
        ops.combine_backward(torch.empty(2, 0), torch.empty(9, 0), torch.tensor([[3], [3]]), torch.ones(2, 1))


@pytest.mark.parametrize("counts", [[2**62, 2**62, 2**62], [2**63 - 1, 2], [3, 3]])
def test_grouped_mm_counts_past_the_rows(counts):
    with pytest.raises(RuntimeError, match=r"moe_routing::grouped_mm: counts must sum to at most R=5"):
        mr.grouped_mm(torch.randn(5, 3), torch.randn(len(counts), 3, 4), torch.tensor(counts))
