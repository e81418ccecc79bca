"""Sample images from a checkpoint.

    python -m ddpm_ms.sample --checkpoint runs/quick [--best] [--sampler ddim --steps 50] [--num 64] [--out DIR]
    python -m ddpm_ms.sample --checkpoint runs/quick --sampler heun --steps 20 [--churn 30]   # EDM (Karras et al.)

Writes ``samples[_best]_<sampler>_<steps>_seed<S>[_churn<C>][_w<W>][_classgrid].png`` (a grid) and the ``.npy`` of
the same name ([N, C, H, W] float32 in [-1, 1]) into ``--out`` (default: the run directory).
"""

import argparse
import os
import sys

from ddpm_ms.command_line import add_sampling_args, class_request, load_for_args, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-sample", description="Sample images from a ddpm_ms checkpoint.")
    add_sampling_args(parser)
    parser.add_argument("--out", default=None, help="output directory (default: the run directory)")
    args = parser.parse_args(argv)
    from ddpm_ms.pipeline import DDPMPipeline
    from ddpm_ms.utils.fileio import npy_bytes, write_bytes
    from ddpm_ms.utils.visualize import save_grid

    source = args.checkpoint or args.exported  # before --best turns a run directory into its best checkpoint
    pipe = DDPMPipeline(load_for_args(args))
    cfg = pipe.cfg
    out = args.out or (source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
    os.makedirs(out, exist_ok=True)
    classes, num, nrow = class_request(args, cfg)
    images, _ = pipe.sample(num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                            classes=classes, guidance=args.guidance, progress=not args.no_progress)
    name = "samples_best" if args.best else "samples"
    sampler = args.sampler or cfg["sampler"]
    name += f"_{sampler}_{args.steps or cfg['sample_steps'] or 'full'}_seed{args.seed}"
    if sampler == "heun" and cfg["s_churn"] > 0:  # --churn or the config's (applied to cfg by load_for_args)
        name += f"_churn{cfg['s_churn']:g}"
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
