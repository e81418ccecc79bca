"""What reading a step's loss on the host every step costs, against reading every ``log_every`` steps.

    python benchmarks/bench_host_reads.py --config configs/quick.yaml [--steps 10] [--repeats 7]

ddpm-train keeps each step's statistics (loss, applied, loss scale) on the device and reads
them every ``log_every`` steps (default 10); before, the loop read them after every step. Both
ways are timed on one Trainer, interleaved repeat by repeat (synthetic batches, no data
pipeline), and the median ms per step of each is printed with their ratio. On Ascend a read
stalls the launch queue; on CPU the graph runs synchronously, so little difference is expected.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
import numpy as np  # noqa: E402

from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.training.trainer import Trainer, read_stats  # noqa: E402
from ddpm_ms.utils.device import setup_device  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing (= log_every)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    backend = setup_device(cfg["device"], "graph", seed=0)
    trainer = Trainer(cfg, backend, steps_per_epoch=10 ** 6)
    shape = (cfg["batch_size"], cfg["channels"], cfg["image_size"], cfg["image_size"])
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    labels = np.zeros(cfg["batch_size"], np.int32) if cfg["num_classes"] else None
    read_stats(trainer.step_stats(x, labels))  # compile

    def every_step():
        for _ in range(args.steps):
            read_stats(trainer.step_stats(x, labels))

    def at_the_end():
        pending = [trainer.step_stats(x, labels) for _ in range(args.steps)]
        [read_stats(s) for s in pending]

    times = {"read every step": [], f"read every {args.steps} steps": []}
    for _ in range(args.repeats):
        for (name, fn) in zip(times, (every_step, at_the_end)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
        print(f"{name:22s} {v:7.1f} ms/step (min {min(times[name]):.1f}, max {max(times[name]):.1f})")
    a, b = med.values()
    print(f"ratio (every step / every {args.steps}): {a / b:.3f}  "
          f"[{args.config}, batch {cfg['batch_size']}, {backend}]")


if __name__ == "__main__":
    main()
