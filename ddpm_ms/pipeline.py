"""From config or checkpoint to images: model factory, EMA-weight loading, generation."""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.config import DEFAULTS
from ddpm_ms.utils.device import set_jit_level
from ddpm_ms.diffusion.gaussian import Schedule, classifier_free_guidance
from ddpm_ms.utils.errors import UserError
from ddpm_ms.diffusion.frames import FrameRecorder
from ddpm_ms.diffusion.samplers import sample
from ddpm_ms.models.ddpm_unet import DDPMUnet
from ddpm_ms.models.tutorial_unet import Unet, to_mixed_precision


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


def load_model(path, use_ema=True, cfg_overrides=None, fast_kernels=None):
    """Rebuild the model stored in ``path`` -> (model, schedule, config).

    ``path`` is a checkpoint file or a run directory (then its newest checkpoint, as for
    ``ddpm-sample --checkpoint``); fast_kernels as for create_model.
    """
    return load_checkpoint_file(ckpt.resolve_checkpoint(path), use_ema, cfg_overrides, fast_kernels)


def load_checkpoint_file(path, use_ema=True, cfg_overrides=None, fast_kernels=True):
    """load_model for a path already resolved to a checkpoint file (ckpt.resolve_checkpoint)."""
    groups, meta = ckpt.load(path)
    cfg = dict(DEFAULTS, **meta["config"])  # keys added to ddpm_ms after the checkpoint was written
    if cfg_overrides:
        cfg.update(cfg_overrides)
    model = create_model(cfg, fast_kernels)
    weights = groups["ema"] if use_ema and groups["ema"] else groups["model"]
    ckpt.assign(ckpt.named_params(model), weights, "model", path)
    model.set_train(False)
    set_jit_level(model, cfg["jit_level"])
    return model, create_schedule(cfg), cfg


def guided_eps_fn(eps_fn, classes, guidance, null_class):
    """eps(x, t) for fixed class labels, with classifier-free guidance weight ``guidance``.

    For w > 0 the conditional and unconditional predictions come from one network call on a
    batch of twice the size (Ho & Salimans 2022, Eq. 6); for w = 0 only the conditional one is made.
    The raw outputs are combined (eps, x_0 or v): the conversion to (eps, x_0) is affine with the
    same x_t term for both, so this is exactly guidance in eps space (model_output_to_eps_x0).
    """
    y = Tensor(np.asarray(classes, np.int32))
    if guidance == 0:
        return lambda x, t: eps_fn(x, t, y)
    y_both = Tensor(np.concatenate([np.asarray(classes, np.int32), np.full(len(classes), null_class, np.int32)]))

    def eps(x, t):
        both = eps_fn(ops.concat((x, x)), ops.concat((t, t)), y_both)
        eps_cond, eps_uncond = ops.split(both, x.shape[0])
        return classifier_free_guidance(eps_cond, eps_uncond, guidance)

    return eps


def class_labels(cfg, num, classes=None):
    """Labels for ``num`` samples of a class-conditional model: the given list, or 0, 1, 2, ... cycling."""
    if cfg["num_classes"] is None:
        if classes is not None:
            raise UserError("this checkpoint is an unconditional model (num_classes is not set); "
                            "drop --classes / --guidance or use a class-conditional checkpoint")
        return None
    if classes is None:
        return np.arange(num) % cfg["num_classes"]
    classes = np.asarray(classes, np.int64)
    if classes.ndim != 1 or len(classes) != num:
        raise UserError(f"got {len(classes)} class labels for {num} samples")
    if classes.min() < 0 or classes.max() >= cfg["num_classes"]:
        raise UserError(f"class labels must be in 0..{cfg['num_classes'] - 1}, got {classes.tolist()}")
    return classes


def make_eps_fn(model, dtype=ms.float32):
    """The network output (eps, x_0 or v: cfg["prediction_type"]) for (x, t[, y]) as a float32 tensor;
    the model call runs as a compiled graph in GRAPH_MODE."""

    def eps_fn(x, t, y=None):
        out = model(x.astype(dtype), t) if y is None else model(x.astype(dtype), t, y)
        return out.astype(ms.float32)

    return eps_fn


def generate(model, sched, cfg, num, sampler=None, steps=None, eta=None, seed=0, dtype=ms.float32,
             gif_frames=0, gif_source="x", progress=True, x_T=None, classes=None, guidance=None):
    """Sample ``num`` images -> (images [N, C, H, W] float32 numpy in [-1, 1], GIF frames).

    Sampler options default to the config's sampler / sample_steps / eta. With gif_frames > 0,
    that many frames of x_t (gif_source="x"), of the predicted x_0 ("x0") or of both side by side
    ("both") are kept, from the start noise to the sample at an even pace (ddpm_ms.diffusion.frames). x_T (a float32
    array of [num, C, H, W]) replaces the seed's starting noise. For a class-conditional model,
    ``classes`` (default 0, 1, 2, ... cycling) and ``guidance`` (default: the config's) apply.
    ``model`` may also be an exported graph (``ddpm_ms.interop.exported.ExportedDenoiser``).
    """
    labels = class_labels(cfg, num, classes)
    if labels is None and guidance:
        raise UserError("guidance needs a class-conditional checkpoint (num_classes is not set in this one)")
    w = cfg["guidance"] if guidance is None else guidance
    if hasattr(model, "make_eps_fn"):  # an exported graph (ddpm_ms.interop.exported): guidance is one of its inputs
        eps_fn = model.make_eps_fn(num, labels, w)
    else:
        eps_fn = make_eps_fn(model, dtype)
        if labels is not None:
            eps_fn = guided_eps_fn(eps_fn, labels, w, cfg["num_classes"])
    sampler = sampler or cfg["sampler"]
    steps = steps if steps is not None else cfg["sample_steps"]
    eta = cfg["eta"] if eta is None else eta
    shape = (num, cfg["channels"], cfg["image_size"], cfg["image_size"])
    rng = np.random.default_rng(seed)  # x_T drawn here as sample() would: the GIF's first frame
    x_T = rng.standard_normal(shape, dtype=np.float32) if x_T is None else np.asarray(x_T, np.float32)
    recorder = FrameRecorder(x_T, gif_frames, gif_source) if gif_frames else None
    x = sample(eps_fn, sched, shape, sampler=sampler, steps=steps, eta=eta, rng=rng,
               clip_denoised=cfg["clip_denoised"], variance=cfg["variance"],
               callback=recorder, progress=progress, x_T=Tensor(x_T), prediction_type=cfg["prediction_type"])
    images = ops.clamp(x, -1.0, 1.0).asnumpy()
    return images, (recorder.frames(images, sched) if recorder else [])

