"""PyTorch reference of ddpm_ms's U-Net, and a MindSpore -> PyTorch weight converter.

Used only by the speed benchmark (``bench_speed.py --torch``) and the parity test
(tests/test_torch_parity.py); ddpm_ms itself never imports torch. Install the CPU build
with the ``bench`` extra (on the project machines ``pip install torch==2.13.0`` takes the
192 MB CPU wheel that lies on disk).

Every module mirrors ``ddpm_ms.models.tutorial_unet`` cell for cell, with the same attribute names and
Sequential indices, so a MindSpore parameter ``downs.0.block1.net.1.weight`` is the
PyTorch parameter of the same name; only GroupNorm's ``gamma``/``beta`` become
``weight``/``bias`` and ``embedding_table`` becomes ``weight``. The functions are the
same: exact-erf GELU, GroupNorm eps 1e-5, convs without bias except ``init_conv`` and
the attention output projections, the same attention formulas.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Unet", "unet_kwargs_from_config", "torch_name", "mindspore_arrays", "convert_state_dict",
           "from_mindspore"]


def make_act(act):
    if act == "gelu":
        return nn.GELU()  # exact erf form (PyTorch's default)
    if act == "silu":
        return nn.SiLU()
    raise ValueError(f"act must be 'gelu' or 'silu', got {act!r}")


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", torch.tensor(freqs.astype(np.float32)).reshape(1, half),
                             persistent=False)

    def forward(self, t):
        args = t.float().reshape(-1, 1) * self.freqs
        return torch.cat((args.sin(), args.cos()), -1)


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


def _split_qkv(qkv, heads, dim_head):
    b, _, h, w = qkv.shape
    q, k, v = qkv.reshape(b, 3, heads, dim_head, h * w).unbind(1)
    return q, k, v


class Attention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_qkv(self.to_qkv(x), self.heads, self.dim_head)
        sim = torch.matmul((q * self.scale).transpose(-1, -2), k)
        attn = sim.softmax(-1)
        out = torch.matmul(v, attn.transpose(-1, -2))
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class LinearAttention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = _split_qkv(self.to_qkv(x), self.heads, self.dim_head)
        q = q.softmax(-2) * self.scale
        k = k.softmax(-1)
        context = torch.matmul(k, v.transpose(-1, -2))
        out = torch.matmul(context.transpose(-1, -2), q)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class ConvNextBlock(nn.Module):
    def __init__(self, dim, dim_out, time_emb_dim=None, mult=2, norm=True, act="gelu"):
        super().__init__()
        self.has_time = time_emb_dim is not None
        if self.has_time:
            self.mlp = nn.Sequential(make_act(act), nn.Linear(time_emb_dim, dim))
        self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim) if norm else nn.Identity(),
            nn.Conv2d(dim, dim_out * mult, 3, padding=1, bias=False),
            make_act(act),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1, bias=False),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1, bias=False) if dim != dim_out else nn.Identity()

    def forward(self, x, t=None):
        h = self.ds_conv(x)
        if self.has_time:
            h = h + self.mlp(t)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


class _ConvNormAct(nn.Module):
    def __init__(self, dim, dim_out, groups=8, act="gelu"):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.norm(self.proj(x)))


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, time_emb_dim=None, groups=8, act="gelu"):
        super().__init__()
        self.has_time = time_emb_dim is not None
        if self.has_time:
            self.mlp = nn.Sequential(make_act(act), nn.Linear(time_emb_dim, dim_out))
        self.block1 = _ConvNormAct(dim, dim_out, groups, act)
        self.block2 = _ConvNormAct(dim_out, dim_out, groups, act)
        self.res_conv = nn.Conv2d(dim, dim_out, 1, bias=False) if dim != dim_out else nn.Identity()

    def forward(self, x, t=None):
        h = self.block1(x)
        if self.has_time:
            h = h + self.mlp(t)[:, :, None, None]
        return self.block2(h) + self.res_conv(x)


class DownLevel(nn.Module):
    def __init__(self, block1, block2, attn, downsample):
        super().__init__()
        self.block1, self.block2, self.attn, self.downsample = block1, block2, attn, downsample

    def forward(self, x, t=None):
        x = self.attn(self.block2(self.block1(x, t), t))
        return x, self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, block1, block2, attn, upsample):
        super().__init__()
        self.block1, self.block2, self.attn, self.upsample = block1, block2, attn, upsample

    def forward(self, x, skip, t=None):
        x = torch.cat((x, skip), 1)
        return self.upsample(self.attn(self.block2(self.block1(x, t), t)))


class Unet(nn.Module):
    """Same arguments and semantics as ``ddpm_ms.models.tutorial_unet.Unet``."""

    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4), channels=1,
                 with_time_emb=True, block_type="convnext", convnext_mult=2, resnet_groups=8,
                 act="gelu", attn_levels=None, mid_attn=True, num_classes=None):
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        num_levels = len(dim_mults)
        attn_levels = tuple(range(num_levels)) if attn_levels is None else tuple(attn_levels)
        init_dim = dim // 3 * 2 if init_dim is None else int(init_dim)
        out_dim = channels if out_dim is None else int(out_dim)
        self.num_classes = num_classes
        self.with_time_emb = with_time_emb
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4 if with_time_emb else None

        def block(cin, cout, temb=time_dim, norm=True):
            if block_type == "convnext":
                return ConvNextBlock(cin, cout, temb, mult=convnext_mult, norm=norm, act=act)
            return ResnetBlock(cin, cout, temb, groups=resnet_groups, act=act)

        def lin_attn(d):
            return Residual(PreNorm(d, LinearAttention(d)))

        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        if with_time_emb:
            self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(dim), nn.Linear(dim, time_dim),
                                          make_act(act), nn.Linear(time_dim, time_dim))
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, time_dim)
        self.downs = nn.ModuleList()
        for ind, (d_in, d_out) in enumerate(in_out):
            is_last = ind == num_levels - 1
            self.downs.append(DownLevel(
                block(d_in, d_out, norm=ind != 0), block(d_out, d_out),
                lin_attn(d_out) if ind in attn_levels else nn.Identity(),
                nn.Conv2d(d_out, d_out, 4, 2, 1, bias=False) if not is_last else nn.Identity()))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid))) if mid_attn else nn.Identity()
        self.mid_block2 = block(mid, mid)
        self.ups = nn.ModuleList()
        for ind, (d_in, d_out) in enumerate(reversed(in_out[1:])):
            level = num_levels - 1 - ind
            self.ups.append(UpLevel(
                block(d_out * 2, d_in), block(d_in, d_in),
                lin_attn(d_in) if level in attn_levels else nn.Identity(),
                nn.ConvTranspose2d(d_in, d_in, 4, 2, 1, bias=False)))
        self.final_block = block(dims[1], dim, temb=None)
        self.final_conv = nn.Conv2d(dim, out_dim, 1, bias=False)

    def forward(self, x, t, y=None):
        x = self.init_conv(x)
        temb = None
        if self.with_time_emb:
            temb = self.time_mlp(t)
            if self.num_classes is not None:
                temb = temb + self.class_emb(y)
        skips = []
        for level in self.downs:
            skip, x = level(x, temb)
            skips.append(skip)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
        for level in self.ups:
            x = level(x, skips.pop(), temb)
        return self.final_conv(self.final_block(x))


def unet_kwargs_from_config(cfg):
    """The Unet arguments of a ddpm_ms config dict (as ddpm_ms.factory.create_model uses them)."""
    return dict(dim=cfg["dim"], init_dim=cfg["init_dim"], dim_mults=tuple(cfg["dim_mults"]),
                channels=cfg["channels"], block_type=cfg["block_type"],
                convnext_mult=cfg["convnext_mult"], resnet_groups=cfg["resnet_groups"], act=cfg["act"],
                attn_levels=cfg["attn_levels"], mid_attn=cfg["mid_attn"], num_classes=cfg["num_classes"])


_RENAMES = ((".gamma", ".weight"), (".beta", ".bias"), ("embedding_table", "weight"))


def torch_name(ms_name):
    """PyTorch parameter name of a MindSpore U-Net parameter name."""
    for old, new in _RENAMES:
        if ms_name.endswith(old):
            return ms_name[: -len(old)] + new
    return ms_name


def mindspore_arrays(ms_model):
    """{MindSpore parameter name: float32 numpy array} of a MindSpore Unet."""
    return {name: np.ascontiguousarray(p.asnumpy()).copy() for name, p in ms_model.parameters_and_names()}


def convert_state_dict(ms_model_or_arrays):
    """MindSpore Unet (or its ``mindspore_arrays``) -> a PyTorch state dict (names mapped)."""
    arrays = ms_model_or_arrays if isinstance(ms_model_or_arrays, dict) else mindspore_arrays(ms_model_or_arrays)
    return {torch_name(k): torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()}


def from_mindspore(ms_model, **unet_kwargs):
    """A PyTorch Unet built with ``unet_kwargs`` holding the weights of ``ms_model`` (a
    MindSpore Unet or its ``mindspore_arrays`` dict); names and shapes must match exactly."""
    net = Unet(**unet_kwargs)
    state = convert_state_dict(ms_model)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"MindSpore and PyTorch U-Nets differ: missing in MindSpore {missing[:5]}, "
                         f"not in PyTorch {extra[:5]}")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: MindSpore shape {tuple(v.shape)} != PyTorch {tuple(own[k].shape)}")
    net.load_state_dict(state, strict=True)
    return net


def noise_loss(pred, target, loss_type):
    if loss_type == "l1":
        return F.l1_loss(pred, target)
    if loss_type == "l2":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=1.0)
