"""The MoE layer in the training code people write: torch.compile with default
settings, activation checkpointing, DDP, autocast, deepcopy, export, logging.

Each test here failed on the layer as it was before the training-loop fixes
(compile graph breaks at capacity, the bias update inside forward, aux_loss
holding the graph on the module, bfloat16 router logits under autocast)."""
import copy
import linecache
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import moe_routing as mr

from conftest import run_distributed

D, F_HIDDEN, E = 8, 16, 4

# Every MoE configuration a user can build; eval-comparable unless noted.
CONFIGS = {
    "default": dict(k=2),
    "k1": dict(k=1),
    "token": dict(k=2, priority="token", capacity_factor=0.75),
    "score": dict(k=2, priority="score", capacity_factor=0.75),
    "batch": dict(k=2, priority="batch", capacity_factor=0.75),
    "dropless": dict(k=2, capacity_factor=None, activation="swiglu"),
    # GPT-OSS's biased router and experts with its clamped SwiGLU, dropless and not.
    "gpt_oss": dict(k=2, capacity_factor=None, activation="swiglu_oai", expert_bias=True,
                    logit_bias=True),
    "gpt_oss_capacity": dict(k=2, activation="swiglu_oai", expert_bias=True, logit_bias=True),
    # HY-V4 (gate clamped before the SiLU, unclamped shared expert) and Step-3.7
    # (SiLU output clamped, the shared expert at its own limit), limits low enough to act.
    "hy_v4": dict(k=2, capacity_factor=None, activation="swiglu_clamped", swiglu_limit=0.3,
                  shared_hidden=8, shared_activation="swiglu"),
    "step37_capacity": dict(k=2, activation="swiglu_clamped_silu", swiglu_limit=0.2,
                            shared_hidden=8, shared_swiglu_limit=0.1),
    "experts": dict(k=2, routing="experts", capacity_factor=1.0),
    "noise": dict(k=2, noise="gaussian", jitter=0.1),
    "bias_update": dict(k=2, score="sigmoid", bias_update_rate=0.01, num_groups=2, topk_groups=2),
}


def make_moe(name, seed=0):
    torch.manual_seed(seed)
    return mr.MoE(D, F_HIDDEN, E, **CONFIGS[name])


def step(module, x, seed=None):
    """Forward + backward; returns output, aux loss, input grad, param grads."""
    if seed is not None:
        torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    moe = module._orig_mod if hasattr(module, "_orig_mod") else module
    ((y.float() ** 2).mean() + moe.aux_loss).backward()
    grads = [p.grad.clone() for p in moe.parameters() if p.grad is not None]
    moe.zero_grad()
    return [y.detach(), moe.aux_loss.detach(), x.grad] + grads


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dynamic", [None, False, True])
def test_compile_matrix_no_graph_break_matches_eager(name, dynamic):
    """torch.compile(moe, dynamic=...) with and without fullgraph: zero graph
    breaks (torch._dynamo.explain), eager's forward and backward, and at most
    one recompile over three sequence lengths (automatic dynamic)."""
    torch._dynamo.reset()
    moe = make_moe(name).train()
    explanation = torch._dynamo.explain(moe)(torch.randn(2, 7, D))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    moe.router.pending_load = None
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(moe, backend=counter, dynamic=dynamic, fullgraph=True)
    for seq in (5, 9, 13):
        x = torch.randn(2, seq, D)
        eager = step(moe, x, seed=seq)
        got = step(compiled, x, seed=seq)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # dynamic=False recompiles per shape by design; otherwise one or two graphs.
    assert counter.frame_count <= (3 if dynamic is False else 2), counter.frame_count
    if name == "bias_update":  # each forward (eager and compiled) counted its load once
        assert int(moe.router.pending_load.sum()) == 2 * 2 * (5 + 9 + 13) * 2


def test_compiled_layer_takes_an_integer_attention_mask():
    """Hugging Face's int64 0/1 attention_mask, compiled with fullgraph and
    dynamic shapes: the bool mask's eager results."""
    torch._dynamo.reset()
    moe = make_moe("default").train()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    for seq in (5, 9):
        x = torch.randn(2, seq, D)
        mask = torch.ones(2, seq, dtype=torch.bool)
        mask[1, :3] = False
        expected, expected_aux = moe(x, mask), moe.aux_loss
        torch.testing.assert_close(compiled(x, mask.long()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.aux_loss, expected_aux, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_default_compile_of_a_small_model_with_inductor(fullgraph):
    """`torch.compile(model)` exactly as users write it (inductor, default
    dynamic), on a 2-layer transformer with MoE FFNs, new sequence lengths."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(moe_options=dict(k=2, capacity_factor=1.25))
    compiled = torch.compile(model, fullgraph=fullgraph)
    model.eval()  # eval: no noise; the forward+backward still runs
    for seq in (6, 11, 17):
        ids = torch.randint(0, 32, (2, seq))
        expected = lm_step(model, ids)
        got = lm_step(compiled, ids)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 32, (2, 23)))
    assert explanation.graph_break_count == 0, explanation.break_reasons


class Block(nn.Module):
    def __init__(self, moe_options, checkpointing=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.moe = mr.MoE(D, F_HIDDEN, E, **moe_options)
        self.checkpointing = checkpointing

    def _ffn(self, h):
        return self.moe(self.norm2(h))

    def forward(self, h):
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        if self.checkpointing == "non-reentrant":
            return h + checkpoint(self._ffn, h, use_reentrant=False)
        if self.checkpointing == "reentrant":
            return h + checkpoint(self._ffn, h, use_reentrant=True)
        return h + self._ffn(h)


class TinyLM(nn.Module):
    def __init__(self, moe_options, layers=2, checkpointing=None):
        super().__init__()
        self.embed = nn.Embedding(32, D)
        self.blocks = nn.ModuleList(Block(moe_options, checkpointing) for _ in range(layers))
        self.head = nn.Linear(D, 32)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def lm_step(model, ids):
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
    total = loss + mr.aux_loss(base)
    total.backward()
    grads = [p.grad.clone() for p in base.parameters()]
    base.zero_grad()
    return [total.detach()] + grads


@pytest.mark.parametrize("kind", ["non-reentrant", "function"])
def test_checkpointing_gives_the_gradients_and_load_of_no_checkpointing(kind):
    """Activation checkpointing re-runs the MoE forward inside backward: it must
    route with the same bias (forward never updates it) and count the load
    once, so gradients and the bias update equal the run without it."""
    options = dict(k=2, score="sigmoid", bias_update_rate=0.05, capacity_factor=1.0)
    torch.manual_seed(0)
    plain = TinyLM(options)
    with torch.no_grad():  # a non-zero bias, so that routing depends on it
        for block in plain.blocks:
            block.moe.router.bias.uniform_(-0.3, 0.3)
    ckpt = copy.deepcopy(plain)
    for block in ckpt.blocks:
        block.checkpointing = "non-reentrant"
    if kind == "function":  # the whole model under one checkpoint
        wrapped = lambda ids: checkpoint(TinyLM.forward, ckpt, ids, use_reentrant=False)  # noqa: E731
    else:
        wrapped = ckpt
    for _ in range(3):
        ids = torch.randint(0, 32, (3, 10))
        expected = lm_step(plain, ids)
        got = lm_step(_Callable(wrapped, ckpt), ids)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for p, q in zip(plain.blocks, ckpt.blocks):
            assert torch.equal(p.moe.router.pending_load, q.moe.router.pending_load)
            assert torch.equal(p.moe.stats["load"], q.moe.stats["load"])
        mr.update_bias(plain)
        mr.update_bias(ckpt)
        for p, q in zip(plain.blocks, ckpt.blocks):
            assert torch.equal(p.moe.router.bias, q.moe.router.bias)


class _Callable(nn.Module):
    """Calls fn but exposes module's parameters (for lm_step)."""

    def __init__(self, fn, module):
        super().__init__()
        self.fn, self.inner = fn, module

    def forward(self, ids):
        return self.fn(ids)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("change", ["update_bias", "update_bias, eval forward", "load_state_dict",
                                    "load_state_dict(assign=True)"])
def test_bias_changed_between_forward_and_checkpointed_backward_raises(reentrant, change):
    """The re-run in backward would route with the new bias and give the
    gradients of another routing: an error instead (also when an eval
    forward came in between, or the bias tensor was replaced). After backward
    the same change is the normal training loop, and a second forward before
    backward (gradient accumulation) is fine."""
    torch.manual_seed(0)
    moe = mr.MoE(D, F_HIDDEN, E, 2, bias_update_rate=0.5, score="sigmoid")
    x = torch.randn(12, D, requires_grad=True)
    y = checkpoint(moe, x, use_reentrant=reentrant)
    if change.startswith("update_bias"):
        moe.update_bias()
        if change.endswith("eval forward"):
            with torch.no_grad():
                moe.eval()(x)
            moe.train()
    else:
        state = moe.state_dict()
        state["router.bias"] = torch.full((E,), 0.25)
        moe.load_state_dict(state, assign=change.endswith("(assign=True)"))
    with pytest.raises(RuntimeError, match="Router: the selection bias changed between a forward "
                                           "and its re-run by activation checkpointing"):
        y.sum().backward()
    x.grad = None
    moe.zero_grad()
    for _ in range(2):
        loss = sum(checkpoint(moe, x, use_reentrant=reentrant).sum() for _ in range(2))
        loss.backward()
        moe.update_bias()
    assert moe.router.bias.abs().sum() > 0 and x.grad is not None


def test_reentrant_checkpointing_warns_that_the_aux_loss_is_lost():
    torch.manual_seed(0)
    model = TinyLM(dict(k=2), layers=1, checkpointing="reentrant")
    ids = torch.randint(0, 32, (2, 8))
    with pytest.warns(UserWarning, match="use_reentrant=False") as caught:
        model(ids)
    # Attributed to the caller (this file), not to torch's module or checkpoint code.
    assert [w.filename for w in caught] == [__file__]
    assert not model.blocks[0].moe.aux_loss.requires_grad  # what the warning is about
    model.blocks[0].checkpointing = "non-reentrant"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids)
    assert model.blocks[0].moe.aux_loss.requires_grad


def test_update_bias_without_a_group_on_several_processes_warns(monkeypatch):
    """A multi-process run that forgets the group: each rank would move its
    bias by its own load alone. Warned (world size faked; no collective runs)."""
    import torch.distributed as dist
    moe = mr.MoE(8, 16, 4, 2, bias_update_rate=1e-3)
    moe(torch.randn(10, 8))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match="no process group on a run of 2 processes") as caught:
        mr.update_bias(moe)
    assert [w.filename for w in caught] == [__file__]
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.update_bias(moe)


def test_eval_under_no_grad_does_not_warn():
    moe = mr.MoE(D, F_HIDDEN, E, 2).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        moe(torch.randn(5, D))


def test_deepcopy_and_pickle_after_a_training_forward():
    torch.manual_seed(0)
    model = TinyLM(dict(k=2, bias_update_rate=0.01))
    ids = torch.randint(0, 32, (2, 8))
    lm_step(model, ids)  # leaves aux_loss, stats and the pending load on the layers
    model(ids)  # and an aux_loss holding a graph
    ema = copy.deepcopy(model)
    assert ema.blocks[0].moe.aux_loss is None
    assert torch.equal(ema.blocks[0].moe.router.pending_load, model.blocks[0].moe.router.pending_load)
    clone = pickle.loads(pickle.dumps(model))
    model.eval(), ema.eval(), clone.eval()
    assert torch.equal(ema(ids), model(ids)) and torch.equal(clone(ids), model(ids))
    assert model.blocks[0].moe.aux_loss is not None  # the original keeps its own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_logits_stay_float32_under_autocast(dtype):
    torch.manual_seed(0)
    moe = mr.MoE(D, F_HIDDEN, E, 2)
    x = torch.randn(2, 9, D)
    with torch.autocast("cpu", dtype=dtype):
        out = moe.router(x.reshape(-1, D))
        y = moe(x)
    assert out.logits.dtype == torch.float32 and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.logits, F.linear(x.reshape(-1, D), moe.router.weight),
                               rtol=0, atol=0)
    expected_z = mr.z_loss(F.linear(x.reshape(-1, D), moe.router.weight))
    torch.testing.assert_close(moe.stats["z_loss"], expected_z, rtol=0, atol=0)
    assert y.shape == x.shape
    (y.float().sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad.dtype == torch.float32



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dropless_experts_run_in_the_autocast_dtype_like_capacity_experts(dtype, activation):
    """Under autocast the capacity path's experts (torch.bmm) run in the
    autocast dtype; the dropless ones (grouped_mm, a custom op that autocast
    does not cast) must too: the same output dtype, the same values as the
    capacity layer with room for every token, and float32 weight gradients."""
    torch.manual_seed(0)
    dropless = mr.MoE(D, F_HIDDEN, E, 2, activation=activation, capacity_factor=None)
    roomy = copy.deepcopy(dropless)
    roomy.capacity_factor = roomy.eval_capacity_factor = float(E)  # capacity T: nothing dropped
    x = torch.randn(2, 9, D)
    with torch.autocast("cpu", dtype=dtype):
        y, y_roomy = dropless(x), roomy(x)
    assert y.dtype == dtype and y_roomy.dtype == dtype
    assert float(roomy.stats["dropped_fraction"]) == 0.0
    torch.testing.assert_close(y, y_roomy, rtol=2e-2, atol=2e-2)
    (y.float().square().sum() + dropless.aux_loss).backward()
    assert dropless.experts.w_in.grad.dtype == torch.float32
    assert dropless.experts.w_in.grad.abs().amax() > 0

def test_stats_expose_the_unweighted_losses():
    torch.manual_seed(0)
    moe = mr.MoE(D, F_HIDDEN, E, 2, aux_loss_weight=0.3, z_loss_weight=0.02)
    x = torch.randn(21, D)
    mask = torch.rand(21) > 0.3
    moe(x, mask)
    r = mr.route(F.linear(x, moe.router.weight), 2)
    balance = mr.reference.load_balancing_loss(r.scores, r.experts, mask=mask)
    z = mr.reference.z_loss(F.linear(x, moe.router.weight), mask=mask)
    torch.testing.assert_close(moe.stats["balance_loss"], balance)
    torch.testing.assert_close(moe.stats["z_loss"], z)
    torch.testing.assert_close(moe.aux_loss, 0.3 * balance + 0.02 * z)
    assert not moe.stats["balance_loss"].requires_grad


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="torch < 2.7: torch.compiler.is_exporting() is False under strict export")
def test_export_of_an_eval_moe_has_no_losses_or_stats():
    torch.manual_seed(0)
    moe = mr.MoE(D, F_HIDDEN, E, 2).eval()
    x = torch.randn(12, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = torch.export.export(moe, (x,))
    assert not [w for w in caught if "assigned" in str(w.message)], [str(w.message) for w in caught]
    targets = {str(node.target) for node in exported.graph.nodes}
    assert not any("load_balancing_loss" in t or "z_loss" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), moe(x))


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="torch < 2.7: torch.compiler.is_exporting() is False under strict export")
@pytest.mark.parametrize("options", [dict(), dict(capacity_factor=None), dict(routing="experts"),
                                     dict(expert_capacity=3)],
                         ids=["capacity", "dropless", "expert-choice", "expert-capacity"])
@pytest.mark.parametrize("strict", [False, True])
def test_export_with_a_dynamic_sequence_length(options, strict):
    """A serving export, [B, S, d_model] with S dynamic, runs at other
    lengths like eager (the capacity layers failed: viewing the [E, C, H]
    expert output back to [E*C, H] made export guard on C != 1)."""
    torch.manual_seed(0)
    moe = mr.MoE(D, F_HIDDEN, E, 2, **options).eval()
    S = torch.export.Dim("S", min=2, max=64)
    exported = torch.export.export(moe, (torch.randn(2, 8, D),), dynamic_shapes=({1: S},),
                                   strict=strict)
    for length in (2, 5, 13, 64):
        x = torch.randn(2, length, D)
        torch.testing.assert_close(exported.module()(x), moe(x), rtol=0, atol=0)


def test_wrong_feature_size_names_d_model():
    moe = mr.MoE(D, F_HIDDEN, E, 2)
    with pytest.raises(ValueError, match=r"MoE: x must have d_model=8 features"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"MoE: mask must have x's leading shape"):
        moe(torch.randn(3, D), torch.ones(4, dtype=torch.bool))


# ---- DDP: gloo, 2 processes ----

def _ddp_worker(rank, world, out_dir, broadcast_buffers):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = TinyLM(dict(k=2, score="sigmoid", bias_update_rate=0.05, capacity_factor=None,
                        aux_loss_weight=0.0, z_loss_weight=0.0), layers=1)
    ddp = DDP(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(42)
    for _ in range(4):
        ids = torch.randint(0, 32, (world, 2, 8), generator=data)[rank]
        logits = ddp(ids)
        F.cross_entropy(logits.reshape(-1, 32), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        mr.update_bias(model, group=dist.group.WORLD)
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_bias_update_uses_every_rank_load(tmp_path, broadcast_buffers):
    """DDP (gloo, 2 processes): with update_bias(group) after the optimizer
    step, both ranks hold the same bias and the same weights as one process
    that trains on the global batch (the loss is a per-token mean, so DDP's
    gradient average equals the global-batch gradient)."""
    world = 2
    run_distributed(tmp_path, world, _ddp_worker, str(tmp_path), broadcast_buffers)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    torch.manual_seed(0)
    model = TinyLM(dict(k=2, score="sigmoid", bias_update_rate=0.05, capacity_factor=None,
                        aux_loss_weight=0.0, z_loss_weight=0.0), layers=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(42)
    for _ in range(4):
        ids = torch.randint(0, 32, (world, 2, 8), generator=data).reshape(world * 2, 8)
        F.cross_entropy(model(ids).reshape(-1, 32), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        mr.update_bias(model)
    bias = model.blocks[0].moe.router.bias
    assert bias.abs().sum() > 0
    for state in states:
        assert torch.equal(state["blocks.0.moe.router.bias"], bias)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_readme_training_loop_snippets_run():
    """The README's "Using it in a training loop" snippets, executed (those
    that put tensors on "cuda" only where a GPU exists), and the README's
    claim that the compiled training steps break no graph, checked where
    torch has the checkpoint setting the snippet sets."""
    from torch._dynamo.utils import counters
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Using it in a training loop", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) >= 5, "the training-loop section lost its snippets"
    namespace = {}
    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    saved = getattr(torch._dynamo.config, flag, None)
    torch._dynamo.reset()
    counters.clear()
    try:
        for number, code in enumerate(blocks, 1):
            if '"cuda"' in code and not torch.cuda.is_available():
                continue
            # A name of its own, with the snippet's lines in linecache: Dynamo
            # (torch 2.6) reads a frame's source lines by file name, and under
            # the name "README.md" it read the README's own first lines, whose
            # unfinished statement failed to tokenize.
            name = f"<README.md, training-loop snippet {number}>"
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)
            exec(compile(code, name, "exec"), namespace)  # noqa: S102
        if saved is not None:
            assert getattr(torch._dynamo.config, flag), "the Compile snippet no longer sets " + flag
            assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
            assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        if saved is not None:
            setattr(torch._dynamo.config, flag, saved)
        torch._dynamo.reset()


@pytest.mark.parametrize("T,E_,k,factor,min_capacity", [
    (0, 4, 1, 1.0, 4), (1, 4, 2, 1.25, 4), (10, 1, 1, 1.1, 0), (100, 2, 1, 1.1, 1),
    (4096, 8, 2, 1.25, 4), (1000, 64, 6, 0.3, 0), (7, 3, 3, 2.0, 10), (10**7, 1, 1, 1e6, 4),
    (12345, 256, 8, 1.0000004, 1), (999, 7, 5, 0.9999995, 2),
])
def test_traced_capacity_equals_the_op(T, E_, k, factor, min_capacity):
    """The Python arithmetic that torch.compile traces gives the op's result
    (and the hand-computed value for the exact-fraction cases)."""
    from moe_routing.ops import _capacity_traced
    traced = _capacity_traced(T, E_, k, factor, min_capacity)
    if T * k * 10**6 * factor < 2**62:  # inside the op's int64 range
        assert traced == torch.ops.moe_routing.capacity(T, E_, k, factor, min_capacity)
    if (T, E_, k, factor) == (100, 2, 1, 1.1):
        assert traced == 55  # exactly 1.1 * 100 / 2, not the 56 of float rounding
    if (T, factor) == (10**7, 1e6):
        assert traced == 10**7  # clamped to T


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"),
                    reason="this torch's Dynamo cannot keep forward side effects under checkpoint")
@torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
def test_compiled_checkpointed_layer_with_bias_update_matches_eager():
    """torch.compile(fullgraph=True) around a checkpointed MoE with the
    balancing bias: eager's output and gradients, the load counted once. The
    layer records aux_loss, stats and the load as side effects of forward,
    which Dynamo refuses inside a checkpoint region unless told not to replay
    them in backward (what eager checkpointing also does, see _in_backward):
    the README documents the flag."""
    torch._dynamo.reset()

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = mr.MoE(D, F_HIDDEN, E, 2, score="sigmoid", bias_update_rate=0.1)

        def forward(self, x):
            return x + checkpoint(self.moe, x, use_reentrant=False)

    torch.manual_seed(0)
    eager = Residual()
    with torch.no_grad():
        eager.moe.router.bias.uniform_(-0.3, 0.3)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(20, D)
    expected = step(_Unwrap(eager), x)
    got = step(_Unwrap(model, compiled), x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.moe.router.pending_load, eager.moe.router.pending_load)
    assert int(eager.moe.router.pending_load.sum()) == 20 * 2


class _Unwrap(nn.Module):
    """step() helper: calls ``fn`` (default: module), exposes module's MoE
    aux_loss and parameters."""

    def __init__(self, module, fn=None):
        super().__init__()
        self.inner, self.fn = module, (fn if fn is not None else module)

    @property
    def aux_loss(self):
        return self.inner.moe.aux_loss

    def forward(self, x):
        return self.fn(x)
