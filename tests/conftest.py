"""Shared helpers for the pytest suite: devices, dtypes, tolerances, input makers."""
import math

import pytest
import torch

import moe_routing  # noqa: F401  (loads the extension once for every test)
from moe_routing import reference as ref

# Every op test runs on the CPU and, where a GPU exists, on CUDA. On a machine
# without one the CUDA parameter does not exist (nothing is collected and skipped).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device an op test runs on: "cpu", and "cuda" where available."""
    return request.param


def on(device, *tensors):
    """The tensors moved to device (None stays None); one tensor or a tuple."""
    moved = tuple(None if t is None else t.to(device) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def cpu(*tensors):
    """The tensors moved to the CPU (None stays None); one tensor or a tuple."""
    return on("cpu", *tensors)

def _distributed_entry(rank, world, init_file, timeout, fn, args):
    import datetime
    import faulthandler
    import os
    import sys

    import torch.distributed as dist

    torch.set_num_threads(1)  # several processes on a small machine: no oversubscription
    # A rank that hangs prints every thread's stack and exits: the test fails instead.
    faulthandler.dump_traceback_later(timeout, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    fn(rank, world, *args)
    dist.barrier()  # every rank's collectives are done before any rank leaves
    faulthandler.cancel_dump_traceback_later()
    if _TORCH_VERSION < (2, 8):
        # Before torch 2.8 the gloo group's destructor joins its worker threads
        # while holding the GIL, and a worker that is still freeing a finished
        # collective's tensor waits for the GIL: destroy_process_group hung in
        # about 1 CI run in 6 (py-spy). Leave without running destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def run_distributed(tmp_path, world, fn, *args, timeout=180):
    """fn(rank, world, *args) in `world` spawned processes joined in a gloo
    process group; fn must be importable (a module-level function). A rank
    that fails raises here; one that hangs for `timeout` seconds is stopped."""
    import torch.multiprocessing as mp

    mp.spawn(_distributed_entry, args=(world, str(tmp_path / "init"), timeout, fn, args),
             nprocs=world, join=True)


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


# --- reduction-aware tolerance -------------------------------------------------

# c of reduction_tolerance (see there).
REDUCTION_C = 2.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel sums in: float64 for float64 data, float32 for
    float32, float16 and bfloat16 (at::opmath_type, on CPU and CUDA alike)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_tolerance(abs_sum, n, dtype, c=REDUCTION_C):
    """How far two evaluations of the same sums of n terms a_1..a_n,
    accumulated in dtype in different orders (sequential, vectorised lanes,
    pairwise, warp shuffles, tiles), may differ, elementwise:

        c * eps(dtype) * sqrt(n) * abs_sum,      abs_sum = sum_i |a_i|

    abs_sum is computed from the inputs (in float64, usually by evaluating the
    op's formula on their absolute values), so that the bound grows with the
    reduction length and with the magnitude of the summed terms, and stays 0
    where there is nothing to sum.

    Why this form: any evaluation order errs by at most
    gamma_{n-1} * sum_i |a_i| with gamma_m = m u / (1 - m u), u = eps / 2
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section
    4.2): linear in n, and rarely approached. With the rounding errors modelled
    as independent and of mean zero, the error is lambda * sqrt(n) * u *
    sum_i |a_i| at most, with a probability that grows quickly with lambda
    (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, theorem 3.1). The
    largest case, n terms of one sign summed one after the other, has a
    standard deviation of about sqrt(n) * u * sum_i |a_i| / 3 = eps * sqrt(n)
    * sum_i |a_i| / 6. Two evaluations (an op on two devices, or an op and a
    float64 reference) each err independently, so c = 2 allows each
    lambda = 2, about 12 of those standard deviations and 8.5 for their
    difference. tests/test_tolerance.py checks it on float32 sums of 16 to 4096
    terms in four orders: the largest difference seen is 0.34 of this bound
    (16 terms of one sign), 0.2 for 4096 such terms, 0.01 for 4096 products
    of normal values.

    An example: combine_backward's weight gradient, a dot product over
    H = 4096 of standard normal values, differed between CPU and an H100 by
    1.7e-5, above a fixed atol of 1e-5; sum_i |a_i| is about 2600 there, so the
    bound is about 0.04 (the values themselves are about 64), and dropping one
    term of typical size (0.64) would still exceed it.
    """
    return c * torch.finfo(dtype).eps * math.sqrt(max(int(n), 1)) * abs_sum


def tolerance(expected, dtype=None, abs_sum=None, n=1, scale=1.0):
    """Elementwise allowance for comparing with expected (on the CPU):
    TOLERANCES[dtype] (rtol * |expected| + atol * scale) plus, when abs_sum is
    given, reduction_tolerance(abs_sum, n) in dtype's accumulation dtype."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    tol = rtol * expected.detach().double().abs() + atol * scale
    if abs_sum is not None:
        tol = tol + reduction_tolerance(abs_sum.detach().cpu().double(), n, accumulation_dtype(dtype))
    return tol


def assert_within(actual, expected, tol, what=""):
    """|actual - expected| <= tol elementwise (tol a tensor or a number), on
    the CPU, with torch.testing.assert_close's rules otherwise: same shape and
    dtype, NaN only where expected has NaN, infinities equal. The message names
    the worst element against its own tolerance."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    a, e = actual.double(), expected.double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand(e.shape)
    nan = e.isnan()
    assert torch.equal(a.isnan(), nan), f"{what}: NaN where the reference has none, or the other way"
    inf = e.isinf() | a.isinf()
    assert torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    finite = ~nan & ~inf
    err = torch.where(finite, (a - e).abs(), 0.0)
    bad = err > tol
    if bad.any():
        ratio = torch.where(finite, err / tol.clamp(min=1e-300), 0.0)
        i = int(ratio.flatten().argmax())
        index = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), e.shape)) if e.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ beyond the tolerance; worst at "
            f"{index}: actual {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"|difference| {err.flatten()[i].item():.3g} > tolerance {tol.flatten()[i].item():.3g}")


def assert_close_on(device, actual, expected, dtype=None, *, abs_sum=None, n=1):
    """An op's result on device against a reference on the CPU. On the CPU:
    assert_close, TOLERANCES[dtype] exactly as before. On another device the
    same terms are summed in another order (warp shuffles, tiles): tolerance()
    with abs_sum and n adds reduction_tolerance for that."""
    actual = actual.cpu()
    if str(device) == "cpu":
        assert_close(actual, expected, dtype)
        return
    assert_within(actual, expected, tolerance(expected, dtype, abs_sum, n), f"{device} against the reference")


def assert_close_to_exact_on(device, actual, exact, dtype, *, abs_sum=None, n=1):
    """assert_close_to_exact for a result on device (see assert_close_on)."""
    actual = actual.cpu()
    if str(device) == "cpu":
        assert_close_to_exact(actual, exact, dtype)
        return
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    assert_within(actual.double(), exact, tolerance(exact, dtype, abs_sum, n, scale),
                  f"{device} against the exact result")


# --- magnitudes of the summed terms, per op (float64, on the CPU) -------------

def _abs64(t):
    return t.detach().cpu().double().abs()


def combine_abs_terms(expert_out, slots, weights=None):
    """[T, H]: sum_j |weights[t, j]| * |rows[slots[t, j]]|, the k-term sums of
    combine (n = k); with weights None (ones), those of dispatch_backward."""
    slots = slots.cpu()
    w = torch.ones(slots.shape, dtype=torch.float64) if weights is None else _abs64(weights)
    return ref.combine(_abs64(expert_out), slots, w)


def combine_weight_grad_abs_terms(grad_y, expert_out, slots):
    """[T, k]: sum_h |grad_y[t, h]| * |rows[slots[t, j], h]| (0 where dropped),
    the H-term dot products of combine_backward's weight gradient (n = H)."""
    slots = slots.cpu()
    rows = _abs64(expert_out)
    rows = rows if rows.dim() == 2 else rows.flatten(0, 1)
    dots = _abs64(grad_y) @ rows.t()  # [T, num_rows]
    if dots.shape[1] == 0:
        return torch.zeros(slots.shape, dtype=torch.float64)
    return torch.where(slots >= 0, dots.gather(1, slots.clamp(min=0)), 0.0)


def grouped_mm_abs_terms(x, weight, counts):
    """[R, F]: the H-term sums of grouped_mm on absolute values (n = H)."""
    return ref.grouped_mm(_abs64(x), _abs64(weight), counts.cpu())


def grouped_mm_backward_abs_terms(grad, x, weight, counts):
    """([R, H], [E, H, F]): grad_x's F-term sums and grad_weight's sums over
    each expert's rows on absolute values, and the longest of those row runs:
    (x_terms, weight_terms, n_rows)."""
    counts = counts.cpu()
    g, a, w = _abs64(grad), _abs64(x), _abs64(weight)
    x_terms = ref.grouped_mm(g, w.transpose(1, 2), counts)
    w_terms = torch.zeros_like(w)
    start = 0
    for e, n in enumerate(counts.tolist()):
        w_terms[e] = a[start:start + n].t() @ g[start:start + n]
        start += n
    return x_terms, w_terms, max(counts.tolist(), default=0)


def route_backward_abs_terms(scores, experts, grad_weights, grad_scores, normalize, scale):
    """[T, E]: a bound on the magnitude of the terms of route's logit gradient
    (n = E + k). The gradient reaching score i is
    G_i = grad_scores_i + scale / W * (grad_weights_i - sum_j grad_weights_j s_j / W)
    when normalised (W = sum of the selected scores), grad_scores_i +
    scale * grad_weights_i otherwise; |G_i| <= Gmax = max|grad_scores| +
    scale * max|grad_weights| * (2 / W or 1). Softmax's backward
    s_e * (G_e - sum_j s_j G_j) then sums terms of at most 2 s_e Gmax (the
    scores sum to 1), sigmoid's s_e (1 - s_e) G_e is below s_e Gmax."""
    s = _abs64(scores)
    T = s.shape[0]
    if T == 0:
        return s
    experts = experts.cpu()
    gs_max = _abs64(grad_scores).amax(1, keepdim=True)
    gw_max = _abs64(grad_weights).amax(1, keepdim=True) if grad_weights.shape[1] else torch.zeros(T, 1)
    if normalize:
        W = s.gather(1, experts).sum(1, keepdim=True)
        g_max = gs_max + abs(scale) * gw_max * 2 / W
    else:
        g_max = gs_max + abs(scale) * gw_max
    return 2 * s * g_max


def z_loss_abs_terms(logits, mask=None):
    """A scalar: the magnitude of z_loss's sums (n = T + E). The loss is
    mean_t lse_t^2 over valid tokens: its T terms are positive (magnitude the
    loss itself), and each lse_t = m + log(sum_e exp(x_te - m)) carries the
    relative error of an E-term positive sum as an absolute error, which
    lse_t^2 doubles times |lse_t|: magnitude 2 * mean_t |lse_t|."""
    lse = torch.logsumexp(logits.detach().cpu().double(), dim=-1)
    valid = torch.ones(lse.shape, dtype=torch.bool) if mask is None else mask.cpu()
    if not valid.any():
        return torch.tensor(0.0, dtype=torch.float64)
    lse = lse[valid]
    return lse.square().mean() + 2 * lse.abs().mean()


def z_loss_grad_abs_terms(logits, mask=None, grad=1.0):
    """[T, E]: the magnitude of the sums behind z_loss's gradient
    2 g / N * lse_t * softmax_te (n = E): the softmax's E-term positive sum
    (relative, so the gradient itself) and lse_t's absolute error from the
    same sum, times 2 |g| / N * softmax_te."""
    x = logits.detach().cpu().double()
    valid = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask.cpu()
    N = max(int(valid.sum()), 1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.softmax(x, dim=-1)
    terms = 2 * abs(float(grad)) / N * p * (lse.abs() + 1)
    return torch.where(valid[:, None], terms, 0.0)


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
