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
from ddpm_ms.config import load_config, parse_overrides, save_config
from ddpm_ms.utils.device import setup_device
from ddpm_ms.training.budget import TimeBudget, left_text, probe_length
from ddpm_ms.training.distributed import (
    check_same_resume_step,
    device_batch_size,
    init_distributed,
    rank_zero_value,
    run_on_main,
)
from ddpm_ms.utils.errors import WriteError
from ddpm_ms.utils.fileio import npy_bytes, write_bytes
from ddpm_ms.training import quality
from ddpm_ms.training.monitor import Board, check_tensorboard, peak_rss_bytes, speed_line
from ddpm_ms.training.rundir import QUALITY_FIELDS, CsvLog, RunDir, resume_point
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


def write_final_outputs(trainer, run, cfg, progress, board, speed):
    plot_loss(run.loss_csv, run.loss_png)
    images, frames = trainer.generate(cfg["num_samples"], seed=cfg["seed"], gif_frames=cfg["gif_frames"],
                                      progress=progress)
    save_grid(images, run.samples_png, nrow=cfg["num_classes"])  # conditional: one column per class
    board.grid("samples", images, trainer.step, nrow=cfg["num_classes"])
    write_bytes(run.samples_npy, npy_bytes(images), "samples")
    save_gif([f[:cfg["gif_images"]] for f in frames], run.gif)
    best = f", best checkpoint {run.best_checkpoint}" if os.path.exists(run.best_checkpoint) else ""
    print(f"done: {trainer.step} steps ({speed}); wrote {run.samples_png}, {run.gif}, {run.loss_png}{best}",
          file=sys.stderr)


def train(cfg, resume=False, overwrite=False, progress=True, eval_explicit=True):
    """Train as configured; returns the RunDir with checkpoint, CSV, curve, grids and GIF.

    Under msrun every process trains on its shard and gradients are averaged; only rank 0
    writes files (checkpoints, logs, images) and holds the output directory's lock; all ranks
    sample the per-epoch grids and the evaluation samples (to stay in step).
    ``eval_explicit``: a dataset without a feature classifier with eval_every_steps > 0 is an error
    (True) or one notice (False: the setting came from a config file).
    A file that cannot be written (a full disk) stops the run with a WriteError that names the
    newest complete checkpoint to continue from with ``resume=True``.
    """
    run = RunDir(cfg["output_dir"])
    try:
        return _train(cfg, run, resume, overwrite, progress, eval_explicit)
    except WriteError as e:
        raise WriteError(f"{e}; {run.resume_hint(e)}", e.errno, e.filename, e.needed) from None
    finally:
        run.release()


def _train(cfg, run, resume, overwrite, progress, eval_explicit):
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

    cfg = dict(cfg)  # a time budget records its steps in it (max_steps)
    data_dir = data.locate(cfg["dataset"], cfg["data_dir"])
    data.check_config(data.dataset_spec(cfg["dataset"], data_dir, cfg["image_size"], cfg["channels"]), cfg)
    evaluating = quality.wanted(cfg, eval_explicit)
    tensorboard = check_tensorboard(cfg)
    backend = setup_device(cfg["device"], cfg["mode"], seed=cfg["seed"])
    rank, world_size = init_distributed()
    main_process = rank == 0
    # before anything is written: a batch larger than the data set is a user error
    steps_per_epoch = make_dataset(cfg, data_dir, rank, world_size, random_flip=False).get_dataset_size()
    run_on_main(lambda: run.prepare(resume, overwrite), rank, world_size)
    manager = ckpt.CheckpointManager(run.checkpoints, cfg["keep_checkpoints"])
    latest = resume_point(manager, resume, verbose=main_process)
    if resume:
        check_same_resume_step(latest[2]["step"] if latest else -1, rank, world_size, run.checkpoints)
    budget_steps = budgeted_steps(cfg, latest, main_process)
    if budget_steps:  # a time-budget run resumed after its steps were fixed: the same schedule, not a new measure
        cfg["max_steps"] = budget_steps
    trainer = Trainer(cfg, backend, steps_per_epoch, rank, world_size)

    epoch, skip = 0, 0
    if latest:
        epoch, skip = trainer.restore(*latest)
        print(f"resumed from {latest[0]} at step {trainer.step}", file=sys.stderr)
    log = qlog = monitor = None
    board = Board(run.tensorboard, False)
    skipped = 0  # steps whose update an overflow skipped (TensorBoard's train/skipped_steps)
    best_fd = float("inf")
    if main_process:
        save_config(cfg, run.config)
        resume_step = trainer.step if latest else None
        log = CsvLog(run.loss_csv, resume_step=resume_step)
        skipped = sum(r.get("finite") == "0" for r in log.rows)
        if evaluating:  # the classifier before the first step: a first-time training of it shows up now
            monitor = quality.QualityMonitor(cfg, data_dir, progress)
            qlog = CsvLog(run.quality_csv, resume_step, QUALITY_FIELDS, "quality log")
            best_fd = min([float(r["fd"]) for r in qlog.rows if r.get("fd")], default=best_fd)
        board = Board(run.tensorboard, tensorboard, purge_step=trainer.step + 1 if latest else None)
        with open(run.config) as f:
            board.text("config", f.read())
        print(f"training on {backend} ({trainer.dtype}) x {world_size}, {trainer.steps_per_epoch} steps/epoch, "
              + (f"a time budget of {cfg['train_minutes']:g} min (at most {trainer.total_steps} steps)"
                 if cfg["train_minutes"] and not cfg["max_steps"] else f"{trainer.total_steps} steps")
              + f", output in {run.root}", file=sys.stderr)

    # each step's statistics stay on the device until the next flush (every log_every steps, before
    # a save and at the end of an epoch): a host read per step would stall the device's launch queue
    pending = []  # (step, epoch, lr, STATS tensor)
    nonfinite = 0
    clock = {"last": time.perf_counter(), "train": 0.0, "steps": 0}  # training time, without sampling

    def speed():
        """The run's speed and memory so far (training time only), for the log lines."""
        return speed_line(clock["steps"] * cfg["batch_size"], clock["train"], clock["steps"], backend)

    def flush():
        """Read the pending steps, log them (rank 0) and stop on a diverged loss; returns the last loss or None."""
        nonlocal nonfinite, skipped
        rows = [(step, ep, lr, read_stats(stats)) for step, ep, lr, stats in pending]
        pending.clear()
        now = time.perf_counter()
        seconds, clock["last"] = now - clock["last"], now
        clock["train"] += seconds
        clock["steps"] += len(rows)
        stop = None
        for i, (step, _, _, stats) in enumerate(rows):  # the same averaged losses on every rank
            nonfinite = 0 if np.isfinite(stats["loss"]) else nonfinite + 1
            if nonfinite >= MAX_NONFINITE_LOSSES:
                stop, rows = step, rows[:i + 1]
                break
        run_on_main(lambda: [log.write(step, ep, f"{st['loss']:.6g}", f"{lr:.6g}", f"{st['loss_scale']:g}",
                                       int(st["applied"])) for step, ep, lr, st in rows], rank, world_size)
        for step, _, lr, st in rows:
            skipped += not st["applied"]
            board.scalars(step, {"loss": st["loss"], "lr": lr, "loss_scale": st["loss_scale"],
                                 "skipped_steps": skipped}, "train/")
        if rows:
            board.scalars(rows[-1][0], {"img_per_s": len(rows) * cfg["batch_size"] / max(seconds, 1e-9),
                                        "step_seconds": seconds / len(rows),
                                        "peak_rss_gib": peak_rss_bytes() / 2**30}, "speed/")
        if stop is not None:
            raise FloatingPointError(
                f"the loss was NaN/inf for {nonfinite} steps in a row (step {stop}); training stopped, the last "
                f"good checkpoint is kept in {run.checkpoints}. Lower lr or use dtype=float32")
        return rows[-1][3]["loss"] if rows else None

    def save(epoch, step_in_epoch):
        flush()
        board.flush()  # nothing logged up to a checkpoint is lost with the process
        run_on_main(lambda: trainer.save(manager, epoch, step_in_epoch), rank, world_size)

    def paused():
        """Sampling between steps: not training time."""
        clock["last"] = time.perf_counter()

    def evaluate(epoch, step_in_epoch):
        """Score eval_num EMA samples (rank 0; the other ranks sample too, to stay in step); keep the best."""
        nonlocal best_fd
        flush()
        if not main_process:
            trainer.generate(cfg["eval_num"], seed=cfg["seed"], progress=False)
            return paused()
        row, images = monitor.evaluate(trainer, trainer.step, epoch, progress)
        qlog.write(*("" if row[k] is None else f"{row[k]:.9g}" if isinstance(row[k], float) else row[k]
                     for k in QUALITY_FIELDS))
        board.scalars(trainer.step, {k: row[k] for k in QUALITY_FIELDS if k not in ("step", "epoch")}, "quality/")
        board.grid("eval_samples", images[:64], trainer.step, nrow=cfg["num_classes"])
        board.flush()
        note = ""
        if cfg["keep_best"] and row["fd"] < best_fd:
            best_fd = row["fd"]
            trainer.save_best(run.best_checkpoint, epoch, step_in_epoch, row)
            note = f"; best so far: {run.best_checkpoint}"
        tqdm.write(f"step {trainer.step}: FD {row['fd']:.3f} (floor {row['fd_floor']:.3f}), precision "
                   f"{row['precision']:.3f}, recall {row['recall']:.3f} on {row['num_samples']} samples "
                   f"({row['seconds']:.0f} s){note}", file=sys.stderr)
        paused()

    budget = None
    if cfg["train_minutes"] and not cfg["max_steps"]:
        budget = TimeBudget(cfg["train_minutes"], trainer.step, trainer.total_steps,
                            probe_steps=probe_length(cfg["warmup_steps"]))
    elif cfg["train_minutes"] and not budget_steps and main_process:
        print(f"note: max_steps={cfg['max_steps']} is set, so train_minutes={cfg['train_minutes']:g} is not used "
              "(max_steps wins)", file=sys.stderr)

    def decide_budget(total, bar):
        """The budget's probe is over: fix the run's steps (every rank takes rank 0's), record them."""
        total = budget.total = rank_zero_value(total, rank, world_size)
        trainer.set_total_steps(total)
        run_on_main(lambda: save_config(trainer.cfg, run.config), rank, world_size)
        bar.total = min(trainer.steps_per_epoch, bar.n + 1 + total - trainer.step)  # this step is not counted yet
        bar.set_description(f"epoch {epoch + 1}/{trainer.epochs}")
        if main_process:
            tqdm.write(budget.describe(), file=sys.stderr)

    try:
        if budget:
            budget.started()
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
                if budget and budget.wants_sync(trainer.step):
                    flush()  # waits for the device: the probe times finished steps
                    total = budget.observe(trainer.step)
                    if total is not None:
                        decide_budget(total, bar)
                if len(pending) >= cfg["log_every"]:
                    loss = flush()
                    left = budget.seconds_left(trainer.step) if budget else None
                    bar.set_postfix(loss=f"{loss:.4f}",
                                    img_s=f"{done * cfg['batch_size'] / (time.perf_counter() - t0):.1f}",
                                    **({"left": left_text(left)} if left is not None else {}))
                # evaluation before the checkpoint of the same step: a run killed in between resumes from
                # the previous checkpoint and evaluates this step again, so quality.csv has no gap
                if evaluating and (trainer.step % cfg["eval_every_steps"] == 0
                                   or trainer.step == trainer.total_steps):
                    evaluate(epoch, skip + done)
                if cfg["save_every_steps"] and trainer.step % cfg["save_every_steps"] == 0:
                    save(epoch, skip + done)
                bar.update(1)
                if trainer.step >= trainer.total_steps:
                    break
            flush()
            bar.close()
            if main_process:
                print(f"epoch {epoch + 1}/{trainer.epochs}: step {trainer.step}, {speed()}", file=sys.stderr,
                      flush=True)
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
                board.grid("samples", images, trainer.step, nrow=cfg["num_classes"])
                paused()
        if main_process:
            write_final_outputs(trainer, run, cfg, progress, board, speed())
    finally:
        for csv_log in (log, qlog):
            if csv_log:
                csv_log.close()
        board.close()
    return run


def budgeted_steps(cfg, latest, verbose):
    """The total steps a resumed time-budget run fixed (saved in its checkpoint's config), or None."""
    if not (cfg["train_minutes"] and not cfg["max_steps"] and latest):
        return None
    saved = latest[2]["config"]
    if not (saved.get("train_minutes") and saved.get("max_steps")):
        return None  # stopped before its steps were fixed: measured again
    if verbose:
        print(f"time budget: {saved['max_steps']} steps, as fixed by this run before it stopped", file=sys.stderr)
    return saved["max_steps"]


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
    train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
          eval_explicit="eval_every_steps" in parse_overrides(args.overrides))


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()
