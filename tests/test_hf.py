"""moe_routing.hf against Hugging Face's own MoE blocks on identical inputs:
tiny random models built from configs (no download), float32, Hugging Face's
default experts implementation (grouped_mm, which has no float64)."""
import copy
import functools
import operator
import warnings

import pytest
import torch

import moe_routing as mr
import moe_routing.hf as mrhf

transformers = pytest.importorskip("transformers")  # installed by `make test`

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
           v_head_dim=8, **{**COMMON, "num_key_value_heads": 4})  # latent attention: no grouped KV
GROUPED = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
               num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
               first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True)
LINEAR_ATTENTION = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])

# family: (config class, model class, its MoE options); two layers, both MoE.
CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=24, intermediate_size=48, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, **COMMON)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=3, **COMMON)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=24, intermediate_size=48,
                       shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=False, **COMMON)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**GROUPED, **MLA)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(**{**GROUPED, "num_experts_per_tok": 3, "routed_scaling_factor": 1.5},
                         topk_method="group_limited_greedy", **MLA)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4,
                    num_experts_per_tok=1, head_dim=8, attention_chunk_size=64,
                    no_rope_layers=[1, 1], moe_layers=[0, 1], **COMMON)),
    # DeepSeek-V3's router: sigmoid scores, selection bias, groups.
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(**GROUPED, head_dim=8, **COMMON)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      dict(**GROUPED, mlp_layer_types=["sparse", "sparse"], **MLA)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(**GROUPED, head_dim=8, **COMMON)),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(**GROUPED, **{**MLA, "q_lora_rank": 16}, index_head_dim=8,
                          index_n_heads=2, index_topk=4)),
    # Groups over softmax scores, no bias.
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM",
                 dict(**{**GROUPED, "norm_topk_prob": False}, **MLA)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=48, moe_intermediate_size=24,
                        shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                        norm_topk_prob=False, head_dim=8, **LINEAR_ATTENTION, **COMMON)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_experts=6,
                         num_experts_per_tok=2, head_dim=8, **LINEAR_ATTENTION, **COMMON)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, **COMMON)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                        head_dim=8, bos_token_id=1, eos_token_id=2, **COMMON)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                          moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0, **COMMON)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(intermediate_size=48, num_experts=8, moe_topk=2, head_dim=8,
                            pad_token_id=0, eos_token_id=2, **COMMON)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                       pad_token_id=0, eos_token_id=2, **COMMON)),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                   expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1,
                   attn_layer_offset=0, use_mamba_kernels=False, **COMMON)),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, num_dense_layers=0, use_expert_bias=True,
                      norm_topk_prob=True, routed_scaling_factor=1.5,
                      layer_types=["conv", "full_attention"], **COMMON)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                        **COMMON)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(intermediate_size=24, shared_intermediate_size=40,
                              num_local_experts=4, num_experts_per_tok=2, **COMMON)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                         num_shared_experts=1, shared_expert_combination_strategy="sum",
                         mlp_layer_types=["sparse", "sparse"], pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, head_dim=8, **COMMON)),
    "cohere2_moe_sigmoid": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                            dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                 expert_selection_fn="sigmoid", norm_topk_prob=False,
                                 mlp_layer_types=["sparse", "sparse"], pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, head_dim=8, **COMMON)),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(**GROUPED, **MLA, mlp_layer_types=["sparse", "sparse"],
                         layer_types=["linear_attention", "full_attention"], linear_head_dim=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         linear_num_heads=4)),
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM",
                       dict(**GROUPED, **MLA, mlp_layer_types=["sparse", "sparse"],
                            layer_types=["linear_attention", "full_attention"],
                            layer_group_size=2, num_mtp_layers=0, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
                      dict(**{**GROUPED, "n_shared_experts": 0},
                           mlp_layer_types=["sparse", "sparse"], head_dim=8,
                           layer_types=["full_attention", "full_attention"], **COMMON)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(**GROUPED, **{**MLA, "q_lora_rank": 16}, index_head_dim=8,
                         index_n_heads=2, index_topk=4, mlp_layer_types=["sparse", "sparse"])),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM",
              dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                   num_experts_per_tok=2, num_shared_experts=1, router_scaling_factor=2.5,
                   mlp_layer_types=["sparse", "sparse"], head_dim=8, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, **COMMON)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                   num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=0,
                   route_scale=1.7, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   **COMMON)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(intermediate_size=24, shared_intermediate_size=40,
                              num_local_experts=4, num_experts_per_tok=2,
                              layer_types=["mamba", "attention"], mamba_n_heads=4,
                              mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                              mamba_chunk_size=8, **COMMON)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                        num_experts_per_tok=2, n_group=4, topk_group=2, num_shared_experts=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True,
                        mlp_layer_types=["sparse", "sparse"],
                        layer_types=["full_attention", "full_attention"], pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, **COMMON)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   dict(**{k: v for k, v in GROUPED.items()
                           if k not in ("intermediate_size", "first_k_dense_replace")},
                        head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    # DeepSeek-V3's router; experts whose SwiGLU clamps (gate before the
    # SiLU, and up) at swiglu_limit, low enough here that it acts; the shared
    # MLP does not clamp.
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM",
              dict(**GROUPED, mlp_layer_types=["sparse", "sparse"], index_topk=4, index_head_dim=8,
                   index_n_heads=2, hc_mult=2, swiglu_limit=2.0, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, **{**MLA, "q_lora_rank": 16})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    # An encoder (token classification, no generate()): GPT-OSS's experts,
    # their gate and up columns concatenated; num_labels so labels=ids fit.
    "openai_privacy_filter": ("OpenAIPrivacyFilterConfig",
                              "OpenAIPrivacyFilterForTokenClassification",
                              dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=8, sliding_window=4, num_labels=64,
                                   rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                   pad_token_id=0, eos_token_id=2, **COMMON)),
    "aria": ("AriaTextConfig", "AriaTextForCausalLM",
             dict(intermediate_size=16, moe_num_experts=6, moe_topk=2, moe_num_shared_experts=2,
                  head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(intermediate_size=24, shared_intermediate_size=40, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=4, **COMMON)),
    "mellum": ("MellumConfig", "MellumForCausalLM",
               dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                    num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, sliding_window=4,
                    mlp_layer_types=["sparse", "sparse"], pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, **COMMON)),
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2, norm_topk_prob=False, head_dim=8, sliding_window=4,
                       **{k: v for k, v in LINEAR_ATTENTION.items() if k != "layer_types"},
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    "qwen4_exp": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2, norm_topk_prob=False, head_dim=8, hc_count=2,
                       hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                       indexer_budget=4, indexer_compress_ratio=2, **LINEAR_ATTENTION,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    "flint": ("FlintConfig", "FlintForCausalLM",
              dict(intermediate_size=48, moe_intermediate_size=16,
                   shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                   norm_topk_prob=False, mlp_only_layers=[], head_dim=8, sliding_window=4,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    # DeepSeek-V3's router, the scaling factor on the block, no shared expert.
    "beam": ("BeamConfig", "BeamForCausalLM",
             dict(**{k: v for k, v in GROUPED.items() if k not in ("n_routed_experts",
                                                                   "n_shared_experts",
                                                                   "first_k_dense_replace")},
                  num_experts=8, mlp_layer_types=["sparse", "sparse"], head_dim=8,
                  sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **COMMON)),
    "dots3_note": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM",
                   dict(**{k: v for k, v in GROUPED.items() if k != "first_k_dense_replace"},
                        mlp_layer_types=["sparse", "sparse"], index_topk=4, index_head_dim=8,
                        index_n_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        **{**MLA, "q_lora_rank": 16})),
    # A.X-K2-Light: no expert groups.
    "axk2": ("AXK2Config", "AXK2ForCausalLM",
             dict(**{k: v for k, v in GROUPED.items() if k not in ("n_group", "topk_group",
                                                                   "first_k_dense_replace",
                                                                   "norm_topk_prob")},
                  norm_topk_prob=False, mlp_layer_types=["sparse", "sparse"], index_topk=4,
                  index_head_dim=8, index_n_heads=2, head_dim=8, gated_norm_rank=4,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **{**MLA, "q_lora_rank": 16})),
    # DBRX (5.24): its attention reads a rope_theta its config lacks, and
    # clamps q, k, v with clip_qkv, which must be set.
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64,
                  attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                  ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
FAMILIES = list(CONFIGS)

# Where a family's block keeps its router weight and its selection bias, as
# transformers' code has them (default: gate.weight, no bias).
ROUTER_WEIGHT = {"llama4": "router.weight", "jamba": "router.weight",
                 "granitemoe": "router.weight", "granitemoeshared": "router.weight",
                 "granitemoehybrid": "router.weight", "granitemoe_swa": "router.weight",
                 "hunyuan_v1_moe": "gate.wg.weight", "afmoe": "router.gate.weight",
                 "gpt_oss": "router.weight", "openai_privacy_filter": "router.weight",
                 "aria": "router.weight", "dbrx": "router.layer.weight"}
SELECTION_BIAS = {**{family: "gate.e_score_correction_bias" for family in (
                     "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "deepseek_v32",
                     "kimi_linear", "bailing_hybrid", "mimo_v2_flash", "glm_moe_dsa",
                     "exaone_moe", "solar_open", "glm4v_moe", "glm5_next", "beam", "dots3_note",
                     "axk2", "step3p7", "step3p7_clamped", "step3p7_clamped_shared", "hy_v4",
                     "hy_v4_vl")},
                  "ernie4_5_moe": "gate.moe_statics.e_score_correction_bias",
                  "minimax_m2": "e_score_correction_bias", "hy_v3": "e_score_correction_bias",
                  "dots3_note_vision": "e_score_correction_bias",
                  "lfm2_moe": "expert_bias", "afmoe": "expert_bias"}
# Parameters Hugging Face initialises to zeros or too small to matter, made
# random: (path, std). GPT-OSS and the privacy filter: the router's and
# experts' biases, and expert weights large enough that the SwiGLU's clamps
# at +-limit (7) act. HY-V4: expert and shared weights large enough that the
# experts' clamps at +-2 act (and would act on the shared MLP, if it clamped).
OAI_RANDOMISED = [("router.bias", 0.5), ("experts.gate_up_proj", 1.5),
                  ("experts.gate_up_proj_bias", 1.0), ("experts.down_proj_bias", 0.5)]
HY_V4_RANDOMISED = [("experts.gate_up_proj", 0.5), ("shared_experts.gate_proj.weight", 0.5),
                    ("shared_experts.up_proj.weight", 0.5)]
RANDOMISED = {"gpt_oss": OAI_RANDOMISED, "openai_privacy_filter": OAI_RANDOMISED,
              "hy_v4": HY_V4_RANDOMISED, "hy_v4_vl": HY_V4_RANDOMISED}
# Expert weights stored [E, H, 2F] / [E, F, H] (this layer's layout) rather
# than nn.Linear's [E, 2F, H] / [E, H, F].
TRANSPOSED = {"llama4", "aria", "openai_privacy_filter", "gpt_oss"}


def deinterleaved(gate_up):
    """GPT-OSS's gate_up_proj (or its bias, or a gradient of either) with the
    gate columns (even) first, then the up columns (odd): this layer's w_in."""
    return torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1)


def router_weight(family, block):
    return operator.attrgetter(ROUTER_WEIGHT.get(family, "gate.weight"))(block)


def expert_weights(family, block):
    """The block's expert weights, as transformers' code names them."""
    if family == "dbrx":  # gate, up and down, each [E*F, H]
        return [block.experts.mlp.w1, block.experts.mlp.v1, block.experts.mlp.w2]
    return [block.experts.gate_up_proj, block.experts.down_proj]


def in_our_layout(family, block, tensors):
    """expert_weights(family, block) (or their gradients) as this layer's
    w_in [E, H, 2F] (gate columns, then up) and w_out [E, F, H]."""
    if family == "dbrx":
        E, H = router_weight(family, block).shape
        gate, up, down = (t.view(E, -1, H) for t in tensors)
        return torch.cat([gate, up], dim=1).transpose(1, 2), down
    gate_up, down = tensors
    if family not in TRANSPOSED:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return (deinterleaved(gate_up) if family == "gpt_oss" else gate_up), down


def randomise(family, block):
    """Random router weights and selection bias (so that routing is not
    trivial), and the RANDOMISED parameters."""
    with torch.no_grad():
        router_weight(family, block).normal_(std=0.5)
        for weight in expert_weights(family, block):
            if weight.abs().sum() == 0:
                weight.normal_(std=0.2)  # Llama 4 initialises zeros
        if family in SELECTION_BIAS:
            operator.attrgetter(SELECTION_BIAS[family])(block).uniform_(-0.1, 0.1)
        if hasattr(block, "shared_expert_gate"):
            block.shared_expert_gate.weight.normal_(std=0.5)
        for path, std in RANDOMISED.get(family, []):
            operator.attrgetter(path)(block).normal_(std=std)


def tiny(family, **changes):
    """A float32 model of ``family`` (a causal LM, or the privacy filter's
    token classifier), its options updated with ``changes``, with random
    weights (see randomise)."""
    torch.manual_seed(0)
    config_class, model_class, options = CONFIGS[family]
    if not hasattr(transformers, model_class):  # a family newer than the installed version
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    config = getattr(transformers, config_class)(**{**options, **changes})
    model = getattr(transformers, model_class)(config).eval()
    for block in blocks(model):
        try:
            expert_weights(family, block)
        except AttributeError:  # e.g. Aria's experts in transformers 5.17: refused by name
            with pytest.raises(ValueError, match="of this transformers version lacks one of"):
                mrhf.from_hf(block)
            pytest.skip(f"transformers {transformers.__version__} lays out "
                        f"{type(block).__name__}'s experts otherwise")
        randomise(family, block)
    return model


# Step-3.7's expert count is n_routed_experts (num_local_experts does not set it).
STEP3P7 = dict(moe_intermediate_size=16, share_expert_dim=24, n_routed_experts=6,
               num_experts_per_tok=2, moe_router_scaling_factor=1.5)
# MoE blocks of multimodal models (text ones unless named), built alone from
# their configs: family: (transformers module, block class, config class, options).
TEXT_BLOCKS = {
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextConfig",
                     dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2)),
    "qwen3_omni_moe": ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock",
                       "Qwen3OmniMoeTextConfig",
                       dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                            norm_topk_prob=False)),
    "qwen3_omni_moe_talker": ("qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock",
                              "Qwen3OmniMoeTalkerTextConfig",
                              dict(moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                   num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)),
    "glm4v_moe": ("glm4v_moe", "Glm4vMoeTextMoE", "Glm4vMoeTextConfig", GROUPED),
    "glm5_next": ("glm5_next", "Glm5NextTextMoE", "Glm5NextTextConfig",
                  {**GROUPED, "norm_topk_prob": False}),
    "mistral_large4": ("mistral_large4", "MistralLarge4TextMoE", "MistralLarge4TextConfig",
                       {k: v for k, v in GROUPED.items() if k != "norm_topk_prob"}),
    # DeepSeek-V2's router (softmax, group_limited_greedy) in two OCR models
    **{family: (family, block_class, config_class,
                dict(**{k: v for k, v in GROUPED.items() if k != "norm_topk_prob"},
                     num_experts=8, topk_method="group_limited_greedy",
                     num_attention_heads=4))
       for family, block_class, config_class in (
           ("deepseek_ocr2", "DeepseekOcr2TextMoe", "DeepseekOcr2TextConfig"),
           ("unlimited_ocr", "UnlimitedOcrTextMoe", "UnlimitedOcrTextConfig"))},
    "step3p7": ("step3p7", "Step3p7SparseMoeBlock", "Step3p7TextConfig", STEP3P7),
    # Step-3.7's clamped SwiGLU (the SiLU's output, and up) at limits low
    # enough that it acts: the experts' and the shared expert's at different
    # limits, and the shared expert's alone.
    "step3p7_clamped": ("step3p7", "Step3p7SparseMoeBlock", "Step3p7TextConfig",
                        dict(STEP3P7, swiglu_limits=[0.5], swiglu_limits_shared=[0.8])),
    "step3p7_clamped_shared": ("step3p7", "Step3p7SparseMoeBlock", "Step3p7TextConfig",
                               dict(STEP3P7, swiglu_limits_shared=[0.8])),
    "hy_v4_vl": ("hy_v4_vl", "HYV4VLMoE", "HYV4VLTextConfig", dict(GROUPED, swiglu_limit=2.0)),
    "dots3_note_vision": ("dots3_note", "Dots3NoteVisionMoE", "Dots3NoteVisionConfig",
                          dict(adapter_in_dim=32, num_attention_heads=4, num_hidden_layers=1,
                               moe_intermediate_size=16, pyramid_num_routed=[6],
                               num_experts_per_tok=2, router_scaling_factor=1.5)),
}


def text_block(family, **changes):
    """The family's MoE block with random weights (float32), its options
    updated with ``changes``."""
    import importlib
    import inspect
    module_name, block_class, config_class, options = TEXT_BLOCKS[family]
    try:
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_"
                                         f"{module_name}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {module_name}")
    config = getattr(module, config_class, None) or getattr(transformers, config_class)
    config = config(hidden_size=32, **{**options, **changes})
    torch.manual_seed(0)
    block_class = getattr(module, block_class)
    # Step-3.7's and dots3's blocks are made per layer.
    layer = (0,) if "layer_idx" in inspect.signature(block_class).parameters else ()
    block = block_class(config, *layer).eval()
    with torch.no_grad():  # built outside a model: nothing initialised it
        for parameter in block.parameters():
            parameter.normal_(std=0.2)
    randomise(family, block)
    return block


@pytest.mark.parametrize("family", list(TEXT_BLOCKS))
def test_from_hf_and_to_hf_on_text_blocks_of_multimodal_models(family):
    block = text_block(family)
    moe = mrhf.from_hf(block)
    x = torch.randn(3, 10, 32, requires_grad=True)
    expected, got = block(x), moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(expected)
    grads_hf = torch.autograd.grad(
        expected, [x, router_weight(family, block), *expert_weights(family, block)], g)
    grads = torch.autograd.grad(got, [x, moe.router.weight, moe.experts.w_in, moe.experts.w_out],
                                g)
    for ours, theirs in zip(grads, grads_hf[:2] + in_our_layout(family, block, grads_hf[2:])):
        # sums over 30 tokens of terms up to ~10 in another order
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    _perturb(moe)  # fine-tuned weights (and bias) back into the block
    mrhf.to_hf(moe, block)
    with torch.no_grad():
        torch.testing.assert_close(block(x), moe(x), rtol=1e-5, atol=1e-6)


def blocks(model):
    return [m for m in model.modules() if type(m).__name__ in mrhf.SUPPORTED]


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_block_equals_the_block_outputs_and_gradients(family):
    block = blocks(tiny(family))[0]
    moe = mrhf.from_hf(block)
    x = torch.randn(3, 10, 32, requires_grad=True)
    expected = block(x)
    if isinstance(expected, tuple):  # Llama 4, GPT-OSS: (hidden_states, router_logits)
        expected = expected[0].view(x.shape)
    got = moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(expected)
    grad_x_hf, grad_router_hf, *grad_experts_hf = torch.autograd.grad(
        expected, [x, router_weight(family, block), *expert_weights(family, block)], g)
    grad_x, grad_router, grad_in, grad_out = torch.autograd.grad(
        got, [x, moe.router.weight, moe.experts.w_in, moe.experts.w_out], g)
    grad_in_hf, grad_out_hf = in_our_layout(family, block, grad_experts_hf)
    for ours, theirs in [(grad_x, grad_x_hf), (grad_router, grad_router_hf),
                         (grad_in, grad_in_hf), (grad_out, grad_out_hf)]:
        # Float32 sums over the tokens in another order: an error relative to
        # the gradient's scale (GPT-OSS's larger weights give larger ones).
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * max(1.0, theirs.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_logits_gradients_and_generate(family):
    original = tiny(family)
    model = copy.deepcopy(original)
    handle = mrhf.patch(model)
    assert len(handle.blocks) == len(blocks(original)) == 2
    assert all(isinstance(new.moe, mr.MoE) for _, _, new in handle.blocks)

    ids = torch.randint(0, 64, (2, 9))
    out_hf = original(input_ids=ids, labels=ids)
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_hf.logits, rtol=1e-5, atol=1e-5)
    out_hf.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(model.get_input_embeddings().weight.grad,
                               original.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)

    # Left-padded greedy generation with a KV cache: padding is routed
    # nowhere, and the real tokens' continuations are the same.
    prompt = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0
    if original.can_generate():
        kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = original.generate(prompt, **kwargs)
        assert torch.equal(model.generate(prompt, **kwargs), expected)
    else:  # an encoder: the real tokens' logits are the same
        with torch.no_grad():
            expected = original(input_ids=prompt, attention_mask=mask).logits[mask.bool()]
            got = model(input_ids=prompt, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    handle.undo()
    assert not blocks(model) == [] and len(blocks(model)) == 2
    torch.testing.assert_close(model(input_ids=ids).logits, out_hf.logits, rtol=0, atol=0)


def patched_mixtral_and_padded_batch(padding=3):
    model = tiny("mixtral")
    handle = mrhf.patch(model)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    return model, handle, ids, mask


def test_patch_routes_padding_nowhere():
    model, handle, ids, mask = patched_mixtral_and_padded_batch()
    model(input_ids=ids, attention_mask=mask)
    moe = handle.blocks[0][2].moe
    assert int(moe.stats["load"].sum()) == 2 * int(mask.sum())  # k = 2 per valid token
    model(torch.randint(0, 64, (2, 7)))
    model(ids, mask)  # the mask by position
    assert int(moe.stats["load"].sum()) == 2 * int(mask.sum())
    model.model(input_ids=ids, attention_mask=mask)  # the base model, called alone
    assert int(moe.stats["load"].sum()) == 2 * int(mask.sum())
    model.model(input_ids=ids)  # no mask now: every token is routed, none stale
    assert int(moe.stats["load"].sum()) == 2 * ids.numel()


def _two_microbatches():
    torch.manual_seed(1)
    batches = []
    for pad in ((0, 5), (3, 0)):  # left padding per row, different in each
        ids = torch.randint(1, 64, (2, 10))
        mask = torch.ones_like(ids)
        for row, n in enumerate(pad):
            mask[row, :n] = 0
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    return batches


def _enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _accumulated_grads(checkpointing, order, **overrides):
    """checkpointing: None, "non-reentrant" (Hugging Face's default) or
    "reentrant", enabled after patch() as a user would."""
    model = tiny("qwen3_moe")
    mrhf.patch(model, **overrides)
    model.train()
    if checkpointing:
        _enable_checkpointing(model, reentrant=checkpointing == "reentrant")
    with warnings.catch_warnings():
        # Reentrant: "training-mode forward with gradients disabled" (no aux loss there).
        warnings.simplefilter("ignore", UserWarning)
        losses = [model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                  + mr.aux_loss(model) for ids, mask, labels in _two_microbatches()]
    if order == "sum":
        (losses[0] + losses[1]).backward()
    else:  # separate backwards, the later forward's first
        losses[1].backward()
        losses[0].backward()
    return [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]


@pytest.mark.parametrize("order", ["sum", "reversed"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_patch_checkpointing_reruns_each_layer_with_its_own_mask(order, capacity_factor,
                                                                 checkpointing):
    """Two micro-batches with different padding, then backward: Hugging
    Face's gradient checkpointing re-runs every layer in backward, after the
    second forward; each re-run must route with its own forward's mask, or
    the gradients differ from those without checkpointing (they did, by about
    1%, when the blocks read the latest mask; reentrant checkpointing did,
    by 3e-2, until the checkpointing function pinned the masks). Reentrant
    checkpointing's first forward has no gradients, so its auxiliary losses
    carry none (the layer warns): compared without them."""
    weights = (dict(aux_loss_weight=0.01) if checkpointing == "non-reentrant"
               else dict(aux_loss_weight=0.0, z_loss_weight=0.0))
    expected = _accumulated_grads(None, order, capacity_factor=capacity_factor, **weights)
    got = _accumulated_grads(checkpointing, order, capacity_factor=capacity_factor, **weights)
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (name, g), (_, e) in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7, msg=name)


def test_undo_restores_the_checkpointing_functions_and_copies_keep_theirs():
    model = tiny("qwen3_moe")
    handle = mrhf.patch(model)
    model.train()
    _enable_checkpointing(model, reentrant=True)  # after patch: wrapped as it is set
    layers = [m for m in model.modules() if "_gradient_checkpointing_func" in m.__dict__]
    wrappers = [m._gradient_checkpointing_func for m in layers]
    assert layers and all(type(w).__name__ == "_MaskPinningCheckpoint" for w in wrappers)
    ids = torch.randint(1, 64, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        twin = copy.deepcopy(model)  # its wrappers pin its own masks
        twin(input_ids=ids, labels=ids).loss.backward()
    twin_wrappers = [m._gradient_checkpointing_func for m in twin.modules()
                     if "_gradient_checkpointing_func" in m.__dict__]
    assert {id(w.masks) for w in twin_wrappers} == {id(twin.model.layers[0].mlp._masks)}
    handle.undo()
    assert [m._gradient_checkpointing_func for m in layers] == [w.inner for w in wrappers]
    assert not any("_set_gradient_checkpointing" in m.__dict__ for m in model.modules())
    _enable_checkpointing(model, reentrant=True)  # unpatched: Hugging Face's own again
    assert not any(type(m.__dict__.get("_gradient_checkpointing_func")).__name__
                   == "_MaskPinningCheckpoint" for m in model.modules())


def test_copying_one_patched_layer_does_not_copy_the_model():
    model = tiny("qwen3_moe")
    mrhf.patch(model)
    _enable_checkpointing(model, reentrant=False)
    layer = model.model.layers[0]
    outside = {id(m) for m in model.modules()} - {id(m) for m in layer.modules()}
    memo = {}  # deepcopy's record of every object it copied, by id
    copy.deepcopy(layer, memo)
    assert not outside & memo.keys()  # the masks held the whole model's layers


class _CheckpointedGroup(torch.nn.Module):
    """A user's (or FSDP's) non-reentrant checkpoint around several layers."""

    def __init__(self, layers):
        super().__init__()
        self.inner = torch.nn.ModuleList(layers)

    def forward(self, h, **kwargs):
        def run(h):
            for layer in self.inner:
                h = layer(h, **kwargs)
            return h
        return torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False)


class _Identity(torch.nn.Module):
    def forward(self, h, **kwargs):
        return h


def _grads_of_two_microbatches(model, compile_model=False):
    run = torch.compile(model, backend="aot_eager") if compile_model else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        losses = [run(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                  for ids, mask, labels in _two_microbatches()]
    (losses[0] + losses[1]).backward()
    return {n.replace("layers.0.inner.", "layers."): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _patched_for_masks():
    model = tiny("qwen3_moe")
    mrhf.patch(model, aux_loss_weight=0.0, z_loss_weight=0.0)
    return model.train()


def test_layer_checkpointing_inside_an_outer_checkpoint_keeps_each_runs_mask():
    """Hugging Face's (non-reentrant) layer checkpointing inside an outer
    non-reentrant checkpoint over both layers: the outer re-run calls the
    layers' checkpointing again in backward, after the second micro-batch's
    forward; the masks pinned there must be the re-run's (pinning the latest
    forward's gave gradients off by 2e-3). A reentrant layer checkpoint
    inside an outer checkpoint is not covered (README)."""
    expected = _grads_of_two_microbatches(_patched_for_masks())
    model = _patched_for_masks()
    _enable_checkpointing(model, reentrant=False)
    model.model.layers = torch.nn.ModuleList([_CheckpointedGroup(list(model.model.layers)),
                                              _Identity()])
    got = _grads_of_two_microbatches(model)
    assert got.keys() == expected.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-6, atol=1e-7, msg=name)


_SKIP_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


@pytest.mark.parametrize("skip_side_effects", [
    False, pytest.param(True, marks=pytest.mark.skipif(
        not hasattr(torch._dynamo.config, _SKIP_SIDE_EFFECTS), reason="this torch has no such setting"))],
    ids=["default", "skip_side_effects"])
@pytest.mark.parametrize("break_in_layer", [False, True], ids=["whole", "graph_break_in_layer"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_compiled_checkpointed_model_routes_each_run_with_its_mask(reentrant, skip_side_effects,
                                                                  break_in_layer):
    """torch.compile of a patched model whose checkpointing was enabled after
    patch, compiled before any eager forward. With the README's Dynamo
    setting every checkpointed layer is traced whole, reentrant too, with no
    graph break (the reentrant layers broke the graph, one break each, until
    the pinning was traced). Where Dynamo cannot trace the checkpoint (no
    setting, or a graph break inside the layer) it runs it eagerly and
    re-runs Python in backward, so the masks must be pinned there too (they
    were not: 2.7e-2 off, with reentrant checkpointing)."""
    from torch._dynamo.utils import counters
    settings = {_SKIP_SIDE_EFFECTS: True} if skip_side_effects else {}
    expected = _grads_of_two_microbatches(_patched_for_masks())
    model = _patched_for_masks()
    _enable_checkpointing(model, reentrant)
    if break_in_layer:
        for layer in model.model.layers:
            norm = layer.post_attention_layernorm
            norm.forward = functools.partial(_forward_after_a_graph_break, norm.forward)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(**settings):
        got = _grads_of_two_microbatches(model, compile_model=True)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if skip_side_effects and not break_in_layer:
        assert not counters["graph_break"], dict(counters["graph_break"])


def _forward_after_a_graph_break(forward, h):
    torch._dynamo.graph_break()
    return forward(h)


def test_patched_model_pickles_and_deep_copies_with_masks_of_its_own():
    import io
    model, handle, ids, mask = patched_mixtral_and_padded_batch(padding=4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)

    twin = copy.deepcopy(model)
    model(input_ids=ids, attention_mask=mask)
    twin(input_ids=ids)  # the copy's forward must not replace the original's mask
    original_block = handle.blocks[0][2]
    assert original_block._masks is not dict(twin.named_modules())[handle.blocks[0][0]]._masks
    assert original_block._masks.current["attention_mask"] is mask


def test_patch_refuses_hugging_faces_router_logits_loss():
    model = tiny("qwen3_moe")
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="moe_routing.hf.patch: output_router_logits=True"):
        mrhf.patch(model)
    model.config.output_router_logits = False
    mrhf.patch(model)
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match="pass aux_loss_weight"):
        model(input_ids=ids, output_router_logits=True)


def _perturb(moe):
    """Stands in for fine-tuning: every weight (and a selection bias) moves."""
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        if moe.router.fixed_bias is not None:
            moe.router.fixed_bias.add_(torch.randn_like(moe.router.fixed_bias) * 0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fine_tuned_patched_model_saves_and_undoes_into_hugging_faces_layout(family, tmp_path):
    """A patched model, trained (weights moved), saves with save_pretrained a
    checkpoint that from_pretrained of the unpatched class loads with the
    trained function, and stays patched (before, it saved this layer's
    names, which from_pretrained ignored); trained further, it goes back to
    Hugging Face's blocks with undo(copy_weights=True), with the same logits,
    which survive save_pretrained / from_pretrained too (before,
    undo() restored the weights from before patching)."""
    model = tiny(family)
    handle = mrhf.patch(model)
    ids = torch.randint(0, 64, (2, 9))
    expected = {}
    with torch.no_grad():
        for saved in ("patched", "undone"):
            for _, _, replacement in handle.blocks:
                _perturb(replacement.moe)
            expected[saved] = model(input_ids=ids).logits
            if saved == "patched":
                model.save_pretrained(tmp_path / saved)
                assert not blocks(model) and len(handle.blocks) == 2  # still patched
                torch.testing.assert_close(model(input_ids=ids).logits, expected[saved],
                                           rtol=0, atol=0)
        handle.undo(copy_weights=True)
        assert len(blocks(model)) == 2
        torch.testing.assert_close(model(input_ids=ids).logits, expected["undone"],
                                   rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path / "undone")
        for saved, logits in expected.items():
            reloaded = type(model).from_pretrained(tmp_path / saved)
            assert len(blocks(reloaded)) == 2
            torch.testing.assert_close(reloaded(input_ids=ids).logits, logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_patched_model_loads_what_its_save_pretrained_wrote(family, tmp_path):
    """load_state_dict of a patched model (Trainer's resume_from_checkpoint
    calls it, non-strict, on the file save_pretrained wrote) reads the
    blocks in their Hugging Face module names (save_original_format=False)
    and computes the saved function; Hugging Face's checkpoint format, where
    it differs (per-expert names, which only from_pretrained converts, or a
    renamed block), leaves the blocks as they were with a warning naming
    the way out (an error of a strict load), where transformers' own MoE
    models lose their experts with a missing-keys line in the log."""
    from safetensors.torch import load_file
    model = tiny(family)
    handle = mrhf.patch(model)
    for _, _, replacement in handle.blocks:
        _perturb(replacement.moe)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "module", save_original_format=False)
    model.save_pretrained(tmp_path / "checkpoint")
    resumed = tiny(family)
    mrhf.patch(resumed)
    module_layout = load_file(tmp_path / "module" / "model.safetensors")
    qualified, block = handle.blocks[0][:2]
    # Another name under the block is left for load_state_dict's report (the
    # block's own load was strict and raised).
    module_layout[f"{qualified}.extra_thing"] = torch.zeros(1)
    result = resumed.load_state_dict(module_layout, strict=False)
    assert result.unexpected_keys == [f"{qualified}.extra_thing"]
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # Part of a block is not read (with a warning, not the checkpoint-format one).
    part = {key: value for key, value in module_layout.items() if key.startswith(qualified + ".")}
    part.pop(f"{qualified}.extra_thing")
    part.pop(sorted(part)[0])
    with pytest.warns(UserWarning, match="holds only part of"):
        resumed.load_state_dict(part, strict=False)
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    if all(f"{qualified}.{key}" in saved for key in block.state_dict()):
        # This family's checkpoint format is its module layout.
        reloaded = tiny(family)
        mrhf.patch(reloaded)
        reloaded.load_state_dict(saved, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, expected,
                                       rtol=1e-5, atol=1e-5)
        return
    fresh = tiny(family)
    mrhf.patch(fresh)
    before = copy.deepcopy(fresh.state_dict())
    message = ("was not loaded .* in Hugging Face's checkpoint format .* build the model with "
               r"from_pretrained\(checkpoint\)")
    with pytest.warns(UserWarning, match=message):
        fresh.load_state_dict(saved, strict=False)
    for key, value in fresh.state_dict().items():
        if ".moe." in key:
            assert torch.equal(value, before[key]), key
    with pytest.warns(UserWarning, match=message), pytest.raises(RuntimeError, match="Missing"):
        fresh.load_state_dict(saved)


def test_save_pretrained_of_the_base_model_and_what_it_refuses(tmp_path):
    """The base model (model.model) saves Hugging Face's layout too; a learned
    balancing bias that the blocks cannot hold is refused with the model
    left patched; an explicit state_dict in this layer's layout is saved as
    given, with a warning; a deep copy (no original blocks) refuses; undo()
    takes the replacement back out."""
    model = tiny("mixtral")
    handle = mrhf.patch(model, bias_update_rate=1e-3)
    for _, _, replacement in handle.blocks:
        _perturb(replacement.moe)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
        model.model.save_pretrained(tmp_path / "base")
        reloaded = transformers.MixtralModel.from_pretrained(tmp_path / "base")
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="saves the given state dict"):
        model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    with torch.no_grad():
        handle.blocks[1][2].moe.router.bias.fill_(0.1)
    with pytest.raises(ValueError, match="learned a balancing bias"):
        model.save_pretrained(tmp_path / "refused")
    assert not blocks(model) and len(handle.blocks) == 2
    with pytest.raises(ValueError, match="save_pretrained of a copy of a patched model"):
        copy.deepcopy(model).save_pretrained(tmp_path / "copy")
    handle.undo()
    assert "save_pretrained" not in model.__dict__ and "save_pretrained" not in model.model.__dict__


def test_save_pretrained_and_undo_find_blocks_in_layers_wrapped_after_patch(tmp_path):
    """Activation checkpointing's wrapper put around each layer after patch
    (accelerate and FSDP users do) hides the blocks from their qualified
    names: save_pretrained saved both layouts into one file and left a stray
    block in the model, and undo() restored nothing. The handle finds each
    block by the module holding it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)
    model = tiny("qwen3_moe")
    handle = mrhf.patch(model)
    for _, _, replacement in handle.blocks:
        _perturb(replacement.moe)
    apply_activation_checkpointing(
        model, check_fn=lambda m: type(m).__name__ == "Qwen3MoeDecoderLayer")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        reloaded = type(model).from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert any(".moe." in key for key in model.state_dict())  # still patched
        handle.undo(copy_weights=True)
        assert len(blocks(model)) == 2 and not any(".moe." in key for key in model.state_dict())
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_undo_follows_the_models_moves_since_patch():
    """The original blocks are outside a patched model, so model.bfloat16()
    does not reach them; undo() casts them as the model was cast (before,
    the model came back with float32 blocks in a bfloat16 model)."""
    model, untouched = tiny("qwen3_moe"), tiny("qwen3_moe")
    handle = mrhf.patch(model)
    model.to(torch.bfloat16)
    handle.undo()
    untouched.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    for block in blocks(model):
        assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, untouched(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_a_refused_undo_with_copy_weights_writes_nothing():
    """undo(copy_weights=True) checks every block before writing any: when
    the second layer learned a balancing bias its block cannot hold, the
    first layer's block keeps its weights and the model stays patched."""
    model = tiny("mixtral")
    original = copy.deepcopy(model)
    handle = mrhf.patch(model, bias_update_rate=1e-3)
    for _, _, replacement in handle.blocks:
        _perturb(replacement.moe)
    with torch.no_grad():
        handle.blocks[1][2].moe.router.bias.fill_(0.1)
    with pytest.raises(ValueError, match="learned a balancing bias"):
        handle.undo(copy_weights=True)
    assert len(handle.blocks) == 2 and not blocks(model)  # still patched
    for (_, block, _), untouched in zip(handle.blocks, blocks(original)):
        for a, b in zip(block.parameters(), untouched.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["deepseek_v3", "ernie4_5_moe", "afmoe", "lfm2_moe"])
def test_undo_writes_a_learned_balancing_bias_into_the_selection_bias(family):
    """Fine-tuning with bias_update_rate learns a balancing bias on top of the
    checkpoint's; undo(copy_weights=True) writes their sum into the block's
    selection bias, so the unpatched model routes as the patched one."""
    model = tiny(family)
    handle = mrhf.patch(model, bias_update_rate=1e-3)
    for _, _, replacement in handle.blocks:
        with torch.no_grad():
            replacement.moe.router.bias.uniform_(-0.2, 0.2)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        handle.undo(copy_weights=True)
        assert not torch.allclose(model(input_ids=ids).logits, tiny(family)(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_to_hf_switch_and_its_errors():
    model = tiny_switch(expert_capacity=64)
    handle = mrhf.patch(model)
    for _, _, replacement in handle.blocks:
        _perturb(replacement.moe)
    ids, labels = torch.randint(1, 64, (2, 9)), torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).logits
    (_, block, replacement), (_, other_block, _) = handle.blocks
    handle.undo(copy_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, expected,
                                   rtol=1e-5, atol=1e-5)

    wrong = tiny("mixtral").model.layers[0].mlp
    before = wrong.gate.weight.clone()
    with pytest.raises(ValueError, match=r"moe_routing.hf.to_hf: experts.w_in of the MoE is "
                                         r"\(4, 16, 32\) in MixtralSparseMoeBlock's layout, "
                                         r"which needs \(4, 96, 32\)"):
        mrhf.to_hf(mr.MoE(32, 16, 4, 2), wrong)
    assert torch.equal(wrong.gate.weight, before)  # nothing written
    biased = mrhf.from_hf(wrong, bias_update_rate=1e-3)
    mrhf.to_hf(biased, wrong)  # a zero bias fits any block
    biased.router.bias.fill_(0.5)
    with pytest.raises(ValueError, match="learned a balancing bias, which MixtralSparseMoeBlock "
                                         "cannot hold"):
        mrhf.to_hf(biased, wrong)
    with pytest.raises(ValueError, match="moe_routing.hf.to_hf: unsupported block Linear"):
        mrhf.to_hf(biased, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["gpt_oss", "openai_privacy_filter"])
def test_gpt_oss_biases_and_its_alpha_and_limit_are_carried_over(family):
    """GPT-OSS's (and the privacy filter's) router bias and expert biases
    (gradients too, in the block's layout: GPT-OSS's interleaved, the
    filter's concatenated), a non-default alpha and limit, and the clamps at
    work."""
    block = blocks(tiny(family))[0]
    name = type(block).__name__
    block.experts.alpha, block.experts.limit = 1.25, 3.0
    moe = mrhf.from_hf(block)
    assert (moe.experts.alpha, moe.experts.limit) == (1.25, 3.0)
    x = torch.randn(3, 10, 32, requires_grad=True)
    ours_layout = deinterleaved if family == "gpt_oss" else (lambda t: t)
    gate, up = ours_layout(x.detach().reshape(-1, 32) @ block.experts.gate_up_proj
                           + block.experts.gate_up_proj_bias[:, None]).chunk(2, dim=-1)
    assert (gate > 3).any() and (up.abs() > 3).any()
    expected, got = block(x)[0], moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(expected)
    theirs = torch.autograd.grad(expected, [block.router.bias, block.experts.gate_up_proj_bias,
                                            block.experts.down_proj_bias], g)
    ours = torch.autograd.grad(got, [moe.router.logit_bias, moe.experts.b_in, moe.experts.b_out], g)
    for a, b in zip(ours, (theirs[0], ours_layout(theirs[1]), theirs[2])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))
    # Trained with drops, the same weights: a capacity layer on the same experts.
    dropping = mrhf.from_hf(block, capacity_factor=0.5)
    dropping(x)
    assert dropping.stats["dropped_fraction"] > 0
    # A MoE whose experts are not the block's is refused, and writes nothing.
    before = block.router.bias.clone()
    unbiased_router = mr.MoE(32, 24, 4, 2, activation="swiglu_oai", expert_bias=True)
    unbiased_router.experts.alpha, unbiased_router.experts.limit = 1.25, 3.0
    with pytest.raises(ValueError, match="to_hf: the MoE has no router.logit_bias, which "
                                         f"{name} holds"):
        mrhf.to_hf(unbiased_router, block)
    with pytest.raises(ValueError, match=f"the MoE's experts are not {name}'s"):
        mrhf.to_hf(mr.MoE(32, 24, 4, 2, activation="swiglu", expert_bias=True, logit_bias=True),
                   block)
    assert torch.equal(block.router.bias, before)


def _hf_clamped_swiglu(family):
    """(routed experts' limit, shared expert's limit, clamps after the SiLU)
    of a family as its block's constructor reads them from the config
    (swiglu_limit; Step-3.7's swiglu_limits and swiglu_limits_shared: 0 or
    absent means no clamp, written here as None)."""
    options = CONFIGS[family][2] if family in CONFIGS else TEXT_BLOCKS[family][3]
    if family.startswith("step3p7"):
        return (options.get("swiglu_limits", [None])[0],
                options.get("swiglu_limits_shared", [None])[0], True)
    return options["swiglu_limit"], None, False


CLAMPED_SWIGLU_FAMILIES = ["hy_v4", "hy_v4_vl", "step3p7_clamped", "step3p7_clamped_shared"]


@pytest.mark.parametrize("family", CLAMPED_SWIGLU_FAMILIES)
def test_clamped_swiglu_families_clamp_like_their_blocks(family):
    """HY-V4 (the gate clamped before the SiLU; the shared MLP unclamped) and
    Step-3.7 (the SiLU's output clamped; the experts and the shared expert at
    their own limits): the clamps act on a visible fraction of the inputs
    (or would, where the block does not clamp; the comparisons of outputs
    and gradients with the blocks are in the tests over FAMILIES and
    TEXT_BLOCKS), the activation equals the block's own bit for bit in
    bfloat16, and from_hf and to_hf refuse another clamp."""
    block = text_block(family) if family in TEXT_BLOCKS else blocks(tiny(family))[0]
    name = type(block).__name__
    limit, shared_limit, after_silu = _hf_clamped_swiglu(family)
    moe = mrhf.from_hf(block)
    x = torch.randn(30, 32)
    with torch.no_grad():
        gate, up = (x @ block.experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        shared = block.shared_experts
        # An unclamped one (None) exceeds the other's limit: a clamp there would act.
        for clamp, g, u in [(limit or shared_limit, gate, up),
                            (shared_limit or limit, shared.gate_proj(x), shared.up_proj(x))]:
            clamped_gate = torch.nn.functional.silu(g) if after_silu else g
            assert (clamped_gate > clamp).float().mean() > 0.05
            assert (u > clamp).float().mean() > 0.05 and (u < -clamp).float().mean() > 0.05
    # Bit for bit in bfloat16: the same operations in the same order.
    if limit is not None:
        h = (torch.randn(64, 32) * 2).bfloat16()
        assert torch.equal(moe.experts._activate(h), block.experts._apply_gate(h))
    # The same weights under another clamp compute another function.
    changed = dict(swiglu_limit=3.0) if limit is not None else dict(shared_swiglu_limit=3.0)
    key, value = next(iter(changed.items()))
    with pytest.raises(ValueError, match=f"{key}={value} contradicts {name}"):
        mrhf.from_hf(block, **changed)
    with pytest.raises(ValueError, match=f"shared_activation='swiglu_oai' contradicts {name}"):
        mrhf.from_hf(block, shared_activation="swiglu_oai")
    other = mrhf.from_hf(block)
    (other.shared_expert if limit is None else other.experts).limit = 3.0
    before = [p.clone() for p in block.parameters()]
    label = "experts" if limit is not None else "shared_expert"
    with pytest.raises(ValueError, match=f"to_hf: the MoE's experts are not {name}'s: its "
                                         f"{label} has .*limit=3.0"):
        mrhf.to_hf(other, block)
    assert all(torch.equal(a, b) for a, b in zip(block.parameters(), before))  # nothing written


def test_patch_step3p7_model_with_clamped_layers():
    """A Step-3.7 model whose first layer clamps its experts and second its
    shared expert: patched, the real tokens' hidden states (left padding) and
    the input gradients are the same; undo() restores the blocks, and
    undo(copy_weights=True) keeps a fine-tuned function."""
    modeling_step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
    config = transformers.Step3p7TextConfig(
        **{**COMMON, **STEP3P7}, head_dim=8, sliding_window=4,
        mlp_layer_types=["sparse", "sparse"], swiglu_limits=[0.5, 0.0],
        swiglu_limits_shared=[0.0, 0.8])
    torch.manual_seed(0)
    original = modeling_step3p7.Step3p7TextModel(config).eval()
    for block in blocks(original):
        with torch.no_grad():
            for weight in (block.experts.gate_up_proj, block.shared_experts.gate_proj.weight,
                           block.shared_experts.up_proj.weight):
                weight.normal_(std=0.5)  # pre-activations well past the limits
        randomise("step3p7", block)
    model = copy.deepcopy(original)
    handle = mrhf.patch(model)
    assert [(r.moe.experts.activation, r.moe.shared_expert.activation)
            for _, _, r in handle.blocks] == [("swiglu_clamped_silu", "swiglu"),
                                              ("swiglu", "swiglu_clamped_silu")]
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # A random projection: a sum of squares of normalised states is nearly
    # constant, its gradient mostly rounding.
    projection = torch.randn_like(expected[real])
    (expected[real] * projection).sum().backward()
    (got[real] * projection).sum().backward()
    theirs = original.get_input_embeddings().weight.grad
    torch.testing.assert_close(model.get_input_embeddings().weight.grad, theirs, rtol=1e-5,
                               atol=1e-6 * float(theirs.abs().max()))
    handle.undo()
    assert blocks(model) == [model.layers[0].mlp, model.layers[1].mlp]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state,
                                   original(input_ids=ids).last_hidden_state, rtol=0, atol=0)
        handle = mrhf.patch(model)
        for _, _, replacement in handle.blocks:
            _perturb(replacement.moe)
        tuned = model(input_ids=ids).last_hidden_state
        handle.undo(copy_weights=True)
        assert not torch.allclose(model(input_ids=ids).last_hidden_state,
                                  original(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, tuned,
                                   rtol=1e-5, atol=1e-5)


def test_to_hf_refuses_biases_a_block_cannot_hold():
    block = tiny("mixtral").model.layers[0].mlp
    for options, what in [(dict(expert_bias=True), "experts.b_in"),
                          (dict(logit_bias=True), "router.logit_bias")]:
        moe = mrhf.from_hf(block, **options)
        mrhf.to_hf(moe, block)  # zero biases: nothing lost
        with torch.no_grad():
            (moe.experts.b_in if what == "experts.b_in" else moe.router.logit_bias).fill_(0.1)
        with pytest.raises(ValueError, match=f"to_hf: the MoE has a non-zero {what}, which "
                                             "MixtralSparseMoeBlock cannot hold"):
            mrhf.to_hf(moe, block)
    shared_block = tiny("qwen2_moe").model.layers[0].mlp
    moe = mrhf.from_hf(shared_block, expert_bias=True)
    with torch.no_grad():
        moe.shared_expert.b_out.fill_(0.1)  # the routed experts' biases stay zero
    with pytest.raises(ValueError, match="the MoE has a non-zero shared_expert.b_out, which "
                                         "Qwen2MoeSparseMoeBlock cannot hold"):
        mrhf.to_hf(moe, shared_block)


def test_from_hf_refuses_overrides_that_contradict_the_weights():
    """Overrides change training (capacity, losses), not what the copied
    weights compute: the wrong activation or alpha/limit, no shared expert
    for a block with one (or one added), or dropping GPT-OSS's biases."""
    gpt_oss = blocks(tiny("gpt_oss"))[0]
    qwen2 = tiny("qwen2_moe").model.layers[0].mlp
    mixtral = tiny("mixtral").model.layers[0].mlp
    for block, overrides, message in [
            (gpt_oss, dict(expert_bias=False), "expert_bias=False would drop GptOssMLP's biases"),
            (gpt_oss, dict(logit_bias=False), "logit_bias=False would drop GptOssMLP's biases"),
            (gpt_oss, dict(activation="swiglu"), "activation='swiglu' contradicts GptOssMLP, "
                                                 "whose weights need activation='swiglu_oai'"),
            (gpt_oss, dict(swiglu_limit=9.0), "swiglu_limit=9.0 contradicts GptOssMLP, whose "
                                              "weights need swiglu_limit=7.0"),
            (qwen2, dict(shared_gate=False), "shared_gate=False contradicts"),
            (mixtral, dict(shared_hidden=8), "shared_hidden=8 contradicts MixtralSparseMoeBlock, "
                                             "whose weights need shared_hidden=None")]:
        with pytest.raises(ValueError, match=message):
            mrhf.from_hf(block, **overrides)
    # Training options, and biases added at zero, are fine.
    moe = mrhf.from_hf(gpt_oss, capacity_factor=1.25, aux_loss_weight=0.01, swiglu_limit=7.0)
    assert moe.capacity_factor == 1.25 and moe.experts.limit == 7.0


def test_from_hf_rejects_an_unsupported_block():
    with pytest.raises(ValueError, match="moe_routing.hf.from_hf: unsupported block Linear"):
        mrhf.from_hf(torch.nn.Linear(2, 2))
    # A supported name with a layout from another transformers version.
    unknown = type("MixtralSparseMoeBlock", (torch.nn.Module,), {})()
    unknown.gate = torch.nn.Linear(32, 4, bias=False)
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock of this transformers version "
                                         "lacks one of gate.weight, top_k, experts.gate_up_proj"):
        mrhf.from_hf(unknown)


def test_from_hf_rejects_what_the_layer_cannot_express():
    """Cohere2's 'average' of routed and shared outputs, and a shared expert
    with biases (HY-V3's mlp_bias)."""
    def first_block(family, **changes):
        config_class, model_class, options = CONFIGS[family]
        config = getattr(transformers, config_class)(**{**options, **changes})
        return blocks(getattr(transformers, model_class)(config))[0]

    with pytest.raises(ValueError, match="Cohere2MoeSparseMoeBlock with "
                                         "shared_expert_combination_strategy='average'"):
        mrhf.from_hf(first_block("cohere2_moe", shared_expert_combination_strategy="average"))
    with pytest.raises(ValueError, match="HYV3MoE's shared expert is not three bias-free"):
        mrhf.from_hf(first_block("hy_v3", mlp_bias=True))
    with pytest.raises(ValueError, match=r"Ernie4_5_MoeSparseMoeBlock with moe_norm_min=0.001 "
                                         r"\(above 1e-6\) can clamp the normalising sum"):
        mrhf.from_hf(first_block("ernie4_5_moe", moe_norm_min=1e-3))
    with pytest.raises(ValueError, match="AXK2MoE with n_group=4 is not supported: its group "
                                         "mask sets excluded experts' scores to 0"):
        mrhf.from_hf(first_block("axk2", n_group=4, topk_group=2))
    ffn_config = CONFIGS["dbrx"][2]["ffn_config"]
    with pytest.raises(ValueError, match="DbrxFFN with moe_normalize_expert_weights=2.0 is not "
                                         "supported"):
        mrhf.from_hf(first_block("dbrx", ffn_config={**ffn_config,
                                                     "moe_normalize_expert_weights": 2.0}))
    # HY-V4's config documents a limit at or below zero as no clamp, while
    # its experts clamp at it; Step-3.7 reads a negative limit as a clamp.
    if hasattr(transformers, CONFIGS["hy_v4"][0]):  # newer than transformers 5.17
        with pytest.raises(ValueError, match="HYV4MoE with swiglu_limit=0.0 is not supported"):
            mrhf.from_hf(first_block("hy_v4", swiglu_limit=0.0))
    for clamp, what in [(dict(swiglu_limits=[-1.0]), "experts' SwiGLU at -1.0"),
                        (dict(swiglu_limits_shared=[-2.0]), "shared expert's SwiGLU at -2.0")]:
        with pytest.raises(ValueError, match=f"Step3p7SparseMoeBlock clamps its {what}; only a "
                                             "positive limit"):
            mrhf.from_hf(text_block("step3p7", **clamp))
    # A block laid out otherwise (here without its selection bias, one of
    # DBRX's expert weights or its router): a named error from both directions.
    block = first_block("deepseek_v3")
    del block.gate.e_score_correction_bias
    with pytest.raises(ValueError, match="from_hf: DeepseekV3MoE of this transformers version "
                                         "lacks one of gate.weight, top_k, experts.gate_up_proj, "
                                         "experts.down_proj, gate.e_score_correction_bias"):
        mrhf.from_hf(block)
    block = first_block("dbrx")
    del block.experts.mlp.v1
    with pytest.raises(ValueError, match="from_hf: DbrxFFN of this transformers version lacks "
                                         "one of router.layer.weight, top_k, experts.mlp.w1, "
                                         "experts.mlp.v1, experts.mlp.w2"):
        mrhf.from_hf(block)
    block = first_block("mixtral")
    moe = mrhf.from_hf(block)
    del block.gate
    with pytest.raises(ValueError, match="to_hf: MixtralSparseMoeBlock of this transformers "
                                         "version lacks one of gate.weight"):
        mrhf.to_hf(moe, block)


def test_patch_refusing_one_block_leaves_the_model_as_it_was():
    """A Step-3.7 model whose second layer has a SwiGLU limit from_hf refuses
    (a negative one): patch refuses the model without swapping the first
    layer's block."""
    modeling_step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
    config = transformers.Step3p7TextConfig(
        **{**COMMON, **STEP3P7}, head_dim=8, sliding_window=4,
        mlp_layer_types=["sparse", "sparse"], swiglu_limits=[7.0, -1.0])
    model = modeling_step3p7.Step3p7TextModel(config).eval()
    before = list(model.modules())
    with pytest.raises(ValueError, match="Step3p7SparseMoeBlock clamps its experts' SwiGLU at "
                                         "-1.0"):
        mrhf.patch(model)
    assert list(model.modules()) == before
    mrhf.from_hf(model.layers[0].mlp)  # the other layer converts


# Each family's normalisation option the other way from CONFIGS / TEXT_BLOCKS.
NORMALISATION_FLIPPED = {
    **{family: dict(norm_topk_prob=True) for family in (
        "lara_mini", "qwen4_exp", "flint", "axk2", "qwen3_omni_moe_talker")},
    **{family: dict(norm_topk_prob=False) for family in ("mellum", "beam", "dots3_note")},
    "dbrx": dict(ffn_config={**CONFIGS["dbrx"][2]["ffn_config"],
                             "moe_normalize_expert_weights": None}),
}


@pytest.mark.parametrize("family", list(NORMALISATION_FLIPPED))
def test_from_hf_follows_the_normalisation_option_both_ways(family):
    changes = NORMALISATION_FLIPPED[family]
    block = text_block(family, **changes) if family in TEXT_BLOCKS else \
        blocks(tiny(family, **changes))[0]
    moe = mrhf.from_hf(block)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF's empty MLP
@pytest.mark.parametrize("family, zero", [("glm4_moe", "n_shared_experts"),
                                          ("afmoe", "num_shared_experts"),
                                          ("qwen2_moe", "shared_expert_intermediate_size")])
def test_zero_shared_experts_are_no_shared_expert(family, zero):
    """No shared expert gives Hugging Face a zero-width shared MLP (it used
    to raise ZeroDivisionError in from_hf; Qwen2-MoE's gate then scales
    nothing)."""
    config_class, model_class, options = CONFIGS[family]
    zero = {zero: 0}
    config = getattr(transformers, config_class)(**{**options, **zero})
    block = blocks(getattr(transformers, model_class)(config))[0]
    with torch.no_grad():
        router_weight(family, block).normal_(std=0.5)
    moe = mrhf.from_hf(block)
    assert moe.shared_expert is None and moe.shared_gate is None
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(moe(x), block(x), rtol=1e-5, atol=1e-6)
    mrhf.to_hf(moe, block)  # the same block: accepted


def test_from_hf_rejects_experts_that_are_not_silu_gated():
    config_class, model_class, options = CONFIGS["mixtral"]
    config = getattr(transformers, config_class)(**{**options, "hidden_act": "gelu"})
    block = blocks(getattr(transformers, model_class)(config))[0]
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock.experts uses GELUActivation; "
                                         "only SiLU-gated"):
        mrhf.from_hf(block)


@pytest.mark.parametrize("masked", [False, True])
def test_mixtral_loss_helper_equals_transformers(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    B, S, E_, k = 3, 7, 6, 2
    layers = tuple(torch.randn(B * S, E_) for _ in range(3))
    mask = (torch.rand(B, S) > 0.3).long() if masked else None
    expected = load_balancing_loss_func(layers, E_, k, mask)
    torch.testing.assert_close(mrhf.mixtral_load_balancing_loss(layers, k, mask), expected)
    # Pooling is not the mean of per-layer losses (what summing each
    # layer's aux_loss gives): the helper exists for that reason.
    per_layer = sum(mrhf.mixtral_load_balancing_loss(l, k) for l in layers) / 3
    assert masked or not torch.allclose(per_layer, expected)


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_helper_equals_transformers(k):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func)
    torch.manual_seed(0)
    B, S, E_ = 3, 20, 6  # the case: plain "equal" was 1.12812 vs 1.02715
    probs = torch.softmax(torch.randn(B, S, E_), -1)
    indices = probs.topk(k, -1).indices
    expected = load_balancing_loss_func(probs, indices if k > 1 else indices[..., 0])
    torch.testing.assert_close(mrhf.switch_load_balancing_loss(probs, indices), expected)


def tiny_switch(expert_capacity=3):
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=expert_capacity, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in mrhf.SUPPORTED:
                module.router.classifier.weight.normal_(std=0.5)
    return model


def test_switch_block_with_per_row_capacity_drops():
    """Switch's sparse MLP (transformers >= 5.18 drops per batch row, in token
    order, at expert_capacity; 5.0-5.17 never drop): outputs and gradients,
    with drops happening where the installed version drops."""
    block = blocks(tiny_switch(expert_capacity=2))[0]
    moe = mrhf.from_hf(block)
    x = torch.randn(3, 12, 32, requires_grad=True)
    expected = block(x)
    got = moe(x)
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    drops = (moe.stats["kept"] < moe.stats["load"]).any()
    assert drops == (not (major == 5 and minor < 18))  # a row: 12 tokens, 4 experts x capacity 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(expected)
    hf_grads = torch.autograd.grad(expected, [x, block.router.classifier.weight,
                                              block.experts["expert_1"].wi.weight], g)
    ours = torch.autograd.grad(got, [x, moe.router.weight, moe.experts.w_in], g)
    torch.testing.assert_close(ours[0], hf_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], hf_grads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[2][1], hf_grads[2].t(), rtol=1e-5, atol=1e-6)


def test_switch_patch_encoder_decoder_logits_and_generate():
    original = tiny_switch(expert_capacity=64)
    model = copy.deepcopy(original)
    handle = mrhf.patch(model)
    assert [name for name, _, _ in handle.blocks] == ["encoder.block.1.layer.1.mlp",
                                                      "decoder.block.1.layer.2.mlp"]
    ids = torch.randint(1, 64, (2, 9))
    labels = torch.randint(1, 64, (2, 5))
    expected = original(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), original.generate(ids, **kwargs))
    handle.undo()


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_nllb_moe_top2_router_equals_route_plan_and_renormalisation(batch_prioritized):
    """NLLB-MoE's router (second_expert_policy "all", normalisation after
    dropping): its combine weights [T, E] equal route(k=2, unnormalised) +
    plan(capacity, "choice" or "batch" by raw top-1 probability) + weights
    renormalised over the surviving choices, the MoE layer's options
    priority=... and renormalize_after_drop=True."""
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
    torch.manual_seed(0)
    config = transformers.NllbMoeConfig(d_model=16, num_experts=4, expert_capacity=3,
                                        batch_prioritized_routing=batch_prioritized)
    router = NllbMoeTop2Router(config).train()
    x = torch.randn(20, 16)
    top1_mask, combine, _ = router(x)
    logits = router.classifier(x)
    weights, experts, scores = mr.route(logits, 2, normalize=False)
    priority = "batch" if batch_prioritized else "choice"
    slots = mr.plan(experts, 4, 3, weights=scores.gather(1, experts), priority=priority).slots
    kept = torch.where(slots >= 0, weights, torch.zeros_like(weights))
    kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    dense = torch.zeros(20, 4).scatter_add(1, experts, kept)
    torch.testing.assert_close(dense, combine, rtol=1e-6, atol=1e-7)
    first_kept = torch.zeros(20, 4, dtype=torch.long).scatter(
        1, experts[:, :1], (slots[:, :1] >= 0).long())
    assert torch.equal(first_kept, top1_mask)
    assert (slots < 0).any()  # capacity 3 of 40 assignments over 4 experts: drops happen
