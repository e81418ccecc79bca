"""Tests for ddpm_ms.models.tutorial_unet: shapes, parameter naming/count, and numerics against NumPy.

Forward passes run in PyNative mode (no graph compilation); one test compiles a
graph and checks it against PyNative on the same weights.
"""

import ddpm_ms  # noqa: F401  (caps oneDNN at AVX2 before MindSpore is imported)

import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from ddpm_ms.models.layers import GroupNorm, make_act
from ddpm_ms.models.tutorial_unet import (
    Attention,
    LinearAttention,
    PreNorm,
    Residual,
    SinusoidalPositionEmbeddings,
    Unet,
)




@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _x(n, c, h, w, seed=0):
    return Tensor(_rng(seed).standard_normal((n, c, h, w)).astype(np.float32))


def _t(values):
    return Tensor(np.asarray(values, dtype=np.int32))


def _names(net):
    return [p.name for p in net.trainable_params()]


# ----------------------------------------------------------------------------- configs

CONFIGS = {
    "convnext-12-c1-16": (dict(dim=8, dim_mults=(1, 2), channels=1), 16),
    "convnext-124-c3-28": (dict(dim=8, dim_mults=(1, 2, 4), channels=3), 28),
    "resnet-124-c1-16-silu": (dict(dim=8, dim_mults=(1, 2, 4), channels=1, block_type="resnet",
                                   act="silu"), 16),
    "resnet-12-c3-28-classes": (dict(dim=16, dim_mults=(1, 2), channels=3, block_type="resnet",
                                     num_classes=4), 28),
    "convnext-no-time-no-attn": (dict(dim=8, dim_mults=(1, 2), channels=1, with_time_emb=False,
                                      attn_levels=(), mid_attn=False), 16),
    "convnext-outdim2-attn1": (dict(dim=8, dim_mults=(1, 2, 4), channels=1, out_dim=2,
                                    attn_levels=[1]), 16),
    "convnext-single-level": (dict(dim=8, dim_mults=(1,), channels=1), 12),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_and_unique_names(name):
    kwargs, size = CONFIGS[name]
    ms.set_seed(1)
    net = Unet(**kwargs)
    names = _names(net)
    assert len(names) == len(set(names)), "duplicate parameter names"
    tops = {"init_conv", "time_mlp", "class_emb", "downs", "mid_block1", "mid_attn", "mid_block2",
            "ups", "final_block", "final_conv"}
    assert {n.split(".")[0] for n in names} <= tops

    c = kwargs["channels"]
    y = _t([0, kwargs["num_classes"]]) if kwargs.get("num_classes") else None
    out = net(_x(2, c, size, size), _t([0, 999]), y)
    assert out.shape == (2, kwargs.get("out_dim", c), size, size)
    assert out.dtype == ms.float32
    assert np.isfinite(out.asnumpy()).all()


def test_parameter_names_read_as_paths():
    net = Unet(dim=8, dim_mults=(1, 2, 4), channels=1, num_classes=2)
    names = set(_names(net))
    for expected in [
        "init_conv.weight", "init_conv.bias",
        "time_mlp.1.weight", "time_mlp.3.bias",
        "class_emb.embedding_table",
        "downs.0.block1.ds_conv.weight", "downs.0.block1.mlp.1.weight",
        "downs.0.block2.net.0.gamma", "downs.1.block1.net.0.gamma",
        "downs.0.attn.fn.norm.gamma", "downs.0.attn.fn.fn.to_qkv.weight",
        "downs.0.attn.fn.fn.to_out.1.gamma", "downs.0.downsample.weight",
        "mid_block1.ds_conv.weight", "mid_attn.fn.fn.to_out.bias", "mid_block2.net.4.weight",
        "ups.0.block1.res_conv.weight", "ups.1.attn.fn.fn.to_qkv.weight", "ups.1.upsample.weight",
        "final_block.ds_conv.weight", "final_conv.weight",
    ]:
        assert expected in names, expected
    # first block of the first level has no input norm (norm=ind != 0)
    assert "downs.0.block1.net.0.gamma" not in names
    # the coarsest level does not downsample; the final block takes no time embedding
    assert not any(n.startswith("downs.2.downsample") for n in names)
    assert not any(n.startswith("final_block.mlp") for n in names)


def test_attn_levels_select_where_linear_attention_goes():
    def attn_prefixes(**kw):
        names = _names(Unet(dim=8, dim_mults=(1, 2, 4), **kw))
        return {".".join(n.split(".")[:3]) for n in names if ".attn." in n}

    assert attn_prefixes() == {"downs.0.attn", "downs.1.attn", "downs.2.attn",
                               "ups.0.attn", "ups.1.attn"}
    assert attn_prefixes(attn_levels=[0]) == {"downs.0.attn"}
    # ups.0 runs at level 2's resolution (H/4), ups.1 at level 1's (H/2)
    assert attn_prefixes(attn_levels=[2]) == {"downs.2.attn", "ups.0.attn"}
    assert attn_prefixes(attn_levels=[]) == set()
    names = _names(Unet(dim=8, dim_mults=(1, 2), mid_attn=False))
    assert not any(n.startswith("mid_attn") for n in names)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Unet(dim=8, block_type="transformer")
    with pytest.raises(ValueError):
        Unet(dim=8, act="relu")
    with pytest.raises(ValueError):
        Unet(dim=8, dim_mults=(1, 2), attn_levels=[2])
    with pytest.raises(ValueError):
        Unet(dim=8, num_classes=3, with_time_emb=False)


# ----------------------------------------------------------------------------- count


def _expected_tutorial_param_count(dim=28, channels=1, dim_mults=(1, 2, 4), mult=2,
                                   heads=4, dim_head=32):
    """Trainable parameters of the tutorial U-Net from the layer formulas."""

    def conv(cin, cout, k, groups=1, bias=False):
        return k * k * (cin // groups) * cout + (cout if bias else 0)

    def dense(i, o):
        return i * o + o

    def gn(c):
        return 2 * c

    tdim = 4 * dim
    hidden = heads * dim_head

    def convnext(din, dout, temb=True, norm=True):
        n = conv(din, din, 7, groups=din)                 # depthwise 7x7, no bias
        n += dense(tdim, din) if temb else 0              # time projection
        n += gn(din) if norm else 0
        n += conv(din, dout * mult, 3) + gn(dout * mult) + conv(dout * mult, dout, 3)
        n += conv(din, dout, 1) if din != dout else 0     # residual projection
        return n

    def linear_attention(d):   # PreNorm GN + qkv + out conv (bias) + GN
        return gn(d) + conv(d, 3 * hidden, 1) + conv(hidden, d, 1, bias=True) + gn(d)

    def attention(d):          # PreNorm GN + qkv + out conv (bias)
        return gn(d) + conv(d, 3 * hidden, 1) + conv(hidden, d, 1, bias=True)

    init_dim = dim // 3 * 2
    widths = [init_dim] + [dim * m for m in dim_mults]
    levels = list(zip(widths[:-1], widths[1:]))
    total = conv(channels, init_dim, 7, bias=True)
    total += dense(dim, tdim) + dense(tdim, tdim)
    for i, (a, b) in enumerate(levels):
        total += convnext(a, b, norm=i != 0) + convnext(b, b) + linear_attention(b)
        if i != len(levels) - 1:
            total += 16 * b * b                           # 4x4 stride-2 conv, no bias
    mid = widths[-1]
    total += 2 * convnext(mid, mid) + attention(mid)
    for a, b in reversed(levels[1:]):
        total += convnext(2 * b, a) + convnext(a, a) + linear_attention(a)
        total += 16 * a * a                               # 4x4 stride-2 transposed conv
    total += convnext(dim, dim, temb=False) + conv(dim, channels, 1)
    return total


def test_tutorial_parameter_count():
    net = Unet(dim=28, channels=1, dim_mults=(1, 2, 4))
    expected = _expected_tutorial_param_count()
    got = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    assert got == expected
    assert 2.9e6 < got < 3.1e6  # "about 3.0M"
    names = _names(net)
    assert len(names) == len(set(names))


# ----------------------------------------------------------------------------- embedding


def test_sinusoidal_embedding_matches_formula():
    dim = 16
    t = np.array([0, 1, 7, 250, 999])
    out = SinusoidalPositionEmbeddings(dim)(_t(t)).asnumpy()
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    args = t[:, None].astype(np.float64) * freqs[None, :]
    ref = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    assert out.shape == (5, dim) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-4)
    np.testing.assert_allclose(out[0], [0.0] * half + [1.0] * half, atol=1e-7)
    assert freqs[0] == 1.0 and abs(freqs[-1] - 1e-4) < 1e-12


# ----------------------------------------------------------------------------- conditioning


def test_output_depends_on_t_and_samples_are_independent():
    ms.set_seed(3)
    net = Unet(dim=8, dim_mults=(1, 2), channels=1)
    x = _x(2, 1, 16, 16, seed=5)
    a = net(x, _t([3, 3])).asnumpy()
    a2 = net(x, _t([3, 3])).asnumpy()
    b = net(x, _t([700, 700])).asnumpy()
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3
    # each sample only sees its own image and t (no cross-batch statistics)
    mixed = net(x, _t([3, 700])).asnumpy()
    np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], b[1], atol=1e-5)
    single = net(x[1:], _t([700])).asnumpy()
    np.testing.assert_allclose(single[0], b[1], atol=1e-5)


def test_without_time_embedding_t_is_ignored():
    net = Unet(dim=8, dim_mults=(1, 2), with_time_emb=False)
    x = _x(1, 1, 16, 16)
    np.testing.assert_array_equal(net(x, _t([0])).asnumpy(), net(x, _t([900])).asnumpy())


def test_class_conditioning_and_null_class():
    ms.set_seed(4)
    k = 3
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, num_classes=k)
    assert net.class_emb.embedding_table.shape == (k + 1, 32)
    x = _x(2, 1, 16, 16, seed=6)
    t = _t([10, 10])
    outs = [net(x, t, _t([c, c])).asnumpy() for c in range(k + 1)]  # c == k is the null class
    for out in outs:
        assert np.isfinite(out).all()
    for i in range(k + 1):
        for j in range(i + 1, k + 1):
            assert np.abs(outs[i] - outs[j]).max() > 1e-4, (i, j)
    mixed = net(x, t, _t([1, k])).asnumpy()
    np.testing.assert_allclose(mixed[0], outs[1][0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], outs[k][1], atol=1e-5)
    with pytest.raises(ValueError):
        net(x, t)

    plain = Unet(dim=8, dim_mults=(1, 2), channels=1)
    np.testing.assert_array_equal(plain(x, t).asnumpy(), plain(x, t, _t([2, 0])).asnumpy())


# ----------------------------------------------------------------------------- graph mode


def test_graph_mode_matches_pynative():
    ms.set_seed(7)
    net = Unet(dim=8, dim_mults=(1, 2, 4), channels=1, num_classes=2)
    x, t, y = _x(2, 1, 16, 16, seed=8), _t([5, 600]), _t([1, 2])
    ref = net(x, t, y).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        out = net(x, t, y).asnumpy()
        out2 = net(x, _t([600, 5]), y).asnumpy()  # reuses the compiled graph
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.abs(out2 - out).max() > 1e-4
    np.testing.assert_allclose(out2, net(x, _t([600, 5]), y).asnumpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- attention


def _softmax(a, axis):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def _conv1x1(weight, x, bias=None):
    out = np.einsum("oc,bcn->bon", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias[None, :, None]


def _group_norm1(x, gamma, beta, eps=1e-5):
    b = x.shape[0]
    flat = x.reshape(b, -1)
    mean = flat.mean(1).reshape(b, 1, 1)
    var = flat.var(1).reshape(b, 1, 1)
    return (x - mean) / np.sqrt(var + eps) * gamma[None, :, None] + beta[None, :, None]


def _np(p):
    return p.asnumpy().astype(np.float64)


def _randomize(cell, seed):
    rng = _rng(seed)
    for p in cell.get_parameters():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.5))


def _ref_attention(cell, x, heads, dim_head):
    b, c, h, w = x.shape
    qkv = _conv1x1(_np(cell.to_qkv.weight), x.reshape(b, c, h * w))
    q, k, v = (a.reshape(b, heads, dim_head, h * w) for a in np.split(qkv, 3, axis=1))
    q = q * dim_head ** -0.5
    attn = _softmax(np.einsum("bhdi,bhdj->bhij", q, k), -1)
    out = np.einsum("bhij,bhdj->bhdi", attn, v).reshape(b, heads * dim_head, h * w)
    return _conv1x1(_np(cell.to_out.weight), out, _np(cell.to_out.bias)).reshape(b, c, h, w)


def _ref_linear_attention(cell, x, heads, dim_head):
    b, c, h, w = x.shape
    qkv = _conv1x1(_np(cell.to_qkv.weight), x.reshape(b, c, h * w))
    q, k, v = (a.reshape(b, heads, dim_head, h * w) for a in np.split(qkv, 3, axis=1))
    q = _softmax(q, -2) * dim_head ** -0.5
    k = _softmax(k, -1)
    context = np.einsum("bhdn,bhen->bhde", k, v)
    out = np.einsum("bhde,bhdn->bhen", context, q).reshape(b, heads * dim_head, h * w)
    conv, norm = cell.to_out[0], cell.to_out[1]
    out = _conv1x1(_np(conv.weight), out, _np(conv.bias))
    return _group_norm1(out, _np(norm.gamma), _np(norm.beta)).reshape(b, c, h, w)


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_attention_matches_numpy(kind):
    dim, heads, dim_head = 6, 2, 5
    cls, ref_fn = (Attention, _ref_attention) if kind == "full" else \
        (LinearAttention, _ref_linear_attention)
    cell = cls(dim, heads=heads, dim_head=dim_head)
    _randomize(cell, seed=11)
    x = _rng(12).standard_normal((2, dim, 3, 5)) * 2.0  # non-square to catch H/W mix-ups
    out = cell(Tensor(x.astype(np.float32))).asnumpy()
    ref = ref_fn(cell, x.astype(np.float32).astype(np.float64), heads, dim_head)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

    # the U-Net wraps it as Residual(PreNorm(...)): x + fn(GroupNorm(1, dim)(x))
    block = Residual(PreNorm(dim, cell))
    _randomize(block.fn.norm, seed=13)
    out = block(Tensor(x.astype(np.float32))).asnumpy()
    xn = _group_norm1(x.reshape(2, dim, 15), _np(block.fn.norm.gamma),
                      _np(block.fn.norm.beta)).reshape(x.shape)
    np.testing.assert_allclose(out, x + ref_fn(cell, xn, heads, dim_head), rtol=1e-4, atol=1e-4)


def test_group_norm_computes_in_float32_for_float16_input():
    norm = GroupNorm(2, 4)
    _randomize(norm, seed=14)
    # large offset: a float16 variance would lose most of the signal
    x = (_rng(15).standard_normal((2, 4, 3, 3)) * 0.5 + 300.0).astype(np.float16)
    out = norm(Tensor(x))
    assert out.dtype == ms.float16
    xg = x.astype(np.float64).reshape(2, 2, -1)
    ref = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)
    ref = ref.reshape(x.shape) * _np(norm.gamma)[None, :, None, None] + \
        _np(norm.beta)[None, :, None, None]
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), ref, atol=2e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- activations


def _gelu_erf(x):
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_is_the_exact_erf_form_everywhere_in_the_net():
    x = np.linspace(-5.0, 5.0, 401)
    ref = _gelu_erf(x)
    assert np.abs(ref - _gelu_tanh(x)).max() > 1e-4  # the forms are distinguishable here
    net = Unet(dim=8, dim_mults=(1, 2), act="gelu")
    gelus = [c for _, c in net.cells_and_names() if isinstance(c, nn.GELU)]
    # time MLP + 2 per ConvNeXt block (time mlp, net) over 8 blocks + the final block's net
    assert len(gelus) == 1 + 2 * 8 + 1
    xt = Tensor(x.astype(np.float32))
    for g in gelus:
        np.testing.assert_allclose(g(xt).asnumpy(), ref, atol=2e-6)
    assert not any(isinstance(c, nn.SiLU) for _, c in net.cells_and_names())


def test_silu_option():
    net = Unet(dim=8, dim_mults=(1, 2), act="silu", block_type="resnet")
    cells = [c for _, c in net.cells_and_names()]
    assert not any(isinstance(c, nn.GELU) for c in cells)
    silus = [c for c in cells if isinstance(c, nn.SiLU)]
    # time MLP + 3 per ResNet block (time mlp, block1, block2) over 8 blocks + 2 in the final
    assert len(silus) == 1 + 3 * 8 + 2
    x = np.linspace(-6.0, 6.0, 101)
    np.testing.assert_allclose(silus[0](Tensor(x.astype(np.float32))).asnumpy(),
                               x / (1.0 + np.exp(-x)), atol=2e-6)
    with pytest.raises(ValueError):
        make_act("tanh")
