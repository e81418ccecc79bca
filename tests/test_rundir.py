"""One training process per output directory: the lock, a second process, a SIGKILLed holder, readers."""

import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ddpm_ms.utils.errors import UserError
from ddpm_ms.training.rundir import LOCK_NAME, RunDir, RunLock
from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def digest(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def try_lock(directory):
    """Another process tries to prepare ``directory`` for training -> CompletedProcess."""
    code = textwrap.dedent("""
        import sys
        from ddpm_ms.utils.errors import UserError
        from ddpm_ms.training.rundir import RunDir
        try:
            RunDir(sys.argv[1]).prepare(resume=True, overwrite=False)
        except UserError as e:
            print(e)
            sys.exit(2)
        print("locked")
    """)
    return subprocess.run([sys.executable, "-c", code, str(directory)], env=ENV, capture_output=True, text=True,
                          timeout=60)


def test_a_second_process_is_refused_with_the_holders_pid_and_writes_nothing(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.prepare(resume=False, overwrite=False)
    try:
        (tmp_path / "run" / "config.yaml").write_text("a: 1\n")
        before = digest(tmp_path / "run")
        proc = try_lock(tmp_path / "run")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout.strip() == (f"output_dir {run.root} is in use by another training process "
                                       f"(pid {os.getpid()}, lock {run.lock.path}); wait for it to finish or stop it, "
                                       "or choose another output_dir=...")
        assert digest(tmp_path / "run") == before
        with pytest.raises(UserError, match="in use by another training process"):  # a second lock in this process
            RunLock(run.root).acquire()
    finally:
        run.release()
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml"]  # the lock file goes with the lock
    assert try_lock(tmp_path / "run").stdout.strip() == "locked"


def test_a_lock_left_by_a_sigkilled_process_does_not_block_the_next_run(tmp_path):
    code = ("import os, signal, sys\nfrom ddpm_ms.training.rundir import RunDir\n"
            "RunDir(sys.argv[1]).prepare(resume=False, overwrite=False)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=ENV, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    lock = tmp_path / "run" / LOCK_NAME
    dead_pid = int(lock.read_text())
    assert dead_pid != os.getpid()  # the file is left behind; the kernel dropped the lock with its process
    run = RunDir(str(tmp_path / "run"))
    run.prepare(resume=False, overwrite=False)
    assert int(lock.read_text()) == os.getpid()
    run.release()
    assert not lock.exists()


def test_the_run_check_comes_after_the_lock_and_a_refused_run_leaves_nothing(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("a: 1\n")
    run = RunDir(str(tmp_path / "old"))
    with pytest.raises(UserError, match="already holds a run"):
        run.prepare(resume=False, overwrite=False)
    run.release()
    assert os.listdir(tmp_path / "old") == ["config.yaml"]
    fresh = RunDir(str(tmp_path / "new" / "run"))  # a directory the lock created and nothing else used: removed
    fresh.prepare(resume=False, overwrite=False)
    fresh.release()
    assert not (tmp_path / "new" / "run").exists()


def test_racing_processes_never_hold_the_lock_together(tmp_path):
    """4 processes lock, note it, unlock, 25 times each, on a directory that a holder may have created and then
    removes again (so lock files and the directory vanish and reappear under the others): no two overlap."""
    code = textwrap.dedent("""
        import os, sys, time
        from ddpm_ms.utils.errors import UserError
        from ddpm_ms.training.rundir import RunLock
        directory, journal = sys.argv[1], sys.argv[2]
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND)
        held = 0
        while held < 25:
            lock = RunLock(directory)
            try:
                lock.acquire()
            except UserError:
                time.sleep(0.001)
                continue
            os.write(fd, f"in {os.getpid()}\\n".encode())
            time.sleep(0.002)
            os.write(fd, f"out {os.getpid()}\\n".encode())
            lock.release()
            held += 1
    """)
    journal = tmp_path / "journal"
    journal.write_text("")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(journal)], env=ENV)
             for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    events = journal.read_text().split("\n")[:-1]
    assert len(events) == 4 * 25 * 2
    for enter, leave in zip(events[::2], events[1::2]):
        assert enter.startswith("in ") and leave == "out " + enter[3:], (enter, leave)
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []  # no lock file left behind


def test_resume_without_checkpoints_starts_a_new_run_with_a_notice(tmp_path, capsys):
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.training.rundir import resume_point

    manager = ckpt.CheckpointManager(str(tmp_path / "checkpoints"))
    assert resume_point(manager, resume=False) is None and capsys.readouterr().err == ""
    assert resume_point(manager, resume=True) is None
    assert capsys.readouterr().err == (f"note: --resume: {manager.directory} holds no checkpoint yet; "
                                       "starting a new run\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt_step00000004.ckpt").write_bytes(b"garbage")  # none readable: no silent restart
    with pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints .* can be read; pass --overwrite"):
        resume_point(manager, resume=True)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_trainings_on_one_directory(tmp_path):
    """B starts while A trains (A paused by SIGSTOP): B is refused at once and writes nothing; A's checkpoints
    can be read meanwhile; A then finishes with every step in its CSV once."""
    data_dir = write_blob_dataset(tmp_path / "data", n_train=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir", data_dir,
           "--no-progress", "max_steps=5", "save_every_steps=1", "keep_checkpoints=2", "num_samples=2",
           "sample_steps=2", "gif_frames=2"] + FLAT
    a = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (os.path.exists(out / "loss.csv") and len(rows(out / "loss.csv")) >= 2):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.05)
        a.send_signal(signal.SIGSTOP)  # A holds the lock and has written checkpoint 1
        before = digest(out)
        assert (out / LOCK_NAME).read_text().strip() == str(a.pid)
        t0 = time.monotonic()
        b = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stderr
        assert b.stderr.strip().splitlines() == [
            f"error: output_dir {out} is in use by another training process (pid {a.pid}, lock {out / LOCK_NAME}); "
            "wait for it to finish or stop it, or choose another output_dir=..."]
        assert digest(out) == before
        print(f"B refused after {time.monotonic() - t0:.1f} s")
        # a reader (sampling, GIF, evaluation) takes the newest complete checkpoint meanwhile, never one
        # being written (a write in progress, as A leaves it when killed mid-save; A's next save removes it)
        from ddpm_ms.pipeline import load
        from ddpm_ms.utils.checkpoint import resolve_checkpoint

        complete = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("ckpt_step"))
        (out / "checkpoints" / ".tmp-1-ckpt_step00000099.ckpt").write_bytes(b"partial")
        assert resolve_checkpoint(str(out)) == str(out / "checkpoints" / complete[-1])
        model, _, cfg = load(str(out))[:3]
        assert cfg["max_steps"] == 5 and model.trainable_params()
    finally:
        a.send_signal(signal.SIGCONT)
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err
    assert [int(r["step"]) for r in rows(out / "loss.csv")] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_step00000004.ckpt", "ckpt_step00000005.ckpt"]
    assert not (out / LOCK_NAME).exists() and not [n for n in os.listdir(out) if n.startswith(".")]
