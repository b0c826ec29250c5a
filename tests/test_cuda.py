"""CUDA kernels against the CPU kernels (skipped without a GPU): integer
outputs exactly, floating outputs within dtype tolerance (sums within the
reduction-aware tolerance); bitwise-identical reruns; the module under
torch.compile; CUDA-graph capture and replay of the ops and of the layer, and
torch.compile(mode="reduce-overhead"). Each op's own test file runs its
reference, gradcheck and opcheck tests on CUDA too (the `device` fixture)."""
import copy

import pytest
import torch

import moe_routing as mr

from conftest import (TOLERANCES, assert_within, combine_weight_grad_abs_terms, random_experts, random_mask,
                      separated_logits, tolerance)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(0, 8, 2), (1, 1, 1), (37, 8, 2), (513, 64, 6), (300, 256, 8), (64, 1000, 4)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def both(fn, *args, **kwargs):
    """fn on CPU inputs and on the same inputs moved to CUDA."""
    move = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    cpu = fn(*args, **kwargs)
    gpu = fn(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    return cpu, gpu


def assert_same(cpu, gpu, dtype=None):
    for a, b in zip(cpu if isinstance(cpu, tuple) else (cpu,), gpu if isinstance(gpu, tuple) else (gpu,)):
        if a.dtype in (torch.long, torch.bool):
            assert torch.equal(a, b.cpu())
        else:
            rtol, atol = TOLERANCES[dtype or a.dtype]
            torch.testing.assert_close(b.cpu(), a, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_route(dtype, score):
    for T, E, k in SHAPES:
        if E > 1024:
            continue
        logits = separated_logits(T, E, dtype=dtype, seed=T)
        kw = dict(score=score, bias=torch.linspace(-0.01, 0.01, E))
        if E % 4 == 0 and k <= E // 2:
            kw.update(num_groups=4, topk_groups=2)
        cpu, gpu = both(mr.route, logits, k, **kw)
        assert_same(tuple(cpu), tuple(gpu), torch.float32)
        g = (torch.randn_like(cpu.weights), torch.randn_like(cpu.scores))
        back = lambda w, e, s, gw, gs: torch.ops.moe_routing.route_backward(  # noqa: E731
            gw, gs, w, e, s, score, k > 1, 1.0, dtype)
        assert_same(*both(back, *cpu, *g), dtype)


@pytest.mark.parametrize("priority", ["choice", "token", "score", "batch"])
def test_plan_is_bitwise_the_cpu_plan(priority):
    for i, (T, E, k) in enumerate(SHAPES + [(20000, 64, 8)]):
        experts = random_experts(T, E, k, seed=i)
        weights = (torch.rand(T, k) * 8).round() / 8
        for capacity in (None, 0, 3, mr.capacity(T, E, k, 1.0)):
            for mask in (None, random_mask(T, seed=i)):
                assert_same(*both(mr.plan, experts, E, capacity, weights=weights, priority=priority, mask=mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_combine(dtype):
    for i, (T, E, k) in enumerate(SHAPES):
        for H, C in ((64, None), (7, 3), (4096, mr.capacity(T, E, k, 1.25))):
            slots = mr.plan(random_experts(T, E, k, seed=i), E, C, mask=random_mask(T, seed=i)).slots
            rows = T * k if C is None else E * C
            x = torch.randn(T, H).to(dtype)
            out = torch.randn(rows, H).to(dtype)
            w = torch.rand(T, k)
            assert_same(*both(mr.dispatch, x, slots, rows), dtype)
            assert_same(*both(mr.combine, out, slots, w), dtype)
            gy = torch.randn(T, H).to(dtype)
            (g_rows, g_w), (g_rows_cuda, g_w_cuda) = both(torch.ops.moe_routing.combine_backward, gy, out, slots, w)
            assert_same(g_rows, g_rows_cuda, dtype)
            # The weight gradient sums H products: another order on the GPU.
            assert_within(g_w_cuda, g_w, tolerance(g_w, dtype, combine_weight_grad_abs_terms(gy, out, slots), n=H),
                          "combine_backward's weight gradient")
            assert_same(*both(torch.ops.moe_routing.dispatch_backward, out, slots), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_backward_bits_do_not_depend_on_alignment(dtype):
    """The same values at a 16-byte aligned address (vector loads) and one
    element further on (element loads) give bitwise-equal gradients: each
    thread sums the same elements in the same order either way."""
    T, E, k, H = 300, 16, 2, 1024
    slots = mr.plan(random_experts(T, E, k, seed=3), E, None).slots.cuda()
    w = torch.rand(T, k, device="cuda")

    def at_offset(values, offset):  # values stored `offset` elements into a fresh buffer
        buffer = torch.empty(values.numel() + offset, dtype=dtype, device="cuda")
        view = buffer[offset:].view(values.shape)
        view.copy_(values)
        return view

    gy = torch.randn(T, H, device="cuda").to(dtype)
    out = torch.randn(T * k, H, device="cuda").to(dtype)
    inputs = {offset: (at_offset(gy, offset), at_offset(out, offset)) for offset in (0, 1)}
    assert inputs[0][0].data_ptr() % 16 == 0 and inputs[1][0].data_ptr() % 16 != 0
    aligned = torch.ops.moe_routing.combine_backward(*inputs[0], slots, w)
    shifted = torch.ops.moe_routing.combine_backward(*inputs[1], slots, w)
    assert torch.equal(aligned[0], shifted[0])
    assert torch.equal(aligned[1], shifted[1])


def test_losses_expert_choice_grouped_mm():
    for i, (T, E, k) in enumerate(SHAPES):
        logits = torch.randn(T, E)
        _, experts, scores = mr.route(logits, k)
        mask = random_mask(T, seed=i)
        assert_same(*both(mr.load_balancing_loss, scores, experts, mask=mask))
        assert_same(*both(mr.z_loss, logits, mask=mask))
        assert_same(*both(mr.expert_choice, scores, 5, mask=mask))
        g = torch.tensor(1.5)
        assert_same(*both(torch.ops.moe_routing.load_balancing_loss_backward, g, scores, experts, mask, None))
        assert_same(*both(torch.ops.moe_routing.z_loss_backward, g, logits, mask))
    x, w, counts = torch.randn(50, 24), torch.randn(3, 24, 40), torch.tensor([10, 0, 30])
    assert_same(*both(mr.grouped_mm, x, w, counts))
    assert_same(*both(torch.ops.moe_routing.grouped_mm_backward, torch.randn(50, 40), x, w, counts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_mm_bits_do_not_depend_on_alignment(dtype):
    """x (and the output gradient) one element past a 16-byte boundary give
    the bits of the aligned copy: the op realigns them rather than leave
    torch's CUTLASS kernel (bfloat16, sm90) for its own, which sums in another
    order."""
    R, K, N, E = 96, 64, 40, 4
    counts = torch.tensor([30, 0, 50, 16], device="cuda")
    w = torch.randn(E, K, N, device="cuda").to(dtype)

    def shifted(values):  # values stored one element into a fresh buffer
        buffer = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")
        view = buffer[1:].view(values.shape)
        view.copy_(values)
        assert view.data_ptr() % 16 != 0
        return view

    x = torch.randn(R, K, device="cuda").to(dtype)
    g = torch.randn(R, N, device="cuda").to(dtype)
    assert torch.equal(mr.grouped_mm(shifted(x), w, counts), mr.grouped_mm(x, w, counts))
    backward = torch.ops.moe_routing.grouped_mm_backward
    for a, b in zip(backward(shifted(g), shifted(x), w, counts), backward(g, x, w, counts)):
        assert torch.equal(a, b)


def test_z_loss_keeps_a_nan_beside_infinities_as_the_cpu_does():
    nan, inf = float("nan"), float("inf")
    for row in ([nan, -inf, -inf], [nan, inf, 0.0], [-inf, nan, inf]):
        logits = torch.tensor([row, [0.5, 1.0, -2.0]])
        cpu, gpu = both(mr.z_loss, logits)
        assert cpu.isnan() and gpu.isnan(), (row, cpu, gpu)
        g = torch.tensor(1.0)
        cpu, gpu = both(torch.ops.moe_routing.z_loss_backward, g, logits, None)
        assert torch.equal(cpu.isnan(), gpu.cpu().isnan()), (row, cpu, gpu)


# A slot out of range where the output holds no data (no rows, or H = 0), so
# that no kernel reads the rows: CPU raises, CUDA must still assert on device.
BAD_SLOTS_WITH_NO_DATA = {
    "dispatch_no_features": "mr.dispatch(torch.randn(1, 0, device='cuda'), bad, 4)",
    "dispatch_no_rows": "mr.dispatch(torch.randn(1, 8, device='cuda'), bad, 0)",
    "combine_no_features": "mr.combine(torch.randn(4, 0, device='cuda'), bad, w)",
    "dispatch_backward_no_features": "ops.dispatch_backward(torch.randn(4, 0, device='cuda'), bad)",
    "combine_backward_no_features": "ops.combine_backward(torch.randn(1, 0, device='cuda'), "
                                    "torch.randn(4, 0, device='cuda'), bad, w)",
}


@pytest.mark.parametrize("call", BAD_SLOTS_WITH_NO_DATA.values(), ids=BAD_SLOTS_WITH_NO_DATA.keys())
def test_bad_slots_assert_on_the_device_even_with_no_data(call):
    # A device-side assert ruins the process's CUDA context: a child process.
    import subprocess
    import sys
    script = ("import torch, moe_routing as mr\n"
              "ops = torch.ops.moe_routing\n"
              "bad = torch.tensor([[7]], device='cuda')\n"
              "w = torch.rand(1, 1, device='cuda')\n"
              f"{call}\n"
              "torch.cuda.synchronize()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    printed = done.stdout + done.stderr  # the device's assert message goes through its printf buffer
    assert done.returncode != 0, printed
    assert "slots out of range" in printed, printed[-2000:]


def test_module_is_bitwise_deterministic_and_compiles():
    torch.manual_seed(0)
    moe = mr.MoE(64, 128, 8, 2).cuda()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    y1, y2 = moe(x), moe(x)
    assert torch.equal(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), x)[0]
    g2 = torch.autograd.grad(moe(x).square().sum(), x)[0]
    assert torch.equal(g1, g2)
    compiled = torch.compile(moe, fullgraph=True)
    torch.testing.assert_close(compiled(x), y1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["token_choice", "dropless"])
def test_gpt_oss_layer_matches_cpu_and_is_bitwise_deterministic(capacity_factor):
    """Router and expert biases and the clamped SwiGLU (the dropless layout
    adds the biases with a grouped_mm of a column of ones): CUDA equals the
    CPU layer (float32, no TF32) and two CUDA runs agree bitwise."""
    torch.manual_seed(0)
    moe = mr.MoE(64, 96, 8, 2, capacity_factor=capacity_factor, activation="swiglu_oai",
                 expert_bias=True, logit_bias=True)
    with torch.no_grad():
        moe.experts.w_in.mul_(20)  # large enough for the clamps at +-7 to act
        for bias in (moe.router.logit_bias, moe.experts.b_in, moe.experts.b_out):
            bias.normal_()
    on_gpu = copy.deepcopy(moe).cuda()
    x = torch.randn(4, 33, 64)

    def run(layer, x):
        x = x.clone().requires_grad_()
        y = layer(x)
        grads = torch.autograd.grad(y.square().mean() + layer.aux_loss, [x, *layer.parameters()])
        return [y, *grads]

    expected = run(moe, x)
    first, second = run(on_gpu, x.cuda()), run(on_gpu, x.cuda())
    for a, b, c in zip(first, second, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-4 * max(1.0, float(c.detach().abs().max())))


# --- CUDA graphs ---------------------------------------------------------------
#
# The capture recipe (README, "CUDA graphs"): warm up on a side stream, set the
# gradients to None, capture forward and backward, then refill the static
# inputs and replay. A parameter whose autograd graph from an earlier forward on
# the default (legacy) stream is still alive keeps that graph's gradient
# accumulator, which the backward under capture would make the legacy stream
# wait on: CUDA refuses with "operation would make the legacy stream depend on a
# capturing blocking stream". Fresh modules here, and no graph kept alive.

def _capture(step, warmup=2):
    """step() warmed up on a side stream, then captured; (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def test_ops_forward_and_backward_capture_and_replay():
    """Every op, forward and backward, inside one CUDA graph: replays on new
    inputs equal eager runs on those inputs, bitwise."""
    T, E, k, H, F = 96, 8, 2, 32, 48
    static = dict(logits=torch.randn(T, E, device="cuda", requires_grad=True),
                  x=torch.randn(T, H, device="cuda", requires_grad=True),
                  weight=torch.randn(E, H, F, device="cuda", requires_grad=True),
                  w_out=torch.randn(E, F, H, device="cuda", requires_grad=True))
    bias = torch.linspace(-0.1, 0.1, E, device="cuda")

    def step(t):
        weights, experts, scores = mr.route(t["logits"], k, score="sigmoid", bias=bias, num_groups=4, topk_groups=2)
        out = {}
        for capacity in (mr.capacity(T, E, k, 1.0), None):
            p = mr.plan(experts, E, capacity, weights=weights, priority="score")
            rows = E * capacity if capacity is not None else T * k
            buffer = mr.dispatch(t["x"], p.slots, rows)
            if capacity is None:
                h = mr.grouped_mm(mr.grouped_mm(buffer, t["weight"], p.load), t["w_out"], p.load)
            else:
                h = torch.bmm(buffer.view(E, capacity, H), t["weight"]).relu().bmm(t["w_out"]).view(rows, H)
            out[capacity] = mr.combine(h, p.slots, weights)
            out[f"load{capacity}"] = p.load
        loss = (sum(y.square().mean() for n, y in out.items() if not isinstance(n, str))
                + mr.load_balancing_loss(scores, experts) + mr.z_loss(t["logits"]))
        grads = torch.autograd.grad(loss, list(t.values()))
        return out, loss, grads

    graph, (out, loss, grads) = _capture(lambda: step(static))
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        fresh = {n: torch.randn(v.shape, device="cuda", generator=g) for n, v in static.items()}
        with torch.no_grad():
            for n, v in fresh.items():
                static[n].copy_(v)
        graph.replay()
        e_out, e_loss, e_grads = step({n: v.requires_grad_() for n, v in fresh.items()})
        for n in out:
            assert torch.equal(out[n], e_out[n]), n
        assert torch.equal(loss, e_loss)
        for name, a, b in zip(static, grads, e_grads):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["token_choice", "dropless"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
@pytest.mark.parametrize("bias_update_rate", [0.0, 0.05], ids=["aux_loss", "bias_balancing"])
def test_module_forward_backward_captures_in_a_cuda_graph(capacity_factor, autocast, bias_update_rate):
    """The MoE layer, forward + aux loss + backward, captured once and replayed
    on new batches: output, input gradient and parameter gradients equal a
    copy of the layer run eagerly on the same batches, bitwise. With bias
    balancing each replay adds its load to the same pending count as eager
    forwards do, and an eager update_bias() between replays steers the next."""
    torch.manual_seed(0)
    moe = mr.MoE(64, 96, 8, 2, capacity_factor=capacity_factor, activation="swiglu",
                 aux_loss_weight=0.01, z_loss_weight=0.001, bias_update_rate=bias_update_rate).cuda()
    eager = copy.deepcopy(moe)
    static_x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)

    def step(layer, x):
        # Gradients set to None, not zeroed: the captured backward then writes
        # them afresh (in the graph's memory) instead of adding on each replay.
        layer.zero_grad(set_to_none=True)
        x.grad = None
        # Autocast's cast cache must be off around a capture (torch.cuda.graph).
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast, cache_enabled=False):
            y = layer(x)
            loss = y.float().square().mean() + layer.aux_loss
        loss.backward()
        return y

    graph, out = _capture(lambda: step(moe, static_x))
    if bias_update_rate:
        moe.router.pending_load.zero_()  # the warm-up's count; the graph adds to this memory
    for seed in (1, 2, 3):
        x = torch.randn(4, 33, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        x_eager = x.clone().requires_grad_()
        y = step(eager, x_eager)
        assert torch.equal(out, y)
        assert torch.equal(static_x.grad, x_eager.grad)
        for (name, p), q in zip(moe.named_parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad), name
        if bias_update_rate:
            assert torch.equal(moe.router.pending_load, eager.router.pending_load)
            assert int(moe.router.pending_load.sum()) == (1 if seed < 3 else 2) * 4 * 33 * 2
            if seed == 1:  # replays 2 and 3 then accumulate two batches
                moe.update_bias(), eager.update_bias()
                assert torch.equal(moe.router.bias, eager.router.bias) and moe.router.bias.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["token_choice", "dropless"])
@pytest.mark.parametrize("bias_update_rate", [0.0, 0.05], ids=["aux_loss", "bias_balancing"])
def test_module_under_reduce_overhead_compile(capacity_factor, bias_update_rate):
    """torch.compile(mode="reduce-overhead") (Inductor with CUDA graphs) on
    training steps: outputs and gradients match eager on every step, and
    Inductor skipped CUDA graphs for none of the graphs. With bias balancing
    the pending count (mutated in place, marked static) and the bias follow
    eager's through update_bias() every second step (two micro-batches)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    moe = mr.MoE(64, 96, 8, 2, capacity_factor=capacity_factor, activation="swiglu",
                 bias_update_rate=bias_update_rate).cuda()
    eager = copy.deepcopy(moe)
    compiled = torch.compile(moe, mode="reduce-overhead")
    for step in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        x = torch.randn(4, 33, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = compiled(xc)
        (y.square().mean() + moe.aux_loss).backward()
        y_eager = eager(xe)
        (y_eager.square().mean() + eager.aux_loss).backward()
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-6)
        for (name, p), q in zip(moe.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        if bias_update_rate and step % 2 == 1:
            assert torch.equal(moe.router.pending_load, eager.router.pending_load)
            moe.update_bias(), eager.update_bias()
            torch.testing.assert_close(moe.router.bias, eager.router.bias, rtol=0, atol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor ran a graph without CUDA graphs"
