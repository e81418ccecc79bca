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


def _self_conditioned(fn):
    """``fn`` marked as taking ``x_self_cond`` (``ddpm_ms.diffusion.samplers.self_conditioned``)."""
    fn.self_condition = True
    return fn


def guided_eps_fn(eps_fn, classes, guidance, null_class):
    """eps(x, t) for fixed class labels, with classifier-free guidance weight ``guidance``.

    For w > 0 the conditional and unconditional predictions come from one network call on a
    batch of twice the size (Ho & Salimans 2022, Eq. 6); for w = 0 only the conditional one is made.
    The raw outputs are combined (eps, x_0 or v): the conversion to (eps, x_0) is affine with the
    same x_t term for both, so this is exactly guidance in eps space (model_output_to_eps_x0).
    A self-conditioned ``eps_fn`` gives a self-conditioned one (``x_self_cond``, the same for both halves).
    """
    y = Tensor(np.asarray(classes, np.int32))
    self_cond = getattr(eps_fn, "self_condition", False)
    if guidance == 0:
        if self_cond:
            return _self_conditioned(lambda x, t, x_self_cond=None: eps_fn(x, t, y, x_self_cond))
        return lambda x, t: eps_fn(x, t, y)
    y_both = Tensor(np.concatenate([np.asarray(classes, np.int32), np.full(len(classes), null_class, np.int32)]))
    if self_cond:
        return _self_conditioned(
            lambda x, t, x_self_cond=None: guided_output(eps_fn, x, t, y_both, guidance, x_self_cond))
    return lambda x, t: guided_output(eps_fn, x, t, y_both, guidance)


def guided_output(net, x, t, y_both, guidance, x_self_cond=None):
    """Ho & Salimans 2022, Eq. 6 from one call of ``net`` on a batch of 2N (``y_both``: the N labels,
    then N null labels): (1 + w) out(x, y) - w out(x, null). Graph-safe: the exported guided graph
    (``ddpm_ms.export.GuidedDenoiser``) is built from it too. ``x_self_cond`` (self-conditioning)
    goes to both halves."""
    if x_self_cond is None:
        both = net(ops.concat((x, x)), ops.concat((t, t)), y_both)
    else:
        both = net(ops.concat((x, x)), ops.concat((t, t)), y_both, ops.concat((x_self_cond, x_self_cond)))
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
    the model call runs as a compiled graph in GRAPH_MODE. For a self-conditioned model (its
    ``self_condition``) also ``x_self_cond`` (None: zeros), and the function says so (``self_condition``)."""
    if not getattr(model, "self_condition", False):
        def eps_fn(x, t, y=None):
            out = model(x.astype(dtype), t) if y is None else model(x.astype(dtype), t, y)
            return out.astype(ms.float32)

        return eps_fn

    def self_conditioned_eps_fn(x, t, y=None, x_self_cond=None):
        x_self_cond = ops.zeros_like(x) if x_self_cond is None else x_self_cond
        return model(x.astype(dtype), t, y, x_self_cond.astype(dtype)).astype(ms.float32)

    return _self_conditioned(self_conditioned_eps_fn)


def model_eps_fn(model, cfg, num, classes=None, guidance=None, dtype=ms.float32, unconditional_default=False):
    """The network as the samplers' eps_fn(x, t) for ``num`` images, with class labels and guidance.

    For a class-conditional model, ``classes`` (default 0, 1, 2, ... cycling; with
    ``unconditional_default`` the null label instead, i.e. the model's unconditional prediction, as
    the editing functions use) and ``guidance`` (default: the config's) apply. ``model`` may also be
    an exported graph (``ddpm_ms.interop.exported.ExportedDenoiser``).
    """
    null = cfg["num_classes"]
    if unconditional_default and classes is None and null is not None:
        labels, w = np.full(num, null, np.int64), 0.0
        if guidance:
            raise UserError("guidance needs class labels (--classes) for editing; without them the model's "
                            "unconditional prediction is used")
    else:
        labels = class_labels(cfg, num, classes)
        if labels is None and guidance:
            raise UserError("guidance needs a class-conditional checkpoint (num_classes is not set in this one)")
        w = cfg["guidance"] if guidance is None else guidance
    if hasattr(model, "make_eps_fn"):  # an exported graph (ddpm_ms.interop.exported): guidance is one of its inputs
        return model.make_eps_fn(num, labels, w)
    eps_fn = make_eps_fn(model, dtype)
    if labels is not None:
        eps_fn = guided_eps_fn(eps_fn, labels, w, null)
    return eps_fn


def sampler_options(cfg, sampler=None, steps=None, eta=None):
    """The sampler, its steps and eta (default: the config's) and the model's own options, as keyword arguments."""
    return dict(sampler=sampler or cfg["sampler"], steps=steps if steps is not None else cfg["sample_steps"],
                eta=cfg["eta"] if eta is None else eta, clip_denoised=cfg["clip_denoised"],
                variance=cfg["variance"], prediction_type=cfg["prediction_type"],
                churn=(cfg["s_churn"], cfg["s_tmin"], cfg["s_tmax"], cfg["s_noise"]))


def generate(model, sched, cfg, num, sampler=None, steps=None, eta=None, seed=0, dtype=ms.float32,
             gif_frames=0, gif_source="auto", progress=True, x_T=None, classes=None, guidance=None):
    """Sample ``num`` images -> (images [N, C, H, W] float32 numpy in [-1, 1], GIF frames).

    Sampler options default to the config's sampler / sample_steps / eta. With gif_frames > 0,
    that many frames are kept, from the start noise to the sample at an even pace of visible
    change (a :class:`ddpm_ms.diffusion.frames.DenoisingFrames`, with a label per frame): of x_t
    (gif_source="x"), of the start noise and then the predicted x_0 ("x0"), of x_t and the predicted
    x_0 side by side ("both"), or "auto": x_t when the chain has at least 3 states per frame (a
    1000-step DDPM chain), else x0, whose frames show the picture forming even when x_t is still
    noise for half of a short chain (ddpm_ms.diffusion.frames explains the rule and its
    measurements). x_T (a float32 array of [num, C, H, W]) replaces the seed's starting noise.
    For a class-conditional model, ``classes`` (default 0, 1, 2, ... cycling) and ``guidance``
    (default: the config's) apply. ``model`` may also be an exported graph
    (``ddpm_ms.interop.exported.ExportedDenoiser``).
    """
    eps_fn = model_eps_fn(model, cfg, num, classes, guidance, dtype)
    shape = (num, cfg["channels"], cfg["image_size"], cfg["image_size"])
    rng = np.random.default_rng(seed)  # x_T drawn here (sample()'s first draw): the GIF's first frame
    x_T = initial_noise(shape, rng) if x_T is None else np.asarray(x_T, np.float32)
    recorder = FrameRecorder(x_T, gif_frames, gif_source) if gif_frames else None
    x = sample(eps_fn, sched, shape, rng=rng, callback=recorder, progress=progress, x_T=Tensor(x_T),
               **sampler_options(cfg, sampler, steps, eta))
    images = ops.clamp(x, -1.0, 1.0).asnumpy()
    return images, (recorder.frames(images, sched) if recorder else [])


# ----- editing the user's images (ddpm_ms.diffusion.editing) -----

def check_images(cfg, images):
    """``images`` as float32 [N, C, S, S] in [-1, 1] for this model, else UserError."""
    images = np.asarray(images)
    c, side = cfg["channels"], cfg["image_size"]
    if images.ndim != 4 or images.shape[1:] != (c, side, side):
        raise UserError(f"the model takes images of [N, {c}, {side}, {side}] ({c} channel(s), {side}x{side}), "
                        f"got {list(images.shape)}")
    if images.shape[0] < 1:
        raise UserError("no images given")
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
        raise UserError("images must be finite floats in [-1, 1] (uint8 / 127.5 - 1)")
    if images.min() < -1.0 or images.max() > 1.0:
        raise UserError(f"images must be in [-1, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
    return images.astype(np.float32)


def _repeat(array, k):
    return np.repeat(np.asarray(array), k, axis=0)


def _edited(function, sched, *args, **options):
    """Run an editing function of ddpm_ms.diffusion.editing -> float32 NumPy in [-1, 1]; its option
    checks (ValueError) become one-line UserErrors before anything runs."""
    from ddpm_ms.diffusion import editing

    checked = {k: options[k] for k in ("sampler", "steps", "eta", "variance", "prediction_type", "jump_length",
                                       "jump_n_sample", "strength") if k in options}
    try:
        editing.check_arguments(sched.num_timesteps, **checked)
    except ValueError as e:
        raise UserError(str(e)) from None
    return ops.clamp(function(*args, **options), -1.0, 1.0).asnumpy()


def inpaint(model, sched, cfg, images, known, num_per_image=1, sampler=None, steps=None, eta=None, seed=0,
            dtype=ms.float32, jump_length=10, jump_n_sample=1, keep_known=True, classes=None, guidance=None,
            progress=True):
    """Fill the pixels of ``images`` where ``known`` is False -> float32 [N * K, C, H, W] in [-1, 1].

    images: float32 [N, C, H, W] in [-1, 1] of the model's size; known: bool, broadcastable to
    [N, C, H, W] (e.g. [N, 1, H, W] or [1, 1, H, W]). K = num_per_image results per image, the K
    results of each image together. The known pixels come back bit for bit (``keep_known=False``:
    the model's own final values everywhere). jump_length / jump_n_sample: RePaint's resampling
    (DDPM only). A class-conditional model fills with its unconditional prediction unless
    ``classes`` (one label per image) are given, then with ``guidance``.
    (:func:`ddpm_ms.diffusion.editing.inpaint`.)
    """
    from ddpm_ms.diffusion import editing

    images = check_images(cfg, images)
    known = np.asarray(known, dtype=bool)
    try:
        known = np.broadcast_to(known, images.shape)
    except ValueError:
        raise UserError(f"a mask of shape {list(known.shape)} does not fit images of shape {list(images.shape)}") \
            from None
    for i, k in enumerate(known):
        if k.all():
            raise UserError(f"the mask of image {i} keeps every pixel: nothing to fill")
        if not k.any():
            raise UserError(f"the mask of image {i} keeps no pixel: that is plain sampling (ddpm-sample)")
    if int(num_per_image) != num_per_image or num_per_image < 1:
        raise UserError(f"num_per_image must be an integer >= 1, got {num_per_image}")
    num = len(images) * num_per_image
    labels = None if classes is None else _repeat(_per_image(classes, len(images)), num_per_image)
    eps_fn = model_eps_fn(model, cfg, num, labels, guidance, dtype, unconditional_default=True)
    return _edited(editing.inpaint, sched, eps_fn, sched, _repeat(images, num_per_image),
                   _repeat(known, num_per_image), seed=seed, jump_length=jump_length, jump_n_sample=jump_n_sample,
                   keep_known=keep_known, progress=progress, **sampler_options(cfg, sampler, steps, eta))


def img2img(model, sched, cfg, images, strength, num_per_image=1, sampler=None, steps=None, eta=None, seed=0,
            dtype=ms.float32, classes=None, guidance=None, progress=True):
    """SDEdit: ``images`` noised to ``strength`` in (0, 1], then denoised -> float32 [N * K, C, H, W] in [-1, 1].

    ``steps`` is the sampler's whole sequence, of which the part at or below strength * T runs
    (:func:`ddpm_ms.diffusion.editing.img2img`); the rest as in :func:`inpaint`.
    """
    from ddpm_ms.diffusion import editing

    images = check_images(cfg, images)
    if int(num_per_image) != num_per_image or num_per_image < 1:
        raise UserError(f"num_per_image must be an integer >= 1, got {num_per_image}")
    num = len(images) * num_per_image
    labels = None if classes is None else _repeat(_per_image(classes, len(images)), num_per_image)
    eps_fn = model_eps_fn(model, cfg, num, labels, guidance, dtype, unconditional_default=True)
    return _edited(editing.img2img, sched, eps_fn, sched, _repeat(images, num_per_image), strength=strength,
                   seed=seed, progress=progress, **sampler_options(cfg, sampler, steps, eta))


def _per_image(classes, n):
    classes = np.asarray(classes, np.int64).reshape(-1)
    if len(classes) == 1:
        return np.repeat(classes, n)
    if len(classes) != n:
        raise UserError(f"got {len(classes)} class labels for {n} images (give one, or one per image)")
    return classes
