"""MindSpore Custom primitives (func_type="aot") over the compiled kernels, with bprops."""

from types import SimpleNamespace

from mindspore import ops


def _same(*shapes):
    return shapes[0]


def _first_half(decay, *rest):
    """Shapes (or dtypes) of the shadows in (decay, *shadows, *params)."""
    return tuple(rest[:len(rest) // 2])


def _stats_shape(x, gamma, beta):
    return x, [x[0], x[1]], [x[0], x[1]]


def _stats_dtype(x, gamma, beta):
    return x, x, x


def _conv_ops(custom):
    """Dense convs (direct or im2col + OpenBLAS), weight w [Co, Ci, K, K], no bias, all differentiable:

    * ``conv_same(x, w)``: stride 1, zero padding K // 2 (odd K);
    * ``conv_down(x, w)``: stride 2, zero padding 1, even H and W (output H/2 x W/2);
    * ``conv_up(x, w)``: the transposed conv of ``conv_down`` (MindSpore/PyTorch
      ``Conv2dTranspose(k, stride=2, padding=1)`` with weight [Cin, Cout, K, K]), output 2H x 2W.
    """
    def out_same(x, w):
        return [x[0], w[0], x[2], x[3]]

    def out_down(x, w):
        return [x[0], w[0], x[2] // 2, x[3] // 2]

    def in_same(dy, w):
        return [dy[0], w[1], dy[2], dy[3]]

    def in_down(dy, w):
        return [dy[0], w[1], 2 * dy[2], 2 * dy[3]]

    def weight_shape(dy, x, w):
        return w

    same_in = custom("conv_same_bwd_input", in_same, _same)
    same_w = custom("conv_same_bwd_filter", weight_shape, lambda dy, x, w: w)
    down_in = custom("conv_down_bwd_input", in_down, _same)
    down_w = custom("conv_down_bwd_filter", weight_shape, lambda dy, x, w: w)

    def same_bprop(x, w, out, dout):
        return same_in(dout, w), same_w(dout, x, w)

    def down_bprop(x, w, out, dout):
        return down_in(dout, w), down_w(dout, x, w)

    down = custom("conv_down_fwd", out_down, _same, down_bprop)

    def up_bprop(x, w, out, dout):
        # conv_up(x) = down_in(x): its adjoint in x is conv_down, in w the roles of x and dy swap
        return down(dout, w), down_w(x, dout, w)

    return dict(conv_same=custom("conv_same_fwd", out_same, _same, same_bprop), conv_down=down,
                conv_up=custom("conv_down_bwd_input", in_down, _same, up_bprop))


def _attention_op(custom, kind, saved_tail):
    """``{kind}_attn_fwd``: qkv [b, 3, heads, d, n] -> (out [b, heads, d, n], saved [b, heads, *tail]),
    the attention of the U-Net's ``LinearAttention`` or ``Attention`` from the qkv projection to
    the input of ``to_out`` (scale d ** -0.5); ``saved`` (the linear kind's context k v^T, the full
    kind's attention matrix) is what its bprop, one ``{kind}_attn_bwd`` op, needs besides qkv."""
    bwd = custom(f"{kind}_attn_bwd", lambda qkv, saved, dout: qkv, lambda qkv, saved, dout: qkv)

    def bprop(qkv, out, dout):
        return (bwd(qkv, out[1], dout[0]),)

    def out_shape(qkv):
        b, _, heads, d, n = qkv
        return [b, heads, d, n], [b, heads, *saved_tail(d, n)]

    return custom(f"{kind}_attn_fwd", out_shape, lambda qkv: (qkv, qkv), bprop)


def make_ops(lib, conv=False):
    """Custom ops for the library at ``lib``: gelu, silu, group_norm, dwconv, plane_add, bias_add,
    upsample2x, the fused
    attentions ``linear_attention`` and ``full_attention`` (see :func:`_attention_op`), all
    differentiable, all_finite, and with ``conv`` the dense convolutions of :func:`_conv_ops`."""

    def custom(name, out_shape, out_dtype, bprop=None):
        return ops.Custom(f"{lib}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                          bprop=bprop)

    gelu_bwd = custom("gelu_bwd", _same, _same)
    silu_bwd = custom("silu_bwd", _same, _same)

    def gelu_bprop(x, out, dout):
        return (gelu_bwd(x, dout),)

    def silu_bprop(x, out, dout):
        return (silu_bwd(x, dout),)

    gelu = custom("gelu_fwd", _same, _same, gelu_bprop)
    silu = custom("silu_fwd", _same, _same, silu_bprop)

    gn_bwd = custom("group_norm_bwd",
                    lambda dy, x, mean, rstd, gamma: (dy, gamma, gamma),
                    lambda dy, x, mean, rstd, gamma: (dy, dy, dy))

    def gn_bprop(x, gamma, beta, out, dout):
        dx, dgamma, dbeta = gn_bwd(dout[0], x, out[1], out[2], gamma)
        return dx, dgamma, dbeta

    # x viewed as [N, G, C/G, H*W] -> (y, mean [N, G], rstd [N, G]); eps = 1e-5
    group_norm = custom("group_norm_fwd", _stats_shape, _stats_dtype, gn_bprop)

    def gn_eps_bprop(x, gamma, beta, eps, out, dout):
        return gn_bprop(x, gamma, beta, out, dout) + (ops.zeros_like(eps),)

    # the same with eps given as a float32 [1] tensor (the backward does not depend on it)
    group_norm_eps = custom("group_norm_fwd", lambda x, g, b, e: _stats_shape(x, g, b),
                            lambda x, g, b, e: _stats_dtype(x, g, b), gn_eps_bprop)

    dw_bwd_input = custom("dwconv_bwd_input", _same, _same)
    dw_bwd_filter = custom("dwconv_bwd_filter", lambda dy, x, w: w, lambda dy, x, w: w)

    def dw_bprop(x, w, out, dout):
        return dw_bwd_input(dout, w), dw_bwd_filter(dout, x, w)

    # depthwise conv, stride 1, zero padding K // 2, no bias: x [N, C, H, W], w [C, 1, K, K]
    dwconv = custom("dwconv_fwd", _same, _same, dw_bprop)

    plane_sum = custom("plane_sum_fwd", lambda dy: [dy[0], dy[1]], _same)

    def plane_add_bprop(x, b, out, dout):
        return dout, plane_sum(dout)

    # x [N, C, H, W] + b [N, C] broadcast over H, W
    plane_add = custom("plane_add_fwd", lambda x, b: x, lambda x, b: x, plane_add_bprop)

    bias_grad = custom("bias_grad", lambda dy: [dy[1]], _same)

    def bias_add_bprop(x, b, out, dout):
        return dout, bias_grad(dout)

    # x [N, C, H, W] + b [C] broadcast over N, H, W (a convolution's bias)
    bias_add = custom("bias_add_fwd", lambda x, b: x, lambda x, b: x, bias_add_bprop)

    upsample2x_bwd = custom("upsample2x_bwd", lambda dy: [dy[0], dy[1], dy[2] // 2, dy[3] // 2], _same)

    def upsample2x_bprop(x, out, dout):
        return (upsample2x_bwd(dout),)

    # nearest-neighbour x2: x [N, C, H, W] -> [N, C, 2H, 2W]
    upsample2x = custom("upsample2x_fwd", lambda x: [x[0], x[1], 2 * x[2], 2 * x[3]], _same, upsample2x_bprop)

    # all_finite(*tensors) -> float32 [1]: 1.0 if every element of every tensor is finite
    all_finite = custom("all_finite", lambda *shapes: [1], lambda *dtypes: dtypes[0])

    # ema_update(decay [1], *shadows, *params) -> new shadows: s * decay + p * (1 - decay)
    ema_update = custom("ema_update", _first_half, _first_half)

    return SimpleNamespace(gelu=gelu, silu=silu, group_norm=group_norm, group_norm_eps=group_norm_eps,
                           dwconv=dwconv, plane_add=plane_add, upsample2x=upsample2x,
                           upsample2x_bwd=upsample2x_bwd, bias_add=bias_add, bias_grad=bias_grad,
                           all_finite=all_finite, ema_update=ema_update,
                           linear_attention=_attention_op(custom, "linear", lambda d, n: [d, d]),
                           full_attention=_attention_op(custom, "full", lambda d, n: [n, n]),
                           gelu_bwd=gelu_bwd, silu_bwd=silu_bwd, group_norm_bwd=gn_bwd,
                           dwconv_bwd_input=dw_bwd_input, dwconv_bwd_filter=dw_bwd_filter,
                           **(_conv_ops(custom) if conv else {}))
