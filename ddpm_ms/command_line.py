"""What the commands share: one-line errors with exit codes, the argument definitions, their checks.

Exit codes: 0 done; 2 bad input (config, data, checkpoint, paths, an output directory in use
or already holding a run: nothing was written); 3 training diverged (the loss stayed NaN/inf);
4 an output could not be written (a full disk, a quota, an I/O error: the line names the file
and the space it needed; partial files are removed, earlier checkpoints are intact, a training
run continues with --resume); 130 interrupted.

The sampling commands (ddpm-sample, ddpm-gif, ddpm-figures, ddpm-evaluate) take one set of
options, defined and checked here, and load their model with :func:`load_for_args`; the editing
commands (ddpm-inpaint, ddpm-img2img) add theirs (:func:`add_editing_args`) and write their
outputs with :func:`write_edits`. The heun sampler's churn flags (:func:`add_churn_args`: ddpm-sample,
ddpm-gif, ddpm-figures and the editing commands) replace the loaded config's keys, which the
sampling functions read.
"""

import os

import sys

import numpy as np

from ddpm_ms.diffusion import SAMPLERS
from ddpm_ms.utils import DEVICES, DTYPES, MODES
from ddpm_ms.utils.errors import UserError, WriteError

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 3, 4, 130


def run_cli(main, argv=None):
    """Run ``main(argv)``; a UserError prints ``error: <message>`` and exits 2 (see the module doc)."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_WRITE_FAILED)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


# --------------------------------------------------------------------------- definitions

def add_sampler_args(parser, steps_help="sampling steps (default: config)", seed_help=None):
    """--sampler, --steps, --eta, --seed."""
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run's config")
    parser.add_argument("--steps", type=int, default=None, help=steps_help)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


CHURN_FLAGS = (("churn", "s_churn"), ("s_tmin", "s_tmin"), ("s_tmax", "s_tmax"), ("s_noise", "s_noise"))


def add_churn_args(parser):
    """--churn, --s-tmin, --s-tmax, --s-noise: the heun sampler's churn (Karras et al. 2022, Algorithm 2); each
    given one replaces the config key (s_churn, s_tmin, s_tmax, s_noise) of the loaded model."""
    parser.add_argument("--churn", type=float, default=None, metavar="S_CHURN",
                        help="sampler heun: EDM's S_churn >= 0 (0: deterministic Heun; default: the run's config)")
    parser.add_argument("--s-tmin", type=float, default=None, help="heun churn only where sigma >= S_TMIN")
    parser.add_argument("--s-tmax", type=float, default=None,
                        help="heun churn only where sigma <= S_TMAX (inf: no bound)")
    parser.add_argument("--s-noise", type=float, default=None, help="heun churn: EDM's S_noise > 0 (std factor)")


def add_guidance_arg(parser, help="classifier-free guidance weight w >= 0 (default: the run's config)"):
    parser.add_argument("--guidance", type=float, default=None, help=help)


def add_weights_arg(parser):
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")


def add_checkpoint_arg(parser, required=False, help="checkpoint file or run directory (its newest checkpoint)"):
    """--checkpoint (``parser`` may be a mutually exclusive group)."""
    parser.add_argument("--checkpoint", required=required, help=help)


def add_device_args(parser, device=None):
    """--device and --mode, one definition for every command; ``device``: the default (None: the
    run's config for ddpm-train, auto for the sampling commands)."""
    parser.add_argument("--device", default=device, choices=DEVICES,
                        help=f"auto, Ascend, GPU or CPU (default: {device or 'auto'}; a missing one falls back "
                             "with a warning, except under msrun)")
    parser.add_argument("--mode", default=None, choices=MODES, help="graph (default) or pynative (debugging)")


def add_runtime_args(parser):
    """--device, --mode, --dtype, --no-progress."""
    add_device_args(parser)
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="compute dtype (default: the run's config; auto = float16 on Ascend/GPU, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_sampling_args(parser):
    """Everything ddpm-sample, ddpm-gif and ddpm-figures take: the model source, sampler, images, runtime."""
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_arg(source)
    source.add_argument("--exported", metavar="FILE",
                        help="a .mindir or .onnx file written by ddpm-export (instead of --checkpoint)")
    parser.add_argument("--best", action="store_true",
                        help="with --checkpoint RUN: the run's best checkpoint (lowest FD during training) instead "
                             "of its newest")
    add_sampler_args(parser)
    add_churn_args(parser)
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--classes", default=None,
                        help="class-conditional models: comma-separated labels, one per image, e.g. 7,7,9")
    parser.add_argument("--class-grid", type=int, default=None, metavar="N",
                        help="class-conditional models: N images of every class, one row per class")
    add_guidance_arg(parser)
    add_weights_arg(parser)
    add_runtime_args(parser)


def add_editing_args(parser):
    """What ddpm-inpaint and ddpm-img2img take besides their own options: the model, the images, the sampler,
    results per image, classes, runtime, --out."""
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_arg(source)
    source.add_argument("--exported", metavar="FILE",
                        help="a .mindir or .onnx file written by ddpm-export (its batch: images x --num-per-image)")
    parser.add_argument("--images", required=True, metavar="DIR|FILE",
                        help="a folder of images, one image file, or an .npy array of images; image files are "
                             "converted, resized (shorter side) and centre-cropped to the model's size")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (its outputs must not exist)")
    add_sampler_args(parser, steps_help="the sampler's steps (default: the run's config)",
                     seed_help="seed of the noise (and of random masks)")
    add_churn_args(parser)
    parser.add_argument("--num-per-image", type=int, default=1, metavar="K", help="results per image (default 1)")
    parser.add_argument("--classes", default=None,
                        help="class-conditional models: one label for all images or one per image, e.g. 7 or 7,7,9 "
                             "(default: the model's unconditional prediction)")
    add_guidance_arg(parser, help="with --classes: classifier-free guidance weight w >= 0 (default: the run's config)")
    add_weights_arg(parser)
    add_runtime_args(parser)


# --------------------------------------------------------------------------- checks

def check_sampling_args(args, timesteps, min_num=1):
    """The sampling options against the model's ``timesteps`` (UserError naming the option)."""
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if getattr(args, "num", min_num) < min_num:  # the editing commands take images instead of --num
        raise UserError(f"--num must be >= {min_num}, got {args.num}")
    if args.steps is not None and not 1 <= args.steps <= timesteps:
        raise UserError(f"--steps must be in 1..{timesteps} (the model's timesteps), got {args.steps}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")


def check_churn_args(args):
    """--churn / --s-tmin / --s-tmax / --s-noise on their own (UserError naming the flag); before any loading."""
    value = {flag: getattr(args, flag, None) for flag, _ in CHURN_FLAGS}
    if value["churn"] is not None and not 0 <= value["churn"] < float("inf"):
        raise UserError(f"--churn must be a finite number >= 0 (0: deterministic Heun), got {value['churn']}")
    if value["s_tmin"] is not None and not 0 <= value["s_tmin"] < float("inf"):
        raise UserError(f"--s-tmin must be a finite number >= 0, got {value['s_tmin']}")
    if value["s_tmax"] is not None and not value["s_tmax"] >= 0:
        raise UserError(f"--s-tmax must be >= 0 (inf: no bound), got {value['s_tmax']}")
    if value["s_noise"] is not None and not 0 < value["s_noise"] < float("inf"):
        raise UserError(f"--s-noise must be a finite number > 0, got {value['s_noise']}")


def apply_churn_args(args, cfg):
    """Put the churn flags given into ``cfg`` (the loaded model's config, which the sampling functions read:
    ``generation.sampler_options``); UserError if S_tmax ends up below S_tmin."""
    for flag, key in CHURN_FLAGS:
        if getattr(args, flag, None) is not None:
            cfg[key] = getattr(args, flag)
    if cfg.get("s_tmax") is not None and cfg["s_tmax"] < cfg.get("s_tmin", 0.0):
        raise UserError(f"S_tmax ({cfg['s_tmax']}) must be >= S_tmin ({cfg['s_tmin']}): check --s-tmin / --s-tmax "
                        "and the run's config")


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


def check_editing_args(args):
    if args.num_per_image < 1:
        raise UserError(f"--num-per-image must be >= 1, got {args.num_per_image}")
    if args.guidance is not None and args.classes is None:
        raise UserError("--guidance needs --classes when editing (without labels the model's unconditional "
                        "prediction is used)")


# --------------------------------------------------------------------------- loading

def load_for_args(args, min_num=1):
    """The model of --checkpoint or --exported (``ddpm_ms.pipeline.load``), checked against the options -> Loaded."""
    from ddpm_ms.pipeline import load

    from ddpm_ms.utils import checkpoint as ckpt

    check_churn_args(args)
    exported = getattr(args, "exported", None)
    if getattr(args, "best", False):
        if exported:
            raise UserError("--best picks a run's best checkpoint: use it with --checkpoint RUN, not --exported")
        args.checkpoint = ckpt.best_checkpoint(args.checkpoint)
    return load(exported or args.checkpoint, use_ema=not args.no_ema, device=args.device or "auto",
                mode=args.mode or "graph", dtype=args.dtype, exported=bool(exported),
                check=lambda cfg: _check_and_apply(args, cfg, min_num))


def _check_and_apply(args, cfg, min_num=1):
    check_sampling_args(args, cfg["timesteps"], min_num)
    apply_churn_args(args, cfg)


def load_for_editing(args):
    """(Loaded, uint8 images [N, C, S, S], their names) for the editing commands; checks first, writes nothing."""
    from ddpm_ms.data.user_images import read_images
    from ddpm_ms.pipeline import load

    check_editing_args(args)
    check_churn_args(args)
    outputs_free(args.out, args.kind)
    exported = getattr(args, "exported", None)
    loaded = load(exported or args.checkpoint, use_ema=not args.no_ema, device=args.device or "auto",
                  mode=args.mode or "graph", dtype=args.dtype, exported=bool(exported),
                  check=lambda cfg: _check_and_apply(args, cfg))
    images, names = read_images(args.images, loaded.cfg["channels"], loaded.cfg["image_size"])
    return loaded, images, names


# --------------------------------------------------------------------------- editing outputs

def edit_outputs(out, kind):
    """The files an editing command writes into ``out``: its grid, its .npy and its folder of PNGs."""
    return os.path.join(out, f"{kind}_grid.png"), os.path.join(out, f"{kind}.npy"), os.path.join(out, kind)


def outputs_free(out, kind):
    """UserError if ``out`` already holds an output of ``kind`` (nothing is overwritten)."""
    taken = [p for p in edit_outputs(out, kind) if os.path.exists(p)]
    if taken:
        raise UserError(f"{taken[0]} already exists; choose another --out (nothing is overwritten)")


def write_edits(out, kind, inputs, shown, results, names):
    """Write the results of an editing command: ``<kind>_grid.png`` (one row per image: the input, ``shown``
    (the masked input) if given, its K results), ``<kind>.npy`` (float32 [N * K, C, H, W] in [-1, 1], the
    K results of each image together) and ``<kind>/<name>_<k>.png``. inputs: uint8 [N, C, H, W]."""
    from ddpm_ms.utils.fileio import npy_bytes, write_bytes
    from ddpm_ms.utils.visualize import save_grid, save_image, to_uint8

    grid_path, npy_path, folder = edit_outputs(out, kind)
    n = len(inputs)
    k = len(results) // n
    as_float = inputs.astype(np.float32) / 127.5 - 1.0
    columns = [as_float[:, None]] + ([shown[:, None]] if shown is not None else []) + \
        [results.reshape((n, k) + results.shape[1:])]
    rows = np.concatenate(columns, axis=1)
    os.makedirs(folder, exist_ok=True)
    save_grid(rows.reshape((-1,) + rows.shape[2:]), grid_path, nrow=rows.shape[1])
    write_bytes(npy_path, npy_bytes(results.astype(np.float32)), kind)
    pixels = to_uint8(results)
    for i, name in enumerate(names):
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(name)[0])
        for j in range(k):
            save_image(pixels[i * k + j], os.path.join(folder, f"{i:04d}_{stem}_{j}.png"))
    print(f"wrote {grid_path}, {npy_path} and {n * k} PNGs in {folder}", file=sys.stderr)
