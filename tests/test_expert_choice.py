"""expert_choice and its inverse map: reference match, semantics by hand, gradients, opcheck."""
import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import random_mask

SHAPES = [(0, 4, 2), (1, 1, 1), (5, 3, 8), (37, 8, 9), (600, 64, 19), (300, 256, 3)]


def sample_inputs(dtype=torch.float32):
    for i, (T, E, C) in enumerate(SHAPES):
        scores = torch.softmax(torch.randn(T, E), -1).to(dtype)
        yield scores, C, dict()
        yield scores, C, dict(mask=random_mask(T, seed=i))
        # Quantised scores: many ties, which must go to the lower token index.
        yield (scores * 4).round() / 4, C, dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(dtype):
    for scores, C, kw in sample_inputs(dtype):
        out = mr.expert_choice(scores, C, **kw)
        weights, tokens = ref.expert_choice(scores, C, **kw)
        assert torch.equal(out.tokens, tokens) and torch.equal(out.weights, weights)


def test_by_hand():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.5, 0.2], [0.7, 0.3]])
    out = mr.expert_choice(scores, 2)
    # Expert 0: t3 (.7), then t1 and t2 tie at .5 -> t1. Expert 1: t0 (.9), t1 (.5).
    assert out.tokens.tolist() == [[3, 1], [0, 1]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.7, 0.5], [0.9, 0.5]]))
    # A token may go to several experts or none: t1 is taken twice, t2 never.
    slots, weights = mr.expert_choice_slots(out, 4)
    assert slots.tolist() == [[-1, 2], [1, 3], [-1, -1], [0, -1]]
    torch.testing.assert_close(weights, torch.tensor([[0, 0.9], [0.5, 0.5], [0, 0], [0.7, 0]]))


def test_padding_is_never_taken_and_short_columns_hold_minus_one():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    mask = torch.tensor([False, True, True])
    out = mr.expert_choice(scores, 3, mask=mask)
    assert out.tokens.tolist() == [[1, 2, -1], [2, 1, -1]]
    assert out.weights[:, 2].tolist() == [0.0, 0.0]


def test_moe_pipeline_matches_dense_computation():
    # dispatch/combine through the inverse map equal a direct sum over experts.
    T, E, C, H = 30, 4, 9, 5
    x = torch.randn(T, H, dtype=torch.float64)
    scores = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1)
    choice = mr.expert_choice(scores, C)
    slots, weights = mr.expert_choice_slots(choice, T)
    scale = torch.arange(1, E + 1, dtype=torch.float64)  # expert e multiplies by e + 1
    buffer = mr.dispatch(x, slots, E * C).view(E, C, H) * scale[:, None, None]
    y = mr.combine(buffer, slots, weights)
    expected = torch.zeros(T, H, dtype=torch.float64)
    for e in range(E):
        for c in range(C):
            t = int(choice.tokens[e, c])
            expected[t] += choice.weights[e, c] * scale[e] * x[t]
    torch.testing.assert_close(y, expected)


def test_gradcheck():
    scores = torch.rand(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: mr.expert_choice(s, 5).weights, (scores,))
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)

    def pipeline(s, x):
        choice = mr.expert_choice(s, 5)
        slots, weights = mr.expert_choice_slots(choice, 12)
        return mr.combine(mr.dispatch(x, slots, 20) * 2, slots, weights)

    assert torch.autograd.gradcheck(pipeline, (scores, x))


def test_deterministic():
    scores = torch.rand(2000, 16)
    a, b = mr.expert_choice(scores, 150), mr.expert_choice(scores, 150)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for scores, C, kw in list(sample_inputs())[::2]:
        scores = scores.clone().requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.moe_routing.expert_choice, (scores, C), kw)
