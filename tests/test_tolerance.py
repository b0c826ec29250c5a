"""The reduction-aware tolerance of conftest.reduction_tolerance against
measured rounding: float32 sums of up to 4096 terms evaluated in four orders
(one after the other, reversed, eight interleaved lanes as a vectorised or
warp-shuffled loop does, pairwise) never differ by more than the bound, and a
term left out of the sum is caught."""
import math

import numpy as np
import pytest
import torch

from conftest import reduction_tolerance


def _orders(terms: np.ndarray):
    """The sum of float32 terms in four evaluation orders, each in float32."""
    sequential = np.cumsum(terms, dtype=np.float32)[-1]
    reversed_ = np.cumsum(terms[::-1], dtype=np.float32)[-1]
    lanes = np.zeros(8, dtype=np.float32)
    for start in range(0, len(terms), 8):
        chunk = terms[start:start + 8]
        lanes[:len(chunk)] += chunk
    while len(lanes) > 1:  # tree of the lanes, as a shuffle reduction
        lanes = lanes[: len(lanes) // 2] + lanes[len(lanes) // 2:]
    pairwise = terms.copy()
    while len(pairwise) > 1:
        if len(pairwise) % 2:
            pairwise = np.append(pairwise, np.float32(0))
        pairwise = pairwise[0::2] + pairwise[1::2]
    return [sequential, reversed_, lanes[0], pairwise[0]]


@pytest.mark.parametrize("n", [16, 256, 4096])
@pytest.mark.parametrize("kind", ["normal", "one_sign", "products"])
def test_orders_stay_within_the_bound(n, kind):
    rng = np.random.default_rng(n)
    worst = 0.0
    for _ in range(200):
        if kind == "normal":
            terms = rng.standard_normal(n).astype(np.float32)
        elif kind == "one_sign":
            terms = rng.random(n).astype(np.float32)
        else:  # a dot product's terms, as combine_backward's weight gradient sums
            terms = (rng.standard_normal(n).astype(np.float32) * rng.standard_normal(n).astype(np.float32))
        bound = reduction_tolerance(float(np.abs(terms.astype(np.float64)).sum()), n, torch.float32)
        sums = [float(s) for s in _orders(terms)]
        exact = math.fsum(float(t) for t in terms)
        for s in sums:
            worst = max(worst, abs(s - exact) / bound)
        for a in sums:
            for b in sums:
                assert abs(a - b) <= bound, (kind, n, sums, bound)
    # The bound is not vacuous: some order errs by a visible fraction of it
    # for the longest one-signed sums (0.17 measured there).
    if kind == "one_sign" and n == 4096:
        assert worst > 0.02, worst


def test_a_missing_term_is_caught():
    """Dropping one typical term of a 4096-term dot product exceeds the bound
    (the docstring's combine_backward example)."""
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(100):
        terms = rng.standard_normal(4096) * rng.standard_normal(4096)
        bound = reduction_tolerance(float(np.abs(terms).sum()), 4096, torch.float32)
        i = int(np.argsort(np.abs(terms))[len(terms) // 2])  # the median-sized term
        misses += abs(terms[i]) > bound
    assert misses >= 95, misses
