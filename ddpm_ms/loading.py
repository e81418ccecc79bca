"""A checkpoint made ready to sample: resolve -> set up the device -> load -> compute dtype -> cast.

One sequence for every command and script that samples from a checkpoint (ddpm-sample, ddpm-gif,
ddpm-figures, ddpm-evaluate, scripts/); exported files are loaded by :mod:`ddpm_ms.interop.exported`.
"""

from collections import namedtuple

from ddpm_ms.utils import checkpoint as ckpt

Loaded = namedtuple("Loaded", "model sched cfg dtype path backend")
Loaded.__doc__ = """model: the network to call (cast for the compute dtype); sched: its Schedule; cfg: its config;
dtype: the compute dtype; path: the checkpoint file it came from; backend: the device backend in use."""


def load_for_sampling(checkpoint, device="auto", mode="graph", use_ema=True, check=None, backend=None, dtype=None):
    """The model of ``checkpoint`` (a file or a run directory: its newest checkpoint) -> Loaded.

    ``backend``: the result of an earlier ``setup_device`` (then the device is not set up again).
    ``check(cfg)``: called once the config is known, before anything is cast (argument checks
    that need the model's timesteps or classes). ``dtype``: "auto", "float32" or "float16" instead of
    the config's (``ddpm-sample --dtype``).
    """
    from ddpm_ms.utils.device import compute_dtype, setup_device
    from ddpm_ms.factory import cast_model
    from ddpm_ms.pipeline import load_checkpoint_file

    path = ckpt.resolve_checkpoint(checkpoint)  # a file stays itself: resolving it again picks nothing new
    if backend is None:
        backend = setup_device(device, mode)
    model, sched, cfg = load_checkpoint_file(path, use_ema=use_ema)
    if check is not None:
        check(cfg)
    dtype = compute_dtype(backend, dtype or cfg.get("dtype", "auto"))
    return Loaded(cast_model(model, dtype), sched, cfg, dtype, path, backend)
