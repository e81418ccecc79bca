"""What dropout costs a resumed run: an uninterrupted run against one resumed from its middle checkpoint.

    python scripts/resume_with_dropout.py [--steps 20] [--dropout 0.1] [key=value ...]

Trains the paper's U-Net (a small one, on synthetic blobs) for --steps steps with dropout, then
a copy of the run resumed from the checkpoint at half way, and prints the losses after the
resume point and the relative difference of the final weights. With dropout 0 the two are
bit-identical (tests/test_train.py); with dropout the resumed run draws other masks (a dropout
op's random stream restarts when the process does, ddpm_ms.training.trainer.seed_dropout).
"""

import argparse
import csv
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import ddpm_ms  # noqa: E402,F401
import numpy as np  # noqa: E402

from ddpm_ms.utils import checkpoint as ckpt  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.train import train  # noqa: E402
from idx_files import write_blob_dataset  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "configs", "tiny.yaml")


def losses(run):
    with open(os.path.join(run, "loss.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    half = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_blob_dataset(os.path.join(tmp, "data"), n_train=64)
        common = ["arch=ddpm", "layers_per_block=1", "attn_levels=[1]", f"dropout={args.dropout}",
                  f"data_dir={data_dir}", f"max_steps={args.steps}", f"save_every_steps={half}", "save_every=1000",
                  "keep_checkpoints=5", "num_samples=2", "sample_every=0", "gif_frames=2",
                  "sample_steps=2"] + args.overrides
        run_a, run_b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        train(load_config(TINY, common + [f"output_dir={run_a}"]), progress=False)
        shutil.copytree(run_a, run_b)
        last = ckpt.CheckpointManager(os.path.join(run_b, "checkpoints")).list()[-1]
        os.remove(last)
        train(load_config(TINY, common + [f"output_dir={run_b}"]), resume=True, progress=False)
        la, lb = losses(run_a), losses(run_b)
        ga, _ = ckpt.load(os.path.join(run_a, "checkpoints", os.path.basename(last)))
        gb, _ = ckpt.load(last)
    print(f"dropout {args.dropout}, {args.steps} steps, resumed at step {half}")
    print(f"loss, steps {half + 1}-{args.steps}: uninterrupted mean {np.mean(la[half:]):.5f}, resumed "
          f"{np.mean(lb[half:]):.5f}; largest |difference| of one step {np.max(np.abs(np.subtract(la, lb))):.5f}")
    print(f"steps 1-{half} identical: {la[:half] == lb[:half]}")
    for group in ("model", "ema"):
        diff = sum(float(((ga[group][n].asnumpy() - gb[group][n].asnumpy()).astype(np.float64) ** 2).sum())
                   for n in ga[group])
        norm = sum(float((ga[group][n].asnumpy().astype(np.float64) ** 2).sum()) for n in ga[group])
        print(f"final {group} weights: relative L2 difference {np.sqrt(diff / norm):.2e}")


if __name__ == "__main__":
    main()
