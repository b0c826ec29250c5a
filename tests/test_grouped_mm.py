"""grouped_mm: the dropless experts' matrix product against the reference, gradients, opcheck."""
import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import FLOAT_DTYPES, assert_close_to_exact


def sample_inputs(dtype=torch.float32):
    """(x, weight, counts): empty experts, unused tail rows, one expert, none."""
    for R, H, F, counts in [(0, 4, 3, [0, 0]), (7, 5, 3, [7]), (20, 8, 6, [4, 0, 9]),
                            (64, 16, 32, [10, 0, 0, 20, 30, 0, 2, 1]), (9, 3, 2, [0, 0, 0])]:
        x = torch.randn(R, H).to(dtype)
        weight = torch.randn(len(counts), H, F).to(dtype)
        yield x, weight, torch.tensor(counts, dtype=torch.long)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(dtype):
    for x, weight, counts in sample_inputs(dtype):
        out = mr.grouped_mm(x, weight, counts)
        exact = ref.grouped_mm(x.double(), weight.double(), counts)
        assert out.dtype == dtype and out.shape == exact.shape
        assert_close_to_exact(out, exact, dtype)
        assert torch.equal(out[int(counts.sum()):], torch.zeros_like(out[int(counts.sum()):]))


def test_gradcheck():
    for x, weight, counts in sample_inputs(torch.float64):
        x.requires_grad_()
        weight.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: mr.grouped_mm(a, b, counts), (x, weight))


def test_noncontiguous_weight():
    x, weight, counts = list(sample_inputs(torch.float64))[2]
    w_t = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_t.is_contiguous()
    torch.testing.assert_close(mr.grouped_mm(x, w_t, counts), ref.grouped_mm(x, weight, counts))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for x, weight, counts in sample_inputs():
        torch.library.opcheck(torch.ops.moe_routing.grouped_mm,
                              (x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), counts))
