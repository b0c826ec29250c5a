"""The dropless MoE layer (SwiGLU experts, forward+backward) side by side
with, in the same process and on the same weights:

  * the grouped-GEMM floor: only the two grouped GEMMs of the SwiGLU experts
    on an already-sorted packed layout with int32 offsets (torch._grouped_mm):
    forward x @ w_in ([R, H] x [E, H, 2F]) and h @ w_out ([R, F] x [E, F, H]),
    backward dX and dW of both (six GEMMs, no routing, no activation);
  * Hugging Face's Qwen3MoeSparseMoeBlock with experts_implementation=
    "grouped_mm", eager and torch.compile'd (transformers is a benchmark-only
    dependency: without it those rows say why they are missing);
  * ours dropless (capacity_factor=None) and ours capacity_factor=1.25,
    eager and compiled.

Every contender computes the same function: one router weight and one set of
expert weights, copied into Hugging Face's layout. Our router runs in the
layer's dtype here (Router(dtype=bfloat16)), as Hugging Face's does, so both
select the same experts; by default ours routes in float32. Forward+backward
is y = layer(x), then the gradients of y (with a random output gradient) with
respect to x and every parameter; the auxiliary losses are computed in our
forward but not backpropagated (Hugging Face's block computes none).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

import moe_routing as mr
from timing import CompileLog, Ms, Timer, compiled_ms

# max |ours - HF| / max |HF| in bfloat16 (measured on CPU at up to H = 4096: 4-7e-3 and 8-11e-3)
REL_TOLERANCE = 2e-2  # outputs
GRAD_TOLERANCE = 3e-2  # input gradients (through the experts and the router: more roundings)


# ----------------------------------------------------------------------------- grouped-GEMM floor

def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def floor_step(x, h, gy, dh2, w_in, w_out, offs):
    """The six grouped GEMMs of the SwiGLU experts' forward and backward."""
    _gmm(x, w_in, offs)                      # forward up:   [R, H] x [E, H, 2F] -> [R, 2F]
    _gmm(h, w_out, offs)                     # forward down: [R, F] x [E, F, H]  -> [R, H]
    _gmm(gy, w_out.transpose(1, 2), offs)    # dH    = dY w_out^T                -> [R, F]
    _gmm(h.t(), gy, offs)                    # dWout = h^T dY                    -> [E, F, H]
    _gmm(dh2, w_in.transpose(1, 2), offs)    # dX    = dH2 w_in^T                -> [R, H]
    return _gmm(x.t(), dh2, offs)            # dWin  = x^T dH2                   -> [E, H, 2F]


def floor_unavailable(device: str, dtype: torch.dtype) -> Optional[str]:
    """Why the floor cannot run here, or None. Tries the six GEMMs at a tiny
    size and checks one of them against per-expert matrix products."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8)"
    try:
        g = torch.Generator().manual_seed(0)
        E, H, F, counts = 2, 16, 16, torch.tensor([5, 27])  # offsets not multiples of 8
        R = int(counts.sum())
        offs = counts.cumsum(0).to(device=device, dtype=torch.int32)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        x, h, gy, dh2, w_in, w_out = rnd(R, H), rnd(R, F), rnd(R, H), rnd(R, 2 * F), rnd(E, H, 2 * F), rnd(E, F, H)
        floor_step(x, h, gy, dh2, w_in, w_out, offs)
        got = _gmm(x, w_in, offs).float()
        want = torch.cat([x[:5].float() @ w_in[0].float(), x[5:].float() @ w_in[1].float()])
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            return f"torch._grouped_mm gave wrong results on {device} {dtype}"
    except Exception as error:  # noqa: BLE001
        first = str(error).splitlines()[0] if str(error) else ""
        return f"torch._grouped_mm unavailable on {device} {str(dtype).replace('torch.', '')}: " \
               f"{type(error).__name__}: {first[:160]}"
    return None


# ----------------------------------------------------------------------------- Hugging Face

def hf_unavailable() -> Optional[str]:
    try:
        import transformers
        from transformers import Qwen3MoeConfig  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except Exception as error:  # noqa: BLE001  (any import failure: the rows are skipped)
        return f"transformers not importable ({type(error).__name__}: {error})"
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return f"transformers {transformers.__version__} has no experts_implementation"
    if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
        return f"transformers {transformers.__version__} has no grouped_mm experts implementation"
    return None


def make_hf_block(ours: mr.MoE, H: int, F: int, E: int, k: int, device: str, dtype: torch.dtype):
    """Qwen3MoeSparseMoeBlock(experts_implementation="grouped_mm") holding
    ours' router and expert weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                            num_experts_per_tok=k, norm_topk_prob=True, hidden_act="silu",
                            experts_implementation="grouped_mm")
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        config._experts_implementation = "grouped_mm"
    with torch.device(device):
        block = Qwen3MoeSparseMoeBlock(config)
    block.to(dtype)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        # ours: w_in [E, H, 2F] (gate columns, then up), w_out [E, F, H];
        # Hugging Face: nn.Linear layout, gate_up_proj [E, 2F, H], down_proj [E, H, F].
        block.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
    if block.experts.config._experts_implementation != "grouped_mm":
        raise RuntimeError("Qwen3MoeSparseMoeBlock did not take experts_implementation='grouped_mm'")
    return block


def hf_grouped_path(block, x: torch.Tensor) -> str:
    """Which kernel Hugging Face's grouped_mm experts use on x eagerly: the
    torch grouped GEMM or its per-expert loop fallback (a host sync)."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
        w = block.experts.gate_up_proj
        offs = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        ok = _can_use_grouped_mm(x.reshape(-1, x.shape[-1]), w, offs)
    except Exception as error:  # noqa: BLE001  (a private helper: report, don't fail)
        return f"unknown ({type(error).__name__})"
    return "torch grouped_mm" if ok else "per-expert loop fallback (host sync)"


# ----------------------------------------------------------------------------- the rows

def module_step(call: Callable, params: List[torch.Tensor]) -> Callable:
    """Forward, then the gradients of the output with respect to the input
    and every parameter (no accumulation into .grad)."""
    def run(x, gy):
        x = x.detach().requires_grad_()
        y = call(x)
        return torch.autograd.grad(y, [x, *params], gy)
    return run


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare_with_hf(ours, params, hf, x, gy, k) -> Tuple[str, bool]:
    """Outputs and input gradients of ours (dropless) and Hugging Face's block
    on x. Both select from the same bfloat16 logits, where exact ties are
    common; ours breaks a tie towards the lower expert index, torch.topk
    need not, so tokens whose expert sets differ on a tie are left out (and
    counted). A token whose sets differ without a tie is a disagreement."""
    T, H = x.shape[-2], x.shape[-1]
    with torch.no_grad():
        r = ours.router(x.reshape(T, H))
        _, _, hf_experts = hf.gate(x.reshape(T, H))
    differ = (r.experts.sort(1).values != hf_experts.sort(1).values).any(1)
    top = r.logits.float().topk(min(k + 1, r.logits.shape[1]), dim=1).values
    tied = top[:, k - 1] == top[:, -1] if top.shape[1] > k else torch.zeros_like(differ)
    untied = int((differ & ~tied).sum())
    same = ~differ
    ours_grads = module_step(ours, params)(x, gy)
    hf_grads = module_step(hf, list(hf.parameters()))(x, gy)
    y_err = rel_error(ours(x).reshape(T, H)[same], hf(x).reshape(T, H)[same])
    dx_err = rel_error(ours_grads[0].reshape(T, H)[same], hf_grads[0].reshape(T, H)[same])
    text = (f"ours (dropless) vs Hugging Face: max |diff| / max |HF| = {y_err:.2e} (output), "
            f"{dx_err:.2e} (input gradient), tolerances {REL_TOLERANCE:.0e} and {GRAD_TOLERANCE:.0e}, "
            f"over the {int(same.sum())} of {T} tokens that select the same experts; "
            f"{int(differ.sum()) - untied} select differently on exact bfloat16 logit ties "
            f"(ours: lower index first), {untied} without a tie")
    return text, untied == 0 and y_err <= REL_TOLERANCE and dx_err <= GRAD_TOLERANCE


class LayerTable:
    HEAD = ("| contender | fwd+bwd (ms) | % of grouped-GEMM floor | speed-up vs HF eager | "
            "speed-up vs HF compiled | peak memory (MiB) | note |\n|---|---:|---:|---:|---:|---:|---|")

    def __init__(self, title: str):
        self.title = title
        self.rows: List[Tuple[str, Optional[Ms], Optional[float], str]] = []
        self.notes: List[str] = []
        self.ref = {}

    def add(self, key: str, label: str, ms: Optional[Ms], mem: Optional[float], note: str = ""):
        if ms is not None and ms == ms:
            self.ref[key] = ms
        note = "; ".join(n for n in (getattr(ms, "note", ""), note) if n)
        self.rows.append((label, ms, mem, note))
        cell = f"{ms:10.3f} ms" if ms is not None else "       n/a   "
        memory = f"  peak {mem:9.1f} MiB" if mem is not None else ""
        print(f"  {label:34s} {cell}{memory}{'  ' + note if note else ''}", flush=True)

    def markdown(self) -> str:
        def ratio(key, ms, invert=False):
            base = self.ref.get(key)
            if base is None or ms is None or ms != ms or ms == 0:
                return "-"
            return f"{100 * base / ms:.0f}%" if invert else f"{base / ms:.2f}x"
        lines = [f"### {self.title}", "", self.HEAD]
        for label, ms, mem, note in self.rows:
            lines.append(" | ".join([
                f"| {label}", f"{ms:.3f}" if ms is not None and ms == ms else "n/a",
                ratio("floor", ms, invert=True), ratio("hf", ms), ratio("hf_c", ms),
                f"{mem:.0f}" if mem is not None else "-", (note or "").replace("|", "/")]) + " |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"


def bench_layer(T: int, H: int, F: int, E: int, k: int, device: str, timer: Timer, log: CompileLog,
                reps: int, warmup: int, problems: List[str], dtype: torch.dtype = torch.bfloat16) -> LayerTable:
    name = str(dtype).replace("torch.", "")
    title = f"MoE layer, SwiGLU experts, (T, H, F, E, k) = ({T}, {H}, {F}, {E}, {k}), {name}, {device}, fwd+bwd"
    print(title, flush=True)
    table = LayerTable(title)
    torch.manual_seed(0)
    with torch.device(device):
        ours = mr.MoE(H, F, E, k, capacity_factor=None, activation="swiglu", dtype=dtype)
        # The same router and experts (shared, not copied), capacity factor 1.25.
        with torch.device("meta"):
            capped = mr.MoE(H, F, E, k, capacity_factor=1.25, activation="swiglu", dtype=dtype)
    ours.to(dtype)
    capped.router, capped.experts = ours.router, ours.experts
    params = list(ours.parameters())
    g = torch.Generator(device=device).manual_seed(1)  # made on the device: GPU inputs are gigabytes
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    inputs = [(rnd(1, T, H), rnd(1, T, H)) for _ in range(2)]  # (x, output gradient)

    # Grouped-GEMM floor, on the row counts our router gives the first input.
    reason = floor_unavailable(device, dtype)
    if reason is None:
        with torch.no_grad():
            r = ours.router(inputs[0][0].reshape(T, H))
            counts = mr.plan(r.experts, E, None).kept
        offs = counts.cumsum(0).to(torch.int32)
        w_in, w_out = ours.experts.w_in.detach().clone(), ours.experts.w_out.detach().clone()
        R = T * k
        floor_inputs = [(rnd(R, H), rnd(R, F), rnd(R, H), rnd(R, 2 * F)) for _ in range(2)]
        step = lambda x, h, gy, dh2: floor_step(x, h, gy, dh2, w_in, w_out, offs)  # noqa: E731
        ms = timer.median_ms(step, floor_inputs, warmup=warmup, reps=reps)
        table.add("floor", "grouped-GEMM floor (6 GEMMs)", Ms(ms), timer.peak_mib(step, floor_inputs[0]))
        del floor_inputs, w_in, w_out, step
    else:
        table.add("floor", "grouped-GEMM floor (6 GEMMs)", None, None, reason)
        table.notes.append(f"grouped-GEMM floor n/a: {reason}")

    # Hugging Face Qwen3MoeSparseMoeBlock, grouped_mm experts.
    reason = hf_unavailable()
    hf = None
    if reason is None:
        try:
            hf = make_hf_block(ours, H, F, E, k, device, dtype)
        except Exception as error:  # noqa: BLE001
            reason = f"Qwen3MoeSparseMoeBlock could not be built: {type(error).__name__}: {error}"
    if hf is not None:
        import transformers
        table.notes.append(f"Hugging Face: transformers {transformers.__version__} Qwen3MoeSparseMoeBlock, "
                           f"experts_implementation=grouped_mm, eager path: {hf_grouped_path(hf, inputs[0][0])}")
        # Same function: outputs and input gradients once per shape.
        x0, gy0 = inputs[0]
        check, agree = compare_with_hf(ours, params, hf, x0, gy0, k)
        print(f"  {check}", flush=True)
        table.notes.append(check)
        if not agree:
            problems.append(f"{title}: ours and Hugging Face disagree: {check}")
            table.notes.append("**OUTPUTS DISAGREE: the timings below do not compare the same function**")
        hf_params = list(hf.parameters())
        hf_step = module_step(hf, hf_params)
        ms = timer.median_ms(hf_step, inputs, warmup=warmup, reps=reps)
        table.add("hf", "HF Qwen3MoeSparseMoeBlock eager", Ms(ms), timer.peak_mib(hf_step, inputs[0]))
        label = "HF Qwen3MoeSparseMoeBlock compiled"
        holder = {}

        def make_hf_compiled():
            holder["step"] = module_step(torch.compile(hf, dynamic=False), hf_params)
            return holder["step"]
        ms = compiled_ms(timer, log, f"{title} / {label}", make_hf_compiled, inputs, warmup=warmup, reps=reps)
        mem = timer.peak_mib(holder["step"], inputs[0]) if ms == ms else None
        table.add("hf_c", label, ms, mem)
        del hf, holder
    else:
        for label in ("HF Qwen3MoeSparseMoeBlock eager", "HF Qwen3MoeSparseMoeBlock compiled"):
            table.add("-", label, None, None, reason)
        table.notes.append(f"Hugging Face rows skipped: {reason}")
        print(f"  (Hugging Face rows skipped: {reason})", flush=True)

    # Ours, dropless and capacity factor 1.25, eager and compiled.
    for module, label in ((ours, "ours dropless"), (capped, "ours capacity_factor=1.25")):
        step = module_step(module, params)
        ms = timer.median_ms(step, inputs, warmup=warmup, reps=reps)
        table.add("-", f"{label} eager", Ms(ms), timer.peak_mib(step, inputs[0]))
        holder = {}

        def make_compiled(module=module, holder=holder):
            holder["step"] = module_step(torch.compile(module, dynamic=False), params)
            return holder["step"]
        ms = compiled_ms(timer, log, f"{title} / {label} compiled", make_compiled, inputs, warmup=warmup, reps=reps)
        mem = timer.peak_mib(holder["step"], inputs[0]) if ms == ms else None
        table.add("-", f"{label} compiled", ms, mem)
    table.notes.append("same router and expert weights in every contender; our router in the layer's dtype "
                       "(as Hugging Face's); fwd+bwd = forward, then autograd.grad of the output (random "
                       "output gradient) w.r.t. the input and all parameters; auxiliary losses not "
                       "backpropagated; floor = the 6 grouped GEMMs only, on our router's row counts")
    if device == "cuda":
        table.notes.append("peak memory: torch.cuda.max_memory_allocated() during one fwd+bwd minus "
                           "memory_allocated() before it (weights and inputs excluded)")
    return table
