"""From a config to objects: the U-Net its architecture keys describe, its noise schedule, its compute dtype.

The one factory every path uses (training, the loader, export, conversion, benchmarks).
"""

import mindspore as ms

from ddpm_ms.diffusion.gaussian import Schedule
from ddpm_ms.models.ddpm_unet import DDPMUnet
from ddpm_ms.models.precision import to_mixed_precision
from ddpm_ms.models.tutorial_unet import Unet


def create_model(cfg, fast_kernels=None):
    """The U-Net described by the architecture keys of ``cfg`` (``arch``: tutorial or ddpm).

    fast_kernels=False builds it on MindSpore's built-in ops only (no C++ custom ops), as an
    exported graph needs; True asks for the compiled CPU kernels where usable; None (default) is
    the user's default, on unless DDPM_MS_FAST_KERNELS=0 (``ddpm_ms.models.layers``). The parameters
    are the same either way.
    """
    if cfg.get("arch", "tutorial") == "ddpm":
        return create_ddpm_unet(cfg, fast_kernels)
    return Unet(
        dim=cfg["dim"],
        init_dim=cfg["init_dim"],
        dim_mults=tuple(cfg["dim_mults"]),
        channels=cfg["channels"],
        block_type=cfg["block_type"],
        convnext_mult=cfg["convnext_mult"],
        resnet_groups=cfg["resnet_groups"],
        act=cfg["act"],
        attn_levels=cfg["attn_levels"],
        mid_attn=cfg["mid_attn"],
        num_classes=cfg["num_classes"],
        fast_kernels=fast_kernels,
        self_condition=cfg.get("self_condition", False),
    )


def create_ddpm_unet(cfg, fast_kernels=None):
    """The DDPM paper's U-Net (ddpm_ms/models/ddpm_unet.py, diffusers UNet2DModel layout) for ``arch: ddpm``."""
    return DDPMUnet(
        block_out_channels=[cfg["dim"] * m for m in cfg["dim_mults"]],
        channels=cfg["channels"],
        layers_per_block=cfg["layers_per_block"],
        attn_levels=range(len(cfg["dim_mults"])) if cfg["attn_levels"] is None else cfg["attn_levels"],
        mid_attn=cfg["mid_attn"],
        groups=cfg["resnet_groups"],
        eps=cfg["norm_eps"],
        dropout=cfg["dropout"],
        act=cfg["act"],
        attn_head_dim=cfg["attn_head_dim"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        downsample_padding=cfg["downsample_padding"],
        num_classes=cfg["num_classes"],
        fast_kernels=fast_kernels,
        self_condition=cfg.get("self_condition", False),
    )


def create_schedule(cfg):
    return Schedule.from_config(cfg["beta_schedule"], cfg["timesteps"], cfg["beta_start"], cfg["beta_end"],
                                cfg["zero_terminal_snr"])


def cast_model(model, dtype):
    """float16 compute for Ascend/GPU with the GroupNorms in float32 (``unet.to_mixed_precision``).

    Returns the network to call: ``model`` itself, flagged in place, so parameter names (and
    checkpoints) are the same in float16 and float32.
    """
    if dtype != ms.float16:
        return model
    return to_mixed_precision(model, ms.float16)
