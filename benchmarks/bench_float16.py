"""float16 (the Ascend/GPU precision path) against float32 on CPU: the same steps, interleaved.

    python benchmarks/bench_float16.py [--config quick] [--steps 200] [--chunk 10] [--out runs/fp16_vs_fp32.csv]

Two Trainers of one config (same seed, so the same initial weights) take the same real
Fashion-MNIST batches and the same timesteps and noise (they depend on (seed, step, rank)), one
in float32, one with ``dtype=float16`` (float16 compute, GroupNorm in float32, dynamic loss
scaling). They alternate in chunks of ``--chunk`` steps, so both see the same machine load:
on a shared CPU only the ratio of their speeds means something. Prints the mean loss per
window of steps for both, the overflow skips of the float16 run and each one's img/s (the
first step, which compiles, excluded); ``--out`` writes the per-step losses as CSV.
"""

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import numpy as np  # noqa: E402

import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
from ddpm_ms import data  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.utils.device import setup_device  # noqa: E402
from ddpm_ms.train import _epoch_batches, make_dataset  # noqa: E402
from ddpm_ms.training.trainer import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quick")
    parser.add_argument("--steps", type=int, default=200, help="steps of each run (also its max_steps)")
    parser.add_argument("--chunk", type=int, default=10, help="steps of one run before switching to the other")
    parser.add_argument("--window", type=int, default=50, help="steps per mean-loss row")
    parser.add_argument("--out", default=None, help="CSV of step, loss32, loss16, finite16, scale16")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    setup_device("CPU", "graph")
    trainers = {}
    for dtype in ("float32", "float16"):
        cfg = load_config(args.config, [*args.overrides, f"max_steps={args.steps}", f"dtype={dtype}"])
        data_dir = data.locate(cfg["dataset"], cfg["data_dir"])
        steps_per_epoch = make_dataset(cfg, data_dir, 0, 1, random_flip=False).get_dataset_size()
        trainers[dtype] = Trainer(cfg, "CPU", steps_per_epoch)
    batches = _epoch_batches(make_dataset(cfg, data_dir, 0, 1), 0)
    rows, seconds, timed = [], {"float32": 0.0, "float16": 0.0}, {"float32": 0, "float16": 0}
    batch = cfg["batch_size"]
    done = 0
    while done < args.steps:
        chunk = [next(batches) for _ in range(min(args.chunk, args.steps - done))]
        results = {}
        for dtype, tr in trainers.items():
            results[dtype] = []
            for images, labels in chunk:
                t0 = time.perf_counter()
                results[dtype].append(tr.train_step(images, labels) + (tr.loss_scale(),))
                if tr.step > 1:  # the first step compiles the graph
                    seconds[dtype] += time.perf_counter() - t0
                    timed[dtype] += 1
        for i in range(len(chunk)):
            (l32, _, _), (l16, ok16, s16) = results["float32"][i], results["float16"][i]
            rows.append((done + i + 1, l32, l16, int(ok16), s16))
        done += len(chunk)
        print(f"step {done}: loss32 {rows[-1][1]:.4f} loss16 {rows[-1][2]:.4f} "
              f"img/s32 {timed['float32'] * batch / max(seconds['float32'], 1e-9):.1f} "
              f"img/s16 {timed['float16'] * batch / max(seconds['float16'], 1e-9):.1f}", file=sys.stderr, flush=True)

    arr = np.array(rows, dtype=np.float64)
    print("| steps | float32 mean loss | float16 mean loss | rel. diff |\n|---|---|---|---|")
    for lo in range(0, len(rows), args.window):
        part = arr[lo:lo + args.window]
        m32, m16 = part[:, 1].mean(), part[:, 2].mean()
        print(f"| {int(part[0, 0])}-{int(part[-1, 0])} | {m32:.4f} | {m16:.4f} | {(m16 - m32) / m32:+.1%} |")
    ips = {d: timed[d] * batch / seconds[d] for d in seconds}
    print(f"float16 overflow skips: {int((arr[:, 3] == 0).sum())}; final loss scale {rows[-1][4]:g}")
    print(f"img/s (interleaved, same load): float32 {ips['float32']:.1f}, float16 {ips['float16']:.1f} "
          f"(float16 = {ips['float16'] / ips['float32']:.2f}x float32)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("step", "loss32", "loss16", "finite16", "scale16"))
            writer.writerows(rows)


if __name__ == "__main__":
    main()
