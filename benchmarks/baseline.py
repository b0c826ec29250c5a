"""The fastest pure-PyTorch routing we know how to write, with the same
semantics as moe_routing's ops (choice priority, capacity or dropless).

This is baseline (a) of the benchmarks: what a user would write instead of
the extension, vectorised, without Python loops or host synchronisation, so
that torch.compile can take it whole (baseline (b)). It is not the readable
specification (that is moe_routing/reference.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(logits: torch.Tensor, k: int):
    scores = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(scores, k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts, scores


def plan(experts: torch.Tensor, num_experts: int, capacity, mask=None):
    """GShard / Switch style: ranks from a cumulative sum over one-hot
    assignments in choice order (all first choices, then all second, ...)."""
    T, k = experts.shape
    order = experts.t().reshape(-1)  # choice-major
    one_hot = F.one_hot(order, num_experts)
    if mask is not None:
        one_hot = one_hot * mask.repeat(k)[:, None]
    rank = (one_hot.cumsum(0) - 1).gather(1, order[:, None]).squeeze(1)
    load = one_hot.sum(0)
    valid = torch.ones_like(order, dtype=torch.bool) if mask is None else mask.repeat(k)
    if capacity is None:
        offsets = load.cumsum(0) - load
        slots = torch.where(valid, offsets[order] + rank, -1)
        kept = load
    else:
        slots = torch.where(valid & (rank < capacity), order * capacity + rank, -1)
        kept = load.clamp(max=capacity)
    return slots.view(k, T).t(), load, kept


def dispatch(x: torch.Tensor, slots: torch.Tensor, num_rows: int):
    """One gather through the inverse map (row -> token), then zero the empty rows."""
    T, k = slots.shape
    flat = slots.reshape(-1)
    token = torch.arange(T, device=x.device).repeat_interleave(k)
    owner = torch.full((num_rows + 1,), T, dtype=torch.long, device=x.device)
    owner.scatter_(0, torch.where(flat >= 0, flat, num_rows), token)  # spare row num_rows
    owner = owner[:num_rows]
    empty = owner == T
    return x.index_select(0, owner.clamp(max=T - 1)).masked_fill(empty[:, None], 0)


def combine(expert_out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor):
    T, k = slots.shape
    rows = expert_out.reshape(-1, expert_out.shape[-1])
    kept = slots >= 0
    gathered = rows.index_select(0, slots.clamp(min=0).reshape(-1)).view(T, k, -1)
    w = torch.where(kept, weights, 0).to(torch.float32)
    return (gathered.float() * w[..., None]).sum(1).to(rows.dtype)


def load_balancing_loss(scores: torch.Tensor, experts: torch.Tensor):
    T, E = scores.shape
    k = experts.shape[1]
    counts = F.one_hot(experts, E).sum((0, 1)).to(scores.dtype)
    return E * torch.sum(counts / (T * k) * scores.mean(0))


def z_loss(logits: torch.Tensor):
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def swiglu(h: torch.Tensor):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
