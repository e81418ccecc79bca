"""The DDPM paper's U-Net (arch: ddpm) against HF diffusers' UNet2DModel, and ddpm-convert.

Parity: randomly initialised diffusers models (the google/ddpm-cifar10-32 configuration, a small
one, one with attention at two levels and a class embedding), their weights converted by the
name table, give the same outputs to 1e-4 relative; converting back gives the diffusers tensors
bit for bit. The converter CLI carries the scheduler settings over, and every sampler runs on a
converted model. Tests that need torch/diffusers skip with the reason when they are missing.
"""

import ddpm_ms  # noqa: F401  (caps oneDNN at AVX2 before MindSpore is imported)

import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms import convert
from ddpm_ms.command_line import run_cli
from ddpm_ms.config import load_config, saved_config
from ddpm_ms.diffusion.gaussian import Schedule
from ddpm_ms.utils.errors import UserError
from ddpm_ms.factory import create_model, create_schedule
from ddpm_ms.diffusion.generation import generate
from ddpm_ms.pipeline import load
from tiny_config import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = os.path.join(ROOT, "configs", "ddpm_cifar10.yaml")

# google/ddpm-cifar10-32's UNet2DModel configuration (its config.json), dropout 0 for a deterministic output
CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="silu")
SMALL_DIFFUSERS = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)
TWO_ATTN_DIFFUSERS = dict(  # attention at 16x16 and 8x8, 2 heads, class embedding, flipped sin/cos, pad 1
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, norm_num_groups=8,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, num_class_embeds=4, act_fn="gelu")


def _diffusers():
    pytest.importorskip("torch", reason="the diffusers parity tests need torch (pip install torch, the CPU build)")
    return pytest.importorskip("diffusers", reason="the parity tests need diffusers (pip install diffusers)")


def _random_diffusers_unet(kwargs, seed):
    """A UNet2DModel with every tensor random (GroupNorm scales around 1), in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = _diffusers().UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(scale + 0.2 * torch.randn_like(p))
    return model


def _state_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _converted(model):
    """The ddpm_ms model for a diffusers model's config, with its weights converted."""
    cfg = load_config(None, convert.unet_config_to_cfg(dict(model.config)))
    net = create_model(cfg)
    params = dict(net.parameters_and_names())
    for name, value in convert.to_ddpm_ms_weights(net, _state_numpy(model)).items():
        params[name].set_data(Tensor(value))
    net.set_train(False)
    return net, cfg


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_cifar10_config_has_the_papers_35_7m_parameters():
    model = create_model(load_config(CIFAR10))
    assert sum(p.size for p in model.trainable_params()) == 35_746_307


@pytest.mark.parametrize("name, kwargs, batch, fast", [
    ("cifar10", CIFAR10_DIFFUSERS, 1, True),
    ("small-builtin-ops", SMALL_DIFFUSERS, 3, False),
    ("two-attn-levels-classes", TWO_ATTN_DIFFUSERS, 3, True),
])
def test_outputs_match_diffusers_and_weights_convert_back_exactly(name, kwargs, batch, fast, pynative, monkeypatch):
    import torch

    monkeypatch.setenv("DDPM_MS_FAST_KERNELS", "1" if fast else "0")
    ref_model = _random_diffusers_unet(kwargs, seed=len(name))
    net, cfg = _converted(ref_model)
    rng = np.random.default_rng(0)
    size, c = kwargs["sample_size"], kwargs["in_channels"]
    x = rng.standard_normal((batch, c, size, size)).astype(np.float32)
    t = np.array([0, 517, 999][:batch], np.int32)
    y = np.array([0, 3, 2][:batch], np.int32) if kwargs.get("num_class_embeds") else None
    out = net(Tensor(x), Tensor(t), None if y is None else Tensor(y)).asnumpy()
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)),
                        class_labels=None if y is None else torch.from_numpy(y.astype(np.int64))).sample.numpy()
    assert out.shape == ref.shape and np.abs(ref).max() > 0.1
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    back = convert.to_diffusers_weights({n: p.asnumpy() for n, p in net.parameters_and_names()})
    state = _state_numpy(ref_model)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == np.float32 and np.array_equal(back[key], value), key
    assert convert.cfg_to_unet_config(cfg)["down_block_types"] == list(kwargs["down_block_types"])


def test_gradients_match_diffusers(pynative):
    """One backward pass through the fast kernels (eps-1e-6 group norm, attention, convs): same weight gradients."""
    import torch

    from ddpm_ms.models.ddpm_unet import diffusers_key

    ref_model = _random_diffusers_unet(dict(SMALL_DIFFUSERS, sample_size=8), seed=7)
    ref_model.train()
    net, _ = _converted(ref_model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([4, 700], np.int32)
    params = net.trainable_params()
    grads = ms.grad(lambda a, b: (net(a, b) ** 2).mean(), grad_position=None, weights=params)(Tensor(x), Tensor(t))
    (ref_model(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64))).sample ** 2).mean().backward()
    ref = {k: p.grad.numpy() for k, p in ref_model.named_parameters()}
    names = {id(p): n for n, p in net.parameters_and_names()}
    for p, g in zip(params, grads):
        r = ref[diffusers_key(names[id(p)])]
        scale = max(np.abs(r).max(), 1e-3)
        np.testing.assert_allclose(g.asnumpy() / scale, r / scale, atol=1e-4, err_msg=names[id(p)])


def test_group_norm_kernel_takes_the_epsilon(pynative, monkeypatch):
    """eps = 0.05 against var ~ 0.04 (an ignored eps would show): kernel = float64 formula,
    gradients = built-in op's."""
    from ddpm_ms.models import kernels
    from ddpm_ms.models.layers import GroupNorm

    if not kernels.enabled():
        pytest.skip("the compiled CPU kernels are not available here")
    rng = np.random.default_rng(3)
    x = (0.2 * rng.standard_normal((2, 6, 5, 4)) + 3.0).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(6)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(6)).astype(np.float32)
    cells = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("DDPM_MS_FAST_KERNELS", fast)
        cells[fast] = GroupNorm(3, 6, eps=0.05)
        cells[fast].gamma.set_data(Tensor(gamma))
        cells[fast].beta.set_data(Tensor(beta))
    assert cells["1"]._eps_fast is not None and cells["0"]._eps_fast is None
    xg = x.astype(np.float64).reshape(2, 3, -1)
    ref = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 0.05)).reshape(x.shape)
    ref = ref * gamma[None, :, None, None] + beta[None, :, None, None]
    np.testing.assert_allclose(cells["1"](Tensor(x)).asnumpy(), ref, atol=2e-6)
    dy = Tensor(rng.standard_normal(x.shape).astype(np.float32))
    grads = {}
    for fast, cell in cells.items():
        fn = ms.grad(lambda a, cell=cell: (cell(a) * dy).sum(), grad_position=0, weights=cell.trainable_params())
        grads[fast] = fn(Tensor(x))
    for a, b in zip([grads["1"][0], *grads["1"][1]], [grads["0"][0], *grads["0"][1]]):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_group_norm_kernel_returns_the_mixed_precision_dtype(pynative, eps):
    """Both kernel paths (the kernel's own eps 1e-5, another eps as an input) honour ``out_dtype``:
    the eps-input path once returned float32 in a float16 network (a BiasAdd type error in graph mode)."""
    from ddpm_ms.models import kernels
    from ddpm_ms.models.layers import GroupNorm

    if not kernels.enabled():
        pytest.skip("the compiled CPU kernels are not available here")
    norm = GroupNorm(2, 4, eps=eps)
    assert (norm._fast is not None) == (eps == kernels.GROUP_NORM_EPS) != (norm._eps_fast is not None)
    x = Tensor(np.random.default_rng(4).standard_normal((2, 4, 3, 3)).astype(np.float32))
    out32 = norm(x)
    norm.out_dtype = ms.float16  # as precision.to_mixed_precision sets it
    out16 = norm(x)
    assert out32.dtype == ms.float32 and out16.dtype == ms.float16
    np.testing.assert_array_equal(out16.asnumpy(), out32.asnumpy().astype(np.float16))


def test_legacy_attention_names_are_read():
    state = {"mid_block.attentions.0.query.weight": 1, "mid_block.attentions.0.proj_attn.bias": 2,
             "down_blocks.0.resnets.0.conv1.weight": 3}
    assert sorted(convert._current_key(k) for k in state) == [
        "down_blocks.0.resnets.0.conv1.weight", "mid_block.attentions.0.to_out.0.bias",
        "mid_block.attentions.0.to_q.weight"]


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_scheduler_betas_are_the_diffusers_betas(schedule):
    diffusers = _diffusers()
    sched = diffusers.DDPMScheduler(num_train_timesteps=300, beta_start=2e-4, beta_end=0.03, beta_schedule=schedule)
    cfg = load_config(None, convert.scheduler_config_to_cfg(dict(sched.config)))
    np.testing.assert_allclose(create_schedule(cfg).betas, sched.betas.numpy().astype(np.float64), rtol=2e-6,
                               atol=1e-9)
    assert convert.cfg_to_scheduler_config(cfg)["beta_schedule"] == schedule


@pytest.fixture(scope="module")
def tiny_diffusers_dir(tmp_path_factory):
    """A saved tiny UNet2DModel (safetensors and .bin) with a DDPMScheduler config next to it."""
    diffusers = _diffusers()
    root = tmp_path_factory.mktemp("diffusers")
    model = _random_diffusers_unet(dict(SMALL_DIFFUSERS, sample_size=8), seed=5)
    model.save_pretrained(root / "st", safe_serialization=True)
    model.save_pretrained(root / "bin", safe_serialization=False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=20, beta_start=1e-3, beta_end=0.2,
                                    variance_type="fixed_large", clip_sample=False)
    sched.save_pretrained(root / "st")
    return root, model, sched


def test_convert_cli_takes_over_the_scheduler_and_every_sampler_runs(tiny_diffusers_dir, tmp_path, pynative):
    root, model, sched = tiny_diffusers_dir
    out = str(tmp_path / "model.ckpt")
    convert.main(["--from-diffusers", str(root / "st"), "--out", out, "sample_steps=4"])
    groups, meta = ckpt.load(out)
    cfg = meta["config"]
    assert (cfg["arch"], cfg["image_size"], cfg["channels"], cfg["timesteps"]) == ("ddpm", 8, 1, 20)
    assert (cfg["variance"], cfg["clip_denoised"], cfg["sample_steps"]) == ("beta", False, 4)
    np.testing.assert_allclose(Schedule.from_config(cfg["beta_schedule"], cfg["timesteps"], cfg["beta_start"],
                                                    cfg["beta_end"]).betas, sched.betas.numpy(), rtol=1e-6)

    net, sched_ms, cfg = load(out)[:3]
    for sampler in ("ddpm", "ddim", "dpm-solver++"):
        images, _ = generate(net, sched_ms, cfg, 2, sampler=sampler, steps=None if sampler == "ddpm" else 4,
                             progress=False)
        assert images.shape == (2, 1, 8, 8) and np.isfinite(images).all() and images.std() > 0, sampler

    # the .bin file (read with torch) gives the same weights; no scheduler there: the ddpm_ms defaults
    out_bin = str(tmp_path / "bin.ckpt")
    convert.main(["--from-diffusers", str(root / "bin"), "--out", out_bin])
    groups_bin, meta_bin = ckpt.load(out_bin)
    assert meta_bin["config"]["timesteps"] == 1000
    for name, value in groups["model"].items():
        assert np.array_equal(value.asnumpy(), groups_bin["model"][name].asnumpy()), name

    # and back: UNet2DModel.from_pretrained reads the folder, tensors equal bit for bit
    back = tmp_path / "back"
    convert.main(["--to-diffusers", out, "--out", str(back)])
    diffusers = _diffusers()
    reloaded = diffusers.UNet2DModel.from_pretrained(str(back))
    state, state_back = _state_numpy(model), _state_numpy(reloaded)
    assert set(state) == set(state_back)
    assert all(np.array_equal(state[k], state_back[k]) for k in state)
    sched_back = json.loads((back / "scheduler_config.json").read_text())
    assert (sched_back["variance_type"], sched_back["clip_sample"], sched_back["num_train_timesteps"]) == \
        ("fixed_large", False, 20)


def test_unsupported_config_is_one_error_naming_everything(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    config = dict(SMALL_DIFFUSERS, down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"],
                  resnet_time_scale_shift="scale_shift", _class_name="UNet2DModel")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    out = tmp_path / "x.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert.main, ["--from-diffusers", str(folder), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unsupported diffusers UNet2DModel config")
    assert "SkipDownBlock2D" in err[0] and "resnet_time_scale_shift='scale_shift'" in err[0]
    assert not out.exists()
    with pytest.raises(UserError, match="variance_type='learned_range'"):
        convert.scheduler_config_to_cfg({"variance_type": "learned_range"})


def test_architecture_overrides_are_refused(tiny_diffusers_dir, tmp_path):
    root, _, _ = tiny_diffusers_dir
    out = tmp_path / "o.ckpt"
    with pytest.raises(UserError, match="downsample_padding come from"):
        convert.from_diffusers(str(root / "st"), str(out), {"downsample_padding": 1, "sampler": "ddim"})
    assert not out.exists()


def test_tutorial_checkpoints_do_not_go_to_diffusers(tmp_path):
    cfg = load_config(TINY)
    path = str(tmp_path / "t.ckpt")
    ckpt.save(path, {"model": {}}, {"config": cfg, "step": 0})
    with pytest.raises(UserError, match="only arch: ddpm"):
        convert.to_diffusers(path, str(tmp_path / "out"))


@pytest.mark.parametrize("values, message", [
    ({"arch": "unet3d"}, "'arch' = 'unet3d' is not one of"),
    ({"resnet_groups": 48}, "resnet_groups 48 .* must divide every U-Net width"),
    ({"attn_head_dim": 96}, "attn_head_dim 96 must divide"),
    ({"dropout": 1.0}, "'dropout' must be in"),
    ({"downsample_padding": 2}, "'downsample_padding' must be 0 or 1"),
    ({"norm_eps": 0.0}, "'norm_eps' must be > 0"),
])
def test_invalid_ddpm_arch_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        load_config(CIFAR10, values)


def test_checkpoints_without_the_new_keys_still_match_their_config():
    """A checkpoint written before `arch` existed compares as the default (tutorial) architecture."""
    cfg = load_config(TINY)
    old = {k: v for k, v in cfg.items() if k not in ("arch", "layers_per_block", "norm_eps", "freq_shift")}
    saved = {"config": saved_config({"config": old})}  # as the trainer and the loader read a checkpoint
    ckpt.check_compatible(saved, cfg, ("arch", "dim", "layers_per_block", "freq_shift"), "old.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="arch: checkpoint 'tutorial' vs config 'ddpm'"):
        ckpt.check_compatible(saved, dict(cfg, arch="ddpm"), ("arch",), "old.ckpt")
