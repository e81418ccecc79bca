"""The state of one training run: model, optimizer, EMA, loss scaler and their checkpoint groups.

``Trainer`` builds the train step once, runs it on a batch with the per-step randomness
derived from (seed, step, rank), hands its state to :mod:`ddpm_ms.checkpoint` and samples
with the EMA weights.
"""

import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from . import checkpoint as ckpt
from .config import ARCH_KEYS, DEFAULTS, OBJECTIVE_KEYS, SCHEDULE_KEYS
from .device import compute_dtype, set_jit_level
from .diffusion import loss_weights
from .ema import EMA
from .lr_schedule import learning_rates, steps_and_epochs
from .pipeline import cast_model, create_model, create_schedule, generate
from .train_step import FAULT_OVERFLOW_RANK, TrainStep, drop_labels


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
