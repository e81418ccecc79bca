"""Figures from a checkpoint: noise interpolation and sampler x step-count comparison.

    python -m ddpm_ms.figures interpolate --checkpoint runs/quick --pairs 4 --points 10 --out interp.png
    python -m ddpm_ms.figures compare --checkpoint runs/quick --samplers ddpm,ddim,dpm-solver++ \\
        --step-counts 5,10,20,50,100,full --num 8 --out steps.png
"""

import argparse
import os
import sys

import numpy as np

from ddpm_ms.command_line import run_cli
from ddpm_ms.utils.errors import UserError
from ddpm_ms.diffusion import SAMPLERS


def slerp(z0, z1, alpha):
    """Spherical interpolation between two noise maps (Shoemake 1985; used for DDIM, Song et al. Sec. 5.3).

    Follows the great circle between z0 and z1, so intermediate points keep the norm typical of
    Gaussian noise (a straight line would shrink it). Falls back to a straight line when the
    two are (anti)parallel.
    """
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    cos = np.dot(z0.ravel(), z1.ravel()) / (np.linalg.norm(z0) * np.linalg.norm(z1))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(theta) < 1e-6:
        return (1 - alpha) * z0 + alpha * z1
    return (np.sin((1 - alpha) * theta) * z0 + np.sin(alpha * theta) * z1) / np.sin(theta)


def interpolation_noise(shape, pairs, points, seed=0):
    """[pairs * points, C, H, W] float32 noise: each row slerps between two independent draws."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(pairs):
        z0, z1 = rng.standard_normal((2,) + tuple(shape))
        rows += [slerp(z0, z1, a) for a in np.linspace(0.0, 1.0, points)]
    return np.stack(rows).astype(np.float32)


def interpolate(model, sched, cfg, pairs=4, points=10, steps=50, seed=0, dtype=None, progress=True):
    """Decode slerped noise with deterministic DDIM (eta = 0) -> images [pairs * points, C, H, W]."""
    from ddpm_ms.diffusion.generation import generate

    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    x_T = interpolation_noise(shape, pairs, points, seed)
    kw = {} if dtype is None else {"dtype": dtype}
    images, _ = generate(model, sched, cfg, len(x_T), sampler="ddim", steps=steps, eta=0.0, seed=seed,
                         progress=progress, x_T=x_T, **kw)
    return images


def parse_steps(text, num_timesteps):
    """'5,10,full' -> [5, 10, T]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        n = num_timesteps if item == "full" else int(item) if item.isdigit() else None
        if n is None or not 1 <= n <= num_timesteps:
            raise UserError(f"--step-counts entries must be integers in 1..{num_timesteps} or 'full', got {item!r}")
        out.append(n)
    return out


def compare_steps(model, sched, cfg, samplers, step_counts, num=8, seed=0, dtype=None, progress=True):
    """{(sampler, steps): images [num, C, H, W]}, every entry from the same seed (the same x_T)."""
    from ddpm_ms.diffusion.generation import generate

    kw = {} if dtype is None else {"dtype": dtype}
    results = {}
    for sampler in samplers:
        for steps in step_counts:
            results[(sampler, steps)], _ = generate(model, sched, cfg, num, sampler=sampler, steps=steps, eta=0.0,
                                                    seed=seed, progress=progress, **kw)
    return results


def save_comparison(results, path, num_timesteps):
    """One figure: a row of images per (sampler, steps), labelled."""
    from ddpm_ms.utils.visualize import make_grid, new_figure

    keys = list(results)
    num = len(next(iter(results.values())))
    fig = new_figure(figsize=(0.6 * num + 1.6, 0.75 * len(keys) + 0.3))
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        sampler, steps = key
        ax.imshow(make_grid(results[key], nrow=num), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        label = "full" if steps == num_timesteps else str(steps)
        ax.set_ylabel(f"{sampler}\n{label}", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    from ddpm_ms.command_line import add_sampling_args, load_for_args
    from ddpm_ms.utils.visualize import save_grid

    parser = argparse.ArgumentParser(prog="ddpm-figures", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    interp = sub.add_parser("interpolate", help="slerp between noise maps, decoded with DDIM (eta=0)")
    add_sampling_args(interp)
    interp.add_argument("--pairs", type=int, default=4, help="rows (independent pairs of noise maps)")
    interp.add_argument("--points", type=int, default=10, help="images per row")
    interp.add_argument("--out", default="interpolation.png")
    comp = sub.add_parser("compare", help="the same seeds across samplers x step counts")
    add_sampling_args(comp)
    comp.add_argument("--samplers", default="ddpm,ddim,dpm-solver++")
    comp.add_argument("--step-counts", default="5,10,20,50,100,full")
    comp.add_argument("--out", default="step_comparison.png")
    comp.set_defaults(num=8)
    args = parser.parse_args(argv)
    if args.figure == "interpolate" and (args.pairs < 1 or args.points < 2):
        raise UserError("--pairs must be >= 1 and --points >= 2")
    model, sched, cfg, dtype = load_for_args(args)[:4]
    progress = not args.no_progress
    if args.figure == "interpolate":
        images = interpolate(model, sched, cfg, args.pairs, args.points, args.steps or 50, args.seed, dtype,
                             progress)
        save_grid(images, args.out, nrow=args.points)
    else:
        samplers = [s.strip() for s in args.samplers.split(",")]
        unknown = [s for s in samplers if s not in SAMPLERS]
        if unknown:
            raise UserError(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
        counts = parse_steps(args.step_counts, sched.num_timesteps)
        results = compare_steps(model, sched, cfg, samplers, counts, min(args.num, 16), args.seed, dtype, progress)
        save_comparison(results, args.out, sched.num_timesteps)
    print(f"wrote {args.out}", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
