"""Export the denoising process of a grid of images as a GIF.

    python -m ddpm_ms.gif --checkpoint runs/quick --sampler ddim --steps 50 --frames 40 --out denoise.gif
"""

import argparse
import os
import sys

from .cli import run_cli
from .errors import UserError
from .sample import add_sampling_args, class_request, load_for_args


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-gif", description="Denoising GIF from a ddpm_ms checkpoint.")
    add_sampling_args(parser)
    parser.set_defaults(num=16)
    parser.add_argument("--frames", type=int, default=40, help="number of frames")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds for the whole animation")
    parser.add_argument("--source", choices=("x", "x0"), default="x",
                        help="show x_t (x) or the model's prediction of x_0 (x0) in each frame")
    parser.add_argument("--out", default="denoising.gif", help="output GIF path")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.duration <= 0:
        raise UserError("--frames must be >= 1 and --duration > 0")
    from .pipeline import generate
    from .visualize import save_gif

    model, sched, cfg, dtype = load_for_args(args)
    classes, num, nrow = class_request(args, cfg)
    _, frames = generate(model, sched, cfg, num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                         seed=args.seed, dtype=dtype, gif_frames=args.frames, gif_source=args.source,
                         progress=not args.no_progress, classes=classes, guidance=args.guidance)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_gif(frames, args.out, nrow=nrow, duration=args.duration)
    print(f"wrote {args.out} ({len(frames)} frames)", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
