"""Training: the loop of Algorithm 1 (Ho et al. 2020) around a compiled step, and its command line.

    python -m ddpm_ms.train --config configs/quick.yaml [--device CPU] [key=value ...]

The data path reads top-down: config -> dataset (:mod:`ddpm_ms.data`) -> model and train step
(:mod:`ddpm_ms.training.trainer`, :mod:`ddpm_ms.training.step`) -> checkpoints (:mod:`ddpm_ms.utils.checkpoint`) ->
samples, GIF and loss curve. This module feeds the step batches, logs the loss and writes the
run directory (:mod:`ddpm_ms.training.rundir`); data parallelism is :mod:`ddpm_ms.training.distributed`.
"""

import argparse
import functools
import os
import sys
import time

import numpy as np

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms import data
from ddpm_ms.command_line import add_device_args, run_cli
from ddpm_ms.config import load_config, save_config
from ddpm_ms.utils.device import setup_device
from ddpm_ms.training.distributed import check_same_resume_step, device_batch_size, init_distributed, run_on_main
from ddpm_ms.utils.errors import WriteError
from ddpm_ms.utils.fileio import npy_bytes, write_bytes
from ddpm_ms.training.rundir import LossLog, RunDir, resume_point
from ddpm_ms.training.trainer import Trainer, read_stats
from ddpm_ms.utils.visualize import plot_loss, save_gif, save_grid

MAX_NONFINITE_LOSSES = 10


def make_dataset(cfg, data_dir, rank, world_size, epoch=0, random_flip=None):
    """This device's shard of the training set; the order and flips depend only on (seed, epoch)."""
    return data.create_dataset(cfg["dataset"], data_dir, device_batch_size(cfg, world_size), usage="train",
                               image_size=cfg["image_size"], channels=cfg["channels"],
                               center_crop=cfg["center_crop"],
                               random_flip=cfg["random_flip"] if random_flip is None else random_flip,
                               num_parallel_workers=cfg["num_workers"], seed=cfg["seed"] * 1000 + epoch,
                               with_labels=cfg["num_classes"] is not None,
                               num_shards=world_size if world_size > 1 else None,
                               shard_id=rank if world_size > 1 else None)


def _epoch_batches(dataset, skip):
    """(images, labels or None) for each batch after the first ``skip``."""
    for i, row in enumerate(dataset.create_tuple_iterator(num_epochs=1)):
        if i >= skip:
            yield row[0], (row[1] if len(row) > 1 else None)


def write_final_outputs(trainer, run, cfg, progress):
    plot_loss(run.loss_csv, run.loss_png)
    images, frames = trainer.generate(cfg["num_samples"], seed=cfg["seed"], gif_frames=cfg["gif_frames"],
                                      progress=progress)
    save_grid(images, run.samples_png, nrow=cfg["num_classes"])  # conditional: one column per class
    write_bytes(run.samples_npy, npy_bytes(images), "samples")
    save_gif([f[:cfg["gif_images"]] for f in frames], run.gif)
    print(f"done: {trainer.step} steps; wrote {run.samples_png}, {run.gif}, {run.loss_png}", file=sys.stderr)


def train(cfg, resume=False, overwrite=False, progress=True):
    """Train as configured; returns the RunDir with checkpoint, CSV, curve, grids and GIF.

    Under msrun every process trains on its shard and gradients are averaged; only rank 0
    writes files (checkpoints, logs, images) and holds the output directory's lock; all ranks
    sample the per-epoch grids (to stay in step).
    A file that cannot be written (a full disk) stops the run with a WriteError that names the
    newest complete checkpoint to continue from with ``resume=True``.
    """
    run = RunDir(cfg["output_dir"])
    try:
        return _train(cfg, run, resume, overwrite, progress)
    except WriteError as e:
        raise WriteError(f"{e}; {run.resume_hint(e)}", e.errno, e.filename, e.needed) from None
    finally:
        run.release()


def _train(cfg, run, resume, overwrite, progress):
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

    data_dir = data.locate(cfg["dataset"], cfg["data_dir"])
    data.check_config(data.dataset_spec(cfg["dataset"], data_dir, cfg["image_size"], cfg["channels"]), cfg)
    backend = setup_device(cfg["device"], cfg["mode"], seed=cfg["seed"])
    rank, world_size = init_distributed()
    main_process = rank == 0
    # before anything is written: a batch larger than the data set is a user error
    steps_per_epoch = make_dataset(cfg, data_dir, rank, world_size, random_flip=False).get_dataset_size()
    run_on_main(lambda: run.prepare(resume, overwrite), rank, world_size)
    trainer = Trainer(cfg, backend, steps_per_epoch, rank, world_size)
    manager = ckpt.CheckpointManager(run.checkpoints, cfg["keep_checkpoints"])

    epoch, skip = 0, 0
    latest = resume_point(manager, resume, verbose=main_process)
    if resume:
        check_same_resume_step(latest[2]["step"] if latest else -1, rank, world_size, run.checkpoints)
    if latest:
        epoch, skip = trainer.restore(*latest)
        print(f"resumed from {latest[0]} at step {trainer.step}", file=sys.stderr)
    log = None
    if main_process:
        save_config(cfg, run.config)
        log = LossLog(run.loss_csv, resume_step=trainer.step if latest else None)
        print(f"training on {backend} ({trainer.dtype}) x {world_size}, {trainer.steps_per_epoch} steps/epoch, "
              f"{trainer.total_steps} steps, output in {run.root}", file=sys.stderr)

    # each step's statistics stay on the device until the next flush (every log_every steps, before
    # a save and at the end of an epoch): a host read per step would stall the device's launch queue
    pending = []  # (step, epoch, lr, STATS tensor)
    nonfinite = 0

    def flush():
        """Read the pending steps, log them (rank 0) and stop on a diverged loss; returns the last loss or None."""
        nonlocal nonfinite
        rows = [(step, ep, lr, read_stats(stats)) for step, ep, lr, stats in pending]
        pending.clear()
        stop = None
        for i, (step, _, _, stats) in enumerate(rows):  # the same averaged losses on every rank
            nonfinite = 0 if np.isfinite(stats["loss"]) else nonfinite + 1
            if nonfinite >= MAX_NONFINITE_LOSSES:
                stop, rows = step, rows[:i + 1]
                break
        run_on_main(lambda: [log.write(step, ep, f"{st['loss']:.6g}", f"{lr:.6g}", f"{st['loss_scale']:g}",
                                       int(st["applied"])) for step, ep, lr, st in rows], rank, world_size)
        if stop is not None:
            raise FloatingPointError(
                f"the loss was NaN/inf for {nonfinite} steps in a row (step {stop}); training stopped, the last "
                f"good checkpoint is kept in {run.checkpoints}. Lower lr or use dtype=float32")
        return rows[-1][3]["loss"] if rows else None

    def save(epoch, step_in_epoch):
        flush()
        run_on_main(lambda: trainer.save(manager, epoch, step_in_epoch), rank, world_size)

    try:
        while trainer.step < trainer.total_steps:
            bar = tqdm(total=min(trainer.steps_per_epoch, trainer.total_steps - trainer.step + skip),
                       initial=skip, desc=f"epoch {epoch + 1}/{trainer.epochs}",
                       disable=not (progress and main_process), dynamic_ncols=True)
            t0, done = time.perf_counter(), 0
            for images, labels in _epoch_batches(make_dataset(cfg, data_dir, rank, world_size, epoch), skip):
                lr = trainer.lrs[min(trainer.step, trainer.total_steps - 1)]
                pending.append((trainer.step + 1, epoch, lr, trainer.step_stats(images, labels)))
                ckpt.fault_point("step", trainer.step)
                done += 1
                if len(pending) >= cfg["log_every"]:
                    loss = flush()
                    bar.set_postfix(loss=f"{loss:.4f}",
                                    img_s=f"{done * cfg['batch_size'] / (time.perf_counter() - t0):.1f}")
                if cfg["save_every_steps"] and trainer.step % cfg["save_every_steps"] == 0:
                    save(epoch, skip + done)
                bar.update(1)
                if trainer.step >= trainer.total_steps:
                    break
            flush()
            bar.close()
            epoch_done = trainer.step % trainer.steps_per_epoch == 0
            epoch, skip = (epoch + 1, 0) if epoch_done else (epoch, skip + done)
            finished = trainer.step >= trainer.total_steps
            if finished or (epoch_done and epoch % cfg["save_every"] == 0):
                save(epoch, skip)
            if not finished and epoch_done and cfg["sample_every"] and epoch % cfg["sample_every"] == 0:
                # every rank samples the same grid (rank 0 saves it): no rank waits in the next
                # AllReduce while rank 0 samples, which could outlast the collective timeout
                images, _ = trainer.generate(cfg["num_samples"], seed=cfg["seed"], progress=progress and main_process)
                grid = os.path.join(run.samples_dir, f"epoch_{epoch:03d}.png")
                run_on_main(functools.partial(save_grid, images, grid, nrow=cfg["num_classes"]), rank, world_size)
    finally:
        if log:
            log.close()
    if main_process:
        write_final_outputs(trainer, run, cfg, progress)
    return run


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-train",
                                     description="Train a DDPM on Fashion-MNIST, MNIST, CIFAR-10 or an image folder.")
    parser.add_argument("--config", default=None,
                        help="YAML config file, or a packaged config's name (quick, fashion_mnist, ...)")
    add_device_args(parser)  # default: the config's device and mode
    parser.add_argument("--output-dir", default=None, help="where checkpoints, logs and images go")
    parser.add_argument("--data-dir", default=None,
                        help="the dataset's files (default: located automatically); dataset=folder: the image folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    for key in ("device", "mode", "output_dir", "data_dir"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
