"""balanced_assignment (BASE layers): exact balance, the reference auction,
optimality against brute force on small cases, and MoE(routing="balanced")."""
import itertools

import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import on


def brute_force_best(scores, capacity):
    """Highest total score over every assignment giving expert e exactly
    capacity[e] tokens (small T only)."""
    T, E = scores.shape
    slots = [e for e in range(E) for _ in range(capacity[e])]
    best = -float("inf")
    for perm in set(itertools.permutations(slots)):
        best = max(best, sum(float(scores[t, perm[t]]) for t in range(T)))
    return best


@pytest.mark.parametrize("T,E", [(0, 3), (1, 1), (6, 3), (8, 4), (7, 3), (64, 8), (300, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_balance_and_reference(device, T, E, masked):
    g = torch.Generator().manual_seed(T * 31 + E)
    scores = torch.randn(T, E, generator=g)
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    experts = mr.balanced_assignment(on(device, scores), mask=on(device, mask))
    assert experts.dtype == torch.long and experts.shape == (T,)
    assert experts.device.type == torch.device(device).type
    experts = experts.cpu()
    valid = torch.ones(T, dtype=torch.bool) if mask is None else mask
    V = int(valid.sum())
    assert (experts[~valid] == -1).all() and ((experts[valid] >= 0) & (experts[valid] < E)).all()
    counts = torch.bincount(experts[valid], minlength=E)
    expected = torch.tensor([V // E + (e < V % E) for e in range(E)])
    assert torch.equal(counts, expected)  # every expert exactly its share
    assert torch.equal(experts, ref.balanced_assignment(scores, mask=mask))
    again = mr.balanced_assignment(on(device, scores), mask=on(device, mask))
    assert torch.equal(experts, again.cpu())  # deterministic


def test_near_optimal_against_brute_force(device):
    """Small cases (T = 6, E = 3, two tokens each): the auction's total score
    is within T * epsilon of the best balanced assignment in every case."""
    gaps = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(6, 3, generator=g, dtype=torch.float64)
        experts = mr.balanced_assignment(on(device, scores), iterations=200, epsilon=1e-4).cpu()
        ours = float(scores[torch.arange(6), experts].sum())
        gaps.append(brute_force_best(scores, [2, 2, 2]) - ours)
    assert max(gaps) <= 6 * 1e-4 + 1e-12, max(gaps)


def test_prefers_each_tokens_best_expert_when_balanced_already(device):
    scores = torch.eye(4).repeat(2, 1) * 5  # tokens t and t+4 both like expert t % 4
    assert mr.balanced_assignment(on(device, scores)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_a_popular_expert_is_shared_out(device):
    scores = torch.zeros(6, 3)
    scores[:, 0] = 10.0  # everyone wants expert 0
    scores[4:, 0] = 20.0  # tokens 4 and 5 want it most
    experts = mr.balanced_assignment(on(device, scores)).cpu()
    assert experts[4] == 0 and experts[5] == 0
    assert torch.bincount(experts, minlength=3).tolist() == [2, 2, 2]


def test_errors(device):
    with pytest.raises(RuntimeError, match=r"balanced_assignment: scores must be 2-D \[T, E\]"):
        mr.balanced_assignment(torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match=r"balanced_assignment: iterations must be >= 0"):
        mr.balanced_assignment(torch.randn(5, 2, device=device), iterations=-1)
    with pytest.raises(RuntimeError, match=r"balanced_assignment: epsilon must be > 0"):
        mr.balanced_assignment(torch.randn(5, 2, device=device), epsilon=0.0)
    with pytest.raises(RuntimeError, match=r"balanced_assignment: mask must have T=5 entries"):
        mr.balanced_assignment(torch.randn(5, 2, device=device),
                               mask=torch.ones(4, dtype=torch.bool, device=device))


def test_opcheck_and_compile(device):
    scores = torch.randn(12, 4, device=device)
    torch.library.opcheck(torch.ops.moe_routing.balanced_assignment.default, (scores,),
                          {"mask": torch.rand(12, device=device) > 0.5, "iterations": 8, "epsilon": 1e-3})
    torch._dynamo.reset()
    compiled = torch.compile(mr.balanced_assignment, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores), mr.balanced_assignment(scores))


def test_balanced_moe_trains_every_expert_equally_and_eval_is_greedy():
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, routing="balanced")
    x = torch.randn(40, 8)
    with torch.no_grad():
        moe.router.weight[0] += 2.0  # a router that would overload expert 0
    y = moe(x)
    assert moe.stats["load"].tolist() == [10, 10, 10, 10]
    assert moe.stats["dropped_fraction"].item() == 0.0
    (y.square().sum() + moe.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0  # through the sigmoid gate
    # y[t] = sigmoid(logit of its expert) * expert(x[t]) (BASE's gated expert).
    logits = torch.nn.functional.linear(x, moe.router.weight)
    experts = mr.balanced_assignment(logits)
    h = torch.einsum("td,tdf->tf", x, moe.experts.w_in[experts])
    dense = torch.einsum("tf,tfd->td", torch.nn.functional.gelu(h), moe.experts.w_out[experts])
    expected = torch.sigmoid(logits.gather(1, experts[:, None])) * dense
    torch.testing.assert_close(y.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    moe.eval()  # BASE routes greedily at test time
    moe(x)
    greedy = torch.bincount(logits.argmax(1), minlength=4)
    assert torch.equal(moe.stats["load"], greedy)


@pytest.mark.parametrize("options", [dict(scale=2.0), dict(score="softmax"),
                                     dict(normalize=True, scale=0.5)])
def test_balanced_moe_weighs_a_token_alike_in_training_and_eval(options):
    """A token that keeps its expert in eval gets the same output: the
    router's weight for it (score times scale), not a sigmoid fixed in
    training (scale=2 gave half the eval output; softmax a sigmoid)."""
    torch.manual_seed(0)
    moe = mr.MoE(8, 16, 4, routing="balanced", **options)
    x = torch.randn(4, 8)
    with torch.no_grad():  # token t prefers expert t, so both routings agree
        moe.router.weight.copy_(torch.eye(4, 8) * 3)
        x[:, :4] += torch.eye(4) * 3
    trained = moe(x)
    moe.eval()
    torch.testing.assert_close(trained, moe(x), rtol=0, atol=0)
    scores = (torch.sigmoid if moe.router.score == "sigmoid" else
              lambda v: torch.softmax(v, -1))(torch.nn.functional.linear(x, moe.router.weight))
    assert not torch.allclose(scores.diagonal() * moe.router.scale,
                              torch.sigmoid(torch.nn.functional.linear(x, moe.router.weight)).diagonal())
