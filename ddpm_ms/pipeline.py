"""From a checkpoint or an exported file to images: the one loader, and ``DDPMPipeline``.

    from ddpm_ms import DDPMPipeline

    pipe = DDPMPipeline.from_checkpoint("runs/quick")                # a run directory or a .ckpt; EMA weights
    images = pipe(num=16, sampler="dpm-solver++", steps=20, seed=0)  # uint8 [16, 28, 28, 1]
    pipe.save_grid(images, "samples.png")
    pipe.gif("denoising.gif", num=16, seed=0)
    filled = pipe.inpaint(images[:4], mask="center")                 # RePaint; the mask marks what to fill
    edited = pipe.img2img(images[:4], strength=0.5)                  # SDEdit

:func:`load` is the only way ddpm_ms turns a file into a network to sample with: the sampling
commands (through ``command_line.load_for_args``), ``ddpm-export``, ``ddpm-evaluate``, the
notebook and the scripts all call it, and ``ddpm-sample`` / ``ddpm-gif`` sample through
``DDPMPipeline`` itself, so the Python API and the commands give the same images.
"""

import os
from collections import namedtuple

import numpy as np

from ddpm_ms.config import saved_config
from ddpm_ms.diffusion.generation import generate, img2img, inpaint
from ddpm_ms.factory import cast_model, create_model, create_schedule
from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.errors import UserError

EXPORTED_SUFFIXES = (".mindir", ".onnx")

Loaded = namedtuple("Loaded", "model sched cfg dtype path backend")
Loaded.__doc__ = """model: the network to call (cast for the compute dtype); sched: its Schedule; cfg: its config;
dtype: the compute dtype; path: the file it came from; backend: the device backend in use."""


def load(source, use_ema=True, device=None, mode="graph", dtype=None, fast_kernels=None, check=None, backend=None,
         exported=None):
    """The denoiser in ``source``, ready to sample -> :data:`Loaded`.

    source: a checkpoint file, a run directory (its newest checkpoint), or a ``.mindir`` / ``.onnx``
        file written by ddpm-export (its JSON beside it).
    use_ema: the EMA weights (default) or the raw ones (checkpoints only).
    device: None uses the device MindSpore is already set up for; a name ("auto", "Ascend", "GPU",
        "CPU") sets it up first (with ``mode``). ``backend``: the result of an earlier setup_device.
    dtype: the compute dtype, "auto", "float32" or "float16"; None: the run's config.
    fast_kernels: the CPU kernels: None = the user's default (on unless DDPM_MS_FAST_KERNELS=0),
        False = MindSpore's built-in ops only (as an exported graph needs), True = asked for.
    check: ``check(cfg)`` runs once the config is known, before anything is built or cast.
    exported: whether ``source`` is an exported file (None: a .mindir / .onnx name is).
    """
    import mindspore as ms

    from ddpm_ms.utils.device import compute_dtype, set_jit_level, setup_device

    if backend is None:
        backend = setup_device(device, mode) if device is not None else ms.get_context("device_target")
    if exported or (exported is None and str(source).lower().endswith(EXPORTED_SUFFIXES)):
        from ddpm_ms.interop.exported import load_exported

        if not use_ema:
            raise UserError("--no-ema applies to checkpoints; an exported file holds the weights it was "
                            "exported with (ddpm-export --no-ema)")
        model = load_exported(source)
        if check is not None:
            check(model.cfg)
        return Loaded(model, model.sched, model.cfg, ms.float32, source, backend)
    path = ckpt.resolve_checkpoint(source)
    groups, meta = ckpt.load(path)
    cfg = saved_config(meta)
    if check is not None:
        check(cfg)
    model = create_model(cfg, fast_kernels)
    weights = groups["ema"] if use_ema and groups["ema"] else groups["model"]
    ckpt.assign(ckpt.named_params(model), weights, "model", path)
    model.set_train(False)
    set_jit_level(model, cfg["jit_level"])
    dtype = compute_dtype(backend, dtype or cfg.get("dtype", "auto"))
    return Loaded(cast_model(model, dtype), create_schedule(cfg), cfg, dtype, path, backend)


def with_churn(cfg, churn):
    """``cfg`` with the heun sampler's churn replaced -> a new dict (``cfg`` itself if churn is None).

    churn: EDM's S_churn (a number; the config's s_tmin, s_tmax, s_noise kept) or the tuple
    (s_churn, s_tmin, s_tmax, s_noise) (s_tmax None: no bound). Bad values: UserError.
    """
    if churn is None:
        return cfg
    from ddpm_ms.diffusion.samplers import check_churn

    values = tuple(churn) if isinstance(churn, (tuple, list)) else (churn, cfg["s_tmin"], cfg["s_tmax"], cfg["s_noise"])
    try:
        check_churn(values)
    except ValueError as e:
        raise UserError(str(e)) from None
    return dict(cfg, s_churn=values[0], s_tmin=values[1], s_tmax=values[2], s_noise=values[3])


class DDPMPipeline:
    """A trained denoiser and its schedule: ``pipe(num=...)`` -> images.

    Built by :meth:`from_checkpoint` or :meth:`from_exported` (both through :func:`load`);
    sampling runs :func:`ddpm_ms.diffusion.generation.generate`, as the commands do.
    """

    def __init__(self, loaded):
        self.model, self.sched, self.cfg, self.dtype, self.path, self.backend = loaded

    @classmethod
    def from_checkpoint(cls, path, use_ema=True, device="auto", mode="graph", dtype=None, fast_kernels=None):
        """A run directory (its newest checkpoint) or a checkpoint file; EMA weights unless use_ema=False."""
        return cls(load(path, use_ema, device, mode, dtype, fast_kernels))

    @classmethod
    def from_exported(cls, path, device="auto", mode="graph"):
        """A ``.mindir`` or ``.onnx`` file written by ddpm-export."""
        return cls(load(path, device=device, mode=mode, exported=True))

    @property
    def num_classes(self):
        """The number of classes of a class-conditional model, else None."""
        return self.cfg["num_classes"]

    def sample(self, num=16, sampler=None, steps=None, eta=None, seed=0, classes=None, guidance=None,
               gif_frames=0, gif_source="auto", progress=False, x_T=None, churn=None):
        """-> (images [N, C, H, W] float32 in [-1, 1], GIF frames): the raw form the commands save.

        Defaults come from the run's config (its sampler, sample_steps, eta, guidance, churn); for a
        class-conditional model ``classes`` defaults to 0, 1, 2, ... cycling. churn: the heun sampler's
        S_churn, or (s_churn, s_tmin, s_tmax, s_noise) (:func:`with_churn`), e.g.
        ``pipe(sampler="heun", steps=20, churn=30)``.
        """
        return generate(self.model, self.sched, with_churn(self.cfg, churn), num, sampler=sampler, steps=steps,
                        eta=eta, seed=seed, dtype=self.dtype, gif_frames=gif_frames, gif_source=gif_source,
                        progress=progress, x_T=x_T, classes=classes, guidance=guidance)

    def __call__(self, num=16, sampler=None, steps=None, eta=None, seed=0, classes=None, guidance=None,
                 output="uint8", progress=False, churn=None):
        """``num`` images -> uint8 [N, H, W, C] (``output="float"``: float32 [N, H, W, C] in [-1, 1])."""
        if output not in ("uint8", "float"):
            raise UserError(f"output must be 'uint8' or 'float', got {output!r}")
        from ddpm_ms.utils.visualize import to_uint8

        images, _ = self.sample(num, sampler, steps, eta, seed, classes, guidance, progress=progress, churn=churn)
        return to_uint8(images) if output == "uint8" else images.transpose(0, 2, 3, 1)

    def save_grid(self, images, path, nrow=None):
        """Write ``images`` (what the pipeline returned, uint8 or float, [N, H, W, C]) as one PNG grid."""
        from ddpm_ms.utils.visualize import save_grid

        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1.0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_grid(images.transpose(0, 3, 1, 2), path, nrow=nrow)
        return path

    def gif(self, path, num=16, seed=0, frames=40, source="auto", sampler=None, steps=None, eta=None, classes=None,
            guidance=None, nrow=None, duration=4.0, hold=1.0, label=False, progress=False, churn=None):
        """Sample ``num`` images and write the denoising of their grid as a GIF (or .webp); returns path.

        ``frames`` states from the start noise to the samples at an even pace of visible change
        (``source``: "auto", x_t when the chain is long enough for an even pace, else x_T then the
        predicted x_0 of each step; x_t "x", the predicted x_0 "x0", or "both"; see
        ``ddpm_ms.diffusion.frames``); the last is held ``hold`` seconds.
        """
        from ddpm_ms.utils.visualize import save_gif

        _, chain = self.sample(num, sampler, steps, eta, seed, classes, guidance, gif_frames=frames,
                               gif_source=source, progress=progress, churn=churn)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_gif(chain, path, nrow=nrow, duration=duration, hold_last=hold, labels=chain.labels if label else None)
        return path

    # ----- editing images: ddpm_ms.diffusion.editing -----

    def _pixels(self, images):
        """uint8 or float [-1, 1] images [N, H, W, C] (as this pipeline returns them) -> float32 [N, C, H, W]."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise UserError(f"images must be [N, H, W, C], got shape {list(images.shape)}")
        x = images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)
        return x.transpose(0, 3, 1, 2)

    def _output(self, results, output):
        from ddpm_ms.utils.visualize import to_uint8

        return to_uint8(results) if output == "uint8" else results.transpose(0, 2, 3, 1)

    def inpaint(self, images, mask, num_per_image=1, sampler=None, steps=None, eta=None, seed=0, jump_length=10,
                jump_n_sample=1, keep_known=True, classes=None, guidance=None, output="uint8", progress=False,
                churn=None):
        """Fill the masked pixels of ``images`` (RePaint) -> [N * K, H, W, C] like ``pipe(...)`` returns.

        images: uint8, or floats in [-1, 1], [N, H, W, C] (gray may be [N, H, W]). mask: True/1 = a pixel
        to fill: bool [H, W] or [N, H, W], or a named mask ("center", "half-left", "box:x0,y0,x1,y1",
        "random:0.5", ...: ``ddpm_ms.data.user_images``). The known pixels come back unchanged unless
        keep_known=False. jump_length / jump_n_sample: RePaint's resampling (sampler "ddpm").
        """
        x = self._pixels(images)
        if isinstance(mask, str):
            from ddpm_ms.data.user_images import read_mask

            fill = read_mask(mask, len(x), self.cfg["image_size"], seed=seed)
        else:
            fill = np.asarray(mask).astype(bool)
            fill = fill[:, None] if fill.ndim == 3 else fill
        results = inpaint(self.model, self.sched, with_churn(self.cfg, churn), x, ~fill, num_per_image, sampler, steps,
                          eta, seed, self.dtype, jump_length, jump_n_sample, keep_known, classes, guidance, progress)
        return self._output(results, output)

    def img2img(self, images, strength, num_per_image=1, sampler=None, steps=None, eta=None, seed=0, classes=None,
                guidance=None, output="uint8", progress=False, churn=None):
        """SDEdit: ``images`` noised to ``strength`` in (0, 1] and denoised -> [N * K, H, W, C]."""
        results = img2img(self.model, self.sched, with_churn(self.cfg, churn), self._pixels(images), strength,
                          num_per_image, sampler, steps, eta, seed, self.dtype, classes, guidance, progress)
        return self._output(results, output)
