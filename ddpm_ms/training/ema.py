"""Exponential moving average of the weights, kept as cloned parameters (``ema.<name>``).

With warm-up the decay grows as min(decay, (1 + n) / (10 + n)) over the n updates made,
so early EMA weights follow the model instead of averaging in the random init.

On CPU with the fast kernels (float32 weights) one compiled ``ema_update`` op computes every
new shadow, ``shadow * decay + param * (1 - decay)`` with the same float32 roundings as
the per-tensor MindSpore ops, followed by one Assign per shadow; elsewhere (Ascend, GPU,
``DDPM_MS_FAST_KERNELS=0``) each shadow is updated by its own Mul/Sub/Mul/Add/Assign ops.
Both keep the shadows as one Parameter per weight, so checkpoints are the same.
"""

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ddpm_ms.models import kernels

_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _update_one(decay, shadow, param):
    return ops.assign(shadow, shadow * decay + param.astype(shadow.dtype) * (1.0 - decay))


class EMA(nn.Cell):
    def __init__(self, params, decay=0.999, warmup=True):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.shadow = self.params.clone(prefix="ema", init="same")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = Parameter(Tensor(0, ms.float32), name="ema_num_updates", requires_grad=False)
        self.hyper_map = ops.HyperMap()
        # the kernels namespace, not the Primitive itself (see TrainStep)
        self._fast = kernels.ops() if kernels.enabled() and all(
            p.dtype == ms.float32 for p in self.params) else None

    def current_decay(self):
        decay = ops.scalar_to_tensor(self.decay, ms.float32)
        if self.warmup:
            n = self.num_updates
            decay = ops.minimum(decay, (1.0 + n) / (10.0 + n))
        return decay

    def construct(self):
        decay = self.current_decay()
        ops.assign_add(self.num_updates, ops.ones((), ms.float32))
        if self._fast is not None:
            return self.hyper_map(ops.assign, self.shadow, self._fast.ema_update(decay, *self.shadow, *self.params))
        return self.hyper_map(ops.partial(_ema_update, decay), self.shadow, self.params)
