"""Typed Python wrappers of the moe_routing operators.

Every function here calls ``torch.ops.moe_routing.<name>``; the schemas, kernels,
Meta (fake) kernels and autograd live in C++ (csrc/). The readable
specification of each op is in :mod:`moe_routing.reference`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

_ops = torch.ops.moe_routing


class Routing(NamedTuple):
    """Result of :func:`route`."""

    weights: torch.Tensor  # [T, k] float32 (float64 for float64 logits)
    experts: torch.Tensor  # [T, k] int64, by descending score
    scores: torch.Tensor  # [T, E] float32 (float64 for float64 logits)


class Plan(NamedTuple):
    """Result of :func:`plan`."""

    slots: torch.Tensor  # [T, k] int64: row of the expert buffer, -1 = dropped
    load: torch.Tensor  # [E] int64: assignments per expert before the capacity cut
    kept: torch.Tensor  # [E] int64: rows filled per expert


def route(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    normalize: Optional[bool] = None,
    bias: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
) -> Routing:
    """Scores each token against each expert and selects its top-k experts.

    Args:
        logits: [T, E] router logits, any float dtype (computed in float32,
            float64 for float64 logits).
        k: experts per token, 1 <= k <= E.
        score: ``"softmax"`` (over experts) or ``"sigmoid"`` (per expert).
        normalize: divide the k weights by their sum; default True when k > 1.
        bias: [E] added to the scores for selection only, never to the weights
            (auxiliary-loss-free balancing, DeepSeek-V3).
        num_groups, topk_groups: group-limited selection (DeepSeek-V3): the
            experts form ``num_groups`` contiguous groups, a group scores the sum
            of its two best ``scores + bias``, and only the ``topk_groups`` best
            groups may be selected (others are masked with -inf).
        scale: factor applied to the weights after normalisation.

    Returns:
        ``Routing(weights [T,k], experts [T,k] int64, scores [T,E])``; ties go to
        the lower expert index and each token's choices are by descending score.
        Differentiable in ``logits`` through ``weights`` and ``scores``.
    """
    return Routing(
        *_ops.route(
            logits,
            k,
            score=score,
            normalize=normalize,
            bias=bias,
            num_groups=num_groups,
            topk_groups=topk_groups,
            scale=scale,
        )
    )


def plan(
    experts: torch.Tensor,
    num_experts: int,
    capacity: Optional[Union[int, torch.SymInt]] = None,
    *,
    weights: Optional[torch.Tensor] = None,
    priority: str = "choice",
    mask: Optional[torch.Tensor] = None,
) -> Plan:
    """Assigns every (token, choice) a row of its expert's buffer.

    Args:
        experts: [T, k] int64 expert indices (from :func:`route`).
        num_experts: E.
        capacity: rows per expert C: assignment (t, j) to expert e gets row
            ``e * C + c`` or -1 when e is full. ``None``: dropless, a packed
            layout of T*k rows where expert e owns rows offsets[e] ..
            offsets[e+1]-1 (offsets = exclusive cumsum of ``kept``); unused
            rows (padding tokens) are at the end.
        weights: [T, k] router weights (used by weight-based priorities).
        priority: who gets the rows of an overflowing expert, and the row
            order inside an expert: ``"choice"``: all first choices in token
            order, then all second choices, ... (GShard, Switch, DeepSpeed,
            Tutel); ``"token"``: token order, a token's choices in choice order
            (Megatron-Core and TransformerEngine).
        mask: [T] bool, False = padding: routed nowhere (slot -1), not counted.

    Returns:
        ``Plan(slots [T,k], load [E], kept [E])``, all int64. Not differentiable.
    """
    return Plan(
        *_ops.plan(experts, num_experts, capacity, weights=weights, priority=priority, mask=mask)
    )


def capacity(
    num_tokens: Union[int, torch.SymInt],
    num_experts: int,
    k: int,
    capacity_factor: float,
    min_capacity: int = 4,
) -> Union[int, torch.SymInt]:
    """Rows per expert: ``max(min_capacity, ceil(capacity_factor * T * k / E))``,
    at most ``num_tokens``.

    The factor is taken as an exact fraction to 1e-6 (so 1.1 means 11/10 and
    ``capacity(10, 1, 1, 1.1)`` is 11, not the 12 that float rounding gives).
    Works on SymInt token counts under torch.compile.
    """
    return _ops.capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)


def dispatch(x: torch.Tensor, slots: torch.Tensor, num_rows: Union[int, torch.SymInt]) -> torch.Tensor:
    """Moves token rows into expert buffer rows.

    Row r of the [num_rows, H] result holds ``x[t]`` for the (t, j) with
    ``slots[t, j] == r`` and zeros where no assignment landed. ``num_rows`` is
    E*C (view the result as [E, C, H]) or T*k (dropless). Slots must be unique
    (as :func:`plan` makes them). Differentiable in ``x``.
    """
    return _ops.dispatch(x, slots, num_rows)


def combine(expert_out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs.

    ``y[t] = sum over j with slots[t,j] >= 0 of weights[t,j] * expert_out[slots[t,j]]``,
    accumulated in float32 (float64 for float64 outputs) in choice order; a
    token whose choices were all dropped gets zeros (the caller's residual
    carries it). ``expert_out`` is [num_rows, H] or [E, C, H]; the result is
    [T, H] in its dtype. Differentiable in ``expert_out`` and ``weights``.
    """
    return _ops.combine(expert_out, slots, weights)


def load_balancing_loss(
    scores: torch.Tensor, experts: torch.Tensor, *, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` = assignments to e / (valid tokens * k), ``P_e`` = mean over valid
    tokens of ``scores[:, e]``. Equals 1 under perfect balance; 0 when no token
    is valid. Conversions: Hugging Face Mixtral's ``load_balancing_loss_func``
    is k times this value; Megatron-Core's ``switch_load_balancing_loss_func``
    (before its coefficient) equals it. Differentiable in ``scores``.
    """
    return _ops.load_balancing_loss(scores, experts, mask=mask)


def z_loss(logits: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits[t])**2``
    (0 when no token is valid). Differentiable in ``logits``."""
    return _ops.z_loss(logits, mask=mask)
