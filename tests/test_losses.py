"""load_balancing_loss and z_loss: the design's formulas, reference match, gradcheck, opcheck."""
import math

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import (FLOAT_DTYPES, assert_close_on, cpu, noncontiguous, on, random_mask,
                      z_loss_abs_terms, z_loss_grad_abs_terms)

SHAPES = [(1, 1, 1), (1, 8, 8), (37, 8, 2), (1000, 64, 6), (600, 256, 8), (3000, 16, 1)]


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(logits, scores, experts, mask) on device; scores and experts routed
    on the CPU (the same values on every device, whatever route does there)."""
    for i, (T, E, k) in enumerate(SHAPES):
        logits = (torch.randn(T, E) * 2).to(dtype)
        _, experts, scores = mr.route(logits, k)
        logits, scores, experts = on(device, logits, scores, experts)
        mask = on(device, random_mask(T, seed=i)) if i % 2 else None
        yield logits.requires_grad_(requires_grad), scores.requires_grad_(requires_grad), experts, mask
        yield (noncontiguous(logits.detach()).requires_grad_(requires_grad),
               noncontiguous(scores.detach()).requires_grad_(requires_grad), experts,
               on(device, random_mask(T, seed=i + 50)))


def test_load_balancing_matches_reference(device):
    for dtype in (torch.float32, torch.float64):
        for _, scores, experts, mask in sample_inputs(device, dtype=dtype):
            T, E = scores.shape
            abs_sum = ref.load_balancing_loss(scores.detach().cpu().double().abs(), experts.cpu(),
                                              mask=cpu(mask))
            loss = mr.load_balancing_loss(scores, experts, mask=mask)
            assert loss.device == scores.device
            assert_close_on(device, loss, ref.load_balancing_loss(*cpu(scores, experts), mask=cpu(mask)),
                            abs_sum=abs_sum, n=T + E)


def test_load_balancing_is_one_under_perfect_balance(device):
    # Every expert gets the same share and every score row is uniform.
    E, k, T = 8, 2, 64
    experts = torch.stack([torch.arange(E).roll(-2 * t)[:k] for t in range(T)])
    scores = torch.full((T, E), 1.0 / E)
    torch.testing.assert_close(mr.load_balancing_loss(*on(device, scores, experts)).cpu(), torch.tensor(1.0))


def test_load_balancing_formula_by_hand(device):
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64,
                          device=device)
    experts = torch.tensor([[0], [0], [2]], device=device)
    # f = (2/3, 0, 1/3), P = (1.4/3, 0.6/3, 1.0/3): loss = 3 * (2/3 * 1.4/3 + 1/3 * 1/3)
    expected = 3 * (2 / 3 * 1.4 / 3 + 1 / 3 * 1.0 / 3)
    torch.testing.assert_close(mr.load_balancing_loss(scores, experts).cpu(),
                               torch.tensor(expected, dtype=torch.float64))
    # Padding the last token: f = (1, 0, 0), P = (0.65, 0.25, 0.1) -> 3 * 0.65.
    mask = torch.tensor([True, True, False], device=device)
    torch.testing.assert_close(mr.load_balancing_loss(scores, experts, mask=mask).cpu(),
                               torch.tensor(3 * 0.65, dtype=torch.float64))


def test_hugging_face_mixtral_loss_is_k_times_ours(device):
    # Hugging Face's load_balancing_loss_func, written out for one layer without
    # padding: E * sum over (choice, expert) of mean(one_hot) * mean(probs).
    T, E, k = 200, 8, 2
    logits = torch.randn(T, E, dtype=torch.float64).to(device)
    _, experts, scores = mr.route(logits, k)
    expert_mask = torch.nn.functional.one_hot(experts, E).to(torch.float64)  # [T, k, E]
    hf = E * torch.sum(expert_mask.mean(0) * scores.mean(0)[None, :])
    torch.testing.assert_close(hf, k * mr.load_balancing_loss(scores, experts))


def test_megatron_core_switch_loss_equals_ours(device):
    # Megatron-Core's switch_load_balancing_loss_func with coefficient 1:
    # sum_e (sum_t probs[t, e]) * tokens_per_expert[e] * E / (T * T * k).
    T, E, k = 300, 16, 4
    _, experts, scores = mr.route(torch.randn(T, E, dtype=torch.float64).to(device), k)
    tokens_per_expert = torch.bincount(experts.flatten(), minlength=E).to(torch.float64)
    megatron = torch.sum(scores.sum(0) * tokens_per_expert) * E / (T * T * k)
    torch.testing.assert_close(megatron, mr.load_balancing_loss(scores, experts))


def test_deepspeed_loss_counts_first_choices_only(device):
    # DeepSpeed's top2gating: l_aux = mean(me * ce) * E * E with me = mean gates,
    # ce = mean one-hot of the FIRST choice only.
    T, E = 256, 8
    _, experts, scores = mr.route(torch.randn(T, E, dtype=torch.float64).to(device), 2)
    me = scores.mean(0)
    ce = torch.nn.functional.one_hot(experts[:, 0], E).to(torch.float64).mean(0)
    deepspeed = torch.mean(me * ce) * E * E
    torch.testing.assert_close(deepspeed, mr.load_balancing_loss(scores, experts[:, :1]))


def test_sequence_wise_loss_is_the_mean_of_per_sequence_losses(device):
    # DeepSeek-V3: f and P per sequence, averaged over sequences; a sequence of
    # padding only is left out of the mean.
    S, L, E, k = 4, 25, 8, 2
    logits = torch.randn(S * L, E, dtype=torch.float64).to(device)
    _, experts, scores = mr.route(logits, k, score="sigmoid")
    affinity = scores / scores.sum(-1, keepdim=True)  # DeepSeek-V3's normalised s'
    mask = random_mask(S * L, seed=3).to(device)
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
    assert got.device == logits.device
    f = E / (k * valid.sum()) * count
    P = affinity[seq][valid].mean(0)
    torch.testing.assert_close(per_sequence[0], (f * P).sum())


@pytest.mark.parametrize("seq_len", [5, 15, 30])
def test_sequence_wise_gradcheck_and_opcheck(device, seq_len):
    T, E = 30, 6
    _, experts, scores = on(device, *mr.route(torch.randn(T, E, dtype=torch.float64), 2))
    scores = scores.requires_grad_()
    mask = random_mask(T, seed=seq_len).to(device)
    assert torch.autograd.gradcheck(
        lambda s: mr.load_balancing_loss(s, experts, mask=mask, seq_len=seq_len), (scores,))
    torch.library.opcheck(torch.ops.moe_routing.load_balancing_loss, (scores, experts),
                          dict(mask=mask, seq_len=seq_len))


def test_z_loss_matches_reference_and_formula(device):
    for dtype in FLOAT_DTYPES:
        for logits, _, _, mask in sample_inputs(device, dtype=dtype):
            out = mr.z_loss(logits, mask=mask)
            assert out.dtype == ref.router_dtype(logits) and out.device == logits.device
            T, E = logits.shape
            assert_close_on(device, out, ref.z_loss(cpu(logits), mask=cpu(mask)), out.dtype,
                            abs_sum=z_loss_abs_terms(logits, mask), n=T + E)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    lse = torch.tensor([math.log(2.0), math.log(math.e + 1 / math.e)], dtype=torch.float64)
    torch.testing.assert_close(mr.z_loss(on(device, logits)).cpu(), (lse ** 2).mean())


def test_empty_and_all_padding_give_zero(device):
    scores, experts = torch.rand(4, 3, device=device), torch.zeros(4, 1, dtype=torch.long, device=device)
    none_valid = torch.zeros(4, dtype=torch.bool, device=device)
    assert mr.load_balancing_loss(scores, experts, mask=none_valid).item() == 0.0
    assert mr.z_loss(torch.randn(4, 3, device=device), mask=none_valid).item() == 0.0
    assert mr.load_balancing_loss(scores[:0], experts[:0]).item() == 0.0
    assert mr.z_loss(torch.randn(0, 3, device=device)).item() == 0.0


def test_backward_matches_reference(device):
    for logits, scores, experts, mask in sample_inputs(device, dtype=torch.float64):
        # load_balancing_loss's gradient is a product per element (no sum);
        # z_loss's sums E exponentials per row.
        for op, ref_op, x, args, abs_sum, n in [
                (mr.load_balancing_loss, ref.load_balancing_loss, scores, (experts,), None, 1),
                (mr.z_loss, ref.z_loss, logits, (), z_loss_grad_abs_terms(logits, mask), logits.shape[1])]:
            a = x.detach().clone().requires_grad_()
            b = x.detach().cpu().clone().requires_grad_()
            op(a, *args, mask=mask).backward()
            ref_op(b, *[cpu(t) for t in args], mask=cpu(mask)).backward()
            assert a.grad.device == a.device
            assert_close_on(device, a.grad, b.grad, abs_sum=abs_sum, n=n)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(device, masked):
    T, E, k = 11, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    _, experts, scores = on(device, *mr.route(logits.detach(), k))
    logits = on(device, logits.detach()).requires_grad_()
    scores = scores.requires_grad_()
    mask = on(device, random_mask(T, seed=2)) if masked else None
    assert torch.autograd.gradcheck(lambda s: mr.load_balancing_loss(s, experts, mask=mask), (scores,))
    assert torch.autograd.gradcheck(lambda x: mr.z_loss(x, mask=mask), (logits,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for logits, scores, experts, mask in list(sample_inputs(device, requires_grad))[::2]:
        torch.library.opcheck(torch.ops.moe_routing.load_balancing_loss, (scores, experts),
                              dict(mask=mask))
        torch.library.opcheck(torch.ops.moe_routing.z_loss, (logits,), dict(mask=mask))
