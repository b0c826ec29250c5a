"""Readable pure-PyTorch specification of every moe_routing op.

Written for clarity, not speed: tests compare the C++/CUDA ops against these
functions on random inputs, and benchmarks use them as the eager baseline.
Each function mirrors the signature of its op in :mod:`moe_routing.ops`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def router_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, descending, ties to the lower index.

    This is the selection order of every op: NaN ranks last, below -inf, and
    NaNs tie with each other (so they too go in index order)."""
    # A stable sort on the negated values keeps equal values in index order;
    # torch.sort puts NaN after every number.
    return torch.sort(-values, dim=-1, stable=True).indices[..., :k]


def select(selection, k, *, num_groups=1, topk_groups=1, group_score="top2"):
    """route's choice from its selection values ``scores + bias`` [T, E]: the
    top k in selection order (NaN last, ties to the lower index), limited to
    the topk_groups best groups when num_groups > 1 (a group scored by the
    sum of its two best values, or its best with group_score="max")."""
    if group_score not in ("top2", "max"):
        raise ValueError(f"group_score must be 'top2' or 'max', got {group_score!r}")
    if num_groups > 1:
        T, E = selection.shape
        groups = selection.view(T, num_groups, E // num_groups)
        # The group's best one or two values in selection order (NaN last): a
        # NaN among them makes the group score NaN, which ranks last.
        top = 1 if group_score == "max" else min(2, E // num_groups)
        best = groups.gather(-1, _top_k(groups, top))
        best_two = best[..., 0] + best[..., 1] if best.shape[-1] == 2 else best[..., 0]
        keep_groups = _top_k(best_two, topk_groups)
        keep = torch.zeros(T, num_groups, dtype=torch.bool, device=selection.device)
        keep.scatter_(1, keep_groups, True)
        keep = keep.repeat_interleave(E // num_groups, dim=1)
        selection = selection.masked_fill(~keep, -math.inf)
    return _top_k(selection, k)


def route(logits, k, *, score="softmax", normalize=None, bias=None, num_groups=1, topk_groups=1,
          scale=1.0, group_score="top2"):
    acc = router_dtype(logits)
    x = logits.to(acc)
    if score == "softmax":
        scores = torch.softmax(x, dim=-1)
    elif score == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    selection = scores if bias is None else scores + bias.to(acc)
    experts = select(selection, k, num_groups=num_groups, topk_groups=topk_groups,
                     group_score=group_score)
    weights = scores.gather(1, experts)
    if normalize is None:
        normalize = k > 1
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scale, experts, scores


def _priority_order(experts, priority, weights):
    """Flat indices t*k+j of all assignments, in priority order."""
    T, k = experts.shape
    index = torch.arange(T * k).view(T, k)
    if priority in ("choice", "score"):  # "score" keeps choice order for its rows
        return index.t().reshape(-1).tolist()
    if priority == "token":
        return index.reshape(-1).tolist()
    if priority == "batch":  # tokens by descending top-1 weight (NaN last), then choice order
        w = weights.detach().cpu().double()
        top1 = w.gather(1, _top_k(w, 1))[:, 0] if k else torch.zeros(T, dtype=torch.float64)
        by_weight = _top_k(top1, T)
        return index[by_weight].t().reshape(-1).tolist()
    raise ValueError(f"priority must be 'choice', 'token', 'score' or 'batch', got {priority!r}")


def plan(experts, num_experts, capacity=None, *, weights=None, priority="choice", mask=None):
    """A direct loop: list each expert's assignments in priority order, hand out rows."""
    T, k = experts.shape
    valid = [True] * T if mask is None else mask.tolist()
    flat = experts.reshape(-1).tolist()
    members = [[] for _ in range(num_experts)]  # per expert, flat indices in priority order
    for i in _priority_order(experts, priority, weights):
        if valid[i // k]:
            members[flat[i]].append(i)
    load = torch.tensor([len(m) for m in members], dtype=torch.long)
    kept = load.clone() if capacity is None else load.clamp(max=capacity)
    offsets = (torch.cumsum(load, 0) - load).tolist()  # dropless: expert e starts here
    slots = [-1] * (T * k)
    for e, mine in enumerate(members):
        if capacity is None:
            for rank, i in enumerate(mine):
                slots[i] = offsets[e] + rank
            continue
        if priority == "score" and len(mine) > capacity:  # the heaviest C, NaN lightest, ties to the earlier
            w = weights.detach().cpu().double().reshape(-1)[mine]
            heaviest = _top_k(w, capacity).tolist()
            mine = [mine[r] for r in sorted(heaviest)]
        for rank, i in enumerate(mine[:capacity]):
            slots[i] = e * capacity + rank
    device = experts.device
    return (torch.tensor(slots, dtype=torch.long).view(T, k).to(device), load.to(device),
            kept.to(device))


def capacity(num_tokens, num_experts, k, capacity_factor, min_capacity=4):
    """max(min_capacity, ceil(capacity_factor * T * k / E)), at most T; the
    factor read as an exact fraction to 1e-6."""
    numerator = round(capacity_factor * 1_000_000)
    rows = -(-num_tokens * k * numerator // (num_experts * 1_000_000))
    return min(max(min_capacity, rows), num_tokens)


def dispatch(x, slots, num_rows):
    out = x.new_zeros(num_rows, x.shape[1])
    t, j = torch.nonzero(slots >= 0, as_tuple=True)
    out[slots[t, j]] = x[t]
    return out


def expert_choice_backward(grad_weights, tokens, num_tokens):
    """d scores [T, E]: each weight's gradient goes to its (token, expert)
    entry; a pair listed twice gets the sum."""
    E, C = tokens.shape
    grad = grad_weights.new_zeros(num_tokens, E)
    for e in range(E):
        for c in range(C):
            t = int(tokens[e, c])
            if t >= 0:
                grad[t, e] += grad_weights[e, c]
    return grad


def combine(expert_out, slots, weights):
    rows = expert_out if expert_out.dim() == 2 else expert_out.flatten(0, 1)
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    y = torch.zeros(slots.shape[0], rows.shape[1], dtype=acc, device=rows.device)
    for j in range(slots.shape[1]):
        kept = slots[:, j] >= 0
        r = slots[:, j].clamp(min=0)
        picked = rows[r] if rows.shape[0] else rows.new_zeros(len(r), rows.shape[1])
        # A dropped choice contributes nothing, not even the NaN of 0 * inf,
        # and gets no gradient: both factors are masked before the product.
        row = torch.where(kept[:, None], picked.to(acc), 0)
        w = torch.where(kept, weights[:, j].to(acc), 0)
        y += w[:, None] * row
    return y.to(rows.dtype)


def load_balancing_loss(scores, experts, *, mask=None, seq_len=None):
    T, E = scores.shape
    k = experts.shape[1]
    valid = torch.ones(T, dtype=torch.bool, device=scores.device) if mask is None else mask
    L = seq_len or max(T, 1)
    S = max(T // L, 1)
    # Per sequence s (one sequence without seq_len): f_se and P_se.
    valid = valid.view(-1, L) if T else valid.view(1, 0)
    n = valid.sum(1).clamp(min=1)  # no valid token: every sum is 0, and so is the loss
    one_hot = torch.nn.functional.one_hot(experts, E).sum(1).view(S, -1, E)  # assignments
    f = (one_hot * valid[..., None]).sum(1).to(scores.dtype) / (n[:, None] * k)
    # where, not a product: padding is excluded even when its scores are NaN or inf.
    p = torch.where(valid[..., None], scores.view(S, -1, E), 0).sum(1) / n[:, None]
    per_sequence = E * (f * p).sum(1)
    counted = (valid.sum(1) > 0).sum().clamp(min=1)
    return per_sequence.sum() / counted


def z_loss(logits, *, mask=None):
    if logits.shape[-1] == 0:  # logsumexp of nothing is -inf: refused, like route
        raise ValueError("z_loss: logits must have at least one expert column, got E=0")
    acc = router_dtype(logits)
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if mask is None else mask
    # Padding rows are zeroed first, so that their inf or NaN reach neither
    # the loss nor (as 0 * inf) the gradient.
    lse = torch.logsumexp(torch.where(valid[:, None], logits.to(acc), 0), dim=-1)
    n = valid.sum()
    loss = torch.where(valid, lse.square(), 0).sum() / n.clamp(min=1)
    return loss


def expert_choice(scores, capacity, *, mask=None):
    T, E = scores.shape
    masked = scores if mask is None else scores.masked_fill(~mask[:, None], -math.inf)
    # Stable sort of each column: ties keep the lower token index first.
    order = torch.sort(-masked.t(), dim=1, stable=True).indices[:, :capacity]  # [E, <=C]
    weights = masked.t().gather(1, order)
    taken = weights > -math.inf  # padding, -inf and NaN (sorted last) are never taken
    tokens = torch.where(taken, order, -1)
    weights = torch.where(taken, weights, 0)
    pad = capacity - order.shape[1]  # fewer tokens than capacity
    if pad > 0:
        tokens = torch.cat([tokens, tokens.new_full((E, pad), -1)], 1)
        weights = torch.cat([weights, weights.new_zeros(E, pad)], 1)
    return weights, tokens


def grouped_mm(x, weight, counts):
    out = x.new_zeros(x.shape[0], weight.shape[2])
    start = 0
    for e, n in enumerate(counts.tolist()):
        out[start:start + n] = x[start:start + n] @ weight[e]
        start += n
    return out


def swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.silu(gate.to(acc)) * up.to(acc)).to(h.dtype)


def balanced_assignment(scores, *, mask=None, iterations=64, epsilon=1e-3):
    """BASE layers' balanced assignment by a fixed number of auction rounds,
    token by token (the op does the same rounds with tensor operations).
    Every valid token gets one expert; expert e gets exactly
    floor(V / E) + (e < V mod E) of the V valid tokens; padding gets -1."""
    T, E = scores.shape
    s = torch.nan_to_num(scores.double(), nan=-1e300, posinf=1e300, neginf=-1e300).tolist()
    valid = [True] * T if mask is None else mask.tolist()
    V = sum(valid)
    capacity = [V // E + (e < V % E) for e in range(E)]
    price = [0.0] * E
    held = [{} for _ in range(E)]  # expert -> {token: its bid}
    owner = [-1] * T
    for _ in range(iterations):
        bids = [[] for _ in range(E)]
        for t in range(T):
            if not valid[t] or owner[t] >= 0:
                continue
            values = [s[t][e] - price[e] for e in range(E)]
            order = sorted(range(E), key=lambda e: (-values[e], e))
            best, second = order[0], order[min(1, E - 1)]
            bids[best].append((price[best] + (values[best] - values[second]) + epsilon, t))
        for e in range(E):
            candidates = sorted([(b, t) for t, b in held[e].items()] + bids[e],
                                key=lambda bt: (-bt[0], bt[1]))
            kept, evicted = candidates[:capacity[e]], candidates[capacity[e]:]
            for _, t in evicted:
                owner[t] = -1
            held[e] = {t: b for b, t in kept}
            for _, t in kept:
                owner[t] = e
            if capacity[e] > 0 and len(kept) >= capacity[e]:
                price[e] = min(b for b, _ in kept)
    # Tokens still without an expert take the remaining places in token order.
    free = [capacity[e] - len(held[e]) for e in range(E)]
    e = 0
    for t in range(T):
        if valid[t] and owner[t] < 0:
            while free[e] == 0:
                e += 1
            owner[t], free[e] = e, free[e] - 1
    return torch.tensor(owner, dtype=torch.long, device=scores.device).view(T)
