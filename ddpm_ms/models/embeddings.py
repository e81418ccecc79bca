"""The sinusoidal timestep embedding both U-Nets use (Vaswani et al. 2017, as in DDPM).

One cell, parameterised for the two forms in use:

* the tutorial U-Net's (``tutorial_unet.SinusoidalPositionEmbeddings``, The Annotated Diffusion
  Model): sin first, ``freq_shift=1``, the frequencies computed in float64 and rounded once;
* diffusers' ``Timesteps`` (``ddpm_unet.DDPMUnet.time_proj``): ``flip_sin_to_cos`` and
  ``freq_shift`` from the model's config, the frequencies computed in float32 as PyTorch does.

Both compute ``t * freq`` and its sin/cos in float32, also in a float16 network (``keep_float32``,
read by ``precision.to_mixed_precision``). The cell has no parameters (the frequencies are a
constant tensor), so it adds nothing to a checkpoint.
"""

import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

__all__ = ["SinusoidalTimestepEmbedding", "timestep_frequencies"]


def timestep_frequencies(dim, freq_shift=1, max_period=10000.0, dtype=np.float32):
    """``freq_j = exp(-log(max_period) * j / (half - freq_shift))``, j < half = dim // 2, computed in ``dtype``
    (float32: diffusers' arithmetic; float64: the tutorial's) and returned as float32 [half]."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=dtype) / (half - freq_shift)
    return np.exp(exponent).astype(np.float32)


class SinusoidalTimestepEmbedding(nn.Cell):
    """Sinusoidal embedding of timesteps [N] -> [N, dim]: ``concat(sin(t f), cos(t f))``, or
    ``concat(cos, sin)`` with ``flip_sin_to_cos``; ``f = timestep_frequencies(dim, freq_shift, dtype=freq_dtype)``.
    Computed in float32."""

    keep_float32 = True  # to_mixed_precision leaves it in float32 (in float16, t * f of t = 999 is off by 0.15)

    def __init__(self, dim, flip_sin_to_cos=False, freq_shift=1, freq_dtype=np.float32):
        super().__init__()
        if dim % 2 or dim // 2 - freq_shift < 1:
            raise ValueError(f"the timestep embedding needs an even width > 2 * freq_shift ({freq_shift}), got {dim}")
        self.dim = dim
        self.flip = bool(flip_sin_to_cos)
        self.freqs = Tensor(timestep_frequencies(dim, freq_shift, dtype=freq_dtype).reshape(1, -1))

    def construct(self, t):
        args = t.astype(ms.float32).reshape(-1, 1) * self.freqs
        if self.flip:
            return ops.concat((ops.cos(args), ops.sin(args)), -1)
        return ops.concat((ops.sin(args), ops.cos(args)), -1)
