"""Turn your own images into plausible ones for a trained model (SDEdit, Meng et al. 2022).

    ddpm-img2img --checkpoint runs/fashion_mnist_20min --images sketches/ --strength 0.5 --out edited

--strength s in (0, 1]: the images are noised to timestep s*T (the matching step of a respaced
sampler) and denoised from there; s = 1 ignores the input (plain sampling), small s keeps it.
Writes ``img2img_grid.png`` (a row per image: input | results), ``img2img.npy`` and
``img2img/*.png`` into --out (``ddpm_ms.command_line.write_edits``).
"""

import argparse

import numpy as np

from ddpm_ms.command_line import add_editing_args, load_for_editing, parse_classes, run_cli, write_edits


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-img2img", description="Image-to-image with a trained model (SDEdit).")
    add_editing_args(parser)
    parser.add_argument("--strength", type=float, required=True,
                        help="how far to noise the input, in (0, 1]: 1 = plain sampling, near 0 = the input back")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.kind = "img2img"
    from ddpm_ms.diffusion.generation import img2img
    from ddpm_ms.utils.errors import UserError

    if not 0.0 < args.strength <= 1.0:  # before loading anything
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    loaded, images, names = load_for_editing(args)
    classes = None if args.classes is None else parse_classes(args.classes)
    results = img2img(loaded.model, loaded.sched, loaded.cfg, images.astype(np.float32) / 127.5 - 1.0,
                      args.strength, num_per_image=args.num_per_image, sampler=args.sampler, steps=args.steps,
                      eta=args.eta, seed=args.seed, dtype=loaded.dtype, classes=classes, guidance=args.guidance,
                      progress=not args.no_progress)
    write_edits(args.out, args.kind, images, None, results, names)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
