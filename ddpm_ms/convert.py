"""Weights from and to HF diffusers: ``UNet2DModel`` folders <-> ddpm_ms checkpoints (``arch: ddpm``).

    ddpm-convert --from-diffusers DIR --out model.ckpt [key=value ...]
    ddpm-convert --to-diffusers model.ckpt --out DIR

``--from-diffusers`` reads a diffusers model folder (``config.json`` and
``diffusion_pytorch_model.safetensors``, read with ``safetensors.numpy`` without torch, or
``diffusion_pytorch_model.bin``, which needs torch) -- the folder itself, or a pipeline folder
with a ``unet/`` subfolder -- and the scheduler config next to it when there is one
(``scheduler_config.json`` or ``scheduler/scheduler_config.json``: betas, variance type, clipping).
It writes a normal ddpm_ms checkpoint (the weights as the ``model`` group, no optimizer state)
that ``ddpm-sample``, ``ddpm-gif`` and ``ddpm-evaluate`` use. Overrides (``key=value``) set other
config keys of the checkpoint (``sampler=ddim``, ``sample_steps=100``, ...).

``--to-diffusers`` writes ``config.json``, ``diffusion_pytorch_model.safetensors`` and
``scheduler_config.json`` (a ``DDPMScheduler``) for an ``arch: ddpm`` checkpoint (the EMA weights
when it has them, else the raw ones), loadable with ``UNet2DModel.from_pretrained(DIR)``. A
self-conditioned model (``self_condition: true``) has no diffusers counterpart: converting one either
way is a UserError.

Parameter names map one to one (``ddpm_ms.models.ddpm_unet.diffusers_key``); values are copied
unchanged (Dense/Linear and Conv weights have the same layouts in both frameworks).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.command_line import run_cli
from ddpm_ms.config import ARCH_KEYS, resolve, saved_config
from ddpm_ms.utils.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers scheduler beta_schedule -> ddpm_ms beta_schedule (same formulas: ddpm_ms/diffusion/gaussian/schedules.py)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
# diffusers DDPMScheduler variance_type -> ddpm_ms variance (the *_log forms are the same variances)
VARIANCE_TYPES = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "beta",
                  "fixed_large_log": "beta"}
# keys of pre-0.14 diffusers attention blocks (still found in some hub files) -> current names
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# UNet2DModel config entries that must have these values (anything else ddpm_ms does not implement)
_REQUIRED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
    "resnet_time_scale_shift": "default", "class_embed_type": None,
}
_DEFAULTS_2D = {  # UNet2DModel's own defaults, for config.json files written by old diffusers versions
    "in_channels": 3, "out_channels": 3, "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "attention_head_dim": 8, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "dropout": 0.0, "add_attention": True, "attn_norm_num_groups": None, "num_class_embeds": None,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "sample_size": None,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e})") from None


# ----------------------------------------------------------------------------- configs


def unet_config_to_cfg(config):
    """diffusers UNet2DModel config dict -> ddpm_ms architecture keys; one UserError lists what is unsupported."""
    c = dict(_DEFAULTS_2D, **{k: v for k, v in config.items() if not k.startswith("_")})
    problems = []
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        problems.append(f"_class_name {config.get('_class_name')!r} (only UNet2DModel)")
    for key, want in _REQUIRED.items():
        if c.get(key, want) != want:
            problems.append(f"{key}={c[key]!r} (ddpm_ms has {want!r})")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    bad = sorted({b for b in down if b not in _DOWN} | {b for b in up if b not in _UP})
    if bad:
        problems.append("block types " + ", ".join(bad) + " (ddpm_ms has " + ", ".join(list(_DOWN) + list(_UP)) + ")")
    widths = [int(w) for w in c["block_out_channels"]]
    if not bad:
        if len(down) != len(widths) or len(up) != len(widths):
            problems.append(f"{len(down)} down / {len(up)} up blocks for {len(widths)} block_out_channels")
        elif [_DOWN[b] for b in down] != [_UP[b] for b in reversed(up)]:
            problems.append(f"attention in down blocks {down} and up blocks {up} at different levels "
                            "(ddpm_ms puts it at the same levels both ways)")
    if c["act_fn"] not in ("silu", "swish", "gelu"):
        problems.append(f"act_fn={c['act_fn']!r} (ddpm_ms has silu, gelu)")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']} (ddpm_ms uses norm_num_groups)")
    if c["norm_num_groups"] is None:
        problems.append("norm_num_groups=None")
    if c["out_channels"] != c["in_channels"]:
        problems.append(f"out_channels={c['out_channels']} != in_channels={c['in_channels']} "
                        "(ddpm_ms predicts eps with the image's channels)")
    base = widths[0]
    if c.get("time_embedding_dim") not in (None, 4 * base):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']} (ddpm_ms uses 4 x block_out_channels[0])")
    if any(w % base for w in widths):
        problems.append(f"block_out_channels {widths} are not multiples of the first")
    if problems:
        raise UserError("unsupported diffusers UNet2DModel config: " + "; ".join(problems))
    num_classes = c["num_class_embeds"]
    if num_classes is not None and num_classes < 2:
        raise UserError(f"num_class_embeds={num_classes}: ddpm_ms needs at least one class plus the null class")
    size = c["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    cfg = {
        "arch": "ddpm", "dim": base, "dim_mults": [w // base for w in widths], "channels": int(c["in_channels"]),
        "layers_per_block": int(c["layers_per_block"]), "resnet_groups": int(c["norm_num_groups"]),
        "norm_eps": float(c["norm_eps"]), "dropout": float(c["dropout"]),
        "act": "gelu" if c["act_fn"] == "gelu" else "silu",
        "attn_levels": [i for i, b in enumerate(down) if _DOWN[b]], "mid_attn": bool(c["add_attention"]),
        "attn_head_dim": None if c["attention_head_dim"] is None else int(c["attention_head_dim"]),
        "flip_sin_to_cos": bool(c["flip_sin_to_cos"]), "freq_shift": int(c["freq_shift"]),
        "downsample_padding": int(c["downsample_padding"]),
        # diffusers has num_class_embeds rows; ddpm_ms reads the last one as the null class of CFG
        "num_classes": None if num_classes is None else int(num_classes) - 1,
    }
    if size:
        cfg["image_size"] = int(size)
    if cfg["attn_head_dim"] is not None and cfg["attn_head_dim"] >= max(widths):
        cfg["attn_head_dim"] = None  # one head either way; keeps the config valid for every width
    return cfg


def cfg_to_unet_config(cfg):
    """ddpm_ms config (arch: ddpm) -> diffusers UNet2DModel config dict."""
    widths = [cfg["dim"] * m for m in cfg["dim_mults"]]
    levels = range(len(widths)) if cfg["attn_levels"] is None else cfg["attn_levels"]
    down = ["AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(widths))]
    up = ["AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(widths)))]
    return {
        "_class_name": "UNet2DModel", "sample_size": cfg["image_size"], "in_channels": cfg["channels"],
        "out_channels": cfg["channels"], "center_input_sample": False, "time_embedding_type": "positional",
        "freq_shift": cfg["freq_shift"], "flip_sin_to_cos": cfg["flip_sin_to_cos"], "down_block_types": down,
        "up_block_types": up, "block_out_channels": widths, "layers_per_block": cfg["layers_per_block"],
        "mid_block_scale_factor": 1, "downsample_padding": cfg["downsample_padding"], "downsample_type": "conv",
        "upsample_type": "conv", "dropout": cfg["dropout"], "act_fn": cfg["act"],
        "attention_head_dim": cfg["attn_head_dim"], "norm_num_groups": cfg["resnet_groups"],
        "norm_eps": cfg["norm_eps"], "resnet_time_scale_shift": "default", "add_attention": cfg["mid_attn"],
        "num_class_embeds": None if cfg["num_classes"] is None else cfg["num_classes"] + 1,
    }


# diffusers' prediction_type names -> ddpm_ms's (its rescale_betas_zero_snr is Lin et al.'s Algorithm 1 too)
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def scheduler_config_to_cfg(config):
    """diffusers DDPMScheduler config -> ddpm_ms schedule / sampling keys; unsupported settings raise UserError."""
    problems = []
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        problems.append("trained_betas (explicit beta lists)")
    if schedule not in BETA_SCHEDULES:
        problems.append(f"beta_schedule={schedule!r} (ddpm_ms has {', '.join(BETA_SCHEDULES)})")
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        problems.append(f"variance_type={variance!r} (ddpm_ms has {', '.join(VARIANCE_TYPES)})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        problems.append(f"prediction_type={prediction!r} (ddpm_ms has {', '.join(PREDICTION_TYPES)})")
    if config.get("thresholding", False):
        problems.append(f"thresholding={config['thresholding']!r} (ddpm_ms has False)")
    if config.get("clip_sample", True) and float(config.get("clip_sample_range", 1.0)) != 1.0:
        problems.append(f"clip_sample_range={config['clip_sample_range']} (ddpm_ms clips to [-1, 1])")
    if problems:
        raise UserError("unsupported diffusers scheduler config: " + "; ".join(problems))
    return {"timesteps": int(config.get("num_train_timesteps", 1000)), "beta_schedule": BETA_SCHEDULES[schedule],
            "beta_start": float(config.get("beta_start", 1e-4)), "beta_end": float(config.get("beta_end", 0.02)),
            "variance": VARIANCE_TYPES[variance], "clip_denoised": bool(config.get("clip_sample", True)),
            "prediction_type": PREDICTION_TYPES[prediction],
            "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False))}


def cfg_to_scheduler_config(cfg):
    """ddpm_ms schedule / sampling keys -> a diffusers DDPMScheduler config dict."""
    schedules = {v: k for k, v in BETA_SCHEDULES.items()}
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": cfg["timesteps"],
            "beta_schedule": schedules[cfg["beta_schedule"]], "beta_start": cfg["beta_start"],
            "beta_end": cfg["beta_end"], "variance_type": "fixed_small" if cfg["variance"] == "posterior"
            else "fixed_large", "clip_sample": cfg["clip_denoised"], "clip_sample_range": 1.0,
            "prediction_type": {v: k for k, v in PREDICTION_TYPES.items()}[cfg.get("prediction_type", "eps")],
            "rescale_betas_zero_snr": bool(cfg.get("zero_terminal_snr", False)), "trained_betas": None}


# ----------------------------------------------------------------------------- weights


def read_state_dict(model_dir):
    """{key: float32 ndarray} from the folder's safetensors file (no torch needed) or .bin file (torch)."""
    st, bin_ = (os.path.join(model_dir, name) for name in WEIGHT_FILES)
    if os.path.isfile(st):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        return {k: np.asarray(v, np.float32) for k, v in load_file(st).items()}
    if os.path.isfile(bin_):
        try:
            import torch
        except ImportError:
            raise UserError(f"{bin_} is a PyTorch pickle and needs torch to read (pip install torch), or give "
                            "the folder a diffusion_pytorch_model.safetensors") from None
        state = torch.load(bin_, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state.items()}
    raise UserError(f"{model_dir} has neither {WEIGHT_FILES[0]} nor {WEIGHT_FILES[1]}")


def _current_key(key):
    """A diffusers key with legacy attention names (query/key/value/proj_attn) renamed."""
    head, _, last = key.rpartition(".")
    module, _, old = head.rpartition(".")
    if ".attentions." in key and old in LEGACY_ATTENTION:
        return f"{module}.{LEGACY_ATTENTION[old]}.{last}"
    return key


def to_ddpm_ms_weights(model, state):
    """diffusers state dict -> {ddpm_ms parameter name: ndarray} for ``model``; names and shapes must match."""
    from ddpm_ms.models.ddpm_unet import diffusers_key

    state = {_current_key(k): v for k, v in state.items()}
    params = dict(model.parameters_and_names())
    table = {diffusers_key(name): name for name in params}
    missing = sorted(set(table) - set(state))
    extra = sorted(set(state) - set(table))
    if missing or extra:
        raise UserError("the diffusers weights do not fit their config.json: "
                        + (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "")
                        + ("; " if missing and extra else "")
                        + (f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else ""))
    out = {}
    for key, name in table.items():
        value = state[key]
        if value.shape != tuple(params[name].shape):
            raise UserError(f"diffusers tensor {key} has shape {value.shape}, the config gives "
                            f"{tuple(params[name].shape)}")
        out[name] = value
    return out


def to_diffusers_weights(weights):
    """{ddpm_ms parameter name: ndarray} -> diffusers state dict (float32, contiguous)."""
    from ddpm_ms.models.ddpm_unet import diffusers_key

    return {diffusers_key(name): np.ascontiguousarray(value, np.float32) for name, value in weights.items()}


# ----------------------------------------------------------------------------- folders


def _model_folder(path):
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder; give a diffusers model folder (config.json + weights)")
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(folder, "config.json")) and \
                any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHT_FILES):
            return folder
    raise UserError(f"{path} holds no diffusers model (config.json with {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}, "
                    "here or in unet/)")


def _scheduler_file(root, model_dir):
    for path in (os.path.join(root, "scheduler_config.json"), os.path.join(root, "scheduler", "scheduler_config.json"),
                 os.path.join(os.path.dirname(os.path.abspath(model_dir)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(path):
            return path
    return None


def from_diffusers(src, out, overrides=None):
    """Convert the diffusers folder ``src`` into the ddpm_ms checkpoint ``out``; returns the resolved config."""
    from ddpm_ms.factory import create_model

    model_dir = _model_folder(src)
    values = unet_config_to_cfg(_read_json(os.path.join(model_dir, "config.json")))
    sched_path = _scheduler_file(src, model_dir)
    if sched_path:
        values.update(scheduler_config_to_cfg(_read_json(sched_path)))
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if k in ARCH_KEYS and k != "image_size" and k in values)
    if fixed:
        raise UserError(f"{', '.join(fixed)} come from {src}'s config.json (the weights fit that architecture); "
                        "overrides may set image_size and the non-architecture keys only")
    values.update(overrides)
    cfg = resolve(values, where=f"the config converted from {src}")
    if cfg["self_condition"]:
        raise UserError("self_condition: true does not fit a diffusers UNet2DModel (it has no self-conditioning "
                        "input); drop the override")
    state = read_state_dict(model_dir)
    weights = to_ddpm_ms_weights(create_model(cfg), state)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"config": cfg, "step": 0, "epoch": 0, "step_in_epoch": 0, "world_size": 1, "backend": "converted",
            "time": time.time(), "source": f"diffusers:{os.path.abspath(src)}",
            "scheduler_config": sched_path is not None}
    ckpt.save(out, {"model": weights}, meta)
    return cfg


def to_diffusers(src, out_dir):
    """Write the ``arch: ddpm`` checkpoint ``src`` as a diffusers folder ``out_dir``; returns the config."""
    path = ckpt.resolve_checkpoint(src)
    groups, meta = ckpt.load(path)
    cfg = saved_config(meta)
    if cfg["arch"] != "ddpm":
        raise UserError(f"{path} holds an arch {cfg['arch']!r} model; only arch: ddpm (the paper's U-Net) has a "
                        "diffusers counterpart")
    if cfg.get("self_condition"):
        raise UserError(f"{path} is a self-conditioned model (self_condition: true, 2 x {cfg['channels']} input "
                        "channels); diffusers' UNet2DModel has no self-conditioning input")
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError("writing .safetensors needs the safetensors package: pip install safetensors") from None
    weights = groups["ema"] or groups["model"]
    state = to_diffusers_weights({name: t.asnumpy() for name, t in weights.items()})
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, WEIGHT_FILES[0]), metadata={"format": "pt"})
    for name, config in (("config.json", cfg_to_unet_config(cfg)),
                         ("scheduler_config.json", cfg_to_scheduler_config(cfg))):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(config, f, indent=2)
    return cfg


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-convert", description=__doc__.splitlines()[0])
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="DIR", help="diffusers UNet2DModel (or pipeline) folder")
    way.add_argument("--to-diffusers", metavar="CKPT", help="ddpm_ms checkpoint (file or run directory)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (--from-diffusers) or folder "
                                                     "(--to-diffusers)")
    parser.add_argument("overrides", nargs="*", help="--from-diffusers: further config keys, key=value")
    return parser


def main(argv=None):
    from ddpm_ms.config import parse_overrides

    args = build_parser().parse_args(argv)
    if args.from_diffusers:
        if os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a folder; give the checkpoint file to write, "
                            f"e.g. {args.out}/model.ckpt")
        cfg = from_diffusers(args.from_diffusers, args.out, parse_overrides(args.overrides))
        print(f"wrote {args.out}: arch ddpm, {cfg['image_size']}x{cfg['image_size']}x{cfg['channels']}, "
              f"T={cfg['timesteps']} {cfg['beta_schedule']}", file=sys.stderr)
    else:
        if args.overrides:
            raise UserError("key=value overrides apply to --from-diffusers only")
        to_diffusers(args.to_diffusers, args.out)
        print(f"wrote {args.out} (config.json, {WEIGHT_FILES[0]}, scheduler_config.json)", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
