"""The Ascend/GPU precision path (float16 compute, GroupNorm in float32, loss scaling), run on CPU.

MindSpore's CPU backend runs the U-Net's float16 ops and their gradients, so ``dtype=float16``
executes here the policy, the DynamicLossScaler and the overflow handling of Ascend/GPU.
"""

import ddpm_ms  # noqa: F401  (before mindspore: it sets ONEDNN_MAX_CPU_ISA)

import csv
import os

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from idx_files import write_blob_dataset
from tiny_config import TINY
from mindspore import Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.config import load_config
from ddpm_ms.factory import cast_model, create_model
from ddpm_ms.models.layers import GroupNorm
from ddpm_ms.train import train
from ddpm_ms.training.trainer import Trainer
from ddpm_ms.models.tutorial_unet import SinusoidalPositionEmbeddings



@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_float16_policy_keeps_the_float32_parameter_names_and_norms():
    cfg = load_config(TINY, [])
    names32 = list(ckpt.named_params(create_model(cfg)))
    model = create_model(cfg)
    net = cast_model(model, ms.float16)
    assert net is model  # flagged in place, nothing wrapped
    assert list(ckpt.named_params(net)) == names32
    assert [p.name for p in net.trainable_params()] == [p.name for p in create_model(cfg).trainable_params()]
    norms = [c for _, c in net.cells_and_names() if isinstance(c, GroupNorm)]
    assert norms and all(c.out_dtype == ms.float16 for c in norms)
    # the timestep embedding stays float32: float16 would put sin/cos of t = 999 off by up to 0.15
    t = Tensor(np.array([999, 500, 3], np.int32))
    np.testing.assert_array_equal(net.time_mlp[0](t).asnumpy(), SinusoidalPositionEmbeddings(cfg["dim"])(t).asnumpy())
    # the trainer's state (what checkpoints hold) has the same names in both precisions
    groups16 = Trainer(load_config(TINY, ["dtype=float16"]), "CPU", steps_per_epoch=10).state_groups()
    groups32 = Trainer(cfg, "CPU", steps_per_epoch=10).state_groups()
    for group in groups32:
        assert list(groups16[group]) == list(groups32[group]), group


def _params(tr):
    return {n: p.asnumpy().copy() for n, p in ckpt.named_params(tr.model).items()}


def test_forced_overflow_skips_halves_the_scale_and_keeps_the_lr_schedule_on_its_step():
    """A 2^40 initial loss scale overflows float16 gradients: the update is skipped, the scale
    halves, and the next (finite) step applies the rate of step 2, not step 1. Adam's first
    applied update moves a weight by lr * g / (|g| + eps), i.e. by the rate itself where |g| >> eps."""
    cfg = load_config(TINY, ["dtype=float16", "loss_scale=1099511627776", "lr=0.004", "warmup_steps=4",
                             "lr_schedule=constant", "batch_size=4"])
    tr = Trainer(cfg, "CPU", steps_per_epoch=10)
    assert tr.dtype == ms.float16 and tr.scale_loss
    assert tr.lrs[:3] == [0.001, 0.002, 0.003]
    x = Tensor(np.random.default_rng(3).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32))
    before = _params(tr)
    loss, applied = tr.train_step(x)
    assert np.isfinite(loss) and not applied
    assert tr.loss_scale() == 2.0 ** 39
    assert all(np.array_equal(before[n], v) for n, v in _params(tr).items()), "the overflowed update was applied"
    assert int(tr.optimizer.global_step.asnumpy()[0]) == tr.step == 1  # the schedule stays on the step
    tr.scaler.scale_value.set_data(Tensor(1024.0, ms.float32))  # a scale float16 holds
    loss, applied = tr.train_step(x)
    assert applied and tr.loss_scale() == 1024.0 and int(tr.optimizer.global_step.asnumpy()[0]) == 2
    after = _params(tr)
    moved = np.concatenate([np.abs(after[n] - before[n]).ravel() for n in before])
    moved = moved[moved > 0]
    assert moved.size > 0.9 * sum(v.size for v in before.values())
    np.testing.assert_allclose(np.median(moved), tr.lrs[1], rtol=1e-3)  # not lrs[0] = 0.001


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def float16_run(tmp_path_factory):
    """A float16 run over 2 epochs of 2 steps; its first step overflows (initial scale 2^40, which
    the factor 2^24 brings down to 2^16 in one skip)."""
    tmp = tmp_path_factory.mktemp("fp16")
    data_dir = write_blob_dataset(tmp / "data", n_train=16)
    common = [f"data_dir={data_dir}", "batch_size=8", "num_samples=2", "sample_steps=2", "gif_frames=2",
              "keep_checkpoints=10", "warmup_steps=2", "max_steps=null"]
    out = str(tmp / "run16")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        train(load_config(TINY, common + [f"output_dir={out}", "dtype=float16", "epochs=2",
                                          "loss_scale=1099511627776", "loss_scale_factor=16777216",
                                          "sample_every=1"]), progress=False)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    return out, common


def test_float16_run_writes_epoch_grid_final_samples_and_lr_of_the_step(float16_run):
    out, _ = float16_run
    with Image.open(os.path.join(out, "samples", "epoch_001.png")) as grid:  # 2 samples side by side, scale 2
        assert grid.size == (2 * (2 * (28 + 2) + 2), 2 * (28 + 2 + 2))
        assert np.asarray(grid)[4:-4, 4:-4].std() > 0  # sampled images, not a blank grid
    images = np.load(os.path.join(out, "samples.npy"))
    assert images.shape == (2, 1, 28, 28) and np.isfinite(images).all()
    rows = _rows(os.path.join(out, "loss.csv"))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["finite"] for r in rows] == ["0", "1", "1", "1"]  # the overflow skipped, then float16 trains
    assert [r["loss_scale"] for r in rows] == ["65536"] * 4
    # the lr column follows the warm-up (step i + 1 of 2), then the cosine, whatever was skipped
    cfg = load_config(TINY, ["max_steps=null", "epochs=2", "warmup_steps=2"])
    expected = Trainer(cfg, "CPU", steps_per_epoch=2).lrs
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    groups, meta = ckpt.load(os.path.join(out, "checkpoints", "ckpt_step00000004.ckpt"))
    assert int(groups["opt"]["global_step"].asnumpy()[0]) == meta["step"] == 4


def test_float16_checkpoint_samples_and_evaluates_in_float32(float16_run, tmp_path):
    from ddpm_ms import evaluate
    from ddpm_ms import sample

    out, _ = float16_run
    ckpt_path = os.path.join(out, "checkpoints", "ckpt_step00000004.ckpt")
    sample.main(["--checkpoint", ckpt_path, "--num", "2", "--steps", "2", "--device", "CPU", "--dtype", "float32",
                 "--no-progress", "--out", str(tmp_path)])
    images32 = np.load(tmp_path / "samples_ddim_2_seed0.npy")
    assert images32.shape == (2, 1, 28, 28) and np.isfinite(images32).all()
    # ddpm-evaluate --checkpoint in float32, with a fixed-seed classifier in its cache (no training)
    from ddpm_ms.evaluation import classifier as C

    ms.set_seed(123)
    net = C.FashionCNN()
    net.set_train(False)
    cache = tmp_path / "cache"
    C.save_classifier(net, str(cache / (C.cache_key() + ".ckpt")),
                      {"version": C.CLASSIFIER_VERSION, "key": C.cache_key(), "test_accuracy": 0.0})
    data_dir = write_blob_dataset(tmp_path / "data", n_train=32, n_test=16)
    result = evaluate.main(["--checkpoint", ckpt_path, "--num", "4", "--steps", "2", "--dtype", "float32",
                            "--device", "CPU", "--data-dir", data_dir, "--cache-dir", str(cache), "--no-progress",
                            "--splits", "2", "--k", "1"])
    assert result["source"]["checkpoint"] == os.path.abspath(ckpt_path) and np.isfinite(result["fd"])


def test_float16_checkpoint_resumes_in_float32_and_float32_in_float16(float16_run, tmp_path):
    import shutil

    out, common = float16_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    ms.set_context(mode=ms.GRAPH_MODE)
    # float16 checkpoint (step 4) -> float32 process, 2 more steps -> float32 checkpoint (step 6)
    train(load_config(TINY, common + [f"output_dir={run}", "dtype=float32", "epochs=3", "sample_every=0"]),
          resume=True, progress=False)
    # float32 checkpoint -> float16 process, 2 more steps
    train(load_config(TINY, common + [f"output_dir={run}", "dtype=float16", "epochs=4", "sample_every=0"]),
          resume=True, progress=False)
    rows = _rows(os.path.join(run, "loss.csv"))
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 9)]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert [r["loss_scale"] for r in rows[4:6]] == ["1", "1"]  # float32: no scaling
    # float16 again: the scaler state saved by the float32 run (untouched there) carries on
    assert rows[6]["loss_scale"] == rows[3]["loss_scale"] and rows[6]["finite"] == "1"
    g6, _ = ckpt.load(os.path.join(run, "checkpoints", "ckpt_step00000006.ckpt"))
    g8, m8 = ckpt.load(os.path.join(run, "checkpoints", "ckpt_step00000008.ckpt"))
    assert m8["step"] == 8 and g8["model"].keys() == g6["model"].keys()
    assert any(not np.array_equal(g6["model"][n].asnumpy(), g8["model"][n].asnumpy()) for n in g6["model"])
