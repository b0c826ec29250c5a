"""Shared helpers for the pytest suite: dtypes, tolerances, input makers."""
import pytest
import torch

import moe_routing  # noqa: F401  (loads the extension once for every test)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) for comparing an op with the float32/float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual, expected, dtype=None):
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_close_to_exact(actual, exact, dtype):
    """actual (computed in dtype) against a float64 result, with dtype's
    tolerance relative to the largest magnitude: sums of many products round
    differently in every summation order."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    torch.testing.assert_close(actual.double(), exact, rtol=rtol, atol=atol * scale)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last dimension has stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert t.numel() <= 1 or not out.is_contiguous()
    return out


def separated_logits(T, E, dtype=torch.float64, seed=0, device="cpu"):
    """Logits whose per-token values are far apart (a random permutation of
    well-spaced values), so top-k does not flip under finite differences."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-3.0, 3.0, E, dtype=torch.float64)
    perm = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) if T else torch.empty(0, E, dtype=torch.long)
    return base[perm].to(dtype=dtype, device=device)


def random_experts(T, E, k, seed=0, distinct=True):
    """[T, k] int64 expert choices; distinct per token (as route makes them)."""
    g = torch.Generator().manual_seed(seed)
    if distinct:
        if T == 0:
            return torch.empty(0, k, dtype=torch.long)
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return torch.randint(0, E, (T, k), generator=g)


def random_mask(T, seed=0, p_valid=0.8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, generator=g) < p_valid


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
