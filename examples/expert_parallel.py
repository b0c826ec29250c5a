"""Expert parallelism x data parallelism with moe_routing.

    torchrun --nproc_per_node 2 examples/expert_parallel.py            # gloo, CPU
    torchrun --nproc_per_node 4 examples/expert_parallel.py --ep 2     # 2 data x 2 expert
    torchrun --nproc_per_node 8 examples/expert_parallel.py --backend nccl  # GPUs

Each rank holds E/ep experts of every MoE layer; the router, embeddings and
head are replicated and trained with DDP (expert weights excluded), the
expert weights are averaged over the data-parallel replicas of their shard
by moe_routing.parallel.sync_gradients.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import moe_routing as mr
from moe_routing import parallel


class Block(torch.nn.Module):
    def __init__(self, d, experts, expert_parallel):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.moe = mr.MoE(d, 2 * d, experts, k=2, capacity_factor=1.25,
                          bias_update_rate=1e-3, expert_parallel=expert_parallel)

    def forward(self, h):
        return h + self.moe(self.norm(h))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: all)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = "cpu"
    if args.backend == "nccl":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    ep = args.ep or world
    mesh = parallel.expert_data_mesh(world, ep, device_type="cuda" if device != "cpu" else "cpu")

    V, d, experts = 256, 64, 8
    torch.manual_seed(0)  # the same replicated weights everywhere (DDP broadcasts them too)
    model = torch.nn.Sequential(
        torch.nn.Embedding(V, d),
        Block(d, experts, mesh["expert"]),
        Block(d, experts, mesh["expert"]),
        torch.nn.Linear(d, V),
    ).to(device)
    parallel.name_layers(model)  # collective errors name the layer, e.g. '1.moe'
    # Expert weights: different on every expert rank, reduced over 'data' only.
    DDP._set_params_and_buffers_to_ignore_for_model(model, parallel.expert_parameters(model))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        ids = torch.randint(0, V, (4, 32), generator=generator).to(device)
        logits = ddp(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        (loss + mr.aux_loss(model)).backward()
        parallel.sync_gradients(model, mesh, params="expert")
        opt.step()
        opt.zero_grad()
        mr.update_bias(model)  # global load: summed over the whole world
        if rank == 0:
            stats = model[1].moe.stats  # global statistics
            print(f"step {step}: loss {loss.item():.4f} "
                  f"balance {stats['balance_loss'].item():.3f} "
                  f"dropped {stats['dropped_fraction'].item():.3f}")
    dist.destroy_process_group()  # torch < 2.8 can deadlock here now and then: see the README


if __name__ == "__main__":
    main()
