"""nn.Modules on top of the routing ops: Router, Experts and the drop-in MoE layer."""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import sys
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread: that is when
    activation checkpointing re-runs a forward (reentrant or not). Such a
    recompute must not count the load a second time or overwrite the
    layer's statistics."""
    if torch.compiler.is_compiling():
        return False  # compiled code re-runs no Python forward in backward
    return torch._C._current_graph_task_id() != -1


def _warn(message: str) -> None:
    """warnings.warn, attributed to the first caller outside this package and
    torch (not to nn.Module's call machinery), so that the default filter
    shows it once per place in the user's code."""
    skip = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _autocast_disabled(device_type: str):
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "xla"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # meta and other devices have no autocast


def expert_load(experts: torch.Tensor, num_experts: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Assignments per expert, [E] int64, counting valid tokens only."""
    counts = torch.ones_like(experts) if mask is None else mask[:, None].expand_as(experts).long()
    load = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
    return load.scatter_add_(0, experts.reshape(-1), counts.reshape(-1))


def _check_sizes(owner: str, **sizes) -> None:
    """Layer widths and counts are positive integers (a zero width would
    divide by zero in the initialisation, a negative one fail in torch)."""
    for name, value in sizes.items():
        try:
            positive = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:  # not an integer (numpy's integers are)
            positive = False
        if not positive:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] float32 (float64: see Router.compute_dtype)
    experts: torch.Tensor  # [T, k] int64
    scores: torch.Tensor  # [T, E] float32 (float64)
    logits: torch.Tensor  # [T, E] float32 (float64), after noise, before scoring


class Router(nn.Module):
    """Linear router: logits = x W^T in ``dtype`` (float32 by default, whatever
    the activations: selective precision; float64 when the input or the
    weight is float64), then :func:`moe_routing.route`.
    ``logit_bias=True`` adds a learned ``logit_bias`` [E] to the logits
    (GPT-OSS's router; zeros at first): unlike the selection bias below it
    changes the scores and the weights too.

    Training-only perturbations (eval is deterministic):
      * ``jitter`` = eps: the router's copy of the input is multiplied by
        U(1 - eps, 1 + eps) (Switch Transformers).
      * ``noise="gaussian"``: logits + N(0, 1/E^2) (V-MoE);
        ``noise="learned"``: logits + N(0, 1) * softplus(x W_noise) (Shazeer et
        al. 2017, noisy top-k gating).
    Auxiliary-loss-free balancing (DeepSeek-V3): ``bias_update_rate`` > 0
    keeps a float32 ``bias`` buffer used for selection only. Forward never
    changes it: each training forward adds its per-expert load (valid tokens
    only) to a pending count, and :meth:`update_bias` (call it after
    ``optimizer.step()``) applies ``b_e += rate * sign(mean load - load_e)``
    to the load pending since its last call and clears it. A forward that
    activation checkpointing re-runs inside backward routes with the same
    bias and is not counted twice. The pending count is one tensor updated
    in place (so CUDA graphs' replays add to it), a plain attribute rather
    than a buffer, so DDP's buffer broadcast cannot overwrite it; pass
    ``update_bias(group)`` to sum it over a process group first, so every
    rank applies the same update.
    ``fixed_bias`` [E] (e.g. DeepSeek-V3's checkpoint-loaded
    ``e_score_correction_bias``) is a buffer added to the selection bias that
    never updates; ``bias=`` is the same argument under the name
    :func:`route` uses (the updated ``bias`` buffer above starts at zero).
    Both bias buffers stay float32 when the module is cast
    (``model.to(torch.bfloat16)``, ``.half()``): in bfloat16 a step of 1e-3
    on a bias near 0.5 would round away.
    Group-limited selection's options (``num_groups``, ``topk_groups``,
    ``group_score``) are checked at construction, by :func:`route`'s own
    checks on an empty meta tensor, instead of at the first forward."""

    def __init__(self, d_model: int, num_experts: int, k: int = 1, *, score: str = "softmax",
                 normalize: Optional[bool] = None, num_groups: int = 1, topk_groups: int = 1,
                 scale: float = 1.0, jitter: float = 0.0, noise: Optional[str] = None,
                 bias_update_rate: float = 0.0, dtype: torch.dtype = torch.float32,
                 fixed_bias: Optional[torch.Tensor] = None, group_score: str = "top2",
                 bias: Optional[torch.Tensor] = None, logit_bias: bool = False):
        super().__init__()
        if bias is not None:
            if fixed_bias is not None:
                raise ValueError("Router: pass the fixed selection bias as bias= or fixed_bias=, "
                                 "not both")
            fixed_bias = bias
        _check_sizes("Router", d_model=d_model, num_experts=num_experts)
        if not 1 <= k <= num_experts:
            raise ValueError(f"Router: k must be in [1, num_experts={num_experts}], got {k}")
        try:  # route's own checks of the group options, on no data
            ops.route(torch.empty(0, num_experts, device="meta"), k, num_groups=num_groups,
                      topk_groups=topk_groups, group_score=group_score)
        except RuntimeError as error:
            raise ValueError(f"Router: {error}") from None
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"Router: score must be 'softmax' or 'sigmoid', got {score!r}")
        if noise not in (None, "gaussian", "learned"):
            raise ValueError(f"Router: noise must be None, 'gaussian' or 'learned', got {noise!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"Router: jitter must be in [0, 1), got {jitter}")
        if bias_update_rate < 0:
            raise ValueError(f"Router: bias_update_rate must be >= 0, got {bias_update_rate}")
        self.num_experts, self.k = num_experts, k
        self.score, self.normalize, self.scale = score, normalize, scale
        self.num_groups, self.topk_groups, self.group_score = num_groups, topk_groups, group_score
        self.jitter, self.noise, self.bias_update_rate = jitter, noise, bias_update_rate
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=dtype))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        self.logit_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=dtype)) if logit_bias else None)
        self.noise_weight = (
            nn.Parameter(torch.zeros(num_experts, d_model, dtype=dtype)) if noise == "learned" else None
        )
        if bias_update_rate > 0:
            self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.bias = None
        if fixed_bias is not None:
            if tuple(fixed_bias.shape) != (num_experts,):
                raise ValueError(f"Router: fixed_bias must have shape [num_experts={num_experts}], "
                                 f"got {tuple(fixed_bias.shape)}")
            self.register_buffer("fixed_bias", fixed_bias.detach().to(torch.float32).clone())
        else:
            self.fixed_bias = None
        # Load routed since the last update_bias(), [E] int64; not a buffer
        # (see the class docstring). Updated in place, never rebound, so that
        # a CUDA graph's replays add to the same memory (marked static for
        # torch.compile's CUDA graphs); _apply moves it with the module.
        self.pending_load: Optional[torch.Tensor] = None
        if bias_update_rate > 0:
            self.pending_load = self._new_count(self.bias.device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        """x: [T, d_model]; mask: optional [T] bool (False = padding)."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Router: x must be [T, d_model={self.weight.shape[1]}] (flatten batch "
                             f"and sequence first; MoE does), got shape {tuple(x.shape)}")
        dtype = self.compute_dtype(x)
        # Selective precision: autocast would otherwise run this product in
        # bfloat16/float16, and the router (and its z-loss) would see
        # low-precision logits.
        with _autocast_disabled(x.device.type):
            h = x.to(dtype)
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logit_bias = None if self.logit_bias is None else self.logit_bias.to(dtype)
            logits = F.linear(h, self.weight.to(dtype), logit_bias)
            if self.training and self.noise == "gaussian":
                logits = logits + torch.randn_like(logits) / self.num_experts
            elif self.training and self.noise == "learned":
                logits = logits + torch.randn_like(logits) * F.softplus(
                    F.linear(h, self.noise_weight.to(dtype)))
        self._check_bias_unchanged_since_forward()
        routing = ops.route(logits, self.k, score=self.score, normalize=self.normalize,
                            bias=self.selection_bias(), num_groups=self.num_groups,
                            topk_groups=self.topk_groups, scale=self.scale,
                            group_score=self.group_score)
        if self.training and self.bias is not None and not _in_backward():
            self._count_load(routing.experts, mask)
        return RouterOutput(*routing, logits)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The logits' dtype: ``dtype``, or float64 where the input or the
        router's weight is float64 (``model.double()``, gradcheck): the
        router never computes below the precision it is given, and route
        returns float64 weights and scores for float64 logits."""
        return torch.float64 if torch.float64 in (x.dtype, self.weight.dtype) else self.dtype

    def _check_bias_unchanged_since_forward(self) -> None:
        """A re-run of the forward by activation checkpointing must select the
        experts the forward selected, so with the same selection bias: a bias
        changed in between (update_bias() before backward, a state_dict
        load) would make the gradients those of another routing, silently.
        Each training forward records which bias tensors it used and their
        version counters (bumped by every in-place change; no data is read),
        and a re-run compares them with the latest training forward's: a
        change followed by another training forward before the backward is
        not caught. Compiled code re-runs no Python."""
        if torch.compiler.is_compiling() or not self.training:
            return
        state = tuple((id(b), b._version) for b in (self.bias, self.fixed_bias) if b is not None)
        if not _in_backward():
            self._forward_bias_state = state
        elif state != getattr(self, "_forward_bias_state", state):
            raise RuntimeError(
                "Router: the selection bias changed between a forward and its re-run by "
                "activation checkpointing in backward (update_bias() or a load before "
                "backward?), so the re-run would route differently and give wrong gradients; "
                "call update_bias() after backward (after optimizer.step())")

    def __setstate__(self, state):
        super().__setstate__(state)
        if "logit_bias" not in self._parameters:  # pickled before logit_bias existed
            self.__dict__.setdefault("logit_bias", None)

    def selection_bias(self) -> Optional[torch.Tensor]:
        """The bias route() adds to the scores for selection: the updated
        ``bias`` plus the ``fixed_bias``, whichever exist."""
        if self.fixed_bias is None:
            return self.bias
        return self.fixed_bias if self.bias is None else self.bias + self.fixed_bias

    def _new_count(self, device) -> torch.Tensor:
        count = torch.zeros(self.num_experts, dtype=torch.long, device=device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(count)
        return count

    def _apply(self, fn, *args, **kwargs):
        float32_buffers = {name: self._buffers[name] for name in ("bias", "fixed_bias")
                           if self._buffers.get(name) is not None}
        super()._apply(fn, *args, **kwargs)
        # A dtype cast (module.to(bfloat16), .half(), .double()) leaves the
        # selection biases float32, cast from their values before it, on the
        # device fn chose.
        for name, before in float32_buffers.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        # nn.Module moves parameters and buffers, not this plain attribute:
        # follow them to fn's device, keeping the counts (none from meta;
        # never fn's values, which to_empty() would leave uninitialised).
        if self.pending_load is not None:
            device = fn(self.pending_load).device
            if device != self.pending_load.device:
                moved = self._new_count(device)
                if not self.pending_load.is_meta:
                    moved.copy_(self.pending_load)
                self.pending_load = moved
        return self

    @torch.no_grad()
    def _count_load(self, experts: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        load = expert_load(experts, self.num_experts, mask)
        if self.pending_load is None or self.pending_load.device != load.device:
            self.pending_load = self._new_count(load.device)  # cleared or moved by hand
        self.pending_load.add_(load)

    @torch.no_grad()
    def update_bias(self, group=None) -> None:
        """Applies ``b_e += rate * sign(mean load - load_e)`` to the load
        counted by the training forwards since the last call (all micro-batches
        of a gradient-accumulation step), summed over ``group`` first when one
        is given (a ``torch.distributed`` process group, e.g.
        ``dist.group.WORLD`` under DDP or FSDP, or a 1-D DeviceMesh), then
        clears the count. A no-op when nothing was counted or
        ``bias_update_rate`` is 0. Collective when ``group`` is given: every
        rank of it must call it. The count is not in the state dict: take
        checkpoints right after this call (nothing counted), so a resumed run
        updates as the uninterrupted one."""
        import torch.distributed as dist
        if group is not None:
            from .parallel import _resolve_group
            group = _resolve_group(group, "Router.update_bias: group")
        if self.bias is None:
            return
        if self.pending_load is None:
            self.pending_load = self._new_count(self.bias.device)
        load = self.pending_load.clone()
        if group is not None:
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _warn(f"Router.update_bias: no process group on a run of {dist.get_world_size()} "
                  "processes, so each rank moves its bias by its own load alone (DDP's buffer "
                  "broadcast then keeps rank 0's; under FSDP the ranks' biases drift apart); "
                  "pass group=dist.group.WORLD (or the data-parallel group) to sum the load "
                  "over the ranks first.")
        self.pending_load.zero_()
        # No load counted: mean - load is 0 and the bias stays (no host sync).
        load = load.to(self.bias.device, torch.float32)
        self.bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))

    def extra_repr(self) -> str:
        return (f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, k={self.k}, "
                f"score={self.score!r}")


class Experts(nn.Module):
    """E independent feed-forward networks run as batched matrix products on
    the [E, C, d_model] buffer (or as grouped products on the packed dropless
    layout). ``activation``:
      * "gelu", "relu": act(x W_in) W_out;
      * "swiglu": (silu(x W_gate) * (x W_up)) W_out (Mixtral, Qwen, DeepSeek);
      * "swiglu_oai": GPT-OSS's clamped SwiGLU, ((u + 1) * g * sigmoid(alpha * g)) W_out
        with g = min(x W_gate, limit) and u = clamp(x W_up, -limit, limit);
        ``alpha`` (1.702) and ``limit`` (7.0); :class:`MoE` takes them as
        ``swiglu_alpha`` and ``swiglu_limit``. Like the widths they are
        constructor arguments, not part of the state dict;
      * "swiglu_clamped": (silu(g) * u) W_out with the same g and u (HY-V4:
        the gate is clamped before the SiLU);
      * "swiglu_clamped_silu": (min(silu(x W_gate), limit) * u) W_out, u as
        above (Step-3.7: the SiLU's output is clamped).
    Weights: ``w_in`` [E, d_model, d_hidden] and ``w_out`` [E, d_hidden, d_model];
    with a gated activation ``w_in`` is [E, d_model, 2 * d_hidden], W_gate's
    columns first, then W_up's. ``bias=True`` adds ``b_in`` [E, width of w_in]
    and ``b_out`` [E, d_model] (GPT-OSS; zeros at first). Without biases (Switch,
    Mixtral, DeepSeek) an unfilled capacity row's output is zero; with them it
    is not, but combine never reads such a row, so nothing changes."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "gelu",
                 *, bias: bool = False, alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Experts: activation must be one of {', '.join(map(repr, _ACTIVATIONS))}, "
                             f"got {activation!r}")
        _check_sizes("Experts", num_experts=num_experts, d_model=d_model, d_hidden=d_hidden)
        if not limit > 0:
            raise ValueError(f"Experts: limit must be > 0, got {limit}")
        self.activation = activation
        self.alpha, self.limit = float(alpha), float(limit)
        width = 2 * d_hidden if activation in _GATED else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        nn.init.uniform_(self.w_in, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(d_hidden), 1 / math.sqrt(d_hidden))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def __setstate__(self, state):
        super().__setstate__(state)
        # Pickled before biases and the clamped SwiGLU existed.
        for name, default in (("b_in", None), ("b_out", None), ("alpha", 1.702), ("limit", 7.0)):
            if name not in self._parameters:
                self.__dict__.setdefault(name, default)

    def forward(self, x: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [E, C, d_model] -> [E, C, d_model] (the capacity buffer); or,
        with ``counts`` [E], dropless: x [R, d_model] rows packed by expert
        (``counts`` rows each, as plan(capacity=None) lays them out) ->
        [R, d_model]. One entry point, so that wrappers of the module (PEFT's
        LoRA on ``w_in`` / ``w_out``) see every call."""
        if counts is not None:
            return self._forward_packed(x, counts)
        h = self._product(x, self.w_in, self.b_in)
        return self._product(self._activate(h), self.w_out, self.b_out)

    @staticmethod
    def _product(buffer, weight, bias):
        weight = weight.to(buffer.dtype)
        if bias is None:
            return torch.bmm(buffer, weight)
        return torch.baddbmm(bias.to(buffer.dtype)[:, None, :], buffer, weight)

    def _forward_packed(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Under autocast grouped_mm casts like torch.bmm (csrc/autocast.cpp).
        h = self._packed_product(rows, self.w_in, self.b_in, counts)
        return self._packed_product(self._activate(h), self.w_out, self.b_out, counts)

    @staticmethod
    def _packed_product(rows, weight, bias, counts):
        out = ops.grouped_mm(rows, weight.to(rows.dtype), counts)
        if bias is None:
            return out
        # Each row's expert's bias, as a grouped product of a column of ones
        # with the [E, 1, width] bias: its backward sums each expert's rows in
        # a fixed order (indexing the bias by row would accumulate its
        # gradient with atomics on CUDA), and rows past sum(counts) get zeros.
        ones = torch.ones(rows.shape[0], 1, dtype=out.dtype, device=rows.device)
        return out + ops.grouped_mm(ones, bias.to(out.dtype)[:, None, :], counts)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":  # one fused pass; saves h alone for backward
            return ops.swiglu(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], h.shape[-1] // 2)
        if self.activation in _CLAMPED:
            # Each in its model's order of operations, so low-precision results match too.
            gate, up = h.chunk(2, dim=-1)
            up = up.clamp(min=-self.limit, max=self.limit)
            if self.activation == "swiglu_clamped_silu":  # Step-3.7
                return F.silu(gate).clamp(max=self.limit) * up
            gate = gate.clamp(max=self.limit)
            if self.activation == "swiglu_clamped":  # HY-V4
                return F.silu(gate) * up
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))  # GPT-OSS
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)

    def extra_repr(self) -> str:
        E, d_model, _ = self.w_in.shape
        return (f"num_experts={E}, d_model={d_model}, d_hidden={self.w_out.shape[1]}, "
                f"{activation_text(self.activation, self.alpha, self.limit)}, "
                f"bias={self.b_in is not None}")


def activation_text(activation: str, alpha: Optional[float], limit: Optional[float]) -> str:
    """What experts compute besides their weights, as text: the activation
    and the constants it uses (alpha for GPT-OSS's, a clamped SwiGLU's limit)."""
    alpha_text = f", alpha={alpha}" if activation == "swiglu_oai" else ""
    limit_text = f", limit={limit}" if activation in _CLAMPED else ""
    return f"activation={activation!r}{alpha_text}{limit_text}"


_CLAMPED = ("swiglu_oai", "swiglu_clamped", "swiglu_clamped_silu")  # the SwiGLUs with a limit
_GATED = ("swiglu",) + _CLAMPED  # w_in holds gate and up columns
_ACTIVATIONS = ("gelu", "relu") + _GATED


class MoE(nn.Module):
    """Drop-in replacement for a transformer FFN: route, plan under a capacity,
    dispatch, run the experts, combine.

    ``forward(x, mask=None)`` takes x [..., d_model] and an optional bool mask
    [...] (False = padding; 0/1 integers, like Hugging Face's
    ``attention_mask``, are read as mask != 0; a floating mask is refused:
    an additive 0/-inf mask would read inverted) and returns a tensor of
    x's shape. Tokens whose
    every choice was dropped get zeros: the surrounding residual connection
    carries them. After each forward:
      * ``aux_loss``: aux_loss_weight * load_balancing_loss + z_loss_weight * z_loss
        (a differentiable scalar; add ``moe_routing.aux_loss(model)`` to the loss);
        a sigmoid router's scores enter the balancing loss normalised to sum
        to 1 per token (see :func:`balancing_scores`), so it is 1 under
        perfect balance for both scores;
      * ``stats``: dict of detached tensors: ``load`` [E], ``kept`` [E],
        ``dropped_fraction``, ``router_entropy`` (mean over valid tokens, nats),
        ``max_over_mean_load``, and the unweighted ``balance_loss`` and
        ``z_loss`` (to log, or to weight yourself).
    A forward that activation checkpointing re-runs inside backward leaves
    both as the first forward set them; ``torch.export`` of the layer skips
    them (an inference graph). ``aux_loss`` is not carried by
    ``copy.deepcopy`` or pickling (it holds the autograd graph).
    With ``bias_update_rate`` > 0 call :meth:`update_bias` (or
    ``moe_routing.update_bias(model)``) after ``optimizer.step()``.

    Routing (``routing="balanced"`` is described last):
      * ``routing="tokens"`` (default): each token picks its top-k experts.
        Capacity is ``capacity(T, E, k, capacity_factor, min_capacity)`` in
        training and uses ``eval_capacity_factor`` (default: capacity_factor)
        in eval; ``priority`` decides who is dropped (see :func:`plan`).
        ``capacity_factor=None`` is dropless: nothing is dropped, the experts
        run on the packed [T*k, d_model] layout with :func:`grouped_mm`.
      * ``routing="experts"``: Expert Choice (Zhou et al. 2022): each expert
        takes its top-C tokens by router score (softmax unless
        ``score="sigmoid"``), C = ceil(capacity_factor * T * k / E), at least
        1 and at most T, as in the paper (``min_capacity``, a floor for
        token choice's drops, does not apply: it would let each expert take
        more than its share of a small batch); no load-balancing loss is needed (the
        z-loss still applies); ``load``/``kept`` count each expert's tokens and
        ``dropped_fraction`` is the share of valid tokens no expert took.
    ``activation``, ``expert_bias`` (biases in both products, GPT-OSS) and
    ``swiglu_alpha``/``swiglu_limit`` (of the clamped SwiGLUs, e.g.
    ``activation="swiglu_oai"``) shape the experts: see :class:`Experts`.
    ``shared_hidden``: a shared expert, a dense FFN of that width (same
    activation and biases) run on every token and added to the routed output (DeepSeek,
    Qwen2-MoE, Llama 4); ``shared_gate=True`` scales it per token by
    ``sigmoid(x w)`` (Qwen2-MoE). Padding tokens get its output too (their
    outputs are ignored anyway). ``shared_activation`` and
    ``shared_swiglu_limit`` (None: the routed experts') give it another
    activation or limit: HY-V4 clamps only its routed experts' SwiGLU,
    Step-3.7 clamps the two at different limits.
    ``routing="balanced"``: BASE layers (Lewis et al. 2021), k = 1: in
    training every expert takes exactly its share of the valid tokens
    (:func:`balanced_assignment` on the router logits, its default 64
    auction rounds: tokens the auction has not placed by then take the
    remaining places in token order, so the balance is exact while the
    total score may fall short of the optimum) and a token's output is
    ``weight * expert(x)``, the router's weight for that expert
    (``sigmoid(logit)`` with the default score and scale); no balancing
    loss; in eval each token takes its best expert (greedy, as BASE does at
    test time) under the eval capacity, weighted the same way. The router's
    score defaults to "sigmoid".
    ``scale_inputs=True`` (Llama 4): expert e runs on ``x * w_e`` and its
    output is added unweighted, instead of ``w_e * expert_e(x)``.
    ``capacity_per_row=True`` (Switch, GShard): the capacity applies per
    batch row of x [..., S, d_model] (computed from S tokens), each expert
    taking at most C tokens of each row; ``expert_capacity`` sets C directly
    (Hugging Face's ``expert_capacity``), instead of the capacity factor.
    ``renormalize_after_drop=True`` (NLLB-MoE): after the capacity cut, the
    weights of a token's surviving choices are divided by their sum (clamped
    at float32 eps, so a fully dropped token gets zeros).
    ``expert_parallel``: a process group or 1-D DeviceMesh over which the
    experts are sharded (this rank holds E/W of them); see
    :mod:`moe_routing.parallel`.
    ``stats_group``: a process group (e.g. ``dist.group.WORLD`` under DDP)
    over which the balancing loss, z-loss and statistics are computed, so
    that they are those of the global batch rather than of this rank's
    micro-batch (global-batch load balancing, as Megatron-Core's
    "global_aux_loss"; with expert parallelism the default is the whole
    world). In training forwards only (eval forwards and ``generate()`` stay
    local, so one rank may evaluate alone): two small all-gathers per forward
    (counts and float sums) and one in backward, no host synchronisation;
    given at construction, it is checked over the group's members (a
    collective: every member constructs the layer). The router's gradients
    must be averaged over exactly this group (DDP over it does), see
    :mod:`moe_routing.parallel`. :meth:`update_bias` sums the load over it by
    default. ``parallel.set_stats_group(model, group)`` sets it on every
    layer of a model (``None`` switches it off); a pickled copy has none.
    ``router_options`` go to :class:`Router` (score, normalize, jitter, noise,
    bias_update_rate, fixed_bias, logit_bias, num_groups, ...).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 1, *,
                 capacity_factor: Optional[float] = 1.25,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 priority: str = "choice", aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, routing: str = "tokens",
                 activation: str = "gelu", shared_hidden: Optional[int] = None,
                 shared_gate: bool = False, scale_inputs: bool = False,
                 renormalize_after_drop: bool = False, capacity_per_row: bool = False,
                 expert_capacity: Optional[int] = None, expert_parallel=None,
                 expert_bias: bool = False, swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, shared_activation: Optional[str] = None,
                 shared_swiglu_limit: Optional[float] = None, stats_group=None,
                 **router_options):
        super().__init__()
        if routing not in ("tokens", "experts", "balanced"):
            raise ValueError(
                f"MoE: routing must be 'tokens', 'experts' or 'balanced', got {routing!r}")
        if routing == "experts" and capacity_factor is None:
            raise ValueError("MoE: routing='experts' needs a capacity_factor")
        if routing != "tokens" and router_options.get("bias_update_rate", 0.0) > 0:
            raise ValueError(f"MoE: routing={routing!r} balances by construction; "
                             "bias_update_rate must be 0")
        if routing == "balanced":
            if k != 1:
                raise ValueError(f"MoE: routing='balanced' (BASE layers) is top-1, got k={k}")
            router_options.setdefault("score", "sigmoid")  # BASE's sigmoid-gated expert
        for name, factor in (("capacity_factor", capacity_factor),
                             ("eval_capacity_factor", eval_capacity_factor)):
            if factor is not None and (isinstance(factor, bool)
                                       or not isinstance(factor, numbers.Real) or not factor > 0):
                raise ValueError(f"MoE: {name} must be a number > 0, or None (dropless), "
                                 f"got {factor!r}")
        if priority not in ("choice", "token", "score", "batch"):
            raise ValueError(
                f"MoE: priority must be 'choice', 'token', 'score' or 'batch', got {priority!r}")
        self.num_experts, self.k, self.routing = num_experts, k, routing
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.priority = min_capacity, priority
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.router = Router(d_model, num_experts, k, **router_options)
        # Expert parallelism (moe_routing.parallel): this rank holds E/W experts.
        self._ep = None
        if expert_parallel is not None:
            from . import parallel
            self._ep = parallel.setup(self, expert_parallel, num_experts=num_experts, k=k,
                                      d_model=d_model, d_hidden=d_hidden,
                                      capacity_factor=capacity_factor, routing=routing)
        local = num_experts if self._ep is None else self._ep.num_local
        # Global-batch losses and statistics without expert parallelism.
        self._global_stats = None
        if stats_group is not None:  # checked over the group's members (a collective)
            from . import parallel
            parallel.set_stats_group(self, stats_group)
        expert_options = dict(bias=expert_bias, alpha=swiglu_alpha, limit=swiglu_limit)
        self.experts = Experts(local, d_model, d_hidden, activation, **expert_options)
        self.d_model = d_model
        if (scale_inputs or renormalize_after_drop) and routing != "tokens":
            raise ValueError("MoE: scale_inputs and renormalize_after_drop need routing='tokens'")
        self.scale_inputs, self.renormalize_after_drop = scale_inputs, renormalize_after_drop
        if expert_capacity is not None and expert_capacity < 0:
            raise ValueError(f"MoE: expert_capacity must be >= 0, got {expert_capacity}")
        if expert_capacity is not None and (routing != "tokens" or capacity_factor is None):
            # Balanced routing sizes its buffers to each expert's share, and
            # dropless has no capacity: a fixed one would drop tokens there.
            raise ValueError("MoE: expert_capacity sets a token-choice layer's capacity: it "
                             "needs routing='tokens' and a capacity_factor (not None)")
        if min_capacity < 0:
            raise ValueError(f"MoE: min_capacity must be >= 0, got {min_capacity}")
        self.capacity_per_row, self.expert_capacity = capacity_per_row, expert_capacity
        for name, given in (("shared_gate", shared_gate),
                            ("shared_activation", shared_activation is not None),
                            ("shared_swiglu_limit", shared_swiglu_limit is not None)):
            if given and shared_hidden is None:
                raise ValueError(f"MoE: {name} needs a shared expert (shared_hidden)")
        if shared_hidden is not None:
            _check_sizes("MoE", shared_hidden=shared_hidden)
        if shared_activation is not None and shared_activation not in _ACTIVATIONS:
            raise ValueError(f"MoE: shared_activation must be None or one of "
                             f"{', '.join(map(repr, _ACTIVATIONS))}, got {shared_activation!r}")
        if shared_swiglu_limit is not None and (shared_activation or activation) not in _CLAMPED:
            raise ValueError(f"MoE: shared_swiglu_limit needs a clamped shared SwiGLU "
                             f"({', '.join(map(repr, _CLAMPED))}), got activation "
                             f"{shared_activation or activation!r}")
        if shared_swiglu_limit is not None and not shared_swiglu_limit > 0:
            raise ValueError(f"MoE: shared_swiglu_limit must be > 0, got {shared_swiglu_limit}")
        # Shared expert (DeepSeek-V2/V3, Qwen2-MoE, Llama 4): one dense FFN of
        # width shared_hidden that every token passes through, its output
        # added to the routed one; with shared_gate scaled by sigmoid(x w_gate)
        # per token (Qwen2-MoE).
        if shared_swiglu_limit is not None:
            expert_options = dict(expert_options, limit=shared_swiglu_limit)
        self.shared_expert = (Experts(1, d_model, shared_hidden, shared_activation or activation,
                                      **expert_options)
                              if shared_hidden is not None else None)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.aux_loss: Optional[torch.Tensor] = None
        self.stats: dict = {}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: x must have d_model={self.d_model} features in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"MoE: mask must have x's leading shape {tuple(x.shape[:-1])}, "
                             f"got {tuple(mask.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex():
                raise ValueError(f"MoE: mask must be bool (True = a real token) or 0/1 integers, got "
                                 f"{mask.dtype} (an additive 0/-inf attention mask would read inverted)")
            mask = mask != 0
        if self._stats_context() is not None and (self._ep is not None or self.training):
            from . import parallel  # global losses and statistics
            return parallel.forward(self, x, mask)
        shape = x.shape
        valid = None if mask is None else mask.reshape(-1)
        r, y, load, kept, dropped = self._route_and_run(x, valid)
        if _is_exporting():  # an inference graph needs neither losses nor statistics
            return y.view(shape)
        balance = (torch.zeros((), device=x.device) if self.routing != "tokens"
                   else ops.load_balancing_loss(balancing_scores(r.scores, self.router.score),
                                                r.experts, mask=valid))
        z = ops.z_loss(r.logits, mask=valid)
        aux = self.aux_loss_weight * balance + self.z_loss_weight * z
        if _in_backward():
            # A checkpointing recompute: it must save the tensors the first
            # forward saved (so it computes the losses), but the first
            # forward's aux_loss and statistics stay.
            return y.view(shape)
        _warn_if_losses_lost(self)
        self.aux_loss = aux
        self.stats = routing_stats(r.scores.detach(), load, kept, dropped, valid)
        self.stats["balance_loss"] = balance.detach()
        self.stats["z_loss"] = z.detach()
        return y.view(shape)

    def _route_and_run(self, x: torch.Tensor, valid: Optional[torch.Tensor]):
        """Routes x's tokens and runs the routed and shared experts: returns
        (router output, y [T, d_model], load, kept, dropped fraction)."""
        tokens = x.reshape(-1, x.shape[-1])
        r = self.router(tokens, valid)
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if self.routing == "experts":
            y, load, kept, dropped = self._expert_choice(tokens, r.scores, factor, valid)
        elif self.routing == "balanced" and self.training:
            y, load, kept, dropped = self._balanced(tokens, r, valid)
        else:
            row = x.shape[-2] if self.capacity_per_row and x.dim() >= 3 else None
            y, load, kept, dropped = self._token_choice(tokens, r, factor, valid, row)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens[None])[0]
            if self.shared_gate is not None:
                # the weight in the activations' dtype, as the experts' are
                gate = F.linear(tokens, self.shared_gate.weight.to(tokens.dtype))
                shared = torch.sigmoid(gate) * shared
            y = y + shared
        return r, y, load, kept, dropped

    def update_bias(self, group=None) -> None:
        """Applies the auxiliary-loss-free bias update for the load routed
        since the last call (see :meth:`Router.update_bias`); call it after
        ``optimizer.step()``. ``group``: a process group to sum the load over
        first (e.g. ``dist.group.WORLD`` under DDP), so every rank holds the
        same bias. The default group is the layer's statistics group, if it
        has one (``stats_group``; with ``expert_parallel`` the whole world
        unless ``parallel.set_stats_group`` changed it, which contains the
        expert-parallel group)."""
        context = self._stats_context()
        if group is None and context is not None:
            group = context.stats_group
        self.router.update_bias(group)

    def _stats_context(self):
        """What holds the group the losses and statistics are aggregated over:
        the expert-parallel state, or the statistics group alone, or None."""
        return self._ep if self._ep is not None else self.__dict__.get("_global_stats")

    def __getstate__(self):
        # aux_loss holds the autograd graph of the last forward, which
        # copy.deepcopy and pickle refuse: a copy starts without it.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["aux_loss"] = None
        return state

    def _token_choice(self, tokens, r: RouterOutput, factor, valid, group_size=None):
        E, k, T = self.num_experts, self.k, tokens.shape[0]
        # "batch" ranks tokens by their raw top-1 probability (V-MoE,
        # NLLB-MoE), not by the renormalised weight p1 / (p1 + p2).
        priority_weights = r.scores.gather(1, r.experts) if self.priority == "batch" else r.weights
        # Capacity per group of group_size tokens (per batch row, Switch and
        # GShard) or over all T; expert e's buffer holds (T / group_size) * C rows.
        grouped = group_size is not None and group_size != T and group_size > 0
        C = None
        if factor is not None:
            C = (self.expert_capacity if self.expert_capacity is not None
                 else ops.capacity(group_size if grouped else T, E, k, factor, self.min_capacity))
        p = ops.plan(r.experts, E, C, weights=priority_weights, priority=self.priority, mask=valid,
                     group_size=group_size if grouped else None)
        rows_per_expert = None if C is None else (T // group_size * C if grouped else C)
        num_rows = T * k if C is None else E * rows_per_expert
        weights = r.weights
        if self.renormalize_after_drop:  # NLLB-MoE: the surviving choices' weights sum to 1
            kept = torch.where(p.slots >= 0, weights, torch.zeros_like(weights))
            eps = torch.finfo(weights.dtype).eps
            weights = kept / kept.sum(-1, keepdim=True).clamp_min(eps)
        rows = ops.dispatch(tokens, p.slots, num_rows)
        if self.scale_inputs:
            # Llama 4: expert e sees x * w; its output is summed unweighted.
            rows = rows * self._row_weights(weights, p.slots, num_rows).to(rows.dtype)
            weights = (p.slots >= 0).to(weights.dtype)
        if self._ep is not None:  # expert parallel: all_to_all to the owning ranks
            from . import parallel
            out = parallel.run_experts(self, rows, p.kept, rows_per_expert)
        elif C is None:  # dropless: the packed layout and grouped matrix products
            out = self.experts(rows, p.kept)
        else:
            # combine takes the [E, C, H] result as it is: viewing it back to
            # [E*C, H] made torch.export guard on C != 1 for a dynamic T.
            out = self.experts(rows.view(E, rows_per_expert, tokens.shape[-1]))
        y = ops.combine(out, p.slots, weights)
        # 0 when nothing was routed (an all-padding batch), not 1 - 0/0.
        dropped = (p.load.sum() - p.kept.sum()) / p.load.sum().clamp_min(1)
        return y, p.load, p.kept, dropped

    @staticmethod
    def _row_weights(weights, slots, num_rows):
        """[num_rows, 1]: the weight of the (token, choice) each buffer row
        holds, 0 for empty rows; differentiable in ``weights`` (dispatch moves
        each choice's weight like a one-feature token)."""
        rows = [ops.dispatch(weights[:, j:j + 1], slots[:, j:j + 1], num_rows)
                for j in range(slots.shape[1])]
        return torch.stack(rows).sum(0)

    def _balanced(self, tokens, r: RouterOutput, valid):
        """BASE layers in training: every expert takes exactly its share of
        the valid tokens (balanced_assignment on the router logits), and each
        token's output is the router's weight for its expert times expert(x)."""
        experts = ops.balanced_assignment(r.logits, mask=valid).clamp_min(0)[:, None]
        # The router's own weight for that expert, as route() gives eval's
        # greedy choice: its score (sigmoid(logit) by default), normalised
        # over the one choice if the router normalises, times scale.
        weights = r.scores.gather(1, experts)
        if self.router.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * self.router.scale
        # Capacity ceil(T / E) (or min_capacity) holds each expert's share.
        return self._token_choice(tokens, r._replace(weights=weights, experts=experts), 1.0, valid)

    def _expert_choice(self, tokens, scores, factor, valid):
        T, E, H = tokens.shape[0], self.num_experts, tokens.shape[-1]
        C = ops.capacity(T, E, self.k, factor, min_capacity=1)
        choice = ops.expert_choice(scores, C, mask=valid)
        slots, weights = ops.expert_choice_slots(choice, T)
        buffer = ops.dispatch(tokens, slots, E * C).view(E, C, H)
        y = ops.combine(self.experts(buffer), slots, weights)  # [E, C, H] as it is (see _token_choice)
        kept = (choice.tokens >= 0).sum(1)
        taken = (slots >= 0).any(1)
        valid = torch.ones_like(taken) if valid is None else valid
        untaken = (valid & ~taken).sum() / valid.sum().clamp_min(1)
        return y, kept, kept, untaken


def _warn_if_losses_lost(moe: MoE) -> None:
    if moe.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _warn("MoE: training-mode forward with gradients disabled: aux_loss has no gradient, "
              "and with bias_update_rate > 0 its load still counts toward the next update_bias(). "
              "Under torch.no_grad() for inference, call model.eval() first; under "
              "torch.utils.checkpoint(use_reentrant=True) the auxiliary losses are silently "
              "lost: use use_reentrant=False.")


def balancing_scores(scores: torch.Tensor, score: str) -> torch.Tensor:
    """The scores whose mean P_e the balancing loss weighs: softmax
    probabilities as they are; sigmoid scores normalised to sum to 1 per token
    (DeepSeek-V3's normalised affinities; Megatron-Core's aux loss for
    sigmoid routers). Raw sigmoid scores do not sum to 1: the loss would
    reward lowering every score instead of evening out the load."""
    return scores if score == "softmax" else normalised_per_token(scores)


def normalised_per_token(scores: torch.Tensor) -> torch.Tensor:
    """scores [T, E] divided by each token's sum (a token whose scores all
    underflow to 0 stays 0)."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)


def token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Each token's router entropy [T] (nats) over its scores normalised to
    sum to 1 (sigmoid scores too)."""
    p = normalised_per_token(scores)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def routing_stats(scores: torch.Tensor, load: torch.Tensor, kept: torch.Tensor,
                  dropped_fraction: torch.Tensor, mask: Optional[torch.Tensor]) -> dict:
    """Expert-balance statistics as tensors (no host synchronisation)."""
    load_f = load.float()
    entropy = token_entropy(scores)
    # A count that is a tensor, not a branch on the token count: no guard on T
    # under torch.compile, and 0 (not NaN) for an empty batch.
    valid = torch.ones_like(entropy) if mask is None else mask.to(entropy.dtype)
    mean_entropy = (entropy * valid).sum() / valid.sum().clamp_min(1)
    return {
        "load": load,
        "kept": kept,
        "dropped_fraction": dropped_fraction.detach(),
        "router_entropy": mean_entropy.float(),
        "max_over_mean_load": load_f.max() / load_f.mean().clamp_min(1e-30),
    }


def update_bias(model: nn.Module, group=None) -> None:
    """Calls :meth:`MoE.update_bias` on every MoE layer of ``model`` (after
    ``optimizer.step()``)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias(group)


def _is_exporting() -> bool:
    # torch.compiler.is_exporting() returns this flag, but the Dynamo of some
    # releases (torch 2.11 among them) folds the call to True under any
    # torch.compile, which would drop the losses and statistics of every
    # compiled forward; the flag itself is True only under torch.export.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return bool(flag)
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch 2.6: no flag
    return bool(is_exporting and is_exporting())


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the ``aux_loss`` of every MoE layer in ``model`` (after a forward)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()
