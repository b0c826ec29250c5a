"""Bad input: every op raises a clear error naming the op, the argument and
what was expected, on every device and on Meta (fake) tensors alike. Checks of
values (an index out of range, a row claimed twice, counts past the rows) raise
on the CPU; CUDA makes them device-side asserts (they would need a host
synchronisation to raise), so those cases run on the CPU only."""
import re

import pytest
import torch

import moe_routing as mr

from conftest import DEVICES

T, E, k, H = 6, 4, 2, 8


def logits(d="cpu", **kw):
    return torch.randn(T, E, device=d, **kw)


def experts(d="cpu"):
    return torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]], device=d)


def slots(C=3, d="cpu"):
    return mr.plan(experts(d), E, C).slots


def ones(*shape, d="cpu", **kw):
    return torch.ones(*shape, device=d, **kw)


# (op, kind, call(device), message): kind "shape" checks metadata (every
# device), "value" reads tensor values (the CPU only), "host" takes no tensor.
CASES = [
    # route
    ("route", "shape", lambda d: mr.route(torch.randn(T, device=d), 1), r"route: logits must be 2-D \[T, E\]"),
    ("route", "shape", lambda d: mr.route(ones(T, E, d=d, dtype=torch.long), 1), r"route: logits must be float"),
    ("route", "shape", lambda d: mr.route(logits(d), 0), r"route: k must be in \[1, E=4\], got 0"),
    ("route", "shape", lambda d: mr.route(logits(d), 5), r"route: k must be in \[1, E=4\], got 5"),
    ("route", "shape", lambda d: mr.route(logits(d), 1, score="softplus"),
     r"route: score must be \"softmax\" or \"sigmoid\""),
    ("route", "shape", lambda d: mr.route(logits(d), 1, bias=torch.zeros(3, device=d)),
     r"route: bias must have E=4 entries, got 3"),
    ("route", "shape", lambda d: mr.route(logits(d), 1, bias=torch.zeros(E, dtype=torch.long, device=d)),
     r"route: bias must be float"),
    ("route", "shape", lambda d: mr.route(logits(d), 1, num_groups=3),
     r"route: num_groups must be >= 1 and divide E=4, got 3"),
    ("route", "shape", lambda d: mr.route(logits(d), 1, num_groups=2, topk_groups=3),
     r"route: topk_groups must be in \[1, num_groups=2\], got 3"),
    ("route", "shape", lambda d: mr.route(logits(d), 3, num_groups=2, topk_groups=1),
     r"route: k=3 exceeds the 2 experts"),
    # plan
    ("plan", "shape", lambda d: mr.plan(experts(d).float(), E, 2), r"plan: experts must be int64, got float32"),
    ("plan", "shape", lambda d: mr.plan(experts(d)[:, 0], E, 2), r"plan: experts must be 2-D \[T, k\]"),
    ("plan", "shape", lambda d: mr.plan(experts(d), 0, 2), r"plan: num_experts must be in \[1, 2\^31 - 1\], got 0"),
    ("plan", "shape", lambda d: mr.plan(experts(d), 2**31, 1), r"plan: num_experts must be in \[1, 2\^31 - 1\], got 2147483648"),
    ("plan", "shape", lambda d: mr.plan(experts(d), 2**62, 1), r"plan: num_experts must be in \[1, 2\^31 - 1\]"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, -1), r"plan: capacity must be >= 0"),
    ("plan", "value", lambda d: mr.plan(experts(d), 3, 2),
     r"plan: experts\[\d, \d\] = 3 is out of range \[0, num_experts=3\)"),
    ("plan", "value", lambda d: mr.plan(experts(d) - 1, E, 2), r"plan: experts\[0, 0\] = -1 is out of range"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, priority="random"),
     r"plan: priority must be \"choice\", \"token\", \"score\" or \"batch\", got \"random\""),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, mask=ones(T + 1, d=d, dtype=torch.bool)),
     r"plan: mask must have T=6 entries, got 7"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, mask=ones(T, d=d)), r"plan: mask must be bool, got float32"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, weights=ones(T, 1, d=d)),
     r"plan: weights must have the shape of experts"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, priority="score"), r"plan: priority \"score\" needs weights"),
    ("plan", "shape", lambda d: mr.plan(experts(d), E, 2, priority="batch"), r"plan: priority \"batch\" needs weights"),
    # capacity
    ("capacity", "host", lambda d: mr.capacity(-1, E, k, 1.0), r"capacity: num_tokens must be >= 0, got -1"),
    ("capacity", "host", lambda d: mr.capacity(T, E, 5, 1.0), r"capacity: k must be in \[1, num_experts=4\], got 5"),
    ("capacity", "host", lambda d: mr.capacity(T, E, k, 0.0), r"capacity: capacity_factor must be in \(0, 1e6\]"),
    ("capacity", "host", lambda d: mr.capacity(T, 0, 1, 1.0), r"capacity: num_experts must be >= 1"),
    # dispatch
    ("dispatch", "value", lambda d: mr.dispatch(torch.randn(T, H, device=d), slots(d=d), 5),
     r"dispatch: slots must be -1 \(dropped\) or in \[0, num_rows=5\), got 5"),
    ("dispatch", "value", lambda d: mr.dispatch(torch.randn(T, H, device=d), slots(d=d) - 2, 12),
     r"dispatch: slots must be -1 \(dropped\) or in \[0, num_rows=12\), got -2"),
    ("dispatch", "value", lambda d: mr.dispatch(torch.randn(T, H, device=d), torch.zeros(T, k, dtype=torch.long,
                                                                                          device=d), 12),
     r"dispatch: slots must be unique, but row 0 is assigned twice"),
    ("dispatch", "shape", lambda d: mr.dispatch(torch.randn(T, H, device=d), slots(d=d).int(), 12),
     r"dispatch: slots must be int64"),
    ("dispatch", "shape", lambda d: mr.dispatch(torch.randn(T + 1, H, device=d), slots(d=d), 12),
     r"dispatch: slots must have T=7 rows like x, got 6"),
    ("dispatch", "shape", lambda d: mr.dispatch(ones(T, H, d=d, dtype=torch.long), slots(d=d), 12),
     r"dispatch: x must be float"),
    ("dispatch", "shape", lambda d: mr.dispatch(torch.randn(T, H, device=d), slots(d=d), -1),
     r"dispatch: num_rows must be >= 0"),
    # combine
    ("combine", "value", lambda d: mr.combine(torch.randn(5, H, device=d), slots(d=d), torch.rand(T, k, device=d)),
     r"combine: slots must be -1 \(dropped\) or in \[0, num_rows=5\)"),
    ("combine", "shape", lambda d: mr.combine(torch.randn(12, H, device=d), slots(d=d), torch.rand(T, 1, device=d)),
     r"combine: weights must have the shape of slots"),
    ("combine", "shape", lambda d: mr.combine(torch.randn(12, H, device=d), slots(d=d),
                                              torch.rand(T, k, device=d).half()),
     r"combine: weights must be float32 or float64"),
    ("combine", "shape", lambda d: mr.combine(torch.randn(12, device=d), slots(d=d), torch.rand(T, k, device=d)),
     r"combine: expert_out must be \[num_rows, H\] or \[E, C, H\]"),
    # losses
    ("load_balancing_loss", "value", lambda d: mr.load_balancing_loss(torch.rand(T, 3, device=d), experts(d)),
     r"load_balancing_loss: experts\[2, 1\] = 3 is out of range \[0, E=3\)"),
    ("load_balancing_loss", "shape", lambda d: mr.load_balancing_loss(torch.rand(T, E, device=d).half(), experts(d)),
     r"load_balancing_loss: scores must be float32 or float64"),
    ("load_balancing_loss", "shape", lambda d: mr.load_balancing_loss(torch.rand(T, E, device=d), experts(d)[:3]),
     r"load_balancing_loss: experts must have T=6 rows like scores, got 3"),
    ("load_balancing_loss", "shape", lambda d: mr.load_balancing_loss(torch.rand(T, E, device=d), experts(d),
                                                                      mask=ones(2, 3, d=d, dtype=torch.bool)),
     r"load_balancing_loss: mask must be 1-D \[T\]"),
    ("load_balancing_loss", "shape", lambda d: mr.load_balancing_loss(torch.rand(T, E, device=d), experts(d),
                                                                      seq_len=4),
     r"load_balancing_loss: seq_len must be >= 1 and divide T=6, got 4"),
    ("z_loss", "shape", lambda d: mr.z_loss(torch.randn(T, device=d)), r"z_loss: logits must be 2-D \[T, E\]"),
    # expert_choice
    ("expert_choice", "shape", lambda d: mr.expert_choice(torch.rand(T, E, device=d), -1),
     r"expert_choice: capacity must be >= 0, got -1"),
    ("expert_choice", "shape", lambda d: mr.expert_choice(torch.rand(T, E, device=d).half(), 2),
     r"expert_choice: scores must be float32 or float64"),
    ("expert_choice", "shape", lambda d: mr.expert_choice(torch.rand(T, device=d), 2),
     r"expert_choice: scores must be 2-D \[T, E\]"),
    ("expert_choice", "shape", lambda d: mr.expert_choice(torch.rand(T, E, device=d), 2, mask=ones(T, d=d)),
     r"expert_choice: mask must be bool"),
    ("expert_choice_backward", "value",
     lambda d: torch.ops.moe_routing.expert_choice_backward(torch.rand(2, 3, device=d),
                                                            torch.full((2, 3), 7, device=d), 4),
     r"expert_choice_backward: tokens\[\d, \d\] = 7 is out of range: expected -1 \(an empty slot\) "
     r"or \[0, num_tokens=4\)"),
    # grouped_mm
    ("grouped_mm", "value", lambda d: mr.grouped_mm(torch.randn(5, 3, device=d), torch.randn(2, 3, 4, device=d),
                                                    torch.tensor([3, 3], device=d)),
     r"grouped_mm: counts must sum to at most R=5 \(the rows of x\), but counts\[0\.\.1\] sum to more"),
    ("grouped_mm", "value", lambda d: mr.grouped_mm(torch.randn(5, 3, device=d), torch.randn(2, 3, 4, device=d),
                                                    torch.tensor([3, -1], device=d)),
     r"grouped_mm: counts must be >= 0, got counts\[1\] = -1"),
    ("grouped_mm", "shape", lambda d: mr.grouped_mm(torch.randn(5, 3, device=d), torch.randn(2, 4, 4, device=d),
                                                    torch.tensor([1, 1], device=d)),
     r"grouped_mm: weight must be \[E, H=3, F\]"),
    ("grouped_mm", "shape", lambda d: mr.grouped_mm(torch.randn(5, 3, device=d),
                                                    torch.randn(2, 3, 4, device=d).double(),
                                                    torch.tensor([1, 1], device=d)),
     r"grouped_mm: weight must be float32"),
    ("grouped_mm", "shape", lambda d: mr.grouped_mm(torch.randn(5, 3, device=d), torch.randn(2, 3, 4, device=d),
                                                    torch.tensor([1, 1, 1], device=d)),
     r"grouped_mm: counts must have E=2 entries, got 3"),
    ("z_loss", "shape", lambda d: mr.z_loss(logits(d), mask=ones(T - 1, d=d, dtype=torch.bool)),
     r"z_loss: mask must have T=6 entries, got 5"),
]

# Every case on the CPU; metadata cases on the other devices too.
RUNS = [(device, i) for device in DEVICES for i, case in enumerate(CASES)
        if device == "cpu" or case[1] == "shape"]


@pytest.mark.parametrize("device,case", RUNS, ids=[f"{d}-{CASES[i][0]}-{i}" for d, i in RUNS])
def test_bad_input_raises_clear_error(device, case):
    _, _, call, message = CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call(device)


def test_backward_ops_check_their_inputs(device):
    ops = torch.ops.moe_routing
    w, e, s = mr.route(logits(device), k)
    with pytest.raises(RuntimeError, match=r"route_backward: grad_weights must be float32"):
        ops.route_backward(w.double(), s, w, e, s, "softmax", True, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"route_backward: grad_scores must have the shape of scores"):
        ops.route_backward(w, s[:, :1], w, e, s, "softmax", True, 1.0, torch.float32)
    many = e.repeat(1, s.shape[1])  # k = 2E choices
    with pytest.raises(RuntimeError, match=r"route_backward: experts must have at most E=\d+ columns \(k <= E\)"):
        ops.route_backward(torch.ones_like(many, dtype=w.dtype), None, torch.ones_like(many, dtype=w.dtype),
                           many, s, "softmax", True, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"combine_backward: weights must have the shape of slots"):
        ops.combine_backward(torch.randn(T, H, device=device), torch.randn(12, H, device=device),
                             slots(d=device), w[:, :1].contiguous())


def test_backward_ops_check_their_input_values():
    # Values: raised on the CPU (device-side asserts on CUDA).
    ops = torch.ops.moe_routing
    w, e, s = mr.route(logits(), k)
    with pytest.raises(RuntimeError, match=r"route_backward: experts\[0, 0\] = 9 is out of range"):
        ops.route_backward(w, s, w, torch.full_like(e, 9), s, "softmax", True, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"combine_backward: slots must be unique"):
        ops.combine_backward(torch.randn(T, H), torch.randn(12, H), torch.zeros(T, k, dtype=torch.long), w)
    with pytest.raises(RuntimeError, match=r"dispatch_backward: slots must be -1 \(dropped\) or in \[0, num_rows=3\)"):
        ops.dispatch_backward(torch.randn(3, H), slots())


def test_device_mismatch_is_reported(device):
    # On the CPU a meta tensor stands in for a second device (the Meta kernel
    # runs the same checks); on CUDA the second device is the CPU.
    other = "meta" if device == "cpu" else "cpu"
    x = torch.randn(T, H, device=other)
    where = re.escape(str(x.device))
    with pytest.raises(RuntimeError, match=rf"dispatch: slots must be on {where} like the other inputs, got {device}"):
        mr.dispatch(x, slots(d=device), 12)
    with pytest.raises(RuntimeError, match=rf"route: bias must be on {where} like the other inputs, got {device}"):
        mr.route(torch.randn(T, E, device=other), 1, bias=torch.zeros(E, device=device))


def test_grouped_plan_names_the_experts_and_groups_it_was_given():
    """plan with group_size plans num_experts * groups sub-experts: a count
    past the op's limit names the caller's two numbers, not their product."""
    with pytest.raises(ValueError, match=r"plan: num_experts \* \(T / group_size\) must be at most "
                                         r"2\^31 - 1 .* num_experts=1073741824 and 6 groups"):
        mr.plan(experts(), 2**30, 1, group_size=1)


def test_meta_kernels_check_like_cpu():
    with pytest.raises(RuntimeError, match=r"route: k must be in \[1, E=4\], got 7"):
        mr.route(torch.randn(T, E, device="meta"), 7)
    with pytest.raises(RuntimeError, match=r"combine: weights must have the shape of slots"):
        mr.combine(torch.randn(12, H, device="meta"), slots().to("meta"), torch.rand(T, 1, device="meta"))


@pytest.mark.parametrize("bad", [
    dict(k=0), dict(k=9), dict(score="relu"), dict(noise="uniform"), dict(jitter=1.5),
    dict(bias_update_rate=-1.0), dict(num_groups=3), dict(num_groups=0),
    dict(num_groups=4, topk_groups=0), dict(num_groups=4, topk_groups=5),
    dict(k=3, num_groups=4, topk_groups=1), dict(group_score="top3"),
    dict(fixed_bias=torch.zeros(7)), dict(bias=torch.zeros(8), fixed_bias=torch.zeros(8)),
])
def test_router_rejects_bad_options(bad):
    options = dict(d_model=8, num_experts=8, k=2)
    options.update(bad)
    with pytest.raises(ValueError, match="Router: "):
        mr.Router(**options)


def test_moe_rejects_bad_options():
    with pytest.raises(ValueError, match="MoE: routing must be .tokens., .experts. or .balanced."):
        mr.MoE(8, 16, 4, routing="hash")
    with pytest.raises(ValueError, match="MoE: priority must be"):
        mr.MoE(8, 16, 4, priority="fastest")
    with pytest.raises(ValueError, match="Experts: activation must be one of 'gelu', 'relu', "
                                         "'swiglu', 'swiglu_oai', 'swiglu_clamped', "
                                         "'swiglu_clamped_silu', got 'tanh'"):
        mr.MoE(8, 16, 4, activation="tanh")
    for option in (dict(shared_activation="swiglu"), dict(shared_swiglu_limit=3.0)):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"MoE: {name} needs a shared expert"):
            mr.MoE(8, 16, 4, **option)
    with pytest.raises(ValueError, match="Experts: limit must be > 0, got 0"):
        mr.Experts(4, 8, 16, "swiglu_oai", limit=0)
    # The shared expert's own options are named, and a limit that nothing would use is refused.
    with pytest.raises(ValueError, match="MoE: shared_activation must be None or one of 'gelu'.*got 'tanh'"):
        mr.MoE(8, 16, 4, shared_hidden=8, shared_activation="tanh")
    with pytest.raises(ValueError, match="MoE: shared_swiglu_limit needs a clamped shared SwiGLU .*"
                                         "got activation 'swiglu'"):
        mr.MoE(8, 16, 4, activation="swiglu", shared_hidden=8, shared_swiglu_limit=3.0)
    with pytest.raises(ValueError, match="MoE: shared_swiglu_limit needs a clamped shared SwiGLU .*"
                                         "got activation 'gelu'"):
        mr.MoE(8, 16, 4, activation="swiglu_oai", shared_hidden=8, shared_activation="gelu",
               shared_swiglu_limit=3.0)
    with pytest.raises(ValueError, match="MoE: shared_swiglu_limit must be > 0, got -1"):
        mr.MoE(8, 16, 4, activation="swiglu_clamped", shared_hidden=8, shared_swiglu_limit=-1.0)
    with pytest.raises(ValueError, match=r"MoE: capacity_factor must be a number > 0, or None "
                                         r"\(dropless\), got 0.0"):
        mr.MoE(8, 16, 4, capacity_factor=0.0)
    import numpy as np
    mr.MoE(8, 16, 4, capacity_factor=np.float32(1.25))  # a number from a config sweep
    with pytest.raises(ValueError, match="MoE: eval_capacity_factor must be a number > 0, or None "
                                         r"\(dropless\), got 'none'"):
        mr.MoE(8, 16, 4, eval_capacity_factor="none")
    with pytest.raises(ValueError, match="Router.update_bias: group must be a ProcessGroup or a "
                                         "1-D DeviceMesh, got str"):
        mr.MoE(8, 16, 4, bias_update_rate=0.1).update_bias(group="world")
    with pytest.raises(ValueError, match="MoE: min_capacity must be >= 0, got -1"):
        mr.MoE(8, 16, 4, min_capacity=-1)
    # Widths and counts: named errors (a zero width divided by zero in the
    # initialisation, a negative one failed inside torch).
    for args, options, message in [
            ((8, 0, 4), {}, "Experts: d_hidden must be a positive integer, got 0"),
            ((0, 16, 4), {}, "Router: d_model must be a positive integer, got 0"),
            ((8, 16, 0), {}, "Router: num_experts must be a positive integer, got 0"),
            ((8, 16.0, 4), {}, "Experts: d_hidden must be a positive integer, got 16.0"),
            ((8, 16, 4), dict(shared_hidden=0), "MoE: shared_hidden must be a positive integer"),
            ((8, 16, 4), dict(shared_hidden=-3), "MoE: shared_hidden must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            mr.MoE(*args, **options)
    with pytest.raises(ValueError, match="Experts: d_model must be a positive integer, got -1"):
        mr.Experts(4, -1, 16)
    for options in (dict(routing="balanced"), dict(routing="experts"), dict(capacity_factor=None)):
        with pytest.raises(ValueError, match="MoE: expert_capacity sets a token-choice layer's"):
            mr.MoE(8, 16, 4, expert_capacity=2, **options)
