"""load_balancing_loss and z_loss: the design's formulas, reference match, gradcheck, opcheck."""
import math

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import FLOAT_DTYPES, assert_close, noncontiguous, random_mask

SHAPES = [(1, 1, 1), (1, 8, 8), (37, 8, 2), (1000, 64, 6), (600, 256, 8), (3000, 16, 1)]


def sample_inputs(dtype=torch.float32):
    for i, (T, E, k) in enumerate(SHAPES):
        logits = (torch.randn(T, E) * 2).to(dtype)
        _, experts, scores = mr.route(logits, k)
        mask = random_mask(T, seed=i) if i % 2 else None
        yield logits, scores, experts, mask
        yield noncontiguous(logits), noncontiguous(scores), experts, random_mask(T, seed=i + 50)


def test_load_balancing_matches_reference():
    for dtype in (torch.float32, torch.float64):
        for _, scores, experts, mask in sample_inputs(dtype):
            assert_close(mr.load_balancing_loss(scores, experts, mask=mask),
                         ref.load_balancing_loss(scores, experts, mask=mask))


def test_load_balancing_is_one_under_perfect_balance():
    # Every expert gets the same share and every score row is uniform.
    E, k, T = 8, 2, 64
    experts = torch.stack([torch.arange(E).roll(-2 * t)[:k] for t in range(T)])
    scores = torch.full((T, E), 1.0 / E)
    torch.testing.assert_close(mr.load_balancing_loss(scores, experts), torch.tensor(1.0))


def test_load_balancing_formula_by_hand():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    experts = torch.tensor([[0], [0], [2]])
    # f = (2/3, 0, 1/3), P = (1.4/3, 0.6/3, 1.0/3): loss = 3 * (2/3 * 1.4/3 + 1/3 * 1/3)
    expected = 3 * (2 / 3 * 1.4 / 3 + 1 / 3 * 1.0 / 3)
    torch.testing.assert_close(mr.load_balancing_loss(scores, experts),
                               torch.tensor(expected, dtype=torch.float64))
    # Padding the last token: f = (1, 0, 0), P = (0.65, 0.25, 0.1) -> 3 * 0.65.
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(mr.load_balancing_loss(scores, experts, mask=mask),
                               torch.tensor(3 * 0.65, dtype=torch.float64))


def test_hugging_face_mixtral_loss_is_k_times_ours():
    # Hugging Face's load_balancing_loss_func, written out for one layer without
    # padding: E * sum over (choice, expert) of mean(one_hot) * mean(probs).
    T, E, k = 200, 8, 2
    logits = torch.randn(T, E, dtype=torch.float64)
    _, experts, scores = mr.route(logits, k)
    expert_mask = torch.nn.functional.one_hot(experts, E).to(torch.float64)  # [T, k, E]
    hf = E * torch.sum(expert_mask.mean(0) * scores.mean(0)[None, :])
    torch.testing.assert_close(hf, k * mr.load_balancing_loss(scores, experts))


def test_megatron_core_switch_loss_equals_ours():
    # Megatron-Core's switch_load_balancing_loss_func with coefficient 1:
    # sum_e (sum_t probs[t, e]) * tokens_per_expert[e] * E / (T * T * k).
    T, E, k = 300, 16, 4
    _, experts, scores = mr.route(torch.randn(T, E, dtype=torch.float64), k)
    tokens_per_expert = torch.bincount(experts.flatten(), minlength=E).to(torch.float64)
    megatron = torch.sum(scores.sum(0) * tokens_per_expert) * E / (T * T * k)
    torch.testing.assert_close(megatron, mr.load_balancing_loss(scores, experts))


def test_deepspeed_loss_counts_first_choices_only():
    # DeepSpeed's top2gating: l_aux = mean(me * ce) * E * E with me = mean gates,
    # ce = mean one-hot of the FIRST choice only.
    T, E = 256, 8
    _, experts, scores = mr.route(torch.randn(T, E, dtype=torch.float64), 2)
    me = scores.mean(0)
    ce = torch.nn.functional.one_hot(experts[:, 0], E).to(torch.float64).mean(0)
    deepspeed = torch.mean(me * ce) * E * E
    torch.testing.assert_close(deepspeed, mr.load_balancing_loss(scores, experts[:, :1]))


def test_sequence_wise_loss_is_the_mean_of_per_sequence_losses():
    # DeepSeek-V3: f and P per sequence, averaged over sequences; a sequence of
    # padding only is left out of the mean.
    S, L, E, k = 4, 25, 8, 2
    logits = torch.randn(S * L, E, dtype=torch.float64)
    _, experts, scores = mr.route(logits, k, score="sigmoid")
    affinity = scores / scores.sum(-1, keepdim=True)  # DeepSeek-V3's normalised s'
    mask = random_mask(S * L, seed=3)
    mask[2 * L:3 * L] = False
    per_sequence = [mr.load_balancing_loss(affinity[s * L:(s + 1) * L], experts[s * L:(s + 1) * L],
                                           mask=mask[s * L:(s + 1) * L]) for s in (0, 1, 3)]
    got = mr.load_balancing_loss(affinity, experts, mask=mask, seq_len=L)
    torch.testing.assert_close(got, torch.stack(per_sequence).mean())
    torch.testing.assert_close(got, ref.load_balancing_loss(affinity, experts, mask=mask, seq_len=L))
    # DeepSeek-V3's own notation for one sequence: f_i = E / (k T) * count_i,
    # P_i = mean of s'_i, loss = sum_i f_i P_i.
    seq = slice(0, L)
    valid = mask[seq]
    count = torch.bincount(experts[seq][valid].flatten(), minlength=E).to(torch.float64)
    f = E / (k * valid.sum()) * count
    P = affinity[seq][valid].mean(0)
    torch.testing.assert_close(per_sequence[0], (f * P).sum())


@pytest.mark.parametrize("seq_len", [5, 15, 30])
def test_sequence_wise_gradcheck_and_opcheck(seq_len):
    T, E = 30, 6
    _, experts, scores = mr.route(torch.randn(T, E, dtype=torch.float64), 2)
    scores = scores.requires_grad_()
    mask = random_mask(T, seed=seq_len)
    assert torch.autograd.gradcheck(
        lambda s: mr.load_balancing_loss(s, experts, mask=mask, seq_len=seq_len), (scores,))
    torch.library.opcheck(torch.ops.moe_routing.load_balancing_loss, (scores, experts),
                          dict(mask=mask, seq_len=seq_len))


def test_z_loss_matches_reference_and_formula():
    for dtype in FLOAT_DTYPES:
        for logits, _, _, mask in sample_inputs(dtype):
            out = mr.z_loss(logits, mask=mask)
            assert out.dtype == ref.router_dtype(logits)
            assert_close(out, ref.z_loss(logits, mask=mask), out.dtype)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    lse = torch.tensor([math.log(2.0), math.log(math.e + 1 / math.e)], dtype=torch.float64)
    torch.testing.assert_close(mr.z_loss(logits), (lse ** 2).mean())


def test_empty_and_all_padding_give_zero():
    scores, experts = torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long)
    none_valid = torch.zeros(4, dtype=torch.bool)
    assert mr.load_balancing_loss(scores, experts, mask=none_valid).item() == 0.0
    assert mr.z_loss(torch.randn(4, 3), mask=none_valid).item() == 0.0
    assert mr.load_balancing_loss(scores[:0], experts[:0]).item() == 0.0
    assert mr.z_loss(torch.randn(0, 3)).item() == 0.0


def test_backward_matches_reference():
    for logits, scores, experts, mask in sample_inputs(torch.float64):
        for op, ref_op, x, args in [(mr.load_balancing_loss, ref.load_balancing_loss, scores, (experts,)),
                                    (mr.z_loss, ref.z_loss, logits, ())]:
            a = x.detach().clone().requires_grad_()
            b = x.detach().clone().requires_grad_()
            op(a, *args, mask=mask).backward()
            ref_op(b, *args, mask=mask).backward()
            assert_close(a.grad, b.grad)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    T, E, k = 11, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    _, experts, scores = mr.route(logits.detach(), k)
    scores = scores.requires_grad_()
    mask = random_mask(T, seed=2) if masked else None
    assert torch.autograd.gradcheck(lambda s: mr.load_balancing_loss(s, experts, mask=mask), (scores,))
    assert torch.autograd.gradcheck(lambda x: mr.z_loss(x, mask=mask), (logits,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for logits, scores, experts, mask in list(sample_inputs())[::2]:
        scores = scores.detach().clone().requires_grad_(requires_grad)
        logits = logits.detach().clone().requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.moe_routing.load_balancing_loss, (scores, experts),
                              dict(mask=mask))
        torch.library.opcheck(torch.ops.moe_routing.z_loss, (logits,), dict(mask=mask))
