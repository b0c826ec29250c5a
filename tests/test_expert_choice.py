"""expert_choice and its inverse map: reference match, semantics by hand, gradients, opcheck."""
import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import cpu, on, random_mask

SHAPES = [(0, 4, 2), (1, 1, 1), (5, 3, 8), (37, 8, 9), (600, 64, 19), (300, 256, 3)]


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(scores, capacity, kwargs) on device (made on the CPU: the same values on every device)."""
    for i, (T, E, C) in enumerate(SHAPES):
        scores = torch.softmax(torch.randn(T, E), -1).to(dtype)
        yield on(device, scores).requires_grad_(requires_grad), C, dict()
        yield on(device, scores).requires_grad_(requires_grad), C, dict(mask=on(device, random_mask(T, seed=i)))
        # Quantised scores: many ties, which must go to the lower token index.
        yield on(device, (scores * 4).round() / 4).requires_grad_(requires_grad), C, dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, dtype):
    for scores, C, kw in sample_inputs(device, dtype=dtype):
        out = mr.expert_choice(scores, C, **kw)
        weights, tokens = ref.expert_choice(cpu(scores), C, **{n: cpu(v) for n, v in kw.items()})
        assert out.tokens.device == out.weights.device == scores.device
        # Weights are copies of scores: exact on every device.
        assert torch.equal(out.tokens.cpu(), tokens) and torch.equal(out.weights.cpu(), weights)


def test_by_hand(device):
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.5, 0.2], [0.7, 0.3]], device=device)
    out = mr.expert_choice(scores, 2)
    # Expert 0: t3 (.7), then t1 and t2 tie at .5 -> t1. Expert 1: t0 (.9), t1 (.5).
    assert out.tokens.tolist() == [[3, 1], [0, 1]]
    torch.testing.assert_close(out.weights.cpu(), torch.tensor([[0.7, 0.5], [0.9, 0.5]]))
    # A token may go to several experts or none: t1 is taken twice, t2 never.
    slots, weights = mr.expert_choice_slots(out, 4)
    assert slots.tolist() == [[-1, 2], [1, 3], [-1, -1], [0, -1]]
    torch.testing.assert_close(weights.cpu(), torch.tensor([[0, 0.9], [0.5, 0.5], [0, 0], [0.7, 0]]))


def test_padding_is_never_taken_and_short_columns_hold_minus_one(device):
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]], device=device)
    mask = torch.tensor([False, True, True], device=device)
    out = mr.expert_choice(scores, 3, mask=mask)
    assert out.tokens.tolist() == [[1, 2, -1], [2, 1, -1]]
    assert out.weights[:, 2].tolist() == [0.0, 0.0]


def test_moe_pipeline_matches_dense_computation(device):
    # dispatch/combine through the inverse map equal a direct sum over experts.
    T, E, C, H = 30, 4, 9, 5
    x = torch.randn(T, H, dtype=torch.float64)
    scores = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1)
    choice = mr.expert_choice(on(device, scores), C)
    slots, weights = mr.expert_choice_slots(choice, T)
    scale = torch.arange(1, E + 1, dtype=torch.float64)  # expert e multiplies by e + 1
    buffer = mr.dispatch(on(device, x), slots, E * C).view(E, C, H) * on(device, scale)[:, None, None]
    y = mr.combine(buffer, slots, weights)
    assert y.device == buffer.device
    expected = torch.zeros(T, H, dtype=torch.float64)
    tokens, choice_weights = cpu(choice.tokens, choice.weights)
    for e in range(E):
        for c in range(C):
            t = int(tokens[e, c])
            expected[t] += choice_weights[e, c] * scale[e] * x[t]
    torch.testing.assert_close(y.cpu(), expected)


def test_gradcheck(device):
    # Drawn on the CPU (the same values on every device): finite differences
    # of a selection need scores further apart than gradcheck's eps, which the
    # CPU run has checked for these values, not for CUDA's generator's.
    scores = on(device, torch.rand(12, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: mr.expert_choice(s, 5).weights, (scores,))
    x = on(device, torch.randn(12, 3, dtype=torch.float64)).requires_grad_()

    def pipeline(s, x):
        choice = mr.expert_choice(s, 5)
        slots, weights = mr.expert_choice_slots(choice, 12)
        return mr.combine(mr.dispatch(x, slots, 20) * 2, slots, weights)

    assert torch.autograd.gradcheck(pipeline, (scores, x))


def test_deterministic(device):
    scores = torch.rand(2000, 16, device=device)
    a, b = mr.expert_choice(scores, 150), mr.expert_choice(scores, 150)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for scores, C, kw in list(sample_inputs(device, requires_grad))[::2]:
        torch.library.opcheck(torch.ops.moe_routing.expert_choice, (scores, C), kw)
