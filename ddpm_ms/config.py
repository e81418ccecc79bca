"""Run configuration: flat YAML files in configs/, overridden by ``key=value`` arguments.

Every key has a default below; a YAML file sets some of them (a path, or the name of a
config shipped with the package: ``quick``), overrides (``key=value`` strings or a dict)
win over the file. Unknown keys and invalid values are errors (UserError) that say
which key is wrong and what it accepts. The resolved config is saved with every run
and inside every checkpoint.
"""

import difflib
import math
import os

import yaml

from ddpm_ms.utils import fileio
from ddpm_ms.utils import DEVICES, DTYPES, JIT_LEVELS, MODES
from ddpm_ms.utils.errors import UserError
from ddpm_ms.data import DATASETS
from ddpm_ms.diffusion import (
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    SAMPLERS,
    SCHEDULES,
    TIMESTEP_SAMPLINGS,
    VARIANCE_TYPES,
)
from ddpm_ms.models import ACTIVATIONS, ARCHS, BLOCK_TYPES, level_problem

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# name: default (the type of the default is the expected type; None means "optional")
DEFAULTS = {
    # --- data ---
    "dataset": "fashion_mnist",
    "data_dir": None,
    "image_size": 28,
    "channels": 1,
    "random_flip": True,
    "center_crop": True,   # folder datasets: centre crop after the shorter-side resize (false: random crop)
    "num_workers": 1,
    # --- model (U-Net) ---
    "arch": "tutorial",
    "dim": 28,
    "init_dim": None,
    "dim_mults": [1, 2, 4],
    "block_type": "convnext",
    "convnext_mult": 2,
    "resnet_groups": 8,
    "act": "gelu",
    "attn_levels": None,
    "mid_attn": True,
    "num_classes": None,
    "self_condition": False,  # the x_0 estimate as a 2nd input (Chen et al. 2022, Analog Bits): 2C input channels
    # --- model, arch: ddpm only (the paper's U-Net = diffusers UNet2DModel; widths dim * dim_mults,
    # GroupNorm groups resnet_groups, act in the residual blocks, attention at attn_levels) ---
    "layers_per_block": 2,
    "norm_eps": 1.0e-6,
    "dropout": 0.0,
    "attn_head_dim": None,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    # --- diffusion ---
    "timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "loss_type": "l2",
    # --- objective (docs/recipes.md): what the network predicts, loss weighting, terminal SNR ---
    "prediction_type": "eps",
    "loss_weighting": "none",
    "min_snr_gamma": 5.0,
    "zero_terminal_snr": False,
    # --- which noise levels a step trains on (docs/recipes.md): the density of t, and one t per stratum ---
    "timestep_sampling": "uniform",  # logit_normal (Esser et al. 2024), log_normal (Karras et al. 2022)
    "timestep_mean": None,  # in the density's own units: logit(t) for logit_normal (default 0), ln sigma (-1.2)
    "timestep_std": None,  # its spread in the same units (default 1; 1.2)
    "stratified_timesteps": False,  # one t in each of batch_size equal-probability strata (Kingma et al. 2021)
    # --- class conditioning (num_classes above; null class = num_classes) ---
    "label_dropout": 0.1,
    "guidance": 0.0,
    # --- optimisation ---
    "batch_size": 64,
    "grad_accum_steps": 1,  # N micro-batches of batch_size / N per optimizer step (same update, less memory)
    "epochs": 10,
    "max_steps": None,
    "train_minutes": None,  # a time budget: the run's steps fixed from the measured step time (max_steps wins if set)
    "lr": 0.0002,
    "min_lr": 1.0e-7,
    "lr_schedule": "cosine",
    "warmup_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "grad_clip": None,
    "loss_scale": 65536.0,
    "loss_scale_factor": 2,
    "loss_scale_window": 1000,
    "ema_decay": 0.999,
    "ema_warmup": True,
    "seed": 0,
    # --- outputs ---
    "output_dir": "runs/default",
    "save_every": 1,
    "save_every_steps": None,
    "log_every": 10,  # steps between host reads of the loss (loss.csv still has every step)
    "keep_checkpoints": 3,
    "sample_every": 1,
    "num_samples": 64,
    # --- watching a run (docs/training.md, "Watching a run") ---
    "log_tensorboard": "auto",  # event files in output_dir/tensorboard: auto = when tensorboardX is installed
    "eval_every_steps": 0,  # > 0: FD etc. of eval_num EMA samples every that many steps (quality.csv)
    "eval_num": 500,
    "keep_best": True,  # with eval_every_steps: keep the lowest-FD checkpoint as checkpoints/best.ckpt
    # --- sampling (epoch grids and the final samples / GIF) ---
    "sampler": "ddpm",
    "sample_steps": None,
    "eta": 0.0,
    "variance": "posterior",
    "s_churn": 0.0,  # sampler heun: Karras et al. 2022's S_churn (0: the deterministic Algorithm 1; > 0: Algorithm 2)
    "s_tmin": 0.0,  # churn only where S_tmin <= sigma <= S_tmax (sigma = sqrt((1 - abar) / abar))
    "s_tmax": None,  # (None: no upper bound)
    "s_noise": 1.0,  # S_noise: the std factor of the noise added by churn
    "clip_denoised": True,
    "gif_frames": 40,
    "gif_images": 16,  # the final GIF shows the first gif_images of the num_samples images
    # --- runtime ---
    "device": "auto",
    "mode": "graph",
    "dtype": "auto",
    "jit_level": "O0",
}

CHOICES = {
    "dataset": DATASETS,
    "arch": ARCHS,
    "block_type": BLOCK_TYPES,
    "act": ACTIVATIONS,
    "beta_schedule": SCHEDULES,
    "loss_type": LOSS_TYPES,
    "prediction_type": PREDICTION_TYPES,
    "loss_weighting": LOSS_WEIGHTINGS,
    "lr_schedule": ("cosine", "constant"),
    "sampler": SAMPLERS,
    "variance": VARIANCE_TYPES,
    "device": DEVICES,
    "mode": MODES,
    "dtype": DTYPES,
    "jit_level": JIT_LEVELS,
    "log_tensorboard": ("auto", True, False),
    "timestep_sampling": TIMESTEP_SAMPLINGS,
}

# numeric keys (every one is checked to be finite and of a sane magnitude)
INT_LIST_KEYS = ("dim_mults", "attn_levels")
FLOAT_KEYS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, float)) + (
    "grad_clip", "timestep_mean", "timestep_std", "train_minutes", "s_tmax")  # optional
INT_KEYS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)) + (
    "init_dim", "max_steps", "sample_steps", "num_classes", "save_every_steps", "attn_head_dim")  # optional
NUMERIC_KEYS = INT_KEYS + FLOAT_KEYS + INT_LIST_KEYS
MAX_INT = 2**31 - 1  # step counters, timesteps and labels are int32 tensors
MAX_FLOAT = 3.4028234663852886e38  # float32: learning rates, loss scales and betas become float32 tensors
MAX_SEED = 2**32 - 1  # MindSpore's seeds (ms.set_seed, the dataset's) are uint32

# keys whose value must be > 0 / >= 0
POSITIVE = ("image_size", "channels", "num_workers", "dim", "convnext_mult", "resnet_groups", "timesteps",
            "batch_size", "epochs", "lr", "loss_scale", "loss_scale_window", "save_every", "keep_checkpoints",
            "num_samples", "gif_frames", "save_every_steps", "init_dim", "max_steps", "sample_steps", "num_classes",
            "beta_start", "beta_end", "loss_scale_factor", "gif_images", "layers_per_block", "norm_eps",
            "attn_head_dim", "grad_clip", "min_snr_gamma", "grad_accum_steps", "log_every", "eval_num",
            "timestep_std", "train_minutes", "s_tmax", "s_noise")
NON_NEGATIVE = ("min_lr", "warmup_steps", "sample_every", "seed", "freq_shift", "eval_every_steps", "s_churn",
                "s_tmin")

# keys that define the network's architecture (stored in checkpoints, checked on load)
ARCH_KEYS = ("image_size", "channels", "dim", "init_dim", "dim_mults", "block_type", "convnext_mult",
             "resnet_groups", "act", "attn_levels", "mid_attn", "num_classes", "arch", "layers_per_block",
             "norm_eps", "attn_head_dim", "flip_sin_to_cos", "freq_shift", "downsample_padding",
             "self_condition")
SCHEDULE_KEYS = ("timesteps", "beta_schedule", "beta_start", "beta_end", "zero_terminal_snr")
# keys of the training objective (a resumed run must keep them)
OBJECTIVE_KEYS = ("loss_type", "prediction_type", "loss_weighting", "min_snr_gamma", "timestep_sampling",
                  "timestep_mean", "timestep_std")


def _unknown_key(key, where):
    close = difflib.get_close_matches(key, DEFAULTS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see configs/fashion_mnist.yaml for the keys"
    return UserError(f"unknown config key {key!r} in {where}{hint}")


def packaged_config_dir(package_dir=PACKAGE_DIR):
    """The directory of the configs shipped with ddpm_ms, or None.

    An installed package has them in ddpm_ms/configs/ (setup.py installs the top-level
    configs/*.yaml there); a checkout or an editable install has them in configs/ next to
    the package directory.
    """
    for path in (os.path.join(package_dir, "configs"), os.path.join(os.path.dirname(package_dir), "configs")):
        if os.path.isdir(path):
            return path
    return None


def packaged_configs():
    """Names of the packaged configs, sorted: ['fashion_mnist', ..., 'quick']."""
    folder = packaged_config_dir()
    if folder is None:
        return []
    return sorted(name[:-len(".yaml")] for name in os.listdir(folder) if name.endswith(".yaml"))


def find_config(path):
    """A config file: ``path`` if that file exists, else the packaged config it names (``quick``, ``quick.yaml``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    names = packaged_configs()
    available = ", ".join(names) or "none installed"
    if os.path.basename(path) != path:
        raise UserError(f"config file {path} does not exist; give a YAML file or a packaged config: {available}")
    name = path[:-len(".yaml")] if path.endswith(".yaml") else path
    if name not in names:
        raise UserError(f"config {path!r} is neither a file nor a packaged config; packaged configs: {available}")
    return os.path.join(packaged_config_dir(), name + ".yaml")


def load_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; pick one of configs/*.yaml")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value lines")
    return data


def _override_key(key):
    return str(key).strip().replace("-", "_")


def parse_overrides(items):
    """Overrides as a dict of config values.

    ['lr=1e-3', 'dim_mults=[1,2]'] -> {'lr': 0.001, 'dim_mults': [1, 2]} (values parsed as YAML);
    a dict ({'lr': 1e-3}) already holds typed values and is only copied. Keys may use '-' for '_'.
    """
    if isinstance(items, dict):
        return {_override_key(key): value for key, value in items.items()}
    if isinstance(items, str):
        items = [items]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value, e.g. lr=1e-4")
        try:
            out[_override_key(key)] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[_override_key(key)] = value
    return out


def _yaml_text(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(key, value):
    default = DEFAULTS[key]
    if value is None:
        return None
    if key in CHOICES and any(isinstance(c, bool) for c in CHOICES[key]):  # log_tensorboard: auto, true or false
        if value in CHOICES[key] and (isinstance(value, bool) or isinstance(value, str)):
            return value
        raise UserError(f"config key {key!r} must be one of: {', '.join(map(_yaml_text, CHOICES[key]))}, "
                        f"got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if key in INT_LIST_KEYS:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise UserError(f"config key {key!r} must be a list of integers, got {value!r}")
        if any(abs(v) > MAX_INT for v in value):
            raise UserError(f"config key {key!r} holds a value beyond {MAX_INT}, got {value!r}")
        return [int(v) for v in value]
    if key in FLOAT_KEYS:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
        if abs(value) > MAX_FLOAT:
            raise UserError(f"config key {key!r} = {value!r} is beyond the float32 range (+-{MAX_FLOAT:.4g})")
        return value
    if key in INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key!r} must be an integer, got {value!r}")
        limit = MAX_SEED if key == "seed" else MAX_INT
        if abs(value) > limit:
            raise UserError(f"config key {key!r} = {value} is too large (at most {limit})")
        return value
    if not isinstance(value, str):
        raise UserError(f"config key {key!r} must be a string, got {value!r}")
    return value


def validate(cfg):
    for key in DEFAULTS:
        if key in CHOICES and cfg[key] not in CHOICES[key]:
            choices = ", ".join(map(_yaml_text, CHOICES[key]))
            raise UserError(f"config key {key!r} = {cfg[key]!r} is not one of: {choices}")
    for key in POSITIVE:
        if cfg[key] is not None and cfg[key] <= 0:
            raise UserError(f"config key {key!r} must be > 0, got {cfg[key]!r}")
    for key in NON_NEGATIVE:
        if cfg[key] < 0:
            raise UserError(f"config key {key!r} must be >= 0, got {cfg[key]!r}")
    if not 0.0 <= cfg["eta"] <= 1.0:
        raise UserError(f"config key 'eta' must be in [0, 1], got {cfg['eta']}")
    if not 0.0 <= cfg["label_dropout"] <= 1.0:
        raise UserError(f"config key 'label_dropout' must be in [0, 1], got {cfg['label_dropout']}")
    if cfg["guidance"] < 0.0:
        raise UserError(f"config key 'guidance' must be >= 0, got {cfg['guidance']}")
    if cfg["num_workers"] > (os.cpu_count() or 1):
        raise UserError(f"config key 'num_workers' = {cfg['num_workers']} exceeds the {os.cpu_count()} CPUs of "
                        "this machine (MindSpore's limit for data workers)")
    if cfg["lr_schedule"] == "cosine" and cfg["min_lr"] >= cfg["lr"]:
        raise UserError(f"config key 'min_lr' ({cfg['min_lr']}) must be below lr ({cfg['lr']}) for "
                        "lr_schedule=cosine; lower min_lr or use lr_schedule=constant")
    if cfg["seed"] * 1000 + cfg["epochs"] - 1 > MAX_SEED:  # train.make_dataset: epoch e's data order uses seed*1000+e
        raise UserError(f"config key 'seed' = {cfg['seed']} is too large for {cfg['epochs']} epochs: each epoch's data "
                        f"order is seeded with seed * 1000 + epoch, which must stay below 2**32 (seed <= "
                        f"{max(0, (MAX_SEED + 1 - cfg['epochs']) // 1000)})")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= cfg[key] < 1.0:
            raise UserError(f"config key {key!r} must be in [0, 1), got {cfg[key]}")
    if cfg["s_tmax"] is not None and cfg["s_tmax"] < cfg["s_tmin"]:
        raise UserError(f"config key 's_tmax' ({cfg['s_tmax']}) must be >= s_tmin ({cfg['s_tmin']})")
    if cfg["timestep_sampling"] == "uniform" and (cfg["timestep_mean"] is not None or cfg["timestep_std"] is not None):
        raise UserError("timestep_mean / timestep_std set the density of timestep_sampling logit_normal or "
                        "log_normal; with timestep_sampling uniform they do nothing: drop them or pick a density")
    if not 0.0 <= cfg["ema_decay"] < 1.0:
        raise UserError(f"config key 'ema_decay' must be in [0, 1), got {cfg['ema_decay']}")
    if cfg["beta_schedule"] != "cosine" and not 0 < cfg["beta_start"] <= cfg["beta_end"] < 1:
        raise UserError("config keys beta_start/beta_end need 0 < beta_start <= beta_end < 1, "
                        f"got {cfg['beta_start']} / {cfg['beta_end']}")
    if cfg["zero_terminal_snr"] and cfg["prediction_type"] == "eps":
        raise UserError("zero_terminal_snr: true needs prediction_type v (or x0): at alpha_bar_T = 0 the noise "
                        "prediction says nothing about x_0 (Lin et al. 2024); set prediction_type=v")
    problem = level_problem(cfg["dim_mults"], cfg["attn_levels"])
    if problem and problem[0] == "dim_mults":
        raise UserError("config key 'dim_mults' must not be empty")
    factor = 2 ** (len(cfg["dim_mults"]) - 1)
    if cfg["image_size"] % factor:
        raise UserError(f"image_size {cfg['image_size']} must be divisible by {factor} "
                        f"(the U-Net downsamples {len(cfg['dim_mults']) - 1} times for dim_mults "
                        f"{cfg['dim_mults']}); change image_size or dim_mults")
    if problem:
        raise UserError(" ".join(problem))
    if cfg["sample_steps"] is not None and cfg["sample_steps"] > cfg["timesteps"]:
        raise UserError(f"sample_steps {cfg['sample_steps']} exceeds timesteps {cfg['timesteps']}")
    if cfg["arch"] == "ddpm":
        _validate_ddpm_arch(cfg)
    elif cfg["block_type"] == "resnet":
        widths = [cfg["dim"] * m for m in cfg["dim_mults"]] + [cfg["init_dim"] or cfg["dim"] // 3 * 2]
        if any(w % cfg["resnet_groups"] for w in widths):
            raise UserError(f"resnet_groups {cfg['resnet_groups']} must divide every U-Net width {widths}")
    return cfg


def _validate_ddpm_arch(cfg):
    """The keys of ``arch: ddpm`` (the paper's U-Net, see ddpm_ms/models/ddpm_unet.py) fit together."""
    widths = [cfg["dim"] * m for m in cfg["dim_mults"]]
    if any(w % cfg["resnet_groups"] for w in widths):
        raise UserError(f"resnet_groups {cfg['resnet_groups']} (the GroupNorm groups) must divide every U-Net "
                        f"width {widths} (dim * dim_mults)")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise UserError(f"config key 'dropout' must be in [0, 1), got {cfg['dropout']}")
    if cfg["downsample_padding"] not in (0, 1):
        raise UserError(f"config key 'downsample_padding' must be 0 or 1, got {cfg['downsample_padding']}")
    if cfg["dim"] % 2:
        raise UserError(f"arch ddpm needs an even dim (the sinusoidal time embedding width), got {cfg['dim']}")
    if cfg["freq_shift"] >= cfg["dim"] // 2:
        raise UserError(f"freq_shift {cfg['freq_shift']} must be below dim / 2 = {cfg['dim'] // 2}")
    head = cfg["attn_head_dim"]
    levels = range(len(widths)) if cfg["attn_levels"] is None else cfg["attn_levels"]
    attn_widths = [widths[i] for i in levels] + ([widths[-1]] if cfg["mid_attn"] else [])
    if head is not None and any(w % head for w in attn_widths):
        raise UserError(f"attn_head_dim {head} must divide the width of every level with attention {attn_widths}")


def resolve(values, where="config"):
    """Defaults updated with ``values`` (a dict), type-checked and validated."""
    cfg = dict(DEFAULTS)
    for key, value in values.items():
        if key not in DEFAULTS:
            raise _unknown_key(key, where)
        cfg[key] = _coerce(key, value)
    return validate(cfg)


def load_config(path=None, overrides=()):
    """YAML file (optional) + overrides -> validated config dict.

    ``path`` is a YAML file or the name of a packaged config (``quick`` or ``quick.yaml``, see
    :func:`packaged_configs`); a file that exists wins. ``overrides`` are ``key=value`` strings
    or a dict of typed values (``{"lr": 1e-3}``); both are checked like the file's keys.
    """
    path = find_config(path) if path else None
    values = load_yaml(path) if path else {}
    for key in values:
        if key not in DEFAULTS:
            raise _unknown_key(key, path)
    values.update(parse_overrides(overrides))
    return resolve(values, where=path or "overrides")


def saved_config(meta):
    """The config stored in a checkpoint's (or exported model's) ``meta``, completed by today's
    defaults for the keys added to ddpm_ms after it was written."""
    return dict(DEFAULTS, **meta["config"])


def save_config(cfg, path):
    fileio.write_text(path, yaml.safe_dump(dict(cfg), sort_keys=False), "config")
