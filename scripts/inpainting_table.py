"""Inpainting quality on the Fashion-MNIST test images: class agreement and FD per mask and sampler.

    python scripts/inpainting_table.py --checkpoint runs/fashion_mnist_20min [--num 300] [--out-dir DIR]

Takes ``num`` test images (a seeded choice), masks them (half-left, center, random:0.5), fills the
mask with each method and scores the results with the evaluation classifier
(ddpm_ms.evaluation.classifier): the share of filled images it puts in the original's class
(its accuracy on the unmasked originals is the ceiling) and the FD of the filled images against
the real test split (the unmasked originals' FD at the same N is the floor). Methods: the trivial
baselines (the mask filled with the training set's mean image; with a blur of the known part,
i.e. a normalised Gaussian blur, sigma 2 px, widened until it reaches every filled pixel) and
ddpm_ms's inpainting with DDPM, RePaint's resampling, DDIM and DPM-Solver++.
Writes inpainting.md and inpainting.json (default: the checkpoint's run directory).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import ddpm_ms  # noqa: E402,F401  (caps oneDNN before MindSpore loads)
from ddpm_ms.command_line import run_cli  # noqa: E402

MASKS = ("half-left", "center", "random:0.5")
# (label, sampler, steps, jump_length, jump_n_sample)
METHODS = (("DDPM, 50 steps", "ddpm", 50, 10, 1),
           ("DDPM + RePaint resampling (50 steps, jump 5, 4 samples: 185 calls)", "ddpm", 50, 5, 4),
           ("DDIM, 20 steps", "ddim", 20, 10, 1),
           ("DPM-Solver++, 20 steps", "dpm-solver++", 20, 10, 1))


def gaussian_kernel(sigma):
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def blur(images, sigma):
    """Separable Gaussian blur of [N, C, H, W] (zero padding)."""
    k = gaussian_kernel(sigma)
    radius = len(k) // 2

    def conv(row):  # "same" size even when the kernel is longer than the row
        return np.convolve(row, k, mode="full")[radius:radius + len(row)]
    return np.apply_along_axis(conv, 2, np.apply_along_axis(conv, 3, images))


def blur_fill(x, known):
    """The unknown pixels from a normalised blur of the known ones: blur(known * x) / blur(known), with the blur
    widened (sigma 2, 4, 8, ... px) until every unknown pixel has known neighbours."""
    known = np.broadcast_to(known, x.shape).astype(np.float64)
    out, todo, sigma = x.astype(np.float64).copy(), known < 1, 2.0
    while todo.any():
        weight = blur(known, sigma)
        value = blur(known * x, sigma) / np.maximum(weight, 1e-12)
        ready = todo & (weight > 1e-9)  # the kernel is cut at 3 sigma: zero means out of reach
        out[ready] = value[ready]
        todo &= ~ready
        sigma *= 2
    return out.astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--masks", default=",".join(MASKS))
    args = parser.parse_args(argv)

    from ddpm_ms import data
    from ddpm_ms.data.user_images import read_mask
    from ddpm_ms.diffusion.generation import inpaint
    from ddpm_ms.evaluation.classifier import extract, load_or_train_classifier
    from ddpm_ms.evaluation.metrics import RealReference, evaluate_images
    from ddpm_ms.pipeline import load
    from ddpm_ms.utils.visualize import save_grid

    loaded = load(args.checkpoint, device=args.device)
    model, sched, cfg, dtype = loaded.model, loaded.sched, loaded.cfg, loaded.dtype
    dataset = cfg.get("dataset", "fashion_mnist")
    data_dir = data.locate(dataset, cfg.get("data_dir"))
    classifier, info = load_or_train_classifier(data_dir=data_dir, dataset=dataset)
    reference = RealReference.build(classifier, data_dir, dataset)
    test_images, test_labels = data.load_split(dataset, data_dir, "test")
    train_images, _ = data.load_split(dataset, data_dir, "train")
    mean_image = train_images.astype(np.float64).mean(0) / 127.5 - 1.0
    pick = np.sort(np.random.default_rng(args.seed).choice(len(test_images), args.num, replace=False))
    x = test_images[pick].astype(np.float32) / 127.5 - 1.0
    labels = test_labels[pick]
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(loaded.path)).replace(os.sep + "checkpoints", "")
    os.makedirs(out_dir, exist_ok=True)

    def score(images):
        _, probs = extract(classifier, images)
        result = evaluate_images(images, classifier, reference, seed=args.seed)
        return {"agreement": float(np.mean(probs.argmax(1) == labels)), "fd": result["fd"]}

    rows = [{"mask": "none", "method": "the unmasked originals", **score(x), "seconds": 0.0}]
    print(rows[-1], flush=True)
    pictures = {}
    for mask in args.masks.split(","):
        fill = read_mask(mask, len(x), cfg["image_size"], seed=args.seed)
        known = ~np.broadcast_to(fill, x.shape)
        results = {"mean image": np.where(known, x, mean_image.astype(np.float32)),
                   "blur of the known part": np.where(known, x, blur_fill(x, known))}
        times = {"mean image": 0.0, "blur of the known part": 0.0}
        for label, sampler, steps, jump, n_sample in METHODS:
            t0 = time.perf_counter()
            results[label] = inpaint(model, sched, cfg, x, known, sampler=sampler, steps=steps, seed=args.seed,
                                     dtype=dtype, jump_length=jump, jump_n_sample=n_sample, progress=True)
            times[label] = time.perf_counter() - t0
        for label, images in results.items():
            rows.append({"mask": mask, "method": label, **score(images), "seconds": times[label]})
            print(rows[-1], flush=True)
        pictures[mask] = np.concatenate([x[:8, None], np.where(known, x, 0.0)[:8, None]]
                                        + [results[m][:8, None] for m in results], axis=1)
        save_grid(pictures[mask].transpose(1, 0, 2, 3, 4).reshape((-1,) + x.shape[1:]),
                  os.path.join(out_dir, f"inpainting_{mask.replace(':', '')}.png"), nrow=8)

    lines = [f"Inpainting {args.num} Fashion-MNIST test images with {os.path.abspath(loaded.path)} "
             f"(classifier test accuracy {info.get('test_accuracy', float('nan')):.2%}):", "",
             "| mask | method | class agreement | FD | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['method']} | {r['agreement']:.1%} | {r['fd']:.1f} | {r['seconds']:.0f} |")
    with open(os.path.join(out_dir, "inpainting.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "inpainting.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(loaded.path), "num": args.num, "seed": args.seed, "rows": rows}, f,
                  indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
