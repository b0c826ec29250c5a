"""route: reference match, gradients, semantics by hand, gradcheck, opcheck."""
import itertools

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import (FLOAT_DTYPES, TOLERANCES, accumulation_dtype, assert_close_on, assert_within, cpu,
                      noncontiguous, on, reduction_tolerance, route_backward_abs_terms, separated_logits)

# On CUDA, E picks the lanes per token and experts per lane: 32 experts is one
# per lane, 100 with k = 32 is four per lane with lanes running out of choices.
SHAPES = [(0, 4, 1), (1, 1, 1), (1, 8, 8), (37, 8, 2), (64, 256, 8), (128, 64, 6), (300, 16, 3),
          (40, 32, 5), (50, 100, 32)]


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(logits, k, kwargs) on device covering shapes, scores, normalisation,
    bias, scale and groups (made on the CPU: the same values on every device)."""
    for (T, E, k), score in itertools.product(SHAPES, ["softmax", "sigmoid"]):
        logits = (torch.randn(T, E) * 2).to(dtype)

        def leaf(t):
            return t.requires_grad_(requires_grad)

        yield leaf(on(device, logits)), k, dict(score=score)
        yield leaf(noncontiguous(on(device, logits))), k, dict(score=score, normalize=True, scale=2.5)
        yield leaf(on(device, logits)), k, dict(score=score, normalize=False,
                                                bias=on(device, torch.randn(E) * 0.1))
        if E % 4 == 0 and k <= E // 2:
            yield leaf(on(device, logits)), k, dict(score=score, bias=on(device, torch.randn(E) * 0.1), num_groups=4,
                                        topk_groups=2)


def cpu_kwargs(kw):
    return {name: cpu(v) if isinstance(v, torch.Tensor) else v for name, v in kw.items()}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(device, dtype):
    for logits, k, kw in sample_inputs(device, dtype=dtype):
        out = mr.route(logits, k, **kw)
        expected = ref.route(cpu(logits), k, **cpu_kwargs(kw))
        acc = ref.router_dtype(logits)
        assert out.weights.dtype == acc and out.scores.dtype == acc
        assert out.experts.dtype == torch.long
        assert out.experts.device == logits.device
        torch.testing.assert_close(out.experts.cpu(), expected[1])
        # Scores and weights are ratios of positive sums over E (softmax) and k (normalisation).
        n = logits.shape[1] + k
        assert_close_on(device, out.weights, expected[0], acc, abs_sum=expected[0].abs(), n=n)
        assert_close_on(device, out.scores, expected[2], acc, abs_sum=expected[2].abs(), n=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_matches_reference(device, dtype, score, normalize):
    logits_ref = separated_logits(53, 16, dtype=dtype).requires_grad_()
    logits = on(device, logits_ref.detach()).requires_grad_()
    kw = dict(score=score, normalize=normalize, scale=1.5)
    w, _, s = mr.route(logits, 4, **kw)
    w_ref, e_ref, s_ref = ref.route(logits_ref, 4, **kw)
    gw, gs = torch.randn_like(w_ref), torch.randn_like(s_ref)
    ((w * on(device, gw)).sum() + (s * on(device, gs)).sum()).backward()
    ((w_ref * gw).sum() + (s_ref * gs).sum()).backward()
    assert logits.grad.dtype == dtype and logits.grad.device == logits.device
    rtol, atol = TOLERANCES[dtype]
    if device == "cpu":
        torch.testing.assert_close(logits.grad, logits_ref.grad, rtol=rtol, atol=max(atol, 1e-6))
    else:  # plus the reduction over E scores and k weights, summed in another order
        terms = route_backward_abs_terms(s_ref, e_ref, gw, gs, normalize, 1.5)
        tol = rtol * logits_ref.grad.double().abs() + max(atol, 1e-6) + reduction_tolerance(
            terms, 16 + 4, accumulation_dtype(dtype))
        assert_within(logits.grad, logits_ref.grad, tol, f"{device} logit gradient")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("used", ["weights", "scores"])
def test_backward_through_one_output_matches_reference(device, dtype, score, used):
    """A loss of the weights alone (the usual layer without an auxiliary loss)
    or of the scores alone: the other output's gradient is undefined, and the
    backward must treat it as zero without being given zeros."""
    logits_ref = separated_logits(53, 16, dtype=dtype).requires_grad_()
    logits = on(device, logits_ref.detach()).requires_grad_()
    w, _, s = mr.route(logits, 4, score=score, scale=1.5)
    w_ref, e_ref, s_ref = ref.route(logits_ref, 4, score=score, scale=1.5)
    out, out_ref = (w, w_ref) if used == "weights" else (s, s_ref)
    grad = torch.randn_like(out_ref)
    (out * on(device, grad)).sum().backward()
    (out_ref * grad).sum().backward()
    rtol, atol = TOLERANCES[dtype]
    gw, gs = (grad, torch.zeros_like(s_ref)) if used == "weights" else (torch.zeros_like(w_ref), grad)
    terms = route_backward_abs_terms(s_ref, e_ref, gw, gs, True, 1.5)
    tol = rtol * logits_ref.grad.double().abs() + max(atol, 1e-6) + reduction_tolerance(
        terms, 16 + 4, accumulation_dtype(dtype))
    assert logits_ref.grad.abs().amax() > 0
    assert_within(logits.grad, logits_ref.grad, tol, f"{device} logit gradient through the {used}")



@pytest.mark.parametrize("used", ["weights", "scores", "both"])
def test_compiled_backward_through_some_outputs_matches_eager(used):
    """Default torch.compile traces route's backward with whichever output
    gradients the loss gives (an unused one undefined in eager)."""
    def loss(logits):
        w, _, s = mr.route(logits, 4, scale=1.5)
        return {"weights": (w * w).sum(), "scores": (s * s).sum(), "both": (w * w).sum() + (s * s).sum()}[used]

    logits = torch.randn(53, 16)
    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x = logits.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    assert grads[0].abs().amax() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_backward_op_without_grad_scores_equals_zero_grad_scores(device, score):
    """grad_scores=None is the zero gradient, bit for bit, on every path."""
    logits = on(device, torch.randn(300, 64) * 2)
    w, e, s = mr.route(logits, 6, score=score)
    gw = torch.randn_like(w)
    back = torch.ops.moe_routing.route_backward
    for normalize in (True, False):
        with_none = back(gw, None, w, e, s, score, normalize, 1.5, torch.float32)
        with_zeros = back(gw, torch.zeros_like(s), w, e, s, score, normalize, 1.5, torch.float32)
        assert with_none.abs().amax() > 0
        assert torch.equal(with_none, with_zeros)
        torch.library.opcheck(back, (gw, None, w, e, s, score, normalize, 1.5, torch.float32))

def test_ties_go_to_lower_index_and_choices_descend(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device=device)
    out = mr.route(logits, 4)
    assert out.experts.tolist() == [[1, 2, 4, 3]]
    assert torch.all(out.weights[:, :-1] >= out.weights[:, 1:])


def test_bias_changes_selection_not_weights(device):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], device=device))  # softmax = (0.5, 0.3, 0.2)
    bias = torch.tensor([0.0, 0.0, 0.5], device=device)  # selection values (0.5, 0.3, 0.7)
    out = mr.route(logits, 1, bias=bias)
    assert out.experts.tolist() == [[2]]
    torch.testing.assert_close(out.weights.cpu(), torch.tensor([[0.2]]))  # unbiased score


def test_normalize_default_and_scale(device):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], device=device))
    torch.testing.assert_close(mr.route(logits, 1).weights.cpu(), torch.tensor([[0.5]]))
    torch.testing.assert_close(mr.route(logits, 2).weights.cpu(), torch.tensor([[0.625, 0.375]]))
    torch.testing.assert_close(mr.route(logits, 2, normalize=False, scale=2.0).weights.cpu(),
                               torch.tensor([[1.0, 0.6]]))


def test_sigmoid_scores_are_independent_per_expert(device):
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    out = mr.route(on(device, logits), 2, score="sigmoid", normalize=False)
    torch.testing.assert_close(out.scores.cpu(), torch.sigmoid(logits))
    torch.testing.assert_close(out.weights.cpu(), torch.sigmoid(torch.tensor([[2.0, 0.0]])))


def test_group_limited_selection_by_hand(device):
    # 4 groups of 2 experts; sigmoid scores give group sums (best two)
    # g0: .9+.2, g1: .6+.6, g2: .95+.05, g3: .5+.4 -> the two best groups are g1, g0.
    s = torch.tensor([[0.9, 0.2, 0.6, 0.6, 0.95, 0.05, 0.5, 0.4]], dtype=torch.float64)
    logits = torch.logit(s)
    # Without groups the top-2 would be experts 4 (0.95) and 0 (0.9).
    assert mr.route(on(device, logits), 2, score="sigmoid").experts.tolist() == [[4, 0]]
    out = mr.route(on(device, logits), 2, score="sigmoid", num_groups=4, topk_groups=2)
    assert out.experts.tolist() == [[0, 2]]  # 2 and 3 tie at .6: the lower index wins
    torch.testing.assert_close(out.weights.cpu(), torch.tensor([[0.9, 0.6]], dtype=torch.float64) / 1.5)
    expected = ref.route(logits, 2, score="sigmoid", num_groups=4, topk_groups=2)
    torch.testing.assert_close(out.experts.cpu(), expected[1])


def test_group_masking_is_minus_inf_not_zero(device):
    # Selection values 0.5 + bias = (-1.5, -2.5 | 5.5, -8.5): group sums -4 and -3,
    # so only group 1 survives. Filling group 0 with 0 (as Hugging Face does) would
    # make expert 0 beat expert 3's -8.5; with -inf, k=2 takes both experts of group 1.
    logits = torch.zeros(1, 4, device=device)
    bias = torch.tensor([-2.0, -3.0, 5.0, -9.0], device=device)
    out = mr.route(logits, 2, score="sigmoid", bias=bias, num_groups=2, topk_groups=1)
    assert out.experts.tolist() == [[2, 3]]


def deepseek_v3_gate(logits, bias, k, n_group, topk_group, route_scale):
    """DeepSeek-V3's published routing, written from the paper (section 2.1.2
    and 2.1.3): sigmoid affinities; bias for selection only; group score = sum
    of the group's top-2 biased affinities; experts outside the top groups are
    excluded; gates = unbiased affinities of the selected experts, normalised,
    times the routing scale."""
    T, E = logits.shape
    s = torch.sigmoid(logits)
    biased = s + bias
    group_scores = biased.view(T, n_group, -1).topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    allowed = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, best_groups, True)
    allowed = allowed[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    chosen = biased.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    gates = s.gather(1, chosen)
    return gates / gates.sum(-1, keepdim=True) * route_scale, chosen


def test_matches_deepseek_v3_routing(device):
    # V3's configuration, scaled down: 64 experts in 8 groups, top-4 groups, k = 6.
    logits = separated_logits(200, 64, seed=11)
    bias = torch.randn(64, dtype=torch.float64) * 0.1
    gates, chosen = deepseek_v3_gate(logits, bias, 6, 8, 4, 2.5)
    out = mr.route(on(device, logits), 6, score="sigmoid", bias=on(device, bias), num_groups=8,
                   topk_groups=4, scale=2.5)
    assert torch.equal(out.experts.cpu(), chosen)  # both descending by biased affinity
    torch.testing.assert_close(out.weights.cpu(), gates)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(device, score, normalize):
    logits = separated_logits(12, 8, device=device).requires_grad_()
    bias = torch.linspace(-0.01, 0.01, 8, dtype=torch.float64, device=device)

    def fn(x):
        w, _, s = mr.route(x, 3, score=score, normalize=normalize, bias=bias, scale=1.7)
        return w, s

    assert torch.autograd.gradcheck(fn, (logits,))


def test_gradcheck_groups(device):
    logits = separated_logits(10, 8, seed=3, device=device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: mr.route(x, 2, score="sigmoid", num_groups=4, topk_groups=2)[0::2], (logits,))


def test_deterministic(device):
    logits = torch.randn(513, 64, device=device)
    a, b = mr.route(logits, 6), mr.route(logits, 6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    samples = (list(sample_inputs(device, requires_grad, torch.float32))[::4]
               + list(sample_inputs(device, requires_grad, torch.float64))[1::7])
    for logits, k, kw in samples:
        torch.library.opcheck(torch.ops.moe_routing.route, (logits, k), kw)


def test_group_score_max_against_top2_hand_case(device):
    """Two groups of two experts. Group 0 holds 0.5 and 0.0, group 1 holds
    0.3 and 0.3 (selection values after sigmoid via logits). By its best
    expert (DeepSeek-V2's group_limited_greedy) group 0 wins; by the sum of
    its two best (DeepSeek-V3) group 1 wins."""
    scores = torch.tensor([[0.5, 0.0, 0.3, 0.3]], dtype=torch.float64)
    logits = torch.log(scores / (1 - scores)).nan_to_num(neginf=-40.0)  # sigmoid(logits) = scores
    by_max = mr.route(on(device, logits), 1, score="sigmoid", num_groups=2, topk_groups=1, group_score="max")
    by_sum = mr.route(on(device, logits), 1, score="sigmoid", num_groups=2, topk_groups=1)
    assert by_max.experts.tolist() == [[0]]
    assert by_sum.experts.tolist() == [[2]]
    for group_score in ("max", "top2"):
        g = torch.Generator().manual_seed(3)
        lg = torch.randn(50, 16, generator=g)
        bias = torch.randn(16, generator=g) * 0.1
        got = mr.route(on(device, lg), 3, score="sigmoid", bias=on(device, bias), num_groups=4,
                       topk_groups=2, group_score=group_score)
        want = ref.route(lg, 3, score="sigmoid", bias=bias, num_groups=4, topk_groups=2,
                         group_score=group_score)
        assert torch.equal(got.experts.cpu(), want[1])
        torch.testing.assert_close(got.weights.cpu(), want[0])
    with pytest.raises(RuntimeError, match=r"route: group_score must be \"top2\" or \"max\", got \"sum\""):
        mr.route(on(device, lg), 1, num_groups=4, group_score="sum")
