"""Training on a folder of RGB images, as a user would: RGB grids, GIF and samples; a class-conditional
run on class subfolders with ``ddpm-sample --class-grid``; bad inputs are one line, exit 2, nothing written."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ddpm_ms  # noqa: F401
from ddpm_ms.config import load_config
from ddpm_ms.data import check_config, dataset_spec
from tiny_config import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("blue", "red")

try:
    from cli_checks import one_line_error
except ImportError:  # tests/ imported as a package
    from tests.cli_checks import one_line_error



def run(args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def write_rgb_folder(root, per_class=8):
    """32x32 RGB images in one subfolder per class (some nested), reddish or bluish squares."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        for i in range(per_class):
            where = os.path.join(root, name, "more" if i % 2 else "")
            os.makedirs(where, exist_ok=True)
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            y, x = rng.integers(4, 16, 2)
            img[y:y + 12, x:x + 12, 2 if name == "blue" else 0] = 230
            Image.fromarray(img).save(os.path.join(where, f"{i}.png" if i % 3 else f"{i}.jpg"))
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder_run")
    images = write_rgb_folder(tmp / "images")
    out = str(tmp / "run")
    proc = run(["ddpm_ms.train", "--config", TINY, "--no-progress", "--output-dir", out, "--data-dir", images,
                "dataset=folder", "image_size=32", "channels=3", "num_classes=2", "max_steps=3"])
    assert proc.returncode == 0, proc.stderr
    return out, images


def test_rgb_folder_run_writes_rgb_grid_gif_and_samples(trained):
    out, _ = trained
    samples = np.load(os.path.join(out, "samples.npy"))
    assert samples.shape == (4, 3, 32, 32) and samples.min() >= -1 and samples.max() <= 1
    with Image.open(os.path.join(out, "samples.png")) as grid:
        assert grid.mode == "RGB"
        pixels = np.asarray(grid).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 50  # colour, not gray in three channels
    with Image.open(os.path.join(out, "denoising.gif")) as gif:
        assert gif.n_frames == 3
        gif.seek(gif.n_frames - 1)
        frame = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(frame[..., 0] - frame[..., 2]).max() > 50
    cfg = load_config(os.path.join(out, "config.yaml"))
    assert (cfg["dataset"], cfg["channels"], cfg["image_size"], cfg["num_classes"]) == ("folder", 3, 32, 2)


def test_class_grid_from_a_folder_run(trained, tmp_path):
    out, _ = trained
    proc = run(["ddpm_ms.sample", "--checkpoint", out, "--class-grid", "2", "--steps", "2", "--out", str(tmp_path),
                "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(tmp_path))
    assert names == ["samples_ddim_2_seed0_w0_classgrid.npy", "samples_ddim_2_seed0_w0_classgrid.png"]
    samples = np.load(tmp_path / names[0])
    assert samples.shape == (4, 3, 32, 32)
    with Image.open(tmp_path / names[1]) as grid:  # 2 per row, one row per class, scale 2, pad 2
        assert grid.mode == "RGB" and grid.size == (2 * (2 * 34 + 2), 2 * (2 * 34 + 2))


def test_evaluating_a_folder_run_says_there_is_no_feature_network(trained, capsys):
    from ddpm_ms.evaluate import main

    out, _ = trained
    line = one_line_error(main, ["--checkpoint", out, "--num", "4"], capsys)
    assert "no feature network exists for dataset 'folder'" in line
    line = one_line_error(main, ["--samples", os.path.join(out, "samples.npy"), "--dataset", "folder"], capsys)
    assert "no feature network" in line


def test_bad_folder_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    from ddpm_ms.train import main

    images = write_rgb_folder(tmp_path / "images", per_class=2)
    (tmp_path / "empty").mkdir()
    overrides = ["dataset=folder", "image_size=32", "channels=3"]
    cases = [
        (str(tmp_path / "empty"), [], "is empty"),
        (str(tmp_path / "missing"), [], "does not exist"),
        (None, [], "needs data_dir"),
        (images, ["num_classes=3"], "has 2 classes (blue, red): set num_classes=2"),
        (images, ["batch_size=8"], "batch_size 8 is larger than the 4 samples"),
        (images, ["dataset=imagenet"], "'dataset' = 'imagenet' is not one of"),
    ]
    for k, (data_dir, extra, message) in enumerate(cases):
        out = tmp_path / f"run{k}"
        argv = ["--config", TINY, "--no-progress", "--output-dir", str(out)]
        argv += ["--data-dir", data_dir] if data_dir else []
        line = one_line_error(main, argv + overrides + extra, capsys)
        assert message in line, line
        assert not out.exists()


def test_check_config_against_the_dataset_spec():
    cifar = dataset_spec("cifar10")
    assert (cifar.image_size, cifar.channels, cifar.num_classes) == (32, 3, 10) and cifar.class_names[0] == "airplane"
    assert dataset_spec("mnist").class_names == tuple("0123456789")
    check_config(cifar, {"channels": 3, "num_classes": 10})
    for cfg, message in (({"channels": 1, "num_classes": None}, "set channels=3"),
                         ({"channels": 3, "num_classes": 5}, "set num_classes=10")):
        with pytest.raises(ddpm_ms.utils.errors.UserError, match=message):
            check_config(cifar, cfg)
