"""Fill a masked region of your own images with a trained model (RePaint, Lugmayr et al. 2022).

    ddpm-inpaint --checkpoint runs/fashion_mnist_20min --images photos/ --mask center --out inpainted
    ddpm-inpaint --checkpoint RUN --images test.npy --mask half-left --sampler ddpm --steps 250 \\
                 --jump-length 10 --jump-n-sample 10 --num-per-image 4 --out DIR

--mask: a mask image of the model's size (white pixels are filled, black ones kept) or one of
half-left, half-right, half-top, half-bottom, center, box:x0,y0,x1,y1, random:p. The known pixels
come back unchanged (bit for bit) unless --harmonize. Writes ``inpaint_grid.png`` (a row per image:
input | masked | results), ``inpaint.npy`` and ``inpaint/*.png`` into --out
(``ddpm_ms.command_line.write_edits``).
"""

import argparse

import numpy as np

from ddpm_ms.command_line import add_editing_args, load_for_editing, parse_classes, run_cli, write_edits
from ddpm_ms.data.user_images import NAMED_MASKS


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-inpaint", description="Fill a masked region of images (RePaint).")
    add_editing_args(parser)
    parser.add_argument("--mask", required=True,
                        help=f"mask image (white = fill) or one of {', '.join(NAMED_MASKS)}")
    parser.add_argument("--jump-length", type=int, default=10,
                        help="RePaint resampling: steps per jump back up (default 10; ddpm sampler)")
    parser.add_argument("--jump-n-sample", type=int, default=1,
                        help="RePaint resampling: times each block of steps is denoised (default 1: no resampling; "
                             "the paper uses 10 with 250 steps; ddpm sampler only)")
    parser.add_argument("--harmonize", action="store_true",
                        help="return the model's final values for the known pixels too (smooths the seam, "
                             "changes the known pixels slightly)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.kind = "inpaint"
    from ddpm_ms.data.user_images import read_mask
    from ddpm_ms.diffusion.generation import inpaint

    loaded, images, names = load_for_editing(args)
    model, sched, cfg, dtype = loaded.model, loaded.sched, loaded.cfg, loaded.dtype
    fill = read_mask(args.mask, len(images), cfg["image_size"], seed=args.seed)
    x = images.astype(np.float32) / 127.5 - 1.0
    classes = None if args.classes is None else parse_classes(args.classes)
    results = inpaint(model, sched, cfg, x, ~fill, num_per_image=args.num_per_image, sampler=args.sampler,
                      steps=args.steps, eta=args.eta, seed=args.seed, dtype=dtype, jump_length=args.jump_length,
                      jump_n_sample=args.jump_n_sample, keep_known=not args.harmonize, classes=classes,
                      guidance=args.guidance, progress=not args.no_progress)
    masked = np.where(np.broadcast_to(fill, x.shape), np.float32(0.0), x)  # the filled region shown mid-gray
    write_edits(args.out, args.kind, images, masked, results, names)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
