"""The README's editing picture: test images inpainted under three masks, and image-to-image at three strengths.

    python scripts/editing_figure.py --checkpoint runs/fashion_mnist_20min --out docs/images/editing_fmnist20min.png

Eight Fashion-MNIST test images (the first of eight classes); inpainting with DDPM, 50 steps, RePaint's
resampling (jump 5, 4 samples per block: 185 network calls); image-to-image with DDPM, 50 steps (of which
about s * 50 run). Uses the Python API (DDPMPipeline.inpaint / img2img), seed 0.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import ddpm_ms  # noqa: E402,F401  (caps oneDNN before MindSpore loads)
from ddpm_ms.command_line import run_cli  # noqa: E402

MASKS = (("left half", "half-left"), ("centre", "center"), ("random 50%", "random:0.5"))
STRENGTHS = (0.3, 0.5, 0.7)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from ddpm_ms import data
    from ddpm_ms.data.user_images import read_mask
    from ddpm_ms.pipeline import DDPMPipeline
    from ddpm_ms.utils.visualize import make_grid, new_figure

    pipe = DDPMPipeline.from_checkpoint(args.checkpoint, device=args.device)
    images, labels = data.load_split("fashion_mnist", data.locate("fashion_mnist"), "test")
    picks = [int(np.flatnonzero(labels == c)[0]) for c in (0, 1, 2, 3, 4, 7, 8, 9)]
    originals = images[picks].transpose(0, 2, 3, 1)  # uint8 [8, 28, 28, 1]
    rows = [("test images", originals)]
    start = time.perf_counter()
    for label, mask in MASKS:
        fill = read_mask(mask, len(originals), 28).transpose(0, 2, 3, 1)
        filled = pipe.inpaint(originals, mask, sampler="ddpm", steps=50, jump_length=5, jump_n_sample=4, seed=0)
        rows += [(f"{label} masked", np.where(fill, np.uint8(128), originals)), (f"{label} inpainted", filled)]
    for s in STRENGTHS:
        rows.append((f"image-to-image s={s}", pipe.img2img(originals, s, sampler="ddpm", steps=50, seed=0)))
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)

    fig = new_figure(figsize=(7.0, 0.74 * len(rows)))
    axes = fig.subplots(len(rows), 1)
    for ax, (label, pixels) in zip(axes, rows):
        ax.imshow(make_grid(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0, nrow=8), cmap="gray",
                  vmin=0, vmax=255)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.21, right=0.995, top=0.995, bottom=0.005, hspace=0.06)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
