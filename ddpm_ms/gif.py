"""Export the denoising process of a grid of images as a GIF (or a lossless WebP).

    python -m ddpm_ms.gif --checkpoint runs/quick --sampler ddim --steps 50 --frames 40 --out denoise.gif
    python -m ddpm_ms.gif --checkpoint runs/quick --source both --label --out denoise.webp

The frames are taken at an even pace of visible change, from the start noise to the sample
(ddpm_ms.diffusion.frames), and the last one is held for --hold seconds before the loop restarts.
By default (--source auto) a short chain (fewer than 3 states per frame, e.g. 20 DPM-Solver++ steps)
shows the model's predictions of x_0 after the start noise, a long one the states x_t.
"""

import argparse
import sys

from ddpm_ms.command_line import add_sampling_args, class_request, load_for_args, run_cli
from ddpm_ms.utils.errors import UserError
from ddpm_ms.diffusion.frames import SOURCES


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-gif", description="Denoising GIF from a ddpm_ms checkpoint.")
    add_sampling_args(parser)
    parser.set_defaults(num=16)
    parser.add_argument("--frames", type=int, default=40, help="number of frames")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds for the whole animation")
    parser.add_argument("--hold", type=float, default=1.0,
                        help="seconds the final frame stays before the loop restarts")
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="show x_t (x), the start noise then the model's prediction of x_0 (x0), both side by "
                             "side, or auto (default): x when the chain has at least 3 states per frame, else x0 "
                             "(x_t is noise for half of a short chain)")
    parser.add_argument("--label", action="store_true", help="print t and the noise level under each frame")
    parser.add_argument("--out", default="denoising.gif", help="output path: .gif, or .webp for a lossless WebP")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.duration <= 0 or args.hold < 0:
        raise UserError("--frames must be >= 1, --duration > 0 and --hold >= 0")
    if args.out.lower().endswith(".webp"):
        from PIL import features

        if not features.check("webp"):
            raise UserError("this Pillow has no WebP support; write a .gif instead")
    from ddpm_ms.pipeline import DDPMPipeline

    pipe = DDPMPipeline(load_for_args(args))
    classes, num, nrow = class_request(args, pipe.cfg)
    pipe.gif(args.out, num=num, seed=args.seed, frames=args.frames, source=args.source, sampler=args.sampler,
             steps=args.steps, eta=args.eta, classes=classes, guidance=args.guidance, nrow=nrow,
             duration=args.duration, hold=args.hold, label=args.label, progress=not args.no_progress)
    print(f"wrote {args.out} ({args.frames} frames)", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
