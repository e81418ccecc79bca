"""From a checkpoint to images: the one loader, and ``DDPMPipeline``."""

from ddpm_ms.config import DEFAULTS
from ddpm_ms.factory import create_model, create_schedule
from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.device import set_jit_level


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
