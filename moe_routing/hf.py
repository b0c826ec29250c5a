"""Hugging Face interop: turn a transformers MoE block into a :class:`MoE`
with the same weights and routing, or swap every supported block of a loaded
model in place.

    import moe_routing.hf as mrhf
    moe = mrhf.from_hf(model.model.layers[0].mlp)   # a MoE computing the same function
    handle = mrhf.patch(model)                      # every supported block swapped
    ...
    handle.undo()                                   # the original blocks are back
    handle.undo(copy_weights=True)                  # ... with the patched model's weights
    mrhf.to_hf(moe, block)                          # one MoE's weights into its block

transformers is an optional dependency: this module imports nothing from it.
Supported blocks (transformers 5.x layout: a router with ``weight`` [E, H]
and ``top_k``, ``experts`` with ``gate_up_proj`` [E, 2F, H] and
``down_proj`` [E, H, F], SiLU gating, unless the table says otherwise; the
table ``_FAMILIES`` below says where each class keeps its router, selection
bias and expert weights):

============================  ==========================================================
block                         what is carried over
============================  ==========================================================
MixtralSparseMoeBlock,        softmax top-k, weights renormalised
MiniMaxSparseMoeBlock,        (HunYuan: router ``gate.wg``, shared MLP ``shared_mlp``)
Qwen3_5MoeSparseMoeBlock,
Qwen3VLMoeTextSparseMoeBlock,
HunYuanMoEV1Moe
GraniteMoeMoE,                softmax over the top-k logits (= renormalised softmax top-k;
GraniteMoeSharedMoE,          router ``router``; Granite's shared MLP lies outside the block)
GraniteMoeHybridMoE,
GraniteMoeSWAMoE
Cohere2MoeSparseMoeBlock      the same with ``expert_selection_fn="softmax"``; sigmoid top-k
                              and ``norm_topk_prob`` with "sigmoid"; shared experts added
                              ("sum"; "average" is refused)
AriaTextMoELayer              Granite's routing, shared experts; its experts store
                              ``gate_up_proj`` [E, H, 2F] and ``down_proj`` [E, F, H]
DbrxFFN                       softmax top-k, divided by the weights' 1-norm
                              (``moe_normalize_expert_weights=1``: renormalised) or not
                              (None; other p-norms are refused); router ``router.layer``,
                              experts ``experts.mlp``'s ``w1`` (gate), ``v1`` (up) and
                              ``w2`` (down), each [E*F, H]
Qwen3MoeSparseMoeBlock,       softmax top-k, ``norm_topk_prob``
OlmoeSparseMoeBlock,
FlexOlmoSparseMoeBlock,
MellumSparseMoeBlock,
Qwen3OmniMoeThinker-
TextSparseMoeBlock
Qwen2MoeSparseMoeBlock,       softmax top-k, ``norm_topk_prob``, sigmoid-gated shared expert
Qwen3NextSparseMoeBlock,
Qwen3OmniMoeTalker-
TextSparseMoeBlock,
Qwen4ExpTextSparseMoeBlock
LaraMiniSparseMoeBlock        softmax top-k, ``norm_topk_prob``, shared expert (no gate)
FlintSparseMoeBlock           sigmoid top-k, ``norm_topk_prob``, shared expert (no gate)
JambaSparseMoeBlock           softmax top-k, not renormalised (router ``router``)
Ernie4_5_MoeSparseMoeBlock    softmax scores, ``moe_statics.e_score_correction_bias`` as
                              ``fixed_bias`` (selection only), renormalised, shared experts
DeepseekV3MoE,                sigmoid scores, ``e_score_correction_bias`` as ``fixed_bias``,
DeepseekV32MoE, Glm4MoeMoE,   group-limited selection (``n_group``, ``topk_group``),
Glm4MoeLiteMoE, Dots1MoE,     ``norm_topk_prob``, ``routed_scaling_factor``, shared experts
GlmMoeDsaMoE, KimiLinearMoE,  (MiMo-V2-Flash and Beam have none; Beam keeps
BailingHybridMoE,             ``routed_scaling_factor`` on the block)
MiMoV2FlashMoE,
Glm4vMoeTextMoE,
Glm5NextTextMoE,
ExaoneMoeSparseMoEBlock,
SolarOpenMoE,
Dots3NoteTextMoE, BeamMoE
HYV4MoE, HYV4VLMoE            the same (one group in the released configs); experts whose
                              SwiGLU clamps the gate before the SiLU, and up, at
                              ``swiglu_limit`` (``activation="swiglu_clamped"``; no GPT-OSS
                              alpha or +1; a limit at or below 0 is refused), the shared
                              MLP unclamped (``shared_activation="swiglu"``)
AXK2MoE                       the same without groups (A.X-K2-Light; ``n_group`` is
                              refused, see below)
Mistral4MoE,                  DeepSeek-V3's groups over softmax scores, no bias,
MistralLarge4TextMoE          ``norm_topk_prob`` (Large 4: always), ``routed_scaling_factor``,
                              shared experts
DeepseekV2Moe,                softmax top-k, ``group_limited_greedy`` (groups scored by their
DeepseekOcr2TextMoe,          best expert: ``group_score="max"``), ``routed_scaling_factor``,
UnlimitedOcrTextMoe           shared experts
MiniMaxM2SparseMoeBlock,      sigmoid scores, the block's ``e_score_correction_bias`` as
HYV3MoE, Dots3NoteVisionMoE   ``fixed_bias``, renormalised; HY-V3 and dots3's vision:
                              ``router_scaling_factor``; HY-V3: shared experts (added in
                              the model's dtype, where ``enable_moe_fp32_combine`` adds in
                              float32)
Step3p7SparseMoeBlock         the same with the router's ``e_score_correction_bias``, the
                              block's ``routed_scaling_factor`` and a shared expert; where a
                              layer clamps the SiLU's output, and up (experts at
                              ``swiglu_limits``, shared expert at ``swiglu_limits_shared``),
                              ``"swiglu_clamped_silu"`` with that limit (``activation`` and
                              ``swiglu_limit``, ``shared_activation`` and
                              ``shared_swiglu_limit``)
AfmoeSparseMoeBlock           sigmoid scores, the block's ``expert_bias`` as ``fixed_bias``,
                              renormalised, ``route_scale``, shared experts (router
                              ``router.gate``)
Lfm2MoeSparseMoeBlock         sigmoid scores, the block's ``expert_bias`` (when
                              ``use_expert_bias``) as ``fixed_bias``, ``norm_topk_prob``,
                              ``routed_scaling_factor``; LFM2 adds 1e-6 to the
                              normalising sum, this layer does not (a relative
                              difference near 1e-6 in the weights)
Llama4TextMoe                 top-k of the logits, sigmoid weights applied to the expert's
                              input (``scale_inputs``), shared expert; its experts store
                              ``gate_up_proj`` [E, H, 2F] and ``down_proj`` [E, F, H]
GptOssMLP                     top-k of the logits of a router with a bias (``logit_bias``),
                              softmax over them (= renormalised softmax top-k); experts
                              with biases (``expert_bias``) and GPT-OSS's clamped SwiGLU
                              (``activation="swiglu_oai"``, the block's ``alpha`` and
                              ``limit``), ``gate_up_proj`` [E, H, 2F] with gate and up
                              columns interleaved (this layer keeps the gates first)
OpenAIPrivacyFilterMLP        the same with gate and up columns concatenated (it divides
                              the weights by k and multiplies the experts' sum by k)
SwitchTransformersSparseMLP   top-1 softmax, weight = top-1 probability, capacity
                              ``expert_capacity`` per batch row in token order
                              (``capacity_per_row``; dropless on transformers 5.0-5.17,
                              see below), ReLU/GELU experts ``wi``/``wo``, router
                              ``jitter_noise`` (on the router's copy only)
============================  ==========================================================

A shared expert must be SiLU-gated with bias-free ``gate_proj``, ``up_proj``
and ``down_proj``; anything else is refused with a ValueError naming the block.

Not supported either (their routing or experts are not this layer's):
PhiMoE (sparsemixer), Nemotron-H (non-gated experts behind latent
projections), Laguna (soft-capped router logits), MiniMax-M3-VL (a
non-SwiGLU shared MLP), LongCat-Flash (zero-computation experts),
DeepSeek-V4 (hash-routed layers), JetMoE (its own expert layout),
A.X-K1 (an RMSNorm on the block's output), Inkling (router-weighted
shared experts: their sigmoid scores join the top-k normalisation),
Inkling2 and Inkling2-Loop (a tanh-soft-capped SwiGLU),
Kolibri-1 (its selection bias is added to the logits, before the sigmoid),
MuseSpark (experts behind latent projections and norms, a norm after each
expert), ZAYA (an MLP router carrying state from layer to layer, a skip
expert), ERNIE 4.5 VL's sparse blocks (a parent block splits the tokens
between text and vision experts by modality and reads their flattened
outputs and router logits), Gemma 4 and DiffusionGemma (router and experts
inside the decoder layer, no block to swap; the router reads its own
normalised input, not the experts', and scales each expert's weight), A.X-K2
with expert groups (excluded groups' scores are set to 0, not -inf, so their
experts can still be chosen over negatively biased ones). Nor NLLB-MoE
(biased ReLU experts, and transformers 5.24's ``NllbMoeExperts``
one-hot-encodes the 0/1 top-1 mask, so only experts 0 and 1 run; its router is reproduced exactly by
``MoE(k=2, normalize=False, priority="choice" or "batch",
renormalize_after_drop=True, expert_capacity=C)``, tested against
``NllbMoeTop2Router``). Switch on transformers 5.0-5.17: its sparse MLP flattens the tokens before
the router, whose capacity count then runs over an axis of length 1 and never
drops a token (5.18 routes per batch row again, as 4.x did); :func:`from_hf`
reproduces the installed version, so there it gives a dropless layer.
Switch and NLLB-MoE padding: Hugging Face routes padding
tokens, which then take capacity; :func:`patch` routes them nowhere, so outputs
of valid tokens can differ when a row overflows.

The result is dropless (``capacity_factor=None``: Hugging Face drops nothing),
except for Switch Transformers, which keeps its per-row ``expert_capacity``
(see the table), and has ``aux_loss_weight = z_loss_weight = 0``: the model's own loss options
are left to the caller (``moe_routing.aux_loss(model)`` after setting the
weights you want; Hugging Face's Mixtral-style loss is k times ours, see the
README). The ``router_jitter_noise`` of Mixtral, MiniMax and MiniMax-M2 and
DBRX's ``moe_jitter_eps`` (0 or None by default; they scale the block's whole
input in training) are not carried over. The privacy filter runs its experts
in float32 and Beam its SwiGLU whatever the model's dtype; the converted
layer runs its experts in the model's dtype (in bfloat16 they differ by
rounding).

Selection equals Hugging Face's except at exact ties: this layer breaks them
towards the lower expert index, ``torch.topk`` as it happens (AFMoE's
zero-initialised router ties every expert, so a freshly initialised AFMoE
picks other experts). Llama 4 and Cohere2 with sigmoid selection take the
top-k of the logits; this layer takes it of their sigmoid, which saturates
at 1.0 in float32 for logits above about 17, where such experts then tie.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import ops
from .layers import MoE, _in_backward, activation_text


def _norm(router, normalize) -> bool:
    """``normalize``: True or False, or the name of the router attribute that
    says (``"norm_topk_prob"``), which must then exist."""
    if isinstance(normalize, bool):
        return normalize
    if not hasattr(router, normalize):
        raise ValueError(f"moe_routing.hf: {type(router).__name__} has no {normalize}: a layout "
                         "this module does not know")
    return bool(getattr(router, normalize))


def _routed_scale(block, router, name: str) -> float:
    """The routed scaling factor ``name``: on the router, or on the block
    (Beam, Step-3.7), which multiplies the experts' weighted sum by it (the
    same as scaling each weight)."""
    holder = router if hasattr(router, name) else block
    if not hasattr(holder, name):
        raise ValueError(f"moe_routing.hf: {type(block).__name__} has no {name}: a layout this "
                         "module does not know")
    return float(getattr(holder, name))


def _top_k(score: str, normalize, scale: Optional[str] = None):
    """Top-k of the softmax or sigmoid scores (plus the family's selection
    bias, if any); ``normalize`` as :func:`_norm` takes it; ``scale``: the
    attribute holding the routed scaling factor (see :func:`_routed_scale`)."""
    def options(block, router):
        return dict(score=score, normalize=_norm(router, normalize),
                    scale=_routed_scale(block, router, scale) if scale else 1.0)
    return options


def _grouped(score: str, normalize="norm_topk_prob"):
    """DeepSeek-V3's group-limited top-k: groups scored by their two best."""
    def options(block, router):
        return dict(score=score, normalize=_norm(router, normalize), num_groups=router.num_group,
                    topk_groups=router.topk_group,
                    scale=_routed_scale(block, router, "routed_scaling_factor"))
    return options


def _deepseek_v2(block, router):  # softmax; groups scored by their best expert
    grouped = router.topk_method == "group_limited_greedy"
    return dict(score="softmax", normalize=False, scale=float(router.routed_scaling_factor),
                num_groups=router.num_group if grouped else 1,
                topk_groups=router.topk_group if grouped else 1, group_score="max")


def _ernie(block, router):
    """Ernie 4.5 divides by clamp(sum, min=moe_norm_min), this layer by the
    sum: they differ only where the chosen probabilities sum below the floor
    (1e-12 in the released checkpoints). The bias can choose improbable
    experts, so no floor is safe: one above 1e-6 is refused."""
    floor = getattr(router, "norm_min", 0.0)
    if floor > 1e-6:
        raise ValueError(f"moe_routing.hf.from_hf: Ernie4_5_MoeSparseMoeBlock with moe_norm_min="
                         f"{floor} (above 1e-6) can clamp the normalising sum, which this layer "
                         "does not do")
    return dict(score="softmax", normalize=True)


def _cohere2(block, router):
    """Top-k of the logits, then a softmax over them (= renormalised softmax
    top-k) or their sigmoid (= sigmoid top-k, ``norm_topk_prob``)."""
    if getattr(block, "num_shared_experts", 0) > 0 and \
            block.shared_expert_combination_strategy != "sum":
        raise ValueError("moe_routing.hf.from_hf: Cohere2MoeSparseMoeBlock with "
                         f"shared_expert_combination_strategy="
                         f"{block.shared_expert_combination_strategy!r} is not supported (only "
                         "'sum': the layer adds its shared expert)")
    if router.expert_selection_fn == "softmax":
        return dict(score="softmax", normalize=True)
    return dict(score="sigmoid", normalize=_norm(router, "norm_topk_prob"))


def _llama4(block, router):  # top-k of the logits = top-k of their sigmoid
    return dict(score="sigmoid", normalize=False, scale_inputs=True)


def _axk2(block, router):
    """A.X-K2 without expert groups (A.X-K2-Light): sigmoid top-k with a
    selection bias, ``norm_topk_prob``, ``routed_scaling_factor``. With
    groups its mask sets the excluded experts' biased scores to 0, not -inf,
    so they still beat chosen-group experts whose biased score is negative:
    refused."""
    if router.num_group is not None:
        raise ValueError(f"moe_routing.hf.from_hf: AXK2MoE with n_group={router.num_group} is not "
                         "supported: its group mask sets excluded experts' scores to 0 (not "
                         "-inf), so they can still be chosen; only n_group=None")
    return _top_k("sigmoid", "norm_topk_prob", scale="routed_scaling_factor")(block, router)


def _dbrx(block, router):
    """Softmax top-k divided by the chosen weights' p-norm
    (``moe_normalize_expert_weights``): p=1 is renormalisation (the weights
    are positive), None none; any other p is refused."""
    p = block.moe_normalize_expert_weights
    if p is not None and p != 1:
        raise ValueError(f"moe_routing.hf.from_hf: DbrxFFN with moe_normalize_expert_weights={p} "
                         "is not supported (only 1, a renormalisation, or None)")
    return dict(score="softmax", normalize=p is not None)


def _clamped_swiglu(block, activation: str, limit: float, shared: bool = False) -> dict:
    """The MoE options for a SwiGLU that clamps at ``limit`` as ``activation``
    does (the shared expert's when ``shared``); an infinite limit clamps
    nothing: plain "swiglu", whose fused kernel is faster."""
    prefix = "shared_" if shared else ""
    if limit == math.inf:
        return {prefix + "activation": "swiglu"}
    if not limit > 0:
        whose = "shared expert's" if shared else "experts'"
        raise ValueError(f"moe_routing.hf: {type(block).__name__} clamps its {whose} SwiGLU at "
                         f"{limit}; only a positive limit is supported")
    return {prefix + "activation": activation, prefix + "swiglu_limit": limit}


def _hy_v4_swiglu(block) -> dict:
    """HY-V4 clamps its routed experts' gate before the SiLU (and their up),
    without GPT-OSS's alpha and +1; its shared MLP does not clamp. Its config
    documents a limit at or below zero as no clamp, but its experts clamp at
    any limit: such a limit is refused."""
    name = type(block).__name__
    if getattr(block.experts, "swiglu_limit", None) is None:
        raise ValueError(f"moe_routing.hf: {name} of this transformers version lacks "
                         "experts.swiglu_limit: a layout this module does not know")
    limit = float(block.experts.swiglu_limit)
    if not limit > 0:
        raise ValueError(f"moe_routing.hf: {name} with swiglu_limit="
                         f"{limit} is not supported: its config calls that no clamp, but its "
                         "experts clamp at it")
    return dict(_clamped_swiglu(block, "swiglu_clamped", limit), shared_activation="swiglu")


def _step3p7_swiglu(block) -> dict:
    """Step-3.7 clamps the SiLU's output (and up) of some layers' experts
    (``swiglu_limits``) and shared expert (``swiglu_limits_shared``, another
    limit); an unclamped one has an infinite limit."""
    return {**_clamped_swiglu(block, "swiglu_clamped_silu",
                              float(getattr(block.experts, "limit", math.inf))),
            **_clamped_swiglu(block, "swiglu_clamped_silu",
                              float(getattr(block.shared_experts, "limit", math.inf)), shared=True)}


class _Family(NamedTuple):
    """How one Hugging Face block class maps onto :class:`MoE`: where its
    router and its [E, H] weight live, the routing options read from them,
    the selection bias (``fixed_bias``) if it has one, and its expert layout."""
    routing: Callable[[nn.Module, nn.Module], dict]
    router: str = "gate"
    weight: str = "weight"            # under the router
    bias: Optional[str] = None        # under the block
    bias_optional: bool = False       # the bias may be absent (LFM2 without use_expert_bias)
    # The experts' weights: "linear" (nn.Linear's [E, 2F, H] / [E, H, F]),
    # "transposed" ([E, H, 2F] / [E, F, H]: Llama 4, Aria, the privacy
    # filter), "interleaved" (transposed, gate and up columns interleaved:
    # GPT-OSS) or "dbrx" (``experts.mlp``'s w1, v1 and w2, each [E*F, H]).
    layout: str = "linear"
    oai_experts: bool = False         # biased experts, GPT-OSS's clamped SwiGLU (alpha, limit)
    # Other clamped SwiGLUs (HY-V4, Step-3.7): block -> MoE options (see _activations).
    swiglu_clamps: Optional[Callable[[nn.Module], dict]] = None
    router_bias: bool = False         # the router adds its ``bias`` [E] to the logits
    returns_tuple: bool = False       # forward returns (hidden_states, router_logits)

    @property
    def expert_paths(self) -> Tuple[str, ...]:
        """Where the block keeps its experts' weights (DBRX: gate, up, down)."""
        if self.layout == "dbrx":
            return ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")
        return ("experts.gate_up_proj", "experts.down_proj")

    def from_block(self, tensor: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
        """An expert weight or bias of the block in this layer's layout
        (``gate_up``: ``gate_up_proj`` or its bias); not for "dbrx"."""
        if self.layout == "linear" and tensor.dim() == 3:
            tensor = tensor.transpose(1, 2)
        if self.layout == "interleaved" and gate_up:  # gate, up, gate, up ... -> gates, then ups
            tensor = torch.cat([tensor[..., ::2], tensor[..., 1::2]], dim=-1)
        return tensor

    def to_block(self, tensor: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
        """The inverse of :meth:`from_block`."""
        if self.layout == "interleaved" and gate_up:
            half = tensor.shape[-1] // 2
            tensor = torch.stack([tensor[..., :half], tensor[..., half:]], dim=-1).flatten(-2)
        if self.layout == "linear" and tensor.dim() == 3:
            tensor = tensor.transpose(1, 2)
        return tensor

    def read_experts(self, experts: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """The experts' weights in this layer's layout: w_in [E, H, 2F] (gate
        columns, then up) and w_out [E, F, H]."""
        if self.layout == "dbrx":
            gate, up, down = _dbrx_weights(experts)
            return torch.cat([gate, up], dim=1).transpose(1, 2), down
        return (self.from_block(experts.gate_up_proj, gate_up=True),
                self.from_block(experts.down_proj))

    def write_pairs(self, experts: nn.Module, w_in: torch.Tensor, w_out: torch.Tensor) -> list:
        """(what, the block's tensor, its value from w_in / w_out in the
        block's layout) for :func:`to_hf`: the inverse of :meth:`read_experts`."""
        if self.layout == "dbrx":
            gate, up, down = _dbrx_weights(experts)
            half = w_in.shape[-1] // 2
            return [("experts.w_in", gate, w_in[..., :half].transpose(1, 2)),
                    ("experts.w_in", up, w_in[..., half:].transpose(1, 2)),
                    ("experts.w_out", down, w_out)]
        return [("experts.w_in", experts.gate_up_proj, self.to_block(w_in, gate_up=True)),
                ("experts.w_out", experts.down_proj, self.to_block(w_out))]


def _dbrx_weights(experts: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DBRX's gate (w1), up (v1) and down (w2) weights, each viewed as
    [E, F, H] (views: to_hf writes through them)."""
    shape = (experts.num_experts, experts.ffn_hidden_size, experts.hidden_size)
    return tuple(getattr(experts.mlp, name).view(shape) for name in ("w1", "v1", "w2"))


def _each(names: str, family: _Family) -> dict:
    return {name: family for name in names.split()}


_FAMILIES = {
    # softmax top-k, always renormalised (their routers have no norm_topk_prob)
    **_each("MixtralSparseMoeBlock MiniMaxSparseMoeBlock Qwen3_5MoeSparseMoeBlock "
            "Qwen3VLMoeTextSparseMoeBlock", _Family(_top_k("softmax", True))),
    "HunYuanMoEV1Moe": _Family(_top_k("softmax", True), weight="wg.weight"),
    **_each("Qwen3MoeSparseMoeBlock Qwen3NextSparseMoeBlock Qwen2MoeSparseMoeBlock "
            "OlmoeSparseMoeBlock FlexOlmoSparseMoeBlock Qwen3OmniMoeThinkerTextSparseMoeBlock "
            "Qwen3OmniMoeTalkerTextSparseMoeBlock Qwen4ExpTextSparseMoeBlock "
            "LaraMiniSparseMoeBlock MellumSparseMoeBlock",
            _Family(_top_k("softmax", "norm_topk_prob"))),
    "JambaSparseMoeBlock": _Family(_top_k("softmax", False), router="router"),
    # softmax over the top-k logits = renormalised softmax top-k
    **_each("GraniteMoeMoE GraniteMoeSharedMoE GraniteMoeHybridMoE GraniteMoeSWAMoE",
            _Family(_top_k("softmax", True), router="router")),
    "AriaTextMoELayer": _Family(_top_k("softmax", True), router="router", layout="transposed"),
    "DbrxFFN": _Family(_dbrx, router="router", weight="layer.weight", layout="dbrx"),
    "Cohere2MoeSparseMoeBlock": _Family(_cohere2),
    "Ernie4_5_MoeSparseMoeBlock": _Family(_ernie,
                                          bias="gate.moe_statics.e_score_correction_bias"),
    **_each("DeepseekV3MoE DeepseekV32MoE Glm4MoeMoE Glm4MoeLiteMoE GlmMoeDsaMoE Glm4vMoeTextMoE "
            "Glm5NextTextMoE Dots1MoE KimiLinearMoE BailingHybridMoE MiMoV2FlashMoE "
            "ExaoneMoeSparseMoEBlock SolarOpenMoE Dots3NoteTextMoE BeamMoE",
            _Family(_grouped("sigmoid"), bias="gate.e_score_correction_bias")),
    **_each("HYV4MoE HYV4VLMoE", _Family(_grouped("sigmoid"), bias="gate.e_score_correction_bias",
                                        swiglu_clamps=_hy_v4_swiglu)),
    "AXK2MoE": _Family(_axk2, bias="gate.e_score_correction_bias"),
    "Mistral4MoE": _Family(_grouped("softmax")),
    "MistralLarge4TextMoE": _Family(_grouped("softmax", True)),
    **_each("DeepseekV2Moe DeepseekOcr2TextMoe UnlimitedOcrTextMoe", _Family(_deepseek_v2)),
    "MiniMaxM2SparseMoeBlock": _Family(_top_k("sigmoid", True), bias="e_score_correction_bias"),
    **_each("HYV3MoE Dots3NoteVisionMoE",
            _Family(_top_k("sigmoid", True, scale="router_scaling_factor"),
                    bias="e_score_correction_bias")),
    "Step3p7SparseMoeBlock": _Family(_top_k("sigmoid", True, scale="routed_scaling_factor"),
                                     bias="gate.e_score_correction_bias",
                                     swiglu_clamps=_step3p7_swiglu),
    "FlintSparseMoeBlock": _Family(_top_k("sigmoid", "norm_topk_prob")),
    "AfmoeSparseMoeBlock": _Family(_top_k("sigmoid", True, scale="route_scale"),
                                   router="router", weight="gate.weight", bias="expert_bias"),
    "Lfm2MoeSparseMoeBlock": _Family(_top_k("sigmoid", "norm_topk_prob",
                                            scale="routed_scaling_factor"),
                                     bias="expert_bias", bias_optional=True),
    "Llama4TextMoe": _Family(_llama4, router="router", layout="transposed", returns_tuple=True),
    # top-k of the logits (with the router's bias), softmax over them (the
    # privacy filter divides the weights by k and multiplies the sum by k)
    "GptOssMLP": _Family(_top_k("softmax", True), router="router", layout="interleaved",
                         oai_experts=True, router_bias=True, returns_tuple=True),
    "OpenAIPrivacyFilterMLP": _Family(_top_k("softmax", True), router="router",
                                      layout="transposed", oai_experts=True, router_bias=True,
                                      returns_tuple=True),
}
SUPPORTED = tuple(_FAMILIES) + ("SwitchTransformersSparseMLP",)


def _attribute(module: nn.Module, path: str):
    """module.a.b.c for path "a.b.c", None where a link is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


class _Parts(NamedTuple):
    family: _Family
    router: nn.Module
    weight: torch.Tensor              # [E, H]
    top_k: int
    experts: nn.Module
    bias: Optional[torch.Tensor]      # the selection bias, as the block stores it


# What a block with GPT-OSS's experts (``oai_experts``) holds besides the weights.
_OAI_PARTS = ("router.bias", "experts.gate_up_proj_bias", "experts.down_proj_bias",
              "experts.alpha", "experts.limit")


def _parts(block: nn.Module, caller: str) -> _Parts:
    """The pieces of a supported block (not Switch), or a ValueError naming
    ``caller`` when this transformers version lays the block out otherwise."""
    name = type(block).__name__
    family = _FAMILIES.get(name)
    if family is None:
        raise ValueError(f"moe_routing.hf.{caller}: unsupported block {name}; supported: "
                         f"{', '.join(SUPPORTED)}")
    router = _attribute(block, family.router)
    weight = _attribute(router, family.weight)
    # top_k sits on the router, or on the block (DBRX, older Jamba, e.g. transformers 5.17).
    top_k = getattr(router, "top_k", getattr(block, "top_k", None))
    experts = getattr(block, "experts", None)
    bias = _attribute(block, family.bias) if family.bias else None
    oai_parts = _OAI_PARTS if family.oai_experts else ()
    if weight is None or top_k is None or \
            (family.bias and bias is None and not family.bias_optional) or \
            any(_attribute(block, path) is None for path in family.expert_paths + oai_parts):
        required_bias = (family.bias,) if family.bias and not family.bias_optional else ()
        wanted = ", ".join((f"{family.router}.{family.weight}", "top_k") + family.expert_paths
                           + required_bias + oai_parts)
        raise ValueError(f"moe_routing.hf.{caller}: {name} of this transformers version lacks "
                         f"one of {wanted}: a layout this module does not know")
    return _Parts(family, router, weight, top_k, experts, bias)


def _shared_mlp(block) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The block's shared expert (an MLP with gate/up/down projections) and
    its gate, whichever exist. A zero-width one (``n_shared_experts=0`` in
    the DeepSeek-V3 family) adds nothing: none."""
    shared = next((getattr(block, name) for name in ("shared_expert", "shared_experts", "shared_mlp")
                   if getattr(block, name, None) is not None), None)
    down = getattr(shared, "down_proj", None)
    if isinstance(down, nn.Linear) and down.in_features == 0:
        return None, None  # its gate, if any, scales nothing
    return shared, getattr(block, "shared_expert_gate", None)


def _check_silu(module, what: str) -> None:
    act = getattr(module, "act_fn", getattr(module, "activation_fn", None))
    silu = act is None or act is nn.functional.silu or isinstance(act, nn.SiLU) \
        or type(act).__name__ == "SiLUActivation"  # LFM2 stores the function itself
    if not silu:
        act_name = getattr(act, "__name__", type(act).__name__)  # a function, or a module's class
        raise ValueError(f"moe_routing.hf: {what} uses {act_name}; only SiLU-gated (SwiGLU) "
                         "experts are supported")


def from_hf(block: nn.Module, **overrides) -> MoE:
    """A :class:`MoE` that computes what ``block`` computes, with its weights
    copied (not shared) and on its device and dtype. ``overrides`` go to the
    MoE constructor (e.g. ``capacity_factor=1.25`` to train with drops,
    ``aux_loss_weight=0.01``). One deliberate difference: the router's
    logits are float32 (float64 in a float64 model) where most Hugging Face
    blocks compute them in the model's dtype (DeepSeek-V3's keeps float32),
    so in a bfloat16 or float16 model a token whose top scores nearly tie
    may pick another expert than the original block (selective precision;
    in float32 the two pick the same)."""
    name = type(block).__name__
    if name == "SwitchTransformersSparseMLP":
        return _from_switch(block, **overrides)
    family, router, weight, top_k, experts, bias = _parts(block, "from_hf")
    oai = family.oai_experts
    if not oai:  # DBRX keeps its activation on experts.mlp
        _check_silu(getattr(experts, "mlp", experts), f"{name}.experts")
    E, H = weight.shape
    w_in, w_out = family.read_experts(experts)
    F_hidden = w_out.shape[1]
    dtype, device = w_in.dtype, w_in.device
    options = dict(capacity_factor=None, expert_bias=oai, logit_bias=family.router_bias,
                   aux_loss_weight=0.0, z_loss_weight=0.0,
                   # float64 models route in float64 (so tests can compare
                   # exactly); everything else in float32.
                   dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                   **family.routing(block, router))
    if bias is not None:  # Ernie 4.5 keeps it as [1, E]
        options.update(fixed_bias=bias.detach().reshape(-1))
    shared, shared_gate = _shared_mlp(block)
    if shared is not None:
        _check_silu(shared, f"{name} shared expert")
        projections = [getattr(shared, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections):
            raise ValueError(f"moe_routing.hf.from_hf: {name}'s shared expert is not three "
                             "bias-free linear maps gate_proj, up_proj, down_proj")
        options.update(shared_hidden=shared.down_proj.weight.shape[1],
                       shared_gate=shared_gate is not None)
    options.update(_activations(family, block, shared is not None))
    _check_overrides(name, options, overrides)
    options.update(overrides)
    moe = MoE(H, F_hidden, E, top_k, **options).to(device)
    with torch.no_grad():
        moe.router.weight.copy_(weight)
        moe.experts.w_in.copy_(w_in)
        moe.experts.w_out.copy_(w_out)
        if family.router_bias:
            moe.router.logit_bias.copy_(router.bias)
        if oai:
            moe.experts.b_in.copy_(family.from_block(experts.gate_up_proj_bias, gate_up=True))
            moe.experts.b_out.copy_(experts.down_proj_bias)
        if shared is not None:
            moe.shared_expert.w_in.copy_(torch.cat([shared.gate_proj.weight.t(),
                                                    shared.up_proj.weight.t()], 1)[None])
            moe.shared_expert.w_out.copy_(shared.down_proj.weight.t()[None])
        if shared_gate is not None:
            moe.shared_gate.weight.copy_(shared_gate.weight)
    # The router stays in its routing dtype; experts compute in the block's.
    for part in (moe.experts, moe.shared_expert, moe.shared_gate):
        if part is not None:
            part.to(dtype)
    return moe.train(block.training)


def _activations(family: _Family, block: nn.Module, has_shared: bool) -> dict:
    """The MoE options (activation, swiglu_alpha/swiglu_limit, and with a
    shared expert shared_activation/shared_swiglu_limit) that give the
    experts the block's activations."""
    if family.oai_experts:
        options = dict(activation="swiglu_oai", swiglu_alpha=float(block.experts.alpha),
                       swiglu_limit=float(block.experts.limit))
    elif family.swiglu_clamps:
        options = family.swiglu_clamps(block)
    else:
        options = dict(activation="swiglu")
    if not has_shared:
        return {key: value for key, value in options.items() if not key.startswith("shared_")}
    return {"shared_activation": options["activation"], **options}


def _check_overrides(name: str, options: dict, overrides: dict) -> None:
    """Overrides may change how the layer trains (capacity, losses, balancing)
    and may add zero-initialised biases, but not the function the copied
    weights compute: not the experts' activation or shared expert, and not
    drop the block's own biases."""
    block_value = {"shared_hidden": None, "shared_gate": False, **options}
    for key in ("activation", "swiglu_alpha", "swiglu_limit", "shared_hidden", "shared_gate",
                "shared_activation", "shared_swiglu_limit"):
        if key in overrides and key in block_value and overrides[key] != block_value[key]:
            raise ValueError(f"moe_routing.hf.from_hf: {key}={overrides[key]!r} contradicts "
                             f"{name}, whose weights need {key}={block_value[key]!r}")
    for key in ("expert_bias", "logit_bias"):
        if options[key] and key in overrides and not overrides[key]:
            raise ValueError(f"moe_routing.hf.from_hf: {key}=False would drop {name}'s biases")


def _switch_drops_nothing() -> bool:
    """True on transformers 5.0-5.17, whose Switch block never applies its
    expert capacity (see the module docstring)."""
    import sys
    version = getattr(sys.modules.get("transformers"), "__version__", "")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False  # unknown: the current behaviour
    return major == 5 and minor < 18


def _from_switch(block, **overrides) -> MoE:
    router, experts = block.router, block.experts
    classifier = router.classifier
    if classifier.bias is not None:
        raise ValueError("moe_routing.hf.from_hf: Switch router with a bias (router_bias=True) is "
                         "not supported")
    E, H = classifier.weight.shape
    first = experts["expert_0"]
    activation = {"ReLU": "relu", "GELUActivation": "gelu", "NewGELUActivation": "gelu"}.get(
        type(first.act).__name__)
    if activation is None or not hasattr(first, "wi"):
        raise ValueError(f"moe_routing.hf.from_hf: Switch experts with {type(first.act).__name__} "
                         "or gated feed-forwards are not supported")
    dtype, device = first.wi.weight.dtype, first.wi.weight.device
    capacity = (dict(capacity_factor=None) if _switch_drops_nothing() else
                dict(capacity_factor=1.0, capacity_per_row=True,
                     expert_capacity=int(router.expert_capacity)))
    options = dict(**capacity, activation=activation,
                   aux_loss_weight=0.0, z_loss_weight=0.0, score="softmax",
                   jitter=float(router.jitter_noise),
                   dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    options.update(overrides)
    moe = MoE(H, first.wi.weight.shape[0], E, 1, **options).to(device)
    with torch.no_grad():
        moe.router.weight.copy_(classifier.weight)
        for e in range(E):
            moe.experts.w_in[e].copy_(experts[f"expert_{e}"].wi.weight.t())
            moe.experts.w_out[e].copy_(experts[f"expert_{e}"].wo.weight.t())
    moe.experts.to(dtype)
    return moe.train(block.training)


def to_hf(moe: MoE, block: nn.Module) -> nn.Module:
    """Writes ``moe``'s weights into ``block``, the Hugging Face block it was
    made from by :func:`from_hf` (in place, in the block's dtype): the
    inverse of from_hf's copy, so that a fine-tuned model saves with
    ``save_pretrained`` in Hugging Face's own layout. A block with a
    selection bias (DeepSeek-V3's ``e_score_correction_bias`` and the
    like, LFM2's ``expert_bias``) receives the router's selection bias (the
    ``fixed_bias`` plus any learned balancing ``bias``); a block without one
    has no place for a balancing bias and refuses a non-zero one (this
    reads it: a host synchronisation). Every shape is checked before
    anything is written, and the experts' activations (a MoE whose
    activation, alpha or limit differs from the block's is refused).
    Returns ``block``."""
    _write(_checked_pairs(moe, block))
    return block


def _write(pairs: list) -> None:
    with torch.no_grad():
        for _, destination, source in pairs:
            destination.copy_(source)


def _checked_pairs(moe: MoE, block: nn.Module) -> list:
    """(what, the block's tensor, its new value) for :func:`to_hf`, after
    every check: writing them cannot fail."""
    name = type(block).__name__
    router = moe.router
    pairs = []  # (what, destination in the block, source from the MoE in the block's layout)
    if name == "SwitchTransformersSparseMLP":
        pairs.append(("router.weight", block.router.classifier.weight, router.weight))
        if moe.num_experts != len(block.experts):
            raise ValueError(f"moe_routing.hf.to_hf: the MoE has {moe.num_experts} experts, but "
                             f"{name} has {len(block.experts)}")
        for e in range(moe.num_experts):
            expert = block.experts[f"expert_{e}"]
            pairs += [("experts.w_in", expert.wi.weight, moe.experts.w_in[e].t()),
                      ("experts.w_out", expert.wo.weight, moe.experts.w_out[e].t())]
        correction, holds_biases, family = None, False, None
    else:
        parts = _parts(block, "to_hf")
        experts, correction, family = parts.experts, parts.bias, parts.family
        holds_biases = family.oai_experts  # GPT-OSS's router and experts have biases
        pairs.append(("router.weight", parts.weight, router.weight))
        pairs += family.write_pairs(experts, moe.experts.w_in, moe.experts.w_out)
        if family.router_bias and router.logit_bias is not None:
            pairs.append(("router.logit_bias", parts.router.bias, router.logit_bias))
        if family.oai_experts:
            if moe.experts.b_in is None:
                raise ValueError(f"moe_routing.hf.to_hf: the MoE has no experts.b_in, which "
                                 f"{name} holds: not the block this MoE was made from")
            pairs += [("experts.b_in", experts.gate_up_proj_bias,
                       family.to_block(moe.experts.b_in, gate_up=True)),
                      ("experts.b_out", experts.down_proj_bias, moe.experts.b_out)]
        if correction is not None and router.selection_bias() is not None:
            pairs.append(("the selection bias", correction.view(-1), router.selection_bias()))
        shared, shared_gate = _shared_mlp(block)
        if (shared is None) != (moe.shared_expert is None) or \
                (shared_gate is None) != (moe.shared_gate is None):
            raise ValueError(f"moe_routing.hf.to_hf: the MoE's shared expert and its gate do not "
                             f"match {name}'s: not the block this MoE was made from")
        if shared is not None:
            w_in, w_out = moe.shared_expert.w_in[0], moe.shared_expert.w_out[0]
            hidden = shared.gate_proj.weight.shape[0]
            pairs += [("shared_expert.w_in", shared.gate_proj.weight, w_in[:, :hidden].t()),
                      ("shared_expert.w_in", shared.up_proj.weight, w_in[:, hidden:].t()),
                      ("shared_expert.w_out", shared.down_proj.weight, w_out.t())]
        if shared_gate is not None:
            pairs.append(("shared_gate.weight", shared_gate.weight, moe.shared_gate.weight))
    for what, destination, source in pairs:
        if source.shape != destination.shape:
            raise ValueError(f"moe_routing.hf.to_hf: {what} of the MoE is {tuple(source.shape)} in "
                             f"{name}'s layout, which needs {tuple(destination.shape)}: not the "
                             "block this MoE was made from")
    if family is not None:  # other activations: the weights would compute another function
        wanted = _activations(family, block, moe.shared_expert is not None)
        for label, part, prefix in (("experts", moe.experts, ""),
                                    ("shared_expert", moe.shared_expert, "shared_")):
            if part is None:
                continue
            limit = wanted.get(prefix + "swiglu_limit", wanted.get("swiglu_limit"))
            theirs = activation_text(wanted[prefix + "activation"], wanted.get("swiglu_alpha"),
                                       limit)
            ours = activation_text(part.activation, part.alpha, part.limit)
            if ours != theirs:
                raise ValueError(f"moe_routing.hf.to_hf: the MoE's experts are not {name}'s: "
                                 f"its {label} has {ours}, where {name}'s has {theirs}; not the "
                                 "block this MoE was made from")
    if correction is None and router.bias is not None and bool(router.bias.any()):
        raise ValueError(f"moe_routing.hf.to_hf: the MoE learned a balancing bias, which {name} "
                         "cannot hold (it has no selection bias)")
    # Biases the block has no place for must be zero (this reads them).
    homeless = [("router.logit_bias", router.logit_bias, holds_biases)]
    for label, expert in (("experts", moe.experts), ("shared_expert", moe.shared_expert)):
        if expert is not None:
            held = holds_biases and expert is moe.experts
            homeless += [(f"{label}.b_in", expert.b_in, held), (f"{label}.b_out", expert.b_out, held)]
    for what, bias, held in homeless:
        if bias is None and held:
            raise ValueError(f"moe_routing.hf.to_hf: the MoE has no {what}, which {name} "
                             "holds: not the block this MoE was made from")
        if bias is not None and not held and bool(bias.any()):
            raise ValueError(f"moe_routing.hf.to_hf: the MoE has a non-zero {what}, which "
                             f"{name} cannot hold")
    return pairs


# The padding masks a patched model's blocks route with. Models whose forward
# takes ``input_ids`` and a mask (the top model, a decoder-only base model, an
# encoder-decoder's stacks) record the masks they are called with, so a block
# reads the mask of the innermost such call that names it. Activation
# checkpointing re-runs a layer in backward, after later forwards may have
# recorded other masks; Hugging Face checkpoints a layer's forward, not its
# hooks, so nothing outside the block sees the re-run. Each training forward
# therefore hooks the gradients of its block's outputs (the result and the
# auxiliary loss): backward reaches one of them before it needs the saved
# tensors whose absence makes checkpointing re-run the layer (nothing the
# layer computed after them needs saved tensors), and the hook makes that
# forward's masks the re-run's. That needs a forward with gradients:
# reentrant checkpointing runs the first forward without them, so a layer's
# Hugging Face checkpointing function (``_gradient_checkpointing_func``, set by
# ``gradient_checkpointing_enable``) is wrapped as well, to pin the masks
# of this run for the forward and for every re-run of it.
_MASK_NAMES = ("attention_mask", "decoder_attention_mask")


def _mask_positions(module: nn.Module) -> dict:
    """{mask name: positional index, or None for keyword-only} of the masks
    ``module.forward`` takes, or {} when it takes no ``input_ids`` (a layer,
    not a model)."""
    import inspect
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return {}
    names = [p.name for p in params]
    if "input_ids" not in names:
        return {}
    return {name: None if params[names.index(name)].kind == params[0].KEYWORD_ONLY
            else names.index(name) for name in _MASK_NAMES if name in names}


class _PatchMasks:
    """The masks of the current forward (``current``), those pinned by a
    checkpointing function for the layer it runs (``pinned``) and, while
    backward re-runs a checkpointed layer, those of the layer's own forward
    (``rerun``). Hooks hold it, not closures, so a patched model pickles and
    deep-copies (the copy gets its own masks)."""

    def __init__(self, positions: List[dict]):
        self.positions = positions  # per hooked model: {mask name: positional index}
        self.current: dict = {}
        self.rerun: Optional[dict] = None
        self.pinned: List[dict] = []  # by _MaskPinningCheckpoint, innermost last

    def __getstate__(self):
        return {"positions": self.positions}  # masks in flight are not copied

    def __setstate__(self, state):
        self.__init__(state["positions"])

    def enter_model(self, index: int, args, kwargs):
        if kwargs.get("output_router_logits"):
            raise ValueError(_ROUTER_LOGITS_ERROR)
        current = dict(self.current)  # a new dict: earlier forwards' hooks keep theirs
        for name, position in self.positions[index].items():
            if name in kwargs:
                current[name] = kwargs[name]
            elif position is not None and position < len(args):
                current[name] = args[position]
            else:
                current[name] = None
        self.current = current

    def run_pinned(self, masks: dict, function, *args, **kwargs):
        self.pinned.append(masks)
        try:
            return function(*args, **kwargs)
        finally:
            self.pinned.pop()

    def masks_of_this_run(self) -> dict:
        if self.pinned:
            return self.pinned[-1]
        if _in_backward() and self.rerun is not None:
            return self.rerun
        return self.current

    def set_rerun(self, masks: dict, _grad):
        self.rerun = masks  # returns None: the gradient is left as it is


def _wrap_checkpointing(model: nn.Module, masks: Optional[_PatchMasks]) -> None:
    """Wraps (or, with masks None, unwraps) every Hugging Face checkpointing
    function (``_gradient_checkpointing_func``) in ``model``."""
    for module in model.modules():
        function = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(function, _MaskPinningCheckpoint):
            function = module._gradient_checkpointing_func = function.inner
        if function is not None and masks is not None:
            module._gradient_checkpointing_func = _MaskPinningCheckpoint(function, masks)


class _MaskPinningCheckpoint:
    """A layer's Hugging Face checkpointing function, calling the checkpointed
    function with the masks of this run pinned, so that its forward and each
    re-run of it in backward (reentrant or not, after any number of later
    forwards, inside an outer checkpoint too) route with them. Under
    torch.compile Dynamo traces the pinning with the layer (no graph break
    where it traces the checkpoint whole), and where it cannot (a graph
    break in the layer, or reentrant checkpointing without
    ``skip_fwd_side_effects_in_bwd_under_checkpoint``) it runs this call
    eagerly, pinned all the same."""

    def __init__(self, inner, masks: _PatchMasks):
        self.inner, self.masks = inner, masks

    def __call__(self, function, *args, **kwargs):
        pinned = functools.partial(self.masks.run_pinned, self.masks.masks_of_this_run(), function)
        return self.inner(pinned, *args, **kwargs)


class _PinningEnabler:
    """Stands in for a patched model's ``_set_gradient_checkpointing`` (what
    ``gradient_checkpointing_enable`` calls to hand each layer its
    checkpointing function), wrapping the functions it sets: checkpointing
    enabled after :func:`patch` pins masks too, also when the model is
    compiled before its first eager forward."""

    def __init__(self, model: nn.Module, masks: _PatchMasks):
        self.model, self.masks = model, masks

    def __call__(self, enable: bool = True, **kwargs):
        type(self.model)._set_gradient_checkpointing(self.model, enable=enable, **kwargs)
        _wrap_checkpointing(self.model, self.masks)


_ROUTER_LOGITS_ERROR = (
    "moe_routing.hf.patch: output_router_logits=True asks for Hugging Face's own load-balancing "
    "loss, which needs the router logits of its own blocks; the patched blocks compute their "
    "losses themselves: pass aux_loss_weight (and z_loss_weight) to patch() and add "
    "moe_routing.aux_loss(model) to the loss, with output_router_logits=False.")


class _ModelHook:
    """Forward pre-hook of a model that takes ``input_ids``: records its masks."""

    def __init__(self, masks: _PatchMasks, index: int):
        self.masks, self.index = masks, index

    def __call__(self, _module, args, kwargs):
        self.masks.enter_model(self.index, args, kwargs)


class MaskedMoE(nn.Module):
    """What :func:`patch` puts in a block's place: the :class:`MoE` (as
    ``.moe``), called with the padding mask of the model's current forward
    (its ``attention_mask``, the last S columns when a KV cache makes it
    longer than the S new tokens), so padding is routed nowhere."""

    def __init__(self, moe: MoE, masks: _PatchMasks, mask_name: str = "attention_mask",
                 returns_tuple: bool = False):
        super().__init__()
        self.moe = moe
        self._masks = masks
        self.mask_name = mask_name
        self.returns_tuple = returns_tuple  # the replaced block returned (out, router_logits)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        masks = self._masks.masks_of_this_run()
        mask = masks.get(self.mask_name)
        if mask is not None and hidden_states.dim() == 3 and mask.dim() == 2 \
                and mask.shape[0] == hidden_states.shape[0] \
                and mask.shape[1] >= hidden_states.shape[1]:
            mask = mask[:, mask.shape[1] - hidden_states.shape[1]:].bool()
        else:
            mask = None
        out = self.moe(hidden_states, mask)
        if out.requires_grad and not torch.compiler.is_compiling() and not _in_backward():
            # For a checkpointing re-run of this layer (see _PatchMasks); compiled
            # code re-runs no Python in backward.
            rerun_with_these = functools.partial(self._masks.set_rerun, masks)
            out.register_hook(rerun_with_these)
            aux = self.moe.aux_loss
            if isinstance(aux, torch.Tensor) and aux.requires_grad:
                aux.register_hook(rerun_with_these)
        return (out, None) if self.returns_tuple else out


class PatchHandle:
    """Returned by :func:`patch`: ``blocks`` lists (qualified name, original
    block, replacement); :meth:`undo` puts the originals back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks: List[Tuple[str, nn.Module, MaskedMoE]] = []
        self._hooks: list = []
        # Where and in which dtype each replacement's experts were when the
        # original was last placed like them (see _originals_follow_the_model).
        self._placements: List[Tuple[torch.device, torch.dtype]] = []
        # The module holding each block and its attribute there: found by
        # object, not by name, so a wrapper put around a layer later
        # (activation checkpointing, per-layer compile) does not hide it.
        self._parents: List[Tuple[nn.Module, str]] = []

    def _add(self, qualified: str, original: nn.Module, replacement: MaskedMoE,
             overrides: dict) -> None:
        self.blocks.append((qualified, original, replacement))
        w_in = replacement.moe.experts.w_in
        self._placements.append((w_in.device, w_in.dtype))
        parent, _, attr = qualified.rpartition(".")
        holder = self.model.get_submodule(parent) if parent else self.model
        self._parents.append((holder, attr))
        self._hooks.append(replacement._register_load_state_dict_pre_hook(
            _HuggingFaceLayoutLoading(self, original, overrides), with_module=True))
        if parent:
            self._hooks.append(holder._register_load_state_dict_pre_hook(
                _RenamedBlockCheck(attr, type(original).__name__), with_module=True))

    def undo(self, copy_weights: bool = False) -> None:
        """Puts the original blocks back, moved and cast as the model was
        since :func:`patch` (``model.to("cuda")``, ``model.bfloat16()``).
        Their weights are those from before patch (training the patched model
        does not change them), or those the last ``save_pretrained`` of the
        patched model wrote, unless ``copy_weights``: then each replacement's
        weights are written into its block first (:func:`to_hf`), so that a
        fine-tuned model goes back to Hugging Face's layout."""
        if copy_weights:
            self._write_weights_into_originals()
        else:
            self._originals_follow_the_model()
        self._swap(originals=True)
        for hook in self._hooks:
            hook.remove()
        _wrap_checkpointing(self.model, None)
        for module in self.model.modules():
            for name, kind in (("_set_gradient_checkpointing", _PinningEnabler),
                               ("save_pretrained", _HuggingFaceLayoutSaving)):
                if isinstance(module.__dict__.get(name), kind):
                    delattr(module, name)
        self.blocks, self._hooks, self._placements, self._parents = [], [], [], []

    def _originals_follow_the_model(self, move: bool = True) -> None:
        """The original blocks are outside the model, so its ``.to()`` did not
        reach them: each is cast, and with ``move`` moved, as its
        replacement's experts were since. A save or a load casts only: moved,
        they would hold a second copy of the experts on the accelerator."""
        for index, (_, original, replacement) in enumerate(self.blocks):
            device, dtype = self._placements[index]
            w_in = replacement.moe.experts.w_in
            if move and w_in.device != device:
                original.to(w_in.device)
                device = w_in.device
            if w_in.dtype != dtype:
                original.to(w_in.dtype)
                dtype = w_in.dtype
            self._placements[index] = (device, dtype)

    def _write_weights_into_originals(self, move: bool = True) -> None:
        self._originals_follow_the_model(move)
        # Every block is checked before any is written.
        _write([pair for _, original, replacement in self.blocks
                for pair in _checked_pairs(replacement.moe, original)])

    def _swap(self, originals: bool) -> None:
        """Puts the originals (or back the replacements) in their modules,
        after checking that every one still holds what patch() put there:
        nothing is swapped when one does not."""
        for (qualified, original, replacement), (holder, attr) in zip(self.blocks, self._parents):
            if holder._modules.get(attr) is not (replacement if originals else original):
                raise ValueError(
                    f"moe_routing.hf: {qualified!r} no longer holds the block patch() put there "
                    "(replaced or removed since): nothing was swapped")
        for (_, original, replacement), (holder, attr) in zip(self.blocks, self._parents):
            setattr(holder, attr, original if originals else replacement)


class _HuggingFaceLayoutLoading:
    """A load_state_dict pre-hook of a patched block: the state dict may hold
    the block in this package's layout (``...moe.router.weight``, loaded as
    it is) or in the original block's own names, as the patched model's
    ``save_pretrained(..., save_original_format=False)`` writes them (loaded
    into the original block, then converted as :func:`from_hf` converts; the
    selection bias, learned part included, becomes the ``fixed_bias``). Any
    other names under the block (Hugging Face's checkpoint format, e.g.
    per-expert ``experts.0.gate_proj.weight``, which only ``from_pretrained``
    converts) leave the block as it was, with a warning (which a strict load
    follows with its error for the missing keys)."""

    def __init__(self, handle: PatchHandle, original: nn.Module, overrides: dict):
        self.handle, self.original, self.overrides = handle, original, overrides

    def __getstate__(self):  # copies hold no original block (see _HuggingFaceLayoutSaving)
        return {"handle": None, "original": None, "overrides": self.overrides}

    def __call__(self, module, state_dict, prefix, *_):
        names = [key for key in state_dict if key.startswith(prefix)]
        if not names or any(key.startswith(prefix + "moe.") for key in names):
            return  # this package's layout, or a state dict without the block
        original = self.original
        if original is None:
            return _not_loaded(
                f"moe_routing.hf: the patched block {prefix[:-1]!r} was not loaded: the state "
                f"dict holds it under names ({', '.join(sorted(names)[:2])}, ...) that are not "
                "this package's (moe.*), and this copy (pickled or deep-copied) of a patched "
                "model holds no original block to read them with: load them into the patched "
                "model itself, or load a state_dict() of a patched model")
        theirs = {key[len(prefix):] for key in names}
        needed = set(original.state_dict())
        if theirs < needed:
            return _not_loaded(
                f"moe_routing.hf: the patched block {prefix[:-1]!r} was not loaded (it keeps its "
                f"weights): the state dict holds only part of {type(original).__name__}'s "
                f"weights ({', '.join(sorted(theirs)[:2])}, ...), which are read whole")
        if not needed <= theirs:
            return _not_loaded(_checkpoint_format_message(prefix[:-1], names,
                                                          type(original).__name__))
        self.handle._originals_follow_the_model(move=False)
        # Other names under the block stay for load_state_dict's unexpected keys.
        original.load_state_dict({key: state_dict.pop(prefix + key) for key in needed})
        converted = from_hf(original, **self.overrides)
        for key, value in converted.state_dict().items():
            state_dict[prefix + "moe." + key] = value
        # What from_hf does not set keeps the layer's value.
        for key, value in module.moe.state_dict().items():
            state_dict.setdefault(prefix + "moe." + key, value)


class _RenamedBlockCheck:
    """A load_state_dict pre-hook of the module holding a patched block (its
    layer): Hugging Face's checkpoint format may rename the block (Mixtral's
    ``mlp`` is ``block_sparse_moe`` there), which the block's own hook never
    sees; names in the layer that it does not have, and none for the block,
    tell such a checkpoint from a state dict that leaves the block out."""

    def __init__(self, attr: str, block_type: str):
        self.attr, self.block_type = attr, block_type

    def __call__(self, module, state_dict, prefix, *_):
        if any(key.startswith(f"{prefix}{self.attr}.") for key in state_dict):
            return
        known = {prefix + key for key in _state_names(module)}
        foreign = [key for key in state_dict if key.startswith(prefix) and key not in known]
        if foreign:
            _not_loaded(_checkpoint_format_message(prefix + self.attr, foreign, self.block_type))


def _state_names(module: nn.Module) -> set:
    """The keys of ``module.state_dict()``, without running its hooks."""
    names = set()
    for prefix, sub in module.named_modules():
        dot = prefix + "." if prefix else ""
        names.update(dot + name for name, p in sub._parameters.items() if p is not None)
        names.update(dot + name for name, b in sub._buffers.items()
                     if b is not None and name not in sub._non_persistent_buffers_set)
    return names


def _checkpoint_format_message(block: str, names: list, block_type: str) -> str:
    return (f"moe_routing.hf: the patched block {block!r} was not loaded (it keeps its "
            f"weights): the state dict holds it in Hugging Face's checkpoint format "
            f"({', '.join(sorted(names)[:2])}, ...), neither this package's names (moe.*) nor "
            f"{block_type}'s own, and only from_pretrained converts that format. To resume "
            "from such a checkpoint, build the model with from_pretrained(checkpoint) of the "
            "unpatched class and patch it (e.g. before "
            "Trainer.train(resume_from_checkpoint=...)); or save with "
            "save_pretrained(..., save_original_format=False) or state_dict()")


def _not_loaded(message: str) -> None:
    """A block's keys load_state_dict cannot use: a warning (transformers'
    own MoE models lose the block with a line in the log); a strict load
    then raises for the block's missing keys. (Load hooks cannot tell a
    strict load: torch passes them strict=True always, and raises for
    anything they add to the errors.)"""
    warnings.warn(message, stacklevel=4)


class _HuggingFaceLayoutSaving:
    """Stands in for ``save_pretrained`` of a patched model (and of each
    Hugging Face model in it that holds a patched block): writes the patched
    blocks' weights into the original blocks (:func:`to_hf`, which refuses
    what a block cannot hold) and saves with those in place, in Hugging
    Face's own layout, which ``from_pretrained`` of the unpatched class
    loads; the model stays patched. A pickled or deep-copied model holds no
    original blocks (its save_pretrained refuses)."""

    def __init__(self, model: nn.Module, handle: Optional[PatchHandle]):
        self.model, self.handle = model, handle

    def __getstate__(self):
        return {"model": self.model, "handle": None}

    def __call__(self, *args, **kwargs):
        handle = self.handle
        if handle is None:
            raise ValueError(
                "moe_routing.hf: save_pretrained of a copy of a patched model (pickled or "
                "deep-copied): the copy holds no original Hugging Face blocks to write its weights "
                "into. Save the patched model itself, or copy it after handle.undo(), or save "
                "its state_dict() (moe_routing's layout, which loads into a patched model)")
        given = kwargs.get("state_dict")
        if given is not None and not set(given).isdisjoint(self._patched_names()):
            warnings.warn(
                "moe_routing.hf: save_pretrained(state_dict=...) of a patched model saves the "
                "given state dict, whose patched blocks are in moe_routing's layout, which "
                "Hugging Face's from_pretrained does not load; leave state_dict out to save "
                "Hugging Face's layout", stacklevel=2)
        handle._write_weights_into_originals(move=False)
        handle._swap(originals=True)  # checks every block before it swaps any
        try:
            return type(self.model).save_pretrained(self.model, *args, **kwargs)
        finally:
            handle._swap(originals=False)

    def _patched_names(self) -> set:
        replacements = {id(replacement) for _, _, replacement in self.handle.blocks}
        return {f"{name}.{key}" for name, module in self.model.named_modules()
                if id(module) in replacements for key in module.state_dict()}


def patch(model: nn.Module, **overrides) -> PatchHandle:
    """Swaps every supported MoE block of ``model`` for a :class:`MoE` made by
    :func:`from_hf` (``overrides`` go to each), in place, and plumbs the
    model's ``attention_mask`` into routing: padding tokens are routed
    nowhere and counted in no load or loss. The mask may be passed by keyword
    or position, to the top model or to its base model (``model.model``); a
    layer that activation checkpointing (reentrant or not) re-runs in
    backward routes with the mask of its own forward, even after later
    forwards. The model keeps
    working with ``generate()`` and a KV cache, pickles and deep-copies.
    Its ``save_pretrained`` saves Hugging Face's own layout (the patched
    weights written into the original blocks), which ``from_pretrained`` of
    the unpatched class loads; ``state_dict()`` keeps this layer's layout.
    Returns a :class:`PatchHandle`; its ``undo()`` restores the original
    blocks (their own weights; ``undo(copy_weights=True)``
    writes the patched model's weights into them). ``output_router_logits=True``
    (Hugging Face's own balancing loss) is refused: use ``aux_loss_weight``."""
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError(_ROUTER_LOGITS_ERROR + " This model's config sets it.")
    handle = PatchHandle(model)
    # An encoder-decoder's decoder blocks take the decoder's mask.
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in SUPPORTED]
    # The models (forwards taking input_ids) that hold a block record their masks.
    holders = [m for n, m in model.named_modules()
               if any(n == "" or t.startswith(n + ".") for t, _ in targets)]
    models = [(m, positions) for m in holders if (positions := _mask_positions(m))]
    masks = _PatchMasks([positions for _, positions in models])
    # Every block is converted before any is swapped: a block from_hf refuses
    # (e.g. a layer with a setting this layer cannot express) leaves the model
    # as it was.
    for qualified, block in targets:
        name = ("decoder_attention_mask" if encoder_decoder and "decoder" in qualified.split(".")
                else "attention_mask")
        family = _FAMILIES.get(type(block).__name__)
        replacement = MaskedMoE(from_hf(block, **overrides), masks, name,
                                family is not None and family.returns_tuple)
        handle._add(qualified, block, replacement, overrides)
    for qualified, _, replacement in handle.blocks:
        parent, _, attr = qualified.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, replacement)
    for index, (m, _) in enumerate(models):
        hook = _ModelHook(masks, index)
        handle._hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    # Checkpointing enabled before patch() is wrapped now, later through the
    # models' _set_gradient_checkpointing.
    _wrap_checkpointing(model, masks)
    for m in holders:
        if callable(getattr(type(m), "_set_gradient_checkpointing", None)):
            m._set_gradient_checkpointing = _PinningEnabler(m, masks)
        if callable(getattr(type(m), "save_pretrained", None)):
            m.save_pretrained = _HuggingFaceLayoutSaving(m, handle)
    return handle


def mixtral_load_balancing_loss(router_logits, k: int, attention_mask=None) -> torch.Tensor:
    """The number transformers' ``load_balancing_loss_func`` returns (Mixtral,
    Qwen-MoE, OLMoE, ... before ``router_aux_loss_coef``): every layer's
    router logits [B*S, E] are pooled into one set of tokens (not averaged
    per layer), scored by softmax, and the loss is k times ours on that pool,
    padding (``attention_mask`` [B, S] == 0) excluded."""
    layers = list(router_logits) if isinstance(router_logits, (list, tuple)) else [router_logits]
    logits = torch.cat([l.float() for l in layers])
    routing = ops.route(logits, k, normalize=False)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).bool().repeat(len(layers))
    return k * ops.load_balancing_loss(routing.scores, routing.experts, mask=mask)


def switch_load_balancing_loss(router_probs: torch.Tensor,
                               expert_indices: torch.Tensor) -> torch.Tensor:
    """The number transformers' Switch Transformers ``load_balancing_loss_func``
    returns: router_probs [B, S, E], expert_indices [B, S] or [B, S, k]
    (distinct per token). It averages the loss over batch rows, so it is ours
    with ``seq_len=S`` (per-row f and P), times k."""
    B, S, E = router_probs.shape
    experts = expert_indices.long().reshape(B * S, -1)
    return experts.shape[1] * ops.load_balancing_loss(
        router_probs.reshape(B * S, E).float(), experts, seq_len=S)
