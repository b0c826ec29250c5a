"""Bad input: every op raises a clear error naming the op, the argument and
what was expected, on CPU and on Meta (fake) tensors alike."""
import pytest
import torch

import moe_routing as mr

T, E, k, H = 6, 4, 2, 8


def logits(**kw):
    return torch.randn(T, E, **kw)


def experts():
    return torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])


def slots(C=3):
    return mr.plan(experts(), E, C).slots


CASES = [
    # route
    ("route", lambda: mr.route(torch.randn(T), 1), r"route: logits must be 2-D \[T, E\]"),
    ("route", lambda: mr.route(torch.ones(T, E, dtype=torch.long), 1), r"route: logits must be float"),
    ("route", lambda: mr.route(logits(), 0), r"route: k must be in \[1, E=4\], got 0"),
    ("route", lambda: mr.route(logits(), 5), r"route: k must be in \[1, E=4\], got 5"),
    ("route", lambda: mr.route(logits(), 1, score="softplus"), r"route: score must be \"softmax\" or \"sigmoid\""),
    ("route", lambda: mr.route(logits(), 1, bias=torch.zeros(3)), r"route: bias must have E=4 entries, got 3"),
    ("route", lambda: mr.route(logits(), 1, bias=torch.zeros(E, dtype=torch.long)), r"route: bias must be float"),
    ("route", lambda: mr.route(logits(), 1, num_groups=3), r"route: num_groups must be >= 1 and divide E=4, got 3"),
    ("route", lambda: mr.route(logits(), 1, num_groups=2, topk_groups=3), r"route: topk_groups must be in \[1, num_groups=2\], got 3"),
    ("route", lambda: mr.route(logits(), 3, num_groups=2, topk_groups=1), r"route: k=3 exceeds the 2 experts"),
    # plan
    ("plan", lambda: mr.plan(experts().float(), E, 2), r"plan: experts must be Long"),
    ("plan", lambda: mr.plan(experts()[:, 0], E, 2), r"plan: experts must be 2-D \[T, k\]"),
    ("plan", lambda: mr.plan(experts(), 0, 2), r"plan: num_experts must be >= 1, got 0"),
    ("plan", lambda: mr.plan(experts(), E, -1), r"plan: capacity must be >= 0"),
    ("plan", lambda: mr.plan(experts(), 3, 2), r"plan: experts\[\d, \d\] = 3 is out of range \[0, num_experts=3\)"),
    ("plan", lambda: mr.plan(experts() - 1, E, 2), r"plan: experts\[0, 0\] = -1 is out of range"),
    ("plan", lambda: mr.plan(experts(), E, 2, priority="random"), r"plan: priority must be \"choice\", \"token\", \"score\" or \"batch\", got \"random\""),
    ("plan", lambda: mr.plan(experts(), E, 2, mask=torch.ones(T + 1, dtype=torch.bool)), r"plan: mask must have T=6 entries, got 7"),
    ("plan", lambda: mr.plan(experts(), E, 2, mask=torch.ones(T)), r"plan: mask must be Bool"),
    ("plan", lambda: mr.plan(experts(), E, 2, weights=torch.ones(T, 1)), r"plan: weights must have the shape of experts"),
    ("plan", lambda: mr.plan(experts(), E, 2, priority="score"), r"plan: priority \"score\" needs weights"),
    ("plan", lambda: mr.plan(experts(), E, 2, priority="batch"), r"plan: priority \"batch\" needs weights"),
    # capacity
    ("capacity", lambda: mr.capacity(-1, E, k, 1.0), r"capacity: num_tokens must be >= 0, got -1"),
    ("capacity", lambda: mr.capacity(T, E, 5, 1.0), r"capacity: k must be in \[1, num_experts=4\], got 5"),
    ("capacity", lambda: mr.capacity(T, E, k, 0.0), r"capacity: capacity_factor must be in \(0, 1e6\]"),
    ("capacity", lambda: mr.capacity(T, 0, 1, 1.0), r"capacity: num_experts must be >= 1"),
    # dispatch
    ("dispatch", lambda: mr.dispatch(torch.randn(T, H), slots(), 5), r"dispatch: slots must be -1 \(dropped\) or in \[0, num_rows=5\), got 5"),
    ("dispatch", lambda: mr.dispatch(torch.randn(T, H), slots() - 2, 12), r"dispatch: slots must be -1 \(dropped\) or in \[0, num_rows=12\), got -2"),
    ("dispatch", lambda: mr.dispatch(torch.randn(T, H), torch.zeros(T, k, dtype=torch.long), 12), r"dispatch: slots must be unique, but row 0 is assigned twice"),
    ("dispatch", lambda: mr.dispatch(torch.randn(T, H), slots().int(), 12), r"dispatch: slots must be Long"),
    ("dispatch", lambda: mr.dispatch(torch.randn(T + 1, H), slots(), 12), r"dispatch: slots must have T=7 rows like x, got 6"),
    ("dispatch", lambda: mr.dispatch(torch.ones(T, H, dtype=torch.long), slots(), 12), r"dispatch: x must be float"),
    ("dispatch", lambda: mr.dispatch(torch.randn(T, H), slots(), -1), r"dispatch: num_rows must be >= 0"),
    # combine
    ("combine", lambda: mr.combine(torch.randn(5, H), slots(), torch.rand(T, k)), r"combine: slots must be -1 \(dropped\) or in \[0, num_rows=5\)"),
    ("combine", lambda: mr.combine(torch.randn(12, H), slots(), torch.rand(T, 1)), r"combine: weights must have the shape of slots"),
    ("combine", lambda: mr.combine(torch.randn(12, H), slots(), torch.rand(T, k).half()), r"combine: weights must be float32 or float64"),
    ("combine", lambda: mr.combine(torch.randn(12), slots(), torch.rand(T, k)), r"combine: expert_out must be \[num_rows, H\] or \[E, C, H\]"),
    # losses
    ("load_balancing_loss", lambda: mr.load_balancing_loss(torch.rand(T, 3), experts()), r"load_balancing_loss: experts\[2, 1\] = 3 is out of range \[0, E=3\)"),
    ("load_balancing_loss", lambda: mr.load_balancing_loss(torch.rand(T, E).half(), experts()), r"load_balancing_loss: scores must be float32 or float64"),
    ("load_balancing_loss", lambda: mr.load_balancing_loss(torch.rand(T, E), experts()[:3]), r"load_balancing_loss: experts must have T=6 rows like scores, got 3"),
    ("load_balancing_loss", lambda: mr.load_balancing_loss(torch.rand(T, E), experts(), mask=torch.ones(2, 3, dtype=torch.bool)), r"load_balancing_loss: mask must be 1-D \[T\]"),
    ("load_balancing_loss", lambda: mr.load_balancing_loss(torch.rand(T, E), experts(), seq_len=4), r"load_balancing_loss: seq_len must be >= 1 and divide T=6, got 4"),
    ("z_loss", lambda: mr.z_loss(torch.randn(T)), r"z_loss: logits must be 2-D \[T, E\]"),
    # expert_choice
    ("expert_choice", lambda: mr.expert_choice(torch.rand(T, E), -1), r"expert_choice: capacity must be >= 0, got -1"),
    ("expert_choice", lambda: mr.expert_choice(torch.rand(T, E).half(), 2), r"expert_choice: scores must be float32 or float64"),
    ("expert_choice", lambda: mr.expert_choice(torch.rand(T), 2), r"expert_choice: scores must be 2-D \[T, E\]"),
    ("expert_choice", lambda: mr.expert_choice(torch.rand(T, E), 2, mask=torch.ones(T)), r"expert_choice: mask must be Bool"),
    # grouped_mm
    ("grouped_mm", lambda: mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([3, 3])), r"grouped_mm: counts must sum to at most R=5 \(the rows of x\), but counts\[0\.\.1\] sum to more"),
    ("grouped_mm", lambda: mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([3, -1])), r"grouped_mm: counts must be >= 0, got counts\[1\] = -1"),
    ("grouped_mm", lambda: mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 4, 4), torch.tensor([1, 1])), r"grouped_mm: weight must be \[E, H=3, F\]"),
    ("grouped_mm", lambda: mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4).double(), torch.tensor([1, 1])), r"grouped_mm: weight must be Float"),
    ("grouped_mm", lambda: mr.grouped_mm(torch.randn(5, 3), torch.randn(2, 3, 4), torch.tensor([1, 1, 1])), r"grouped_mm: counts must have E=2 entries, got 3"),
    ("z_loss", lambda: mr.z_loss(logits(), mask=torch.ones(T - 1, dtype=torch.bool)), r"z_loss: mask must have T=6 entries, got 5"),
]


@pytest.mark.parametrize("op,call,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_clear_error(op, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_backward_ops_check_their_inputs():
    ops = torch.ops.moe_routing
    w, e, s = mr.route(logits(), k)
    with pytest.raises(RuntimeError, match=r"route_backward: grad_weights must be Float"):
        ops.route_backward(w.double(), s, w, e, s, "softmax", True, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"route_backward: experts\[0, 0\] = 9 is out of range"):
        ops.route_backward(w, s, w, torch.full_like(e, 9), s, "softmax", True, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"combine_backward: slots must be unique"):
        ops.combine_backward(torch.randn(T, H), torch.randn(12, H), torch.zeros(T, k, dtype=torch.long), w)
    with pytest.raises(RuntimeError, match=r"dispatch_backward: slots must be -1 \(dropped\) or in \[0, num_rows=3\)"):
        ops.dispatch_backward(torch.randn(3, H), slots())


def test_device_mismatch_is_reported():
    # A meta tensor stands in for a second device: the Meta kernel runs the same checks.
    with pytest.raises(RuntimeError, match=r"dispatch: slots must be on meta like the other inputs, got cpu"):
        mr.dispatch(torch.randn(T, H, device="meta"), slots(), 12)
    with pytest.raises(RuntimeError, match=r"route: bias must be on meta like the other inputs, got cpu"):
        mr.route(torch.randn(T, E, device="meta"), 1, bias=torch.zeros(E))


def test_meta_kernels_check_like_cpu():
    with pytest.raises(RuntimeError, match=r"route: k must be in \[1, E=4\], got 7"):
        mr.route(torch.randn(T, E, device="meta"), 7)
    with pytest.raises(RuntimeError, match=r"combine: weights must have the shape of slots"):
        mr.combine(torch.randn(12, H, device="meta"), slots().to("meta"), torch.rand(T, 1, device="meta"))


@pytest.mark.parametrize("bad", [
    dict(k=0), dict(k=9), dict(score="relu"), dict(noise="uniform"), dict(jitter=1.5),
    dict(bias_update_rate=-1.0),
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
    with pytest.raises(ValueError, match="Experts: activation must be"):
        mr.MoE(8, 16, 4, activation="tanh")
    with pytest.raises(ValueError, match="MoE: capacity factors must be > 0"):
        mr.MoE(8, 16, 4, capacity_factor=0.0)
