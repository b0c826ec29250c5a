"""grouped_mm: the dropless experts' matrix product against the reference, gradients, opcheck."""
import pytest
import torch

import moe_routing as mr
from moe_routing import reference as ref

from conftest import (FLOAT_DTYPES, assert_close_to_exact_on, grouped_mm_abs_terms,
                      grouped_mm_backward_abs_terms, on)


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """(x, weight, counts) on device: empty experts, unused tail rows, one
    expert, none, and H = 1 (how Experts adds its per-expert biases on the
    packed layout: a column of ones times [E, 1, F]); made on the CPU, so the
    same values on every device."""
    for R, H, F, counts in [(0, 4, 3, [0, 0]), (7, 5, 3, [7]), (20, 8, 6, [4, 0, 9]),
                            (64, 16, 32, [10, 0, 0, 20, 30, 0, 2, 1]), (9, 3, 2, [0, 0, 0]),
                            (13, 1, 24, [5, 0, 6])]:
        x = torch.randn(R, H).to(dtype)
        weight = torch.randn(len(counts), H, F).to(dtype)
        yield (on(device, x).requires_grad_(requires_grad), on(device, weight).requires_grad_(requires_grad),
               torch.tensor(counts, dtype=torch.long, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(device, dtype):
    for x, weight, counts in sample_inputs(device, dtype=dtype):
        out = mr.grouped_mm(x, weight, counts)
        exact = ref.grouped_mm(x.cpu().double(), weight.cpu().double(), counts.cpu())
        assert out.dtype == dtype and out.shape == exact.shape and out.device == x.device
        assert_close_to_exact_on(device, out, exact, dtype, abs_sum=grouped_mm_abs_terms(x, weight, counts),
                                 n=x.shape[1])
        assert torch.equal(out[int(counts.sum()):], torch.zeros_like(out[int(counts.sum()):]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype):
    """Both gradients against the float64 reference's on the same values:
    grad_x sums over F, grad_weight over each expert's rows."""
    for x, weight, counts in sample_inputs(device, dtype=dtype):
        grad = torch.randn(x.shape[0], weight.shape[2]).to(dtype)
        got = torch.ops.moe_routing.grouped_mm_backward(on(device, grad), x, weight, counts)
        a, w = x.cpu().double().requires_grad_(), weight.cpu().double().requires_grad_()
        ref.grouped_mm(a, w, counts.cpu()).backward(grad.double())
        x_terms, w_terms, rows = grouped_mm_backward_abs_terms(grad, x, weight, counts)
        for g, exact, terms, n in [(got[0], a.grad, x_terms, weight.shape[2]), (got[1], w.grad, w_terms, rows)]:
            assert g.dtype == dtype and g.shape == exact.shape and g.device == x.device
            assert_close_to_exact_on(device, g, exact, dtype, abs_sum=terms, n=n)


def test_gradcheck(device):
    for x, weight, counts in sample_inputs(device, requires_grad=True, dtype=torch.float64):
        assert torch.autograd.gradcheck(lambda a, b: mr.grouped_mm(a, b, counts), (x, weight))


def test_noncontiguous_weight(device):
    x, weight, counts = list(sample_inputs(device, dtype=torch.float64))[2]
    w_t = weight.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_t.is_contiguous()
    torch.testing.assert_close(mr.grouped_mm(x, w_t, counts).cpu(),
                               ref.grouped_mm(x.cpu(), weight.cpu(), counts.cpu()))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for x, weight, counts in sample_inputs(device, requires_grad):
        torch.library.opcheck(torch.ops.moe_routing.grouped_mm, (x, weight, counts))


def awkward_layouts(device):
    """bfloat16 inputs that a CUDA dispatch to torch's grouped GEMM must copy
    or route to our own kernel (torch would raise): 1024 experts (its limit is
    1023), a contiguous weight that starts 2 bytes past a 16-byte boundary,
    and a single row whose row stride (1001) is not a multiple of 8."""
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 3, (1024,), generator=g)
    yield torch.randn(int(counts.sum()) + 3, 16, generator=g), torch.randn(1024, 16, 8, generator=g), counts
    E, H, F = 3, 32, 16
    flat = torch.randn(1 + E * H * F, generator=g).to(torch.bfloat16)
    yield torch.randn(40, H, generator=g), on(device, flat)[1:].view(E, H, F), torch.tensor([10, 0, 25])
    x = torch.randn(1, 1001, generator=g).to(torch.bfloat16)
    yield on(device, x)[:, :1000], torch.randn(2, 1000, 8, generator=g), torch.tensor([1, 0])


def test_layouts_torchs_grouped_gemm_would_reject(device):
    for x, weight, counts in awkward_layouts(device):
        x, weight = on(device, x.to(torch.bfloat16)), on(device, weight.to(torch.bfloat16))
        counts = on(device, counts)
        assert x.is_contiguous() and weight.is_contiguous()
        out = mr.grouped_mm(x, weight, counts)
        grad = on(device, torch.randn(x.shape[0], weight.shape[2]).to(torch.bfloat16))
        grad_x, grad_w = torch.ops.moe_routing.grouped_mm_backward(grad, x, weight, counts)
        a, w = x.cpu().double().requires_grad_(), weight.cpu().double().requires_grad_()
        exact = ref.grouped_mm(a, w, counts.cpu())
        exact.backward(grad.cpu().double())
        x_terms, w_terms, rows = grouped_mm_backward_abs_terms(grad, x, weight, counts)
        checks = [(out, exact, grouped_mm_abs_terms(x, weight, counts), x.shape[1]),
                  (grad_x, a.grad, x_terms, weight.shape[2]), (grad_w, w.grad, w_terms, rows)]
        for got, want, terms, n in checks:
            assert got.shape == want.shape and got.device == x.device
            assert_close_to_exact_on(device, got, want.detach(), torch.bfloat16, abs_sum=terms, n=n)
