"""Timing and torch.compile bookkeeping shared by benchmarks/bench.py.

* CUDA: medians of CUDA-event times (torch.cuda.Event(enable_timing=True)),
  after warm-up, with the L2 cache flushed before each timed repetition (a
  write of a buffer several times the L2 size, outside the events) and the
  inputs rotated over several sets. The recipe of triton.testing.do_bench.
* CPU: medians of wall-clock times over rotated inputs (no flush: the
  rotated sets are what keeps repeated runs from hitting the cache).
* torch.compile: :func:`compiled_ms` resets Dynamo before each compiled
  contender (a fresh cache: no recompile limit carried over from another
  shape, dtype or grad mode), counts the graphs, graph breaks, frames and
  recompiles it caused, times its compilation, and marks the result when
  any frame ran eagerly because Dynamo gave up (recompile limit) or when
  nothing was compiled at all.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch


class Ms(float):
    """A time in milliseconds that can carry a note for its table cell
    (e.g. a compiled contender that fell back to eager)."""

    note: str = ""

    @classmethod
    def of(cls, value: float, note: str = "") -> "Ms":
        out = cls(value)
        out.note = note
        return out


class Timer:
    def __init__(self, device: str, flush_mib: int = 256):
        self.device = device
        self.flush: Optional[torch.Tensor] = None
        self.flush_mib = flush_mib
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
            self.flush_mib = max(flush_mib, 4 * l2 // 2**20)
            self.flush = torch.empty(self.flush_mib * 2**20, dtype=torch.int8, device="cuda")

    def describe(self) -> str:
        if self.device == "cuda":
            return (f"CUDA-event medians; L2 flushed before each timed rep by writing "
                    f"{self.flush_mib} MiB (outside the events); inputs rotated")
        return "wall-clock medians (time.perf_counter); inputs rotated"

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable, inputs: Sequence[tuple], warmup: int = 3, reps: int = 15) -> float:
        """Median time of fn(*inputs[i % len(inputs)]) in milliseconds."""
        for i in range(warmup):
            fn(*inputs[i % len(inputs)])
        self.sync()
        if self.device != "cuda":
            times = []
            for i in range(reps):
                args = inputs[i % len(inputs)]
                start = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - start)
            return 1e3 * statistics.median(times)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            args = inputs[i % len(inputs)]
            self.flush.zero_()  # evicts inputs, weights and the last rep's outputs from L2
            starts[i].record()
            fn(*args)
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def peak_mib(self, fn: Callable, args: tuple) -> Optional[float]:
        """Peak CUDA memory allocated by one call of fn(*args) above what was
        allocated before it, in MiB (None on CPU)."""
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


# ----------------------------------------------------------------------------- torch.compile

def _counters() -> dict:
    from torch._dynamo.utils import counters
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["total"],
        "frames_ok": counters["frames"]["ok"],
        "breaks": sum(counters["graph_break"].values()),
        "limit_hits": sum(n for reason, n in counters["unimplemented"].items()
                          if "recompile limit" in reason.lower() or "cache_size_limit" in reason),
    }


def configure_dynamo() -> None:
    """Raise instead of silently running eagerly when a recompile limit is hit
    (torch >= 2.6 has the switch; older versions are caught by the counters)."""
    import torch._dynamo

    try:
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    except (AttributeError, KeyError):
        pass


class CompileRecord:
    def __init__(self, label: str):
        self.label = label
        self.graphs = self.frames = self.frames_ok = self.breaks = self.limit_hits = 0
        self.recompiles = 0  # graphs captured after the first call
        self.compile_s = 0.0
        self.error: Optional[str] = None

    @property
    def fell_back(self) -> bool:
        return self.error is None and (self.limit_hits > 0 or self.graphs == 0)

    def problem(self) -> Optional[str]:
        if self.error is not None:
            return f"{self.label}: torch.compile failed: {self.error}"
        if self.fell_back:
            return (f"{self.label}: compiled contender ran eagerly "
                    f"({self.graphs} graphs, {self.limit_hits} recompile-limit hits)")
        if self.recompiles:
            return f"{self.label}: recompiled {self.recompiles} time(s) after its first call"
        return None

    def note(self) -> str:
        if self.error is not None:
            return "FAILED"
        if self.fell_back:
            return "EAGER FALLBACK"
        return "RECOMPILED" if self.recompiles else ""

    def summary(self) -> str:
        text = (f"{self.label}: {self.graphs} graph{'s' if self.graphs != 1 else ''}, "
                f"{self.breaks} graph break{'s' if self.breaks != 1 else ''}, "
                f"{self.recompiles} recompiles after the first call, frames {self.frames_ok}/{self.frames} "
                f"compiled, first call {self.compile_s:.1f} s")
        problem = self.problem()
        return text + (f" -- {problem.split(': ', 1)[1]}" if problem else "")


class CompileLog:
    """All compiled contenders of a run, for the tables' footnotes and the
    final verdict."""

    def __init__(self):
        self.records: List[CompileRecord] = []

    def problems(self) -> List[str]:
        return [p for p in (r.problem() for r in self.records) if p]


def compiled_ms(timer: Timer, log: CompileLog, label: str, make: Callable[[], Callable],
                inputs: Sequence[tuple], warmup: int = 3, reps: int = 15, quiet: bool = False) -> Ms:
    """Times the callable ``make()`` returns (it calls torch.compile'd code)
    after torch._dynamo.reset(), recording what Dynamo did. A compile error
    does not stop the run: the cell says FAILED and the run's verdict fails."""
    import torch._dynamo

    torch._dynamo.reset()
    record = CompileRecord(label)
    log.records.append(record)
    start = _counters()
    try:
        fn = make()
        t0 = time.perf_counter()
        fn(*inputs[0])
        timer.sync()
        record.compile_s = time.perf_counter() - t0
        first = _counters()
        ms = timer.median_ms(fn, inputs, warmup=max(0, warmup - 1), reps=reps)
    except Exception as error:  # noqa: BLE001  (reported in the table and the verdict)
        record.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        if not quiet:
            print(f"  !! {label}: {record.error}", flush=True)
        return Ms.of(float("nan"), "FAILED")
    end = _counters()
    for key in ("graphs", "frames", "frames_ok", "breaks", "limit_hits"):
        setattr(record, key, end[key] - start[key])
    record.recompiles = end["graphs"] - first["graphs"]
    return Ms.of(ms, record.note())


def self_check(timer: Timer) -> str:
    """Checks, on a toy function, that the bookkeeping sees what it is for: a
    recompile-limit fallback to eager, a hard failure, and a recompile during
    timing. Run by --smoke; raises AssertionError when it does not."""
    import torch._dynamo

    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    has_fail = hasattr(config, "fail_on_recompile_limit_hit")
    saved = getattr(config, limit_name), (config.fail_on_recompile_limit_hit if has_fail else None)
    log = CompileLog()
    shapes = [(torch.randn(n, 4, device=timer.device),) for n in (2, 3, 4)]
    dynamo_log = logging.getLogger("torch._dynamo")  # the limit warnings are expected here
    saved_level = dynamo_log.level
    dynamo_log.setLevel(logging.ERROR)
    make = lambda: torch.compile(lambda x: torch.sin(x) + 1, dynamic=False)  # noqa: E731
    try:
        setattr(config, limit_name, 1)
        if has_fail:
            config.fail_on_recompile_limit_hit = False
        fell = compiled_ms(timer, log, "fallback", make, shapes, warmup=1, reps=3)
        failed = None
        if has_fail:
            config.fail_on_recompile_limit_hit = True
            failed = compiled_ms(timer, log, "fail", make, shapes, warmup=1, reps=3, quiet=True)
        setattr(config, limit_name, 8)
        recompiled = compiled_ms(timer, log, "recompile", make, shapes, warmup=1, reps=3)
        clean = compiled_ms(timer, log, "clean", make, shapes[:1], warmup=1, reps=3)
    finally:
        setattr(config, limit_name, saved[0])
        if has_fail:
            config.fail_on_recompile_limit_hit = saved[1]
        torch._dynamo.reset()
        dynamo_log.setLevel(saved_level)
    assert fell.note == "EAGER FALLBACK", f"recompile-limit fallback not seen: {log.records[0].summary()}"
    assert failed is None or failed.note == "FAILED", f"hard failure not seen: {log.records[1].summary()}"
    assert recompiled.note == "RECOMPILED", f"recompile not seen: {log.records[-2].summary()}"
    assert clean.note == "" and log.records[-1].graphs == 1, f"clean compile: {log.records[-1].summary()}"
    assert len(log.problems()) == len(log.records) - 1
    return f"ok ({len(log.records)} cases: fallback, {'failure, ' if has_fail else ''}recompile, clean)"
