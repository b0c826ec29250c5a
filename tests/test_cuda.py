"""CUDA kernels against the CPU kernels (skipped without a GPU): integer
outputs exactly, floating outputs within dtype tolerance; gradcheck and
opcheck on CUDA; bitwise-identical reruns; the module under torch.compile
and CUDA-graph capture."""
import pytest
import torch

import moe_routing as mr

from conftest import TOLERANCES, random_experts, random_mask, separated_logits

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
            assert_same(*both(torch.ops.moe_routing.combine_backward, gy, out, slots, w), dtype)
            assert_same(*both(torch.ops.moe_routing.dispatch_backward, out, slots), dtype)


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


def test_gradcheck_and_opcheck_on_cuda():
    dev = "cuda"
    logits = separated_logits(12, 8, device=dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: mr.route(l, 3)[0::2], (logits,))
    slots = mr.plan(random_experts(9, 4, 2).to(dev), 4, 3).slots
    x = torch.randn(9, 5, dtype=torch.float64, device=dev, requires_grad=True)
    eo = torch.randn(12, 5, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.rand(9, 2, dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mr.dispatch(x, slots, 12), (x,))
    assert torch.autograd.gradcheck(lambda eo, w: mr.combine(eo, slots, w), (eo, w))
    torch.library.opcheck(torch.ops.moe_routing.route, (logits, 3))
    torch.library.opcheck(torch.ops.moe_routing.dispatch, (x, slots, 12))
    torch.library.opcheck(torch.ops.moe_routing.combine, (eo, slots, w))


def test_module_compile_cuda_graph_and_determinism():
    torch.manual_seed(0)
    moe = mr.MoE(64, 128, 8, 2).cuda()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    y1, y2 = moe(x), moe(x)
    assert torch.equal(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), x)[0]
    g2 = torch.autograd.grad(moe(x).square().sum(), x)[0]
    assert torch.equal(g1, g2)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), y1, rtol=1e-4, atol=1e-5)
    # CUDA-graph capture of forward and backward: no host synchronisation inside.
    static_x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            moe(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(static_x)
        out.sum().backward()
    static_x.data.copy_(x.detach())
    graph.replay()
    torch.testing.assert_close(out, y1, rtol=1e-4, atol=1e-5)
