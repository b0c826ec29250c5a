"""plan and capacity: reference match, drops counted by hand, layout invariants, opcheck."""
import itertools
import math

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import cpu, on, random_experts, random_mask

SHAPES = [(0, 4, 2), (1, 1, 1), (1, 8, 8), (37, 8, 2), (1000, 64, 6), (3000, 256, 8), (5000, 8, 1)]
PRIORITIES = ["choice", "token", "score", "batch"]


def sample_inputs(device, requires_grad=False):
    """(experts, E, capacity, kwargs) on device over shapes, capacities,
    priorities and masks (made on the CPU: the same values on every device)."""
    for i, (T, E, k) in enumerate(SHAPES):
        experts = on(device, random_experts(T, E, k, seed=i))
        # Quantised weights, so that "score" and "batch" meet ties.
        weights = on(device, (torch.rand(T, k) * 8).round() / 8).requires_grad_(requires_grad)
        mask = on(device, random_mask(T, seed=i))
        cap = mr.capacity(T, E, k, 1.0)
        for capacity, priority in itertools.product([None, 0, 1, cap], PRIORITIES):
            kw = dict(priority=priority, weights=weights)
            yield experts, E, capacity, kw
            yield experts, E, capacity, dict(kw, mask=mask)


def reference_plan(experts, E, capacity, **kw):
    """moe_routing.reference.plan on CPU copies of the inputs."""
    return ref.plan(cpu(experts), E, capacity, **{name: cpu(v) if isinstance(v, torch.Tensor) else v
                                                   for name, v in kw.items()})


def test_matches_reference(device):
    for experts, E, capacity, kw in sample_inputs(device):
        out = mr.plan(experts, E, capacity, **kw)
        expected = reference_plan(experts, E, capacity, **kw)
        for name, a, b in zip(out._fields, out, expected):
            assert a.device == experts.device
            assert torch.equal(a.cpu(), b), (name, experts.shape, E, capacity, kw)


def test_repeated_experts_in_a_token_and_noncontiguous_input(device):
    experts = on(device, random_experts(200, 5, 4, distinct=False)).t().contiguous().t()  # column-major
    assert not experts.is_contiguous()
    weights = on(device, torch.rand(200, 4)).t().contiguous().t()
    assert not weights.is_contiguous()
    for priority in PRIORITIES:
        out = mr.plan(experts, 5, 30, priority=priority, weights=weights)
        expected = reference_plan(experts, 5, 30, priority=priority, weights=weights)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(out, expected))


def test_choice_and_token_priority_drop_different_assignments(device):
    # Two tokens, both choose experts 0 and 1 in opposite order; one row each.
    experts = torch.tensor([[0, 1], [1, 0]], device=device)
    # choice: first choices first -> t0 takes e0's row, t1 takes e1's row;
    # both second choices find their expert full.
    assert mr.plan(experts, 2, 1, priority="choice").slots.tolist() == [[0, -1], [1, -1]]
    # token: t0 takes both rows, t1 gets nothing.
    assert mr.plan(experts, 2, 1, priority="token").slots.tolist() == [[0, 1], [-1, -1]]


def test_score_priority_keeps_the_heaviest_not_the_first(device):
    # Expert 0: t0's first choice (weight .3) and t1's second choice (weight .6).
    experts = torch.tensor([[0, 1], [2, 0]], device=device)
    weights = torch.tensor([[0.3, 0.2], [0.4, 0.6]], device=device)
    assert mr.plan(experts, 3, 1, weights=weights, priority="choice").slots.tolist() == [[0, 1], [2, -1]]
    assert mr.plan(experts, 3, 1, weights=weights, priority="score").slots.tolist() == [[-1, 1], [2, 0]]


def test_score_priority_ties_and_row_order_follow_choice_order(device):
    # Four tokens to expert 0 with weights (.5, .9, .5, .9); C = 3 keeps both .9 and
    # the earlier .5 (t0), and rows follow choice (token) order: t0, t1, t3.
    experts = torch.zeros(4, 1, dtype=torch.long, device=device)
    weights = torch.tensor([[0.5], [0.9], [0.5], [0.9]], device=device)
    slots = mr.plan(experts, 1, 3, weights=weights, priority="score").slots
    assert slots.flatten().tolist() == [0, 1, -1, 2]


def test_batch_priority_serves_confident_tokens_first(device):
    # Both tokens pick expert 0 first; t1 is more confident (.9 > .4).
    experts = torch.tensor([[0, 1], [0, 2]], device=device)
    weights = torch.tensor([[0.4, 0.35], [0.9, 0.05]], device=device)
    assert mr.plan(experts, 3, 1, weights=weights, priority="choice").slots.tolist() == [[0, 1], [-1, 2]]
    assert mr.plan(experts, 3, 1, weights=weights, priority="batch").slots.tolist() == [[-1, 1], [0, 2]]
    # Rows inside an expert follow the sorted order too (dropless makes it visible).
    assert mr.plan(experts, 3, None, weights=weights, priority="batch").slots.tolist() == [[1, 2], [0, 3]]


def test_capacity_drops_counted_by_hand(device):
    # Expert 0 is chosen by 5 tokens; capacity 2 keeps the first two.
    experts = torch.tensor([[0], [1], [0], [0], [2], [0], [0]], device=device)
    out = mr.plan(experts, 3, 2)
    assert out.slots.flatten().tolist() == [0, 2, 1, -1, 4, -1, -1]
    assert out.load.tolist() == [5, 1, 1]
    assert out.kept.tolist() == [2, 1, 1]


def test_dropless_layout_by_hand(device):
    experts = torch.tensor([[1, 0], [1, 2], [0, 1]], device=device)
    out = mr.plan(experts, 3, None)
    # load = (2, 3, 1) -> offsets (0, 2, 5); choice order: (t0,e1) (t1,e1) (t2,e0) (t0,e0) (t1,e2) (t2,e1)
    assert out.load.tolist() == [2, 3, 1] and out.kept.tolist() == [2, 3, 1]
    assert out.slots.tolist() == [[2, 1], [3, 5], [0, 4]]


def test_padding_is_routed_nowhere_and_counted_nowhere(device):
    experts = torch.tensor([[0], [0], [1], [0]], device=device)
    mask = torch.tensor([True, False, True, True], device=device)
    out = mr.plan(experts, 2, 1, mask=mask)
    assert out.slots.flatten().tolist() == [0, -1, 1, -1]
    assert out.load.tolist() == [2, 1] and out.kept.tolist() == [1, 1]
    dropless = mr.plan(experts, 2, None, mask=mask)
    assert dropless.slots.flatten().tolist() == [0, -1, 2, 1]  # row 3 (padding) stays unused


@pytest.mark.parametrize("priority", PRIORITIES)
def test_layout_invariants(device, priority):
    T, E, k, C = 4000, 16, 4, 700
    experts = on(device, random_experts(T, E, k, seed=7))
    mask = on(device, random_mask(T, seed=7))
    slots, load, kept = mr.plan(experts, E, C, priority=priority, mask=mask,
                                weights=on(device, torch.rand(T, k)))
    assert slots.device == load.device == kept.device == experts.device
    used = slots[slots >= 0]
    assert used.unique().numel() == used.numel()  # every row at most once
    assert torch.equal(torch.bincount(used // C, minlength=E), kept)
    assert torch.equal(kept, load.clamp(max=C))
    assert torch.equal(torch.bincount(experts[mask].flatten(), minlength=E), load)
    rows_in_expert = used % C  # rows of an expert are filled from 0 without gaps
    for e in range(E):
        assert torch.equal(rows_in_expert[used // C == e].sort().values.cpu(), torch.arange(int(kept[e])))


def test_thread_count_does_not_change_the_plan():
    experts = random_experts(20000, 64, 4, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mr.plan(experts, 64, 900)
        torch.set_num_threads(max(2, threads))
        many = mr.plan(experts, 64, 900)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("T,E,k,factor,min_capacity", [
    (4096, 8, 2, 1.25, 4), (4096, 8, 2, 1.0, 4), (10, 64, 1, 1.0, 4), (3, 64, 1, 1.0, 4),
    (0, 8, 2, 1.0, 4), (1000, 7, 3, 1.1, 0), (10, 1, 1, 0.37, 2), (16384, 256, 8, 2.0, 4),
])
def test_capacity_formula(T, E, k, factor, min_capacity):
    expected = min(max(min_capacity, math.ceil(factor * T * k / E - 1e-9)), T)
    assert mr.capacity(T, E, k, factor, min_capacity) == expected
    assert ref.capacity(T, E, k, factor, min_capacity) == expected


def test_capacity_uses_exact_fractions():
    # 1.1 * 100 / 2 is 55.00000000000001 in floating point: ceil would give 56.
    assert math.ceil(1.1 * 100 * 1 / 2) == 56
    assert mr.capacity(100, 2, 1, 1.1) == 55
    assert mr.capacity(1000, 1, 1, 1.1) == 1000  # clamped to T


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for experts, E, capacity, kw in list(sample_inputs(device, requires_grad))[::5]:
        torch.library.opcheck(torch.ops.moe_routing.plan, (experts, E, capacity), kw)


@pytest.mark.parametrize("priority", ["choice", "token", "score", "batch"])
def test_group_size_equals_one_plan_per_group(device, priority):
    """plan(group_size=S): capacity per group of S consecutive tokens, the
    same as planning each group alone (reference), laid out as expert e's
    rows of group g at e*G*C + g*C + c."""
    G, S, E, k, C = 3, 10, 4, 2, 2
    experts = random_experts(G * S, E, k, seed=5)
    weights = torch.rand(G * S, k, generator=torch.Generator().manual_seed(1))
    mask = random_mask(G * S, seed=2)
    got = mr.plan(on(device, experts), E, C, weights=on(device, weights), priority=priority,
                  mask=on(device, mask), group_size=S)
    assert got.slots.device.type == got.load.device.type == torch.device(device).type
    got = type(got)(*cpu(*got))
    load = torch.zeros(E, dtype=torch.long)
    kept = torch.zeros(E, dtype=torch.long)
    for g in range(G):
        rows = slice(g * S, (g + 1) * S)
        slots, l, kp = ref.plan(experts[rows], E, C, weights=weights[rows], priority=priority,
                                mask=mask[rows])
        e, c = slots // C, slots % C
        expected = torch.where(slots >= 0, e * G * C + g * C + c, -1)
        assert torch.equal(got.slots[rows], expected)
        load += l
        kept += kp
    assert torch.equal(got.load, load) and torch.equal(got.kept, kept)
    with pytest.raises(ValueError, match=r"plan: group_size must be >= 1 and divide T=30, got 7"):
        mr.plan(on(device, experts), E, C, group_size=7)
