"""Seconds to generate N images from a checkpoint, per sampler and step count.

    python benchmarks/bench_samplers.py --checkpoint runs/quick [--num 64] [--steps 10,20,50] [--repeats 3]

Each cell is the median wall time of ``--repeats`` runs of the whole sampling loop (graph
compiled beforehand), printed as a Markdown table. DDPM also gets its full chain ("full").
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
from ddpm_ms.pipeline import load  # noqa: E402
from ddpm_ms.diffusion.generation import generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--samplers", default="ddpm,ddim,dpm-solver++")
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--full", action="store_true", help="also time DDPM's full chain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    loaded = load(args.checkpoint, device=args.device)
    model, sched, cfg, dtype, backend = loaded.model, loaded.sched, loaded.cfg, loaded.dtype, loaded.backend
    generate(model, sched, cfg, args.num, sampler="ddim", steps=2, dtype=dtype, progress=False)  # compile

    cases = [(s, int(n)) for s in args.samplers.split(",") for n in args.steps.split(",")]
    if args.full:
        cases.append(("ddpm", sched.num_timesteps))
    print(f"{args.num} images, {backend}, checkpoint {args.checkpoint}, median of {args.repeats}")
    print("| sampler | steps | seconds | img-steps/s |")
    print("|---|---|---|---|")
    for sampler, steps in cases:
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            generate(model, sched, cfg, args.num, sampler=sampler, steps=steps, eta=0.0, seed=r, dtype=dtype,
                     progress=False)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        label = "full" if steps == sched.num_timesteps else steps
        print(f"| {sampler} | {label} | {sec:.2f} | {args.num * steps / sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
