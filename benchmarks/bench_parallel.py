"""Expert-parallel MoE layer on CPU with gloo: time per layer forward +
backward at world sizes 1, 2 and 4 (weak scaling: a fixed number of tokens
per rank), and the share of it spent in all-to-all.

Run: ``PYTHONPATH=. python3 benchmarks/bench_parallel.py`` (writes
benchmarks/results/parallel_cpu.md). Each process uses one thread. The
all-to-all share is measured around the forward's all_to_all calls (each
waited for) and counted twice, since the backward exchanges the same sizes
in reverse; it includes the wait for the slowest rank (load imbalance shows
up as communication time).
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPE = dict(T=1024, H=256, F=512, E=8, k=2)


def _worker(rank, world, init_file, mode, iters, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    import moe_routing as mr
    from moe_routing import parallel
    T, H, Fh, E, k = (SHAPE[n] for n in ("T", "H", "F", "E", "k"))
    factor = None if mode == "dropless" else 1.25
    torch.manual_seed(0)
    layer = mr.MoE(H, Fh, E, k, capacity_factor=factor, expert_parallel=dist.group.WORLD)
    torch.manual_seed(1 + rank)
    x = torch.randn(T, H, requires_grad=True)
    spent = [0.0]
    original = parallel._all_to_all

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    parallel._all_to_all = timed
    times, comm = [], []
    for i in range(iters + 2):
        dist.barrier()
        spent[0] = 0.0
        start = time.perf_counter()
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
        elapsed = time.perf_counter() - start
        if i >= 2:  # warm-up
            times.append(elapsed)
            comm.append(2 * spent[0])  # the backward moves the same bytes back
    t = torch.tensor([statistics.median(times), statistics.median(comm)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put((t[0].item(), t[1].item()))
    dist.barrier()
    dist.destroy_process_group()


def _single(iters, mode):
    """The single-process layer (no expert parallelism) for reference."""
    import moe_routing as mr
    torch.set_num_threads(1)
    T, H, Fh, E, k = (SHAPE[n] for n in ("T", "H", "F", "E", "k"))
    torch.manual_seed(0)
    layer = mr.MoE(H, Fh, E, k, capacity_factor=None if mode == "dropless" else 1.25)
    x = torch.randn(T, H, requires_grad=True)
    times = []
    for i in range(iters + 2):
        start = time.perf_counter()
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(world, mode, iters):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), mode, iters, queue),
                 nprocs=world, join=True)
    return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "parallel_cpu.md"))
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    cores = os.cpu_count()
    lines = [
        "# Expert-parallel MoE layer, CPU (gloo)",
        "",
        f"Machine: {cores}-core VM, no GPU; {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__}; one thread per process (world 4 oversubscribes the "
        f"{cores} cores).",
        "",
        f"Layer: T={SHAPE['T']} tokens per rank, H={SHAPE['H']}, F={SHAPE['F']}, "
        f"E={SHAPE['E']}, k={SHAPE['k']}, gelu; forward + backward of one layer, median of "
        f"{args.iters} after 2 warm-up steps; slowest rank. Weak scaling: the global batch "
        "grows with the world size, so ideal times stay flat. 'all-to-all' = time inside the "
        "forward's all_to_all calls (waits included) x 2 for the backward.",
        "",
        "| mode | world | ms / layer fwd+bwd | all-to-all ms | all-to-all share |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("capacity 1.25", "dropless"):
        key = "dropless" if mode == "dropless" else "capacity"
        single = _single(args.iters, key)
        lines.append(f"| {mode} | 1 (no EP) | {single * 1e3:.1f} | - | - |")
        for world in worlds:
            total, comm = run(world, key, args.iters)
            lines.append(f"| {mode} | {world} | {total * 1e3:.1f} | {comm * 1e3:.1f} | "
                         f"{100 * comm / total:.0f}% |")
            print(lines[-1], flush=True)
    lines += ["", "Load average (1, 5, 15 min) at the end of the run: "
              + ", ".join(f"{v:.2f}" for v in os.getloadavg())
              + " (the machine is shared: times above are noisy and mostly show "
              "oversubscription of the cores, not the interconnect)."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
