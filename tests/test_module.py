"""Router, Experts, MoE: against a reference MoE, compile, determinism, masks, losses, stats."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import moe_routing as mr
from moe_routing import reference as ref


def reference_activation(experts: mr.Experts, h: torch.Tensor) -> torch.Tensor:
    """The activations written out from their papers (GPT-OSS's from its model
    card, HY-V4's and Step-3.7's from their model code)."""
    if experts.activation.startswith("swiglu"):
        gate, up = h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        if experts.activation == "swiglu":
            return gate * torch.sigmoid(gate) * up
        limit = torch.tensor(experts.limit, dtype=h.dtype)
        up = torch.maximum(torch.minimum(up, limit), -limit)
        if experts.activation == "swiglu_clamped_silu":  # Step-3.7: SiLU's output clamped
            return torch.minimum(gate * torch.sigmoid(gate), limit) * up
        gate = torch.minimum(gate, limit)
        if experts.activation == "swiglu_clamped":  # HY-V4: SiLU's input clamped
            return gate * torch.sigmoid(gate) * up
        return gate * torch.sigmoid(experts.alpha * gate) * (up + 1)
    return F.gelu(h) if experts.activation == "gelu" else torch.maximum(h, torch.zeros_like(h))


def reference_experts(moe: mr.MoE, rows: torch.Tensor) -> torch.Tensor:
    """Each expert's FFN applied to every row, [E, R, d]: a dense stand-in."""
    return reference_ffns(moe.experts, rows)


def reference_ffns(experts: mr.Experts, rows: torch.Tensor) -> torch.Tensor:
    """Each of ``experts``' FFNs applied to every row, [E, R, d]."""
    h = torch.einsum("rd,edf->erf", rows, experts.w_in)
    if experts.b_in is not None:
        h = h + experts.b_in[:, None]
    out = torch.einsum("erf,efd->erd", reference_activation(experts, h), experts.w_out)
    return out if experts.b_out is None else out + experts.b_out[:, None]


def reference_shared(moe: mr.MoE, tokens: torch.Tensor) -> torch.Tensor:
    """The shared expert's output for every token (padding too), or zeros."""
    if moe.shared_expert is None:
        return torch.zeros_like(tokens)
    shared = reference_ffns(moe.shared_expert, tokens)[0]
    if moe.shared_gate is None:
        return shared
    return torch.sigmoid(tokens @ moe.shared_gate.weight.t()) * shared


def reference_moe(moe: mr.MoE, x: torch.Tensor, mask=None):
    """The MoE forward written with reference ops and dense experts, sharing
    moe's parameters: y[t] = shared(x[t]) + sum over kept (t, e) of weight * expert_e(x[t])."""
    d = x.shape[-1]
    tokens = x.reshape(-1, d)
    valid = None if mask is None else mask.reshape(-1)
    T, E, k = tokens.shape[0], moe.num_experts, moe.k
    logits = F.linear(tokens.float(), moe.router.weight, moe.router.logit_bias)
    weights, experts, scores = ref.route(logits, k, score=moe.router.score,
                                         normalize=moe.router.normalize, scale=moe.router.scale)
    factor = moe.capacity_factor if moe.training or moe.eval_capacity_factor is None else moe.eval_capacity_factor
    dense = reference_experts(moe, tokens)  # [E, T, d]
    if moe.routing == "experts":
        C = ref.capacity(T, E, k, factor, moe.min_capacity)
        ec_weights, ec_tokens = ref.expert_choice(scores, C, mask=valid)
        y = reference_shared(moe, tokens)
        for e in range(E):
            for c in range(C):
                t = int(ec_tokens[e, c])
                if t >= 0:
                    y[t] += ec_weights[e, c] * dense[e, t]
        aux = moe.z_loss_weight * ref.z_loss(logits, mask=valid)
        kept = (ec_tokens >= 0).sum(1)
        return y.view(x.shape), aux, kept, kept
    C = None if factor is None else ref.capacity(T, E, k, factor, moe.min_capacity)
    # "batch" ranks by the raw top-1 probability (V-MoE, NLLB-MoE).
    by = scores.gather(1, experts) if moe.priority == "batch" else weights
    slots, load, kept = ref.plan(experts, E, C, weights=by, priority=moe.priority, mask=valid)
    y = reference_shared(moe, tokens)
    for t in range(T):
        for j in range(k):
            if slots[t, j] >= 0:
                y[t] += weights[t, j] * dense[experts[t, j], t]
    aux = (moe.aux_loss_weight * ref.load_balancing_loss(scores, experts, mask=valid)
           + moe.z_loss_weight * ref.z_loss(logits, mask=valid))
    return y.view(x.shape), aux, load, kept


@pytest.mark.parametrize("k,priority,activation,factor,routing", [
    (1, "choice", "gelu", 1.0, "tokens"), (2, "token", "swiglu", 1.0, "tokens"),
    (4, "choice", "relu", 1.0, "tokens"), (2, "score", "gelu", 0.75, "tokens"),
    (2, "batch", "gelu", 0.75, "tokens"), (2, "choice", "swiglu", None, "tokens"),
    (2, "choice", "gelu", 1.0, "experts"),
])
def test_matches_reference_moe(k, priority, activation, factor, routing):
    moe = mr.MoE(16, 32, 8, k, capacity_factor=factor, priority=priority, activation=activation,
                 routing=routing)
    x = torch.randn(3, 21, 16, dtype=torch.float64).float()
    mask = torch.rand(3, 21) > 0.25
    y = moe(x, mask)
    y_ref, aux_ref, load, kept = reference_moe(moe, x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe.aux_loss, aux_ref)
    assert torch.equal(moe.stats["load"], load) and torch.equal(moe.stats["kept"], kept)


@pytest.mark.parametrize("factor,routing", [(1.5, "tokens"), (None, "tokens"), (1.0, "experts")])
def test_gradients_match_reference_moe(factor, routing):
    moe = mr.MoE(16, 24, 4, 2, capacity_factor=factor, routing=routing)
    x = torch.randn(40, 16, requires_grad=True)
    y = moe(x)
    (y.square().sum() + mr.aux_loss(moe)).backward()
    grads = [x.grad] + [p.grad for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    y_ref, aux_ref, _, _ = reference_moe(moe, x)
    (y_ref.square().sum() + aux_ref).backward()
    grads_ref = [x.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def gpt_oss_like(factor):
    """A GPT-OSS-shaped layer (biased router and experts, clamped SwiGLU) with
    random biases and expert weights large enough for the clamps to act."""
    torch.manual_seed(0)
    moe = mr.MoE(16, 24, 8, 2, capacity_factor=factor, activation="swiglu_oai",
                 expert_bias=True, logit_bias=True)
    with torch.no_grad():
        moe.experts.w_in.mul_(12)
        for bias in (moe.router.logit_bias, moe.experts.b_in, moe.experts.b_out):
            bias.normal_()
    return moe


@pytest.mark.parametrize("options", [
    dict(capacity_factor=None, activation="swiglu"),
    dict(capacity_factor=1.0, priority="score", shared_hidden=5, shared_gate=True),
    dict(capacity_factor=1.0, routing="experts"),
    dict(capacity_factor=None, score="sigmoid", num_groups=2, topk_groups=1, logit_bias=True,
         expert_bias=True, activation="swiglu_oai"),
], ids=["dropless", "capacity_shared", "expert_choice", "sigmoid_groups_gpt_oss"])
@pytest.mark.parametrize("how", ["double", "float64_input"])
def test_layer_passes_gradcheck_in_float64(options, how):
    """The whole layer, output and auxiliary loss, against finite differences:
    after model.double() (the router computes in float64 too, not in its
    float32 default) and for float64 input to a float32 layer (gradients with
    respect to the input)."""
    torch.manual_seed(0)
    moe = mr.MoE(6, 8, 4, 2, z_loss_weight=0.1, **options)
    with torch.no_grad():  # spread the logits: no top-k flips under finite differences
        moe.router.weight.mul_(4)
    if how == "double":
        moe = moe.double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert moe.router(x.view(-1, 6)).logits.dtype == torch.float64

    def layer(x):
        return moe(x), moe.aux_loss

    assert torch.autograd.gradcheck(layer, (x,))
    if how == "double":  # and every parameter
        params = [p for p in moe.parameters()]
        assert torch.autograd.gradcheck(
            lambda *ps: torch.func.functional_call(moe, dict(zip([n for n, _ in moe.named_parameters()], ps)),
                                                   (x.detach(),)), params)


def test_router_refuses_input_that_is_not_tokens_by_features():
    router = mr.Router(6, 4, 2)
    with pytest.raises(ValueError, match=r"Router: x must be \[T, d_model=6\].*got shape \(2, 5, 6\)"):
        router(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"Router: x must be \[T, d_model=6\].*got shape \(5, 7\)"):
        router(torch.randn(5, 7))


def assert_matches_reference_with_gradients(moe: mr.MoE, x: torch.Tensor, mask) -> list:
    """moe's output, kept choices and the gradients of x and every parameter
    against reference_moe's; returns the names compared ("x", then the
    parameters')."""
    y = moe(x, mask)
    grads = torch.autograd.grad((y.square().sum() + moe.aux_loss), [x, *moe.parameters()])
    y_ref, aux_ref, load, kept = reference_moe(moe, x, mask)
    grads_ref = torch.autograd.grad((y_ref.square().sum() + aux_ref), [x, *moe.parameters()])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(moe.stats["kept"], kept)
    names = ["x"] + [name for name, _ in moe.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())),
                                   msg=name)
    return names


@pytest.mark.parametrize("factor", [None, 1.0])
def test_gpt_oss_layer_matches_reference_outputs_and_gradients(factor):
    moe = gpt_oss_like(factor)
    x = torch.randn(3, 13, 16, requires_grad=True)
    mask = torch.rand(3, 13) > 0.2
    h = torch.einsum("td,edf->etf", x.detach().reshape(-1, 16), moe.experts.w_in) + moe.experts.b_in[:, None]
    assert (h[..., :24] > 7).any() and (h[..., 24:] < -7).any() and (h[..., 24:] > 7).any()
    names = assert_matches_reference_with_gradients(moe, x, mask)
    assert {"router.logit_bias", "experts.b_in", "experts.b_out"} <= set(names)
    if factor is not None:  # choices were dropped: the reference adds no b_out for them
        assert moe.stats["dropped_fraction"] > 0


def test_modules_pickled_before_the_gpt_oss_options_still_run():
    """A whole MoE pickled (torch.save(model)) by a version without
    logit_bias, expert biases, alpha and limit unpickles and runs as before."""
    import pickle
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, 2, activation="swiglu")
    x = torch.randn(5, 8)
    expected = moe(x)
    old = copy.deepcopy(moe)
    del old.router.__dict__["logit_bias"]
    for name in ("b_in", "b_out", "alpha", "limit"):
        del old.experts.__dict__[name]
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.router.logit_bias is None and loaded.experts.b_in is None
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_biased_layer_keep_every_bias(how):
    """An EMA copy or a pickle of a GPT-OSS-shaped layer computes the same
    function (the unpickling fallback for old modules once hid logit_bias)."""
    import pickle
    moe = gpt_oss_like(None)
    copied = copy.deepcopy(moe) if how == "deepcopy" else pickle.loads(pickle.dumps(moe))
    assert torch.equal(copied.router.logit_bias, moe.router.logit_bias)
    x = torch.randn(9, 16)
    assert torch.equal(copied(x), moe(x))


def test_swiglu_alpha_and_limit_reach_the_routed_and_shared_experts():
    moe = mr.MoE(8, 16, 4, 2, activation="swiglu_oai", shared_hidden=8, swiglu_alpha=1.25,
                 swiglu_limit=3.0)
    for experts in (moe.experts, moe.shared_expert):
        assert (experts.alpha, experts.limit) == (1.25, 3.0)
        h = torch.tensor([5.0, -1.0, -5.0, 0.5] * 2 + [0.0] * 8)  # gates, then ups (width 16)
        expected = reference_activation(experts, h)
        assert expected[0] == 3.0 * torch.sigmoid(torch.tensor(1.25 * 3.0))  # clamped at 3
        torch.testing.assert_close(experts._activate(h), expected)


def test_swiglu_oai_hand_values():
    """GPT-OSS's activation at hand-computed points: (u + 1) * g * sigmoid(1.702 g),
    g = min(gate, 7), u = clamp(up, -7, 7); no gradient through a clamp."""
    import math
    experts = mr.Experts(1, 2, 4, "swiglu_oai")
    gate = torch.tensor([1.0, -2.0, 9.0, 0.5], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([0.0, 3.0, 1.0, -10.0], dtype=torch.float64, requires_grad=True)
    out = experts._activate(torch.cat([gate, up]))

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))
    expected = [1.0 * sigmoid(1.702), -2.0 * sigmoid(-3.404) * 4.0,
                7.0 * sigmoid(1.702 * 7) * 2.0, 0.5 * sigmoid(0.851) * -6.0]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    out.sum().backward()
    assert gate.grad[2] == 0 and up.grad[3] == 0  # clamped: gate above 7, up below -7
    assert gate.grad[0] != 0 and up.grad[0] != 0


def test_clamped_swiglu_hand_values():
    """HY-V4's and Step-3.7's clamped SwiGLUs at hand-computed points, limit 3:
    HY-V4 silu(min(g, 3)) * u, Step-3.7 min(silu(g), 3) * u, u = clamp(up, -3, 3).
    At g = 3.1 they differ: silu(3.1) = 2.966 is under the limit (Step-3.7
    keeps it) while HY-V4 clamps g to 3 first. No gradient through a clamp."""
    import math

    def silu(v):
        return v / (1 + math.exp(-v))
    gate_values = [1.0, -2.0, 5.0, 0.5, 3.1]
    up_values = [2.0, 3.0, 1.0, -10.0, 1.0]
    expected = {
        "swiglu_clamped": [silu(1.0) * 2, silu(-2.0) * 3, silu(3.0), silu(0.5) * -3, silu(3.0)],
        "swiglu_clamped_silu": [silu(1.0) * 2, silu(-2.0) * 3, 3.0, silu(0.5) * -3, silu(3.1)],
    }
    for activation, values in expected.items():
        experts = mr.Experts(1, 2, 5, activation, limit=3.0)
        gate = torch.tensor(gate_values, dtype=torch.float64, requires_grad=True)
        up = torch.tensor(up_values, dtype=torch.float64, requires_grad=True)
        out = experts._activate(torch.cat([gate, up]))
        torch.testing.assert_close(out, torch.tensor(values, dtype=torch.float64), msg=activation)
        out.sum().backward()
        assert gate.grad[2] == 0 and up.grad[3] == 0  # clamped: gate 5 (silu 4.97), up -10
        assert gate.grad[0] != 0 and up.grad[0] != 0
        assert (gate.grad[4] == 0) == (activation == "swiglu_clamped")  # g = 3.1


@pytest.mark.parametrize("factor", [None, 1.0])
@pytest.mark.parametrize("activation,shared", [
    ("swiglu_clamped", dict(shared_activation="swiglu")),  # HY-V4: the shared MLP unclamped
    ("swiglu_clamped_silu", dict(shared_swiglu_limit=1.5)),  # Step-3.7: another limit
])
def test_clamped_swiglu_layer_matches_reference_outputs_and_gradients(activation, shared, factor):
    """Dropless (packed rows, grouped products) and with a capacity (the
    [E, C, d] buffer), expert weights large enough that the clamps at +-1 act;
    the shared expert has its own activation or limit."""
    torch.manual_seed(0)
    moe = mr.MoE(16, 24, 8, 2, capacity_factor=factor, activation=activation, swiglu_limit=1.0,
                 shared_hidden=12, **shared)
    with torch.no_grad():
        moe.experts.w_in.mul_(4)
        moe.shared_expert.w_in.mul_(4)
    x = torch.randn(3, 13, 16, requires_grad=True)
    mask = torch.rand(3, 13) > 0.2
    limit = max(moe.experts.limit, moe.shared_expert.limit)  # both clamps act (or would)
    for experts in (moe.experts, moe.shared_expert):
        h = torch.einsum("td,edf->etf", x.detach().reshape(-1, 16), experts.w_in)
        gate, up = h.chunk(2, dim=-1)
        gate = F.silu(gate) if activation == "swiglu_clamped_silu" else gate
        assert (gate > limit).float().mean() > 0.05
        assert (up > limit).float().mean() > 0.05 and (up < -limit).float().mean() > 0.05
    names = assert_matches_reference_with_gradients(moe, x, mask)
    assert {"shared_expert.w_in", "shared_expert.w_out"} <= set(names)
    if factor is not None:
        assert moe.stats["dropped_fraction"] > 0


def test_shared_activation_and_limit_reach_the_shared_expert_alone():
    moe = mr.MoE(8, 16, 4, 2, activation="swiglu_clamped", swiglu_limit=2.0, shared_hidden=8,
                 shared_activation="swiglu_clamped_silu", shared_swiglu_limit=5.0)
    assert (moe.experts.activation, moe.experts.limit) == ("swiglu_clamped", 2.0)
    assert (moe.shared_expert.activation, moe.shared_expert.limit) == ("swiglu_clamped_silu", 5.0)
    inherited = mr.MoE(8, 16, 4, 2, activation="swiglu_clamped", swiglu_limit=2.0, shared_hidden=8)
    assert (inherited.shared_expert.activation, inherited.shared_expert.limit) == \
        ("swiglu_clamped", 2.0)


def test_batch_priority_ranks_by_raw_top1_probability_like_nllb_moe():
    """Hand case: token A has p1=0.4744, p2=0.4224; token B p1=0.4304,
    p2=0.3568, both with expert 0 first and expert 1 second, capacity 1.
    V-MoE and NLLB-MoE rank by p1, so A keeps both experts and B is dropped;
    ranking by the renormalised p1/(p1+p2) (0.529 < 0.547) would do the
    opposite."""
    probs = torch.tensor([[0.4744, 0.4224, 0.1032], [0.4304, 0.3568, 0.2128]])
    moe = mr.MoE(3, 4, 3, 2, capacity_factor=0.75, min_capacity=1, priority="batch")
    assert mr.capacity(2, 3, 2, 0.75, 1) == 1
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))  # logits = x, so softmax(x) = probs
    y = moe(probs.log())
    assert y[0].abs().sum() > 0
    assert torch.equal(y[1], torch.zeros(3))
    assert moe.stats["kept"].tolist() == [1, 1, 0]


def test_padding_tokens_get_zeros_and_are_excluded():
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=4.0)
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    y = moe(x, mask)
    assert torch.equal(y[1, 6:], torch.zeros(4, 8))
    assert int(moe.stats["load"].sum()) == 16 * 2
    # The valid tokens' outputs do not depend on what the padding holds.
    x2 = x.clone()
    x2[1, 6:] = 100.0
    torch.testing.assert_close(moe(x2, mask)[mask], y[mask])


def test_integer_attention_mask_reads_as_bool_and_a_float_mask_is_refused():
    """Hugging Face's attention_mask is int64 0/1: the same routing, output and
    statistics as the bool mask. A float mask may be additive (0 = keep,
    -inf = padding): refused by name rather than read inverted."""
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=1.0)
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    y = moe(x, mask)
    stats = dict(moe.stats)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        assert torch.equal(moe(x, mask.to(dtype)), y)
        assert torch.equal(moe.stats["load"], stats["load"]) and torch.equal(moe.stats["kept"], stats["kept"])
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=r"MoE: mask must be bool .* or 0/1 integers, got torch\.(float32|bfloat16)"):
            moe(x, mask.to(dtype))


def test_capacity_drops_show_in_output_and_stats():
    moe = mr.MoE(8, 16, 4, 1, capacity_factor=0.25, min_capacity=1)
    x = torch.randn(64, 8)
    y = moe(x)
    C = mr.capacity(64, 4, 1, 0.25, 1)
    assert int(moe.stats["kept"].sum()) <= 4 * C
    dropped = 1 - moe.stats["kept"].sum() / moe.stats["load"].sum()
    torch.testing.assert_close(moe.stats["dropped_fraction"], dropped)
    assert dropped > 0
    assert int((y.abs().sum(-1) == 0).sum()) == 64 - int(moe.stats["kept"].sum())


def test_eval_capacity_factor():
    moe = mr.MoE(8, 16, 4, 1, capacity_factor=0.5, eval_capacity_factor=4.0, min_capacity=1)
    x = torch.randn(64, 8)
    moe.train()
    moe(x)
    assert int(moe.stats["kept"].max()) <= mr.capacity(64, 4, 1, 0.5, 1)
    moe.eval()
    moe(x)
    assert torch.equal(moe.stats["kept"], moe.stats["load"])  # factor 4: nothing dropped


def test_eval_is_bitwise_deterministic_and_training_jitter_changes_routing():
    moe = mr.MoE(16, 32, 8, 2, jitter=0.3, noise="gaussian")
    x = torch.randn(256, 16)
    moe.eval()
    y1, y2 = moe(x), moe(x)
    assert torch.equal(y1, y2)
    moe.train()
    experts_a = moe.router(x).experts
    experts_b = moe.router(x).experts
    assert not torch.equal(experts_a, experts_b)
    torch.manual_seed(7)
    again_a = moe.router(x).experts
    torch.manual_seed(7)
    again_b = moe.router(x).experts
    assert torch.equal(again_a, again_b)  # noise comes from torch's generator


def test_learned_noise_is_trained():
    router = mr.Router(8, 4, 2, noise="learned")
    out = router(torch.randn(32, 8))
    (out.weights.sum() + out.scores.square().sum()).backward()
    assert router.noise_weight.grad is not None and router.noise_weight.grad.abs().sum() > 0


def test_bias_update_moves_toward_underloaded_experts():
    router = mr.Router(4, 4, 1, bias_update_rate=0.1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 10.0  # every token with x0 > 0 prefers expert 0
    x = torch.randn(64, 4).abs()
    experts = router(x).experts
    assert torch.equal(router.bias, torch.zeros(4))  # forward never moves the bias
    router.update_bias()
    load = torch.bincount(experts.flatten(), minlength=4).float()
    torch.testing.assert_close(router.bias, 0.1 * torch.sign(load.mean() - load))
    assert router.bias[0] < 0
    router.eval()
    before = router.bias.clone()
    router(x)
    router.update_bias()
    assert torch.equal(router.bias, before)  # eval forwards count no load


@pytest.mark.parametrize("name", ["bias", "fixed_bias"])
def test_fixed_bias_selects_never_weighs_and_never_updates(name):
    """Router(bias=...) and Router(fixed_bias=...) are one argument: a
    checkpoint-loaded selection bias, kept in the fixed_bias buffer."""
    b = torch.tensor([0.0, 0.0, 0.0, 10.0])
    router = mr.Router(4, 4, 1, bias_update_rate=0.1, **{name: b})
    x = torch.randn(32, 4)
    out = router(x)
    assert torch.equal(out.experts, torch.full((32, 1), 3))  # +10 wins every token
    torch.testing.assert_close(out.weights[:, 0], out.scores[:, 3])  # unbiased weights
    router.update_bias()
    assert torch.equal(router.fixed_bias, b)
    assert router.bias[3] == -0.1  # the updated bias moves, the fixed one does not
    assert torch.equal(router.state_dict()["fixed_bias"], b)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.double()])
def test_bias_buffers_stay_float32_when_the_module_is_cast(cast):
    """A step of 1e-3 on a bias near 0.5 rounds away in bfloat16 (its spacing
    there is 2^-9): both bias buffers keep float32 and their values."""
    moe = mr.MoE(8, 16, 4, 1, bias_update_rate=1e-3, fixed_bias=torch.full((4,), 0.3))
    with torch.no_grad():
        moe.router.bias.fill_(0.5)
    moe = cast(moe)
    assert moe.router.bias.dtype == moe.router.fixed_bias.dtype == torch.float32
    assert torch.equal(moe.router.fixed_bias, torch.full((4,), 0.3))
    moe.router.pending_load.copy_(torch.tensor([9, 1, 1, 1]))  # mean 3
    moe.update_bias()
    expected = torch.tensor([0.5, 0.5, 0.5, 0.5]) + torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3])
    assert torch.equal(moe.router.bias, expected)


def test_bias_update_sums_the_micro_batches_since_the_last_call():
    router = mr.Router(4, 4, 1, bias_update_rate=0.5)
    first = router(torch.randn(5, 4)).experts
    second = router(torch.randn(9, 4)).experts
    load = torch.bincount(torch.cat([first, second]).flatten(), minlength=4).float()
    router.update_bias()
    torch.testing.assert_close(router.bias, 0.5 * torch.sign(load.mean() - load))
    before = router.bias.clone()
    router.update_bias()  # nothing counted since: no change
    assert torch.equal(router.bias, before)



def test_bias_update_count_lives_in_one_tensor_for_cuda_graphs():
    """The pending load is one [E] int64 tensor that forwards add to in place
    and update_bias() clears in place (a CUDA graph's replays write to the
    memory it captured); it follows .to() and stays int64, and a deep copy
    gets its own."""
    router = mr.Router(4, 4, 2, bias_update_rate=0.5)
    count = router.pending_load
    assert count.dtype == torch.long and torch.equal(count, torch.zeros(4, dtype=torch.long))
    router(torch.randn(5, 4)), router(torch.randn(9, 4))
    assert router.pending_load is count and int(count.sum()) == (5 + 9) * 2
    router.update_bias()
    assert router.pending_load is count and int(count.sum()) == 0
    router(torch.randn(3, 4))
    router.to(torch.float64)
    assert router.pending_load.dtype == torch.long and int(router.pending_load.sum()) == 3 * 2
    twin = copy.deepcopy(router)
    assert twin.pending_load.data_ptr() != router.pending_load.data_ptr()
    assert torch.equal(twin.pending_load, router.pending_load)
    with torch.device("meta"):  # built on meta, then materialised: a zero count, not garbage
        lazy = mr.Router(4, 4, 2, bias_update_rate=0.5)
    assert lazy.pending_load.is_meta
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.pending_load, torch.zeros(4, dtype=torch.long))


def test_compiled_forward_adds_to_the_same_count_without_recompiling():
    torch._dynamo.reset()
    moe = mr.MoE(8, 16, 4, 2, bias_update_rate=0.01)
    count = moe.router.pending_load
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(moe, backend=counter, fullgraph=True)
    for step in range(3):
        compiled(torch.randn(10, 8)).sum().backward()
        compiled(torch.randn(10, 8)).sum().backward()
        assert moe.router.pending_load is count and int(count.sum()) == 2 * 10 * 2
        moe.update_bias()
    assert counter.frame_count == 1, counter.frame_count

def test_auxiliary_loss_free_balancing_reduces_imbalance():
    # A router skewed toward expert 0; only the bias moves (no gradient step).
    torch.manual_seed(0)
    E, d = 8, 16
    for score in ("softmax", "sigmoid"):
        router = mr.Router(d, E, 2, score=score, bias_update_rate=0.001)  # DeepSeek-V3's rate
        with torch.no_grad():
            router.weight.normal_(std=0.1)
            router.weight[0] += 0.08  # expert 0 is in nearly every token's top 2
        data = torch.randn(300, 256, d).abs()

        def imbalance(experts):
            load = torch.bincount(experts.flatten(), minlength=E).float()
            return float(load.max() / load.mean())

        before = imbalance(router(data[0]).experts)
        router.update_bias()  # (starts from the first batch's load)
        for step in range(300):
            router(data[step])
            router.update_bias()
        router.eval()
        after = imbalance(router(data[0]).experts)
        assert before > 2.5, (score, before)
        assert after < 1.3, (score, after)
        weights_unbiased = mr.route(F.linear(data[0], router.weight), 2, score=score)
        # The bias moved selection only: weights are the unbiased scores of the chosen experts.
        out = router(data[0])
        torch.testing.assert_close(out.weights, weights_unbiased.scores.gather(1, out.experts)
                                   / weights_unbiased.scores.gather(1, out.experts).sum(-1, keepdim=True))


def test_bias_update_excludes_padding():
    router = mr.Router(4, 4, 1, bias_update_rate=1.0)
    x = torch.randn(6, 4)
    mask = torch.tensor([True, True, True, False, False, False])
    experts = router(x, mask).experts
    router.update_bias()
    load = torch.bincount(experts[mask].flatten(), minlength=4).float()
    torch.testing.assert_close(router.bias, torch.sign(load.mean() - load))


def test_dropless_moe_drops_nothing():
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=None)
    x = torch.randn(50, 8)
    moe(x)
    assert torch.equal(moe.stats["kept"], moe.stats["load"])
    assert moe.stats["dropped_fraction"].item() == 0.0
    assert int(moe.stats["load"].sum()) == 100


@pytest.mark.parametrize("options", [dict(capacity_factor=None), dict(capacity_factor=1.0),
                                     dict(routing="experts"), dict(routing="balanced")])
def test_all_padding_batch_drops_nothing(options):
    """No valid token: nothing was dropped (0, not the 1 of 1 - 0/0)."""
    moe = mr.MoE(8, 16, 4, 1 if options.get("routing") == "balanced" else 2, **options)
    moe(torch.randn(6, 8), torch.zeros(6, dtype=torch.bool))
    assert moe.stats["dropped_fraction"].item() == 0.0
    assert int(moe.stats["load"].sum()) == 0


def test_expert_choice_moe_is_balanced_by_construction():
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=1.0, routing="experts")
    x = torch.randn(64, 8)
    moe(x)
    C = mr.capacity(64, 4, 2, 1.0)
    assert moe.stats["kept"].tolist() == [C] * 4
    assert moe.stats["max_over_mean_load"].item() == 1.0


@pytest.mark.parametrize("T,E,k,factor,C", [
    (8, 8, 1, 1.25, 2),    # 1.25 tokens per expert, rounded up; no min_capacity of 4
    (10, 4, 2, 1.0, 5),
    (6, 4, 1, 0.1, 1),     # at least one token per expert
    (4, 2, 2, 2.0, 4),     # at most T: 8 places for 4 tokens
])
def test_expert_choice_capacity_is_the_papers(T, E, k, factor, C):
    """routing="experts": C = ceil(capacity_factor * T * k / E) within [1, T],
    worked by hand; every expert fills its C places when T >= C."""
    moe = mr.MoE(8, 16, E, k, capacity_factor=factor, routing="experts")
    moe(torch.randn(T, 8))
    assert moe.stats["kept"].tolist() == [C] * E


def test_sigmoid_router_balancing_loss_averages_normalised_scores():
    """DeepSeek-V3's normalised affinities (Megatron-Core's aux loss for a
    sigmoid router): E * sum_e f_e * mean_t(s_te / sum_e' s_te'), written out
    here; and shifting every logit down, which leaves the routing as it is,
    does not lower the loss (on raw sigmoid scores it fell from 4 to 0.1)."""
    torch.manual_seed(0)
    E, k = 4, 2
    moe = mr.MoE(16, 8, E, k, score="sigmoid", capacity_factor=None, logit_bias=True,
                 aux_loss_weight=1.0, z_loss_weight=0.0)
    x = torch.randn(60, 16)
    mask = torch.rand(60) > 0.2
    moe(x, mask)
    scores = torch.sigmoid(F.linear(x, moe.router.weight, moe.router.logit_bias))
    chosen = scores.topk(k, dim=-1).indices[mask]
    f = torch.bincount(chosen.flatten(), minlength=E).float() / (mask.sum() * k)
    P = (scores / scores.sum(-1, keepdim=True))[mask].mean(0)
    expected = E * (f * P).sum()
    torch.testing.assert_close(moe.stats["balance_loss"], expected)
    torch.testing.assert_close(moe.aux_loss, expected)
    with torch.no_grad():
        moe.router.logit_bias.fill_(-5.0)
    moe(x, mask)
    assert torch.equal(moe.stats["load"], torch.bincount(chosen.flatten(), minlength=E))
    assert abs(float(moe.stats["balance_loss"]) - float(expected.detach())) < 0.05


def test_aux_loss_sums_over_layers():
    model = torch.nn.Sequential(mr.MoE(8, 16, 4, 1), torch.nn.ReLU(), mr.MoE(8, 16, 4, 2))
    model(torch.randn(20, 8))
    torch.testing.assert_close(mr.aux_loss(model), model[0].aux_loss + model[2].aux_loss)
    assert mr.aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_stats_are_tensors_without_grad():
    moe = mr.MoE(8, 16, 4, 2)
    moe(torch.randn(33, 8))
    assert set(moe.stats) == {"load", "kept", "dropped_fraction", "router_entropy",
                              "max_over_mean_load", "balance_loss", "z_loss"}
    for v in moe.stats.values():
        assert isinstance(v, torch.Tensor) and not v.requires_grad
    assert 0 < moe.stats["router_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6


def test_bfloat16_activations():
    moe = mr.MoE(16, 32, 4, 2).to(torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    y = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("options", [{}, dict(shared_hidden=8, shared_gate=True, expert_bias=True)])
def test_float32_layer_takes_bfloat16_activations_without_autocast(options):
    """Weights stay float32, activations are bfloat16: every product (routed
    experts, shared expert and its gate) runs in the activations' dtype, and
    the output equals the layer cast to bfloat16 on the same input (within
    bfloat16's rounding: the cast rounds the weights too)."""
    torch.manual_seed(0)
    moe = mr.MoE(16, 32, 4, 2, capacity_factor=None, **options)
    x = torch.randn(2, 9, 16).to(torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, copy.deepcopy(moe).to(torch.bfloat16)(x), rtol=2e-2, atol=4e-3)


def test_empty_and_single_token_batches():
    moe = mr.MoE(8, 16, 4, 2)
    assert moe(torch.randn(0, 8)).shape == (0, 8)
    assert moe(torch.randn(1, 1, 8)).shape == (1, 1, 8)


def test_compile_fullgraph_dynamic_matches_eager():
    torch._dynamo.reset()
    moe = mr.MoE(16, 32, 8, 2, capacity_factor=1.0, score="softmax")
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for shape in [(4, 9), (3, 17)]:  # two token counts: one dynamic graph
        x = torch.randn(*shape, 16, requires_grad=True)
        mask = torch.rand(*shape) > 0.2
        y = moe(x, mask)
        (y.square().sum() + mr.aux_loss(moe)).backward()
        eager = [y.detach(), moe.aux_loss.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]
        eager_stats = {k: v.clone() for k, v in moe.stats.items()}
        x.grad = None
        moe.zero_grad()
        y = compiled(x, mask)
        (y.square().sum() + mr.aux_loss(moe)).backward()
        got = [y.detach(), moe.aux_loss.detach(), x.grad] + [p.grad for p in moe.parameters()]
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for key, value in eager_stats.items():
            torch.testing.assert_close(moe.stats[key], value)
        moe.zero_grad()


@pytest.mark.parametrize("options", [
    dict(capacity_factor=None),
    dict(routing="experts", capacity_factor=1.0),
    dict(priority="score", capacity_factor=0.5),
    dict(priority="batch", capacity_factor=0.5, noise="learned"),
])
def test_compile_routing_options(options):
    torch._dynamo.reset()
    torch.manual_seed(3)
    moe = mr.MoE(8, 16, 4, 2, **options).eval()  # eval: no noise, comparable outputs
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for T in (20, 33):
        x = torch.randn(T, 8, requires_grad=True)
        y = moe(x)
        y.square().sum().backward()
        expected = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters() if p.grad is not None]
        x.grad = None
        moe.zero_grad()
        y2 = compiled(x)
        y2.square().sum().backward()
        got = [y2.detach(), x.grad] + [p.grad for p in moe.parameters() if p.grad is not None]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        moe.zero_grad()
        assert torch.equal(compiled(x), compiled(x))  # eval is deterministic


@pytest.mark.parametrize("noise", ["gaussian", "learned"])
def test_compile_training_with_noise_and_jitter(noise):
    # Training-mode randomness compiles into the graph (fullgraph would raise on a break).
    torch._dynamo.reset()
    moe = mr.MoE(8, 16, 4, 2, noise=noise, jitter=0.1).train()
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    x = torch.randn(40, 8, requires_grad=True)
    y = compiled(x)
    (y.sum() + mr.aux_loss(moe)).backward()
    assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
    assert not torch.equal(compiled(x), compiled(x))  # the noise is redrawn each call


def test_compile_training_router_with_bias_update():
    torch._dynamo.reset()
    moe = mr.MoE(8, 16, 4, 2, score="sigmoid", bias_update_rate=0.01, num_groups=2, topk_groups=2)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    x = torch.randn(50, 8)
    compiled(x).sum().backward()
    eager_load = mr.expert_load(mr.route(torch.nn.functional.linear(x, moe.router.weight), 2,
                                         score="sigmoid", num_groups=2, topk_groups=2).experts, 4)
    assert torch.equal(moe.router.pending_load, eager_load)  # counted once, by the compiled forward
    moe.update_bias()
    assert moe.router.bias.abs().sum() > 0


def test_scale_inputs_runs_experts_on_weighted_inputs_like_llama4():
    """y[t] = sum over kept choices of expert_e(w * x[t]) (Llama 4), written
    densely; forward and gradients, with capacity drops and padding."""
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=0.75, score="sigmoid", normalize=False,
                 scale_inputs=True, activation="swiglu")
    x = torch.randn(30, 8, requires_grad=True)
    mask = torch.rand(30) > 0.2
    y = moe(x, mask)
    logits = F.linear(x, moe.router.weight)
    weights, experts, _ = ref.route(logits, 2, score="sigmoid", normalize=False)
    C = ref.capacity(30, 4, 2, 0.75, moe.min_capacity)
    slots, _, _ = ref.plan(experts, 4, C, mask=mask)
    rows = []
    for t in range(30):
        acc = torch.zeros(8)
        for j in range(2):
            if slots[t, j] >= 0:
                scaled = (weights[t, j] * x[t])[None]
                acc = acc + reference_experts(moe, scaled)[experts[t, j], 0]
        rows.append(acc)
    expected = torch.stack(rows)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, moe.router.weight, moe.experts.w_in], g)
    want = torch.autograd.grad(expected, [x, moe.router.weight, moe.experts.w_in], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_renormalize_after_drop_like_nllb_moe():
    """Hand case, capacity 1: token 0 keeps both choices, token 1 loses its
    first (expert 0, taken by token 0) and keeps its second, whose weight
    becomes 1; NLLB-MoE's p_j * kept_j / max(sum kept p, eps)."""
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
    moe = mr.MoE(3, 4, 3, 2, capacity_factor=0.75, min_capacity=1, normalize=False,
                 renormalize_after_drop=True)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    y = moe(probs.log())
    dense = reference_experts(moe, probs.log())  # [E, T, d]
    expected0 = (0.6 * dense[0, 0] + 0.3 * dense[1, 0]) / 0.9
    expected1 = 1.0 * dense[2, 1]
    torch.testing.assert_close(y[0], expected0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1], expected1, rtol=1e-5, atol=1e-6)


def test_shared_expert_with_gate_adds_a_dense_ffn():
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, 2, capacity_factor=None, shared_hidden=12, shared_gate=True)
    x = torch.randn(10, 8)
    routed = mr.MoE(8, 16, 4, 2, capacity_factor=None)
    routed.load_state_dict({k: v for k, v in moe.state_dict().items()
                            if not k.startswith("shared")})
    h = F.gelu(x @ moe.shared_expert.w_in[0]) @ moe.shared_expert.w_out[0]
    expected = routed(x) + torch.sigmoid(x @ moe.shared_gate.weight.t()) * h
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="MoE: shared_gate needs a shared expert"):
        mr.MoE(8, 16, 4, 2, shared_gate=True)


def test_capacity_per_row_equals_each_row_alone():
    """capacity_per_row: each batch row is planned as if it were the whole
    batch (Switch/GShard groups), with expert_capacity as C."""
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, 2, capacity_per_row=True, expert_capacity=2)
    x = torch.randn(3, 10, 8)
    mask = torch.rand(3, 10) > 0.2
    y = moe(x, mask)
    rows = [moe(x[b:b + 1], mask[b:b + 1]) for b in range(3)]
    torch.testing.assert_close(y, torch.cat(rows), rtol=1e-6, atol=1e-7)
    whole = mr.MoE(8, 16, 4, 2, expert_capacity=2)
    whole.load_state_dict(moe.state_dict())
    assert not torch.allclose(whole(x, mask), y)  # one capacity over all rows drops more


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_experts_are_called_through_the_module_so_wrappers_see_every_call(capacity_factor):
    """PEFT's LoRA on w_in / w_out (target_parameters) replaces the experts
    module with a wrapper whose forward runs the inner one with changed
    weights: both layouts must go through the module's call (the dropless
    layer called a second method, which the wrapper lacks: AttributeError)."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    torch.manual_seed(0)
    moe = mr.MoE(16, 32, 4, 2, capacity_factor=capacity_factor, activation="swiglu")
    x = torch.randn(3, 5, 16)
    expected = moe(x)
    moe.experts = Wrapper(moe.experts)
    torch.testing.assert_close(moe(x), expected, rtol=0, atol=0)
    assert moe.experts.calls == 1
