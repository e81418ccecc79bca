"""Sample images from a checkpoint.

    python -m ddpm_ms.sample --checkpoint runs/quick [--sampler ddim --steps 50] [--num 64] [--out DIR]

Writes ``samples_<sampler>_<steps>_seed<S>[_w<W>][_classgrid].png`` (a grid) and the ``.npy`` of the same
name ([N, C, H, W] float32 in [-1, 1]) into ``--out`` (default: the run directory).
"""

import argparse
import os
import sys

import numpy as np

from . import checkpoint as ckpt
from .cli import run_cli
from .config import SAMPLER_NAMES
from .errors import UserError


def resolve_checkpoint(path):
    """A checkpoint file, or a run directory (its newest checkpoint)."""
    if os.path.isdir(path):
        manager = ckpt.CheckpointManager(os.path.join(path, "checkpoints"))
        found = manager.list() or ckpt.CheckpointManager(path).list()
        if not found:
            raise UserError(f"{path} holds no checkpoints (expected {path}/checkpoints/ckpt_step*.ckpt)")
        return found[-1]
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass a .ckpt file or a run directory")
    return path


def add_sampling_args(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file or run directory")
    source.add_argument("--exported", metavar="FILE",
                        help="a .mindir or .onnx file written by ddpm-export (instead of --checkpoint)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="default: the run's config")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--classes", default=None,
                        help="class-conditional models: comma-separated labels, one per image, e.g. 7,7,9")
    parser.add_argument("--class-grid", type=int, default=None, metavar="N",
                        help="class-conditional models: N images of every class, one row per class")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance weight w >= 0 (default: the run's config)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--device", default="auto", help="auto, Ascend, GPU or CPU")
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"))
    parser.add_argument("--no-progress", action="store_true")


def parse_classes(text):
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, e.g. 7,7,9; got {text!r}") from None


def class_request(args, cfg):
    """(classes or None, number of images, images per grid row) from --classes / --class-grid / --num."""
    if args.class_grid is not None:
        if cfg["num_classes"] is None:
            raise UserError("--class-grid needs a class-conditional checkpoint (num_classes is not set in this one)")
        if args.class_grid < 1:
            raise UserError(f"--class-grid must be >= 1, got {args.class_grid}")
        classes = np.repeat(np.arange(cfg["num_classes"]), args.class_grid).tolist()
        return classes, len(classes), args.class_grid
    if args.classes is not None:
        classes = parse_classes(args.classes)
        return classes, len(classes), None
    return None, args.num, None


def check_sampling_args(args, cfg):
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.steps is not None and not 1 <= args.steps <= cfg["timesteps"]:
        raise UserError(f"--steps must be in 1..{cfg['timesteps']} (the model's timesteps), got {args.steps}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")


def load_for_args(args):
    """Device set-up and model loading shared by the sampling commands -> (model, sched, cfg, dtype)."""
    from .device import compute_dtype, setup_device
    from .pipeline import cast_model, load_model

    if args.exported:
        import mindspore as ms

        from .exported import load_exported

        if args.no_ema:
            raise UserError("--no-ema applies to checkpoints; an exported file holds the weights it was "
                            "exported with (ddpm-export --no-ema)")
        setup_device(args.device, args.mode)
        model = load_exported(args.exported)
        check_sampling_args(args, model.cfg)
        return model, model.sched, model.cfg, ms.float32
    path = resolve_checkpoint(args.checkpoint)
    backend = setup_device(args.device, args.mode)
    model, sched, cfg = load_model(path, use_ema=not args.no_ema)
    check_sampling_args(args, cfg)
    dtype = compute_dtype(backend, cfg.get("dtype", "auto"))
    return cast_model(model, dtype), sched, cfg, dtype


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-sample", description="Sample images from a ddpm_ms checkpoint.")
    add_sampling_args(parser)
    parser.add_argument("--out", default=None, help="output directory (default: the run directory)")
    args = parser.parse_args(argv)
    from .fileio import npy_bytes, write_bytes
    from .pipeline import generate
    from .visualize import save_grid

    model, sched, cfg, dtype = load_for_args(args)
    source = args.checkpoint or args.exported
    out = args.out or (source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
    os.makedirs(out, exist_ok=True)
    classes, num, nrow = class_request(args, cfg)
    images, _ = generate(model, sched, cfg, num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                         seed=args.seed, dtype=dtype, progress=not args.no_progress, classes=classes,
                         guidance=args.guidance)
    name = f"samples_{args.sampler or cfg['sampler']}_{args.steps or cfg['sample_steps'] or 'full'}_seed{args.seed}"
    if cfg["num_classes"] is not None:
        w = cfg["guidance"] if args.guidance is None else args.guidance
        name += f"_w{w:g}" + ("_classgrid" if args.class_grid else "")
    save_grid(images, os.path.join(out, name + ".png"), nrow=nrow)
    write_bytes(os.path.join(out, name + ".npy"), npy_bytes(images), "samples")
    print(f"wrote {os.path.join(out, name)}.png and .npy", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
