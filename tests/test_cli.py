"""The command lines, run as a user would: train (via run_train.sh --device Ascend), sample, GIF, bad input."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY  # the commands' outputs and errors do not depend on the network

from ddpm_ms.utils.visualize import LABEL_HEIGHT, PANEL_GAP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def digest(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data_dir = write_blob_dataset(tmp / "data")
    out = str(tmp / "run")
    proc = run(["bash", "run_train.sh", "--device", "Ascend", "--config", TINY, "--no-progress",
                "--output-dir", out, "--data-dir", data_dir, "max_steps=3", *FLAT])
    return proc, out, data_dir


def test_train_falls_back_from_ascend_and_writes_every_output(trained):
    proc, out, _ = trained
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "requested but no Ascend" in line]
    assert len(warnings) == 1 and "falling back to CPU" in warnings[0]
    for name in ("config.yaml", "loss.csv", "loss_curve.png", "samples.png", "samples.npy", "denoising.gif"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert os.listdir(os.path.join(out, "checkpoints")) == ["ckpt_step00000003.ckpt"]
    samples = np.load(os.path.join(out, "samples.npy"))
    assert samples.shape == (4, 1, 28, 28) and samples.min() >= -1 and samples.max() <= 1
    with open(os.path.join(out, "loss.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + 3
    gif = Image.open(os.path.join(out, "denoising.gif"))
    assert gif.n_frames == 3


def test_sample_and_gif_from_checkpoint(trained, tmp_path):
    _, out, _ = trained
    proc = run([sys.executable, "-m", "ddpm_ms.sample", "--checkpoint", out, "--sampler", "dpm-solver++",
                "--steps", "4", "--num", "6", "--seed", "3", "--out", str(tmp_path), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "samples_dpm-solver++_4_seed3.npy")
    assert images.shape == (6, 1, 28, 28) and np.isfinite(images).all()
    assert Image.open(tmp_path / "samples_dpm-solver++_4_seed3.png").size[0] > 28
    gif = str(tmp_path / "d.gif")
    proc = run([sys.executable, "-m", "ddpm_ms.gif", "--checkpoint", out, "--sampler", "ddim", "--steps", "5",
                "--frames", "4", "--num", "4", "--source", "both", "--label", "--out", gif, "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    grid = 2 * (28 + 2) + 2  # 2 x 2 images of 28 px, 2 px padding
    assert Image.open(gif).n_frames == 4
    assert Image.open(gif).size == (2 * (2 * grid + PANEL_GAP), 2 * grid + LABEL_HEIGHT)  # x_t | x0, label strip


def test_figures_from_checkpoint(trained, tmp_path):
    _, out, _ = trained
    interp = str(tmp_path / "interp.png")
    proc = run([sys.executable, "-m", "ddpm_ms.figures", "interpolate", "--checkpoint", out, "--pairs", "2",
                "--points", "3", "--steps", "3", "--out", interp, "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert Image.open(interp).size == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))  # 3 columns x 2 rows, 2x scale
    steps = str(tmp_path / "steps.png")
    proc = run([sys.executable, "-m", "ddpm_ms.figures", "compare", "--checkpoint", out, "--num", "3",
                "--samplers", "ddim,dpm-solver++", "--step-counts", "2,full", "--out", steps, "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    rows, num = 2 * 2, 3  # (ddim, dpm-solver++) x (2, full) rows of 3 images, at save_comparison's size
    with Image.open(steps) as fig:
        assert fig.size == (round((0.6 * num + 1.6) * 120), round((0.75 * rows + 0.3) * 120))
        assert np.asarray(fig.convert("L")).std() > 10  # images drawn, not a blank figure


@pytest.mark.parametrize("args, message", [
    (["--config", TINY, "lr=-1"], "'lr' must be > 0"),
    (["--config", TINY, "lr=nan"], "'lr' must be a finite number"),
    (["--config", TINY, "learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--config", TINY, "image_size=29"], "must be divisible by 2"),
    (["--config", TINY, "beta_schedule=cubic"], "'beta_schedule'"),
    (["--config", "configs/nope.yaml"], "does not exist"),
])
def test_bad_train_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = run([sys.executable, "-m", "ddpm_ms.train", "--output-dir", str(tmp_path / "r")] + args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.split(".*")[0] in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "r")


def test_existing_run_is_not_overwritten_and_bad_data_dir(trained, tmp_path):
    _, out, data_dir = trained
    before = digest(out)
    proc = run([sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", out,
                "--data-dir", data_dir])
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert digest(out) == before
    proc = run([sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(tmp_path / "r"),
                "--data-dir", str(tmp_path / "no-such-dir")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no-such-dir" in proc.stderr


def test_sample_bad_input(trained, tmp_path):
    _, out, _ = trained
    proc = run([sys.executable, "-m", "ddpm_ms.sample", "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run([sys.executable, "-m", "ddpm_ms.sample", "--checkpoint", out, "--steps", "999"])
    assert proc.returncode == 2 and "--steps must be in 1..20" in proc.stderr
    proc = run([sys.executable, "-m", "ddpm_ms.sample", "--checkpoint", out, "--classes", "7,7,9", "--no-progress"])
    assert proc.returncode == 2 and "unconditional model" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_unwritable_output_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run([sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(blocker / "run")])
    assert proc.returncode == 2 and "is not writable" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert blocker.read_text() == "not a directory"


def test_diverging_run_stops_with_a_clear_message(trained, tmp_path):
    _, _, data_dir = trained
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir",
                data_dir, "--no-progress", "lr=1e30", "lr_schedule=constant", "epochs=10", "max_steps=40",
                "sample_every=0",
                "save_every_steps=1", "keep_checkpoints=40", *FLAT])
    assert proc.returncode == 3, proc.stderr
    assert "NaN/inf for 10 steps in a row" in proc.stderr and "last good checkpoint" in proc.stderr
    # checkpoints written while the loss was finite are still readable
    from ddpm_ms.utils import checkpoint as ckpt
    first = ckpt.CheckpointManager(str(out / "checkpoints")).list()[0]
    groups, meta = ckpt.load(first)
    assert all(np.isfinite(v.asnumpy()).all() for v in groups["model"].values())
