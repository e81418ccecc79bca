"""Training (Algorithm 1 of Ho et al. 2020) as a compiled MindSpore step plus a plain loop.

    python -m ddpm_ms.train --config configs/quick.yaml [--device CPU] [key=value ...]

The step (forward, backward, loss scaling, Adam, EMA) is one Cell compiled once; the loop
feeds it batches, logs the loss, writes checkpoints, sample grids, a GIF and a loss curve.
"""

import argparse
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from . import checkpoint as ckpt
from . import data, kernels
from .cli import run_cli
from .config import ARCH_KEYS, DEFAULTS, OBJECTIVE_KEYS, SCHEDULE_KEYS, load_config, save_config
from .device import compute_dtype, set_jit_level, setup_device
from .diffusion import loss_weights, p_losses
from .ema import EMA
from .errors import UserError, WriteError
from .fileio import npy_bytes, write_bytes
from .pipeline import cast_model, create_model, create_schedule, generate
from .rundir import CSV_FIELDS, LossLog, RunDir, resume_point  # noqa: F401 (CSV_FIELDS lived here)
from .visualize import plot_loss, save_gif, save_grid

MAX_NONFINITE_LOSSES = 10
# test hook: the rank named here sees an overflow in every step after the gradient reduction, as
# Ascend's per-card overflow status can (tests/test_distributed.py: both ranks must skip)
FAULT_OVERFLOW_RANK = "DDPM_MS_FAULT_OVERFLOW_RANK"


class TrainStep(nn.Cell):
    """One optimisation step: loss -> scaled grads -> unscale -> finite? -> Adam + EMA update.

    On overflow (non-finite grads) the update is skipped and the loss scale is reduced; Adam's
    step counter still advances, so the LR schedule stays on the training step. Data parallel,
    the finite flag is reduced over all ranks (an overflow on one skips the step on all).
    With ``scale_loss=False`` (float32 compute, see ``Trainer``) the loss and gradients are
    not scaled and the scaler is left untouched, but non-finite gradients still skip the update.
    With ``grad_clip`` the unscaled gradients are rescaled to a global L2 norm of at most
    ``grad_clip`` before the finiteness check and the update.
    Returns (loss, grads_finite).
    """

    def __init__(self, net, sched, optimizer, scaler, ema, loss_type, distributed=False, scale_loss=True,
                 grad_clip=None, prediction_type="eps", loss_weights=None, fault_overflow=False):
        super().__init__(auto_prefix=False)
        self.net = net
        self.sched = sched
        self.optimizer = optimizer
        self.scaler = scaler
        self.ema = ema
        self.loss_type = loss_type
        self.prediction_type = prediction_type  # eps, x0 or v: a Python constant of the graph
        self.loss_weights = loss_weights  # [T] Tensor (min-SNR) or None
        self.scale_loss = scale_loss  # a Python constant: the graph has no scaling ops without it
        self.grad_clip = None if grad_clip is None else float(grad_clip)  # global-norm clipping (None: off)
        self.grad_fn = ms.value_and_grad(self.forward, None, optimizer.parameters, has_aux=True)
        # data parallel: average the gradients over all devices before the update
        self.distributed = distributed
        self.grad_reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True) if distributed else None
        # the number of ranks whose gradients overflowed (a sum: every backend reduces sums)
        self.count_overflows = ops.AllReduce(ops.ReduceOp.SUM) if distributed else None
        self.fault_overflow = fault_overflow  # test hook, see FAULT_OVERFLOW_RANK
        self._no = Tensor(False)
        # one compiled CPU op checks every gradient (MindSpore's all_finite runs two per tensor)
        # (kept as the kernels namespace: a Primitive attribute set to None confuses Cell)
        self._fast = kernels.ops() if kernels.enabled() and all(
            p.dtype == ms.float32 for p in optimizer.parameters) else None

    def forward(self, x_start, t, noise, y=None):
        loss = p_losses(self.net, self.sched, x_start, t, noise, self.loss_type, y, self.prediction_type,
                        self.loss_weights)
        if self.scale_loss:
            return self.scaler.scale(loss), loss
        return loss, loss

    def construct(self, x_start, t, noise, y=None):
        (_, loss), grads = self.grad_fn(x_start, t, noise, y)
        if self.distributed:
            grads = self.grad_reducer(grads)
        if self.scale_loss:
            grads = self.scaler.unscale(grads)
        if self.grad_clip is not None:  # on the true gradients (after unscaling); NaN/inf stay non-finite
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        if self._fast is not None:
            finite = self._fast.all_finite(*grads)[0] > 0.5
        else:
            finite = ms.amp.all_finite(grads)
        if self.fault_overflow:
            finite = ops.logical_and(finite, self._no)
        if self.distributed:
            # on Ascend all_finite reads this card's own overflow status: every rank must take the same branch
            finite = self.count_overflows(ops.logical_not(finite).astype(ms.float32)) == 0
        if self.scale_loss:
            self.scaler.adjust(finite)
        if finite:
            self.optimizer(grads)
            self.ema()
        else:
            # a skipped update still uses up its step of the LR schedule (Adam reads the rate at global_step)
            ops.assign_add(self.optimizer.global_step, self.optimizer.global_step_increase_tensor)
        return loss, finite


def drop_labels(labels, p, null_class, rng):
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes the null class with prob. p."""
    drop = rng.random(labels.shape[0]) < p
    return np.where(drop, null_class, labels).astype(np.int32)


def learning_rates(lr, min_lr, total_steps, warmup_steps=0, schedule="cosine"):
    """Per-step learning rates: linear warm-up, then cosine decay (nn.cosine_decay_lr) or constant."""
    if schedule == "cosine" and total_steps > 1:
        rates = nn.cosine_decay_lr(min_lr, lr, total_steps, 1, total_steps)
    else:
        rates = [lr] * total_steps
    warm = min(warmup_steps, total_steps)
    return [lr * (i + 1) / warm if i < warm else r for i, r in enumerate(rates)]


def steps_and_epochs(epochs, max_steps, steps_per_epoch, notify=True):
    """(epochs, total steps) of a run: ``epochs`` full epochs, or exactly ``max_steps`` steps when set.

    max_steps below the epochs' steps ends the run early; above them, the run gets the epochs it
    needs and one notice line says so (not silently fewer steps than asked for).
    """
    total = epochs * steps_per_epoch
    if not max_steps:
        return epochs, total
    if max_steps > total:
        needed = -(-max_steps // steps_per_epoch)
        if notify:
            print(f"note: max_steps={max_steps} needs {needed} epochs of {steps_per_epoch} steps; training "
                  f"{needed} epochs instead of epochs={epochs} (the run still stops at step {max_steps})",
                  file=sys.stderr, flush=True)
        epochs = needed
    return epochs, max_steps


class Trainer:
    """Owns the model, optimizer, EMA and loss scaler of one run (its randomness is derived per step)."""

    def __init__(self, cfg, backend, steps_per_epoch, rank=0, world_size=1, scale_loss=None):
        """``scale_loss``: None (the default) scales the loss only for float16 compute."""
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.backend = backend
        self.dtype = compute_dtype(backend, cfg["dtype"])
        self.sched = create_schedule(cfg)
        self.steps_per_epoch = steps_per_epoch
        self.epochs, self.total_steps = steps_and_epochs(cfg["epochs"], cfg["max_steps"], steps_per_epoch,
                                                         notify=rank == 0)
        ms.set_seed(cfg["seed"])  # the same initial weights on every device and in every run
        self.model = create_model(cfg)
        self.lrs = learning_rates(cfg["lr"], cfg["min_lr"], self.total_steps, cfg["warmup_steps"],
                                  cfg["lr_schedule"])
        self.optimizer = nn.Adam(self.model.trainable_params(), learning_rate=self.lrs)
        self.scaler = ms.amp.DynamicLossScaler(cfg["loss_scale"], cfg["loss_scale_factor"],
                                               cfg["loss_scale_window"])
        # scaling guards float16 gradients against underflow; in float32 multiplying by a power
        # of two commutes with rounding (bar overflow/underflow at 2^+-126), so scaling would
        # give the same weights and only cost one Mul per gradient (README, "Devices and precision")
        self.scale_loss = self.dtype == ms.float16 if scale_loss is None else scale_loss
        self.ema = EMA(self.model.trainable_params(), cfg["ema_decay"], cfg["ema_warmup"])
        net = cast_model(self.model, self.dtype)
        self.step_cell = set_jit_level(
            TrainStep(net, self.sched, self.optimizer, self.scaler, self.ema, cfg["loss_type"],
                      distributed=world_size > 1, scale_loss=self.scale_loss, grad_clip=cfg.get("grad_clip"),
                      prediction_type=cfg["prediction_type"],
                      loss_weights=loss_weights(self.sched, cfg["prediction_type"], cfg["loss_weighting"],
                                                cfg["min_snr_gamma"]),
                      fault_overflow=os.environ.get(FAULT_OVERFLOW_RANK) == str(rank)), cfg["jit_level"])
        self.step = 0
        self._sample_model = None

    # ----- one step -----
    def train_step(self, x_start, labels=None):
        """One step on a batch (and its class labels, for a class-conditional model) -> (loss, applied)."""
        batch = x_start.shape[0]
        # timesteps and noise depend only on (seed, step, rank): nothing to save for an exact resume
        rng = np.random.default_rng([self.cfg["seed"], self.step, self.rank])
        t = rng.integers(0, self.sched.num_timesteps, size=(batch,)).astype(np.int32)
        noise = rng.standard_normal(x_start.shape, dtype=np.float32)
        if self.cfg["num_classes"] is None:
            loss, finite = self.step_cell(x_start, Tensor(t), Tensor(noise))
        else:
            y = drop_labels(np.asarray(labels.asnumpy() if isinstance(labels, Tensor) else labels),
                            self.cfg["label_dropout"], self.cfg["num_classes"], rng)
            loss, finite = self.step_cell(x_start, Tensor(t), Tensor(noise), Tensor(y))
        self.step += 1
        return float(loss.asnumpy()), bool(finite.asnumpy())

    def loss_scale(self):
        """The loss scale for the next step (after this step's adjustment); 1.0 when not scaling."""
        return float(self.scaler.scale_value.asnumpy()) if self.scale_loss else 1.0

    # ----- state for checkpoints -----
    def _param_names(self):
        return ckpt.named_params(self.model)

    def _opt_state(self):
        """Adam's moments, beta powers and step counter (the LR table is rebuilt from the config)."""
        model_ids = {id(p) for p in self.model.trainable_params()}
        return {name: p for name, p in self.optimizer.parameters_and_names()
                if id(p) not in model_ids and not name.startswith("learning_rate")}

    def _ema_state(self):
        names = [n for n, p in self.model.parameters_and_names() if p.requires_grad]
        return dict(zip(names, self.ema.shadow))

    def _misc_state(self):
        return {"scale_value": self.scaler.scale_value, "scale_counter": self.scaler.counter,
                "ema_num_updates": self.ema.num_updates}

    def state_groups(self):
        return {"model": self._param_names(), "ema": self._ema_state(), "opt": self._opt_state(),
                "state": self._misc_state()}

    def save(self, manager, epoch, step_in_epoch):
        meta = {"config": self.cfg, "step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "world_size": self.world_size, "backend": self.backend, "time": time.time()}
        return manager.save(self.step, self.state_groups(), meta)

    def restore(self, path, groups, meta):
        saved = {"config": dict(DEFAULTS, **meta["config"])}  # keys added to ddpm_ms after it was written
        ckpt.check_compatible(saved, self.cfg, ARCH_KEYS + SCHEDULE_KEYS + OBJECTIVE_KEYS, path)
        for group, params in self.state_groups().items():
            ckpt.assign(params, groups[group], f"{group} state of this run", path)
        self.step = meta["step"]
        return meta["epoch"], meta["step_in_epoch"]

    # ----- sampling with the EMA weights -----
    def sample_model(self):
        if self._sample_model is None:
            model = create_model(self.cfg)
            model.set_train(False)
            self._sample_params = ckpt.named_params(model)  # names before any float16 wrapping
            self._sample_model = set_jit_level(cast_model(model, self.dtype), self.cfg["jit_level"])
        for name, shadow in self._ema_state().items():
            self._sample_params[name].set_data(shadow.value().copy())
        return self._sample_model

    def generate(self, num, seed, gif_frames=0, progress=True):
        return generate(self.sample_model(), self.sched, self.cfg, num, seed=seed, dtype=self.dtype,
                        gif_frames=gif_frames, progress=progress)


def init_distributed():
    """(rank, world_size); under msrun (MS_WORKER_NUM > 1) this joins the data-parallel group."""
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x):
        return self.all_reduce(x)


def check_same_resume_step(step, rank, world_size, checkpoints):
    """Every rank must resume from the same step (``step``: this rank's, -1 without a checkpoint).

    Each rank sees its own filesystem: a node without the run's checkpoints would start at step 0
    and wait forever in the first gradient AllReduce. The steps are gathered by one AllReduce
    (one-hot rows, summed); if they differ every rank raises the same one-line UserError.
    """
    if world_size == 1:
        return
    rows = np.zeros(world_size, np.float32)  # float32 holds every step below 2^24 exactly
    rows[rank] = step + 1
    steps = [int(v) - 1 for v in _AllReduceSum()(Tensor(rows)).asnumpy()]
    if len(set(steps)) > 1:
        held = ", ".join(f"rank {r}: " + (f"step {s}" if s >= 0 else "no checkpoint") for r, s in enumerate(steps))
        raise UserError(f"--resume: the ranks found different checkpoints ({held}; this is rank {rank}, reading "
                        f"{checkpoints}); every node must see the same checkpoints directory (a shared "
                        "filesystem, or a copy of it on each node)")


def device_batch_size(cfg, world_size):
    """batch_size is the global batch; each of world_size devices takes an equal share."""
    if cfg["batch_size"] % world_size:
        raise UserError(f"batch_size {cfg['batch_size']} (the global batch) must be divisible by the number "
                        f"of devices {world_size}")
    return cfg["batch_size"] // world_size


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
    if main_process:
        run.prepare(resume, overwrite)
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

    def save(epoch, step_in_epoch):
        if main_process:
            trainer.save(manager, epoch, step_in_epoch)

    nonfinite = 0
    try:
        while trainer.step < trainer.total_steps:
            bar = tqdm(total=min(trainer.steps_per_epoch, trainer.total_steps - trainer.step + skip),
                       initial=skip, desc=f"epoch {epoch + 1}/{trainer.epochs}",
                       disable=not (progress and main_process), dynamic_ncols=True)
            t0, done = time.perf_counter(), 0
            for images, labels in _epoch_batches(make_dataset(cfg, data_dir, rank, world_size, epoch), skip):
                lr = trainer.lrs[min(trainer.step, trainer.total_steps - 1)]
                loss, finite = trainer.train_step(images, labels)
                ckpt.fault_point("step", trainer.step)
                if log:
                    log.write(trainer.step, epoch, f"{loss:.6g}", f"{lr:.6g}",
                              f"{trainer.loss_scale():g}", int(finite))
                nonfinite = 0 if np.isfinite(loss) else nonfinite + 1
                if nonfinite >= MAX_NONFINITE_LOSSES:
                    raise FloatingPointError(
                        f"the loss was NaN/inf for {nonfinite} steps in a row (step {trainer.step}); training "
                        f"stopped, the last good checkpoint is kept in {run.checkpoints}. Lower lr or use "
                        "dtype=float32")
                done += 1
                if cfg["save_every_steps"] and trainer.step % cfg["save_every_steps"] == 0:
                    save(epoch, skip + done)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}",
                                img_s=f"{done * cfg['batch_size'] / (time.perf_counter() - t0):.1f}")
                if trainer.step >= trainer.total_steps:
                    break
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
                if main_process:
                    save_grid(images, os.path.join(run.samples_dir, f"epoch_{epoch:03d}.png"),
                              nrow=cfg["num_classes"])
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
    parser.add_argument("--device", default=None, help="auto, Ascend, GPU or CPU (falls back if missing)")
    parser.add_argument("--mode", default=None, help="graph (default) or pynative (debugging)")
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
