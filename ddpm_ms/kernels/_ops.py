"""MindSpore Custom primitives (func_type="aot") over the compiled kernels, with bprops."""

from types import SimpleNamespace

from mindspore import ops


def _same(*shapes):
    return shapes[0]


def _stats_shape(x, gamma, beta):
    return x, [x[0], x[1]], [x[0], x[1]]


def _stats_dtype(x, gamma, beta):
    return x, x, x


def make_ops(lib):
    """Custom ops for the library at ``lib``: gelu, silu, group_norm, dwconv (all differentiable)."""

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

    dw_bwd_input = custom("dwconv_bwd_input", _same, _same)
    dw_bwd_filter = custom("dwconv_bwd_filter", lambda dy, x, w: w, lambda dy, x, w: w)

    def dw_bprop(x, w, out, dout):
        return dw_bwd_input(dout, w), dw_bwd_filter(dout, x, w)

    # depthwise conv, stride 1, zero padding K // 2, no bias: x [N, C, H, W], w [C, 1, K, K]
    dwconv = custom("dwconv_fwd", _same, _same, dw_bprop)

    return SimpleNamespace(gelu=gelu, silu=silu, group_norm=group_norm, dwconv=dwconv,
                           gelu_bwd=gelu_bwd, silu_bwd=silu_bwd, group_norm_bwd=gn_bwd,
                           dwconv_bwd_input=dw_bwd_input, dwconv_bwd_filter=dw_bwd_filter)
