"""Gradient-norm clipping (config key grad_clip) inside TrainStep, after unscaling the loss-scaled gradients."""

import ddpm_ms  # noqa: F401


import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ddpm_ms.config import load_config
from ddpm_ms.diffusion.gaussian import p_losses
from ddpm_ms.training.ema import EMA
from ddpm_ms.utils.errors import UserError
from ddpm_ms.factory import create_model, create_schedule
from ddpm_ms.training.step import STATS, LossAndGrads, TrainStep, Update
from tiny_config import TINY

LR = 0.5


def _step_cell(cfg, clip, scale_loss):
    ms.set_seed(0)
    model = create_model(cfg)
    params = model.trainable_params()
    opt = nn.SGD(params, learning_rate=LR)  # w - lr * g: the applied gradient can be read off the weights
    scaler = ms.amp.DynamicLossScaler(2.0 ** 12, 2, 1000)
    step = TrainStep(LossAndGrads(model, create_schedule(cfg), opt.parameters, scaler, cfg["loss_type"], scale_loss,
                                  "eps", None),
                     Update(opt, scaler, EMA(params, 0.5, False), scale_loss=scale_loss, grad_clip=clip))
    return model, step


def test_update_uses_the_clipped_true_gradient():
    """SGD weights after one step = w - lr * g * min(1, clip / |g|), with and without loss scaling."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = load_config(TINY, ["image_size=8", "batch_size=2"])
    rng = np.random.default_rng(0)
    x = Tensor(rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32))
    t = Tensor(np.array([3, 15], np.int32))
    noise = Tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))

    model, _ = _step_cell(cfg, None, False)
    params = model.trainable_params()
    w0 = [p.asnumpy().copy() for p in params]
    sched = create_schedule(cfg)

    def loss_fn(a, b, c):
        return p_losses(model, sched, a, b, c, cfg["loss_type"])

    grads = [g.asnumpy().astype(np.float64) for g in ms.grad(loss_fn, None, params)(x, t, noise)]
    norm = np.sqrt(sum((g * g).sum() for g in grads))
    clip = 0.25 * norm  # active: the gradient is scaled by 1/4

    for scale_loss in (False, True):
        model, step = _step_cell(cfg, clip, scale_loss)
        assert step(x, t, noise).asnumpy()[STATS.index("applied")] == 1.0
        applied = [(a - p.asnumpy()) / LR for a, p in zip(w0, model.trainable_params())]
        applied_norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in applied))
        np.testing.assert_allclose(applied_norm, clip, rtol=1e-4)
        for g, a in zip(grads, applied):
            np.testing.assert_allclose(a, g * clip / norm, rtol=2e-3, atol=2e-5 * np.abs(g).max() + 1e-9)

    # a clip above the norm changes nothing
    model, step = _step_cell(cfg, 10 * norm, False)
    step(x, t, noise)
    for g, a, p in zip(grads, w0, model.trainable_params()):
        np.testing.assert_allclose((a - p.asnumpy()) / LR, g, rtol=2e-3, atol=2e-5 * np.abs(g).max() + 1e-9)


def test_grad_clip_must_be_positive():
    with pytest.raises(UserError, match="'grad_clip' must be > 0"):
        load_config(TINY, ["grad_clip=0"])
    assert load_config(TINY)["grad_clip"] is None
