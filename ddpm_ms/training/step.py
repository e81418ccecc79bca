"""The compiled training step (Algorithm 1 of Ho et al. 2020): loss, gradients, loss scaling, Adam, EMA.

Built once as Cells around ``value_and_grad``; the training loop (:mod:`ddpm_ms.train`) only
feeds them batches. ``TrainStep`` is one whole step; with gradient accumulation
(``grad_accum_steps`` N > 1) ``AccumulateGrads`` runs the forward and backward of each of N
micro-batches and ``ApplyAccumulated`` makes the one update. Every step returns its statistics
as one small device tensor (``STATS``), read by the host only when it logs.
``drop_labels`` prepares the class labels of a classifier-free-guidance step, ``self_condition_mask``
the per-sample choice of a self-conditioning step (the network's x_0 estimate as its second input, or zeros).
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.models import kernels
from ddpm_ms.diffusion.gaussian import p_losses

# test hook: the rank named here sees an overflow in every step after the gradient reduction, as
# Ascend's per-card overflow status can (tests/test_distributed.py: both ranks must skip)
FAULT_OVERFLOW_RANK = "DDPM_MS_FAULT_OVERFLOW_RANK"

# what a step returns, one float32 each: the loss averaged over all ranks, 1.0 if the update was
# applied (finite gradients on every rank), the loss scale after this step's adjustment (1.0 when
# not scaling), and this rank's own loss
STATS = ("loss", "applied", "loss_scale", "rank_loss")


class LossAndGrads(nn.Cell):
    """loss -> (scaled) gradients of one batch; returns (loss, grads)."""

    def __init__(self, net, sched, params, scaler, loss_type, scale_loss, prediction_type, loss_weights):
        super().__init__(auto_prefix=False)
        self.net = net
        self.sched = sched
        self.scaler = scaler
        self.loss_type = loss_type
        self.prediction_type = prediction_type  # eps, x0 or v: a Python constant of the graph
        self.loss_weights = loss_weights  # [T] Tensor (min-SNR) or None
        self.scale_loss = scale_loss  # a Python constant: the graph has no scaling ops without it
        self.grad_fn = ms.value_and_grad(self.forward, None, params, has_aux=True)

    def forward(self, x_start, t, noise, y=None, self_cond_mask=None):
        loss = p_losses(self.net, self.sched, x_start, t, noise, self.loss_type, y, self.prediction_type,
                        self.loss_weights, self_cond_mask)
        if self.scale_loss:
            return self.scaler.scale(loss), loss
        return loss, loss

    def construct(self, x_start, t, noise, y=None, self_cond_mask=None):
        (_, loss), grads = self.grad_fn(x_start, t, noise, y, self_cond_mask)
        return loss.astype(ms.float32), grads


class Update(nn.Cell):
    """grads -> average over ranks -> unscale -> clip -> finite? -> Adam + EMA; returns the STATS tensor.

    On overflow (non-finite grads) the update is skipped and the loss scale is reduced; Adam's
    step counter still advances, so the LR schedule stays on the training step. Data parallel,
    the finite flag and the loss are reduced over all ranks in one AllReduce (an overflow on one
    skips the step on all; every rank logs the loss of the global batch).
    With ``scale_loss=False`` (float32 compute, see ``Trainer``) the gradients are not unscaled
    and the scaler is left untouched, but non-finite gradients still skip the update.
    With ``grad_clip`` the unscaled gradients are rescaled to a global L2 norm of at most
    ``grad_clip`` before the finiteness check and the update.
    """

    def __init__(self, optimizer, scaler, ema, scale_loss=True, grad_clip=None, world_size=1,
                 fault_overflow=False):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.scaler = scaler
        self.ema = ema
        self.scale_loss = scale_loss
        self.grad_clip = None if grad_clip is None else float(grad_clip)  # global-norm clipping (None: off)
        # data parallel: average the gradients over all devices before the update
        self.distributed = world_size > 1
        self.world_size = float(world_size)
        self.grad_reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True) if self.distributed else None
        # [loss, ranks that overflowed] summed over the ranks (a sum: every backend reduces sums)
        self.all_reduce_sum = ops.AllReduce(ops.ReduceOp.SUM) if self.distributed else None
        self.fault_overflow = fault_overflow  # test hook, see FAULT_OVERFLOW_RANK
        self._no = Tensor(False)
        self._one = Tensor(1.0, ms.float32)
        # one compiled CPU op checks every gradient (MindSpore's all_finite runs two per tensor)
        # (kept as the kernels namespace: a Primitive attribute set to None confuses Cell)
        self._fast = kernels.ops() if kernels.enabled() and all(
            p.dtype == ms.float32 for p in optimizer.parameters) else None

    def construct(self, grads, rank_loss):
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
        loss = rank_loss
        if self.distributed:
            # on Ascend all_finite reads this card's own overflow status: every rank must take the same
            # branch; the loss of the global batch is the mean of the ranks' losses (equal shards)
            sums = self.all_reduce_sum(ops.stack([rank_loss, ops.logical_not(finite).astype(ms.float32)]))
            loss = sums[0] / self.world_size
            finite = sums[1] == 0
        if self.scale_loss:
            self.scaler.adjust(finite)
        if finite:
            self.optimizer(grads)
            self.ema()
        else:
            # a skipped update still uses up its step of the LR schedule (Adam reads the rate at global_step)
            ops.assign_add(self.optimizer.global_step, self.optimizer.global_step_increase_tensor)
        scale = self.scaler.scale_value * self._one if self.scale_loss else self._one  # a value, not the Parameter
        return ops.stack([loss, finite.astype(ms.float32), scale, rank_loss])


class TrainStep(nn.Cell):
    """One optimisation step on one batch: ``LossAndGrads`` then ``Update``; returns the STATS tensor."""

    def __init__(self, loss_and_grads, update):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.update = update

    def construct(self, x_start, t, noise, y=None, self_cond_mask=None):
        loss, grads = self.loss_and_grads(x_start, t, noise, y, self_cond_mask)
        return self.update(grads, loss)


_add_scaled = ops.MultitypeFuncGraph("add_scaled")
_zero = ops.MultitypeFuncGraph("zero")


@_add_scaled.register("Number", "Tensor", "Tensor")
def _add_scaled_one(scale, buffer, grad):
    return ops.assign_add(buffer, grad.astype(buffer.dtype) * scale)


@_zero.register("Tensor")
def _zero_one(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


class AccumulateGrads(nn.Cell):
    """One micro-batch of a step with gradient accumulation: add grads / N to the buffers; returns its loss."""

    def __init__(self, loss_and_grads, buffers, num_micro):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.buffers = buffers
        self.inv_n = 1.0 / num_micro  # the batch loss is the mean of N equal micro-batch losses
        self.hyper_map = ops.HyperMap()

    def construct(self, x_start, t, noise, y=None, self_cond_mask=None):
        loss, grads = self.loss_and_grads(x_start, t, noise, y, self_cond_mask)
        self.hyper_map(ops.partial(_add_scaled, self.inv_n), self.buffers, grads)
        return loss


class ApplyAccumulated(nn.Cell):
    """The update of a step with gradient accumulation, from the buffers (then zeroed); returns STATS."""

    def __init__(self, update, buffers):
        super().__init__(auto_prefix=False)
        self.update = update
        self.buffers = buffers
        self.hyper_map = ops.HyperMap()

    def construct(self, loss):
        stats = self.update(self.buffers, loss)  # the update reads the buffers before they are zeroed
        self.hyper_map(_zero, self.buffers)
        return stats


def grad_buffers(optimizer):
    """Zero-initialised float32 accumulators, one per trained parameter (``accum.<name>``)."""
    return optimizer.parameters.clone(prefix="accum", init="zeros")


def drop_labels(labels, p, null_class, rng):
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes the null class with prob. p."""
    drop = rng.random(labels.shape[0]) < p
    return np.where(drop, null_class, labels).astype(np.int32)


def self_condition_mask(batch, rng, p=0.5):
    """Self-conditioning training (Chen, Zhang & Hinton 2022, Sec. 3): 1.0 for the samples whose second input
    is the model's own x_0 estimate (each with prob. p), 0.0 for those that get zeros -> float32 [batch]."""
    return (rng.random(batch) < p).astype(np.float32)
