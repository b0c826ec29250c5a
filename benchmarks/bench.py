"""Routing benchmarks, in three sections (``--only`` picks some):

router  mr.route forward and forward+backward (float32 and bfloat16 logits)
        against eager softmax + top-k and the bytes floor (read the logits,
        write the scores).
ops     each op, its backward and the whole route+plan+dispatch+combine
        pipeline, against, in the same process:
          (a) eager: the fastest pure-PyTorch formulation (benchmarks/baseline.py),
          (b) compiled: the same under torch.compile,
          (c) copy: a clone of as many bytes as the op must move (the bandwidth floor),
        plus the MoE layer forward+backward against the same layer routed by
        (a), and the routing overhead: the share of the layer's time outside
        the expert matrix products.
layer   the dropless MoE layer with SwiGLU experts, forward+backward, against
        the grouped-GEMM floor and Hugging Face's Qwen3MoeSparseMoeBlock
        (grouped_mm experts), eager and compiled, with peak memory on CUDA
        (benchmarks/layer_rows.py).

Timing (benchmarks/timing.py): on CUDA, CUDA-event medians after warm-up with
the L2 flushed before each rep; on CPU, wall-clock medians; inputs rotated.
Every compiled contender is compiled afresh (torch._dynamo.reset()) and its
graphs, graph breaks and recompiles are reported; one that fell back to eager
or failed is marked in its cell and makes the run exit with status 1.
Writes a markdown table to benchmarks/results/<device>.md.

    python benchmarks/bench.py                      # CPU shapes, float32 and bfloat16
    python benchmarks/bench.py --device cuda        # GPU shapes (under 6 minutes on an H100)
    python benchmarks/bench.py --device cuda --only layer
    python benchmarks/bench.py --device cuda --full # the older, longer GPU shape list for ops
    python benchmarks/bench.py --smoke              # tiny sizes: checks that every path still runs
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
import moe_routing as mr  # noqa: E402
from layer_rows import bench_layer  # noqa: E402
from timing import CompileLog, Timer, compiled_ms, configure_dynamo, self_check  # noqa: E402

ROTATE = 4  # input sets cycled through, so repeated runs do not just hit the cache
SECTIONS = ("router", "ops", "layer")


# ----------------------------------------------------------------------------- helpers

def copy_ms(timer, nbytes, reps):
    """A clone of nbytes/2 bytes reads and writes nbytes in all, and allocates
    its output as the ops do."""
    src = [torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=timer.device) for _ in range(ROTATE)]
    return timer.median_ms(lambda s: s.clone(), [(s,) for s in src], reps=reps)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


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


def _ok(v):
    return v is not None and v == v and v > 0  # not missing, not NaN (a failed compiled contender)


class Table:
    def __init__(self, title):
        self.title, self.rows, self.notes = title, [], []

    def add(self, name, ours, eager=None, compiled_=None, copy=None):
        self.rows.append((name, ours, eager, compiled_, copy))
        ratio = lambda base: f"{base / ours:6.2f}x" if _ok(base) else "     -"  # noqa: E731
        bw = f"{100 * copy / ours:5.0f}%" if _ok(copy) else "    -"
        note = getattr(compiled_, "note", "")
        print(f"  {name:44s} {ours:9.3f} ms  vs eager {ratio(eager)}  vs compiled {ratio(compiled_)}"
              f"  copy-bw {bw}{'  [compiled: ' + note + ']' if note else ''}", flush=True)

    def markdown(self):
        lines = [f"### {self.title}", "",
                 "| row | ours (ms) | eager (ms) | compiled (ms) | copy (ms) | speed-up vs eager | "
                 "speed-up vs compiled | % of copy bandwidth |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]

        def fmt(v):
            note = getattr(v, "note", "")
            text = "n/a" if v is not None and v != v else (f"{v:.3f}" if v else "-")
            return f"{text} ({note})" if note else text
        for name, ours, eager, comp, copy in self.rows:
            lines.append(
                f"| {name} | {ours:.3f} | {fmt(eager)} | {fmt(comp)} | {fmt(copy)} | "
                f"{f'{eager / ours:.2f}x' if _ok(eager) else '-'} | "
                f"{f'{comp / ours:.2f}x' if _ok(comp) else '-'} | "
                f"{f'{100 * copy / ours:.0f}%' if _ok(copy) else '-'} |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"


class Bench:
    """What every row needs: its timer, the log of compiled contenders and
    the repetitions."""

    def __init__(self, device, reps, warmup=3):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.timer = Timer(device)
        self.log = CompileLog()

    def ms(self, fn, inputs, reps=None, warmup=None):
        return self.timer.median_ms(fn, inputs, warmup=self.warmup if warmup is None else warmup,
                                    reps=reps or self.reps)

    def compiled_ms(self, label, make, inputs, reps=None, warmup=None):
        return compiled_ms(self.timer, self.log, label, make, inputs,
                           warmup=self.warmup if warmup is None else warmup, reps=reps or self.reps)

    def copy_ms(self, nbytes):
        return copy_ms(self.timer, nbytes, self.reps)


def compile_notes(log, first, title):
    """Footnotes on the compiled contenders recorded since index ``first``:
    one summary line, then one line per contender with a graph break or a
    problem."""
    records = log.records[first:]
    if not records:
        return []
    notes = [f"compiled: torch.compile(dynamic=False) after torch._dynamo.reset(), per contender: "
             f"{len(records)} contenders, {sum(r.graphs for r in records)} graphs, "
             f"{sum(r.breaks for r in records)} graph breaks, {sum(r.recompiles for r in records)} "
             f"recompiles after the first call, {sum(r.compile_s for r in records):.1f} s in first calls "
             f"(compilation); eager fallbacks: {sum(r.fell_back for r in records)}, failures: "
             f"{sum(r.error is not None for r in records)}"]
    for r in records:
        if r.problem() or r.breaks:
            notes.append("compiled " + r.summary().replace(f"{title} / ", ""))
    print(f"  {notes[0]}", flush=True)
    return notes


# ----------------------------------------------------------------------------- router

def bench_router(T, E, k, dtype, bench, table):
    """route forward and forward+backward against eager softmax + top-k
    (baseline.route) and the bytes floor."""
    s = torch.tensor([], dtype=dtype).element_size()
    sets = []
    for seed in range(ROTATE):
        g = torch.Generator().manual_seed(seed)
        sets.append((torch.randn(T, E, generator=g).to(bench.device, dtype),))
    name = str(dtype).replace("torch.", "")
    fwd_bytes = T * E * s + T * E * 4  # read the logits, write the float32 scores
    bwd_bytes = T * E * 4 + T * E * s  # read the scores again, write the logits' gradient
    ours, base = (lambda l: mr.route(l, k)), (lambda l: baseline.route(l, k))  # noqa: E731
    table.add(f"route fwd, {name} logits", bench.ms(ours, sets), bench.ms(base, sets),
              copy=bench.copy_ms(fwd_bytes))
    table.add(f"route fwd+bwd, {name} logits", bench.ms(fwd_bwd(ours, [0]), sets),
              bench.ms(fwd_bwd(base, [0]), sets), copy=bench.copy_ms(fwd_bytes + bwd_bytes))


# ----------------------------------------------------------------------------- ops

def bench_ops(T, H, E, k, dtype, bench, table):
    """Each op forward, its backward op alone, and forward+backward, at capacity factor 1.25."""
    device = bench.device
    s = torch.tensor([], dtype=dtype).element_size()
    C = mr.capacity(T, E, k, 1.25)
    sets = [make_inputs(T, H, E, k, dtype, device, False, seed) for seed in range(ROTATE)]
    routed = []
    for x, logits in sets:
        w, e, sc = mr.route(logits, k)
        slots = mr.plan(e, E, C).slots
        buffer = mr.dispatch(x, slots, E * C)
        h = torch.randn(T, 2 * H, generator=torch.Generator().manual_seed(len(routed))).to(device, dtype)
        routed.append((x, logits, w, e, sc, slots, buffer, torch.randn_like(x), h))
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
        # The experts' SwiGLU on [T, 2H] (gate | up): fused op against eager silu(gate) * up.
        ("swiglu", lambda h: ops.swiglu(h), lambda h: baseline.swiglu(h), lambda r: (r[8],), [0],
         3 * T * H * s,
         (lambda g, h: torch.ops.moe_routing.swiglu_backward(g, h), lambda r: (r[7], r[8]), 5 * T * H * s)),
    ]
    for name, ours, base, args, leaves, nbytes, backward in specs:
        inputs = [args(r) for r in routed]
        table.add(f"{name} fwd", bench.ms(ours, inputs), bench.ms(base, inputs),
                  bench.compiled_ms(f"{table.title} / {name} fwd", lambda base=base: compiled(base), inputs),
                  bench.copy_ms(nbytes))
        if backward is not None:
            op, bargs, bbytes = backward
            table.add(f"{name} backward op", bench.ms(op, [bargs(r) for r in routed]),
                      copy=bench.copy_ms(bbytes))
        if leaves is not None:
            table.add(f"{name} fwd+bwd", bench.ms(fwd_bwd(ours, leaves), inputs),
                      bench.ms(fwd_bwd(base, leaves), inputs),
                      bench.compiled_ms(f"{table.title} / {name} fwd+bwd",
                                        lambda base=base, leaves=leaves: fwd_bwd(compiled(base), leaves), inputs))


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


def bench_pipeline(T, H, E, k, dtype, bench, table, factors, skews):
    s = torch.tensor([], dtype=dtype).element_size()
    sets = {skewed: [make_inputs(T, H, E, k, dtype, bench.device, skewed, seed) for seed in range(ROTATE)]
            for skewed in skews}
    for factor in factors:
        C = None if factor is None else mr.capacity(T, E, k, factor)
        rows = T * k if C is None else E * C
        ours = lambda x, l, C=C: ours_pipeline(x, l, k, E, C)  # noqa: E731
        base = lambda x, l, C=C: baseline_pipeline(x, l, k, E, C)  # noqa: E731
        # x read, buffer written and read back, y written; the same again backward.
        nbytes = T * H * s + 2 * rows * H * s + T * H * s
        for skewed in skews:
            inputs = sets[skewed]
            label = f"pipeline cf={factor if factor else 'dropless'} {'skewed' if skewed else 'uniform'}"
            table.add(f"{label} fwd", bench.ms(ours, inputs), bench.ms(base, inputs),
                      bench.compiled_ms(f"{table.title} / {label} fwd", lambda: compiled(base), inputs),
                      bench.copy_ms(nbytes))
            table.add(f"{label} fwd+bwd", bench.ms(fwd_bwd(ours, [0, 1]), inputs),
                      bench.ms(fwd_bwd(base, [0, 1]), inputs),
                      bench.compiled_ms(f"{table.title} / {label} fwd+bwd",
                                        lambda: fwd_bwd(compiled(base), [0, 1]), inputs),
                      bench.copy_ms(2 * nbytes))


class BaselineRoutedMoE(mr.MoE):
    """The same layer, its routing done by the pure-PyTorch baseline."""

    def _token_choice(self, tokens, r, factor, valid, group_size=None):
        assert group_size is None, "the baseline has one capacity over all tokens"
        E, k, H = self.num_experts, self.k, tokens.shape[-1]
        C = mr.capacity(tokens.shape[0], E, k, factor, self.min_capacity)
        slots, load, kept = baseline.plan(r.experts, E, C, valid)
        out = self.experts(baseline.dispatch(tokens, slots, E * C).view(E, C, H)).view(E * C, H)
        return baseline.combine(out, slots, r.weights), load, kept, 1.0 - kept.sum() / load.sum()


def bench_module(T, H, F, E, k, dtype, bench, table):
    device = bench.device
    torch.manual_seed(0)
    with torch.device(device):  # weights made where they run (GPU shapes hold gigabytes)
        ours = mr.MoE(H, F, E, k, capacity_factor=1.25)
    ours.to(dtype)
    with torch.device("meta"):  # the same router and experts, shared
        theirs = BaselineRoutedMoE(H, F, E, k, capacity_factor=1.25)
    theirs.router, theirs.experts = ours.router, ours.experts
    inputs = [(make_inputs(T, H, E, k, dtype, device, False, seed)[0],) for seed in range(2)]
    step = lambda m: fwd_bwd(lambda x: m(x), [0])  # noqa: E731
    reps = max(3, bench.reps // 3)
    ours_ms = bench.ms(step(ours), inputs, warmup=1, reps=reps)
    theirs_ms = bench.ms(step(theirs), inputs, warmup=1, reps=reps)
    C = mr.capacity(T, E, k, 1.25)
    buffers = [(torch.randn(E, C, H, device=device, dtype=dtype),) for _ in range(2)]
    experts_ms = bench.ms(fwd_bwd(ours.experts, [0]), buffers, warmup=1, reps=reps)
    ratio = F / H
    width = f"{ratio:g} H" if ratio == int(ratio) else str(F)
    table.add(f"MoE layer fwd+bwd (gelu, d_hidden = {width})", ours_ms, theirs_ms)
    table.add("  of which expert matrix products", experts_ms)
    overhead = 100 * (ours_ms - experts_ms) / ours_ms
    theirs_overhead = 100 * (theirs_ms - experts_ms) / theirs_ms
    print(f"  routing overhead: ours {overhead:.1f}% of the layer, baseline-routed {theirs_overhead:.1f}%")
    return overhead, theirs_overhead


# ----------------------------------------------------------------------------- configurations

BF16, FP32 = torch.bfloat16, torch.float32


def configuration(device, smoke, full, reps):
    """Shapes and repetitions per section. ops shapes are (T, H, E, k, d_hidden
    of the gelu layer rows); layer shapes are (T, H, F, E, k)."""
    if smoke:
        return dict(router=[(64, 16, 4)], router_dtypes=[FP32, BF16],
                    ops=[(64, 32, 4, 2, 128)], ops_dtypes=[FP32], factors=[1.25, None], skews=[False],
                    layer=[(64, 32, 16, 4, 2)], reps=3, layer_reps=3, warmup=2)
    if device == "cpu":
        return dict(router=[(16384, 256, 8)], router_dtypes=[FP32, BF16],
                    ops=[(4096, 1024, 8, 2, 4096)], ops_dtypes=[FP32, BF16], factors=[1.0, 1.25, None],
                    skews=[False, True], layer=[(1024, 512, 256, 8, 2)], reps=reps,
                    layer_reps=max(3, reps // 3), warmup=3)
    layer = [(16384, 2048, 768, 128, 8), (8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6)]
    if full:  # the long list: decode-sized batches too, both dtypes, three capacity factors
        ops = [(16384, 4096, 8, 2, 14336), (16384, 2048, 64, 6, 1408), (4096, 7168, 256, 8, 2048),
               (1, 4096, 8, 2, 14336), (16, 4096, 8, 2, 14336), (256, 4096, 8, 2, 14336)]
        return dict(router=[(16384, 256, 8)], router_dtypes=[FP32, BF16], ops=ops, ops_dtypes=[BF16, FP32],
                    factors=[1.0, 1.25, None], skews=[False, True], layer=layer, reps=reps,
                    layer_reps=max(5, 2 * reps // 3), warmup=3)
    # The default GPU run (meant to stay under 6 minutes on an H100):
    # compilation dominates the ops section (19 compiled cells per shape, a few
    # seconds each when inductor's caches are cold), so two shapes (few large
    # experts; many small ones), bfloat16 only, two capacity factors. The
    # layer section covers E = 8, 64 and 128.
    ops = [(16384, 4096, 8, 2, 14336), (4096, 7168, 256, 8, 2048)]
    return dict(router=[(16384, 256, 8)], router_dtypes=[FP32, BF16], ops=ops, ops_dtypes=[BF16],
                factors=[1.25, None], skews=[False, True], layer=layer, reps=reps,
                layer_reps=max(5, 2 * reps // 3), warmup=3)


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = []
    if device == "cuda":
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    parts.append(f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    try:
        import transformers
        versions += f", transformers {transformers.__version__}"
    except Exception:  # noqa: BLE001  (benchmark-only dependency)
        pass
    return "; ".join(parts + [versions])


# glibc hands allocations over 32 MB straight to mmap and back on free, so every
# large output would pay its page faults anew and timings swing by 10x from
# run to run. Keeping freed memory in the heap measures the kernels, for ours
# and the baselines alike (PyTorch's CPU tuning guide gives the same advice).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def parse_only(text):
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--only takes a comma-separated subset of {', '.join(SECTIONS)}")
    return list(dict.fromkeys(chosen))  # in the order given: the first runs first


def write_report(out, device, smoke, header, bench, cfg, elapsed, problems, summary, sections):
    """The markdown result file: the machine and method lines, then the tables."""
    with open(out, "w") as fh:
        fh.write(f"# moe_routing benchmark ({device}{', smoke sizes' if smoke else ''})\n\n")
        fh.write(f"- machine: {header}\n- date: {datetime.date.today()}\n")
        fh.write(f"- timing: {bench.timer.describe()}; warm-up {cfg['warmup']}, {cfg['reps']} reps "
                 f"({cfg['layer_reps']} for the layer section)\n")
        fh.write(f"- elapsed: {'; '.join(elapsed)}\n")
        fh.write("- ours: moe_routing ops; eager: benchmarks/baseline.py (fastest pure PyTorch we could "
                 "write); compiled: the same under torch.compile; copy: clone of the bytes the op must move\n")
        fh.write("- speed-up = baseline time / our time; % of copy bandwidth = copy time / our time\n")
        fh.write("- fwd+bwd rows time forward and backward together\n")
        fh.write(f"- allocator: {', '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())} (see NOTES.md)\n")
        if problems:
            fh.write("\n**Problems in this run:**\n\n" + "".join(f"- {p}\n" for p in problems))
        fh.write("\n" + ("\n".join(summary) + "\n\n" if summary else "") + "\n".join(sections))


def main():
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions")
    parser.add_argument("--full", action="store_true", help="GPU: the long ops shape list (both dtypes, "
                        "decode-sized batches, capacity factor 1.0 too); not bound by the 6-minute target")
    parser.add_argument("--only", type=parse_only, default=list(SECTIONS),
                        help=f"comma-separated sections to run, in the order given: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=None, help="markdown file (default: benchmarks/results/<device>.md; "
                        "<device>-smoke.md with --smoke, <device>-<sections>.md with --only, "
                        "<device>-full.md with --full)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    # Dynamo warns that it traces through transformers' lru_cache'd version checks; harmless here.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    configure_dynamo()
    cfg = configuration(device, args.smoke, args.full, args.reps)
    bench = Bench(device, cfg["reps"], cfg["warmup"])

    header = machine(device)
    print(f"moe_routing benchmark on {header}")
    print(f"timing: {bench.timer.describe()}")
    if args.smoke:
        print(f"compile bookkeeping self-check: {self_check(bench.timer)}", flush=True)
    if args.out:
        out = args.out
    else:
        suffix = ("-smoke" if args.smoke else "") + ("-full" if args.full else "")
        if args.only != list(SECTIONS):
            suffix += "-" + "-".join(args.only)
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{device}{suffix}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t_run = time.perf_counter()
    sections, summary, problems, elapsed = [], [], [], []

    def report(status):
        """(Re)writes `out` with every table so far: a run stopped by a time
        limit (the lent GPU's) still leaves the tables it finished."""
        write_report(out, device, args.smoke, header, bench, cfg, elapsed + [status],
                     bench.log.problems() + problems, summary, sections)
    for section in args.only:
        t0 = time.perf_counter()
        first = len(bench.log.records)
        print(f"== {section}", flush=True)
        if section == "router":
            for (T, E, k) in cfg["router"]:
                title = f"router: route (T, E, k) = ({T}, {E}, {k}), {device}"
                print(title)
                table = Table(title)
                for dtype in cfg["router_dtypes"]:
                    bench_router(T, E, k, dtype, bench, table)
                table.notes.append("eager: softmax in float32, top-k, renormalisation (baseline.route); "
                                   "copy: the bytes floor, reading the logits and writing float32 scores "
                                   "(fwd+bwd: plus reading the scores and writing the logits' gradient)")
                sections.append(table.markdown())
                report(f"INCOMPLETE: {len(sections)} tables so far, {section} section running")
        elif section == "ops":
            for (T, H, E, k, F) in cfg["ops"]:
                for dtype in cfg["ops_dtypes"]:
                    title = f"ops: (T, H, E, k) = ({T}, {H}, {E}, {k}), {str(dtype).replace('torch.', '')}, {device}"
                    print(title)
                    table = Table(title)
                    mark = len(bench.log.records)
                    bench_ops(T, H, E, k, dtype, bench, table)
                    bench_pipeline(T, H, E, k, dtype, bench, table, cfg["factors"], cfg["skews"])
                    overhead = bench_module(T, H, F, E, k, dtype, bench, table)
                    summary.append(f"- {title}: routing overhead of the MoE layer {overhead[0]:.1f}% "
                                   f"(baseline-routed layer: {overhead[1]:.1f}%)")
                    table.notes += compile_notes(bench.log, mark, title)
                    sections.append(table.markdown())
                    report(f"INCOMPLETE: {len(sections)} tables so far, {section} section running")
                    torch._dynamo.reset()
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
        else:
            for (T, H, F, E, k) in cfg["layer"]:
                mark = len(bench.log.records)
                table = bench_layer(T, H, F, E, k, device, bench.timer, bench.log, cfg["layer_reps"],
                                    cfg["warmup"] - 1, problems)
                table.notes += compile_notes(bench.log, mark, table.title)
                sections.append(table.markdown())
                report(f"INCOMPLETE: {len(sections)} tables so far, {section} section running")
                torch._dynamo.reset()  # drops the compiled code holding this shape's modules
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        compile_s = sum(r.compile_s for r in bench.log.records[first:])
        elapsed.append(f"{section} {seconds:.1f} s (of which first calls of compiled contenders {compile_s:.1f} s)")
        print(f"== {section}: {elapsed[-1].split(' ', 1)[1]}", flush=True)
    total = time.perf_counter() - t_run
    elapsed.append(f"total {total:.1f} s")
    print(f"elapsed: {'; '.join(elapsed)}")
    problems = bench.log.problems() + problems
    write_report(out, device, args.smoke, header, bench, cfg, elapsed, problems, summary, sections)
    print(f"wrote {out}")
    if problems:
        print("PROBLEMS:\n" + "\n".join(f"  - {p}" for p in problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
