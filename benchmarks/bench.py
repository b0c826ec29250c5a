"""Routing benchmarks: each op, its backward and the
whole route+plan+dispatch+combine pipeline, against, in the same process:
  (a) eager: the fastest pure-PyTorch formulation (benchmarks/baseline.py),
  (b) compiled: the same under torch.compile,
  (c) copy: a clone of as many bytes as the op must move (the bandwidth floor),
plus the MoE layer forward+backward against the same layer routed by (a), and
the routing overhead: the share of the layer's time outside the expert
matrix products. Median times over rotated inputs; writes a markdown table to
benchmarks/results/.

    python benchmarks/bench.py                 # CPU shapes, float32 and bfloat16
    python benchmarks/bench.py --device cuda   # GPU shapes
    python benchmarks/bench.py --smoke         # tiny sizes: checks that it still runs
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
import moe_routing as mr  # noqa: E402

ROTATE = 4  # input sets cycled through, so repeated runs do not just hit the cache


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, inputs, device, warmup=3, reps=15):
    """Median wall time of fn(*inputs[i % len(inputs)]) in milliseconds."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    sync(device)
    times = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        sync(device)
        start = time.perf_counter()
        fn(*args)
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_ms(nbytes, device, reps):
    """A clone of nbytes/2 bytes reads and writes nbytes in all, and allocates
    its output as the ops do."""
    src = [torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device) for _ in range(ROTATE)]
    return median_ms(lambda s: s.clone(), [(s,) for s in src], device, reps=reps)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- inputs

def make_inputs(T, H, E, k, dtype, device, skewed, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if skewed:  # expert E-1 is favoured: a few experts overflow
        logits = logits + torch.linspace(0.0, 3.0, E)
    x = torch.randn(T, H, generator=g).to(dtype)
    return x.to(device), logits.to(device)


def fwd_bwd(fn, leaves):
    """Forward and backward of fn with respect to leaves."""
    def run(*args):
        args = [a.detach().requires_grad_() if i in leaves else a for i, a in enumerate(args)]
        out = fn(*args)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.backward(torch.ones_like(out))
    return run


# ----------------------------------------------------------------------------- rows

class Table:
    def __init__(self, title):
        self.title, self.rows = title, []

    def add(self, name, ours, eager=None, compiled_=None, copy=None):
        self.rows.append((name, ours, eager, compiled_, copy))
        ratio = lambda base: f"{base / ours:6.2f}x" if base else "     -"  # noqa: E731
        bw = f"{100 * copy / ours:5.0f}%" if copy else "    -"
        print(f"  {name:44s} {ours:9.3f} ms  vs eager {ratio(eager)}  vs compiled {ratio(compiled_)}"
              f"  copy-bw {bw}", flush=True)

    def markdown(self):
        lines = [f"### {self.title}", "",
                 "| row | ours (ms) | eager (ms) | compiled (ms) | copy (ms) | speed-up vs eager | "
                 "speed-up vs compiled | % of copy bandwidth |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v: f"{v:.3f}" if v else "-"  # noqa: E731
        for name, ours, eager, comp, copy in self.rows:
            lines.append(
                f"| {name} | {ours:.3f} | {fmt(eager)} | {fmt(comp)} | {fmt(copy)} | "
                f"{(eager / ours if eager else 0):.2f}x | {(comp / ours if comp else 0):.2f}x | "
                f"{(100 * copy / ours if copy else 0):.0f}% |".replace("| 0.00x", "| -").replace("| 0%", "| -"))
        return "\n".join(lines) + "\n"


def bench_ops(T, H, E, k, dtype, device, reps, table):
    """Each op forward, its backward op alone, and forward+backward, at capacity factor 1.25."""
    s = torch.tensor([], dtype=dtype).element_size()
    C = mr.capacity(T, E, k, 1.25)
    sets = [make_inputs(T, H, E, k, dtype, device, False, seed) for seed in range(ROTATE)]
    routed = []
    for x, logits in sets:
        w, e, sc = mr.route(logits, k)
        slots = mr.plan(e, E, C).slots
        buffer = mr.dispatch(x, slots, E * C)
        routed.append((x, logits, w, e, sc, slots, buffer, torch.randn_like(x)))
    R = E * C
    kept_rows = T * k  # upper bound of rows moved by combine
    ops = mr
    # (name, ours, baseline, args builder, leaves for backward, bytes fwd, ours' backward op + bytes)
    specs = [
        ("route", lambda l: ops.route(l, k), lambda l: baseline.route(l, k),
         lambda r: (r[1],), [0], T * E * 4 + T * E * 4 + T * k * 12, None),
        ("plan", lambda e: ops.plan(e, E, C), lambda e: baseline.plan(e, E, C),
         lambda r: (r[3],), None, T * k * 8 * 2 + 2 * E * 8, None),
        ("dispatch", lambda x, sl: ops.dispatch(x, sl, R), lambda x, sl: baseline.dispatch(x, sl, R),
         lambda r: (r[0], r[5]), [0], T * H * s + T * k * 8 + R * H * s,
         (lambda g, sl: torch.ops.moe_routing.dispatch_backward(g, sl), lambda r: (r[6], r[5]),
          kept_rows * H * s + T * H * s)),
        ("combine", lambda b, sl, w: ops.combine(b, sl, w), lambda b, sl, w: baseline.combine(b, sl, w),
         lambda r: (r[6], r[5], r[2]), [0, 2], kept_rows * H * s + T * k * 12 + T * H * s,
         (lambda gy, b, sl, w: torch.ops.moe_routing.combine_backward(gy, b, sl, w),
          lambda r: (r[7], r[6], r[5], r[2]), T * H * s + 2 * kept_rows * H * s + R * H * s)),
        ("load_balancing_loss", lambda sc, e: ops.load_balancing_loss(sc, e),
         lambda sc, e: baseline.load_balancing_loss(sc, e), lambda r: (r[4], r[3]), [0],
         T * E * 4 + T * k * 8, None),
        ("z_loss", lambda l: ops.z_loss(l), lambda l: baseline.z_loss(l), lambda r: (r[1],), [0],
         T * E * 4, None),
    ]
    for name, ours, base, args, leaves, nbytes, backward in specs:
        inputs = [args(r) for r in routed]
        base_c = compiled(base)
        table.add(f"{name} fwd", median_ms(ours, inputs, device, reps=reps),
                  median_ms(base, inputs, device, reps=reps), median_ms(base_c, inputs, device, reps=reps),
                  copy_ms(nbytes, device, reps))
        if backward is not None:
            op, bargs, bbytes = backward
            table.add(f"{name} backward op", median_ms(op, [bargs(r) for r in routed], device, reps=reps),
                      copy=copy_ms(bbytes, device, reps))
        if leaves is not None:
            base_fb = fwd_bwd(base, leaves)
            table.add(f"{name} fwd+bwd", median_ms(fwd_bwd(ours, leaves), inputs, device, reps=reps),
                      median_ms(base_fb, inputs, device, reps=reps),
                      median_ms(fwd_bwd(compiled(base), leaves), inputs, device, reps=reps))


def opaque_experts(buffer):
    """Stands in for the experts' matrix products: the compiler may not see
    through them, so the buffer must exist (as in a real MoE layer)."""
    torch._dynamo.graph_break()
    return buffer


def ours_pipeline(x, logits, k, E, C):
    w, e, _ = mr.route(logits, k)
    slots = mr.plan(e, E, C).slots
    rows = x.shape[0] * k if C is None else E * C
    return mr.combine(opaque_experts(mr.dispatch(x, slots, rows)), slots, w)


def baseline_pipeline(x, logits, k, E, C):
    weights, experts, _ = baseline.route(logits, k)
    slots, _, _ = baseline.plan(experts, E, C)
    rows = x.shape[0] * k if C is None else E * C
    return baseline.combine(opaque_experts(baseline.dispatch(x, slots, rows)), slots, weights)


def bench_pipeline(T, H, E, k, dtype, device, reps, table, factors, skews):
    s = torch.tensor([], dtype=dtype).element_size()
    for factor in factors:
        C = None if factor is None else mr.capacity(T, E, k, factor)
        rows = T * k if C is None else E * C
        ours = lambda x, l, C=C: ours_pipeline(x, l, k, E, C)  # noqa: E731
        base = lambda x, l, C=C: baseline_pipeline(x, l, k, E, C)  # noqa: E731
        base_c = compiled(base)
        # x read, buffer written and read back, y written; the same again backward.
        nbytes = T * H * s + 2 * rows * H * s + T * H * s
        for skewed in skews:
            inputs = [make_inputs(T, H, E, k, dtype, device, skewed, seed) for seed in range(ROTATE)]
            label = f"pipeline cf={factor if factor else 'dropless'} {'skewed' if skewed else 'uniform'}"
            table.add(f"{label} fwd", median_ms(ours, inputs, device, reps=reps),
                      median_ms(base, inputs, device, reps=reps), median_ms(base_c, inputs, device, reps=reps),
                      copy_ms(nbytes, device, reps))
            table.add(f"{label} fwd+bwd", median_ms(fwd_bwd(ours, [0, 1]), inputs, device, reps=reps),
                      median_ms(fwd_bwd(base, [0, 1]), inputs, device, reps=reps),
                      median_ms(fwd_bwd(base_c, [0, 1]), inputs, device, reps=reps),
                      copy_ms(2 * nbytes, device, reps))


class BaselineRoutedMoE(mr.MoE):
    """The same layer, its routing done by the pure-PyTorch baseline."""

    def _token_choice(self, tokens, r, factor, valid, group_size=None):
        assert group_size is None, "the baseline has one capacity over all tokens"
        E, k, H = self.num_experts, self.k, tokens.shape[-1]
        C = mr.capacity(tokens.shape[0], E, k, factor, self.min_capacity)
        slots, load, kept = baseline.plan(r.experts, E, C, valid)
        out = self.experts(baseline.dispatch(tokens, slots, E * C).view(E, C, H)).view(E * C, H)
        return baseline.combine(out, slots, r.weights), load, kept, 1.0 - kept.sum() / load.sum()


def bench_module(T, H, E, k, dtype, device, reps, table):
    torch.manual_seed(0)
    ours = mr.MoE(H, 4 * H, E, k, capacity_factor=1.25).to(device=device, dtype=dtype)
    theirs = BaselineRoutedMoE(H, 4 * H, E, k, capacity_factor=1.25).to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    inputs = [(make_inputs(T, H, E, k, dtype, device, False, seed)[0],) for seed in range(2)]
    step = lambda m: fwd_bwd(lambda x: m(x), [0])  # noqa: E731
    ours_ms = median_ms(step(ours), inputs, device, warmup=1, reps=max(3, reps // 3))
    theirs_ms = median_ms(step(theirs), inputs, device, warmup=1, reps=max(3, reps // 3))
    C = mr.capacity(T, E, k, 1.25)
    buffers = [(torch.randn(E, C, H, device=device, dtype=dtype),) for _ in range(2)]
    experts_ms = median_ms(fwd_bwd(ours.experts, [0]), buffers, device, warmup=1, reps=max(3, reps // 3))
    table.add("MoE layer fwd+bwd (d_hidden = 4 H)", ours_ms, theirs_ms)
    table.add("  of which expert matrix products", experts_ms)
    overhead = 100 * (ours_ms - experts_ms) / ours_ms
    theirs_overhead = 100 * (theirs_ms - experts_ms) / theirs_ms
    print(f"  routing overhead: ours {overhead:.1f}% of the layer, baseline-routed {theirs_overhead:.1f}%")
    return overhead, theirs_overhead


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return (f"{gpu + ', ' if gpu else ''}{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


# glibc hands allocations over 32 MB straight to mmap and back on free, so every
# large output would pay its page faults anew and timings swing by 10x from
# run to run. Keeping freed memory in the heap measures the kernels, for ours
# and the baselines alike (PyTorch's CPU tuning guide gives the same advice).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=None, help="markdown file (default: benchmarks/results/<device>.md)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")

    if args.smoke:
        shapes, dtypes, factors, skews, reps = [(64, 32, 4, 2)], [torch.float32], [1.25, None], [False], 3
    elif device == "cpu":
        shapes, dtypes, factors, skews, reps = [(4096, 1024, 8, 2)], [torch.float32, torch.bfloat16], \
            [1.0, 1.25, None], [False, True], args.reps
    else:
        shapes = [(16384, 4096, 8, 2), (16384, 2048, 64, 6), (4096, 7168, 256, 8),
                  (1, 4096, 8, 2), (16, 4096, 8, 2), (256, 4096, 8, 2)]
        dtypes, factors, skews, reps = [torch.bfloat16, torch.float32], [1.0, 1.25, None], [False, True], args.reps

    header = machine(device)
    print(f"moe_routing benchmark on {header}")
    sections = []
    summary = []
    for (T, H, E, k) in shapes:
        for dtype in dtypes:
            title = f"(T, H, E, k) = ({T}, {H}, {E}, {k}), {str(dtype).replace('torch.', '')}, {device}"
            print(title)
            table = Table(title)
            bench_ops(T, H, E, k, dtype, device, reps, table)
            bench_pipeline(T, H, E, k, dtype, device, reps, table, factors, skews)
            overhead = bench_module(T, H, E, k, dtype, device, reps, table)
            summary.append(f"- {title}: routing overhead of the MoE layer {overhead[0]:.1f}% "
                           f"(baseline-routed layer: {overhead[1]:.1f}%)")
            sections.append(table.markdown())

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{device}{'-smoke' if args.smoke else ''}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(f"# moe_routing benchmark ({device})\n\n")
        fh.write(f"- machine: {header}\n- date: {datetime.date.today()}\n")
        fh.write("- ours: moe_routing ops; eager: benchmarks/baseline.py (fastest pure PyTorch we could "
                 "write); compiled: the same under torch.compile; copy: clone of the bytes the op must move\n")
        fh.write("- speed-up = baseline time / our time; % of copy bandwidth = copy time / our time\n")
        fh.write("- median of rotated inputs; fwd+bwd rows time forward and backward together\n")
        fh.write(f"- allocator: {', '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} (see NOTES.md)\n\n")
        fh.write("\n".join(summary) + "\n\n" + "\n".join(sections))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
