"""nn.Modules on top of the routing ops: Router, Experts and the drop-in MoE layer."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] float32
    experts: torch.Tensor  # [T, k] int64
    scores: torch.Tensor  # [T, E] float32
    logits: torch.Tensor  # [T, E] float32 (after noise, before scoring)


class Router(nn.Module):
    """Linear router: logits = x W^T in ``dtype`` (float32 by default, whatever
    the activations: selective precision), then :func:`moe_routing.route`.

    Training-only perturbations (eval is deterministic):
      * ``jitter`` = eps: the router's copy of the input is multiplied by
        U(1 - eps, 1 + eps) (Switch Transformers).
      * ``noise="gaussian"``: logits + N(0, 1/E^2) (V-MoE);
        ``noise="learned"``: logits + N(0, 1) * softplus(x W_noise) (Shazeer et
        al. 2017, noisy top-k gating).
    ``bias_update_rate`` > 0 keeps a float32 ``bias`` buffer used for selection
    only, updated after each training forward by
    ``b_e += rate * sign(mean load - load_e)`` over valid tokens
    (auxiliary-loss-free balancing, DeepSeek-V3).
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 1, *, score: str = "softmax",
                 normalize: Optional[bool] = None, num_groups: int = 1, topk_groups: int = 1,
                 scale: float = 1.0, jitter: float = 0.0, noise: Optional[str] = None,
                 bias_update_rate: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"Router: k must be in [1, num_experts={num_experts}], got {k}")
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
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.jitter, self.noise, self.bias_update_rate = jitter, noise, bias_update_rate
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=dtype))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        self.noise_weight = (
            nn.Parameter(torch.zeros(num_experts, d_model, dtype=dtype)) if noise == "learned" else None
        )
        if bias_update_rate > 0:
            self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> RouterOutput:
        """x: [T, d_model]; mask: optional [T] bool (False = padding)."""
        h = x.to(self.dtype)
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(h, self.weight.to(self.dtype))
        if self.training and self.noise == "gaussian":
            logits = logits + torch.randn_like(logits) / self.num_experts
        elif self.training and self.noise == "learned":
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(h, self.noise_weight))
        routing = ops.route(logits, self.k, score=self.score, normalize=self.normalize,
                            bias=self.bias, num_groups=self.num_groups,
                            topk_groups=self.topk_groups, scale=self.scale)
        if self.training and self.bias is not None:
            self._update_bias(routing.experts, mask)
        return RouterOutput(*routing, logits)

    @torch.no_grad()
    def _update_bias(self, experts: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        counts = torch.ones_like(experts) if mask is None else mask[:, None].expand_as(experts).long()
        load = torch.zeros(self.num_experts, dtype=torch.long, device=experts.device)
        load.scatter_add_(0, experts.reshape(-1), counts.reshape(-1))
        load = load.float()
        self.bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))

    def extra_repr(self) -> str:
        return (f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, k={self.k}, "
                f"score={self.score!r}")


class Experts(nn.Module):
    """E independent feed-forward networks run as batched matrix products on
    the [E, C, d_model] buffer. No biases (as in Switch, Mixtral, DeepSeek), so
    the zero rows of unfilled capacity stay zero. ``activation``: "gelu",
    "relu" or "swiglu" (silu(x W_gate) * (x W_up))."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(f"Experts: activation must be 'gelu', 'relu' or 'swiglu', got {activation!r}")
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        nn.init.uniform_(self.w_in, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(d_hidden), 1 / math.sqrt(d_hidden))

    def forward(self, buffer: torch.Tensor) -> torch.Tensor:
        """buffer: [E, C, d_model] -> [E, C, d_model]."""
        h = torch.bmm(buffer, self.w_in.to(buffer.dtype))
        return torch.bmm(self._activate(h), self.w_out.to(buffer.dtype))

    def forward_packed(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Dropless: rows [R, d_model] packed by expert (``counts`` [E] rows
        each, as plan(capacity=None) lays them out) -> [R, d_model]."""
        h = ops.grouped_mm(rows, self.w_in.to(rows.dtype), counts)
        return ops.grouped_mm(self._activate(h), self.w_out.to(rows.dtype), counts)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)


class MoE(nn.Module):
    """Drop-in replacement for a transformer FFN: route, plan under a capacity,
    dispatch, run the experts, combine.

    ``forward(x, mask=None)`` takes x [..., d_model] and an optional bool mask
    [...] (False = padding) and returns a tensor of x's shape. Tokens whose
    every choice was dropped get zeros: the surrounding residual connection
    carries them. After each forward:
      * ``aux_loss``: aux_loss_weight * load_balancing_loss + z_loss_weight * z_loss
        (a differentiable scalar; add ``moe_routing.aux_loss(model)`` to the loss);
      * ``stats``: dict of detached tensors: ``load`` [E], ``kept`` [E],
        ``dropped_fraction``, ``router_entropy`` (mean over valid tokens, nats),
        ``max_over_mean_load``.

    Routing:
      * ``routing="tokens"`` (default): each token picks its top-k experts.
        Capacity is ``capacity(T, E, k, capacity_factor, min_capacity)`` in
        training and uses ``eval_capacity_factor`` (default: capacity_factor)
        in eval; ``priority`` decides who is dropped (see :func:`plan`).
        ``capacity_factor=None`` is dropless: nothing is dropped, the experts
        run on the packed [T*k, d_model] layout with :func:`grouped_mm`.
      * ``routing="experts"``: Expert Choice (Zhou et al. 2022): each expert
        takes its top-C tokens by softmax score, C = capacity(T, E, k,
        capacity_factor, min_capacity); no load-balancing loss is needed (the
        z-loss still applies); ``load``/``kept`` count each expert's tokens and
        ``dropped_fraction`` is the share of valid tokens no expert took.
    ``router_options`` go to :class:`Router` (score, normalize, jitter, noise,
    bias_update_rate, num_groups, ...).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 1, *,
                 capacity_factor: Optional[float] = 1.25,
                 eval_capacity_factor: Optional[float] = None, min_capacity: int = 4,
                 priority: str = "choice", aux_loss_weight: float = 0.01,
                 z_loss_weight: float = 0.001, routing: str = "tokens",
                 activation: str = "gelu", **router_options):
        super().__init__()
        if routing not in ("tokens", "experts"):
            raise ValueError(f"MoE: routing must be 'tokens' or 'experts', got {routing!r}")
        if routing == "experts" and capacity_factor is None:
            raise ValueError("MoE: routing='experts' needs a capacity_factor")
        if routing == "experts" and router_options.get("bias_update_rate", 0.0) > 0:
            raise ValueError("MoE: routing='experts' balances by construction; "
                             "bias_update_rate must be 0")
        for factor in (capacity_factor, eval_capacity_factor):
            if factor is not None and factor <= 0:
                raise ValueError("MoE: capacity factors must be > 0")
        if priority not in ("choice", "token", "score", "batch"):
            raise ValueError(
                f"MoE: priority must be 'choice', 'token', 'score' or 'batch', got {priority!r}")
        self.num_experts, self.k, self.routing = num_experts, k, routing
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.priority = min_capacity, priority
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.router = Router(d_model, num_experts, k, **router_options)
        self.experts = Experts(num_experts, d_model, d_hidden, activation)
        self.aux_loss: Optional[torch.Tensor] = None
        self.stats: dict = {}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        valid = None if mask is None else mask.reshape(-1)
        r = self.router(tokens, valid)
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if self.routing == "experts":
            y, load, kept, dropped = self._expert_choice(tokens, r.scores, factor, valid)
            balance = torch.zeros((), device=x.device)
        else:
            y, load, kept, dropped = self._token_choice(tokens, r, factor, valid)
            balance = ops.load_balancing_loss(r.scores, r.experts, mask=valid)
        self.aux_loss = (self.aux_loss_weight * balance
                         + self.z_loss_weight * ops.z_loss(r.logits, mask=valid))
        self.stats = routing_stats(r.scores.detach(), load, kept, dropped, valid)
        return y.view(shape)

    def _token_choice(self, tokens, r: RouterOutput, factor, valid):
        E, k, H = self.num_experts, self.k, tokens.shape[-1]
        if factor is None:  # dropless: the packed layout and grouped matrix products
            p = ops.plan(r.experts, E, None, weights=r.weights, priority=self.priority, mask=valid)
            out = self.experts.forward_packed(ops.dispatch(tokens, p.slots, tokens.shape[0] * k), p.kept)
        else:
            C = ops.capacity(tokens.shape[0], E, k, factor, self.min_capacity)
            p = ops.plan(r.experts, E, C, weights=r.weights, priority=self.priority, mask=valid)
            buffer = ops.dispatch(tokens, p.slots, E * C).view(E, C, H)
            out = self.experts(buffer).view(E * C, H)
        y = ops.combine(out, p.slots, r.weights)
        dropped = 1.0 - p.kept.sum() / p.load.sum().clamp_min(1)
        return y, p.load, p.kept, dropped

    def _expert_choice(self, tokens, scores, factor, valid):
        T, E, H = tokens.shape[0], self.num_experts, tokens.shape[-1]
        C = ops.capacity(T, E, self.k, factor, self.min_capacity)
        choice = ops.expert_choice(scores, C, mask=valid)
        slots, weights = ops.expert_choice_slots(choice, T)
        buffer = ops.dispatch(tokens, slots, E * C).view(E, C, H)
        y = ops.combine(self.experts(buffer).view(E * C, H), slots, weights)
        kept = (choice.tokens >= 0).sum(1)
        taken = (slots >= 0).any(1)
        valid = torch.ones_like(taken) if valid is None else valid
        untaken = (valid & ~taken).sum() / valid.sum().clamp_min(1)
        return y, kept, kept, untaken


def routing_stats(scores: torch.Tensor, load: torch.Tensor, kept: torch.Tensor,
                  dropped_fraction: torch.Tensor, mask: Optional[torch.Tensor]) -> dict:
    """Expert-balance statistics as tensors (no host synchronisation)."""
    load_f = load.float()
    p = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    if mask is None:
        mean_entropy = entropy.mean() if entropy.numel() else entropy.sum()
    else:
        mean_entropy = (entropy * mask).sum() / mask.sum().clamp_min(1)
    return {
        "load": load,
        "kept": kept,
        "dropped_fraction": dropped_fraction.detach(),
        "router_entropy": mean_entropy.float(),
        "max_over_mean_load": load_f.max() / load_f.mean().clamp_min(1e-30),
    }


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the ``aux_loss`` of every MoE layer in ``model`` (after a forward)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()
