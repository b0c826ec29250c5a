"""Every CUDA kernel, forward and backward, at small shapes with edge cases
(empty experts, dropped choices, padding, tails that are not a multiple of
any tile or vector), for compute-sanitizer (memcheck, racecheck, synccheck):
`compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_sanitize.py`.
Not a pytest file: `.ci/gpu` runs it; it checks nothing but that the
kernels run to completion (the sanitizer checks the memory accesses).
Both grouped_mm paths run: torch's CUTLASS grouped GEMM where it applies and
the native kernels (MOE_ROUTING_GROUPED_MM=native)."""
import os
import sys

import torch

import moe_routing as mr

ops = torch.ops.moe_routing
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu": a dry run of this script itself


def backward(*outputs):
    leaves = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(leaves, [torch.randn_like(o) for o in leaves], retain_graph=True)


def routing(T, E, k, H, dtype):
    logits = torch.randn(T, E, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.linspace(-0.1, 0.1, E, device=dev)
    groups = dict(num_groups=4, topk_groups=2) if E % 4 == 0 and k <= E // 2 else {}
    for score in ("softmax", "sigmoid"):
        w, e, s = mr.route(logits, k, score=score, bias=bias, **groups)
        backward(w, s)
    w, e, s = mr.route(logits, k)
    mask = torch.rand(T, device=dev) > 0.2
    x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
    for capacity in (None, 0, 3, mr.capacity(T, E, k, 1.25)):
        for priority in ("choice", "token", "score", "batch"):
            p = mr.plan(e, E, capacity, weights=w.detach(), priority=priority, mask=mask)
        rows = T * k if capacity is None else E * capacity
        buffer = mr.dispatch(x, p.slots, rows)
        y = mr.combine(buffer * 2, p.slots, w)
        backward(y)
    backward(mr.load_balancing_loss(s, e, mask=mask), mr.z_loss(logits, mask=mask))
    choice = mr.expert_choice(s, 5, mask=mask)
    backward(choice.weights)
    mr.balanced_assignment(s.detach(), mask=mask)


def grouped(R, H, F, counts, dtype):
    x = torch.randn(R, H, device=dev, dtype=dtype, requires_grad=True)
    weight = torch.randn(len(counts), H, F, device=dev, dtype=dtype, requires_grad=True)
    out = mr.grouped_mm(x, weight, torch.tensor(counts, device=dev))
    backward(out)
    h = torch.randn(R, 2 * F, device=dev, dtype=dtype, requires_grad=True)
    backward(mr.swiglu(h))


def layers():
    for factor in (1.25, None):
        moe = mr.MoE(64, 96, 8, 2, capacity_factor=factor, activation="swiglu").to(dev)
        x = torch.randn(3, 17, 64, device=dev, requires_grad=True)
        with torch.autocast(dev, torch.bfloat16):
            y = moe(x)
        (y.float().square().mean() + moe.aux_loss).backward()


def main():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for T, E, k, H in [(0, 8, 2, 16), (1, 1, 1, 8), (37, 8, 2, 24), (129, 64, 6, 40), (70, 256, 8, 8),
                           (9, 1000, 4, 8), (40, 32, 5, 8), (50, 100, 32, 8)]:
            routing(T, E, k, H, dtype)
    for path in ("default", "native"):
        os.environ["MOE_ROUTING_GROUPED_MM"] = path
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for R, H, F, counts in [(0, 16, 8, [0, 0]), (7, 8, 8, [7]), (100, 64, 128, [30, 0, 50, 3]),
                                    (77, 24, 40, [0, 0, 77]), (200, 72, 136, [64, 64, 60]), (33, 5, 3, [10, 20])]:
                grouped(R, H, F, counts, dtype)
    os.environ.pop("MOE_ROUTING_GROUPED_MM")
    layers()
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_sanitize: every kernel ran on {dev}")


if __name__ == "__main__":
    main()
