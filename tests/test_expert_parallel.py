"""Expert parallelism (moe_routing.parallel) on CPU with gloo: spawned
processes compare the expert-parallel layer with the single-process layer on
the same global batch and weights. Several checks share one spawn to keep the
file fast on small machines."""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_routing as mr
from moe_routing import parallel

from conftest import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ equality

def _make_pair(world, rank, group, E, k, H=8, Fh=16, seed=0, dead_expert=False, **options):
    """A single-process reference MoE and an expert-parallel copy with the
    same weights (experts sliced)."""
    torch.manual_seed(seed)
    ref = mr.MoE(H, Fh, E, k, **options)
    if dead_expert:  # expert 0 is never chosen: inputs are positive, its row negative
        with torch.no_grad():
            ref.router.weight[0] = -1.0
    with torch.no_grad():  # biases (GPT-OSS's) start at zero: make them matter
        for bias in (ref.router.logit_bias, ref.experts.b_in, ref.experts.b_out):
            if bias is not None:
                bias.normal_()
    ep = mr.MoE(H, Fh, E, k, expert_parallel=group, **options)
    El = E // world
    assert ep.experts.w_in.shape == (El, H, ep.experts.w_in.shape[-1])
    assert ep.experts.w_out.shape == (El, Fh, H)
    sd = {name: t for name, t in ref.state_dict().items()}
    for name in sd:
        if name.startswith("experts."):  # weights and biases, [E, ...] each
            sd[name] = sd[name][rank * El:(rank + 1) * El]
    ep.load_state_dict(sd)
    return ref, ep


def _reference(ref, x, mask, world, per_rank_capacity):
    """Single-process reference on the global batch x [W*T, H]: dropless on
    the whole batch; capacity as W separate plans (one per rank's slice),
    concatenated. The losses are those of the global batch."""
    if per_rank_capacity:
        ys, kept = [], 0
        for xs, ms in zip(x.chunk(world), (mask.chunk(world) if mask is not None
                                          else [None] * world)):
            ys.append(ref(xs, ms))
            kept = kept + ref.stats["kept"]
        y = torch.cat(ys)
    else:
        y = ref(x, mask)
        kept = ref.stats["kept"]
    r = ref.router(x, mask)
    # a sigmoid router's scores, normalised per token (DeepSeek-V3's affinities)
    scores = r.scores if ref.router.score == "softmax" else r.scores / r.scores.sum(-1, keepdim=True)
    balance = mr.load_balancing_loss(scores, r.experts, mask=mask)
    z = mr.z_loss(r.logits, mask=mask)
    aux = ref.aux_loss_weight * balance + ref.z_loss_weight * z
    stats = mr.routing_stats(r.scores.detach(), mr.expert_load(r.experts, ref.num_experts, mask),
                             kept, torch.zeros(()), mask)
    stats.update(balance_loss=balance.detach(), z_loss=z.detach())
    return y, aux, stats


def _check_equal(rank, world, mesh, case):
    E, k = case["E"], case["k"]
    options = dict(case.get("options", {}))
    T = case.get("T", 12)
    ref, ep = _make_pair(world, rank, mesh["expert"], E, k, dead_expert=case.get("dead", False),
                         **options)
    torch.manual_seed(100)
    x = torch.randn(world * T, 8)
    if case.get("dead", False):
        x = x.abs()
    mask = None
    if case.get("padding", False):
        mask = torch.rand(world * T) > 0.3
        mask[T:2 * T] = False  # rank 1 holds only padding
    g = torch.randn(world * T, 8)
    capacity = options.get("capacity_factor", 1.25) is not None
    y_ref, aux_ref, stats_ref = _reference(ref, x, mask, world, capacity)
    loss_ref = (y_ref * g).sum() / (world * T) + aux_ref
    loss_ref.backward()

    sl = slice(rank * T, (rank + 1) * T)
    y = ep(x[sl], None if mask is None else mask[sl])
    loss = (y * g[sl]).sum() / T + ep.aux_loss
    loss.backward()
    parallel.sync_gradients(ep, mesh)
    name = case["name"]
    _close(y, y_ref[sl].detach(), f"{name} output")
    _close(ep.aux_loss, aux_ref, f"{name} aux_loss")
    for key in ("load", "kept"):
        assert torch.equal(ep.stats[key], stats_ref[key]), (name, key, ep.stats[key], stats_ref[key])
    for key in ("balance_loss", "z_loss", "router_entropy", "max_over_mean_load"):
        _close(ep.stats[key], stats_ref[key], f"{name} stats[{key}]")
    El = E // world
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in ep.named_parameters():
        expected = grads_ref[n]
        if n.startswith("experts."):
            expected = expected[rank * El:(rank + 1) * El]
        _close(p.grad, expected, f"{name} grad {n}", rtol=RTOL, atol=1e-6)
    if case.get("dead", False):
        assert ep.stats["load"][0] == 0


CASES_2 = [
    dict(name="dropless uneven + padding rank", E=8, k=2, padding=True,
         options=dict(capacity_factor=None)),
    dict(name="capacity drops, per-rank capacity", E=4, k=2, T=16,
         options=dict(capacity_factor=0.5, min_capacity=1)),
    dict(name="capacity score priority + renormalize", E=4, k=2, padding=True,
         options=dict(capacity_factor=1.0, min_capacity=1, priority="score",
                      renormalize_after_drop=True)),
    dict(name="dead expert dropless swiglu shared", E=4, k=1, dead=True,
         options=dict(capacity_factor=None, activation="swiglu", shared_hidden=8,
                      score="sigmoid")),
    dict(name="E/W=1 capacity scale_inputs", E=2, k=1,
         options=dict(capacity_factor=1.25, scale_inputs=True)),
    dict(name="k=E dropless", E=4, k=4, options=dict(capacity_factor=None)),
    dict(name="k=E capacity", E=4, k=4, options=dict(capacity_factor=1.0)),
    dict(name="GPT-OSS biases dropless + padding", E=4, k=2, padding=True,
         options=dict(capacity_factor=None, activation="swiglu_oai", expert_bias=True,
                      logit_bias=True)),
    dict(name="GPT-OSS biases capacity drops", E=4, k=2, T=16,
         options=dict(capacity_factor=0.5, min_capacity=1, activation="swiglu_oai",
                      expert_bias=True, logit_bias=True)),
]

CASES_4 = [
    dict(name="dropless uneven + padding rank (W=4)", E=8, k=2, padding=True,
         options=dict(capacity_factor=None)),
    dict(name="capacity drops (W=4)", E=8, k=2, T=10,
         options=dict(capacity_factor=0.5, min_capacity=1)),
    dict(name="E/W=1 k=E (W=4)", E=4, k=4, options=dict(capacity_factor=None)),
    dict(name="dead expert capacity (W=4)", E=8, k=2, dead=True,
         options=dict(capacity_factor=1.0)),
]


def _equality_worker(rank, world, cases, extra):
    mesh = parallel.expert_data_mesh(world, world)
    for case in cases:
        _check_equal(rank, world, mesh, case)
    if "compile" in extra:
        _check_compile(rank, world, mesh)
        _check_deterministic(rank, world, mesh)
        _check_fsdp2(rank, world, mesh)
    if "errors" in extra:
        _check_errors(rank, world)


def _check_compile(rank, world, mesh):
    """Capacity layout under torch.compile(fullgraph=True): functional
    collectives trace without a graph break and match eager."""
    ref, ep = _make_pair(world, rank, mesh["expert"], 4, 2, capacity_factor=1.0)
    torch.manual_seed(7)
    x = torch.randn(12, 8, requires_grad=True)
    y_eager = ep(x)
    (y_eager.sum() + ep.aux_loss).backward()
    g_eager = [p.grad.clone() for p in ep.parameters()]
    ep.zero_grad()
    compiled = torch.compile(ep, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (y.sum() + ep.aux_loss).backward()
    _close(y, y_eager, "compiled output")
    for p, g in zip(ep.parameters(), g_eager):
        _close(p.grad, g, "compiled grad")


def _check_deterministic(rank, world, mesh):
    """Same inputs twice: bitwise the same outputs and gradients (fixed
    all_to_all layout, rank-order sums); and which dimension reduces what."""
    _, ep = _make_pair(world, rank, mesh["expert"], 8, 2, capacity_factor=None)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rank))
    results = []
    for _ in range(2):
        ep.zero_grad()
        y = ep(x)
        (y.square().sum() + ep.aux_loss).backward()
        results.append([y.detach()] + [p.grad.clone() for p in ep.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    dims = parallel.reduction_dims(ep)
    assert dims["experts.w_in"] == ("data",) and dims["router.weight"] == ("data", "expert")


def _check_fsdp2(rank, world, mesh):
    """FSDP2 (fully_shard) on the replicated parameters, the expert weights
    ignored by it and synced by sync_gradients: the global-batch gradients."""
    import inspect

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        return  # torch 2.6's fully_shard cannot leave the expert weights to us

    def build(expert_parallel=None):
        return torch.nn.Sequential(
            torch.nn.Embedding(32, 16),
            mr.MoE(16, 32, 4, 2, capacity_factor=None, expert_parallel=expert_parallel),
            torch.nn.Linear(16, 32))

    torch.manual_seed(0)
    ref, model = build(), build(mesh["expert"])
    El = 4 // world
    sd = dict(ref.state_dict())
    for name in ("1.experts.w_in", "1.experts.w_out"):
        sd[name] = sd[name][rank * El:(rank + 1) * El]
    model.load_state_dict(sd)
    sharded = set(parallel.expert_parameters(model))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)),
                ignored_params={p for n, p in model.named_parameters() if n in sharded})
    ids = torch.randint(0, 32, (world * 2, 8), generator=torch.Generator().manual_seed(0))
    (F.cross_entropy(ref(ids).reshape(-1, 32), ids.reshape(-1)) + mr.aux_loss(ref)).backward()
    mine = ids[2 * rank:2 * rank + 2]
    (F.cross_entropy(model(mine).reshape(-1, 32), mine.reshape(-1))
     + mr.aux_loss(model)).backward()
    parallel.sync_gradients(model, mesh, params="expert")
    _close(model[1].router.weight.grad.full_tensor(), ref[1].router.weight.grad, "fsdp2 router")
    _close(model[2].weight.grad.full_tensor(), ref[2].weight.grad, "fsdp2 head")
    _close(model[1].experts.w_in.grad, ref[1].experts.w_in.grad[rank * El:(rank + 1) * El],
           "fsdp2 w_in")


def _check_errors(rank, world):
    # E not divisible by W: the same clear error on every rank.
    with pytest.raises(ValueError, match=r"MoE.*E=3.*W=2"):
        mr.MoE(8, 16, 3, 1, expert_parallel=dist.group.WORLD)
    # Ranks disagree on the layer (here E): every rank raises, none hangs.
    with pytest.raises(ValueError, match="disagree"):
        mr.MoE(8, 16, 4 if rank == 0 else 8, 1, expert_parallel=dist.group.WORLD)
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        mr.MoE(8, 16, 4, 1, expert_parallel=parallel.expert_data_mesh(world, 1))
    # Capacity layout with different token counts per rank: where the
    # capacities differ, the same clear error on every rank (gloo aborted
    # the process before) ...
    _, moe = _make_pair(world, rank, dist.group.WORLD, 4, 2, capacity_factor=1.25)
    with pytest.raises(ValueError, match=r"same capacity on every rank .* got C = \[5, 8\]"):
        moe(torch.randn(8 if rank == 0 else 12, 8))
    # ... and where they agree (T = 8 and 7 both give C = 4), each rank's
    # output is the single-process layer's on its own tokens.
    ref, moe = _make_pair(world, rank, dist.group.WORLD, 4, 2, capacity_factor=1.0)
    x = torch.randn(8 if rank == 0 else 7, 8)
    _close(moe(x), ref(x), "output with different T and the same C")
    # A rank that skips the forward: the other one's collective times out
    # and the error names the layer.
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=2))
    model = torch.nn.ModuleDict({"block0": mr.MoE(8, 16, 4, 1, expert_parallel=group)})
    parallel.name_layers(model)
    if rank == 0:
        # (on CPU the first collective is the capacity check)
        with pytest.raises(RuntimeError, match=r"all_gather\(capacity\) of layer .block0."):
            model["block0"](torch.randn(6, 8))
    dist.barrier()


def test_equal_to_single_process_world2(tmp_path):
    run_distributed(tmp_path, 2, _equality_worker, CASES_2, ("compile", "errors"))


def _world4_worker(rank, world, cases):
    _equality_worker(rank, world, cases, ())
    # 2 x 2 mesh: expert groups {0,1} and {2,3}.
    mesh = parallel.expert_data_mesh(world, 2)
    assert dist.get_process_group_ranks(mesh["expert"].get_group()) == ([0, 1] if rank < 2
                                                                          else [2, 3])
    # Mismatched groups: ranks 0, 1 pass their pair, ranks 2, 3 the world.
    group = mesh["expert"].get_group() if rank < 2 else dist.group.WORLD
    with pytest.raises(ValueError, match="mismatched expert-parallel groups"):
        mr.MoE(8, 16, 4, 1, expert_parallel=group)
    _train(rank, world, mesh)


def test_equal_to_single_process_world4_and_training(tmp_path):
    run_distributed(tmp_path, 4, _world4_worker, CASES_4)


# ------------------------------------------------------------------ training

class _Model(torch.nn.Module):
    def __init__(self, expert_parallel=None, V=32, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, d)
        self.norm = torch.nn.LayerNorm(d)
        self.moe = mr.MoE(d, 32, 4, 2, capacity_factor=None, bias_update_rate=1e-2,
                          expert_parallel=expert_parallel)
        self.head = torch.nn.Linear(d, V)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.moe(self.norm(h))
        return self.head(h)


def _train(rank, world, mesh, steps=20):
    """20 steps of data x expert parallelism (2 x 2) follow one process:
    DDP on the replicated parameters (expert weights ignored), sync_gradients
    for the expert weights, the bias updated from the global load."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    ref = _Model()
    model = _Model(mesh["expert"])
    e = mesh["expert"].get_local_rank()
    sd = dict(ref.state_dict())
    for name in ("moe.experts.w_in", "moe.experts.w_out"):
        sd[name] = sd[name][2 * e:2 * e + 2]
    model.load_state_dict(sd)
    DDP._set_params_and_buffers_to_ignore_for_model(model, parallel.expert_parameters(model))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    B, S, V = 2, 8, 32
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, V, (world * B, S), generator=g)
        logits_ref = ref(ids)
        loss_ref = F.cross_entropy(logits_ref.reshape(-1, V), ids.roll(1, 1).reshape(-1))
        (loss_ref + mr.aux_loss(ref)).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        ref.moe.update_bias()

        mine = ids[rank * B:(rank + 1) * B]
        logits = ddp(mine)
        loss = F.cross_entropy(logits.reshape(-1, V), mine.roll(1, 1).reshape(-1))
        (loss + mr.aux_loss(model)).backward()
        parallel.sync_gradients(model, mesh, params="expert")
        opt.step()
        opt.zero_grad()
        mr.update_bias(model)  # default group: the world
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        _close(global_loss / world, loss_ref.detach(), f"step {step} loss", rtol=1e-4, atol=1e-5)
        _close(model.moe.stats["balance_loss"], ref.moe.stats["balance_loss"],
               f"step {step} balance loss", rtol=1e-4, atol=1e-5)
    assert torch.equal(model.moe.router.bias, ref.moe.router.bias)
    _close(model.moe.experts.w_in, ref.moe.experts.w_in[2 * e:2 * e + 2], "trained w_in",
           rtol=1e-3, atol=1e-4)


# ---------------------------------------- global-batch statistics without EP

def _global_stats_worker(rank, world):
    """Data parallelism without expert parallelism, MoE(stats_group=WORLD):
    each rank's aux loss and statistics are those of the global batch, and
    DDP's averaged gradients and the bias update equal one process's on the
    global batch (not the mean of per-rank losses)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    T, H = 10, 8
    options = dict(capacity_factor=1.0, min_capacity=1, bias_update_rate=0.1, score="sigmoid",
                   aux_loss_weight=0.5, z_loss_weight=0.1)
    torch.manual_seed(0)
    ref = mr.MoE(H, 16, 4, 2, **options)
    moe = mr.MoE(H, 16, 4, 2, stats_group=dist.group.WORLD, **options)
    moe.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    x, g = torch.randn(world * T, H), torch.randn(world * T, H)
    mask = torch.rand(world * T) > 0.3
    mask[T:T + 4] = False  # rank 1 starts with padding

    # The reference: one process, the global batch, capacity per rank's slice
    # (as the ranks plan), losses and statistics over the whole batch.
    y_ref, aux_ref, stats_ref = _reference(ref, x, mask, world, per_rank_capacity=True)
    ((y_ref * g).sum() / (world * T) + aux_ref).backward()
    sl = slice(rank * T, (rank + 1) * T)
    ddp = DDP(moe)
    y = ddp(x[sl], mask[sl])
    ((y * g[sl]).sum() / T + moe.aux_loss).backward()
    _close(y, y_ref[sl].detach(), "output")
    _close(moe.aux_loss, aux_ref, "aux_loss")
    assert torch.equal(moe.stats["load"], stats_ref["load"])
    for key in ("balance_loss", "z_loss", "router_entropy", "max_over_mean_load"):
        _close(moe.stats[key], stats_ref[key], f"stats[{key}]")
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        _close(p.grad, q.grad, f"grad {name}")
    # The per-rank loss would differ: the global one is not the mean of theirs.
    local = mr.MoE(H, 16, 4, 2, **options)
    local.load_state_dict(ref.state_dict())
    local(x[sl], mask[sl])
    assert not torch.allclose(local.aux_loss, aux_ref)
    # set_stats_group gives a plain layer the same behaviour.
    later = mr.MoE(H, 16, 4, 2, **options)
    later.load_state_dict(ref.state_dict())
    # update_bias sums the load over the statistics group by default.
    ref.update_bias()
    moe.update_bias()
    assert torch.equal(moe.router.bias, ref.router.bias) and moe.router.bias.abs().sum() > 0
    parallel.set_stats_group(later, dist.group.WORLD)
    later(x[sl], mask[sl])
    _close(later.aux_loss, aux_ref, "aux_loss after set_stats_group")
    # torch.compile(fullgraph=True): the all-gathers trace.
    compiled = torch.compile(later, fullgraph=True, backend="aot_eager")
    compiled(x[sl], mask[sl])
    _close(later.aux_loss, aux_ref, "compiled aux_loss")
    # model.double(): the global losses are float64 like one process's (the
    # z-loss was summed in float32: off by about 1e-8 relative).
    wide_ref = mr.MoE(H, 16, 4, 2, **options)
    wide_ref.load_state_dict(later.state_dict())
    wide_ref.double()(x.double(), mask)
    wide = copy.deepcopy(later).double()
    wide(x[sl].double(), mask[sl])
    assert wide.aux_loss.dtype == torch.float64
    torch.testing.assert_close(wide.aux_loss, wide_ref.aux_loss, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="MoE: stats_group needs routing='tokens'"):
        mr.MoE(H, 16, 4, 2, routing="experts", stats_group=dist.group.WORLD)
    _check_global_stats_edges(rank, world, later.state_dict(), options, x[sl], mask[sl], aux_ref)


def _check_global_stats_edges(rank, world, state, options, x, mask, aux_ref):
    """What users do around a layer with a statistics group."""
    import pickle
    import warnings
    from torch.utils.checkpoint import checkpoint

    def layer(**extra):
        moe = mr.MoE(8, 16, 4, 2, **{**options, **extra})
        moe.load_state_dict(state)
        return moe

    moe = layer(stats_group=dist.group.WORLD)
    # Eval (generate()) stays local: rank 0 alone evaluates, with no hang.
    if rank == 0:
        with torch.no_grad():
            moe.eval()(x, mask)
        moe.train()
    dist.barrier()
    # A padding row holding inf does not make the global losses NaN.
    poisoned = x.clone()
    poisoned[~mask] = float("inf")
    moe(poisoned, mask)
    assert torch.isfinite(moe.aux_loss) and torch.allclose(moe.aux_loss, aux_ref)
    # Reentrant checkpointing loses the aux loss's gradient: it warns here too.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint(moe, x.requires_grad_(), mask, use_reentrant=True)
    assert any("aux_loss has no gradient" in str(w.message) for w in caught)
    # A deep copy has its own group setting; a pickle has none (local).
    copied = copy.deepcopy(moe)
    parallel.set_stats_group(copied, None)
    assert copied._global_stats is None and moe._global_stats is not None
    unpickled = pickle.loads(pickle.dumps(moe))
    assert unpickled._global_stats is None
    local = layer()
    local(x, mask)
    unpickled(x, mask)
    assert torch.equal(unpickled.aux_loss, local.aux_loss)
    # A 1-D DeviceMesh is a group too.
    from torch.distributed.device_mesh import init_device_mesh
    world_mesh = init_device_mesh("cpu", (world,))
    meshed = layer(stats_group=world_mesh)
    meshed(x, mask)
    _close(meshed.aux_loss, aux_ref, "aux_loss over a mesh")
    # update_bias(group=) takes one as well (FSDP2 users hold a mesh): the
    # same bias as with the process group (before, torch raised that the
    # mesh was no process group).
    by_group, by_mesh = layer(), layer()
    for moe_, group in ((by_group, dist.group.WORLD), (by_mesh, world_mesh)):
        moe_(x, mask)
        moe_.update_bias(group=group)
    assert torch.equal(by_mesh.router.bias, by_group.router.bias)
    assert by_group.router.bias.abs().sum() > 0
    # Members disagreeing on the layer, and a rank outside the group: errors on
    # every rank at construction instead of a hang in the first forward.
    with pytest.raises(ValueError, match="members of stats_group disagree"):
        mr.MoE(8, 16, 4 if rank == 0 else 2, 2, stats_group=dist.group.WORLD)
    only_rank0 = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="is not a member of stats_group"):
            mr.MoE(8, 16, 4, 2, stats_group=only_rank0)


def test_global_batch_statistics_without_expert_parallelism(tmp_path):
    run_distributed(tmp_path, 2, _global_stats_worker)


# ---------------------------------------- torch.distributed.checkpoint

def _checkpoint_worker(rank, world, path):
    """get_state_dict / dcp.save / dcp.load / set_state_dict of an expert-parallel
    model after distributed_checkpointing: every rank gets its own experts and
    their Adam moments back, and the resumed run continues bit for bit (without
    it, DCP keeps one rank's same-named expert tensors for all). Layers given a
    mesh dimension and a process group both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    mesh = parallel.expert_data_mesh(world, world)
    for variant, group in (("mesh", mesh["expert"]), ("group", dist.group.WORLD)):
        def build(seed):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(
                torch.nn.Linear(8, 8),
                mr.MoE(8, 16, 4, 2, capacity_factor=None, expert_parallel=group))
            with torch.no_grad():  # other experts on each rank
                model[1].experts.w_in.copy_(torch.randn(4, 8, 16)[2 * rank:2 * rank + 2])
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(model, optimizer, seed):
            torch.manual_seed(100 * seed + rank)
            out = model(torch.randn(6, 8))
            (out.square().mean() + model[1].aux_loss).backward()
            parallel.sync_gradients(model, mesh)
            optimizer.step()
            optimizer.zero_grad()

        model, optimizer = build(0)
        for i in range(2):
            step(model, optimizer, i)
        parallel.distributed_checkpointing(model, optimizer)
        parallel.distributed_checkpointing(model, optimizer)  # again: no second hook
        model_state, optimizer_state = get_state_dict(model, optimizer)
        assert model_state["1.experts.w_in"].shape == (4, 8, 16)  # the whole tensor, sharded
        dcp.save({"model": model_state, "optim": optimizer_state},
                 checkpoint_id=f"{path}/{variant}")
        w_in = model[1].experts.w_in
        saved = (w_in.detach().clone(), optimizer.state[w_in]["exp_avg"].clone())
        torch.save(saved[0], f"{path}/{variant}_w_in_{rank}.pt")

        resumed, resumed_optimizer = build(1)
        parallel.distributed_checkpointing(resumed, resumed_optimizer)
        model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
        dcp.load({"model": model_state, "optim": optimizer_state},
                 checkpoint_id=f"{path}/{variant}")
        set_state_dict(resumed, resumed_optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)
        w_in = resumed[1].experts.w_in
        assert torch.equal(w_in, saved[0]), f"{variant}: rank {rank}'s experts"
        assert torch.equal(resumed_optimizer.state[w_in]["exp_avg"], saved[1]), variant
        step(model, optimizer, 2)
        step(resumed, resumed_optimizer, 2)
        for a, b in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(a, b), variant
        # Whole [E, ...] tensors load too, the rank's experts sliced out
        # (optimizer state as well: it loaded unsliced and step() failed).
        def whole(value):  # a copy: a loaded optimizer would share Adam's step tensor
            if hasattr(value, "full_tensor"):
                return value.full_tensor()
            return value.clone() if isinstance(value, torch.Tensor) else value

        state = optimizer.state_dict()
        state["state"] = {key: {name: whole(value) for name, value in entry.items()}
                          for key, entry in state["state"].items()}
        resumed.load_state_dict({key: whole(value) for key, value in model.state_dict().items()})
        resumed_optimizer.load_state_dict(state)
        w_in = resumed[1].experts.w_in
        assert torch.equal(w_in, model[1].experts.w_in), variant
        assert torch.equal(resumed_optimizer.state[w_in]["exp_avg"],
                           optimizer.state[model[1].experts.w_in]["exp_avg"]), variant
        step(model, optimizer, 3)
        step(resumed, resumed_optimizer, 3)
        assert torch.equal(resumed[1].experts.w_in, model[1].experts.w_in), variant


def test_distributed_checkpoint_restores_every_ranks_experts(tmp_path):
    import warnings
    import torch.distributed.checkpoint as dcp
    run_distributed(tmp_path, 2, _checkpoint_worker, str(tmp_path))
    # The checkpoint holds the whole [E, ...] experts: one process loads it
    # into a layer without expert parallelism.
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), mr.MoE(8, 16, 4, 2, capacity_factor=None))
    state = {"model": plain.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "group"))
    plain.load_state_dict(state["model"])
    whole = torch.cat([torch.load(tmp_path / f"group_w_in_{rank}.pt") for rank in range(2)])
    assert torch.equal(plain[1].experts.w_in, whole)
