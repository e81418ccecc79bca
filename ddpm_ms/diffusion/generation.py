"""Images from a denoising network: class labels, classifier-free guidance, the start noise, the sampler, GIF frames.

The network is an argument (a Cell, or an exported graph with ``make_eps_fn``), as in the rest of
the diffusion math.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ddpm_ms.diffusion.frames import FrameRecorder
from ddpm_ms.diffusion.gaussian import classifier_free_guidance
from ddpm_ms.diffusion.samplers import initial_noise, sample
from ddpm_ms.utils.errors import UserError


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

    return lambda x, t: guided_output(eps_fn, x, t, y_both, guidance)


def guided_output(net, x, t, y_both, guidance):
    """Ho & Salimans 2022, Eq. 6 from one call of ``net`` on a batch of 2N (``y_both``: the N labels,
    then N null labels): (1 + w) out(x, y) - w out(x, null). Graph-safe: the exported guided graph
    (``ddpm_ms.export.GuidedDenoiser``) is built from it too."""
    both = net(ops.concat((x, x)), ops.concat((t, t)), y_both)
    out_cond, out_uncond = ops.split(both, x.shape[0])
    return classifier_free_guidance(out_cond, out_uncond, guidance)


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
    rng = np.random.default_rng(seed)  # x_T drawn here (sample()'s first draw): the GIF's first frame
    x_T = initial_noise(shape, rng) if x_T is None else np.asarray(x_T, np.float32)
    recorder = FrameRecorder(x_T, gif_frames, gif_source) if gif_frames else None
    x = sample(eps_fn, sched, shape, sampler=sampler, steps=steps, eta=eta, rng=rng,
               clip_denoised=cfg["clip_denoised"], variance=cfg["variance"],
               callback=recorder, progress=progress, x_T=Tensor(x_T), prediction_type=cfg["prediction_type"])
    images = ops.clamp(x, -1.0, 1.0).asnumpy()
    return images, (recorder.frames(images, sched) if recorder else [])
