"""DDPMPipeline and the one loader: the same images as the commands, conditional models, exported files,
and DDPM_MS_FAST_KERNELS honoured by a command. The editing commands, ddpm-inpaint and ddpm-img2img:
the files they write, the same images as the pipeline's methods, the known pixels kept bit for bit,
class-conditional and exported models, and one-line errors that write nothing."""

import ddpm_ms  # noqa: F401  (before mindspore: it sets ONEDNN_MAX_CPU_ISA)

import importlib.util
import os

import mindspore as ms
import numpy as np
import pytest

from PIL import Image

from ddpm_ms import gif, img2img, inpaint, sample
from ddpm_ms.data.folder import load_image
from ddpm_ms.data.user_images import read_mask
from ddpm_ms.config import load_config
from ddpm_ms.pipeline import DDPMPipeline
from ddpm_ms.training.trainer import Trainer
from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.errors import UserError
from ddpm_ms.utils.visualize import to_uint8
from tiny_config import TINY


try:
    from cli_checks import one_line_error
except ImportError:  # tests/ imported as a package
    from tests.cli_checks import one_line_error



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


@pytest.fixture(scope="module")
def exported_cond(runs, tmp_path_factory):
    """The class-conditional run exported for a batch of 4: {"mindir": path, "onnx": path or None (no onnxruntime)}."""
    from ddpm_ms.export import export

    ms.set_context(mode=ms.GRAPH_MODE)
    folder = tmp_path_factory.mktemp("exported")
    try:
        paths = {}
        for fmt in ("mindir", "onnx"):
            if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
                paths[fmt] = None
                continue
            paths[fmt] = str(folder / f"cond.{fmt}")
            export(runs["cond"], fmt, 4, paths[fmt])
        return paths
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


def test_pipeline_from_an_exported_model(runs, exported_cond, tmp_path):
    out = exported_cond["mindir"]
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


# ----- editing: ddpm-inpaint, ddpm-img2img and the pipeline's methods -----

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of two gray 28x28 PNGs and one 40x30 RGB PNG (converted, resized and cropped on reading)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "c wide.png")
    return folder


def expected_inputs(folder):
    return np.stack([load_image(str(folder / n), 1, 28).transpose(2, 0, 1) for n in ("a.png", "b.png", "c wide.png")])


COMMON = ["--sampler", "ddim", "--steps", "3", "--seed", "4", "--no-progress", "--device", "CPU"]


def outputs(out, kind):
    pngs = sorted(os.listdir(out / kind))
    return np.load(out / f"{kind}.npy"), [np.asarray(Image.open(out / kind / p)) for p in pngs], pngs


def test_ddpm_inpaint_writes_its_outputs_keeps_the_known_pixels_and_matches_the_pipeline(runs, photos, tmp_path):
    out = tmp_path / "out"
    inpaint.main(["--checkpoint", runs["plain"], "--images", str(photos), "--mask", "center", "--num-per-image", "2",
                  "--out", str(out)] + COMMON)
    results, pngs, names = outputs(out, "inpaint")
    inputs = expected_inputs(photos)
    assert results.shape == (6, 1, 28, 28) and results.dtype == np.float32 and len(pngs) == 6
    assert names[0].startswith("0000_a_") and names[-1].startswith("0002_c_wide_")
    fill = read_mask("center", 3, 28)[0, 0]
    assert fill.sum() == 14 * 14
    for i, png in enumerate(pngs):
        source = inputs[i // 2, 0]
        assert png.shape == (28, 28) and np.array_equal(png[~fill], source[~fill])  # bit for bit, as uint8
        assert not np.array_equal(png[fill], source[fill])
    x = inputs.astype(np.float32) / 127.5 - 1.0
    assert np.array_equal(np.repeat(x, 2, 0)[:, :, ~fill], results[:, :, ~fill])  # and as floats
    assert not np.array_equal(results[0], results[1])  # two results per image, from different noise
    assert Image.open(out / "inpaint_grid.png").size == (2 * (4 * 30 + 2), 2 * (3 * 30 + 2))  # input|masked|2 results
    pipe = DDPMPipeline.from_checkpoint(runs["plain"], device="CPU")
    api = pipe.inpaint(inputs.transpose(0, 2, 3, 1), "center", num_per_image=2, sampler="ddim", steps=3, seed=4,
                       output="float")
    assert np.array_equal(api, results.transpose(0, 2, 3, 1))
    blended = pipe.inpaint(inputs.transpose(0, 2, 3, 1), fill, sampler="ddim", steps=3, seed=4, keep_known=False,
                           output="float")
    assert not np.array_equal(blended[..., 0][:, ~fill], x[:, 0][:, ~fill])  # --harmonize: the model's values


def test_ddpm_img2img_matches_the_pipeline(runs, photos, tmp_path):
    out = tmp_path / "out"
    img2img.main(["--checkpoint", runs["plain"], "--images", str(photos / "a.png"), "--strength", "0.6",
                  "--out", str(out)] + COMMON)
    results, pngs, _ = outputs(out, "img2img")
    assert results.shape == (1, 1, 28, 28) and len(pngs) == 1
    pipe = DDPMPipeline.from_checkpoint(runs["plain"], device="CPU")
    source = load_image(str(photos / "a.png"), 1, 28)[None]
    assert np.array_equal(pipe.img2img(source, 0.6, sampler="ddim", steps=3, seed=4, output="float"),
                          results.transpose(0, 2, 3, 1))
    # 0.6 of a 3-step DDIM grid (999, 500, 0) runs the steps at 500 and 0; a strength below 1/T returns the input
    assert np.array_equal(pipe.img2img(source, 0.0005, sampler="ddim", steps=3, seed=4), source)


def test_a_class_conditional_model_and_its_exported_graphs_edit_alike(runs, exported_cond, photos, tmp_path):
    images = expected_inputs(photos)[:2]
    np.save(tmp_path / "two.npy", images)
    kinds = {"inpaint": ["--mask", "random:0.4"], "img2img": ["--strength", "0.7"]}
    sources = {"ckpt": ["--checkpoint", runs["cond"]]}
    sources.update({fmt: ["--exported", path] for fmt, path in exported_cond.items() if path is not None})
    for kind, command in (("inpaint", inpaint), ("img2img", img2img)):
        got = {}
        for name, source in sources.items():
            out = tmp_path / f"{kind}_{name}"
            command.main(source + ["--images", str(tmp_path / "two.npy"), "--num-per-image", "2", "--classes", "2,1",
                                   "--guidance", "1.5", "--out", str(out)] + kinds[kind] + COMMON)
            got[name] = np.load(out / f"{kind}.npy")
        for name in sources:
            np.testing.assert_allclose(got[name], got["ckpt"], atol=1e-4, err_msg=f"{kind} {name}")
    pipe = DDPMPipeline.from_checkpoint(runs["cond"], device="CPU")
    guided = pipe.inpaint(images.transpose(0, 2, 3, 1), "half-left", classes=[2, 1], guidance=1.5, sampler="ddim",
                          steps=3, output="float")
    unconditional = pipe.inpaint(images.transpose(0, 2, 3, 1), "half-left", sampler="ddim", steps=3, output="float")
    assert not np.array_equal(guided, unconditional)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, photos, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(masks / "small.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(masks / "black.png")
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(masks / "white.png")
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 28, 28), np.uint8))
    out = tmp_path / "out"
    base = ["--checkpoint", runs["plain"], "--out", str(out), "--no-progress", "--device", "CPU"]
    photo = ["--images", str(photos)]
    cases = [
        (inpaint.main, photo + ["--mask", str(masks / "small.png")], "is 20x20; the images are 28x28"),
        (inpaint.main, photo + ["--mask", str(masks / "black.png")], "keeps every pixel"),
        (inpaint.main, photo + ["--mask", str(masks / "white.png")], "keeps no pixel"),
        (inpaint.main, photo + ["--mask", "box:5,5,40,9"], "the box must satisfy"),
        (inpaint.main, photo + ["--mask", "random:1.5"], "0 < p < 1"),
        (inpaint.main, photo + ["--mask", "triangle"], "not a file, nor one of"),
        (inpaint.main, ["--images", str(tmp_path / "rgb.npy"), "--mask", "center"], "the model takes 1"),
        (inpaint.main, photo + ["--mask", "center", "--sampler", "ddim", "--jump-n-sample", "2"], "ddpm sampler"),
        (inpaint.main, photo + ["--mask", "center", "--guidance", "2"], "--guidance needs --classes"),
        (inpaint.main, photo + ["--mask", "center", "--classes", "1"], "unconditional model"),
        (img2img.main, photo + ["--strength", "0"], "--strength must be in (0, 1]"),
        (img2img.main, photo + ["--strength", "1.5"], "--strength must be in (0, 1]"),
        (img2img.main, ["--images", str(tmp_path / "none")], "does not exist"),
    ]
    for main, argv, message in cases:
        if main is img2img.main and "--strength" not in argv:
            argv = argv + ["--strength", "0.5"]
        assert message in one_line_error(main, base + argv, capsys), argv
        assert not out.exists() or not os.listdir(out), argv
    out.mkdir(exist_ok=True)
    (out / "inpaint.npy").write_bytes(b"keep me")
    assert "already exists" in one_line_error(inpaint.main, base + photo + ["--mask", "center"], capsys)
    assert (out / "inpaint.npy").read_bytes() == b"keep me"
