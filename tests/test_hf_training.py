"""moe_routing.MoE inside a small Hugging Face model (a 2-layer Mixtral built
from a config, no download), trained the way users train: torch.compile with
default settings, Hugging Face's own activation checkpointing, bf16 autocast."""
import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import moe_routing as mr

transformers = pytest.importorskip("transformers")  # installed by `make test`

VOCAB, HIDDEN, INTER, E, K = 64, 32, 48, 4, 2


def mixtral_with_our_moe(**moe_options):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
        num_experts_per_tok=K, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp = mr.MoE(HIDDEN, INTER, E, K, activation="swiglu", **moe_options)
    return model


def train_step(model, ids, base=None):
    base = base or model
    out = model(input_ids=ids, labels=ids)
    total = out.loss + mr.aux_loss(base)
    total.backward()
    grads = [p.grad.clone() for p in base.parameters() if p.grad is not None]
    base.zero_grad()
    return [total.detach(), out.logits.detach()] + grads


def test_default_compile_has_no_graph_break_and_matches_eager():
    model = mixtral_with_our_moe(capacity_factor=1.25)
    explanation = torch._dynamo.explain(model)(input_ids=torch.randint(0, VOCAB, (2, 9)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)  # default dynamic, no fullgraph
    model.eval()  # deterministic routing for the comparison; backward still runs
    for seq in (5, 9, 13):
        ids = torch.randint(0, VOCAB, (2, seq))
        expected = train_step(model, ids)
        got = train_step(compiled, ids, base=model)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2  # one static graph, then one dynamic graph


def test_hf_activation_checkpointing_with_bias_balancing():
    """Hugging Face's own checkpointing (non-reentrant) around our MoE with
    the auxiliary-loss-free bias: same gradients, same load, same bias as
    without checkpointing, over several optimizer steps."""
    plain = mixtral_with_our_moe(score="sigmoid", bias_update_rate=0.05, capacity_factor=1.0)
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.mlp.router.bias.uniform_(-0.3, 0.3)
    ckpt = copy.deepcopy(plain)
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers >= 5.2x
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train(), plain.train()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 11))
        expected = train_step(plain, ids)
        got = train_step(ckpt, ids)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for p, q in zip(plain.model.layers, ckpt.model.layers):
            assert torch.equal(p.mlp.router.pending_load, q.mlp.router.pending_load)
        mr.update_bias(plain)
        mr.update_bias(ckpt)
    for p, q in zip(plain.model.layers, ckpt.model.layers):
        assert torch.equal(p.mlp.router.bias, q.mlp.router.bias)


def test_bf16_autocast_training_step():
    model = mixtral_with_our_moe(capacity_factor=1.25)
    ids = torch.randint(0, VOCAB, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. our checkpointing warning
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
    (out.loss + mr.aux_loss(model)).backward()
    for layer in model.model.layers:
        assert layer.mlp.stats["z_loss"].dtype == torch.float32
        assert torch.isfinite(layer.mlp.router.weight.grad).all()
        assert layer.mlp.router.weight.grad.abs().sum() > 0
