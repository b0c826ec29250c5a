"""Train a small MoE transformer language model on the Python standard library's
own source code, on the CPU, and watch the routing at work.

Every feed-forward block is a moe_routing.MoE layer (8 experts, top-2, capacity
factor 1.25). While it trains, the script prints the loss, each layer's expert
load and dropped-token fraction; at the end it evaluates on held-out files,
shows which kinds of characters each expert of the first layer receives, writes
a plot of expert load over training steps, and samples some Python.

    python examples/train_lm.py [--seconds 120] [--out demo_out]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_routing as mr


# ----------------------------------------------------------------------------- data

def load_stdlib_text(max_bytes: int) -> tuple[bytes, bytes]:
    """Source of the standard library's top-level modules, split into train and
    held-out files (every 10th file), as bytes."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    train, held_out = [], []
    size = 0
    for i, name in enumerate(files):
        with open(os.path.join(root, name), "rb") as fh:
            data = fh.read()
        (held_out if i % 10 == 9 else train).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"\n".join(train), b"\n".join(held_out)


def batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        yield window[:, :-1].long(), window[:, 1:].long()


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, d: int, heads: int, num_experts: int, k: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.moe = mr.MoE(d, 4 * d, num_experts, k, capacity_factor=1.25, eval_capacity_factor=2.0,
                          aux_loss_weight=0.01, z_loss_weight=0.001, jitter=0.01)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, d))
        return x + self.moe(self.ln2(x))


class MoELanguageModel(nn.Module):
    def __init__(self, vocab=256, d=128, layers=3, heads=4, num_experts=8, k=2, context=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads, num_experts, k) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ----------------------------------------------------------------------------- reporting

def progress(step: int, elapsed: float, budget: float, loss: float, width: int = 30) -> str:
    done = min(1.0, elapsed / budget)
    bar = "#" * int(done * width) + "-" * (width - int(done * width))
    return f"\r[{bar}] {done:4.0%} step {step:4d} loss {loss:.3f} ({elapsed:5.1f}s/{budget:.0f}s)"


def load_line(moe: mr.MoE) -> str:
    load = moe.stats["load"].float()
    share = " ".join(f"{100 * v:3.0f}" for v in (load / load.sum()).tolist())
    return (f"load% [{share}]  dropped {100 * moe.stats['dropped_fraction'].item():4.1f}%  "
            f"max/mean {moe.stats['max_over_mean_load'].item():.2f}")


CHAR_CLASSES = [("letter", lambda c: chr(c).isalpha()), ("digit", lambda c: chr(c).isdigit()),
                ("space", lambda c: c == 32), ("newline", lambda c: c == 10),
                ("punct", lambda c: 33 <= c < 127 and not chr(c).isalnum())]


@torch.no_grad()
def expert_specialisation(model: MoELanguageModel, tokens: torch.Tensor) -> str:
    """Share of each character class sent to each expert of the first layer (top-1)."""
    captured = []
    hook = model.blocks[0].moe.router.register_forward_hook(lambda m, i, out: captured.append(out.experts))
    model(tokens)
    hook.remove()
    top1, flat = captured[0][:, 0], tokens.reshape(-1)
    E = model.blocks[0].moe.num_experts
    lines = ["  class     " + " ".join(f"{'e%d' % e:>4s}" for e in range(E))]
    for name, member in CHAR_CLASSES:
        chosen = torch.tensor([member(int(c)) for c in flat.tolist()])
        if chosen.sum() == 0:
            continue
        share = torch.bincount(top1[chosen], minlength=E).float() / chosen.sum()
        lines.append(f"  {name:9s} " + " ".join(f"{100 * s:3.0f}%" for s in share.tolist()))
    return "\n".join(lines)


def smooth(values: torch.Tensor, window: int = 25) -> torch.Tensor:
    """Moving average over the last `window` steps (per column)."""
    cumulative = torch.cat([torch.zeros_like(values[:1]), values.cumsum(0)])
    steps = torch.arange(1, len(values) + 1).clamp(max=window)
    start = torch.arange(len(values)) + 1 - steps
    return (cumulative[1:] - cumulative[start]) / steps.view(-1, *[1] * (values.dim() - 1))


def plot_load(history: list[tuple[int, list[torch.Tensor], list[float]]], path: str) -> None:
    """Top: each expert's share of the routed assignments per layer; bottom: the
    dropped-assignment fraction and max/mean load. 25-step moving averages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _, _ in history]
    layers = len(history[0][1])
    fig, axes = plt.subplots(2, layers, figsize=(5 * layers, 7), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for layer in range(layers):
        loads = torch.stack([loads[layer] for _, loads, _ in history])
        shares = smooth(100 * loads / loads.sum(1, keepdim=True))
        ax = axes[0][layer]
        for e in range(shares.shape[1]):
            ax.plot(steps, shares[:, e], label=f"expert {e}", linewidth=1.2)
        ax.axhline(100 / shares.shape[1], color="black", linestyle="--", linewidth=0.8, label="perfect balance")
        ax.set_title(f"layer {layer}: share of routed assignments")
        ax.set_ylabel("% (25-step mean)" if layer == 0 else "")
        dropped = smooth(torch.tensor([100 * d[layer] for _, _, d in history]))
        imbalance = smooth((loads.max(1).values / loads.mean(1)))
        ax2 = axes[1][layer]
        ax2.plot(steps, dropped, color="tab:red", label="dropped % (capacity factor 1.25)")
        ax2.set_ylabel("dropped %" if layer == 0 else "")
        ax2.set_xlabel("training step")
        twin = ax2.twinx()
        twin.plot(steps, imbalance, color="tab:blue", label="max/mean load")
        twin.set_ylabel("max / mean load" if layer == layers - 1 else "")
        if layer == 0:
            ax2.legend(loc="upper right", fontsize=8)
            twin.legend(loc="center right", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("moe_routing demo: expert load while training a byte-level MoE LM on Python's stdlib")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    parser.add_argument("--out", default="demo_out", help="folder for the plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_bytes, held_out_bytes = load_stdlib_text(max_bytes=4_000_000)
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8)
    held_out = torch.frombuffer(bytearray(held_out_bytes), dtype=torch.uint8)
    print(f"data: {len(train_bytes) / 1e6:.1f} MB of Python standard library source for training, "
          f"{len(held_out_bytes) / 1e6:.1f} MB held out ({sysconfig.get_paths()['stdlib']})")

    context, batch = 128, 24
    model = MoELanguageModel(context=context)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {len(model.blocks)} transformer layers, each FFN a moe_routing.MoE with "
          f"{model.blocks[0].moe.num_experts} experts, top-{model.blocks[0].moe.k}, capacity factor "
          f"{model.blocks[0].moe.capacity_factor}; {params / 1e6:.2f}M parameters; "
          f"{torch.get_num_threads()} CPU threads")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = batches(train, batch, context, torch.Generator().manual_seed(args.seed))

    history, losses = [], []
    interactive = sys.stdout.isatty()
    start, step = time.time(), 0
    while time.time() - start < args.seconds:
        x, y = next(data)
        lr = 3e-3 * min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        (loss + mr.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        history.append((step, [b.moe.stats["load"].float() for b in model.blocks],
                        [b.moe.stats["dropped_fraction"].item() for b in model.blocks]))
        elapsed = time.time() - start
        bar = progress(step, elapsed, args.seconds, sum(losses[-20:]) / len(losses[-20:]))
        if interactive:  # redraw in place; in a log, one line every 25 steps
            sys.stdout.write(bar)
            sys.stdout.flush()
        elif step % 25 == 0:
            print(bar.lstrip("\r"), flush=True)
        if step % 100 == 0:
            if interactive:
                print()
            for i, block in enumerate(model.blocks):
                print(f"    layer {i}: {load_line(block.moe)}")
        step += 1
    print()

    model.eval()
    with torch.no_grad():
        eval_data = batches(held_out, 32, context, torch.Generator().manual_seed(1))
        eval_losses = []
        for _ in range(8):
            x, y = next(eval_data)
            eval_losses.append(F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item())
        eval_loss = sum(eval_losses) / len(eval_losses)
        x, _ = next(eval_data)
        deterministic = torch.equal(model(x), model(x))

    first, last = sum(losses[:20]) / min(20, len(losses)), sum(losses[-20:]) / min(20, len(losses))
    print(f"\ntrained {step} steps in {time.time() - start:.0f}s: train loss {first:.3f} -> {last:.3f} "
          f"(uniform guess: {math.log(256):.3f}); held-out loss {eval_loss:.3f} "
          f"= {eval_loss / math.log(2):.2f} bits/byte")
    print(f"eval mode deterministic (two forwards bitwise equal): {deterministic}")
    print("final routing per layer (eval, capacity factor 2.0):")
    for i, block in enumerate(model.blocks):
        print(f"    layer {i}: {load_line(block.moe)}  router entropy "
              f"{block.moe.stats['router_entropy'].item():.2f} nats")
    print("layer 0: where each kind of character goes (top-1 expert):")
    print(expert_specialisation(model, x[:8]))

    os.makedirs(args.out, exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "expert_load.png"))
    plot_load(history, path)
    print(f"plot of expert load over training steps: {path}")

    prompt = b"def "
    tokens = torch.tensor([list(prompt)])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            probs = torch.softmax(model(tokens[:, -context:])[0, -1] / 0.7, -1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)[None]], 1)
    print("sample (temperature 0.7):\n" + bytes(tokens[0].tolist()).decode("utf-8", "replace"))


if __name__ == "__main__":
    main()
