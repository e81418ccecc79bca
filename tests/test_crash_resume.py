"""A run killed with SIGKILL (inside a step, inside a checkpoint write) and resumed equals an uninterrupted run."""

import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils import fileio
from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trainings here use FLAT (tiny.yaml on one level, in each of the 16 training processes; tests/test_train.py
# resumes tiny.yaml's whole network bit for bit). The float16 test keeps tiny.yaml's network: it checks that its
# loss scale never overflowed, which was measured on that network.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("crash") / "data", n_train=40)


def train_cmd(out, data_dir, resume=False, extra=(), network=FLAT):
    return [sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir",
            data_dir, "--no-progress", "epochs=2", "max_steps=8", "save_every_steps=2", "keep_checkpoints=10",
            "num_samples=2", "sample_steps=2", "gif_frames=2", *network, *extra] + (["--resume"] if resume else [])


def train(out, data_dir, kill_at=None, resume=False, fail_write=None, extra=(), network=FLAT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DDPM_MS_KILL_AT", None)
    env.pop(fileio.FAIL_ENV, None)
    if kill_at:
        env["DDPM_MS_KILL_AT"] = kill_at
    if fail_write:
        env[fileio.FAIL_ENV] = fail_write
    return subprocess.run(train_cmd(out, data_dir, resume, extra, network), env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = train(out, data_dir)
    assert proc.returncode == 0, proc.stderr
    return out


def final_state(out):
    groups, meta = ckpt.load(os.path.join(out, "checkpoints", "ckpt_step00000008.ckpt"))
    return groups, meta


def assert_same_as_reference(out, reference):
    """The same loss.csv and bit-identical final weights, EMA, Adam and scaler state as the uninterrupted run."""
    with open(reference / "loss.csv") as f, open(out / "loss.csv") as g:
        assert f.read() == g.read()
    ref_groups, ref_meta = final_state(reference)
    groups, meta = final_state(out)
    assert meta["step"] == ref_meta["step"] == 8
    for group in ("model", "ema", "opt", "state"):
        for name, value in ref_groups[group].items():
            assert np.array_equal(value.asnumpy(), groups[group][name].asnumpy()), (group, name)


def hidden_files(out):
    """Temporary files, a lock: anything whose name starts with a dot."""
    return [os.path.join(base, n) for base, dirs, files in os.walk(out) for n in files + dirs if n.startswith(".")]


def one_error_line(stderr):
    info = ("resumed from", "training on", "epoch ")  # the progress lines before the error
    lines = [line for line in stderr.strip().splitlines() if not line.startswith(info)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


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
    assert os.path.exists(out / ".lock")  # the killed run's lock file is left; its lock died with it
    proc = train(out, data_dir, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_reference(out, reference)
    assert not hidden_files(out)


def test_failed_log_and_image_writes_keep_the_safe_checkpoint(tmp_path, data_dir, reference):
    """The loss row of step 4 cannot be written: the run stops there (exit 4, one line), its CSV holds whole rows,
    checkpoint 2 is intact. The resumed run's GIF cannot be written after its final checkpoint: again exit 4 and
    checkpoint 8 is kept. A last --resume only writes the outputs; everything equals the uninterrupted run."""
    out = tmp_path / "run"
    proc = train(out, data_dir, fail_write="loss.csv:5")  # write 1 is the header, 5 the row of step 4
    assert proc.returncode == 4, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: could not write loss log {out / 'loss.csv'}: No space left on device"), line
    assert line.endswith(f"the newest complete checkpoint is {out / 'checkpoints' / 'ckpt_step00000002.ckpt'}: "
                         "free some space and continue with --resume")
    with open(out / "loss.csv", newline="") as f:
        assert [r.split(",")[0] for r in f.read().split("\r\n")] == ["step", "1", "2", "3", ""]
    assert os.listdir(out / "checkpoints") == ["ckpt_step00000002.ckpt"] and not hidden_files(out)

    proc = train(out, data_dir, resume=True, fail_write="denoising.gif")
    assert proc.returncode == 4, proc.stderr
    assert one_error_line(proc.stderr).startswith(f"error: could not write animation {out / 'denoising.gif'}: ")
    assert not os.path.exists(out / "denoising.gif") and not hidden_files(out)
    ckpt.load(str(out / "checkpoints" / "ckpt_step00000008.ckpt"))  # complete and readable

    proc = train(out, data_dir, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_reference(out, reference)
    assert np.array_equal(np.load(out / "samples.npy"), np.load(reference / "samples.npy"))
    with open(out / "denoising.gif", "rb") as f, open(reference / "denoising.gif", "rb") as g:
        assert f.read() == g.read()


def mount_namespace():
    """The command prefix that runs a shell in a private mount namespace where tmpfs can be mounted, or None."""
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        try:
            if subprocess.run(prefix + ["sh", "-c", probe], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def test_full_disk_then_resume(tmp_path, data_dir, reference):
    """The output directory is a tmpfs with room for three checkpoints: the fourth (step 6) fails with ENOSPC.
    One line names the file, the space it needed and the newest complete checkpoint; no partial file is left;
    after the filesystem grows, --resume finishes a run identical to the uninterrupted one."""
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount namespaces)")
    ckpt_size = os.path.getsize(reference / "checkpoints" / "ckpt_step00000002.ckpt")
    mnt, out = tmp_path / "mnt", tmp_path / "mnt" / "run"
    mnt.mkdir()
    q = shlex.quote
    script = "\n".join([
        f"mount -t tmpfs -o size={int(3.5 * ckpt_size) // 1024 + 64}k tmpfs {q(str(mnt))} || exit 99",
        f"{shlex.join(train_cmd(out, data_dir))} 2> {q(str(tmp_path / 'first.err'))}",
        f"echo $? > {q(str(tmp_path / 'first.rc'))}",
        f"cp -a {q(str(out))} {q(str(tmp_path / 'after_failure'))}",
        f"mount -o remount,size=64m {q(str(mnt))}",
        f"{shlex.join(train_cmd(out, data_dir, resume=True))} 2> {q(str(tmp_path / 'second.err'))}",
        f"echo $? > {q(str(tmp_path / 'second.rc'))}",
        f"cp -a {q(str(out))} {q(str(tmp_path / 'final'))}",
    ])
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(fileio.FAIL_ENV, None)
    proc = subprocess.run(prefix + ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "4", first_err
    line = one_error_line(first_err)
    ckpt6 = out / "checkpoints" / "ckpt_step00000006.ckpt"
    assert line.startswith(f"error: could not write checkpoint {ckpt6}: No space left on device (needs "), line
    assert " free); the newest complete checkpoint is " in line and line.endswith("continue with --resume")
    failed = tmp_path / "after_failure"
    assert sorted(os.listdir(failed / "checkpoints")) == [f"ckpt_step0000000{s}.ckpt" for s in (2, 4, 5)]
    assert not hidden_files(failed)  # no partial checkpoint, no .tmp file of MindSpore's, no lock
    groups, meta = ckpt.load(str(failed / "checkpoints" / "ckpt_step00000005.ckpt"))
    assert meta["step"] == 5
    with open(failed / "loss.csv", newline="") as f:
        assert [r.split(",")[0] for r in f.read().split("\r\n")] == ["step", "1", "2", "3", "4", "5", "6", ""]
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert_same_as_reference(tmp_path / "final", reference)
    assert not hidden_files(tmp_path / "final")


def test_float16_sigkill_then_resume_is_identical(tmp_path, data_dir):
    """The Ascend/GPU precision path (float16 compute, loss scaling) resumes bit for bit too."""
    fp16 = {"extra": ["dtype=float16"], "network": ()}  # tiny.yaml's network (see FLAT)
    reference = tmp_path / "ref"
    proc = train(reference, data_dir, **fp16)
    assert proc.returncode == 0, proc.stderr
    assert "(Float16)" in proc.stderr
    out = tmp_path / "run"
    assert train(out, data_dir, kill_at="step:5", **fp16).returncode == -signal.SIGKILL
    proc = train(out, data_dir, resume=True, **fp16)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_reference(out, reference)
    assert not hidden_files(out)
    groups, _ = final_state(out)
    assert float(groups["state"]["scale_value"].asnumpy()) == 65536.0  # no overflow in this run
