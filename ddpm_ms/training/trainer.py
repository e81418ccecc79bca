"""The state of one training run: model, optimizer, EMA, loss scaler and their checkpoint groups.

``Trainer`` builds the train step once, runs it on a batch with the per-step randomness
derived from (seed, step, rank), hands its state to :mod:`ddpm_ms.utils.checkpoint` and samples
with the EMA weights.
"""

import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.config import ARCH_KEYS, OBJECTIVE_KEYS, SCHEDULE_KEYS, saved_config
from ddpm_ms.utils.device import compute_dtype, set_jit_level
from ddpm_ms.diffusion.gaussian import loss_weights
from ddpm_ms.diffusion.timesteps import TimestepSampler
from ddpm_ms.training.ema import EMA
from ddpm_ms.training.lr_schedule import learning_rates, steps_and_epochs
from ddpm_ms.factory import cast_model, create_model, create_schedule
from ddpm_ms.diffusion.generation import generate
from ddpm_ms.training.step import (
    FAULT_OVERFLOW_RANK,
    STATS,
    AccumulateGrads,
    ApplyAccumulated,
    LossAndGrads,
    TrainStep,
    Update,
    drop_labels,
    grad_buffers,
    self_condition_mask,
)


def read_stats(stats):
    """The STATS tensor of a step as {name: value} (loss and scale floats, applied a bool)."""
    values = dict(zip(STATS, (float(v) for v in stats.asnumpy())))
    values["applied"] = values["applied"] > 0.5
    return values


def seed_dropout(model, seed, rank, step):
    """Seed each dropout layer of ``model`` from (seed, rank, step), before its graph is compiled.

    MindSpore's dropout ops take their seeds from the global seed when they are built, so every
    msrun rank would draw the same masks; and a resumed run would replay the masks of the run's
    first steps. A dropout op's stream cannot be moved to a step, so a resumed run with dropout
    is not bit-identical to an uninterrupted one (README, "Run directories and resume").
    """
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, nn.Dropout)]
    for i, cell in enumerate(cells):
        seed0, seed1 = (int(v) for v in np.random.default_rng([seed, rank, step, i]).integers(1, 2**31 - 1, 2))
        cell.dropout = ops.Dropout(1.0 - cell.p, seed0, seed1)


class Trainer:
    """Owns the model, optimizer, EMA and loss scaler of one run (its randomness is derived per step)."""

    def __init__(self, cfg, backend, steps_per_epoch, rank=0, world_size=1, scale_loss=None):
        """``scale_loss``: None (the default) scales the loss only for float16 compute."""
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.backend = backend
        self.dtype = compute_dtype(backend, cfg["dtype"])
        self.sched = create_schedule(cfg)
        self.timesteps = TimestepSampler.from_config(self.sched, cfg)  # the density of t (docs/recipes.md)
        self.steps_per_epoch = steps_per_epoch
        self.epochs, self.total_steps = steps_and_epochs(cfg["epochs"], cfg["max_steps"], steps_per_epoch,
                                                         notify=rank == 0)
        ms.set_seed(cfg["seed"])  # the same initial weights on every device and in every run
        self.model = create_model(cfg)
        self.lrs = learning_rates(cfg["lr"], cfg["min_lr"], self.total_steps, cfg["warmup_steps"],
                                  cfg["lr_schedule"])
        self.optimizer = nn.Adam(self.model.trainable_params(), learning_rate=self.lrs, beta1=cfg["adam_beta1"],
                                 beta2=cfg["adam_beta2"])
        self.scaler = ms.amp.DynamicLossScaler(cfg["loss_scale"], cfg["loss_scale_factor"],
                                               cfg["loss_scale_window"])
        # scaling guards float16 gradients against underflow; in float32 multiplying by a power
        # of two commutes with rounding (bar overflow/underflow at 2^+-126), so scaling would
        # give the same weights and only cost one Mul per gradient (README, "Devices and precision")
        self.scale_loss = self.dtype == ms.float16 if scale_loss is None else scale_loss
        self.ema = EMA(self.model.trainable_params(), cfg["ema_decay"], cfg["ema_warmup"])
        net = cast_model(self.model, self.dtype)
        weights = loss_weights(self.sched, cfg["prediction_type"], cfg["loss_weighting"], cfg["min_snr_gamma"])
        loss_and_grads = LossAndGrads(net, self.sched, self.optimizer.parameters, self.scaler, cfg["loss_type"],
                                      self.scale_loss, cfg["prediction_type"], weights)
        update = Update(self.optimizer, self.scaler, self.ema, self.scale_loss, cfg.get("grad_clip"), world_size,
                        fault_overflow=os.environ.get(FAULT_OVERFLOW_RANK) == str(rank))
        self.accum_steps = cfg["grad_accum_steps"]
        if self.accum_steps == 1:
            self.step_cell = TrainStep(loss_and_grads, update)
            step_cells = [self.step_cell]
        else:  # N micro-batches: one compiled forward/backward that accumulates, one compiled update
            self.grad_buffers = grad_buffers(self.optimizer)
            self.micro_cell = AccumulateGrads(loss_and_grads, self.grad_buffers, self.accum_steps)
            self.apply_cell = ApplyAccumulated(update, self.grad_buffers)
            step_cells = [self.micro_cell, self.apply_cell]
        for cell in step_cells:
            # training mode (dropout on) before the first call: a compiled graph keeps the mode it was built in
            cell.set_train(True)
            set_jit_level(cell, cfg["jit_level"])
        self.step = 0
        seed_dropout(self.model, cfg["seed"], rank, self.step)
        self._sample_model = None

    def set_total_steps(self, total):
        """Fix the run's length at ``total`` steps (a time budget decided, :mod:`ddpm_ms.training.budget`).

        The LR table keeps its length (the provisional cap; a compiled graph keeps its buffers, so
        it is overwritten in place): entries up to ``total`` become the schedule of a ``total``-step
        run, the rest (never used) its last rate. ``max_steps`` in the config (saved in every
        checkpoint) records the number.
        """
        cap = len(self.lrs)
        if not self.step <= total <= cap:
            raise ValueError(f"total steps {total} must be in [{self.step}, {cap}]")
        rates = learning_rates(self.cfg["lr"], self.cfg["min_lr"], total, self.cfg["warmup_steps"],
                               self.cfg["lr_schedule"])
        table = rates + [rates[-1]] * (cap - total)
        ops.assign(self.optimizer.learning_rate.learning_rate, Tensor(np.array(table, np.float32)))
        self.lrs, self.total_steps = table, total
        self.epochs = -(-total // self.steps_per_epoch)
        self.cfg["max_steps"] = total

    # ----- one step -----
    def step_stats(self, x_start, labels=None):
        """One optimisation step on this device's batch -> the STATS tensor, left on the device.

        The timesteps, noise, dropped labels and self-conditioning mask depend only on (seed, step,
        rank), drawn in that order (the mask last, and only with self_condition): nothing to save
        for an exact resume. With grad_accum_steps N the batch is cut into N equal micro-batches
        (the same timesteps and noise as one batch), whose gradients are averaged before the update.
        """
        batch = x_start.shape[0]
        rng = np.random.default_rng([self.cfg["seed"], self.step, self.rank])
        t = self.timesteps.draw(rng, batch)
        noise = rng.standard_normal(x_start.shape, dtype=np.float32)
        y = mask = None
        if self.cfg["num_classes"] is not None:
            y = drop_labels(np.asarray(labels.asnumpy() if isinstance(labels, Tensor) else labels),
                            self.cfg["label_dropout"], self.cfg["num_classes"], rng)
        if self.cfg.get("self_condition"):
            mask = self_condition_mask(batch, rng)
        return self.run_step(x_start, t, noise, y, mask)

    def run_step(self, x_start, t, noise, y=None, self_cond_mask=None):
        """One optimisation step on given inputs (images, timesteps, noise, labels or None, the
        self-conditioning mask or None) -> STATS tensor."""
        inputs = [x_start, t, noise, y, self_cond_mask]
        while inputs[-1] is None:  # trailing Nones: the compiled cell's defaults (the graph of a model without them)
            inputs.pop()
        if self.accum_steps == 1:
            stats = self.step_cell(*(v if v is None or isinstance(v, Tensor) else Tensor(v) for v in inputs))
        else:
            inputs = [v if v is None else v.asnumpy() if isinstance(v, Tensor) else np.asarray(v) for v in inputs]
            micro = inputs[0].shape[0] // self.accum_steps
            losses = [self.micro_cell(*(None if v is None else Tensor(v[i * micro:(i + 1) * micro])
                                        for v in inputs))
                      for i in range(self.accum_steps)]
            stats = self.apply_cell(ops.stack(losses).mean())
        self.step += 1
        return stats

    def train_step(self, x_start, labels=None):
        """One step on a batch (and its class labels, for a class-conditional model) -> (loss, applied).

        Reads the step's result on the host (a wait for the device); the training loop uses
        :meth:`step_stats` and reads only when it logs.
        """
        stats = read_stats(self.step_stats(x_start, labels))
        return stats["loss"], stats["applied"]

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

    def _meta(self, epoch, step_in_epoch):
        return {"config": self.cfg, "step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "world_size": self.world_size, "backend": self.backend, "time": time.time()}

    def save(self, manager, epoch, step_in_epoch):
        return manager.save(self.step, self.state_groups(), self._meta(epoch, step_in_epoch))

    def save_best(self, path, epoch, step_in_epoch, quality):
        """The state of this step as the run's best checkpoint (``quality``: its quality.csv row), atomically."""
        return ckpt.save(path, self.state_groups(), dict(self._meta(epoch, step_in_epoch), quality=quality))

    def restore(self, path, groups, meta):
        saved = {"config": saved_config(meta)}
        ckpt.check_compatible(saved, self.cfg, ARCH_KEYS + SCHEDULE_KEYS + OBJECTIVE_KEYS, path)
        for group, params in self.state_groups().items():
            ckpt.assign(params, groups[group], f"{group} state of this run", path)
        self.step = meta["step"]
        seed_dropout(self.model, self.cfg["seed"], self.rank, self.step)  # no replay of the first steps' masks
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
