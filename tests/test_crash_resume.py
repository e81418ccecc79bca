"""A run killed with SIGKILL (inside a step, inside a checkpoint write) and resumed equals an uninterrupted run."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ddpm_ms import checkpoint as ckpt
from idx_files import write_blob_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("crash") / "data", n_train=40)


def train(out, data_dir, kill_at=None, resume=False, extra=()):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DDPM_MS_KILL_AT", None)
    if kill_at:
        env["DDPM_MS_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir",
           data_dir, "--no-progress", "epochs=2", "max_steps=8", "save_every_steps=2", "keep_checkpoints=10",
           "num_samples=2", "sample_steps=2", "gif_frames=2", *extra] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = train(out, data_dir)
    assert proc.returncode == 0, proc.stderr
    return out


def final_state(out):
    groups, meta = ckpt.load(os.path.join(out, "checkpoints", "ckpt_step00000008.ckpt"))
    return groups, meta


@pytest.mark.parametrize("kill_at, latest_before_resume", [
    ("step:5", "ckpt_step00000004.ckpt"),   # killed right after step 5, before its log line
    ("save:6", "ckpt_step00000005.ckpt"),   # inside the step-6 checkpoint write (step 5 ended epoch 1)
    ("step:1", None),                       # killed before any checkpoint exists
])
def test_sigkill_then_resume_is_identical(tmp_path, data_dir, reference, kill_at, latest_before_resume):
    out = tmp_path / "run"
    proc = train(out, data_dir, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(n for n in os.listdir(out / "checkpoints") if not n.startswith(".")) \
        if os.path.isdir(out / "checkpoints") else []
    assert (names[-1] if names else None) == latest_before_resume
    proc = train(out, data_dir, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, out)


def assert_same_run(reference, out):
    with open(reference / "loss.csv") as f, open(out / "loss.csv") as g:
        assert f.read() == g.read()
    ref_groups, ref_meta = final_state(reference)
    groups, meta = final_state(out)
    assert meta["step"] == ref_meta["step"] == 8
    for group in ("model", "ema", "opt", "state"):
        for name, value in ref_groups[group].items():
            assert np.array_equal(value.asnumpy(), groups[group][name].asnumpy()), (group, name)
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]


def test_float16_sigkill_then_resume_is_identical(tmp_path, data_dir):
    """The Ascend/GPU precision path (float16 compute, loss scaling) resumes bit for bit too."""
    fp16 = ["dtype=float16"]
    reference = tmp_path / "ref"
    proc = train(reference, data_dir, extra=fp16)
    assert proc.returncode == 0, proc.stderr
    assert "(Float16)" in proc.stderr
    out = tmp_path / "run"
    assert train(out, data_dir, kill_at="step:5", extra=fp16).returncode == -signal.SIGKILL
    proc = train(out, data_dir, resume=True, extra=fp16)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, out)
    groups, _ = final_state(out)
    assert float(groups["state"]["scale_value"].asnumpy()) == 65536.0  # no overflow in this run
