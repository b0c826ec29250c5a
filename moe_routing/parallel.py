"""Expert parallelism for :class:`moe_routing.MoE`.

``MoE(..., expert_parallel=group_or_mesh_dim)`` shards the E experts over the
W ranks of a process group (or a 1-D DeviceMesh, e.g. ``mesh["expert"]``):
rank r holds experts [r*E/W, (r+1)*E/W) as ``experts.w_in`` [E/W, H, F] and
``experts.w_out`` [E/W, F, H]. The router is replicated and routes the rank's
own tokens; tokens travel to the ranks owning their experts with
``all_to_all_single`` and come back the same way; combine runs where the
tokens live.

Layouts
  * capacity (``capacity_factor`` set): **per-rank capacity**. Each rank plans
    its own T_local tokens with C = capacity(T_local, E, k, factor) rows per
    expert, exactly as a single-process layer would on that slice, and sends
    the fixed [E/W, C, H] block of every destination rank's experts to it: one
    all_to_all of [E, C, H] there and one back, static shapes, no host
    synchronisation, functional collectives (works under
    ``torch.compile(fullgraph=True)``). All ranks of the group must pass the
    same number of tokens (C must agree; pad with the mask otherwise):
    eager mode checks it on CPU tensors, and on every device under
    TORCH_DISTRIBUTED_DEBUG=DETAIL (one small all_gather). Expert
    e therefore runs on W*C rows
    (C from each rank, in source-rank order). The single-process reference is
    W separate ``plan`` calls, one per rank's token slice, concatenated.
  * dropless (``capacity_factor=None``): the per-expert counts are exchanged
    first (a small all_to_all), then the packed rows with variable splits. The
    splits must be known on the host: **one host synchronisation per layer
    forward** (as Megatron-Core's all-to-all token dispatcher does); the
    backward reuses the splits. Results equal the single-process dropless
    layer on the global batch up to float reassociation.

Global losses and statistics (also of layers without expert parallelism
that have a statistics group: ``MoE(stats_group=...)``, global-batch load
balancing under plain data parallelism)
  The balancing loss E * sum_e f_e P_e uses the expert counts and the sum of
  router probabilities over the statistics group (default for expert-parallel
  layers: the whole world, i.e. data parallel x expert parallel;
  ``set_stats_group``), so its value is
  the single-process loss of the global batch. The z-loss, router entropy,
  load, kept and dropped fraction are global too. The float sums travel
  through an autograd-aware all_gather (then a fixed-order sum), whose
  backward sums the upstream gradients of all G ranks of the group: since
  every rank computes the same global loss, each rank's local scores receive
  G times their share of the global gradient. Gradient averaging over the G
  ranks (DDP, or :func:`sync_gradients`) then gives
  mean_r(G * g_r) = sum_r g_r = the gradient of the global-batch loss.
  (The task loss convention is the usual one: each rank's loss is the mean
  over its own tokens, so averaging over ranks gives the global mean.)

Expert gradients
  A local expert's weights get gradients only from the rows routed to it,
  from every rank of its expert-parallel group. With each rank's loss a mean
  over its own T_local tokens, the gradient of the global-batch mean is the
  SUM over the data-parallel replicas of a shard divided by the world size
  N = D*W (not by D). :func:`sync_gradients` does exactly that; when you use
  DDP over the 'data' dimension for expert parameters instead, also divide
  their gradients by W (Megatron-Core scales expert gradients the same way).

Determinism: all_to_all_single has a fixed layout (source-rank order), the
expert buffers are assembled in fixed order and every all-reduce here is an
all_gather followed by a sum in rank order, so results do not depend on
message arrival order.

Checkpoints: each rank's expert weights have the names of every other
rank's, which torch.distributed.checkpoint takes for replicas (it keeps one
rank's); :func:`distributed_checkpointing` makes the state dicts hold them
as DTensors sharded over the group. Without it, save per rank.

Errors: a forward collective that fails or times out (the process group's timeout)
raises a RuntimeError naming the layer (its qualified name after
:func:`name_layers`, else ``MoE#<n>``, numbered in construction order) and the
collective. Bad setups (E not divisible by W, ranks disagreeing on the layer
configuration or on group membership) raise ValueError on every rank at
construction, which is collective over the world: every rank constructs
every expert-parallel layer in the same order. A statistics group without
expert parallelism is checked likewise over its members when it is given
(``MoE(stats_group=...)`` or :func:`set_stats_group`); such a layer
aggregates in training forwards only (eval forwards, ``generate()``, stay
local and need no other rank). Collectives in backward
(autograd's reverse all_to_all and reduce-scatter) raise the process group's
own error, without the layer name.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

_layer_ids = itertools.count()


def _fc():
    import torch.distributed._functional_collectives as fc
    return fc


def _resolve_group(group, what: str = "MoE: expert_parallel"):
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh (a mesh
    dimension); ``what`` names the argument in errors."""
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{what} must be a 1-D DeviceMesh (a mesh dimension such as "
                f"mesh['expert']) or a ProcessGroup, got a {group.ndim}-D mesh "
                f"with dimensions {group.mesh_dim_names}")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise ValueError(f"{what} must be a ProcessGroup or a 1-D DeviceMesh, got "
                     f"{type(group).__name__}")


class ExpertParallel:
    """Per-layer expert-parallel state (held as ``moe._ep``)."""

    def __init__(self, group, num_experts: int, name: str, mesh=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.world
        self.first_expert = self.rank * self.num_local
        self.name = name
        self.stats_group = dist.group.WORLD
        self._meshes = {} if mesh is None else {mesh.device_type: mesh}

    def mesh(self, device_type: str):
        """The 1-D DeviceMesh of the group (the one the layer was given, or
        one made from its process group), for DTensors on ``device_type``."""
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh
            self._meshes[device_type] = DeviceMesh.from_group(self.group, device_type)
        return self._meshes[device_type]

    def sharded(self, local: torch.Tensor):
        """This rank's [E/W, ...] expert tensor as a DTensor of the whole
        [E, ...] one, sharded over the group (no copy)."""
        from torch.distributed.tensor import DTensor, Shard
        shape = torch.Size([self.num_experts, *local.shape[1:]])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh(local.device.type), [Shard(0)],
                                  run_check=False, shape=shape, stride=stride)

    def local(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a loaded value: a DTensor (resharded when
        its layout is another one: a collective), a whole [E, ...] tensor,
        or already the local [E/W, ...] one."""
        from torch.distributed.tensor import DTensor, Shard
        if isinstance(value, DTensor):
            mesh = value.device_mesh
            if (tuple(value.placements) == (Shard(0),) and mesh.ndim == 1
                    and dist.get_process_group_ranks(mesh.get_group())
                    == dist.get_process_group_ranks(self.group)):
                return value.to_local()
            value = value.full_tensor()  # another layout: a collective
        if value.dim() >= 1 and value.shape[0] == self.num_experts != self.num_local:
            return value[self.first_expert:self.first_expert + self.num_local]
        return value

    def __deepcopy__(self, memo):  # process groups are shared, not copied
        return self

    def __repr__(self):
        return (f"ExpertParallel(name={self.name!r}, world={self.world}, rank={self.rank}, "
                f"experts=[{self.first_expert}, {self.first_expert + self.num_local}))")

    def where(self) -> str:
        return f"expert-parallel rank {self.rank} of {self.world}"


class GlobalStats:
    """The statistics group of a layer without expert parallelism (held as
    ``moe._global_stats``): under data parallelism its training forwards'
    balancing loss, z-loss and statistics are those of the global batch
    (global-batch load balancing). Made by ``MoE(stats_group=...)`` or
    :func:`set_stats_group`. A deep copy gets its own (same group); a pickle
    gets none (process groups do not pickle): re-attach with
    :func:`set_stats_group`."""

    def __init__(self, group, name: Optional[str] = None):
        self.stats_group = group
        self.name = name or f"MoE#{next(_layer_ids)}"

    def __deepcopy__(self, memo):  # the process group is shared, the state not
        return GlobalStats(self.stats_group, self.name)

    def __reduce__(self):  # process groups do not pickle: an unpickled layer has none
        return _no_global_stats, ()

    def __repr__(self):
        return f"GlobalStats(name={self.name!r})"

    def where(self) -> str:
        return (f"rank {dist.get_rank(self.stats_group)} of "
                f"{dist.get_world_size(self.stats_group)} of its statistics group")


def _no_global_stats() -> None:
    return None


def stats_group_of(group, layers) -> Optional[dist.ProcessGroup]:
    """``group`` (a ProcessGroup or a 1-D DeviceMesh) checked for ``layers``
    [(routing, num_experts, k)], the MoE layers that will aggregate over it:
    a collective over the group, so every member raises the same ValueError
    when members disagree on the layers (instead of hanging in a forward)."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("MoE: stats_group needs an initialised torch.distributed process "
                         "group (dist.init_process_group)")
    # new_group() hands ranks outside the group a marker, not a group.
    if (isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER) or (
            isinstance(group, dist.ProcessGroup) and dist.get_rank(group) < 0):
        raise ValueError(f"MoE: this rank (global rank {dist.get_rank()}) is not a member of "
                         "stats_group")
    group = _resolve_group(group, "MoE: stats_group")
    for routing, _, _ in layers:
        if routing != "tokens":  # the same on every rank: their configurations agree
            raise ValueError(f"MoE: stats_group needs routing='tokens' (its balancing loss is "
                             f"what it aggregates), got routing={routing!r}")
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(layers), group=group)
    for rank, theirs in enumerate(gathered):
        if theirs != gathered[0]:
            raise ValueError(
                f"MoE: the members of stats_group disagree on the layers that aggregate over "
                f"it (routing, num_experts, k): group rank 0 has {gathered[0]}, group rank "
                f"{rank} has {theirs}")
    return group


def setup(moe: nn.Module, expert_parallel, *, num_experts: int, k: int, d_model: int,
          d_hidden: int, capacity_factor, routing: str) -> ExpertParallel:
    """Validates the expert-parallel configuration on every rank (a collective
    over the world) and returns the layer's :class:`ExpertParallel`."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("MoE: expert_parallel needs an initialised torch.distributed "
                         "process group (dist.init_process_group)")
    group = _resolve_group(expert_parallel)
    W = dist.get_world_size(group)
    name = f"MoE#{next(_layer_ids)}"
    members = tuple(dist.get_process_group_ranks(group))
    config = dict(num_experts=num_experts, k=k, d_model=d_model, d_hidden=d_hidden,
                  capacity_factor=capacity_factor, routing=routing, group=members)
    # Every rank sees every rank's configuration, so every rank raises the
    # same error (nobody is left waiting in a later collective).
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, config)
    me = dist.get_rank()
    for rank, theirs in enumerate(gathered):  # checked by every rank, for every rank
        for member in theirs["group"]:
            if gathered[member]["group"] != theirs["group"]:
                raise ValueError(
                    f"MoE ({name}): mismatched expert-parallel groups: global rank {rank} uses "
                    f"ranks {list(theirs['group'])} but global rank {member} uses ranks "
                    f"{list(gathered[member]['group'])}; every rank of a group must pass the "
                    "same group (mesh dimension)")
    for rank in members:
        other = gathered[rank]
        diff = {key: (config[key], other[key]) for key in config if config[key] != other[key]}
        if diff:
            raise ValueError(
                f"MoE ({name}): ranks of the expert-parallel group disagree on the layer "
                f"configuration (rank {me} vs rank {rank}): {diff}")
    if routing != "tokens":
        raise ValueError("MoE: expert_parallel supports routing='tokens' only")
    if num_experts % W != 0:
        raise ValueError(f"MoE: num_experts E={num_experts} must be divisible by the "
                         f"expert-parallel size W={W}")
    from torch.distributed.device_mesh import DeviceMesh
    mesh = expert_parallel if isinstance(expert_parallel, DeviceMesh) else None
    return ExpertParallel(group, num_experts, name, mesh)


def name_layers(model: nn.Module, prefix: str = "") -> None:
    """Names every expert-parallel (or global-statistics) MoE of ``model`` by
    its qualified name, used in error messages of failing collectives."""
    from .layers import MoE
    for name, module in model.named_modules(prefix=prefix):
        context = module._stats_context() if isinstance(module, MoE) else None
        if context is not None:
            context.name = name or context.name


def set_stats_group(model: nn.Module, group) -> None:
    """Sets the group (a ProcessGroup or 1-D DeviceMesh) over which the
    balancing loss, z-loss, statistics and (by default) the bias update of
    every MoE of ``model`` are aggregated. Expert-parallel layers default to
    the whole world, and the group must contain their expert-parallel group;
    a layer without expert parallelism aggregates nothing until given one
    (then it is as ``MoE(stats_group=group)``: global-batch load balancing
    under data parallelism, in training forwards). ``None`` switches that
    off again (expert-parallel layers go back to the world). The router's
    gradients must be averaged over exactly this group (DDP over it does).
    Collective over the group: every member calls it, with the same model;
    every layer is checked before any changes."""
    from .layers import MoE
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    plain = [(m.routing, m.num_experts, m.k) for m in layers if m._ep is None]
    group = stats_group_of(group, plain)
    for module in layers:
        if module._ep is not None:
            module._ep.stats_group = dist.group.WORLD if group is None else group
        elif group is None:
            module._global_stats = None
        elif module._global_stats is not None:
            module._global_stats.stats_group = group
        else:
            module._global_stats = GlobalStats(group)


class _Guard:
    """Re-raises a failing collective's error with the layer's name."""

    def __init__(self, ep: ExpertParallel, what: str):
        self.ep, self.what = ep, what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and isinstance(error, (RuntimeError, dist.DistError)):
            raise RuntimeError(
                f"moe_routing.parallel: collective {self.what} of layer {self.ep.name!r} "
                f"({self.ep.where()}) failed: {error}"
            ) from error
        return False


def _collective(ep: ExpertParallel, what: str, fn):
    if torch.compiler.is_compiling():
        return fn()
    with _Guard(ep, what):
        out = fn()
        if isinstance(out, torch.Tensor):
            out = _fc().wait_tensor(out)
        return out


def _all_to_all(ep, x, out_splits=None, in_splits=None, what="all_to_all"):
    return _collective(ep, what, lambda: _fc().all_to_all_single_autograd(
        x.contiguous(), out_splits, in_splits, ep.group))


def _gather_fn(differentiable):
    fc = _fc()
    if differentiable:  # all_gather_single* in newer torch, all_gather_tensor* before
        return getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def _sum_over(ep, group, x, what, differentiable=True):
    """Sum of x over ``group`` as all_gather + a sum in rank order
    (deterministic); its backward sums the upstream gradients of every rank."""
    gather = _gather_fn(differentiable)
    n = dist.get_world_size(group)
    out = _collective(ep, what, lambda: gather(x.contiguous()[None], 0, group))
    parts = out.view(n, *x.shape).unbind(0)
    total = parts[0]
    for part in parts[1:]:
        # Added in rank order rather than with sum(0), whose backward hands the
        # gather an expanded (stride-0) gradient that torch 2.11's refuses.
        total = total + part
    return total


# ----------------------------------------------------------------- forward

def run_experts(moe, rows: torch.Tensor, kept: torch.Tensor, C) -> torch.Tensor:
    """The expert step of an expert-parallel layer: rows [E*C, H] (capacity)
    or the packed [T*k, H] (dropless, ``kept`` [E] rows per expert) of this
    rank's tokens -> the expert outputs in the same layout."""
    if C is None:
        return _run_dropless(moe, rows, kept)
    ep, E, H = moe._ep, moe.num_experts, rows.shape[-1]
    W, El = ep.world, ep.num_local
    _check_capacity_agrees(ep, C, rows.device)
    # [E, C, H] = [W (destination), El, C, H]: one fixed block per rank.
    received = _all_to_all(ep, rows, what="all_to_all(dispatch)")
    # [W (source), El, C, H] -> expert-major [El, W*C, H]
    buffer = received.view(W, El, C, H).transpose(0, 1).reshape(El, W * C, H)
    out = moe.experts(buffer)
    back = out.view(El, W, C, H).transpose(0, 1).reshape(E * C, H)
    return _all_to_all(ep, back, what="all_to_all(combine)").view(E * C, H)


def _check_capacity_agrees(ep, C, device) -> None:
    """Every rank of the group must plan the same capacity C: the exchange
    sends fixed [E/W, C, H] blocks, and blocks of other sizes abort gloo's
    process (NCCL does not check). Checked in eager mode with CPU
    tensors, where it costs no device synchronisation, and on every device
    under TORCH_DISTRIBUTED_DEBUG=DETAIL; every rank raises the same error."""
    if torch.compiler.is_compiling() or (
            device.type != "cpu" and dist.get_debug_level() != dist.DebugLevel.DETAIL):
        return
    mine = torch.tensor([C], dtype=torch.int64, device=device)
    capacities = _collective(ep, "all_gather(capacity)",
                             lambda: _gather_fn(False)(mine, 0, ep.group)).tolist()
    if len(set(capacities)) > 1:
        raise ValueError(
            f"MoE ({ep.name}): the capacity layout needs the same capacity on every rank of "
            f"the expert-parallel group, got C = {capacities} by rank: the ranks passed "
            "different numbers of tokens. Pad every rank's batch to the same shape and "
            "pass a mask, or use capacity_factor=None (dropless)")


def _run_dropless(moe, rows, kept):
    ep, H = moe._ep, rows.shape[-1]
    W, El = ep.world, ep.num_local
    # Counts: send_counts[d, e] = rows of this rank for expert d*El + e.
    send_counts = kept.view(W, El)
    recv_counts = _all_to_all(ep, send_counts, what="all_to_all(counts)").view(W, El)
    # The single host synchronisation of the layer: splits for the exchange.
    both = torch.cat([send_counts.sum(1), recv_counts.reshape(-1)]).tolist()
    in_splits, recv = both[:W], both[W:]
    out_splits = [sum(recv[s * El:(s + 1) * El]) for s in range(W)]
    sent = sum(in_splits)
    received = _all_to_all(ep, rows[:sent], out_splits, in_splits, what="all_to_all(dispatch)")
    # received is source-major (source s, then its local experts); regroup
    # expert-major for the grouped products, in fixed (expert, source) order.
    starts, pos = [], 0
    for c in recv:
        starts.append(pos)
        pos += c
    order = [torch.arange(starts[s * El + e], starts[s * El + e] + recv[s * El + e])
             for e in range(El) for s in range(W)]
    index = (torch.cat(order) if order else torch.zeros(0, dtype=torch.long)).to(rows.device)
    per_expert = recv_counts.sum(0)
    out = moe.experts(received.index_select(0, index), per_expert)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    back = _all_to_all(ep, out.index_select(0, inverse), in_splits, out_splits,
                       what="all_to_all(combine)")
    pad = rows.new_zeros(rows.shape[0] - sent, H)
    return torch.cat([back, pad])


def forward(moe, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoE.forward of an expert-parallel layer, or of one with a statistics
    group (the same steps as the single-process forward, with global losses
    and statistics)."""
    from .layers import _in_backward, _is_exporting, _warn_if_losses_lost
    ep = moe._stats_context()
    shape = x.shape
    valid = None if mask is None else mask.reshape(-1)
    r, y, load, kept, _ = moe._route_and_run(x, valid)
    if _is_exporting():
        return y.view(shape)
    balance, z, stats = global_losses_and_stats(ep, r, load, kept, valid, moe.num_experts, moe.k,
                                                moe.router.score)
    aux = moe.aux_loss_weight * balance + moe.z_loss_weight * z
    if _in_backward():
        return y.view(shape)
    _warn_if_losses_lost(moe)
    moe.aux_loss = aux
    moe.stats = stats
    return y.view(shape)


def global_losses_and_stats(ep, r, load, kept, valid, E, k, score):
    """Balancing loss, z-loss and statistics over ``ep.stats_group`` (see the
    module docstring for the gradient convention)."""
    from .layers import balancing_scores, token_entropy
    group = ep.stats_group
    scores = balancing_scores(r.scores, score)
    n_local = (torch.tensor(scores.shape[0], device=scores.device) if valid is None
               else valid.sum())
    # Padding rows are selected out (torch.where), not multiplied by 0, so a
    # non-finite padding row cannot turn the global sums into NaN.
    def masked(values):
        return values if valid is None else torch.where(
            valid.reshape(-1, *[1] * (values.dim() - 1)), values, torch.zeros_like(values))
    score_sum = masked(scores).sum(0)  # [E]
    lse = torch.logsumexp(r.logits.to(scores.dtype), dim=-1)  # float32, or float64 for float64 logits
    z_sum = masked(lse ** 2).sum()
    ent_sum = masked(token_entropy(r.scores.detach())).sum()
    counts = torch.cat([load, kept, n_local.reshape(1).long()])
    counts = _sum_over(ep, group, counts, "all_gather(counts)", differentiable=False)
    floats = torch.cat([score_sum, z_sum.reshape(1), ent_sum.reshape(1).to(score_sum.dtype)])
    floats = _sum_over(ep, group, floats, "all_gather(router sums)")
    load_g, kept_g, n_g = counts[:E], counts[E:2 * E], counts[2 * E]
    n = n_g.clamp_min(1).to(scores.dtype)
    f = load_g.to(scores.dtype) / (n * k)
    P = floats[:E] / n
    balance = E * (f * P).sum()
    z = floats[E] / n
    load_f = load_g.float()
    stats = {
        "load": load_g,
        "kept": kept_g,
        "dropped_fraction": (1.0 - kept_g.sum() / load_g.sum().clamp_min(1)).detach(),
        "router_entropy": (floats[E + 1] / n).detach().float(),
        "max_over_mean_load": load_f.max() / load_f.mean().clamp_min(1e-30),
        "balance_loss": balance.detach(),
        "z_loss": z.detach(),
    }
    return balance, z, stats


# --------------------------------------------------- meshes and gradients

def expert_data_mesh(world_size: int, expert_parallel_size: int, device_type: str = "cpu"):
    """The 2-D DeviceMesh (data x expert) of shape
    (world_size // expert_parallel_size, expert_parallel_size) with dimension
    names ("data", "expert"): global rank = d * W + e, so an expert-parallel
    group is W consecutive ranks. Pass ``mesh["expert"]`` to
    ``MoE(expert_parallel=...)``."""
    from torch.distributed.device_mesh import init_device_mesh
    if expert_parallel_size < 1 or world_size % expert_parallel_size != 0:
        raise ValueError(f"expert_data_mesh: world_size={world_size} must be divisible by "
                         f"expert_parallel_size={expert_parallel_size}")
    return init_device_mesh(device_type, (world_size // expert_parallel_size,
                                          expert_parallel_size),
                            mesh_dim_names=("data", "expert"))


def expert_parameters(model: nn.Module) -> list:
    """Qualified names of the expert-parallel (sharded) parameters of ``model``."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(getattr(module, "_ep", None), ExpertParallel):
            for pname, _ in module.experts.named_parameters():
                names.append(f"{prefix}.experts.{pname}" if prefix else f"experts.{pname}")
    return names


def reduction_dims(model: nn.Module) -> dict:
    """Parameter name -> the mesh dimensions its gradient is reduced over:
    ("data",) for expert-parallel expert weights (their replicas are the
    data-parallel copies of the same shard), ("data", "expert") (the whole
    world) for everything else (router, shared experts, attention, ...)."""
    sharded = set(expert_parameters(model))
    return {name: (("data",) if name in sharded else ("data", "expert"))
            for name, _ in model.named_parameters()}


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh, params: str = "all") -> None:
    """Averages gradients for data x expert parallelism without DDP: expert
    weights are summed over mesh["data"] and divided by the world size N
    (see the module docstring), every other parameter is summed over the
    whole mesh and divided by N. ``params``: "all", "expert" (only the
    sharded expert weights: use with DDP on the rest) or "replicated".
    Collective over the whole mesh; sums are all_gather + rank-order sums, so
    the result is deterministic.

    With DDP: ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
    model, expert_parameters(model))`` before wrapping, then
    ``sync_gradients(model, mesh, params="expert")`` after backward. With
    FSDP2: ``fully_shard(model, mesh=<1-D world mesh>, ignored_params={the
    expert parameters})``, then the same call."""
    if params not in ("all", "expert", "replicated"):
        raise ValueError(f"sync_gradients: params must be 'all', 'expert' or 'replicated', "
                         f"got {params!r}")
    dims = reduction_dims(model)
    named = dict(model.named_parameters())
    total = mesh.size()
    buckets = {("data",): [], ("data", "expert"): []}
    for name, dim in dims.items():
        p = named[name]
        if p.grad is None:
            continue
        if (params == "expert" and dim != ("data",)) or (params == "replicated" and dim == ("data",)):
            continue
        buckets[dim].append(p)
    fc = _fc()
    for dim, ps in buckets.items():
        if not ps:
            continue
        groups = {}
        for p in ps:
            groups.setdefault(p.grad.dtype, []).append(p)
        group = mesh["data"].get_group() if dim == ("data",) else None
        for dtype, same in groups.items():
            flat = torch.cat([p.grad.reshape(-1) for p in same])
            if group is None:
                n = total
                gathered = _gather_fn(False)(flat[None], 0, _mesh_world(mesh))
            else:
                n = dist.get_world_size(group)
                gathered = _gather_fn(False)(flat[None], 0, group)
            flat = fc.wait_tensor(gathered).view(n, -1).sum(0) / total
            offset = 0
            for p in same:
                p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
                offset += p.grad.numel()


def distributed_checkpointing(model: nn.Module, *optimizers: torch.optim.Optimizer) -> None:
    """Makes the state dicts of ``model`` and of ``optimizers`` hold each
    expert-parallel layer's expert weights, and the optimizer state of
    those (Adam's moments), as DTensors of the whole [E, ...] tensors,
    sharded over the layer's expert-parallel group (Shard(0)), and their
    load_state_dict take such DTensors, this rank's [E/W, ...] tensors or
    whole [E, ...] ones. Without it torch.distributed.checkpoint takes the
    ranks' same-named plain tensors for replicas and saves one rank's
    experts alone; with it, the usual ``get_state_dict`` / ``dcp.save`` /
    ``dcp.load`` / ``set_state_dict`` round trip restores every rank's, and
    the checkpoint also loads into another expert-parallel size or a layer
    without expert parallelism. Call it on every rank, once the optimizers
    exist; plain ``torch.save`` of such state dicts pickles DTensors."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "_ep", None), ExpertParallel)]
    for moe in layers:  # a second call (a new optimizer) adds no second hook
        if not moe.experts.__dict__.get("_sharded_state_dict"):
            hooks = _ShardedExperts(moe._ep)
            moe.experts._register_state_dict_hook(hooks.save)
            moe.experts._register_load_state_dict_pre_hook(hooks.load, with_module=True)
            moe.experts._sharded_state_dict = True
    owners = {id(p): moe._ep for moe in layers for p in moe.experts.parameters()}
    for optimizer in optimizers:
        if optimizer.__dict__.get("_sharded_state_dict"):
            continue
        optimizer.register_state_dict_post_hook(_ShardedOptimizerState(owners, wrap=True))
        optimizer.register_load_state_dict_pre_hook(_ShardedOptimizerState(owners, wrap=False))
        optimizer._sharded_state_dict = True


class _ShardedExperts:
    """State-dict hooks of an expert-parallel layer's experts (see
    :func:`distributed_checkpointing`)."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep

    def save(self, module, state_dict, prefix, _metadata) -> None:
        for name, _ in module.named_parameters(recurse=False):
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.ep.sharded(state_dict[prefix + name])

    def load(self, module, state_dict, prefix, *_) -> None:
        for name, _ in module.named_parameters(recurse=False):
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.ep.local(state_dict[prefix + name])


class _ShardedOptimizerState:
    """Optimizer hooks: the state of expert-parallel parameters as DTensors
    in ``state_dict()`` (``wrap``), back to this rank's tensors in
    ``load_state_dict``. Saved states are matched to parameters by position
    in the parameter groups, whatever their keys (indices, or the qualified
    names torch.distributed.checkpoint puts there)."""

    def __init__(self, owners: dict, wrap: bool):
        self.owners, self.wrap = owners, wrap

    def __call__(self, optimizer, state_dict):
        state = state_dict["state"]
        for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
            for param, key in zip(group["params"], saved["params"]):
                ep = self.owners.get(id(param))
                if ep is None or key not in state:
                    continue
                converted = {}  # a new dict: state_dict() shares the optimizer's own
                for name, value in state[key].items():
                    if self.wrap and isinstance(value, torch.Tensor) \
                            and value.shape == param.shape:  # not Adam's scalar step
                        value = ep.sharded(value)
                    elif not self.wrap and isinstance(value, torch.Tensor) \
                            and value.dim() >= 1 and value.shape[1:] == param.shape[1:]:
                        value = ep.local(value)  # a DTensor, a whole or a local tensor
                    converted[name] = value
                state[key] = converted
        return state_dict


def _mesh_world(mesh):
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()
