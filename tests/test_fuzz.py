"""Property-based campaign: random shapes, dtypes, options and adversarial
values (NaN, +-inf, huge, ties) for every op against moe_routing.reference,
plus a crash hunt that runs extreme calls each in its own interpreter."""
import json
import math
import subprocess
import sys

import tempfile

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis caches what it learns under .hypothesis/ in the working
# directory: keep the checkout clean (the examples are derandomised anyway),
# in a directory removed when the test process ends.
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="moe_routing_hypothesis_")
set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)

import moe_routing as mr
from moe_routing import reference as ref

from conftest import TOLERANCES

ops = torch.ops.moe_routing
nan, inf = math.nan, math.inf

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Adversarial values: NaN, infinities, huge, ties (repeated small values).
PALETTE = [nan, inf, -inf, 1e30, -1e30, 0.0, -0.0, 0.5, 0.5, 1.0, -1.0, 2.0]
# Without huge finite values, for sums of products: there 1e30 would only
# measure cancellation (a fused multiply-add rounds it differently).
NO_HUGE = [v for v in PALETTE if not (math.isfinite(v) and abs(v) > 1e3)]


def tensor(draw, shape, dtype, adversarial=True, low=-4.0, high=4.0, palette=PALETTE):
    """Random values in [low, high), some replaced by palette values when adversarial."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    if adversarial and x.numel() and draw(st.booleans()):
        palette = torch.tensor(palette, dtype=torch.float64)
        pick = torch.rand(shape, generator=g) < draw(st.sampled_from([0.05, 0.3, 1.0]))
        x = torch.where(pick, palette[torch.randint(0, len(palette), shape, generator=g)], x)
    if draw(st.booleans()) and x.numel():  # quantised: many ties
        x = (x * 2).round() / 2
    return x.to(dtype)


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


@st.composite
def route_case(draw):
    T, E = draw(st.integers(0, 64)), draw(st.integers(1, 32))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    num_groups = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
    topk_groups = draw(st.integers(1, num_groups))
    k = draw(st.integers(1, E // num_groups * topk_groups))
    logits = tensor(draw, (T, E), dtype)
    bias = tensor(draw, (E,), torch.float32) * 0.1 if draw(st.booleans()) else None
    kw = dict(score=draw(st.sampled_from(["softmax", "sigmoid"])),
              normalize=draw(st.sampled_from([None, True, False])), bias=bias,
              num_groups=num_groups, topk_groups=topk_groups,
              scale=draw(st.sampled_from([1.0, 2.5])))
    return logits, k, kw


@FUZZ
@given(route_case())
def test_route(case):
    logits, k, kw = case
    out = mr.route(logits, k, **kw)
    w_ref, e_ref, s_ref = ref.route(logits, k, **kw)
    acc = ref.router_dtype(logits)
    close(out.scores, s_ref, acc)
    # The choice is checked exactly on the op's own scores: a score that rounds
    # differently by one ulp must not turn a near-tie into a false failure.
    selection = out.scores if kw["bias"] is None else out.scores + kw["bias"].to(acc)
    expected = ref.select(selection, k, num_groups=kw["num_groups"], topk_groups=kw["topk_groups"])
    assert torch.equal(out.experts, expected)
    if not torch.equal(out.experts, e_ref):
        return
    close(out.weights, w_ref, acc)
    if logits.dtype in (torch.float32, torch.float64) and torch.isfinite(logits).all():
        # Gradients through weights and scores, against autograd on the reference.
        x = logits.clone().requires_grad_()
        x_ref = logits.clone().requires_grad_()
        w, _, s = mr.route(x, k, **kw)
        w2, _, s2 = ref.route(x_ref, k, **kw)
        gw, gs = torch.ones_like(w).cumsum(-1), torch.ones_like(s).cumsum(-1) / s.shape[-1]
        ((w * gw).sum() + (s * gs).sum()).backward()
        ((w2 * gw).sum() + (s2 * gs).sum()).backward()
        rtol, atol = TOLERANCES[acc]
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol * 10, equal_nan=True)


@st.composite
def plan_case(draw):
    T, E = draw(st.integers(0, 64)), draw(st.integers(1, 32))
    k = draw(st.integers(0, min(E, 8)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    experts = torch.randint(0, E, (T, k), generator=g)
    capacity = draw(st.one_of(st.none(), st.integers(0, T * max(k, 1) + 2)))
    priority = draw(st.sampled_from(["choice", "token", "score", "batch"]))
    weights = tensor(draw, (T, k), torch.float32) if priority in ("score", "batch") or draw(st.booleans()) else None
    mask = torch.rand(T, generator=g) < 0.8 if draw(st.booleans()) else None
    return experts, E, capacity, dict(weights=weights, priority=priority, mask=mask)


@FUZZ
@given(plan_case())
def test_plan(case):
    experts, E, capacity, kw = case
    out = mr.plan(experts, E, capacity, **kw)
    expected = ref.plan(experts, E, capacity, **kw)
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


@FUZZ
@given(st.integers(0, 2**62), st.integers(1, 2**62), st.data())
def test_capacity(num_tokens, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    factor = data.draw(st.integers(1, 10**12)) / 10**6
    min_capacity = data.draw(st.integers(0, 2**62))
    assert mr.capacity(num_tokens, num_experts, k, factor, min_capacity) == \
        ref.capacity(num_tokens, num_experts, k, factor, min_capacity)


@st.composite
def rows_case(draw):
    T, k = draw(st.integers(0, 64)), draw(st.integers(1, 6))
    H = draw(st.integers(0, 16))
    num_rows = draw(st.integers(0, T * k + 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Unique slots: a random subset of rows, the rest dropped.
    flat = torch.full((T * k,), -1, dtype=torch.long)
    used = min(num_rows, T * k, draw(st.integers(0, T * k)))
    flat[torch.randperm(T * k, generator=g)[:used]] = torch.randperm(num_rows, generator=g)[:used]
    slots = flat.view(T, k)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    return slots, num_rows, H, dtype


@FUZZ
@given(rows_case(), st.data())
def test_dispatch(case, data):
    slots, num_rows, H, dtype = case
    x = tensor(data.draw, (slots.shape[0], H), dtype).requires_grad_()
    out = mr.dispatch(x, slots, num_rows)
    expected = ref.dispatch(x.detach(), slots, num_rows)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    grad = tensor(data.draw, (num_rows, H), dtype, adversarial=False)
    # The op sums a token's row gradients in float32: the reference in float64.
    x_ref = x.detach().double().requires_grad_()
    ref.dispatch(x_ref, slots, num_rows).backward(grad.double())
    out.backward(grad)
    close(x.grad, x_ref.grad.to(dtype), dtype)


@FUZZ
@given(rows_case(), st.data())
def test_combine(case, data):
    slots, num_rows, H, dtype = case
    T, k = slots.shape
    rows = tensor(data.draw, (num_rows, H), dtype, palette=NO_HUGE).requires_grad_()
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = tensor(data.draw, (T, k), wdtype, palette=NO_HUGE).requires_grad_()
    out = mr.combine(rows, slots, weights)
    rows_ref = rows.detach().clone().requires_grad_()
    w_ref = weights.detach().clone().requires_grad_()
    expected = ref.combine(rows_ref, slots, w_ref)
    close(out, expected, dtype)
    grad = tensor(data.draw, (T, H), dtype, adversarial=False)
    out.backward(grad)
    expected.backward(grad)
    if rows_ref.grad is None:  # nothing read a row: the reference built no graph to them
        rows_ref.grad = torch.zeros_like(rows)
    if w_ref.grad is None:
        w_ref.grad = torch.zeros_like(weights)
    close(rows.grad, rows_ref.grad, dtype)
    # Weight gradients are dot products over H in the rows' dtype: compare
    # them at the tolerance of the reduced dtype, scaled by H.
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(weights.grad, w_ref.grad.to(wdtype), rtol=rtol * max(H, 1),
                               atol=atol * max(H, 1), equal_nan=True)


@st.composite
def loss_case(draw):
    E, k = draw(st.integers(1, 32)), None
    k = draw(st.integers(1, min(E, 6)))
    seq_len = draw(st.sampled_from([None, 1, 2, 4, 8]))
    sequences = draw(st.integers(0, 8))
    T = sequences * (seq_len or draw(st.integers(0, 8)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Probabilities (ties included): huge values would only measure cancellation.
    scores = tensor(draw, (T, E), dtype, adversarial=False, low=0.0, high=1.0)
    experts = torch.randint(0, E, (T, k), generator=g)
    mask = torch.rand(T, generator=g) < 0.7 if draw(st.booleans()) else None
    return scores, experts, mask, seq_len


@FUZZ
@given(loss_case())
def test_load_balancing_loss(case):
    scores, experts, mask, seq_len = case
    scores = scores.requires_grad_()
    loss = mr.load_balancing_loss(scores, experts, mask=mask, seq_len=seq_len)
    scores_ref = scores.detach().clone().requires_grad_()
    expected = ref.load_balancing_loss(scores_ref, experts, mask=mask, seq_len=seq_len)
    close(loss, expected, scores.dtype)
    loss.backward()
    expected.backward()
    close(scores.grad, scores_ref.grad, scores.dtype)


@FUZZ
@given(st.integers(0, 64), st.integers(1, 32),
       st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), st.data())
def test_z_loss(T, E, dtype, data):
    logits = tensor(data.draw, (T, E), dtype).requires_grad_()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(T, generator=g) < 0.7 if data.draw(st.booleans()) else None
    loss = mr.z_loss(logits, mask=mask)
    logits_ref = logits.detach().clone().requires_grad_()
    expected = ref.z_loss(logits_ref, mask=mask)
    acc = ref.router_dtype(logits)
    rtol, atol = TOLERANCES[acc]
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol, equal_nan=True)
    if torch.isfinite(expected):
        loss.backward()
        expected.backward()
        close(logits.grad, logits_ref.grad, dtype)


@FUZZ
@given(st.integers(0, 64), st.integers(0, 16), st.integers(0, 70),
       st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.data())
def test_expert_choice(T, E, C, dtype, masked, data):
    scores = tensor(data.draw, (T, E), dtype)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(T, generator=g) < 0.7 if masked else None
    out = mr.expert_choice(scores, C, mask=mask)
    weights, tokens = ref.expert_choice(scores, C, mask=mask)
    assert torch.equal(out.tokens, tokens)
    assert torch.equal(out.weights, weights)


@FUZZ
@given(st.integers(0, 16), st.integers(0, 8), st.integers(0, 12), st.data())
def test_expert_choice_backward(T, E, C, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    tokens = torch.randint(-1, max(T, 1), (E, C), generator=g) if T else torch.full((E, C), -1)
    grad = tensor(data.draw, (E, C), torch.float64, adversarial=False)
    out = ops.expert_choice_backward(grad, tokens, T)
    torch.testing.assert_close(out, ref.expert_choice_backward(grad, tokens, T))


@FUZZ
@given(st.integers(0, 40), st.integers(0, 6), st.integers(0, 8), st.integers(0, 8),
       st.sampled_from([torch.float32, torch.float64]), st.data())
def test_grouped_mm(R, E, H, F, dtype, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    cuts = torch.sort(torch.randint(0, R + 1, (E + 1,), generator=g)).values
    counts = (cuts[1:] - cuts[:-1]) if E else torch.zeros(0, dtype=torch.long)
    x = tensor(data.draw, (R, H), dtype, adversarial=False).requires_grad_()
    weight = tensor(data.draw, (E, H, F), dtype, adversarial=False).requires_grad_()
    out = mr.grouped_mm(x, weight, counts)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    expected = ref.grouped_mm(x_ref, w_ref, counts)
    close(out, expected, dtype)
    grad = torch.randn(R, F, generator=g, dtype=torch.float64).to(dtype)
    out.backward(grad)
    if expected.requires_grad:
        expected.backward(grad)
    close(x.grad, x_ref.grad if x_ref.grad is not None else torch.zeros_like(x), dtype)
    close(weight.grad, w_ref.grad if w_ref.grad is not None else torch.zeros_like(weight), dtype)


# --- crash hunt ---------------------------------------------------------------

# (op, code): each runs in a fresh interpreter and must end cleanly or raise a
# RuntimeError / ValueError that names the op; a signal, an abort, a hang or
# any other exception fails. `assert` lines check results where they matter.
CRASH_HUNT = [
    ("capacity", "assert mr.capacity(10, 2**58, 1, 1.0) == 4"),
    ("capacity", "assert mr.capacity(10**7, 1, 1, 1e6) == 10**7"),
    ("capacity", "mr.capacity(2**63 - 1, 2**63 - 1, 2**63 - 1, 1e6, 2**63 - 1)"),
    ("capacity", "mr.capacity(-5, 4, 1, 1.0)"),
    ("capacity", "mr.capacity(10, -(2**62), 1, 1.0)"),
    ("plan", "mr.plan(torch.tensor([[0], [3]]), 4, 2**62)"),
    ("plan", "mr.plan(torch.empty(2**40, 0, dtype=torch.long), 4, 2)"),
    ("plan", "mr.plan(torch.zeros(4, 1, dtype=torch.long), 1, 1, weights=torch.full((4, 1), float('nan')), priority='score')"),
    ("plan", "mr.plan(torch.zeros(4, 2, dtype=torch.long), 1, 3, weights=torch.tensor([[float('nan'), 1.0]] * 4), priority='batch')"),
    ("plan", "mr.plan(torch.zeros(4, 1, dtype=torch.long), 1, -3)"),
    ("dispatch", "assert mr.dispatch(torch.randn(4, 0), torch.full((4, 1), -1), 2**31).shape == (2**31, 0)"),
    ("dispatch", "mr.dispatch(torch.randn(4, 2), torch.full((4, 1), -1), -5)"),
    ("dispatch", "mr.dispatch(torch.randn(2, 3), torch.tensor([[2**62], [0]]), 4)"),
    ("dispatch_backward", "torch.ops.moe_routing.dispatch_backward(torch.empty(3, 0), torch.empty(2**40, 0, dtype=torch.long))"),
    ("combine", "mr.combine(torch.empty(8, 0), torch.empty(2**40, 0, dtype=torch.long), torch.empty(2**40, 0))"),
    ("combine", "mr.combine(torch.randn(4, 2), torch.tensor([[-(2**62)]]), torch.ones(1, 1))"),
    ("combine_backward", "torch.ops.moe_routing.combine_backward(torch.empty(2, 0), torch.empty(2**40, 0), torch.tensor([[2**39], [-1]]), torch.ones(2, 1))"),
    ("load_balancing_loss", "mr.load_balancing_loss(torch.empty(0, 4), torch.empty(0, 2, dtype=torch.long), seq_len=2**40)"),
    ("load_balancing_loss", "mr.load_balancing_loss(torch.rand(4, 4), torch.zeros(4, 1, dtype=torch.long), seq_len=-2)"),
    ("load_balancing_loss_backward", "torch.ops.moe_routing.load_balancing_loss_backward(torch.ones((), device='meta'), torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), None, None)"),
    ("z_loss", "mr.z_loss(torch.randn(3, 0))"),
    ("z_loss", "mr.z_loss(torch.full((3, 4), float('nan')))"),
    ("z_loss_backward", "torch.ops.moe_routing.z_loss_backward(torch.ones((), device='meta'), torch.randn(3, 4), None)"),
    ("route", "mr.route(torch.randn(2, 4), 2**40)"),
    ("route", "mr.route(torch.randn(2, 4), -1)"),
    ("route", "mr.route(torch.randn(2, 0), 1)"),
    ("route", "mr.route(torch.full((3, 8), float('nan')), 8, num_groups=4, topk_groups=4)"),
    ("route", "mr.route(torch.randn(1, 2**16), 2**16)"),
    ("route", "mr.route(torch.randn(2, 4), 1, num_groups=2**40)"),
    ("expert_choice", "assert mr.expert_choice(torch.rand(3, 0), 2**40).tokens.shape == (0, 2**40)"),
    ("expert_choice", "mr.expert_choice(torch.rand(3, 2), -1)"),
    ("expert_choice_backward", "torch.ops.moe_routing.expert_choice_backward(torch.rand(2, 3), torch.full((2, 3), 7), 2)"),
    ("expert_choice_backward", "torch.ops.moe_routing.expert_choice_backward(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), -4)"),
    ("grouped_mm", "mr.grouped_mm(torch.randn(5, 3), torch.randn(3, 3, 4), torch.tensor([2**62] * 3))"),
    ("grouped_mm", "mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([2**63 - 1, 2]))"),
    ("grouped_mm_backward", "torch.ops.moe_routing.grouped_mm_backward(torch.randn(5, 4), torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([-1, 2]))"),
]

# One interpreter imports torch once and forks a process per case (an
# interpreter per case would cost seconds each); a case that crashes, aborts
# or hangs (SIGALRM) takes down only its own process, whose status is reported.
DRIVER = """
import json, os, signal, sys, traceback
import torch
import moe_routing as mr
cases = json.loads(sys.argv[1])
statuses = []
for code in cases:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        signal.alarm(60)
        try:
            exec(code, {"torch": torch, "mr": mr})
            line = "CLEAN"
        except (RuntimeError, ValueError) as error:
            line = "RAISED: " + str(error).splitlines()[0]
        except BaseException:
            line = "OTHER: " + traceback.format_exc().strip().splitlines()[-1]
        os.write(write, line.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        line = pipe.read()
    _, status = os.waitpid(pid, 0)
    statuses.append([os.waitstatus_to_exitcode(status), line])
print(json.dumps(statuses))
"""


def test_crash_hunt():
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([c for _, c in CRASH_HUNT])],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    failures = []
    for (op, code), (status, line) in zip(CRASH_HUNT, json.loads(result.stdout.splitlines()[-1])):
        if status != 0:  # negative: killed by a signal (SIGALRM: hung)
            failures.append(f"{code}: exit status {status}")
        elif line.startswith("OTHER:") or not line:
            failures.append(f"{code}: {line or 'no result'}")
        elif line.startswith("RAISED:") and f"moe_routing::{op}:" not in line:
            failures.append(f"{code}: error does not name moe_routing::{op}: {line}")
    assert len(CRASH_HUNT) == len(json.loads(result.stdout.splitlines()[-1]))
    assert not failures, "\n".join(failures)
