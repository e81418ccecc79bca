"""The U-Net of Ho, Jain & Abbeel 2020 (Appendix B), as MindSpore ``nn.Cell``s (``arch: ddpm``).

A PixelCNN++-style Wide-ResNet U-Net: per resolution level ``layers_per_block`` residual blocks
(GroupNorm -> act -> 3x3 conv, plus the projected time embedding, GroupNorm -> act -> dropout ->
3x3 conv, residual), self-attention after each block at the chosen levels, a stride-2 3x3 conv to
go down; a middle of block, attention, block; on the way up ``layers_per_block + 1`` blocks per
level, each taking one skip (concatenated on channels), nearest-neighbour x2 + 3x3 conv to go up;
GroupNorm -> SiLU -> 3x3 conv out. The timestep enters through a sinusoidal embedding (the one
shared with the tutorial U-Net, ``ddpm_ms.models.embeddings``, in diffusers' form) and a
two-layer MLP (``linear_1``, SiLU, ``linear_2``), added into every residual block. For CIFAR-10
(channels 128 x (1, 2, 2, 2), attention at 16x16) it has 35,746,307 parameters (the paper's 35.7 M).

The cells mirror HF diffusers' ``UNet2DModel`` (the model of the converted official checkpoints,
``google/ddpm-cifar10-32`` ...) block for block with the same attribute names, so a parameter here
and a diffusers state-dict key differ only in the last name: :func:`diffusers_key` (GroupNorm
``gamma``/``beta`` -> ``weight``/``bias``, Embedding ``embedding_table`` -> ``weight``). Supported:
``DownBlock2D``/``AttnDownBlock2D``, ``UNetMidBlock2D``, ``UpBlock2D``/``AttnUpBlock2D``, positional
time embedding (``flip_sin_to_cos``, ``freq_shift``), ``resnet_time_scale_shift="default"``,
conv down/up-sampling, an optional class embedding (``num_class_embeds``).

Class conditioning works as in ``ddpm_ms.models.tutorial_unet.Unet``: ``num_classes`` classes plus a learned null
class (index ``num_classes``) for classifier-free guidance, added to the time embedding. So does self-conditioning
(``self_condition``: an x_0 estimate concatenated to x, ``conv_in`` with 2 * channels inputs), which diffusers'
``UNet2DModel`` does not have.

On CPU the convolutions (stride 1), SiLU, GroupNorm (any epsilon, passed to the kernel), the
time shift and the attention between the qkv projection and the output projection run as the
project's compiled kernels (``ddpm_ms.models.layers``, chosen by ``fast_kernels``); the stride-2
down-sampling conv and the rest use MindSpore's built-in ops, as everything does on Ascend/GPU.
"""

from mindspore import nn, ops

from ddpm_ms.models import kernels
from ddpm_ms.models.embeddings import SinusoidalTimestepEmbedding
from ddpm_ms.models.layers import (
    Conv2d,
    GroupNorm,
    NearestUpsample2x,
    SiLU,
    TimeShift,
    full_attention,
    kernel_ops,
    make_act,
    pointwise,
)

__all__ = ["AttentionBlock", "DDPMUnet", "ResnetBlock2D", "diffusers_key"]

# ddpm_ms parameter name suffix -> diffusers state-dict suffix (all other names are identical)
DIFFUSERS_SUFFIX = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}


def diffusers_key(name):
    """The diffusers ``UNet2DModel`` state-dict key of ddpm_ms parameter ``name``."""
    head, _, last = name.rpartition(".")
    return f"{head}.{DIFFUSERS_SUFFIX.get(last, last)}" if head else DIFFUSERS_SUFFIX.get(last, last)


class TimestepEmbedding(nn.Cell):
    """``linear_2(SiLU(linear_1(x)))``."""

    def __init__(self, cin, dim, fast_kernels=None):
        super().__init__()
        self.linear_1 = nn.Dense(cin, dim)
        self.act = SiLU(fast_kernels)
        self.linear_2 = nn.Dense(dim, dim)

    def construct(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Cell):
    """``skip(x) + conv2(dropout(act(GN(conv1(act(GN(x))) + proj(act(temb))))))``; skip = 1x1 conv if cin != cout."""

    def __init__(self, cin, cout, temb_dim, groups=32, eps=1e-6, dropout=0.0, act="silu", fast_kernels=None):
        super().__init__()
        fk = fast_kernels
        self.norm1 = GroupNorm(groups, cin, eps, fast_kernels=fk)
        self.act = make_act(act, fk)  # one parameter-free cell per use (a shared one confuses the ONNX exporter)
        self.act_temb = make_act(act, fk)
        self.act2 = make_act(act, fk)
        self.conv1 = Conv2d(cin, cout, 3, padding=1, has_bias=True, fast_kernels=fk)
        self.time_emb_proj = nn.Dense(temb_dim, cout)
        self.shift = TimeShift(fk)
        self.norm2 = GroupNorm(groups, cout, eps, fast_kernels=fk)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv2 = Conv2d(cout, cout, 3, padding=1, has_bias=True, fast_kernels=fk)
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.conv_shortcut = Conv2d(cin, cout, 1, has_bias=True, fast_kernels=fk)

    def construct(self, x, temb):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.shift(h, self.time_emb_proj(self.act_temb(temb)))
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.has_shortcut else x
        return skip + h


class AttentionBlock(nn.Cell):
    """Residual multi-head self-attention over the H*W positions (diffusers' ``Attention`` with group norm).

    ``x + to_out(attn(q, k, v))`` with q, k, v = ``to_q/to_k/to_v(GN(x))`` per pixel, heads of
    ``head_dim`` channels, softmax(q^T k / sqrt(head_dim)) over keys. The three projections are kept
    as separate Dense layers (diffusers' names) and applied as one concatenated 1x1 projection.
    """

    def __init__(self, channels, head_dim=None, groups=32, eps=1e-6, fast_kernels=None):
        super().__init__()
        head_dim = channels if head_dim is None else int(head_dim)
        if channels % head_dim:
            raise ValueError(f"attention head width {head_dim} does not divide {channels} channels")
        self.heads = channels // head_dim
        self.dim_head = head_dim
        self.group_norm = GroupNorm(groups, channels, eps, fast_kernels=fast_kernels)
        self.to_q = nn.Dense(channels, channels)
        self.to_k = nn.Dense(channels, channels)
        self.to_v = nn.Dense(channels, channels)
        self.to_out = nn.CellList([nn.Dense(channels, channels)])
        self._fast = kernel_ops(fast_kernels)
        self._conv = kernel_ops(fast_kernels, conv=True)

    def construct(self, x):
        b, c, h, w = x.shape
        n = h * w
        weight = ops.concat((self.to_q.weight, self.to_k.weight, self.to_v.weight), 0)
        bias = ops.concat((self.to_q.bias, self.to_k.bias, self.to_v.bias), 0)
        qkv = pointwise(self.group_norm(x), weight, bias, self._conv)  # [b, 3c, h, w] = [b, 3, heads, d, n]
        out = full_attention(self._fast, qkv, self.heads, self.dim_head, b, n)
        proj = self.to_out[0]
        return x + pointwise(out.reshape(b, c, h, w), proj.weight, proj.bias, self._conv)


class Downsample2D(nn.Cell):
    """3x3 conv, stride 2; with ``padding=0`` the input is zero-padded on the bottom and right only
    (diffusers pads explicitly, then convolves without padding; here the conv's own asymmetric
    padding (top 0, bottom 1, left 0, right 1) does the same, and exports to ONNX, which PadV3 does not)."""

    def __init__(self, channels, padding=0, fast_kernels=None):
        super().__init__()
        if padding == 0:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, pad_mode="pad", padding=(0, 1, 0, 1),
                                  has_bias=True)
        else:
            self.conv = Conv2d(channels, channels, 3, padding=padding, stride=2, has_bias=True,
                               fast_kernels=fast_kernels)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels, fast_kernels=None):
        super().__init__()
        self.up = NearestUpsample2x(fast_kernels)
        self.conv = Conv2d(channels, channels, 3, padding=1, has_bias=True, fast_kernels=fast_kernels)

    def construct(self, x):
        return self.conv(self.up(x))


class DownBlock2D(nn.Cell):
    """``num_layers`` x (resnet [, attention]) [, downsampler]; returns (x, the outputs kept as skips)."""

    def __init__(self, resnets, attentions, downsample):
        super().__init__()
        self.num_layers = len(resnets)
        self.resnets = nn.CellList(resnets)
        self.has_attn = attentions is not None
        if self.has_attn:
            self.attentions = nn.CellList(attentions)
        self.has_down = downsample is not None
        if self.has_down:
            self.downsamplers = nn.CellList([downsample])

    def construct(self, x, temb):
        outs = ()
        for i in range(self.num_layers):
            x = self.resnets[i](x, temb)
            if self.has_attn:
                x = self.attentions[i](x)
            outs = outs + (x,)
        if self.has_down:
            x = self.downsamplers[0](x)
            outs = outs + (x,)
        return x, outs


class UpBlock2D(nn.Cell):
    """``num_layers`` x (concat the last remaining skip, resnet [, attention]) [, upsampler]."""

    def __init__(self, resnets, attentions, upsample):
        super().__init__()
        self.num_layers = len(resnets)
        self.resnets = nn.CellList(resnets)
        self.has_attn = attentions is not None
        if self.has_attn:
            self.attentions = nn.CellList(attentions)
        self.has_up = upsample is not None
        if self.has_up:
            self.upsamplers = nn.CellList([upsample])

    def construct(self, x, skips, temb):
        """``skips``: this block's skips in the order they were made (the last is consumed first)."""
        for i in range(self.num_layers):
            x = ops.concat((x, skips[self.num_layers - 1 - i]), 1)
            x = self.resnets[i](x, temb)
            if self.has_attn:
                x = self.attentions[i](x)
        if self.has_up:
            x = self.upsamplers[0](x)
        return x


class MidBlock2D(nn.Cell):
    """resnet, [attention,] resnet."""

    def __init__(self, resnets, attention):
        super().__init__()
        self.resnets = nn.CellList(resnets)
        self.has_attn = attention is not None
        if self.has_attn:
            self.attentions = nn.CellList([attention])

    def construct(self, x, temb):
        x = self.resnets[0](x, temb)
        if self.has_attn:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class DDPMUnet(nn.Cell):
    """The DDPM paper's U-Net: ``construct(x [N,C,H,W], t [N] int, y [N] int | None, x_self_cond | None)`` -> eps.

    Args (diffusers ``UNet2DModel`` names in brackets):
        block_out_channels: width per level [block_out_channels].
        channels / out_channels: image channels in / out [in_channels, out_channels].
        layers_per_block: residual blocks per level on the way down (one more up) [layers_per_block].
        attn_levels: levels (0 = full resolution) with attention after every block, down and up
            [AttnDownBlock2D at i, AttnUpBlock2D at len - 1 - i].
        mid_attn: attention in the middle block [add_attention].
        groups, eps: GroupNorm groups and epsilon [norm_num_groups, norm_eps].
        dropout: dropout before each block's second conv [dropout].
        act: residual-block activation, "silu" or "gelu" (exact) [act_fn].
        attn_head_dim: channels per attention head, None = one head [attention_head_dim].
        flip_sin_to_cos, freq_shift: time embedding [flip_sin_to_cos, freq_shift].
        downsample_padding: 0 (pad right/bottom, as the paper's TF code) or 1 [downsample_padding].
        num_classes: class-conditional with ``num_classes + 1`` embeddings, the last the null class
            [num_class_embeds = num_classes + 1].
        fast_kernels: compiled CPU kernels (True), built-in ops only (False) or None, the user's
            default (``kernels.requested``; ddpm_ms.models.layers).
        self_condition: a second input ``x_self_cond`` [N,C,H,W] (an x_0 estimate; None: zeros)
            concatenated to x, ``conv_in`` with 2 * channels inputs (no diffusers counterpart).
    """

    def __init__(self, block_out_channels=(128, 256, 256, 256), channels=3, out_channels=None, layers_per_block=2,
                 attn_levels=(1,), mid_attn=True, groups=32, eps=1e-6, dropout=0.0, act="silu",
                 attn_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, num_classes=None,
                 fast_kernels=None, self_condition=False):
        super().__init__()
        widths = [int(c) for c in block_out_channels]
        levels = len(widths)
        attn_levels = tuple(int(i) for i in attn_levels)
        for i in attn_levels:
            if not 0 <= i < levels:
                raise ValueError(f"attn_levels entry {i} is outside 0..{levels - 1}")
        if downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {downsample_padding}")
        self.channels = channels
        self.out_dim = channels if out_channels is None else int(out_channels)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.downsample_factor = 2 ** (levels - 1)
        self.self_condition = bool(self_condition)
        temb = widths[0] * 4
        fk = kernels.requested(fast_kernels)  # decided once for every layer

        def resnet(cin, cout):
            return ResnetBlock2D(cin, cout, temb, groups, eps, dropout, act, fk)

        def attention(c):
            return AttentionBlock(c, attn_head_dim, groups, eps, fk)

        self.conv_in = Conv2d(channels * 2 if self.self_condition else channels, widths[0], 3, padding=1,
                              has_bias=True, fast_kernels=fk)
        self.time_proj = SinusoidalTimestepEmbedding(widths[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], temb, fk)
        if self.num_classes is not None:
            self.class_embedding = nn.Embedding(self.num_classes + 1, temb)

        downs, cout = [], widths[0]
        for i, width in enumerate(widths):
            cin, cout = cout, width
            last = i == levels - 1
            downs.append(DownBlock2D(
                [resnet(cin if j == 0 else cout, cout) for j in range(layers_per_block)],
                [attention(cout) for _ in range(layers_per_block)] if i in attn_levels else None,
                None if last else Downsample2D(cout, downsample_padding, fk)))
        self.down_blocks = nn.CellList(downs)

        self.mid_block = MidBlock2D([resnet(widths[-1], widths[-1]), resnet(widths[-1], widths[-1])],
                                    attention(widths[-1]) if mid_attn else None)

        # up block i runs at level levels-1-i; its j-th resnet takes the previous output (the block
        # below's width for j == 0) and a skip (the level's width, the next level's for the last)
        rev = widths[::-1]
        ups, cout = [], rev[0]
        for i in range(levels):
            prev, cout = cout, rev[i]
            skip_last = rev[min(i + 1, levels - 1)]
            resnets = [resnet((prev if j == 0 else cout) + (skip_last if j == layers_per_block else cout), cout)
                       for j in range(layers_per_block + 1)]
            level = levels - 1 - i
            ups.append(UpBlock2D(resnets,
                                 [attention(cout) for _ in resnets] if level in attn_levels else None,
                                 None if i == levels - 1 else Upsample2D(cout, fk)))
        self.up_blocks = nn.CellList(ups)
        self.skips_per_up = layers_per_block + 1

        self.conv_norm_out = GroupNorm(groups, widths[0], eps, fast_kernels=fk)
        self.conv_act = SiLU(fk)
        self.conv_out = Conv2d(widths[0], self.out_dim, 3, padding=1, has_bias=True, fast_kernels=fk)

    def construct(self, x, t, y=None, x_self_cond=None):
        temb = self.time_embedding(self.time_proj(t))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("DDPMUnet with num_classes needs class labels y "
                                 "(use num_classes for the null class)")
            temb = temb + self.class_embedding(y).astype(temb.dtype)
        temb = temb.astype(x.dtype)

        if self.self_condition:  # a Python constant: without self-conditioning the graph is unchanged
            if x_self_cond is None:
                x_self_cond = ops.zeros_like(x)
            x = ops.concat((x, x_self_cond.astype(x.dtype)), 1)
        x = self.conv_in(x)
        skips = (x,)
        for block in self.down_blocks:
            x, outs = block(x, temb)
            skips = skips + outs

        x = self.mid_block(x, temb)

        end = len(skips)
        for block in self.up_blocks:
            x = block(x, skips[end - self.skips_per_up:end], temb)
            end = end - self.skips_per_up

        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
