"""Plot a run's TensorBoard scalars (read back from its event files) into one PNG: what TensorBoard shows.

    python scripts/tensorboard_figure.py --run runs/quick_watched --out docs/images/tensorboard_quick.png

Panels: training loss (raw and smoothed), learning rate, img/s, and the in-training quality (FD with its
real-data floor, precision and recall) when the run evaluated (eval_every_steps). Needs the ``tensorboard``
package (``pip install "ddpm_ms[tensorboard]"``) for its event reader.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_ms.command_line import run_cli  # noqa: E402
from ddpm_ms.utils.errors import UserError  # noqa: E402


def read_scalars(log_dir):
    """{tag: (steps, values)} of every scalar in the event files of ``log_dir`` (purged steps removed)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UserError('reading event files needs tensorboard: pip install "ddpm_ms[tensorboard]"') from None
    if not os.path.isdir(log_dir):
        raise UserError(f"{log_dir} does not exist: train with log_tensorboard=true (and tensorboardX installed)")
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: tuple(np.array(v) for v in zip(*[(e.step, e.value) for e in acc.Scalars(tag)]))
            for tag in acc.Tags()["scalars"]}


def smooth(values, window=25):
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory (its tensorboard/ folder is read)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    scalars = read_scalars(os.path.join(args.run, "tensorboard"))
    if "train/loss" not in scalars:
        raise UserError(f"{args.run}/tensorboard holds no train/loss scalars")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = "quality/fd" in scalars
    fig, axes = plt.subplots(1, 4 if quality else 3, figsize=(16 if quality else 12, 3.2))
    steps, loss = scalars["train/loss"]
    axes[0].plot(steps, loss, color="0.75", lw=0.8, label="loss")
    axes[0].plot(steps, smooth(loss), color="C0", label="smoothed (25 steps)")
    axes[0].set_title("train/loss")
    axes[0].legend(fontsize=8)
    axes[1].plot(*scalars["train/lr"], color="C1")
    axes[1].set_title("train/lr")
    axes[2].plot(*scalars["speed/img_per_s"], color="C2", marker=".", lw=0.8)
    axes[2].set_title("speed/img_per_s")
    if quality:
        ax = axes[3]
        ax.plot(*scalars["quality/fd"], marker="o", color="C3", label="FD")
        ax.plot(*scalars["quality/fd_floor"], ls="--", color="0.5", label="FD of real images (floor)")
        ax.set_title("quality/fd (lower is better)")
        ax.set_yscale("log")
        twin = ax.twinx()
        for tag, color in (("quality/precision", "C4"), ("quality/recall", "C5")):
            twin.plot(*scalars[tag], marker=".", color=color, label=tag.split("/")[1])
        twin.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="best")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"TensorBoard scalars of {os.path.basename(os.path.abspath(args.run))} (read from its event files)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
