"""The compiled training step (Algorithm 1 of Ho et al. 2020): loss, gradients, loss scaling, Adam, EMA.

Built once as one Cell around ``value_and_grad``; the training loop (:mod:`ddpm_ms.train`) only
feeds it batches. ``drop_labels`` prepares the class labels of a classifier-free-guidance step.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from . import kernels
from .diffusion import p_losses

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
