"""The compiled training step, the loss scaler, the LR schedule, and exact resume from a checkpoint."""

import ddpm_ms  # noqa: F401

import csv
import os
import shutil

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.models import kernels
from ddpm_ms.config import load_config
from ddpm_ms.training.ema import EMA
from ddpm_ms.training.lr_schedule import learning_rates
from ddpm_ms.train import train
from ddpm_ms.training.trainer import Trainer, read_stats
from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

# the other prediction objectives (eps is the default), each with min-SNR weighting; v also with zero terminal SNR
OBJECTIVES = {"x0": ["prediction_type=x0", "loss_weighting=min_snr"],
              "v": ["prediction_type=v", "loss_weighting=min_snr", "zero_terminal_snr=true"]}


@pytest.fixture(scope="module")
def trainer():
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = load_config(TINY, ["lr=0.003", "ema_decay=0.5", "ema_warmup=false", "max_steps=100"])
    tr = Trainer(cfg, "CPU", steps_per_epoch=100)
    yield tr
    ms.set_context(mode=ms.PYNATIVE_MODE)


def params_np(params):
    return {n: p.asnumpy().copy() for n, p in params.items()}


def test_compiled_step_reduces_loss_on_fixed_batch(trainer):
    rng = np.random.default_rng(0)
    x = Tensor(rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32))
    t = Tensor(rng.integers(0, 20, 8).astype(np.int32))
    noise = Tensor(rng.standard_normal((8, 1, 28, 28)).astype(np.float32))
    losses = [read_stats(trainer.step_cell(x, t, noise))["loss"] for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_scaler_skips_update_on_overflow(trainer):
    """float32 (CPU): no loss scaling, but non-finite gradients still skip Adam and the EMA."""
    assert not trainer.scale_loss and trainer.loss_scale() == 1.0
    x = np.zeros((8, 1, 28, 28), np.float32)
    t = Tensor(np.arange(8, dtype=np.int32))
    noise = Tensor(np.ones((8, 1, 28, 28), np.float32))
    before = params_np(ckpt.named_params(trainer.model))
    ema_before = [s.asnumpy().copy() for s in trainer.ema.shadow]
    scale_before = float(trainer.scaler.scale_value.asnumpy())
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf  # an inf input makes every gradient non-finite
    assert not read_stats(trainer.step_cell(Tensor(bad), t, noise))["applied"]
    after = params_np(ckpt.named_params(trainer.model))
    assert all(np.array_equal(before[n], after[n]) for n in before), "update was not skipped"
    assert all(np.array_equal(a, s.asnumpy()) for a, s in zip(ema_before, trainer.ema.shadow))
    assert float(trainer.scaler.scale_value.asnumpy()) == scale_before  # the unused scaler is untouched
    # a finite step afterwards updates the weights and the EMA again
    assert read_stats(trainer.step_cell(Tensor(x), t, noise))["applied"]
    after = params_np(ckpt.named_params(trainer.model))
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    assert any(not np.array_equal(a, s.asnumpy()) for a, s in zip(ema_before, trainer.ema.shadow))


def _state_np(tr):
    """Weights, EMA weights and Adam state of a Trainer as NumPy arrays."""
    groups = tr.state_groups()
    return {(g, n): p.asnumpy().copy() for g in ("model", "ema", "opt") for n, p in groups[g].items()}


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_float32_training_is_the_same_with_and_without_loss_scaling(objective):
    """Scaling by 2^16 and unscaling is exact in float32: skipping it (the float32 default)
    gives bit-identical losses, weights, EMA and Adam state; with it the scale halves on overflow
    (for every prediction objective). On tiny.yaml's network with one level and no attention: exactness
    does not depend on the layers, and it compiles in about half the time."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        cfg = load_config(TINY, ["lr=0.003", "batch_size=4", "ema_decay=0.9", *FLAT] + OBJECTIVES.get(objective, []))
        scaled, plain = (Trainer(cfg, "CPU", steps_per_epoch=10, scale_loss=s) for s in (True, False))
        assert scaled.scale_loss and not plain.scale_loss
        if objective == "eps":  # the default (whatever the objective): scale only float16 compute
            assert not Trainer(cfg, "CPU", steps_per_epoch=10).scale_loss
            assert Trainer(load_config(TINY, ["dtype=float16"]), "CPU", steps_per_epoch=10).scale_loss
        rng = np.random.default_rng(5)
        batches = [Tensor(rng.uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32)) for _ in range(4)]
        assert [scaled.train_step(x) for x in batches] == [plain.train_step(x) for x in batches]
        a, b = _state_np(scaled), _state_np(plain)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key
        assert scaled.loss_scale() == 65536.0 and plain.loss_scale() == 1.0
        bad = batches[0].asnumpy().copy()
        bad[0, 0, 0, 0] = np.nan
        assert scaled.train_step(Tensor(bad))[1] is False
        assert scaled.loss_scale() == 32768.0
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_ema_tracks_weights_with_its_decay(trainer):
    params = trainer.model.trainable_params()
    shadow_before = [s.asnumpy().astype(np.float64) for s in trainer.ema.shadow]
    trainer.ema()  # one EMA update with decay 0.5 (warm-up off)
    for p, s0, s1 in zip(params, shadow_before, trainer.ema.shadow):
        assert np.allclose(s1.asnumpy(), 0.5 * s0 + 0.5 * p.asnumpy(), atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_ema_update_equals_the_float32_formula_bit_for_bit(monkeypatch, fast):
    """The fused CPU kernel and the per-tensor ops both give shadow * d + param * (1 - d) in
    float32, d = min(decay, (1 + n) / (10 + n)), exactly, over several updates."""
    monkeypatch.setenv("DDPM_MS_FAST_KERNELS", "1" if fast else "0")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        rng = np.random.default_rng(3)
        shapes = [(3, 4), (70001,), (2, 3, 4, 5), (1,), (64, 32, 3, 3)]
        params = [ms.Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"w{i}")
                  for i, s in enumerate(shapes)]
        ema = EMA(params, decay=0.95, warmup=True)
        assert (ema._fast is not None) == (fast and kernels.enabled())
        ref = [p.asnumpy().copy() for p in params]
        f32 = np.float32
        for n in range(6):
            for p in params:
                p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))
            d = min(f32(0.95), (f32(1) + f32(n)) / (f32(10) + f32(n)))
            ref = [r * d + p.asnumpy() * (f32(1) - d) for r, p in zip(ref, params)]
            ema()
            for r, s in zip(ref, ema.shadow):
                assert np.array_equal(r, s.asnumpy()), (n, s.name)
        assert float(ema.num_updates.asnumpy()) == 6
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_learning_rates_warmup_then_cosine():
    lrs = learning_rates(1e-3, 1e-6, 100, warmup_steps=10)
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[50] < lrs[20] < lrs[10] and lrs[-1] < 2e-5
    assert learning_rates(1e-3, 0, 5, schedule="constant") == [1e-3] * 5


def read_losses(path):
    with open(path) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_resume_continues_from_the_same_state(tmp_path, objective="v"):
    """An interrupted run resumed from its step-3 checkpoint equals the uninterrupted run. With the recipes'
    objective (v-prediction, min-SNR weights, zero terminal SNR: the one with every objective key set; the
    default eps one resumes in tests/test_crash_resume.py). The objective adds no state of its own: the
    checkpoint's config carries it."""
    data_dir = write_blob_dataset(tmp_path / "data", n_train=48)
    common = [f"data_dir={data_dir}", "max_steps=6", "save_every_steps=3", "keep_checkpoints=5",
              "num_samples=2", "sample_every=0", "gif_frames=2", "sample_steps=2"] + OBJECTIVES.get(objective, [])
    run_a = str(tmp_path / "a")
    train(load_config(TINY, common + [f"output_dir={run_a}"]), progress=False)
    # run B: a copy of A that "crashed" after step 3 (its step-6 checkpoint and last rows lost)
    run_b = str(tmp_path / "b")
    shutil.copytree(run_a, run_b)
    os.remove(os.path.join(run_b, "checkpoints", "ckpt_step00000006.ckpt"))
    train(load_config(TINY, common + [f"output_dir={run_b}"]), resume=True, progress=False)

    assert read_losses(os.path.join(run_a, "loss.csv")) == read_losses(os.path.join(run_b, "loss.csv"))
    assert [s for s, _ in read_losses(os.path.join(run_b, "loss.csv"))] == [1, 2, 3, 4, 5, 6]
    ga, ma = ckpt.load(os.path.join(run_a, "checkpoints", "ckpt_step00000006.ckpt"))
    gb, mb = ckpt.load(os.path.join(run_b, "checkpoints", "ckpt_step00000006.ckpt"))
    assert ma["step"] == mb["step"] == 6
    for group in ("model", "ema", "opt", "state"):
        assert ga[group].keys() == gb[group].keys() and ga[group]
        for name in ga[group]:
            assert np.array_equal(ga[group][name].asnumpy(), gb[group][name].asnumpy()), (group, name)
    for name in ("samples.png", "samples.npy", "denoising.gif", "loss_curve.png", "config.yaml"):
        assert os.path.getsize(os.path.join(run_b, name)) > 0
    assert np.array_equal(np.load(os.path.join(run_a, "samples.npy")), np.load(os.path.join(run_b, "samples.npy")))


def test_jit_level_reaches_the_compiled_cells_and_o1_trains_alike():
    """jit_level=O1 (MindSpore's automatic operator fusion) is set on the train step and the
    sampling model, and on CPU it computes the same first steps as the default O0."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        x = Tensor(np.random.default_rng(1).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32))
        losses = {}
        for level in ("O0", "O1"):
            cfg = load_config(TINY, [f"jit_level={level}", "batch_size=4"])
            tr = Trainer(cfg, "CPU", steps_per_epoch=10)
            assert tr.step_cell._jit_config_dict["jit_level"] == level
            assert tr.sample_model()._jit_config_dict["jit_level"] == level
            losses[level] = [float(tr.train_step(x)[0]) for _ in range(2)]
        np.testing.assert_allclose(losses["O1"], losses["O0"], rtol=1e-5)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_max_steps_beyond_the_epochs_extends_them_with_one_notice(capsys):
    from ddpm_ms.training.lr_schedule import steps_and_epochs

    # quick.yaml's case: epochs=1 of 937 steps, max_steps=3600 -> 4 epochs, exactly 3600 steps
    assert steps_and_epochs(1, 3600, 937) == (4, 3600)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_steps=3600 needs 4 epochs" in err
    # max_steps within the epochs stops early, without a word; no max_steps: whole epochs
    assert steps_and_epochs(2, 600, 937) == (2, 600)
    assert steps_and_epochs(3, None, 10) == (3, 30)
    assert steps_and_epochs(1, 20, 10, notify=False) == (2, 20)
    assert capsys.readouterr().err == ""


DDPM_TINY = ["arch=ddpm", "layers_per_block=1", "attn_levels=[1]"]


def test_dropout_is_on_in_training_and_differs_between_ranks():
    """At lr ~ 0 two steps on the same batch give the same loss unless dropout draws new masks:
    with dropout 0.5 they differ, with dropout 0 they are equal; rank 1 draws other masks than rank 0."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        rng = np.random.default_rng(2)
        x = rng.uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32)
        t = np.array([1, 5, 9, 15], np.int32)
        noise = rng.standard_normal(x.shape).astype(np.float32)

        def losses(dropout, rank):
            cfg = load_config(TINY, DDPM_TINY + [f"dropout={dropout}", "lr=1e-30", "min_lr=0", "lr_schedule=constant",
                                                 "batch_size=4"])
            tr = Trainer(cfg, "CPU", steps_per_epoch=10, rank=rank)
            return [read_stats(tr.run_step(x, t, noise))["loss"] for _ in range(2)]

        on = losses(0.5, 0)
        assert on[0] != on[1]
        assert losses(0.5, 1)[0] != on[0]  # as the ranks of an msrun do (tests/test_distributed.py)
        off = losses(0.0, 0)
        assert off[0] == off[1]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_gradient_accumulation_gives_the_update_of_one_batch():
    """4 micro-batches of 2 (with loss scaling) and 2 of 4 (without) make the same steps as one batch of 8:
    the same losses, weights, EMA and Adam state to float tolerance; an overflow in one micro-batch skips
    the whole step and halves the loss scale."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        base = ["batch_size=8", "lr=0.003", "ema_decay=0.9"]
        one = Trainer(load_config(TINY, base), "CPU", steps_per_epoch=10)
        by4 = Trainer(load_config(TINY, base + ["grad_accum_steps=4"]), "CPU", steps_per_epoch=10, scale_loss=True)
        by2 = Trainer(load_config(TINY, base + ["grad_accum_steps=2"]), "CPU", steps_per_epoch=10)
        rng = np.random.default_rng(7)
        for _ in range(3):
            x = rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32)
            t = rng.integers(0, 20, 8).astype(np.int32)
            noise = rng.standard_normal(x.shape).astype(np.float32)
            ref, *accumulated = (read_stats(tr.run_step(x, t, noise)) for tr in (one, by4, by2))
            for stats in accumulated:
                assert stats["applied"] and stats["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        ref = _state_np(one)
        for tr in (by4, by2):
            state = _state_np(tr)
            assert state.keys() == ref.keys()
            off = total = 0
            for key in ref:
                # Adam's first steps move weights by ~lr * sign(g): a weight whose gradient is ~0 (summed in
                # another order) may move differently; allow a few such weights (counted below), by at most a
                # tenth of a step (measured: 0.023 lr for one of 2304 weights of a 3x3 conv with the Winograd
                # convolutions, whose sums round differently from the direct kernels')
                np.testing.assert_allclose(state[key], ref[key], rtol=1e-4, atol=0.1 * 0.003, err_msg=str(key))
                off += (~np.isclose(state[key], ref[key], rtol=1e-4, atol=1e-5)).sum()
                total += ref[key].size
            assert off <= 1e-3 * total, (off, total)
        x[1, 0, 0, 0] = np.nan  # in by4's first micro-batch only
        before = _state_np(by4)
        stats = read_stats(by4.run_step(x, t, noise))
        assert not stats["applied"] and stats["loss_scale"] == by4.loss_scale() == 32768.0
        after = _state_np(by4)
        assert all(np.array_equal(before[k], after[k]) for k in before if k[0] != "opt")
        assert not any(float(np.abs(b.asnumpy()).max()) for b in by4.grad_buffers)  # zeroed for the next step
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_grad_accum_steps_must_divide_the_batch():
    from ddpm_ms.training.distributed import device_batch_size
    from ddpm_ms.utils.errors import UserError

    assert device_batch_size(load_config(TINY, ["batch_size=8", "grad_accum_steps=2"]), 2) == 4
    with pytest.raises(UserError, match="16 .* divisible by the number of devices 2 times grad_accum_steps 3"):
        device_batch_size(load_config(TINY, ["batch_size=16", "grad_accum_steps=3"]), 2)
