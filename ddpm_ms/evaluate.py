"""Score samples offline: FD, IS, precision and recall in a dataset classifier's feature space.

    python -m ddpm_ms.evaluate --samples samples.npy [--dataset cifar10] [--out results.json]
    python -m ddpm_ms.evaluate --checkpoint runs/quick --num 10000 --sampler ddim --steps 50 [--out results.json]

``--samples`` takes an ``.npy`` of images [N, C, S, S] (or [N, S, S, C], or [N, S, S] for gray;
floats in [-1, 1] or uint8 0..255) or a folder of S x S PNGs, of the dataset's channels and size
(``--dataset``, default fashion_mnist: 1 x 28 x 28; cifar10: 3 x 32 x 32); ``--checkpoint`` (a run
directory or a ``.ckpt``) generates ``--num`` images first, for the dataset it was trained on.
The first run trains the dataset's evaluation classifier (a few minutes on a CPU) and caches it
(see :mod:`ddpm_ms.evaluation.classifier`); folder datasets have no classifier and cannot be scored. Prints one line

    FD x (floor y), IS z, precision p, recall r, smallest class share s%

where the floor is the FD of as many real train images against the test split, and with
``--out`` writes every number (and the floor's other metrics) as JSON.
"""

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from ddpm_ms.utils import fileio
from ddpm_ms.command_line import (add_checkpoint_arg, add_guidance_arg, add_runtime_args, add_sampler_args,
                                  add_weights_arg, check_sampling_args, run_cli)
from ddpm_ms.utils.errors import UserError


# --------------------------------------------------------------------------- reading samples

def _check_image_array(images, path, spec=None):
    """[N, C, S, S], [N, S, S, C] or (gray) [N, S, S] -> [N, C, S, S], checked against ``spec``
    (a DatasetSpec; default Fashion-MNIST's)."""
    from ddpm_ms.data import dataset_spec

    spec = spec or dataset_spec("fashion_mnist")
    c, side = spec.channels, spec.image_size
    if images.ndim == 4 and images.shape[1] in (1, 3):
        pass
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim == 3:
        images = images[:, None]
    else:
        raise UserError(f"{path}: expected images of shape [N, {c}, {side}, {side}] (or [N, {side}, {side}, {c}]), "
                        f"got {list(images.shape)}")
    if images.shape[1] != c:
        raise UserError(f"{path}: images have {images.shape[1]} channel(s) ({list(images.shape)}), expected "
                        f"[N, {c}, {side}, {side}] ({spec.title}; pick the dataset with --dataset)")
    if images.shape[2:] != (side, side):
        raise UserError(f"{path}: images are {images.shape[2]}x{images.shape[3]}, expected {side}x{side} "
                        f"({spec.title})")
    if images.shape[0] < 2:
        raise UserError(f"{path}: holds {images.shape[0]} image(s); at least 2 are needed (thousands for a "
                        "meaningful FD)")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"{path}: images must be floats in [-1, 1] or uint8, got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise UserError(f"{path}: images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise UserError(f"{path}: float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                        "(save uint8 0..255 images as uint8)")
    if lo >= 0.0:
        print(f"WARNING: {path}: no negative values; images in [0, 1] must be rescaled to [-1, 1] "
              "(x * 2 - 1) or the scores are wrong", file=sys.stderr, flush=True)
    return images.astype(np.float32)


def load_png_folder(path, spec=None):
    """All ``*.png`` in ``path`` (sorted), as uint8 [N, C, S, S] (gray or RGB as ``spec`` says)."""
    from ddpm_ms.data import dataset_spec

    spec = spec or dataset_spec("fashion_mnist")
    side = spec.image_size
    from PIL import Image, UnidentifiedImageError

    files = sorted(glob.glob(os.path.join(path, "*.png")) + glob.glob(os.path.join(path, "*.PNG")))
    if not files:
        raise UserError(f"{path}: folder holds no .png files")
    images = []
    for name in files:
        try:
            with Image.open(name) as img:
                if img.size != (side, side):
                    raise UserError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected {side}x{side} "
                                    "(one image per file; for a sample grid, evaluate the .npy written beside it)")
                array = np.asarray(img.convert("L" if spec.channels == 1 else "RGB"), dtype=np.uint8)
                images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{name}: cannot read the image ({e})") from None
    return np.stack(images)


def load_samples(path, spec=None):
    """Images from an ``.npy`` file or a folder of PNGs -> uint8 or float32 [N, C, S, S] (``spec``:
    the dataset's DatasetSpec, default Fashion-MNIST's)."""
    if os.path.isdir(path):
        return _check_image_array(load_png_folder(path, spec), path, spec)
    if not os.path.exists(path):
        raise UserError(f"--samples {path} does not exist; pass an .npy file or a folder of PNG images")
    if not path.endswith(".npy"):
        raise UserError(f"--samples {path}: expected an .npy file or a folder of PNG images")
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    return _check_image_array(np.asarray(images), path, spec)


# --------------------------------------------------------------------------- shared set-up

def classifier_record(info):
    return {k: info.get(k) for k in ("version", "key", "test_accuracy")}


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (``fileio``: a failure is a WriteError, exit code 4)."""
    return fileio.write_text(path, text, "results")


def write_json(path, payload):
    """Write ``payload`` as indented JSON, atomically."""
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def _check_out(path):
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory; pass a file name such as results.json")
    if os.path.exists(directory) and not os.access(directory, os.W_OK):
        raise UserError(f"--out {path}: directory {directory} is not writable")


# --------------------------------------------------------------------------- the command

def build_parser():
    parser = argparse.ArgumentParser(
        prog="ddpm-evaluate",
        description="FD / IS / precision / recall of samples in a dataset classifier's feature space.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help=".npy of images [N, C, S, S] (floats in [-1, 1] or uint8) or a folder of PNGs")
    add_checkpoint_arg(src, help="checkpoint file or run directory: generate --num samples first")
    parser.add_argument("--num", type=int, default=1000, help="images to generate (with --checkpoint)")
    add_sampler_args(parser, steps_help="sampling steps (default: the run's config)",
                     seed_help="sampling seed (and seed of the floor's real subset)")
    add_guidance_arg(parser, help="class-conditional models: classifier-free guidance weight (default: the run's "
                                  "config); classes cycle 0..9 so every class gets N/10 images")
    add_weights_arg(parser)
    parser.add_argument("--save-samples", default=None, help="also save the generated images to this .npy")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--k", type=int, default=3, help="neighbours of the precision/recall manifolds")
    parser.add_argument("--splits", type=int, default=10, help="splits of the Inception-like score")
    parser.add_argument("--dataset", default=None,
                        help="the real data to compare with: fashion_mnist (default for --samples), mnist or cifar10; "
                             "with --checkpoint, default: the dataset it was trained on")
    parser.add_argument("--data-dir", default=None, help="the dataset's files (default: located automatically)")
    parser.add_argument("--cache-dir", default=None, help="classifier cache (default: ~/.cache/ddpm_ms/classifier)")
    add_runtime_args(parser)
    return parser


def generate_samples(args):
    """Load the checkpoint (resolved by main) and generate ``args.num`` images -> (images, source record)."""
    from ddpm_ms.diffusion.generation import generate
    from ddpm_ms.pipeline import load

    loaded = load(args.checkpoint, use_ema=not args.no_ema, backend=args.backend, dtype=args.dtype,
                  check=lambda cfg: check_sampling_args(args, cfg["timesteps"], min_num=2))
    sched, cfg, dtype = loaded.sched, loaded.cfg, loaded.dtype
    sampler = args.sampler or cfg["sampler"]
    steps = args.steps if args.steps is not None else (cfg["sample_steps"] or sched.num_timesteps)
    t0 = time.time()
    extra = {} if args.guidance is None else {"guidance": args.guidance}
    images, _ = generate(loaded.model, sched, cfg, args.num, sampler=sampler, steps=steps,
                         eta=args.eta, seed=args.seed, dtype=dtype, progress=not args.no_progress, **extra)
    source = {"checkpoint": os.path.abspath(loaded.path), "sampler": sampler, "steps": steps,
              "eta": cfg["eta"] if args.eta is None else args.eta, "seed": args.seed, "ema": not args.no_ema,
              "timesteps": sched.num_timesteps, "sampling_seconds": time.time() - t0}
    if cfg.get("num_classes"):
        source["guidance"] = cfg.get("guidance") if args.guidance is None else args.guidance
    return images, source


def main(argv=None):
    args = build_parser().parse_args(argv)
    from ddpm_ms.utils.device import setup_device
    from ddpm_ms.evaluation.metrics import evaluate_images, prepare_reference, summary_line

    _check_out(args.out)
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.splits < 1:
        raise UserError(f"--splits must be >= 1, got {args.splits}")
    from ddpm_ms.evaluation.classifier import require_feature_network
    from ddpm_ms.data import DATASETS, dataset_spec

    if args.dataset is not None and args.dataset not in DATASETS:
        raise UserError(f"--dataset {args.dataset!r} is not one of: {', '.join(DATASETS)}")
    if args.samples is not None:
        dataset = args.dataset or "fashion_mnist"
        require_feature_network(dataset)
        images = load_samples(args.samples, dataset_spec(dataset))  # check the input before any expensive work
        source = {"samples": os.path.abspath(args.samples)}
    else:
        if args.num < 2:
            raise UserError(f"--num must be >= 2, got {args.num}")
        from ddpm_ms.utils import checkpoint as ckpt

        args.checkpoint = ckpt.resolve_checkpoint(args.checkpoint)
        dataset = args.dataset or ckpt.load(args.checkpoint)[1]["config"].get("dataset", "fashion_mnist")
        require_feature_network(dataset)
    args.backend = setup_device(args.device or "auto", args.mode or "graph")
    # the classifier first: a missing data set or a first-time training shows up before sampling
    net, info, reference = prepare_reference(args.data_dir, args.cache_dir, progress=not args.no_progress,
                                             dataset=dataset)
    if args.checkpoint is not None:
        images, source = generate_samples(args)
        if args.save_samples:
            np.save(args.save_samples, images)
    t0 = time.time()
    result = evaluate_images(images, net, reference, k=args.k, splits=args.splits, seed=args.seed)
    result["eval_seconds"] = time.time() - t0
    payload = {**result, "source": source, "classifier": classifier_record(info)}
    print(summary_line(result), flush=True)
    if args.out:
        write_json(args.out, payload)
        print(f"wrote {args.out}", file=sys.stderr)
    return payload


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
