"""DDPMPipeline and the one loader: the same images as the commands, conditional models, exported files,
and DDPM_MS_FAST_KERNELS honoured by a command."""

import ddpm_ms  # noqa: F401  (before mindspore: it sets ONEDNN_MAX_CPU_ISA)

import os

import mindspore as ms
import numpy as np
import pytest

from ddpm_ms import gif, sample
from ddpm_ms.config import load_config
from ddpm_ms.pipeline import DDPMPipeline
from ddpm_ms.training.trainer import Trainer
from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.errors import UserError
from ddpm_ms.utils.visualize import to_uint8

TINY = os.path.join(os.path.dirname(__file__), "configs", "tiny.yaml")


@pytest.fixture(autouse=True)
def pynative_after():
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def write_run(root, overrides=()):
    """A run directory holding one checkpoint of the tiny config (one training step, so EMA != raw)."""
    cfg = load_config(TINY, ["batch_size=4", "lr=0.01"] + list(overrides))
    trainer = Trainer(cfg, "CPU", steps_per_epoch=4)
    trainer.train_step(np.random.default_rng(0).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32),
                       np.array([0, 1, 2, 0]) if cfg["num_classes"] else None)
    trainer.save(ckpt.CheckpointManager(os.path.join(root, "checkpoints")), 0, 1)
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        return {"plain": write_run(root / "plain"), "cond": write_run(root / "cond", ["num_classes=3"])}
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def command_samples(tmp_path, source, *extra):
    """``ddpm-sample`` -> (its .npy images [N, C, H, W], its PNG grid bytes)."""
    out = tmp_path / "cmd"
    sample.main(source + ["--out", str(out), "--no-progress", "--device", "CPU"] + list(extra))
    (npy,) = [f for f in os.listdir(out) if f.endswith(".npy")]
    with open(out / npy.replace(".npy", ".png"), "rb") as f:
        return np.load(out / npy), f.read()


def test_pipeline_gives_the_images_of_ddpm_sample(runs, tmp_path):
    want, png = command_samples(tmp_path, ["--checkpoint", runs["plain"]], "--num", "4", "--sampler", "ddim",
                                "--steps", "3", "--seed", "5")
    pipe = DDPMPipeline.from_checkpoint(runs["plain"], device="CPU")
    got = pipe(num=4, sampler="ddim", steps=3, seed=5, output="float")
    assert got.shape == (4, 28, 28, 1) and got.dtype == np.float32
    assert np.array_equal(got, want.transpose(0, 2, 3, 1))
    images = pipe(num=4, sampler="ddim", steps=3, seed=5)
    assert images.dtype == np.uint8 and np.array_equal(images, to_uint8(want))
    with open(pipe.save_grid(images, str(tmp_path / "grid.png")), "rb") as f:
        assert f.read() == png  # the grid of the uint8 images is the command's grid, byte for byte
    # the raw weights differ from the EMA weights, and another seed gives other images
    assert not np.array_equal(DDPMPipeline.from_checkpoint(runs["plain"], use_ema=False, device="CPU")(
        num=4, sampler="ddim", steps=3, seed=5), images)
    assert not np.array_equal(pipe(num=4, sampler="ddim", steps=3, seed=6), images)
    with pytest.raises(UserError, match="output must be"):
        pipe(num=1, output="png")


def test_pipeline_gif_is_the_file_ddpm_gif_writes(runs, tmp_path):
    gif.main(["--checkpoint", runs["plain"], "--num", "4", "--sampler", "ddim", "--steps", "4", "--frames", "3",
              "--out", str(tmp_path / "cmd.gif"), "--no-progress", "--device", "CPU"])
    pipe = DDPMPipeline.from_checkpoint(runs["plain"], device="CPU")
    path = pipe.gif(str(tmp_path / "api.gif"), num=4, sampler="ddim", steps=4, frames=3)
    with open(path, "rb") as a, open(tmp_path / "cmd.gif", "rb") as b:
        assert a.read() == b.read()


def test_class_conditional_pipeline_with_guidance(runs, tmp_path):
    want, _ = command_samples(tmp_path, ["--checkpoint", runs["cond"]], "--classes", "2,0,1,2", "--guidance", "2.5",
                              "--sampler", "dpm-solver++", "--steps", "3", "--seed", "1")
    pipe = DDPMPipeline.from_checkpoint(runs["cond"], device="CPU")
    assert pipe.num_classes == 3
    got = pipe(num=4, classes=[2, 0, 1, 2], guidance=2.5, sampler="dpm-solver++", steps=3, seed=1, output="float")
    assert np.array_equal(got, want.transpose(0, 2, 3, 1))
    unguided = pipe(num=4, classes=[2, 0, 1, 2], guidance=0.0, sampler="dpm-solver++", steps=3, seed=1,
                    output="float")
    assert not np.array_equal(unguided, got)
    with pytest.raises(UserError, match="unconditional model"):
        DDPMPipeline.from_checkpoint(runs["plain"], device="CPU")(num=2, classes=[0, 1])


def test_pipeline_from_an_exported_model(runs, tmp_path):
    from ddpm_ms.export import export

    ms.set_context(mode=ms.GRAPH_MODE)
    out = str(tmp_path / "tiny.mindir")
    export(runs["cond"], "mindir", 4, out)
    want, _ = command_samples(tmp_path, ["--exported", out], "--num", "4", "--sampler", "ddim", "--steps", "3",
                              "--guidance", "1.5")
    pipe = DDPMPipeline.from_exported(out, device="CPU")
    got = pipe(num=4, sampler="ddim", steps=3, guidance=1.5, output="float")
    assert np.array_equal(got, want.transpose(0, 2, 3, 1))
    # close to the checkpoint it came from (the export runs MindSpore's built-in ops, not the CPU kernels)
    ref = DDPMPipeline.from_checkpoint(runs["cond"], device="CPU")(num=4, sampler="ddim", steps=3, guidance=1.5,
                                                                   output="float")
    np.testing.assert_allclose(got, ref, atol=1e-4)


def fast_cells(model):
    return [name for name, cell in model.cells_and_names() if getattr(cell, "_fast", None) is not None]


@pytest.mark.parametrize("switch", ["0", None])
def test_a_sampling_command_honours_ddpm_ms_fast_kernels(runs, tmp_path, monkeypatch, switch):
    """ddpm-sample builds its network on MindSpore's own ops when DDPM_MS_FAST_KERNELS=0, and on the
    CPU kernels by default (the loader passes the user's default down to every layer)."""
    from ddpm_ms import factory, pipeline
    from ddpm_ms.models import kernels

    if switch is None:
        monkeypatch.delenv("DDPM_MS_FAST_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DDPM_MS_FAST_KERNELS", switch)
    built = []
    monkeypatch.setattr(pipeline, "create_model", lambda cfg, fk: built.append(factory.create_model(cfg, fk)) or
                        built[-1])
    command_samples(tmp_path, ["--checkpoint", runs["plain"]], "--num", "2", "--sampler", "ddim", "--steps", "2")
    (model,) = built
    if switch == "0":
        assert fast_cells(model) == []
    elif kernels.enabled():
        assert fast_cells(model)
    else:
        pytest.skip("the CPU kernels cannot be built here")
