"""swiglu: the fused SwiGLU of the experts against the reference and the
closed-form derivative, gradients, opcheck, errors, and the layer using it."""
import math

import pytest
import torch
import torch.nn.functional as F

import moe_routing as mr
from moe_routing import reference as ref

from conftest import FLOAT_DTYPES, TOLERANCES, on


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    """h [R, 2F] on device: no rows, F = 1, F not a multiple of any vector
    width, F a multiple of 16-byte vectors, a wide row (made on the CPU)."""
    for R, F_ in [(0, 4), (3, 1), (7, 5), (33, 64), (4, 1000)]:
        h = (torch.randn(R, 2 * F_) * 3).to(dtype)
        yield on(device, h).requires_grad_(requires_grad)


def _silu_product_derivatives(h):
    """d/dgate and d/dup of silu(gate) * up, in float64 from the formula
    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) (not from autograd)."""
    g, u = h.double().chunk(2, dim=-1)
    s = 1 / (1 + torch.exp(-g))
    return u * s * (1 + g * (1 - s)), g * s


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(device, dtype):
    for h in sample_inputs(device, dtype=dtype):
        out = mr.swiglu(h)
        expected = ref.swiglu(h.cpu())
        assert out.dtype == dtype and out.shape == (h.shape[0], h.shape[1] // 2) and out.device == h.device
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(out.cpu(), expected, rtol=rtol, atol=atol)


def test_hand_worked_values(device):
    """silu(0) * u = 0; silu(2) * 3 = 6 / (1 + e^-2); silu(-1) * -4 = 4 / (1 + e)."""
    h = torch.tensor([[0.0, 2.0, -1.0, 5.0, 3.0, -4.0]], dtype=torch.float64, device=device)
    out = mr.swiglu(h)
    expected = [0.0, 6 / (1 + math.exp(-2)), 4 / (1 + math.e)]
    torch.testing.assert_close(out.cpu(), torch.tensor([expected], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_matches_the_derivative(device, dtype):
    for h in sample_inputs(device, dtype=dtype):
        grad = torch.randn(h.shape[0], h.shape[1] // 2).to(dtype)
        got = torch.ops.moe_routing.swiglu_backward(on(device, grad), h).cpu()
        d_gate, d_up = _silu_product_derivatives(h.cpu())
        expected = torch.cat([grad.double() * d_gate, grad.double() * d_up], dim=-1)
        rtol, atol = TOLERANCES[dtype]
        assert got.dtype == dtype and got.shape == h.shape
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol * scale)


def test_autograd_matches_eager_silu(device):
    for h in sample_inputs(device, requires_grad=True, dtype=torch.float64):
        grad = on(device, torch.randn(h.shape[0], h.shape[1] // 2, dtype=torch.float64))
        mr.swiglu(h).backward(grad)
        h2 = h.detach().clone().requires_grad_()
        gate, up = h2.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(grad)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck(device):
    for h in sample_inputs(device, requires_grad=True, dtype=torch.float64):
        if h.numel() > 400:
            continue  # finite differences per element: keep it short
        assert torch.autograd.gradcheck(mr.swiglu, (h,))


def test_double_backward_raises(device):
    h = on(device, torch.randn(3, 8, dtype=torch.float64)).requires_grad_()
    g, = torch.autograd.grad(mr.swiglu(h).square().sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu_backward: double backward is not supported"):
        g.sum().backward()


def test_noncontiguous_input(device):
    h = on(device, torch.randn(6, 10, dtype=torch.float64))
    wide = torch.zeros(6, 20, dtype=torch.float64, device=device)
    wide[:, ::2] = h
    torch.testing.assert_close(mr.swiglu(wide[:, ::2]).cpu(), ref.swiglu(h.cpu()))


def test_bitwise_reproducible(device):
    h = on(device, torch.randn(257, 2 * 96, dtype=torch.bfloat16))
    assert torch.equal(mr.swiglu(h), mr.swiglu(h))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    for h in sample_inputs(device, requires_grad):
        torch.library.opcheck(torch.ops.moe_routing.swiglu, (h,))
        grad = torch.randn(h.shape[0], h.shape[1] // 2, device=h.device)
        torch.library.opcheck(torch.ops.moe_routing.swiglu_backward, (grad, h.detach()))


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_errors_name_the_op_and_argument(device_):
    d = dict(device=device_)
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu: h must be \[R, 2F\] \(gate then up\), an even "
                                           r"number of columns, got \[3, 5\]"):
        mr.swiglu(torch.randn(3, 5, **d))
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu: h must be 2-D \[R, 2F\]"):
        mr.swiglu(torch.randn(2, 3, 4, **d))
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu: h must be float32, float64, float16 or bfloat16, got int64"):
        mr.swiglu(torch.ones(3, 4, dtype=torch.long, **d))
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu_backward: grad must be \[R=3, F=2\], got \[3, 4\]"):
        torch.ops.moe_routing.swiglu_backward(torch.randn(3, 4, **d), torch.randn(3, 4, **d))
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu_backward: grad must be float32, got float64"):
        torch.ops.moe_routing.swiglu_backward(torch.randn(3, 2, dtype=torch.float64, **d), torch.randn(3, 4, **d))


def test_mixed_devices_are_rejected():
    with pytest.raises(RuntimeError, match=r"moe_routing::swiglu_backward: grad must be on cpu like the other inputs, got meta"):
        torch.ops.moe_routing.swiglu_backward(torch.randn(3, 2, device="meta"), torch.randn(3, 4))


def test_compiles_without_graph_break(device):
    torch._dynamo.reset()
    h = on(device, torch.randn(5, 12))
    compiled = torch.compile(lambda t: mr.swiglu(t) * 2, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(h), mr.swiglu(h) * 2)


@pytest.mark.parametrize("capacity_factor", [1.25, None])
def test_swiglu_experts_equal_the_unfused_formula(device, capacity_factor):
    """The MoE layer with SwiGLU experts gives the output and gradients of the
    same layer computed with silu(gate) * up in float64."""
    torch.manual_seed(0)
    moe = mr.MoE(16, 24, 4, 2, capacity_factor=capacity_factor, activation="swiglu").to(device).double()
    x = on(device, torch.randn(2, 9, 16, dtype=torch.float64)).requires_grad_()
    y = moe(x)
    y.square().sum().backward()
    fused = (y.detach(), x.grad.clone(), moe.experts.w_in.grad.clone())

    x.grad = None
    moe.zero_grad()
    original = moe.experts._activate
    moe.experts._activate = lambda h: F.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1]
    try:
        y2 = moe(x)
        y2.square().sum().backward()
    finally:
        moe.experts._activate = original
    torch.testing.assert_close(fused[0], y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[2], moe.experts.w_in.grad, rtol=1e-12, atol=1e-12)
