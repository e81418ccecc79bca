"""Noise-prediction U-Net for DDPM, as MindSpore ``nn.Cell``s.

The network eps_theta(x_t, t) of Ho, Jain & Abbeel, "Denoising Diffusion
Probabilistic Models", NeurIPS 2020 (arXiv:2006.11239): a U-Net whose blocks are
conditioned on the timestep through sinusoidal position embeddings and an MLP.

The architecture follows MindSpore's DDPM tutorial ("Diffusion Model" in the
MindSpore generative tutorials), itself a port of Hugging Face's "The Annotated
Diffusion Model" (Rogge & Rasul, 2022, after Phil Wang's
denoising-diffusion-pytorch):

* init 7x7 conv, then per resolution level two ConvNeXt (Liu et al. 2022) or
  ResNet blocks, a pre-normed residual linear attention (Shen et al. 2018) and a
  strided 4x4 conv down-sampling (none at the coarsest level);
* middle: block, full softmax attention, block;
* up path: for every level but the finest, concat the skip, two blocks, linear
  attention, transposed-conv up-sampling;
* final block and 1x1 conv to ``out_dim`` channels.

As in the tutorial, convolutions carry no bias (MindSpore's ``nn.Conv2d``
default ``has_bias=False``, which the tutorial keeps), the final 1x1 conv and the
down/up-sampling convs included, except ``init_conv`` and the attention output
projections. Dense and Embedding layers have biases/tables as usual.

Differences from the tutorial code, all deliberate:

* every resolution level is one small Cell with named attributes (``block1``,
  ``block2``, ``attn``, ``downsample``/``upsample``) inside a single
  ``nn.CellList``, so parameter names are unique by construction
  (``downs.0.block1.ds_conv.weight``); the tutorial nests ``CellList``s;
* ``LinearAttention`` ends in ``GroupNorm(1, dim)`` (as in The Annotated
  Diffusion Model) and does not divide v by h*w;
* the first block of the first level has no input norm (``norm=ind != 0``, as in
  denoising-diffusion-pytorch);
* GELU is the exact (erf) form, like PyTorch's ``nn.GELU()``; MindSpore's
  ``nn.GELU()`` default is the tanh approximation;
* optional class conditioning (``num_classes``) with a learned null class for
  classifier-free guidance, optional ResNet blocks, selectable attention levels;
* optional self-conditioning (``self_condition``, Chen, Zhang & Hinton 2022, "Analog Bits",
  Sec. 3): an estimate of x_0 (zeros when there is none) concatenated to x on the channel axis
  before ``init_conv``, which then takes 2 * channels inputs.

Group norms and softmaxes compute in float32 even when the network is cast to
float16 with ``Cell.to_float``; results are cast back to the input dtype.
``to_mixed_precision`` (``ddpm_ms.models.precision``) is the float16 policy of Ascend/GPU
(float16 compute, group norms and the timestep embedding in float32) set with flags on the
network's own cells, so parameter names stay those of the float32 model.

The layers that run ddpm_ms's compiled CPU kernels (GroupNorm, GELU/SiLU, convolutions, the
time shift, the attention cores) come from ``ddpm_ms.models.layers``; ``fast_kernels`` (None: the user's
default, see there) is passed to each of them. Parameter names and values are the same either way.
The timestep embedding is the one shared with the DDPM U-Net (``ddpm_ms.models.embeddings``).
"""

import numpy as np

from mindspore import nn, ops

from ddpm_ms.models import kernels
from ddpm_ms.models.embeddings import SinusoidalTimestepEmbedding
from ddpm_ms.models.layers import (
    ConvTranspose2d,
    GroupNorm,
    TimeShift,
    conv,
    full_attention,
    kernel_ops,
    linear_attention,
    make_act,
)

__all__ = [
    "SinusoidalPositionEmbeddings",
    "Residual",
    "PreNorm",
    "Attention",
    "LinearAttention",
    "ConvNextBlock",
    "ResnetBlock",
    "DownLevel",
    "UpLevel",
    "Unet",
]

from ddpm_ms.models import BLOCK_TYPES, level_problem  # defined MindSpore-free there, for ddpm_ms.config


class SinusoidalPositionEmbeddings(SinusoidalTimestepEmbedding):
    """The tutorial's sinusoidal embedding of timesteps: [N] -> [N, dim] (even dim >= 4).

    ``half = dim // 2``; ``freq_j = exp(-j * log(10000) / (half - 1))`` (computed in float64,
    rounded once to float32); ``out = concat(sin(t * freq), cos(t * freq))``, computed in float32.
    The shared ``ddpm_ms.models.embeddings.SinusoidalTimestepEmbedding`` with these settings.
    """

    def __init__(self, dim):
        super().__init__(dim, flip_sin_to_cos=False, freq_shift=1, freq_dtype=np.float64)


class Residual(nn.Cell):
    """``fn(x) + x``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, x):
        return self.fn(x) + x


class PreNorm(nn.Cell):
    """``fn(GroupNorm(1, dim)(x))``."""

    def __init__(self, dim, fn, fast_kernels=None):
        super().__init__()
        self.norm = GroupNorm(1, dim, fast_kernels=fast_kernels)
        self.fn = fn

    def construct(self, x):
        return self.fn(self.norm(x))


class Attention(nn.Cell):
    """Multi-head softmax self-attention over all H*W positions (1x1-conv projections).

    Per head, with q, k, v of shape [d, n] (d = dim_head, n = H*W):
    ``out = v @ softmax((q * scale)^T @ k, over keys)^T``, heads concatenated on the
    channel axis, then ``to_out`` (1x1 conv with bias). On CPU (float32) everything between
    ``to_qkv`` and ``to_out`` is one compiled op (``full_attention``) forward and one backward.
    """

    def __init__(self, dim, heads=4, dim_head=32, fast_kernels=None):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.to_qkv = conv(dim, hidden * 3, 1, fast_kernels=fast_kernels)
        self.to_out = conv(hidden, dim, 1, has_bias=True, fast_kernels=fast_kernels)
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        b, _, h, w = x.shape
        qkv = self.to_qkv(x)
        out = full_attention(self._fast, qkv, self.heads, self.dim_head, b, h * w)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class LinearAttention(nn.Cell):
    """Linear attention (Shen et al. 2018): cost linear in H*W.

    Per head: q softmaxed over its dim_head features, k over the positions,
    ``q = q * scale``, ``context = k @ v^T`` ([d, d]), ``out = context^T @ q``
    ([d, n]); then ``to_out`` = 1x1 conv (with bias) -> GroupNorm(1, dim). On CPU (float32)
    everything between ``to_qkv`` and ``to_out`` is one compiled op (``linear_attention``)
    forward and one backward.
    """

    def __init__(self, dim, heads=4, dim_head=32, fast_kernels=None):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.to_qkv = conv(dim, hidden * 3, 1, fast_kernels=fast_kernels)
        self.to_out = nn.SequentialCell(conv(hidden, dim, 1, has_bias=True, fast_kernels=fast_kernels),
                                        GroupNorm(1, dim, fast_kernels=fast_kernels))
        self._fast = kernel_ops(fast_kernels)

    def construct(self, x):
        b, _, h, w = x.shape
        qkv = self.to_qkv(x)
        out = linear_attention(self._fast, qkv, self.heads, self.dim_head, b, h * w)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class ConvNextBlock(nn.Cell):
    """ConvNeXt block (Liu et al. 2022) with additive time conditioning.

    ``h = dwconv7x7(x) [+ Dense(act(t))[:, :, None, None]]``;
    ``h = conv3x3(act(GN(conv3x3(GN(h)))))`` (the first GN only if ``norm``);
    ``out = h + res_conv(x)`` (1x1 conv when the channel count changes).
    """

    def __init__(self, dim, dim_out, time_emb_dim=None, mult=2, norm=True, act="gelu", fast_kernels=None):
        super().__init__()
        fk = fast_kernels
        self.has_time = time_emb_dim is not None
        if self.has_time:
            self.mlp = nn.SequentialCell(make_act(act, fk), nn.Dense(time_emb_dim, dim))
            self.shift = TimeShift(fk)
        self.ds_conv = conv(dim, dim, 7, padding=3, group=dim, fast_kernels=fk)
        self.net = nn.SequentialCell(
            GroupNorm(1, dim, fast_kernels=fk) if norm else nn.Identity(),
            conv(dim, dim_out * mult, 3, padding=1, fast_kernels=fk),
            make_act(act, fk),
            GroupNorm(1, dim_out * mult, fast_kernels=fk),
            conv(dim_out * mult, dim_out, 3, padding=1, fast_kernels=fk),
        )
        self.res_conv = conv(dim, dim_out, 1, fast_kernels=fk) if dim != dim_out else nn.Identity()

    def construct(self, x, t=None):
        h = self.ds_conv(x)
        if self.has_time:
            h = self.shift(h, self.mlp(t))
        return self.net(h) + self.res_conv(x)


class _ConvNormAct(nn.Cell):
    """conv3x3 -> GroupNorm(groups) -> act (the ``Block`` of the ResNet variant)."""

    def __init__(self, dim, dim_out, groups=8, act="gelu", fast_kernels=None):
        super().__init__()
        self.proj = conv(dim, dim_out, 3, padding=1, fast_kernels=fast_kernels)
        self.norm = GroupNorm(groups, dim_out, fast_kernels=fast_kernels)
        self.act = make_act(act, fast_kernels)

    def construct(self, x):
        return self.act(self.norm(self.proj(x)))


class ResnetBlock(nn.Cell):
    """Wide-ResNet block of DDPM: ``block2(block1(x) + Dense(act(t))) + res_conv(x)``.

    Two 3x3 convs instead of ConvNeXt's 7x7 depthwise + two wide 3x3 convs, so it
    is cheaper on CPU for the same width. ``dim_out`` must be divisible by ``groups``.
    """

    def __init__(self, dim, dim_out, time_emb_dim=None, groups=8, act="gelu", fast_kernels=None):
        super().__init__()
        self.has_time = time_emb_dim is not None
        if self.has_time:
            self.mlp = nn.SequentialCell(make_act(act, fast_kernels), nn.Dense(time_emb_dim, dim_out))
            self.shift = TimeShift(fast_kernels)
        self.block1 = _ConvNormAct(dim, dim_out, groups, act, fast_kernels)
        self.block2 = _ConvNormAct(dim_out, dim_out, groups, act, fast_kernels)
        self.res_conv = conv(dim, dim_out, 1, fast_kernels=fast_kernels) if dim != dim_out else nn.Identity()

    def construct(self, x, t=None):
        h = self.block1(x)
        if self.has_time:
            h = self.shift(h, self.mlp(t))
        return self.block2(h) + self.res_conv(x)


class DownLevel(nn.Cell):
    """One encoder level: block1, block2, attn; returns (skip, downsampled)."""

    def __init__(self, block1, block2, attn, downsample):
        super().__init__()
        self.block1 = block1
        self.block2 = block2
        self.attn = attn
        self.downsample = downsample

    def construct(self, x, t=None):
        x = self.block1(x, t)
        x = self.block2(x, t)
        x = self.attn(x)
        return x, self.downsample(x)


class UpLevel(nn.Cell):
    """One decoder level: concat(x, skip) on channels, block1, block2, attn, upsample."""

    def __init__(self, block1, block2, attn, upsample):
        super().__init__()
        self.block1 = block1
        self.block2 = block2
        self.attn = attn
        self.upsample = upsample

    def construct(self, x, skip, t=None):
        x = ops.concat((x, skip), 1)
        x = self.block1(x, t)
        x = self.block2(x, t)
        x = self.attn(x)
        return self.upsample(x)


class Unet(nn.Cell):
    """DDPM noise-prediction U-Net: ``construct(x [N,C,H,W], t [N] int, y [N] int | None, x_self_cond | None)``.

    Args:
        dim: base width; also the sinusoidal embedding size (time MLP width 4*dim).
        init_dim: width after ``init_conv`` (default ``dim // 3 * 2``).
        out_dim: output channels (default ``channels``).
        dim_mults: width multiplier per level; H and W must be divisible by
            ``2 ** (len(dim_mults) - 1)``.
        channels: input image channels.
        with_time_emb: condition on t (False: t is ignored).
        block_type: "convnext" (tutorial) or "resnet".
        convnext_mult: ConvNeXt hidden expansion.
        resnet_groups: GroupNorm groups of ResNet blocks (widths must divide by it).
        act: "gelu" (exact erf form) or "silu"; used in every block and the time MLP.
        attn_levels: level indices (0 = full resolution, level i at H / 2**i) that
            get linear attention: the down level i, and the up stage that runs at
            level i's resolution (up stages run at levels len(dim_mults)-1 .. 1,
            so level 0 has attention on the way down only). None = every level
            (tutorial); () = no linear attention.
        mid_attn: full attention between the middle blocks.
        num_classes: if an int, class-conditional: ``y`` in [0, num_classes]
            selects a learned embedding added to the time embedding; index
            ``num_classes`` is the null (unconditional) class.
        fast_kernels: the compiled CPU kernels where usable (True), MindSpore's built-in ops
            only (False), or None: the user's default (``kernels.requested``; ddpm_ms.models.layers).
        self_condition: take a second input ``x_self_cond`` [N,C,H,W] (an estimate of x_0; None:
            zeros), concatenated to x: ``init_conv`` has 2 * channels inputs. False: the network
            (parameters, graph) of a model without it.
    """

    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4), channels=1,
                 with_time_emb=True, block_type="convnext", convnext_mult=2, resnet_groups=8,
                 act="gelu", attn_levels=None, mid_attn=True, num_classes=None, fast_kernels=None,
                 self_condition=False):
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        problem = level_problem(dim_mults, None if attn_levels is None else [int(i) for i in attn_levels])
        if problem:
            raise ValueError(" ".join(problem))
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be 'convnext' or 'resnet', got {block_type!r}")
        make_act(act, False)  # validates
        num_levels = len(dim_mults)
        if attn_levels is None:
            attn_levels = tuple(range(num_levels))
        attn_levels = tuple(int(i) for i in attn_levels)
        if num_classes is not None:
            num_classes = int(num_classes)
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}")
            if not with_time_emb:
                raise ValueError("num_classes needs with_time_emb=True (the class embedding is "
                                 "added to the time embedding)")

        init_dim = dim // 3 * 2 if init_dim is None else int(init_dim)
        out_dim = channels if out_dim is None else int(out_dim)
        self.dim = dim
        self.channels = channels
        self.out_dim = out_dim
        self.dim_mults = dim_mults
        self.with_time_emb = bool(with_time_emb)
        self.num_classes = num_classes
        self.block_type = block_type
        self.attn_levels = attn_levels
        self.downsample_factor = 2 ** (num_levels - 1)
        self.self_condition = bool(self_condition)

        fk = kernels.requested(fast_kernels)  # decided once for every layer
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4 if self.with_time_emb else None

        def block(cin, cout, temb=time_dim, norm=True):
            if block_type == "convnext":
                return ConvNextBlock(cin, cout, temb, mult=convnext_mult, norm=norm, act=act, fast_kernels=fk)
            return ResnetBlock(cin, cout, temb, groups=resnet_groups, act=act, fast_kernels=fk)

        def lin_attn(d):
            return Residual(PreNorm(d, LinearAttention(d, fast_kernels=fk), fast_kernels=fk))

        in_channels = channels * 2 if self.self_condition else channels
        self.init_conv = conv(in_channels, init_dim, 7, padding=3, has_bias=True, fast_kernels=fk)

        if self.with_time_emb:
            self.time_mlp = nn.SequentialCell(
                SinusoidalPositionEmbeddings(dim),
                nn.Dense(dim, time_dim),
                make_act(act, fk),
                nn.Dense(time_dim, time_dim),
            )
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, time_dim)

        downs = []
        for ind, (d_in, d_out) in enumerate(in_out):
            is_last = ind == num_levels - 1
            downs.append(DownLevel(
                block(d_in, d_out, norm=ind != 0),
                block(d_out, d_out),
                lin_attn(d_out) if ind in attn_levels else nn.Identity(),
                conv(d_out, d_out, 4, padding=1, stride=2, fast_kernels=fk) if not is_last else nn.Identity(),
            ))
        self.downs = nn.CellList(downs)

        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid, fast_kernels=fk), fast_kernels=fk)) \
            if mid_attn else nn.Identity()
        self.mid_block2 = block(mid, mid)

        # Decoder: stage ind runs at level (num_levels-1-ind)'s resolution, concats
        # that level's skip and always upsamples (the tutorial's ``is_last`` is
        # never true on the way up). The full-resolution skip of level 0 is not
        # consumed (as in the tutorial); the final block takes the last stage's
        # output, dims[1] channels (== dim for the usual dim_mults[0] == 1).
        ups = []
        for ind, (d_in, d_out) in enumerate(reversed(in_out[1:])):
            level = num_levels - 1 - ind
            ups.append(UpLevel(
                block(d_out * 2, d_in),
                block(d_in, d_in),
                lin_attn(d_in) if level in attn_levels else nn.Identity(),
                ConvTranspose2d(d_in, d_in, fk),
            ))
        self.ups = nn.CellList(ups)
        self.has_ups = len(ups) > 0

        self.final_block = block(dims[1], dim, temb=None)
        self.final_conv = conv(dim, out_dim, 1, fast_kernels=fk)

    def construct(self, x, t, y=None, x_self_cond=None):
        if self.self_condition:  # a Python constant: without self-conditioning the graph is unchanged
            if x_self_cond is None:
                x_self_cond = ops.zeros_like(x)
            x = ops.concat((x, x_self_cond.astype(x.dtype)), 1)
        x = self.init_conv(x)
        temb = None
        if self.with_time_emb:
            temb = self.time_mlp(t)
            if self.num_classes is not None:
                if y is None:
                    raise ValueError("Unet with num_classes needs class labels y "
                                     "(use num_classes for the null class)")
                temb = temb + self.class_emb(y).astype(temb.dtype)

        skips = []
        for level in self.downs:
            skip, x = level(x, temb)
            skips.append(skip)

        x = self.mid_block1(x, temb)
        x = self.mid_attn(x)
        x = self.mid_block2(x, temb)

        # Consume skips from the coarsest level up. An index, not ``skips.pop()``:
        # MindSpore 2.10 graph mode turns pop() inside a loop over a CellList into
        # a (list, item) tuple.
        if self.has_ups:
            i = len(skips) - 1
            for level in self.ups:
                x = level(x, skips[i], temb)
                i = i - 1

        x = self.final_block(x)
        return self.final_conv(x)
