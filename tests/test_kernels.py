"""ddpm_ms.models.kernels: the compiled CPU kernels against float64 NumPy references (forward and
gradients), and the switch / build-cache / fallback behaviour."""

import ddpm_ms  # noqa: F401  (caps oneDNN at AVX2 before MindSpore is imported)

import math
import os
import shutil
import warnings

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.models import kernels
from ddpm_ms.models import layers
from ddpm_ms.models import tutorial_unet as unet_mod

needs_kernels = pytest.mark.skipif(not kernels.enabled(), reason=f"fast kernels unavailable: {kernels.status()}")

RTOL = 1e-5


@pytest.fixture(autouse=True, params=["pynative", "graph"])
def mode(request):
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _rng(seed):
    return np.random.default_rng(seed)


class _Call(nn.Cell):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


def _grads(fn, inputs, dy, positions):
    """Vector-Jacobian products of fn at inputs for the cotangent dy (via sum(fn * dy))."""
    dyt = Tensor(dy)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fn = fn

        def construct(self, *args):
            return (self.fn(*args) * dyt).sum()

    out = ms.grad(Loss(), grad_position=positions)(*[Tensor(a) for a in inputs])
    return [o.asnumpy() for o in (out if isinstance(out, tuple) else (out,))]


def _close(got, ref, rtol=RTOL, atol_frac=1e-6):
    ref = np.asarray(ref, np.float64)
    atol = atol_frac * max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- activations

_erf = np.vectorize(math.erf)
_erfc = np.vectorize(math.erfc)


def _gelu64(x):
    return 0.5 * x * _erfc(-x / math.sqrt(2.0))


def _gelu_grad64(x):
    return 0.5 * _erfc(-x / math.sqrt(2.0)) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _silu64(x):
    return x / (1.0 + np.exp(-x))


def _silu_grad64(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _act_inputs():
    # both tails, zero, and a random bulk; odd length exercises the vector-loop remainder
    x = np.concatenate([np.linspace(-12, 12, 241), [0.0, -0.0, 1e-6, -1e-6], _rng(0).standard_normal(300) * 3])
    return x.astype(np.float32).reshape(1, -1)


@needs_kernels
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_activation_forward_and_gradient(name):
    K = kernels.ops()
    x = _act_inputs()
    x64 = x.astype(np.float64)
    f, f64, g64 = (K.gelu, _gelu64, _gelu_grad64) if name == "gelu" else (K.silu, _silu64, _silu_grad64)
    out = _Call(f)(Tensor(x)).asnumpy()
    ref = f64(x64)
    # relative accuracy everywhere the value is a normal float32 (tails included)
    big = np.abs(ref) > 1e-30
    np.testing.assert_allclose(out[big], ref[big], rtol=RTOL, atol=1e-30)
    assert np.abs(out[~big]).max(initial=0.0) < 1e-30
    dy = _rng(1).standard_normal(x.shape).astype(np.float32)
    (dx,) = _grads(f, [x], dy, 0)
    _close(dx, dy.astype(np.float64) * g64(x64), atol_frac=1e-7)


@needs_kernels
def test_activation_cells_use_the_kernels_and_match_builtin():
    x = Tensor(_act_inputs())
    for fast_cell, builtin in ((layers.GELU(), nn.GELU(approximate=False)), (layers.SiLU(), nn.SiLU())):
        assert fast_cell._fast is not None
        np.testing.assert_allclose(fast_cell(x).asnumpy(), builtin(x).asnumpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- group norm


def _gn64(x, G, gamma, beta, eps=1e-5):
    n, c, h, w = x.shape
    xg = x.reshape(n, G, -1)
    mean = xg.mean(-1, keepdims=True)
    var = xg.var(-1, keepdims=True)
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return xhat * gamma[None, :, None, None] + beta[None, :, None, None]


def _gn_grads64(x, G, gamma, beta, dy, eps=1e-5):
    """Analytic VJP of group norm in float64: (dx, dgamma, dbeta)."""
    n, c, h, w = x.shape
    xg = x.reshape(n, G, -1)
    mean = xg.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(xg.var(-1, keepdims=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    dgamma = (dy * xhat).sum((0, 2, 3))
    dbeta = dy.sum((0, 2, 3))
    gdy = (dy * gamma[None, :, None, None]).reshape(n, G, -1)
    xh = xhat.reshape(n, G, -1)
    dx = rstd * (gdy - gdy.mean(-1, keepdims=True) - xh * (gdy * xh).mean(-1, keepdims=True))
    return dx.reshape(x.shape), dgamma, dbeta


def _gn_fast(G):
    K = kernels.ops()

    def f(x, g, b):
        n, c, h, w = x.shape
        return K.group_norm(x.reshape(n, G, c // G, h * w), g, b)[0].reshape(n, c, h, w)
    return f


@needs_kernels
@pytest.mark.parametrize("shape,G", [((2, 6, 5, 7), 2), ((3, 4, 3, 3), 1), ((2, 8, 3, 2), 4)])
def test_group_norm_forward_and_gradients(shape, G):
    rng = _rng(2)
    # an offset mean checks that the variance is not computed as E[x^2] - E[x]^2 in float32
    x = (rng.standard_normal(shape) * 2.0 + 5.0).astype(np.float32)
    gamma = (1.0 + 0.5 * rng.standard_normal(shape[1])).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    x64, g64, b64 = (a.astype(np.float64) for a in (x, gamma, beta))
    out = _Call(_gn_fast(G))(Tensor(x), Tensor(gamma), Tensor(beta)).asnumpy()
    _close(out, _gn64(x64, G, g64, b64), atol_frac=1e-6)
    dy = rng.standard_normal(shape).astype(np.float32)
    got = _grads(_gn_fast(G), [x, gamma, beta], dy, (0, 1, 2))
    for a, b in zip(got, _gn_grads64(x64, G, g64, b64, dy.astype(np.float64))):
        _close(a, b, atol_frac=1e-5)


@needs_kernels
def test_group_norm_cell_uses_the_fixed_eps_kernel_for_1e_5_and_the_eps_input_kernel_otherwise():
    assert layers.GroupNorm(2, 4)._fast is not None and layers.GroupNorm(2, 4)._eps_fast is None
    assert layers.GroupNorm(2, 4, eps=1e-6)._fast is None and layers.GroupNorm(2, 4, eps=1e-6)._eps_fast is not None


# ----------------------------------------------------------------------------- fused attention


def _softmax64(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _softmax_vjp64(y, g, axis):
    return y * (g - (g * y).sum(axis, keepdims=True))


def _attention64(kind, qkv):
    """The U-Net attentions from qkv [b, 3, heads, d, n] to [b, heads, d, n] in float64, and a
    function giving the qkv-gradient for a cotangent of the output (analytic VJP)."""
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    scale = q.shape[2] ** -0.5
    if kind == "linear":
        qs, ks = _softmax64(q, -2), _softmax64(k, -1)
        ctx = np.einsum("bhdn,bhen->bhde", ks, v)
        out = np.einsum("bhde,bhdn->bhen", ctx, qs * scale)

        def vjp(g):
            dctx = np.einsum("bhdn,bhen->bhde", qs * scale, g)
            dq = _softmax_vjp64(qs, np.einsum("bhde,bhen->bhdn", ctx, g) * scale, -2)
            dk = _softmax_vjp64(ks, np.einsum("bhde,bhen->bhdn", dctx, v), -1)
            return np.stack([dq, dk, np.einsum("bhde,bhdn->bhen", dctx, ks)], 1)
    else:
        attn = _softmax64(np.einsum("bhdi,bhdj->bhij", q * scale, k), -1)
        out = np.einsum("bhij,bhdj->bhdi", attn, v)

        def vjp(g):
            ds = _softmax_vjp64(attn, np.einsum("bhdi,bhdj->bhij", g, v), -1)
            return np.stack([np.einsum("bhij,bhdj->bhdi", ds, k) * scale,
                             np.einsum("bhij,bhdi->bhdj", ds, q) * scale,
                             np.einsum("bhdi,bhij->bhdj", g, attn)], 1)
    return out, vjp


def _attention_op(kind):
    op = kernels.ops().linear_attention if kind == "linear" else kernels.ops().full_attention
    return lambda qkv: op(qkv)[0]


@needs_kernels
@pytest.mark.parametrize("kind", ["linear", "full"])
# (batch, heads, dim_head, n): n and dim_head below, at and above the 8-row x 16/32-column
# blocks of the kernels' matmuls, with remainders; the U-Net's 32 x 49 and a large linear n
@pytest.mark.parametrize("shape", [(1, 2, 8, 15), (3, 2, 8, 49), (1, 1, 5, 1), (2, 4, 32, 49),
                                   (1, 2, 13, 70), (3, 1, 32, 211)])
def test_fused_attention_forward_and_qkv_gradient(kind, shape):
    b, heads, d, n = shape
    rng = _rng(14)
    qkv = (rng.standard_normal((b, 3, heads, d, n)) * 2).astype(np.float32)
    out64, vjp = _attention64(kind, qkv.astype(np.float64))
    _close(_Call(_attention_op(kind))(Tensor(qkv)).asnumpy(), out64, atol_frac=2e-6)
    dy = rng.standard_normal(out64.shape)
    (dqkv,) = _grads(_attention_op(kind), [qkv], dy.astype(np.float32), (0,))
    ref = vjp(dy.astype(np.float32).astype(np.float64))
    _close(dqkv, ref, rtol=1e-4, atol_frac=1e-5)


def test_attention_reference_gradient_matches_finite_differences(mode):
    if mode == "graph":
        pytest.skip("mode independent")
    rng = _rng(15)
    x = rng.standard_normal((2, 3, 2, 5, 7)) * 2
    g, r = rng.standard_normal((2, 2, 5, 7)), rng.standard_normal(x.shape)
    eps = 1e-6
    for kind in ("linear", "full"):
        _, vjp = _attention64(kind, x)
        fd = ((_attention64(kind, x + eps * r)[0] - _attention64(kind, x - eps * r)[0]) * g).sum() / (2 * eps)
        np.testing.assert_allclose((vjp(g) * r).sum(), fd, rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("kind", ["linear", "full"])
def test_attention_cells_use_the_fused_kernel_and_match_builtin(kind, mode):
    cls = unet_mod.LinearAttention if kind == "linear" else unet_mod.Attention
    ms.set_seed(16)
    fast, builtin = cls(6, heads=2, dim_head=8), cls(6, heads=2, dim_head=8)
    builtin._fast = None
    assert fast._fast is not None
    rng = _rng(16)
    for a, b in zip(fast.get_parameters(), builtin.get_parameters()):
        a.set_data(Tensor(rng.standard_normal(a.shape).astype(np.float32) * 0.5))
        b.set_data(a.value().copy())
    x = (rng.standard_normal((3, 6, 5, 7)) * 2).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = builtin(Tensor(x)).asnumpy()
    _close(fast(Tensor(x)).asnumpy(), want, rtol=1e-4, atol_frac=1e-5)

    class Loss(nn.Cell):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell
            self.dy = Tensor(dy)

        def construct(self, xx):
            return (self.cell(xx) * self.dy).sum()

    def grads(cell):  # d/dx, then every parameter's gradient
        gx, gw = ms.grad(Loss(cell), grad_position=0, weights=cell.trainable_params())(Tensor(x))
        return [g.asnumpy() for g in (gx, *gw)]

    for got, ref in zip(grads(fast), grads(builtin)):
        _close(got, ref, rtol=1e-4, atol_frac=1e-5)

    if mode == "pynative":  # float16 takes the built-in path in both cells
        fast.to_float(ms.float16)
        builtin.to_float(ms.float16)
        got = fast(Tensor(x, ms.float16))
        assert got.dtype == ms.float16
        np.testing.assert_array_equal(got.asnumpy(), builtin(Tensor(x, ms.float16)).asnumpy())


@needs_kernels
def test_ema_update_is_the_float32_formula_exactly():
    """ema_update(d, *shadows, *params) = shadows * d + params * (1 - d), rounded as NumPy's
    float32 ops round it (no fused multiply-add), also for tensors split over threads."""
    rng = _rng(14)
    shapes = ((3, 4), (200003,), (2, 3, 4, 5), (1,))
    shadows = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    op = kernels.ops().ema_update
    for d in (np.float32(0.1), np.float32(10 / 19), np.float32(0.999)):
        out = _Call(op)(Tensor(d), *[Tensor(a) for a in shadows + params])
        assert len(out) == len(shapes)
        for o, s, p in zip(out, shadows, params):
            assert o.shape == s.shape and np.array_equal(o.asnumpy(), s * d + p * (np.float32(1) - d))


# ----------------------------------------------------------------------------- depthwise conv


def _dwconv64(x, w):
    n, c, h, wd = x.shape
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros(x.shape)
    for i in range(k):
        for j in range(k):
            out += w[None, :, 0, i, j, None, None] * xp[:, :, i:i + h, j:j + wd]
    return out


def _dwconv_grads64(x, w, dy):
    n, c, h, wd = x.shape
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros(xp.shape)
    dw = np.zeros(w.shape)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + h, j:j + wd] += w[None, :, 0, i, j, None, None] * dy
            dw[:, 0, i, j] = (dy * xp[:, :, i:i + h, j:j + wd]).sum((0, 2, 3))
    return dxp[:, :, p:p + h, p:p + wd], dw


@needs_kernels
# The kernels pick a layout by shape (cpu_kernels.cc, use_lanes): small batches run on flat
# padded planes (blocks of 64 outputs and a tail of 16 / 32 / 48 / 64; the filter gradient sums
# groups of planes, the last one partial at (3, 2, 20, 18)), batches of 16+ small planes in
# batch lanes (a full group, a partial group, H and W smaller than K).
@pytest.mark.parametrize("shape,k", [((2, 3, 6, 5), 7), ((1, 2, 9, 4), 3), ((2, 2, 2, 3), 5),
                                     ((2, 2, 10, 7), 3), ((1, 2, 11, 7), 3), ((3, 2, 20, 18), 5),
                                     ((16, 3, 7, 7), 7), ((18, 2, 5, 7), 7), ((16, 2, 3, 2), 7)])
def test_depthwise_conv_forward_and_gradients(shape, k):
    rng = _rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((shape[1], 1, k, k)).astype(np.float32)
    K = kernels.ops()
    out = _Call(K.dwconv)(Tensor(x), Tensor(w)).asnumpy()
    _close(out, _dwconv64(x.astype(np.float64), w.astype(np.float64)), atol_frac=1e-6)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw = _grads(K.dwconv, [x, w], dy, (0, 1))
    rdx, rdw = _dwconv_grads64(x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64))
    _close(dx, rdx, atol_frac=1e-6)
    _close(dw, rdw, atol_frac=1e-6)


@needs_kernels
def test_depthwise_conv_cell_matches_builtin_conv():
    cell = layers.DepthwiseConv2d(3, 7)
    assert cell._fast is not None and cell.weight.shape == (3, 1, 7, 7)
    ref = nn.Conv2d(3, 3, 7, pad_mode="pad", padding=3, group=3, has_bias=False)
    ref.weight.set_data(cell.weight.value().copy())
    x = Tensor(_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(cell(x).asnumpy(), ref(x).asnumpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- nearest x2 up-sampling

@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 7, 6), (1, 2, 1, 1), (64, 4, 14, 14)])
def test_nearest_upsample_forward_and_gradient(shape):
    """Every output pixel is its source pixel (bit for bit); the gradient sums each 2x2 block; the kernels
    are used, and the built-in path (fast_kernels=False, as exported) gives the same."""
    x = _rng(7).standard_normal(shape).astype(np.float32)
    n, c, h, w = shape
    dy = _rng(8).standard_normal((n, c, 2 * h, 2 * w)).astype(np.float32)
    ref = x.repeat(2, axis=2).repeat(2, axis=3)
    dref = dy.astype(np.float64).reshape(n, c, h, 2, w, 2).sum(axis=(3, 5))
    for fast in (None, False):
        cell = layers.NearestUpsample2x(fast_kernels=fast)
        assert (cell._fast is not None) == (fast is None)
        np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), ref)
        _close(_grads(cell, [x], dy, 0)[0], dref)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 7, 1, 1), (16, 8, 14, 14)])
def test_bias_add_forward_and_gradients(shape):
    """y = x + b per channel, exactly as MindSpore's BiasAdd; db sums dy over N, H, W."""
    x = _rng(9).standard_normal(shape).astype(np.float32)
    b = _rng(10).standard_normal(shape[1]).astype(np.float32)
    dy = _rng(11).standard_normal(shape).astype(np.float32)
    fast = kernels.ops()
    np.testing.assert_array_equal(fast.bias_add(Tensor(x), Tensor(b)).asnumpy(),
                                  ops.bias_add(Tensor(x), Tensor(b)).asnumpy())
    dx, db = _grads(_Call(fast.bias_add), [x, b], dy, (0, 1))
    np.testing.assert_array_equal(dx, dy)
    _close(db, dy.astype(np.float64).sum(axis=(0, 2, 3)))


# ----------------------------------------------------------------------------- dense conv

needs_conv = pytest.mark.skipif(not kernels.conv_enabled(), reason=f"conv kernels unavailable: {kernels.status()}")


def _taps(xp, k, s, ho, wo):
    """(i, j, view) for every kernel tap: view[n, c, oh, ow] = xp[n, c, oh*s + i, ow*s + j]."""
    for i in range(k):
        for j in range(k):
            yield i, j, xp[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]


def _conv64(x, w, s, p):
    """Cross-correlation with zero padding p and stride s (NCHW, weight [Co, Ci, K, K])."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (x.shape[2] + 2 * p - k) // s + 1, (x.shape[3] + 2 * p - k) // s + 1
    return sum(np.einsum("nchw,oc->nohw", v, w[:, :, i, j]) for i, j, v in _taps(xp, k, s, ho, wo))


def _conv_grads64(x, w, dy, s, p):
    """(dx, dw) of sum(conv(x, w) * dy), written out tap by tap (the adjoint scatter)."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = dy.shape[2:]
    dxp, dw = np.zeros(xp.shape), np.zeros(w.shape)
    for i, j, v in _taps(xp, k, s, ho, wo):
        dw[:, :, i, j] = np.einsum("nchw,nohw->oc", v, dy)
        dxp[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    return dxp[:, :, p:p + x.shape[2], p:p + x.shape[3]], dw


def _conv_transpose64(x, w, s, p):
    """PyTorch/MindSpore ConvTranspose2d (weight [Cin, Cout, K, K]): every input pixel scatters
    its K x K stamp to out[i*s - p + ky, j*s - p + kx]."""
    n, ci, h, wd = x.shape
    k = w.shape[-1]
    full = np.zeros((n, w.shape[1], (h - 1) * s + k, (wd - 1) * s + k))
    for i in range(k):
        for j in range(k):
            rows, cols = slice(i, i + s * (h - 1) + 1, s), slice(j, j + s * (wd - 1) + 1, s)
            full[:, :, rows, cols] += np.einsum("nchw,co->nohw", x, w[:, :, i, j])
    return full[:, :, p:full.shape[2] - p, p:full.shape[3] - p]


@needs_conv
@pytest.mark.parametrize("kind,shape,cout,k", [
    ("same", (2, 3, 7, 5), 4, 3), ("same", (3, 5, 4, 6), 2, 1), ("same", (2, 1, 6, 6), 3, 7),
    ("same", (3, 2, 5, 3), 2, 7),  # W <= K // 2: the general (not flat-shift) stride-1 path
    # >= 8 channels: the direct kernels (all passes when Co <= Ci, else the filter gradient),
    # channel counts that fill 1, 2 and 3 vectors partly, pixel counts that fill tiles partly
    ("same", (3, 40, 5, 9), 35, 3), ("same", (2, 9, 3, 2), 20, 7), ("same", (5, 20, 7, 7), 19, 5),
    # images >= 12 wide: the forward and input-gradient passes take the row-ordered tiles (widening
    # layers too), with the padding columns between rows computed and dropped; one vector exactly
    ("same", (2, 24, 12, 17), 16, 5),
    # ... and for K = 3 Winograd F(2x2, 3x3): odd heights and widths (half tiles), output channels
    # past a whole register tile of 8, a row of more tiles than one vector holds (W = 34: 17 tiles);
    # the filter gradient of every K = 3 case with >= 8 channels on Winograd F(3x3, 2x2): odd sizes
    # (dy tiles half outside), channel counts that fill vectors and rows of 12 channels partly, and an
    # image whose 240 tiles take two passes (170 at a time for 48 + 48 padded channels)
    ("same", (3, 40, 30, 32), 40, 3),
    ("same", (2, 12, 13, 14), 20, 3), ("same", (1, 16, 12, 19), 33, 3), ("same", (1, 9, 4, 34), 8, 3),
    ("down", (2, 3, 8, 6), 5, 4), ("down", (1, 4, 2, 4), 3, 4),
    # >= 8 channels: the strided forward and filter gradient on the direct kernels (K = 4 and 3)
    ("down", (2, 9, 14, 12), 12, 4), ("down", (3, 10, 6, 10), 17, 3),
])
def test_dense_conv_forward_and_gradients(kind, shape, cout, k):
    rng = _rng(8)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((cout, shape[1], k, k)).astype(np.float32)
    s, p = (1, k // 2) if kind == "same" else (2, 1)
    op = getattr(kernels.ops(), f"conv_{kind}")
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = _conv64(x64, w64, s, p)
    _close(_Call(op)(Tensor(x), Tensor(w)).asnumpy(), ref, atol_frac=1e-6)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    dx, dw = _grads(op, [x, w], dy, (0, 1))
    rdx, rdw = _conv_grads64(x64, w64, dy.astype(np.float64), s, p)
    _close(dx, rdx, atol_frac=1e-6)
    _close(dw, rdw, atol_frac=1e-6)


@needs_conv
@pytest.mark.parametrize("xshape,cout", [((2, 3, 4, 5), 2),
                                         ((2, 9, 7, 6), 12)])  # >= 8 channels: direct kernels (its input gradient)
def test_transposed_conv_forward_and_gradients(xshape, cout):
    rng = _rng(9)
    x = rng.standard_normal(xshape).astype(np.float32)
    w = rng.standard_normal((xshape[1], cout, 4, 4)).astype(np.float32)  # [Cin, Cout, K, K]
    op = kernels.ops().conv_up
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = _conv_transpose64(x64, w64, 2, 1)
    assert ref.shape == (xshape[0], cout, 2 * xshape[2], 2 * xshape[3])
    _close(_Call(op)(Tensor(x), Tensor(w)).asnumpy(), ref, atol_frac=1e-6)
    # the transposed conv is the adjoint of the strided conv: its x-gradient is that conv,
    # and its w-gradient is the strided conv's w-gradient with the roles of x and dy swapped
    dy = rng.standard_normal(ref.shape)
    dx, dw = _grads(op, [x, w], dy.astype(np.float32), (0, 1))
    _close(dx, _conv64(dy, w64, 2, 1), atol_frac=1e-6)
    _close(dw, _conv_grads64(dy, w64, x64, 2, 1)[1], atol_frac=1e-6)


@needs_conv
def test_conv_cells_match_builtin_and_fall_back_where_not_covered():
    rng = _rng(10)
    x = Tensor(rng.standard_normal((2, 3, 6, 6)).astype(np.float32))
    x_odd = Tensor(rng.standard_normal((2, 3, 7, 7)).astype(np.float32))
    cases = [(layers.Conv2d(3, 4, 7, padding=3, has_bias=True), True),
             (layers.Conv2d(3, 4, 4, padding=1, stride=2), True),
             (layers.Conv2d(3, 4, 3, padding=0), False)]          # "valid" conv: built-in
    for cell, covered in cases:
        assert (cell._fast is not None) == covered
        ref = nn.Conv2d(3, 4, cell.kernel_size, stride=cell.stride, pad_mode=cell.pad_mode,
                        padding=cell.padding, has_bias=cell.has_bias, bias_init="normal")
        ref.weight.set_data(cell.weight.value().copy())
        if cell.has_bias:
            cell.bias.set_data(ref.bias.value().copy())
        for inp in (x, x_odd):  # odd sizes take the built-in path in the strided conv
            np.testing.assert_allclose(cell(inp).asnumpy(), ref(inp).asnumpy(), rtol=1e-5, atol=1e-5)
    up = layers.ConvTranspose2d(3, 2)
    assert up._fast is not None
    ref = nn.Conv2dTranspose(3, 2, 4, stride=2, pad_mode="pad", padding=1)
    ref.weight.set_data(up.weight.value().copy())
    np.testing.assert_allclose(up(x).asnumpy(), ref(x).asnumpy(), rtol=1e-5, atol=1e-5)


def test_conv_kernels_left_out_without_openblas(tmp_path, monkeypatch, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    if kernels.conv_enabled():  # the switch: cells built while it is 0 use MindSpore's conv
        monkeypatch.setenv(kernels.ENV_CONV, "0")
        assert not kernels.conv_enabled() and layers.Conv2d(2, 3, 3, padding=1)._fast is None
        assert layers.ConvTranspose2d(2, 2)._fast is None
        monkeypatch.setenv(kernels.ENV_CONV, "1")
        assert layers.Conv2d(2, 3, 3, padding=1)._fast is not None
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(kernels, "_state", dict(kernels._state, lib=None, error=None, tried=False, warned=False))
    monkeypatch.setattr(kernels, "_openblas", lambda: None)
    if not kernels.enabled():
        pytest.skip(f"fast kernels unavailable: {kernels.status()}")
    assert not kernels.conv_enabled() and "convolutions built-in" in kernels.status()
    assert layers.Conv2d(2, 3, 3, padding=1)._fast is None
    assert layers.GroupNorm(1, 4)._fast is not None


# ----------------------------------------------------------------------------- switch, cache, fallback


@needs_kernels
def test_whole_unet_same_output_and_grads_with_and_without_kernels(monkeypatch, mode):
    from ddpm_ms.models.tutorial_unet import Unet
    kw = dict(dim=8, dim_mults=(1, 2), channels=1, num_classes=2)
    ms.set_seed(5)
    fast = Unet(**kw)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    slow = Unet(**kw)
    for a, b in zip(fast.get_parameters(), slow.get_parameters()):
        b.set_data(a.value().copy())
    assert fast.downs[0].block1.ds_conv._fast is not None
    assert slow.downs[0].block1.ds_conv._fast is None
    x = Tensor(_rng(6).standard_normal((2, 1, 8, 8)).astype(np.float32))
    t = Tensor(np.array([1, 500], np.int32))
    y = Tensor(np.array([0, 2], np.int32))
    np.testing.assert_allclose(fast(x, t, y).asnumpy(), slow(x, t, y).asnumpy(), rtol=1e-4, atol=1e-5)
    if mode == "pynative":
        def loss(net):
            return lambda xx: (net(xx, t, y) ** 2).mean()
        ga = ms.grad(loss(fast), grad_position=None, weights=fast.trainable_params())(x)
        gb = ms.grad(loss(slow), grad_position=None, weights=slow.trainable_params())(x)
        for p, a, b in zip(fast.trainable_params(), ga, gb):
            scale = max(np.abs(b.asnumpy()).max(), 1e-3)
            np.testing.assert_allclose(a.asnumpy() / scale, b.asnumpy() / scale, atol=2e-5, err_msg=p.name)


def test_switch_off_by_environment(monkeypatch, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    for value in ("0", "false", "off"):
        monkeypatch.setenv(kernels.ENV_SWITCH, value)
        assert not kernels.enabled()
        assert "DDPM_MS_FAST_KERNELS=0" in kernels.status()
        assert layers.GroupNorm(1, 4)._fast is None
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert kernels.enabled()
    assert not kernels.enabled(False) and layers.GroupNorm(1, 4, fast_kernels=False)._fast is None


def _kernel_holders(model):
    """(cell name, attribute) of every cell attribute holding the kernels or one of their Custom ops."""
    found = []
    for name, cell in model.cells_and_names():
        for attr, value in list(vars(cell).items()) + list(cell._primitives.items()):
            if isinstance(value, ops.Custom) or (kernels.enabled() and value is kernels.ops()):
                found.append((name, attr))
    return found


@needs_kernels
@pytest.mark.parametrize("arch", ["tutorial", "ddpm"])
def test_fast_kernels_argument_builds_a_builtin_model_with_the_same_outputs(arch, monkeypatch, mode):
    """create_model(cfg, fast_kernels=False): no Custom op anywhere, whatever DDPM_MS_FAST_KERNELS says,
    and the same function as the kernel-backed model on the same weights; True beats the switch."""
    if mode == "graph":
        pytest.skip("mode independent: the choice is made when the cells are built")
    from ddpm_ms.config import load_config
    from ddpm_ms.factory import create_model
    from tiny_config import TINY
    over = {"block_type": "convnext", "act": "gelu", "attn_levels": [1], "num_classes": 2}
    if arch == "ddpm":
        over = {"arch": "ddpm", "layers_per_block": 1, "attn_levels": [1], "num_classes": 2, "norm_eps": 1e-6}
    cfg = load_config(TINY, over)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")  # the argument, not the user's default, decides
    ms.set_seed(3)
    fast = create_model(cfg, fast_kernels=True)
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    builtin = create_model(cfg, fast_kernels=False)
    assert _kernel_holders(builtin) == []
    assert len(_kernel_holders(fast)) > 10
    assert [p.name for p in fast.get_parameters()] == [p.name for p in builtin.get_parameters()]
    rng = _rng(3)
    for a, b in zip(fast.get_parameters(), builtin.get_parameters()):
        a.set_data(Tensor((rng.standard_normal(a.shape) * 0.3).astype(np.float32)))
        b.set_data(a.value().copy())
    x = Tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    t = Tensor(np.array([1, 17], np.int32))
    y = Tensor(np.array([0, 2], np.int32))
    want = builtin(x, t, y).asnumpy()
    _close(fast(x, t, y).asnumpy(), want, rtol=1e-4, atol_frac=1e-5)


@needs_kernels
def test_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    """A library already in the cache for these sources and this CPU is used as it is, and another CPU needs
    another one. (A build from scratch into an empty cache: test_avx2_code_paths_on_an_avx512_machine.)"""
    ours = kernels.build()  # this session's library (built once per machine, then cached)
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    path = kernels.library_path(kernels._compiler())
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path) == os.path.basename(ours)
    shutil.copy2(ours, path)
    mtime = os.path.getmtime(path)
    assert kernels.build() == path and os.path.getmtime(path) == mtime  # reused, not rebuilt
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "some other cpu")
    assert kernels.library_path(kernels._compiler()) != path


def test_missing_compiler_or_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(kernels, "_state", dict(kernels._state, lib=None, error=None, tried=False, warned=False))
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.enabled()
        assert not kernels.enabled()
        norm = layers.GroupNorm(1, 4)
    assert norm._fast is None
    assert len([w for w in caught if "fast CPU kernels disabled" in str(w.message)]) == 1
    assert "kernel build failed" in kernels.status()
    x = Tensor(_rng(7).standard_normal((1, 4, 2, 2)).astype(np.float32))
    np.testing.assert_allclose(norm(x).asnumpy(), ops.group_norm(x, 1, norm.gamma, norm.beta, 1e-5).asnumpy(),
                               rtol=1e-6, atol=1e-6)

    # a compiler that fails
    monkeypatch.setattr(kernels, "_state", dict(kernels._state, lib=None, error=None, tried=False, warned=False))
    monkeypatch.setenv("CXX", "false")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert not kernels.enabled()
    assert [f for f in os.listdir(tmp_path) if f.endswith(".so") or f.endswith(".tmp")] == []


def test_other_backends_keep_builtin_ops(monkeypatch, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    monkeypatch.setattr(kernels, "_device_target", lambda: "Ascend")
    assert not kernels.enabled()
    assert layers.DepthwiseConv2d(2, 7)._fast is None
    assert "device Ascend" in kernels.status()


# ----------------------------------------------------------------------------- worker pool

_POOL_CHECK = r"""
#include "common.h"
#include <cstdio>
#include <random>
// Two client threads post jobs of 1..4 workers to a pool of 3 threads (so some jobs leave
// workers idle and some find the pool busy and must run elsewhere); every index of every
// job must run exactly once.
int main() {
  ddpm_ms_pool::Pool pool(3);
  std::atomic<long> done{0}, declined{0};
  auto client = [&](unsigned seed) {
    std::mt19937 rng(seed);
    for (int it = 0; it < 3000; ++it) {
      const int workers = 1 + rng() % 4;
      const bool slow = rng() % 200 == 0;
      std::vector<std::atomic<int>> hits(workers);
      std::function<void(int)> job = [&](int t) {
        hits[t].fetch_add(1);
        if (slow) std::this_thread::sleep_for(std::chrono::microseconds(200));
      };
      if (!pool.run(workers, job)) {
        declined++;
        for (int t = 0; t < workers; ++t) job(t);
      }
      for (int t = 0; t < workers; ++t)
        if (hits[t].load() != 1) {
            std::printf("index %d ran %d times\n", t, hits[t].load()); std::fflush(stdout); _exit(1);
        }
      done++;
      if (rng() % 300 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));  // workers fall asleep
    }
  };
  std::thread a(client, 1u), b(client, 2u);
  a.join();
  b.join();
  std::printf("%ld %ld\n", done.load(), declined.load());
  std::fflush(stdout);
  _exit(0);  // the pool's threads are never joined (as in the library)
}
"""


@pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler")
def test_worker_pool_runs_every_index_of_every_job_once(tmp_path, mode):
    if mode == "graph":
        pytest.skip("mode independent")
    import subprocess
    src = tmp_path / "pool_check.cc"
    src.write_text(_POOL_CHECK)
    exe = tmp_path / "pool_check"
    subprocess.run([kernels._compiler(), "-O2", "-std=c++17", "-pthread", "-march=native",
                    f"-I{os.path.dirname(kernels.SOURCE)}", str(src), "-o", str(exe)], check=True, timeout=300)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done, declined = map(int, proc.stdout.split())
    assert done == 6000 and 0 < declined < done  # both the pool and the fallback were exercised


@pytest.mark.skipif(kernels._compiler() is None or "avx512f" not in kernels._cpu_flags().split(),
                    reason="needs a compiler and an AVX-512 CPU (elsewhere the native build is the AVX2 one)")
def test_avx2_code_paths_on_an_avx512_machine(tmp_path, mode):
    """The kernels' vector code has AVX-512 and AVX2 variants (register tiles, lane counts):
    build the library for an AVX2-only CPU and rerun the kernel tests against their references (in
    PyNative mode: graph mode runs the same library through the same calls, tested above)."""
    if mode == "graph":
        pytest.skip("mode independent")
    import subprocess
    import sys
    env = dict(os.environ, DDPM_MS_KERNEL_MARCH="haswell", DDPM_MS_KERNEL_CACHE=str(tmp_path))
    tests = "(dense_conv or transposed_conv or fused_attention or group_norm or depthwise or gelu or silu or ema) " \
            "and pynative"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = os.listdir(tmp_path)  # built here, for haswell, with no temporary file left beside it
    assert len(built) == 1 and built[0].endswith(".so"), built


def test_non_x86_hosts_use_builtin_ops_with_one_note_and_no_build(monkeypatch, capsys, mode):
    """The sources use x86 intrinsics: on aarch64 (the Kunpeng hosts of Ascend servers) nothing is compiled."""
    if mode == "graph":
        pytest.skip("mode independent")
    monkeypatch.setattr(kernels, "_state", dict(kernels._state, lib=None, error=None, tried=False, warned=False))
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kernels, "build", lambda: pytest.fail("the kernels must not be built on aarch64"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning per cell
        assert not kernels.enabled()
        assert not kernels.enabled()
        assert layers.GroupNorm(1, 4)._fast is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "x86-64 only" in line]
    assert len(notes) == 1 and "aarch64" in notes[0]
    assert "x86-64 only" in kernels.status()
