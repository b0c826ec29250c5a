"""Typed Python wrappers of the moe_routing operators.

Every function here calls ``torch.ops.moe_routing.<name>``; the schemas, kernels,
Meta (fake) kernels and autograd live in C++ (csrc/). The readable
specification of each op is in :mod:`moe_routing.reference`.
"""
from __future__ import annotations

import math
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
    group_score: str = "top2",
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
        group_score: how a group is scored: ``"top2"``, the sum of its two
            best ``scores + bias`` (its best when it has one expert;
            DeepSeek-V3), or ``"max"``, its best (DeepSeek-V2's
            ``group_limited_greedy``).

    Returns:
        ``Routing(weights [T,k], experts [T,k] int64, scores [T,E])``; ties go to
        the lower expert index and each token's choices are by descending
        selection score, ``scores + bias`` with a bias (as DeepSeek-V3's top-k
        of the biased scores), so with a bias the weights need not descend.
        Differentiable in ``logits`` through ``weights`` and ``scores`` (once:
        differentiating the gradient again raises).

    NaN: in every selection (experts, and groups) NaN ranks last, below -inf,
    and NaNs tie with each other (lower index first). A NaN logit makes that
    expert's sigmoid score NaN and every softmax score of its token NaN; a NaN
    bias entry only demotes its expert. The CPU and CUDA kernels agree; on
    CUDA, E <= 1024, k <= 32 and num_groups <= 32.
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
            group_score=group_score,
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
    group_size: Optional[Union[int, torch.SymInt]] = None,
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
        weights: [T, k] router weights; needed by "score" and "batch".
        priority: who gets the rows of an overflowing expert, and the row
            order inside an expert: ``"choice"``: all first choices in token
            order, then all second choices, ... (GShard, Switch, DeepSpeed,
            Tutel); ``"token"``: token order, a token's choices in choice order
            (Megatron-Core and TransformerEngine "position"); ``"score"``: per
            expert the C assignments with the largest weight survive, ties and
            row order in "choice" order (Megatron-Core "probs"); ``"batch"``:
            tokens sorted by descending top-1 (largest) weight, ties in token
            order, then "choice" order (V-MoE batch-prioritised routing).
            A NaN weight ranks below every number in both ("batch" takes a
            token's largest non-NaN weight as its top-1, NaN only when all are).
        mask: [T] bool, False = padding: routed nowhere (slot -1), not counted.
        group_size: capacity per group (Switch and GShard apply it per batch
            row): the T tokens form T / group_size groups G of consecutive
            tokens, and each expert takes at most ``capacity`` assignments
            from each group, by ``priority`` inside the group. Expert e's
            buffer then has G * C rows, group g's at ``e*G*C + g*C + c``
            (view the ``[E*G*C, H]`` dispatch result as ``[E, G*C, H]``).
            Built on the op by renumbering expert e of group g as ``e*G + g``
            with capacity C (no host synchronisation, any device); ``load``
            and ``kept`` are summed over groups. Ignored when dropless.

    ``num_experts * capacity`` (times G) must fit in int64 (slots are ``e * C + c``).

    Returns:
        ``Plan(slots [T,k], load [E], kept [E])``, all int64. Not differentiable.
    """
    if group_size is None or capacity is None:
        return Plan(*_ops.plan(experts, num_experts, capacity, weights=weights,
                               priority=priority, mask=mask))
    T = experts.shape[0]
    if group_size < 1 or T % group_size != 0:
        raise ValueError(f"moe_routing::plan: group_size must be >= 1 and divide T={T}, "
                         f"got {group_size}")
    groups = T // group_size
    if isinstance(groups, int) and num_experts * groups > 2**31 - 1:  # the op's own limit
        raise ValueError(f"moe_routing::plan: num_experts * (T / group_size) must be at most "
                         f"2^31 - 1 (each group plans experts of its own), got num_experts="
                         f"{num_experts} and {groups} groups")
    group_of_token = torch.arange(T, device=experts.device) // group_size
    grouped = experts * groups + group_of_token[:, None]
    slots, load, kept = _ops.plan(grouped, num_experts * groups, capacity, weights=weights,
                                  priority=priority, mask=mask)
    return Plan(slots, load.view(num_experts, groups).sum(1), kept.view(num_experts, groups).sum(1))


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
    ``capacity(100, 2, 1, 1.1)`` is 55, not the 56 that float rounding gives),
    and the product is computed in 128-bit integers, so huge arguments neither
    overflow nor divide by zero. Works on SymInt token counts under
    torch.compile.

    Under torch.compile this computes the same integer arithmetic in Python
    (the op returns an int, which Dynamo cannot put in a graph with static
    shapes): a constant for a static token count, a SymInt expression for a
    dynamic one, and no graph break either way. Eager calls run the op.
    """
    if torch.compiler.is_compiling():
        return _capacity_traced(num_tokens, num_experts, k, capacity_factor, min_capacity)
    return _ops.capacity(num_tokens, num_experts, k, capacity_factor, min_capacity)


def _capacity_traced(num_tokens, num_experts: int, k: int, capacity_factor: float,
                     min_capacity: int):
    """The capacity op's arithmetic (csrc/ops.cpp) for Dynamo to trace; Python
    integers cannot overflow, so only the argument checks are repeated."""
    if not (num_experts >= 1 and 1 <= k <= num_experts and 0 < capacity_factor <= 1e6
            and min_capacity >= 0):
        raise ValueError(
            "moe_routing::capacity: needs num_experts >= 1, k in [1, num_experts], "
            f"capacity_factor in (0, 1e6] and min_capacity >= 0, got num_experts={num_experts}, "
            f"k={k}, capacity_factor={capacity_factor}, min_capacity={min_capacity}")
    if isinstance(num_tokens, int) and num_tokens < 0:  # a SymInt token count is a size
        raise ValueError(f"moe_routing::capacity: num_tokens must be >= 0, got {num_tokens}")
    denominator = 1_000_000
    numerator = math.floor(capacity_factor * denominator + 0.5)  # llround for positives
    divisor = denominator * num_experts
    rows = (num_tokens * (numerator * k) + (divisor - 1)) // divisor
    if isinstance(num_tokens, int):  # a static count: plain ints (older Dynamo breaks on sym_max)
        return min(max(rows, min_capacity), num_tokens)
    return torch.sym_min(torch.sym_max(rows, min_capacity), num_tokens)


def dispatch(x: torch.Tensor, slots: torch.Tensor, num_rows: Union[int, torch.SymInt]) -> torch.Tensor:
    """Moves token rows into expert buffer rows.

    Row r of the [num_rows, H] result holds ``x[t]`` for the (t, j) with
    ``slots[t, j] == r`` and zeros where no assignment landed. ``num_rows`` is
    E*C (view the result as [E, C, H]) or T*k (dropless). Slots must be unique
    (as :func:`plan` makes them). Differentiable in ``x``, twice and more
    (its backward is a combine with unit weights, whose gradient is a dispatch).
    """
    return _ops.dispatch(x, slots, num_rows)


def combine(expert_out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs.

    ``y[t] = sum over j with slots[t,j] >= 0 of weights[t,j] * expert_out[slots[t,j]]``,
    accumulated in float32 (float64 for float64 outputs) in choice order; a
    token whose choices were all dropped gets zeros (the caller's residual
    carries it). ``expert_out`` is [num_rows, H] or [E, C, H]; the result is
    [T, H] in its dtype. Differentiable in ``expert_out`` and ``weights``
    (once: differentiating the gradient again raises). The forward reads any
    slots; the backward needs them unique, as :func:`plan` makes them (it
    writes each row's gradient once, from the one choice that owns the row),
    and raises on a row that two choices share.
    """
    return _ops.combine(expert_out, slots, weights)


def load_balancing_loss(
    scores: torch.Tensor,
    experts: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    seq_len: Optional[Union[int, torch.SymInt]] = None,
) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` = assignments to e / (valid tokens * k), ``P_e`` = mean over valid
    tokens of ``scores[:, e]``. Equals 1 under perfect balance; 0 when no token
    is valid. With ``seq_len`` (which must divide T), the DeepSeek-V3
    sequence-wise form: f and P per sequence of ``seq_len`` consecutive
    tokens, the loss averaged over sequences that hold a valid token (for
    DeepSeek-V3's sigmoid router pass ``scores / scores.sum(-1, keepdim=True)``,
    its normalised affinities).

    Conversions (tested in tests/test_losses.py): Hugging Face's
    ``load_balancing_loss_func`` (Mixtral, Qwen-MoE) is k times this value;
    Megatron-Core's ``switch_load_balancing_loss_func`` (before its
    coefficient) equals it; DeepSpeed's top-1 and top-2 gating ``l_aux``
    count first choices only: it equals this loss on ``experts[:, :1]``.
    Differentiable in ``scores`` (once: differentiating the gradient again raises).
    """
    return _ops.load_balancing_loss(scores, experts, mask=mask, seq_len=seq_len)


def z_loss(logits: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits[t])**2``
    (0 when no token is valid). ``logits`` must have at least one expert column
    (E = 0 raises: a logsumexp of nothing is -inf). Differentiable in
    ``logits`` (once: differentiating the gradient again raises)."""
    return _ops.z_loss(logits, mask=mask)


class ExpertChoice(NamedTuple):
    """Result of :func:`expert_choice`."""

    weights: torch.Tensor  # [E, C]: scores of the chosen tokens, 0 where none
    tokens: torch.Tensor  # [E, C] int64: chosen tokens by descending score, -1 where none


def expert_choice(
    scores: torch.Tensor,
    capacity: Union[int, torch.SymInt],
    *,
    mask: Optional[torch.Tensor] = None,
) -> ExpertChoice:
    """Expert Choice routing (Zhou et al. 2022): each expert takes the
    ``capacity`` tokens with the largest ``scores[:, e]`` (ties to the lower
    token index), in descending order. Padding tokens (mask False) and scores
    of -inf or NaN are never taken; slots left empty hold token -1 and weight
    0. Differentiable in ``scores`` (once: differentiating the gradient again
    raises). :func:`expert_choice_slots` turns the result into the slots and
    weights that :func:`dispatch` and :func:`combine` take.

    The backward op ``expert_choice_backward(grad_weights, tokens, num_tokens)``
    accepts any tokens in [-1, num_tokens): a (token, expert) pair listed twice
    gets the sum of its gradients, in column order, deterministically on CPU
    and CUDA (gather form, no atomics).
    """
    return ExpertChoice(*_ops.expert_choice(scores, capacity, mask=mask))


def expert_choice_slots(choice: ExpertChoice, num_tokens: Union[int, torch.SymInt]):
    """The inverse map of an :func:`expert_choice` result, from tokens to rows:
    ``(slots [T, E] int64, weights [T, E])`` with ``slots[t, e] = e * C + c``
    when expert e took token t as its c-th choice, else -1 (and weight 0).
    Every (token, expert) pair is taken at most once, so the scatters have one
    writer per entry: deterministic, and differentiable in the weights."""
    weights, tokens = choice
    E, C = tokens.shape
    rows = torch.arange(E * C, device=tokens.device).view(E, C)
    # Empty slots (-1) scatter into a spare column T that is cut off.
    column = torch.where(tokens >= 0, tokens, num_tokens)
    slots = torch.full((E, num_tokens + 1), -1, dtype=torch.long, device=tokens.device)
    slots = slots.scatter(1, column, rows)
    token_weights = weights.new_zeros(E, num_tokens + 1).scatter(1, column, weights)
    return slots[:, :num_tokens].t(), token_weights[:, :num_tokens].t()


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert matrix product on the packed (dropless) layout.

    ``x`` [R, H] holds expert e's rows at ``offsets[e] .. offsets[e] + counts[e] - 1``
    (offsets = exclusive cumsum of ``counts`` [E] int64, as :func:`plan` with
    ``capacity=None`` lays them out, ``counts`` = its ``kept``); the result
    [R, F] holds ``x[rows of e] @ weight[e]`` for ``weight`` [E, H, F], and zeros
    in rows past ``sum(counts)``. Output sizes follow from input sizes alone,
    so it compiles with fullgraph=True. Differentiable in ``x`` and ``weight``
    (once: differentiating the gradient again raises). ``counts`` must be >= 0
    and sum to at most R: a data check, so the CPU raises and CUDA makes a
    device-side assert (and clamps, so that no kernel reads past ``x``).
    """
    return _ops.grouped_mm(x, weight, counts)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the experts' first product: ``h`` [R, 2F] holds the gate in
    its first F columns and the up projection in the last F (the layout of
    ``Experts.w_in`` with ``activation="swiglu"``); returns ``silu(gate) * up``
    [R, F]. One pass, arithmetic in float32 (float64 for float64), rounded
    once; the backward recomputes the sigmoid from ``h`` (nothing else is
    saved) and writes both halves in one pass. Differentiable once.
    """
    return _ops.swiglu(h)


def balanced_assignment(
    scores: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    iterations: int = 64,
    epsilon: float = 1e-3,
) -> torch.Tensor:
    """BASE layers (Lewis et al. 2021): a balanced assignment of tokens to
    experts maximising the total score.

    Every valid token gets one expert and expert e gets exactly
    ``floor(V / E) + (e < V mod E)`` of the V valid tokens (so T / E each when
    E divides T and nothing is padding). ``iterations`` rounds of an auction
    (Bertsekas): each token without an expert bids for its best expert by
    ``score - price``, raising the price by the gap to its second best plus
    ``epsilon``; each expert keeps its highest bids (ties to the lower token
    index). Tokens still without an expert after the rounds take the
    remaining places in token order, so the balance is exact whatever the
    round count; when the auction places every token, the total score is
    within ``T * epsilon`` of the optimum (``epsilon`` is in the units of
    ``scores``). One device-generic kernel of tensor operations: CPU and
    CUDA, no host synchronisation, deterministic. Returns ``experts`` [T]
    int64, -1 for padding. Not differentiable.
    """
    return _ops.balanced_assignment(scores, mask=mask, iterations=iterations, epsilon=epsilon)
