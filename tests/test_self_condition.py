"""Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", Sec. 3): config key ``self_condition``.

The network takes x_t and an estimate of x_0 (zeros when there is none). Training: for a random half
of the batch (a per-sample mask drawn after t, noise and labels) the estimate is the network's own
prediction from (x_t, zeros), without gradient; sampling: every network call gets the previous call's
(clipped) x_0 prediction. Tiny models (tests/configs/tiny.yaml at 8x8, batch 2); one compiled Trainer
is shared by the tests that train.
"""

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)

import hashlib
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from ddpm_ms import convert
from ddpm_ms import export as export_mod
from ddpm_ms.config import ARCH_KEYS, load_config
from ddpm_ms.diffusion.editing import img2img, inpaint
from ddpm_ms.diffusion.gaussian import p_losses, q_sample, self_condition_estimate, training_target
from ddpm_ms.diffusion.generation import generate, guided_eps_fn, make_eps_fn, model_eps_fn
from ddpm_ms.diffusion.samplers import sample
from ddpm_ms.factory import create_model, create_schedule
from ddpm_ms.interop.exported import load_exported
from ddpm_ms.pipeline import load
from ddpm_ms.training.step import LossAndGrads
from ddpm_ms.training.trainer import Trainer, read_stats
from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.errors import UserError
from tiny_config import TINY

try:
    from cli_checks import one_line_error
except ImportError:  # tests/ imported as a package
    from tests.cli_checks import one_line_error

SIZE, BATCH = 8, 2
BASE = [f"image_size={SIZE}", f"batch_size={BATCH}", "max_steps=100"]
SC = BASE + ["self_condition=true", "prediction_type=v", "lr=0.003", "ema_decay=0.5", "ema_warmup=false"]
DDPM = ["arch=ddpm", "layers_per_block=1", "attn_levels=[1]"]
ARCHS = {"tutorial": [], "ddpm": DDPM, "convnext": ["block_type=convnext", "act=gelu", "attn_levels=[1]",
                                                    "num_classes=3"]}
FIRST_CONV = {"tutorial": "init_conv.weight", "ddpm": "conv_in.weight", "convnext": "init_conv.weight"}
# (count, sha256[:16]) of "name:shape" lines of the networks of ARCHS at image_size 8, as the code before
# self-conditioning built them (recomputed from that commit's ddpm_ms with the same fingerprint())
TODAY = {"tutorial": (86, "0039d8c05d6261b2"), "ddpm": (144, "2e75b99c0990101a"),
         "convnext": (108, "903c5b00bee2a81a")}


pytestmark = pytest.mark.usefixtures("graph_mode_module")


@pytest.fixture(scope="module")
def trainer():
    """A compiled self-conditioned Trainer (v-prediction), shared by the tests that train."""
    return Trainer(load_config(TINY, SC), "CPU", steps_per_epoch=100)


class pynative:
    def __enter__(self):
        ms.set_context(mode=ms.PYNATIVE_MODE)

    def __exit__(self, *exc):
        ms.set_context(mode=ms.GRAPH_MODE)


def images(seed, batch=BATCH, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, (batch, 1, SIZE, SIZE)).astype(np.float32)


def fingerprint(model):
    lines = [f"{name}:{tuple(p.shape)}" for name, p in model.parameters_and_names()]
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def x0_numpy(sched, x_t, t, out, prediction_type):
    """x_0 from the network output, in float64 NumPy (Eq. 4; Salimans & Ho 2022 for v), per-sample t."""
    a = np.sqrt(sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    s = np.sqrt(1.0 - sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    x_t, out = np.asarray(x_t, np.float64), np.asarray(out, np.float64)
    return {"eps": (x_t - s * out) / a, "x0": out, "v": a * x_t - s * out}[prediction_type]


# ----- the networks -----


@pytest.mark.parametrize("arch", list(ARCHS))
def test_off_is_todays_network_and_on_has_2c_inputs_to_the_first_conv(arch):
    cfg = load_config(TINY, [f"image_size={SIZE}"] + ARCHS[arch])
    assert fingerprint(create_model(cfg, fast_kernels=False)) == TODAY[arch]
    old = {k: v for k, v in cfg.items() if k != "self_condition"}  # a config from before the key
    assert fingerprint(create_model(old, fast_kernels=False)) == TODAY[arch]
    rgb = [f"image_size={SIZE}", "channels=3"] + ARCHS[arch]
    off_model = create_model(load_config(TINY, rgb), fast_kernels=False)
    on_model = create_model(load_config(TINY, rgb + ["self_condition=true"]), fast_kernels=False)
    off, on = ({n: tuple(p.shape) for n, p in m.parameters_and_names()} for m in (off_model, on_model))
    assert list(on) == list(off)
    assert [n for n in on if on[n] != off[n]] == [FIRST_CONV[arch]]
    assert on[FIRST_CONV[arch]][1] == 6 and off[FIRST_CONV[arch]][1] == 3
    assert on[FIRST_CONV[arch]][0] == off[FIRST_CONV[arch]][0]
    assert on_model.self_condition


def test_the_second_input_is_used_and_defaults_to_zeros():
    cfg = load_config(TINY, [f"image_size={SIZE}", "self_condition=true"] + DDPM)
    ms.set_seed(1)
    model = create_model(cfg)
    x, t = Tensor(images(0)), Tensor(np.array([3, 17], np.int32))
    with pynative():
        none = model(x, t).asnumpy()
        zeros = model(x, t, None, Tensor(np.zeros_like(images(0)))).asnumpy()
        other = model(x, t, None, Tensor(images(1))).asnumpy()
    np.testing.assert_array_equal(none, zeros)
    assert np.abs(other - zeros).max() > 1e-3


# ----- training -----


def loss_inputs(prediction_type):
    cfg = load_config(TINY, BASE + ["self_condition=true", f"prediction_type={prediction_type}"])
    ms.set_seed(2)
    x = images(3, low=-0.5, high=0.5)
    noise = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    return create_model(cfg), create_schedule(cfg), x, np.array([1, 6], np.int32), noise


def test_training_loss_with_the_mask_zero_one_and_mixed():
    """Mask 0: the loss of the network called with zeros; mask 1: called with the clipped x_0 estimate of a first
    pass from (x_t, zeros), composed here in NumPy (float64) for each prediction type; a mixed mask: each sample
    its own."""
    model, sched, x, t, noise = loss_inputs("eps")  # the network does not depend on the prediction type
    with pynative():
        x_t, tt = q_sample(sched, x, t, noise), Tensor(t)
        zeros = np.zeros_like(x)
        first = model(x_t, tt, None, Tensor(zeros)).asnumpy().astype(np.float64)
        for prediction_type in ("eps", "x0", "v"):
            target = training_target(sched, Tensor(x), tt, Tensor(noise), prediction_type).asnumpy()

            def mse(second, target=target):
                out = first if second is zeros else model(x_t, tt, None, Tensor(second.astype(np.float32))).asnumpy()
                return float(((out.astype(np.float64) - target) ** 2).mean())

            def loss(mask, prediction_type=prediction_type):
                mask = np.asarray(mask, np.float32)
                return float(p_losses(model, sched, x, t, noise, "l2", None, prediction_type, None, mask).asnumpy())

            raw = x0_numpy(sched, x_t.asnumpy(), t, first, prediction_type)
            estimate = np.clip(raw, -1.0, 1.0)
            with_estimate = mse(estimate)
            assert loss([1, 1]) == pytest.approx(with_estimate, rel=1e-5), prediction_type
            assert abs(with_estimate - mse(zeros)) > 1e-4 * mse(zeros)  # the cases can be told apart
            if prediction_type == "eps":
                assert loss([0, 0]) == pytest.approx(mse(zeros), rel=1e-6)
                assert loss([1, 0]) == pytest.approx(mse(np.concatenate([estimate[:1], zeros[1:]])), rel=1e-5)


def test_no_gradient_flows_through_the_first_pass():
    """The gradient of the training step's LossAndGrads (mask 1) equals the gradient with the x_0 estimate fed as a
    constant, and differs from the gradient that also flows through the first pass (so the check can fail)."""
    model, sched, x, t, noise = loss_inputs("eps")
    params = model.trainable_params()
    ones = Tensor(np.ones(BATCH, np.float32))
    with pynative():
        x_t, tt = q_sample(sched, x, t, noise), Tensor(t)
        target = training_target(sched, Tensor(x), tt, Tensor(noise), "eps")
        _, grads = LossAndGrads(model, sched, params, None, "l2", False, "eps", None)(
            Tensor(x), tt, Tensor(noise), None, ones)

        def with_second(second):
            return lambda: ((model(x_t, tt, None, second()) - target) ** 2).mean()

        first = model(x_t, tt, None, ops.zeros_like(x_t))
        raw = x0_numpy(sched, x_t.asnumpy(), t, first.asnumpy(), "eps")
        assert 0.2 < (np.abs(raw) < 1).mean()  # mostly unclipped: the estimate depends on the weights
        estimate = self_condition_estimate(model, sched, x_t, tt, None, ones, "eps")
        np.testing.assert_allclose(estimate.asnumpy(), np.clip(raw, -1, 1), atol=1e-5)
        constant = Tensor(estimate.asnumpy())
        want = ms.grad(with_second(lambda: constant), None, params)()
        a = Tensor(np.sqrt(sched.alphas_cumprod[t]).astype(np.float32).reshape(-1, 1, 1, 1))
        s = Tensor(np.sqrt(1 - sched.alphas_cumprod[t]).astype(np.float32).reshape(-1, 1, 1, 1))

        def flowing():  # the same estimate as a function of the weights
            return ops.clamp((x_t - s * model(x_t, tt, None, ops.zeros_like(x_t))) / a, -1.0, 1.0)

        flow = ms.grad(with_second(flowing), None, params)()
    differs = 0
    for g, w, f in zip(grads, want, flow):
        g, w, f = g.asnumpy(), w.asnumpy(), f.asnumpy()
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
        differs += not np.allclose(f, w, rtol=1e-2, atol=1e-2 * np.abs(w).max())
    assert differs > len(want) // 4


def test_compiled_step_losses_with_the_mask_all_zero_and_all_one(trainer):
    """The compiled step (mask as a graph input) reports the loss of the network called with zeros (mask 0) or with
    the clipped x_0 estimate of its first pass (mask 1), at the weights before the update."""
    sched = trainer.sched
    for seed, mask in ((10, np.zeros(BATCH, np.float32)), (11, np.ones(BATCH, np.float32))):
        x = images(seed, low=-0.5, high=0.5)
        t = np.array([2, 9], np.int32)
        noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
        with pynative():
            x_t, tt = q_sample(sched, x, t, noise), Tensor(t)
            target = training_target(sched, Tensor(x), tt, Tensor(noise), "v").asnumpy().astype(np.float64)
            second = np.zeros_like(x)
            if mask[0]:
                first = trainer.model(x_t, tt, None, Tensor(second)).asnumpy()
                second = np.clip(x0_numpy(sched, x_t.asnumpy(), t, first, "v"), -1, 1).astype(np.float32)
            out = trainer.model(x_t, tt, None, Tensor(second)).asnumpy().astype(np.float64)
        per_sample = ((out - target) ** 2).reshape(BATCH, -1).mean(1)
        stats = read_stats(trainer.run_step(x, t, noise, None, mask))
        assert stats["applied"]
        assert stats["loss"] == pytest.approx(per_sample.mean(), rel=2e-5)


def _recorded_draws(cfg, x, labels, step, rank=0):
    """(t, noise, y, mask) that Trainer.step_stats draws for ``step`` (run_step replaced by a recorder)."""
    tr = Trainer(cfg, "CPU", steps_per_epoch=100, rank=rank)
    got = []
    tr.run_step = lambda *inputs: got.append(inputs)
    tr.step = step
    tr.step_stats(x, labels)
    x_start, t, noise, y, mask = got[0]
    return t, noise, y, mask


def test_mask_draw_half_of_the_batch_from_seed_step_rank_after_the_other_draws():
    batch = 4096
    common = [f"image_size={SIZE}", f"batch_size={batch}", "num_classes=3", "max_steps=100"]
    on, off = (load_config(TINY, common + [f"self_condition={v}"]) for v in ("true", "false"))
    x = np.zeros((batch, 1, SIZE, SIZE), np.float32)
    labels = np.arange(batch) % 3
    t, noise, y, mask = _recorded_draws(on, x, labels, step=5)
    assert mask.dtype == np.float32 and mask.shape == (batch,) and set(np.unique(mask)) == {0.0, 1.0}
    assert abs(mask.mean() - 0.5) < 0.03  # 4 standard errors
    t_off, noise_off, y_off, mask_off = _recorded_draws(off, x, labels, step=5)
    assert mask_off is None
    np.testing.assert_array_equal(t, t_off)
    np.testing.assert_array_equal(noise, noise_off)
    np.testing.assert_array_equal(y, y_off)
    # the mask depends on (seed, step, rank) only: not on the images, and differs between steps and ranks
    np.testing.assert_array_equal(_recorded_draws(on, x + 0.5, labels, step=5)[3], mask)
    assert not np.array_equal(_recorded_draws(on, x, labels, step=6)[3], mask)
    assert not np.array_equal(_recorded_draws(on, x, labels, step=5, rank=1)[3], mask)
    other_seed = load_config(TINY, common + ["self_condition=true", "seed=1"])
    assert not np.array_equal(_recorded_draws(other_seed, x, labels, step=5)[3], mask)


def test_resume_continues_bit_identically(trainer, tmp_path):
    """A self-conditioned run saved at step 2 and restored into a new Trainer takes the same next steps
    (the masks are re-derived from seed, step and rank like the other draws)."""
    while trainer.step < 2:
        trainer.step_stats(Tensor(images(100 + trainer.step)))
    saved_at = trainer.step
    path = trainer.save(ckpt.CheckpointManager(str(tmp_path), keep=5), 0, saved_at)

    def continue_from(tr):
        stats = [tr.step_stats(Tensor(images(200 + tr.step))).asnumpy() for _ in range(2)]
        groups = tr.state_groups()
        return stats, {(g, n): p.asnumpy().copy() for g in groups for n, p in groups[g].items()}

    stats_a, state_a = continue_from(trainer)
    resumed = Trainer(load_config(TINY, SC), "CPU", steps_per_epoch=100)
    groups, meta = ckpt.load(path)
    resumed.restore(path, groups, meta)
    assert resumed.step == saved_at
    stats_b, state_b = continue_from(resumed)
    for a, b in zip(stats_a, stats_b):
        np.testing.assert_array_equal(a, b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=str(key))
    # a model without self-conditioning is another architecture: it cannot resume this checkpoint
    with pytest.raises(UserError, match="self_condition"):
        ckpt.check_compatible({"config": meta["config"]}, load_config(TINY, BASE), ARCH_KEYS, path)


# ----- sampling -----


class RecordingEps:
    """A fake self-conditioned eps_fn (eps-prediction): records (x, t, x_self_cond, output) of every call."""

    self_condition = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, x_self_cond=None):
        out = -2.0 * x - 0.01 * t.astype(ms.float32).reshape(-1, 1, 1, 1)  # x_0 often outside [-1, 1]
        self.calls.append((x.asnumpy(), int(t.asnumpy()[0]), x_self_cond.asnumpy(), out.asnumpy()))
        return out


def check_chain(sched, calls, count):
    """The second input of call k is the clipped x_0 prediction of call k - 1; zeros at the first call."""
    assert len(calls) == count
    np.testing.assert_array_equal(calls[0][2], 0.0)
    clipped = 0
    for (x, t, _, out), (_, _, second, _) in zip(calls, calls[1:]):
        raw = x0_numpy(sched, x, np.full(len(x), t), out, "eps")
        np.testing.assert_allclose(second, np.clip(raw, -1, 1), rtol=1e-5, atol=1e-5)
        clipped += (np.abs(raw) > 1).sum()
    assert clipped > 0


@pytest.mark.parametrize("sampler, steps, calls", [("ddim", 5, 5), ("dpm-solver++", 5, 5), ("heun", 4, 7),
                                                    ("ddpm", 4, 4)])
@pytest.mark.parametrize("clip", [True, False])
def test_each_call_gets_the_previous_clipped_x0(sampler, steps, calls, clip):
    sched = create_schedule(load_config(TINY))
    eps = RecordingEps()
    sample(eps, sched, (3, 1, 4, 4), sampler, steps, eta=0.5, seed=0, clip_denoised=clip, progress=False)
    check_chain(sched, eps.calls, calls)  # heun: 2N - 1 calls, its corrections included


def test_editing_loops_pass_it_too():
    sched = create_schedule(load_config(TINY))
    x_in = np.random.default_rng(0).uniform(-1, 1, (2, 1, 4, 4)).astype(np.float32)
    known = np.zeros(x_in.shape, bool)
    known[..., :2] = True
    eps = RecordingEps()  # RePaint: 6 steps, back up 3 and down again twice -> 12 calls
    inpaint(eps, sched, x_in, known, "ddpm", steps=6, jump_length=3, jump_n_sample=3, progress=False)
    check_chain(sched, eps.calls, 12)
    eps = RecordingEps()
    img2img(eps, sched, x_in, 0.5, "ddim", steps=10, progress=False)
    check_chain(sched, eps.calls, 5)


class RecordingModel:
    """A fake self-conditioned network for make_eps_fn: records (x, t, y, x_self_cond) of every call."""

    self_condition = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None, x_self_cond=None):
        self.calls.append(tuple(None if v is None else v.asnumpy() for v in (x, t, y, x_self_cond)))
        return 0.5 * x + 0.1 * y.astype(x.dtype).reshape(-1, 1, 1, 1)


def test_guidance_gives_both_halves_the_same_input():
    cfg = load_config(TINY, ["num_classes=3", "self_condition=true", "image_size=4"])
    sched = create_schedule(cfg)
    model = RecordingModel()
    eps_fn = model_eps_fn(model, cfg, 2, classes=[2, 0], guidance=3.0)
    seen = []  # what the sampler passes to the guided eps_fn

    def guided(x, t, x_self_cond=None):
        out = eps_fn(x, t, x_self_cond=x_self_cond)
        seen.append((x.asnumpy(), int(t.asnumpy()[0]), x_self_cond.asnumpy(), out.asnumpy()))
        return out

    guided.self_condition = True
    sample(guided, sched, (2, 1, 4, 4), "dpm-solver++", 4, seed=1, progress=False)
    check_chain(sched, seen, 4)
    for (x, _, y, second), (_, _, second_s, _) in zip(model.calls, seen):
        assert x.shape[0] == 4 and list(y) == [2, 0, 3, 3]
        np.testing.assert_array_equal(x[:2], x[2:])
        np.testing.assert_array_equal(second[:2], second_s)
        np.testing.assert_array_equal(second[2:], second_s)
    # guidance 0: one call of the conditional half, with the same input
    model.calls.clear()
    fn = guided_eps_fn(make_eps_fn(model), [1, 2], 0.0, 3)
    assert fn.self_condition
    fn(Tensor(np.ones((2, 1, 4, 4), np.float32)), Tensor(np.zeros(2, np.int32)),
       x_self_cond=Tensor(np.full((2, 1, 4, 4), 0.25, np.float32)))
    assert list(model.calls[0][2]) == [1, 2] and np.all(model.calls[0][3] == 0.25)


# ----- export, conversion, float16 -----


def test_exported_mindir_and_onnx_sample_like_the_checkpoint(tmp_path):
    """A class-conditional self-conditioned model exported with guidance in the graph and x_self_cond as its last
    input: the same network output and the same samples (DDIM, DPM-Solver++) as the checkpoint."""
    cfg = load_config(TINY, [f"image_size={SIZE}", "self_condition=true", "num_classes=3", "prediction_type=v"])
    ms.set_seed(3)
    params = ckpt.named_params(create_model(cfg, fast_kernels=False))
    ema = {k: v.asnumpy() * np.float32(1.01) + np.float32(0.01) for k, v in params.items()}
    path = ckpt.save(str(tmp_path / "sc.ckpt"), {"model": params, "ema": ema}, {"config": cfg, "step": 3})
    ref, sched, cfg = load(path, fast_kernels=False)[:3]
    classes, batch = [1, 0, 2, 1], 4
    try:
        import onnxruntime  # noqa: F401
        formats = ("mindir", "onnx")
    except ImportError:
        formats = ("mindir",)
    x = Tensor(np.random.default_rng(5).standard_normal((batch, 1, SIZE, SIZE)).astype(np.float32))
    t = Tensor(np.array([0, 6, 13, 19], np.int32))
    second = Tensor(images(6, batch))
    want_eps = guided_eps_fn(make_eps_fn(ref), classes, 2.5, 3)
    for fmt in formats:
        out = str(tmp_path / f"sc.{fmt}")
        export_mod.export(path, fmt, batch, out)
        meta = json.load(open(out + ".json"))
        assert [s["name"] for s in meta["inputs"]] == ["x", "t", "y", "guidance", "x_self_cond"]
        assert meta["self_condition"] is True and meta["inputs"][4]["shape"] == [batch, 1, SIZE, SIZE]
        net = load_exported(out)
        eps_fn = net.make_eps_fn(batch, classes, 2.5)
        assert eps_fn.self_condition
        got, want = eps_fn(x, t, x_self_cond=second).asnumpy(), want_eps(x, t, x_self_cond=second).asnumpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert np.abs(got - eps_fn(x, t).asnumpy()).max() > 1e-3  # the input is used
        for sampler in ("ddim", "dpm-solver++"):
            kw = dict(sampler=sampler, steps=4, seed=7, progress=False, classes=classes, guidance=2.5)
            want_x, _ = generate(ref, sched, cfg, batch, **kw)
            got_x, _ = generate(net, net.sched, net.cfg, batch, **kw)
            assert (np.abs(want_x) < 0.99).mean() > 0.1  # not all clipped
            assert np.abs(got_x - want_x).max() < 1e-4, (fmt, sampler)


def test_diffusers_conversion_refuses_self_conditioned_models(tmp_path, capsys):
    cfg = load_config(TINY, [f"image_size={SIZE}", "self_condition=true"] + DDPM)
    path = str(tmp_path / "sc.ckpt")
    ckpt.save(path, {"model": {}}, {"config": cfg, "step": 0})
    with pytest.raises(UserError, match="self-conditioned model .* no self-conditioning input"):
        convert.to_diffusers(path, str(tmp_path / "out"))
    line = one_line_error(convert.main, ["--to-diffusers", path, "--out", str(tmp_path / "out")], capsys)
    assert "self-conditioned" in line and not (tmp_path / "out").exists()
    folder = tmp_path / "diffusers"
    folder.mkdir()
    plain = load_config(TINY, [f"image_size={SIZE}"] + DDPM)
    (folder / "config.json").write_text(json.dumps(convert.cfg_to_unet_config(plain)))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="self_condition: true does not fit a diffusers UNet2DModel"):
        convert.from_diffusers(str(folder), str(tmp_path / "c.ckpt"), {"self_condition": True})
    assert not (tmp_path / "c.ckpt").exists()


def test_float16_with_gradient_accumulation_trains_and_samples(monkeypatch):
    cfg = load_config(TINY, [f"image_size={SIZE}", "batch_size=4", "grad_accum_steps=2", "dtype=float16",
                             "self_condition=true", "max_steps=100", "sample_steps=3"])
    tr = Trainer(cfg, "CPU", steps_per_epoch=100)
    assert tr.scale_loss
    loss, applied = tr.train_step(Tensor(images(20, 4)))
    assert np.isfinite(loss) and applied
    samples, _ = tr.generate(2, seed=0, progress=False)
    assert samples.shape == (2, 1, SIZE, SIZE) and np.isfinite(samples).all() and np.abs(samples).max() > 0
    # the mask is cut into the micro-batches like the other per-sample inputs
    seen = []
    monkeypatch.setattr(tr, "micro_cell", lambda *inputs: seen.append(inputs) or Tensor(np.float32(0)))
    monkeypatch.setattr(tr, "apply_cell", lambda loss: loss)
    mask = np.array([1, 0, 0, 1], np.float32)
    tr.run_step(images(21, 4), np.arange(4, dtype=np.int32), images(22, 4), None, mask)
    assert [len(inputs) for inputs in seen] == [5, 5] and seen[0][3] is None
    np.testing.assert_array_equal(seen[0][4].asnumpy(), mask[:2])
    np.testing.assert_array_equal(seen[1][4].asnumpy(), mask[2:])
    np.testing.assert_array_equal(seen[1][0].asnumpy(), images(21, 4)[2:])
