"""Drop-in layers that run the compiled CPU kernels (``ddpm_ms.models.kernels``) where they apply.

On CPU, GroupNorm, GELU, SiLU, the depthwise 7x7 convolution and the blocks' time shift run as
compiled C++ kernels (same functions, forward and backward; MindSpore's own CPU versions are
3-60x slower, the depthwise weight gradient most), the attentions from the qkv projection to the
output projection as one fused kernel each way, and the dense convolutions as direct convolutions
or im2col + OpenBLAS sgemm when the scipy-openblas32 wheel is installed.

Every layer takes ``fast_kernels``: False builds it on MindSpore's built-in ops alone (what an
exported graph needs), True asks for the kernels, None (the default) is the user's default
(on, unless ``DDPM_MS_FAST_KERNELS=0``; ``kernels.requested``). The kernels are used only where
they are also usable (CPU device target on Linux x86-64, compiled; ``kernels.enabled``), and,
per call, for float32 inputs; otherwise the built-in ops run. A layer decides when it is built
(``kernel_ops``) and checks dtypes in ``construct`` (``use_kernels``), so a graph never mixes
paths. Parameter names and values are the same either way (each layer is the ``nn`` cell it
replaces, with the same attributes), so checkpoints move freely between the two paths.
"""

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.models import kernels as _kernels

__all__ = [
    "GELU", "SiLU", "make_act", "DepthwiseConv2d", "Conv2d", "ConvTranspose2d", "conv", "GroupNorm",
    "TimeShift", "full_attention", "linear_attention", "pointwise", "split_qkv",
    "kernel_ops", "use_kernels",
]


def kernel_ops(fast_kernels=None, conv=False):
    """The kernels' primitives if asked for and usable here (``conv``: the convolutions too), else None."""
    usable = _kernels.conv_enabled(fast_kernels) if conv else _kernels.enabled(fast_kernels)
    return _kernels.ops() if usable else None


def use_kernels(fast, *tensors):
    """In ``construct``: True when the kernels ``fast`` (from ``kernel_ops``) exist and every tensor
    is float32 (the kernels' only dtype); decided when the graph is compiled."""
    ok = fast is not None
    for x in tensors:
        ok = ok and x.dtype == ms.float32
    return ok


class GELU(nn.GELU):
    """Exact (erf) GELU, ``x * Phi(x)``; a compiled kernel on CPU (see module docstring)."""

    def __init__(self, fast_kernels=None):
        # MindSpore 2.10's nn.GELU takes a bool only (a string raises TypeError); False = ops.gelu(x, 'none'), erf
        super().__init__(approximate=False)
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        if use_kernels(self._fast, x):
            return self._fast.gelu(x)
        return super().construct(x)


class SiLU(nn.SiLU):
    """``x * sigmoid(x)``; a compiled kernel on CPU (see module docstring)."""

    def __init__(self, fast_kernels=None):
        super().__init__()
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        if use_kernels(self._fast, x):
            return self._fast.silu(x)
        return super().construct(x)


from ddpm_ms.models import ACTIVATIONS  # noqa: E402  (the names, defined MindSpore-free there for ddpm_ms.config)

_ACT_CELLS = {"gelu": GELU, "silu": SiLU}  # one Cell class per name in ACTIVATIONS


def make_act(act, fast_kernels=None):
    """Return a fresh activation Cell for ``act`` ("gelu" = exact erf GELU, or "silu")."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be 'gelu' or 'silu', got {act!r}")
    return _ACT_CELLS[act](fast_kernels)


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise KxK conv (``group = channels``), stride 1, zero padding K // 2, no bias.

    An ``nn.Conv2d`` (same parameter ``weight`` [C, 1, K, K]) that runs a compiled
    kernel on CPU for float32 inputs; MindSpore's CPU depthwise weight gradient is
    ~50x slower.
    """

    def __init__(self, channels, kernel, fast_kernels=None):
        if kernel % 2 != 1:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel size, got {kernel}")
        super().__init__(channels, channels, kernel, stride=1, pad_mode="pad", padding=kernel // 2,
                         group=channels, has_bias=False)
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        if use_kernels(self._fast, x, self.weight):
            return self._fast.dwconv(x, self.weight)
        return super().construct(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding, PyTorch-style) that runs the OpenBLAS convolution kernels
    on CPU for float32, when its geometry is one they cover: no groups, and either stride 1
    with padding K // 2 (odd K) or a 4x4 stride-2 conv with padding 1 on even-sized inputs.
    Same parameters (``weight`` [Co, Ci, K, K], optional ``bias``) either way."""

    def __init__(self, cin, cout, kernel, padding=0, stride=1, group=1, has_bias=False, fast_kernels=None):
        super().__init__(cin, cout, kernel, stride=stride, pad_mode="pad" if padding else "valid",
                         padding=padding, group=group, has_bias=has_bias)
        fast = kernel_ops(fast_kernels, conv=True) if group == 1 else None
        self._same = fast is not None and stride == 1 and kernel % 2 == 1 and padding == kernel // 2
        self._down = fast is not None and stride == 2 and kernel == 4 and padding == 1
        self._fast = fast if (self._same or self._down) else None

    def construct(self, x):
        if use_kernels(self._fast, x, self.weight) and (self._same or (x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)):
            y = self._fast.conv_same(x, self.weight) if self._same else self._fast.conv_down(x, self.weight)
            return self._fast.bias_add(y, self.bias) if self.has_bias else y
        return super().construct(x)


class ConvTranspose2d(nn.Conv2dTranspose):
    """``nn.Conv2dTranspose(cin, cout, 4, stride=2, padding=1)`` without bias (the U-Net's
    up-sampling), on CPU the adjoint of the OpenBLAS 4x4 stride-2 conv kernel."""

    def __init__(self, cin, cout, fast_kernels=None):
        super().__init__(cin, cout, 4, stride=2, pad_mode="pad", padding=1)
        self._fast = kernel_ops(fast_kernels, conv=True)

    def construct(self, x):
        if use_kernels(self._fast, x, self.weight):
            return self._fast.conv_up(x, self.weight)
        return super().construct(x)


def conv(cin, cout, kernel, padding=0, stride=1, group=1, has_bias=False, fast_kernels=None):
    """Conv2d with explicit (PyTorch-style) zero padding; a ``DepthwiseConv2d`` when it is one."""
    if group == cin == cout and stride == 1 and not has_bias and kernel % 2 == 1 \
            and padding == kernel // 2 and kernel > 1:
        return DepthwiseConv2d(cin, kernel, fast_kernels)
    return Conv2d(cin, cout, kernel, padding=padding, stride=stride, group=group, has_bias=has_bias,
                  fast_kernels=fast_kernels)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that always normalises in float32 and returns the input dtype.

    On CPU (float32, 4-D input) it runs a compiled kernel, forward and backward, for any epsilon:
    ``_fast`` is the kernel with its own constant 1e-5 (``kernels.GROUP_NORM_EPS``, the tutorial
    U-Net's), ``_eps_fast`` the same kernel taking another epsilon as a float32 [1] input
    (``group_norm_eps``; diffusers' DDPM checkpoints use 1e-6). ``out_dtype`` (None: the input's)
    is set by ``precision.to_mixed_precision``.
    """

    def __init__(self, num_groups, num_channels, eps=1e-05, affine=True, gamma_init="ones",
                 beta_init="zeros", dtype=ms.float32, fast_kernels=None):
        super().__init__(num_groups, num_channels, eps, affine, gamma_init, beta_init, dtype)
        fast = kernel_ops(fast_kernels)
        self._own_eps = bool(eps == _kernels.GROUP_NORM_EPS)
        self._fast = fast if self._own_eps else None
        self._eps_fast = None if self._own_eps else fast
        self._eps = Tensor(np.array([eps], np.float32))
        self.out_dtype = None  # None: the input's dtype; set by to_mixed_precision

    def _cal_output(self, x):
        if (use_kernels(self._fast, x, self.gamma) or use_kernels(self._eps_fast, x, self.gamma)) and x.ndim == 4:
            n, c, h, w = x.shape
            grouped = x.reshape(n, self.num_groups, c // self.num_groups, h * w)
            if self._own_eps:
                out = self._fast.group_norm(grouped, self.gamma, self.beta)
            else:
                out = self._eps_fast.group_norm_eps(grouped, self.gamma, self.beta, self._eps)
            out = out[0].reshape(n, c, h, w)
            return out if self.out_dtype is None else out.astype(self.out_dtype)
        out = ops.group_norm(x.astype(ms.float32), self.num_groups, self.gamma.astype(ms.float32),
                             self.beta.astype(ms.float32), self.eps)
        return out.astype(x.dtype if self.out_dtype is None else self.out_dtype)


class NearestUpsample2x(nn.Cell):
    """Nearest-neighbour x2 up-sampling of [N, C, H, W] (each pixel becomes a 2x2 block); a compiled
    kernel on CPU for float32 (MindSpore's CPU BroadcastTo and its ReduceSum gradient are slow)."""

    def __init__(self, fast_kernels=None):
        super().__init__()
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        if use_kernels(self._fast, x):
            return self._fast.upsample2x(x)
        b, c, h, w = x.shape
        return ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)


class TimeShift(nn.Cell):
    """``h + emb[:, :, None, None]``: a per-sample, per-channel shift (the blocks' time and
    class conditioning); a compiled kernel on CPU for float32."""

    def __init__(self, fast_kernels=None):
        super().__init__()
        self._fast = kernel_ops(fast_kernels)

    def construct(self, h, emb):
        emb = emb.astype(h.dtype)
        if use_kernels(self._fast, h):
            return self._fast.plane_add(h, emb)
        return h + emb.expand_dims(-1).expand_dims(-1)


def pointwise(x, weight, bias, fast):
    """A Dense layer's ``weight`` [Co, Ci] and ``bias`` applied at every pixel of x [N, Ci, H, W];
    ``fast``: ``kernel_ops(..., conv=True)`` (a 1x1 ``conv_same``) or None."""
    w = weight.astype(x.dtype)
    if use_kernels(fast, x):
        return fast.bias_add(fast.conv_same(x, w.reshape(w.shape[0], w.shape[1], 1, 1)), bias)
    n, c, h, wd = x.shape
    y = ops.matmul(w, x.reshape(n, c, h * wd)) + bias.astype(x.dtype).reshape(1, -1, 1)
    return y.reshape(n, w.shape[0], h, wd)


# ----- attention between the qkv projection and the output projection -----

def split_qkv(qkv, heads, dim_head, b, n):
    """[b, 3*heads*dim_head, h, w] -> q, k, v, each [b, heads, dim_head, n].

    Same values as reshaping to [b, 3, heads, dim_head, n] and indexing [:, i]; a split
    along the channel axis is ~100x faster than that strided slice on MindSpore's CPU.
    """
    q, k, v = ops.split(qkv, heads * dim_head, axis=1)
    return (q.reshape(b, heads, dim_head, n), k.reshape(b, heads, dim_head, n),
            v.reshape(b, heads, dim_head, n))


# Batched a^T b and a b^T with the transpose folded into the matmul: an explicit swapaxes
# is a full copy (a Transpose kernel) on MindSpore's CPU backend.
_matmul_ta = ops.BatchMatMul(transpose_a=True)
_matmul_tb = ops.BatchMatMul(transpose_b=True)


def _softmax32(x, axis):
    """Softmax over ``axis`` computed in float32, returned in x's dtype."""
    return ops.softmax(x.astype(ms.float32), axis).astype(x.dtype)


def full_attention(fast, qkv, heads, dim_head, b, n):
    """Softmax attention of every head over the n positions -> [b, heads, dim_head, n].

    Per head, with q, k, v of shape [d, n]: ``v @ softmax((q * d ** -0.5)^T @ k, over keys)^T``.
    With the kernels ``fast`` (float32) one compiled op forward and one backward.
    """
    if use_kernels(fast, qkv):
        return fast.full_attention(qkv.reshape(b, 3, heads, dim_head, n))[0]
    q, k, v = split_qkv(qkv, heads, dim_head, b, n)
    q = q * dim_head ** -0.5
    sim = _matmul_ta(q, k)                         # q^T k: [b, heads, n_q, n_k]
    attn = _softmax32(sim, -1)
    return _matmul_tb(v, attn)                     # v attn^T: [b, heads, d, n_q]


def linear_attention(fast, qkv, heads, dim_head, b, n):
    """Linear attention (Shen et al. 2018) of every head -> [b, heads, dim_head, n].

    Per head: q softmaxed over its dim_head features, k over the positions, ``q = q * d ** -0.5``,
    ``context = k @ v^T`` ([d, d]), ``out = context^T @ q``. With the kernels ``fast`` (float32)
    one compiled op forward and one backward.
    """
    if use_kernels(fast, qkv):
        return fast.linear_attention(qkv.reshape(b, 3, heads, dim_head, n))[0]
    q, k, v = split_qkv(qkv, heads, dim_head, b, n)
    q = _softmax32(q, -2) * dim_head ** -0.5
    k = _softmax32(k, -1)
    context = _matmul_tb(k, v)                     # k v^T: [b, heads, d, e]
    return _matmul_ta(context, q)                  # context^T q: [b, heads, e, n]
