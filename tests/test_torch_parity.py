"""The PyTorch reference U-Net (benchmarks/torch_unet.py) computes the same function as ddpm_ms.

Same weights (converted MindSpore -> PyTorch) and inputs -> outputs equal within 1e-4, for
the tutorial ConvNeXt/GELU config and the ResNet/SiLU config, with ddpm_ms's fast CPU
kernels on (the default) and off. Skipped when torch is not installed.
"""

import ddpm_ms  # noqa: F401  (caps oneDNN at AVX2 before MindSpore is imported)

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from ddpm_ms.models.tutorial_unet import Unet  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import torch_unet  # noqa: E402

CONFIGS = {
    # the tutorial's architecture (dim 28, mults 1/2/4, ConvNeXt + GELU, attention everywhere),
    # narrowed to dim 12 to keep the test fast
    "tutorial-convnext-gelu": dict(dim=12, dim_mults=(1, 2, 4), channels=1),
    "resnet-silu": dict(dim=16, init_dim=16, dim_mults=(1, 2, 2), channels=1, block_type="resnet",
                        act="silu", resnet_groups=8, attn_levels=(), mid_attn=False),
    "resnet-gelu-attn-classes": dict(dim=16, dim_mults=(1, 2), channels=3, block_type="resnet",
                                     attn_levels=(1,), num_classes=3),
}


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _randomize(net, seed):
    """Non-trivial weights: GroupNorm affine params and biases away from 1/0 too."""
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        fan_in = int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1)) if len(p.shape) > 1 else 0.3
        base = 1.0 if p.name.endswith("gamma") else 0.0
        p.set_data(Tensor((base + rng.standard_normal(p.shape) * scale).astype(np.float32)))


@pytest.mark.parametrize("fast", [True, False], ids=["fast-kernels", "builtin-ops"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_pytorch(name, fast, monkeypatch):
    monkeypatch.setenv("DDPM_MS_FAST_KERNELS", "1" if fast else "0")
    kwargs = CONFIGS[name]
    ms.set_seed(0)
    net = Unet(**kwargs)
    _randomize(net, seed=1)
    tnet = torch_unet.from_mindspore(net, **kwargs).eval()

    rng = np.random.default_rng(2)
    c = kwargs["channels"]
    x = rng.standard_normal((3, c, 16, 16)).astype(np.float32)
    t = np.array([0, 57, 999], np.int32)
    y = np.array([0, 2, 3], np.int32) if kwargs.get("num_classes") else None
    out = net(Tensor(x), Tensor(t), None if y is None else Tensor(y)).asnumpy()
    with torch.no_grad():
        ref = tnet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)),
                   None if y is None else torch.from_numpy(y.astype(np.int64))).numpy()
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # a meaningful output, not all zeros
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_gradients_match_pytorch():
    """One backward pass: the weight gradients agree too (fast kernels on)."""
    kwargs = CONFIGS["tutorial-convnext-gelu"]
    ms.set_seed(0)
    net = Unet(**kwargs)
    _randomize(net, seed=3)
    tnet = torch_unet.from_mindspore(net, **kwargs)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([3, 400], np.int32)
    params = net.trainable_params()

    def loss_fn(xx, tt):
        return (net(xx, tt) ** 2).mean()

    grads = ms.grad(loss_fn, grad_position=None, weights=params)(Tensor(x), Tensor(t))
    loss = (tnet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64))) ** 2).mean()
    loss.backward()
    tgrads = dict(tnet.named_parameters())
    for p, g in zip(params, grads):
        ref = tgrads[torch_unet.torch_name(p.name)].grad.numpy()
        scale = max(np.abs(ref).max(), 1e-3)
        np.testing.assert_allclose(g.asnumpy() / scale, ref / scale, atol=1e-4, err_msg=p.name)
