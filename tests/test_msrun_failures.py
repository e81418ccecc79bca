"""What stops a 2-worker msrun job stops every rank with the same one line: a missing device, a failure
on rank 0 alone (an output directory holding another run, a checkpoint that cannot be written); and
run_train.sh from another directory."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUN_TRAIN = os.path.join(REPO, "run_train.sh")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_msrun():
    """This interpreter first on PATH (run_train.sh and msrun call `python`), outside any msrun job."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("MS_WORKER_NUM", "MS_ROLE", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_NODE_ID"):
        env.pop(key, None)
    return env


# Each process msrun starts runs this (msrun only launches `python ...`): it records its pid (to
# clean up after a timeout), runs the real command and prints its exit status into its own log.
# The wrapper itself exits 0, so msrun does not SIGKILL the other worker when the first one fails
# (it would, racing that worker's own error line); the exit statuses in the logs are checked.
WRAPPER = """
import os, subprocess, sys
with open(os.path.join(os.environ["PIDS"], f"{os.environ['MS_ROLE']}_{os.environ.get('RANK_ID', 0)}.pid"), "w") as f:
    f.write(str(os.getpid()))
code = subprocess.call([sys.executable, "-m", "ddpm_ms.train"] + sys.argv[1:])
print(f"exit status {code}", flush=True)
"""


class MsrunJob:
    """msrun with 2 workers running ``python -m ddpm_ms.train ARGS``, started in the background."""

    def __init__(self, args, tmp_path, timeout=300, env=None):
        self.log_dir, self.pids = tmp_path / "logs", tmp_path / "pids"
        self.pids.mkdir()
        cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
               f"--log_dir={self.log_dir}", "--join=True", "python", "-c", WRAPPER] + args
        self.deadline = time.monotonic() + timeout
        self.output = tmp_path / "msrun.out"  # a file, not a pipe: nothing reads it while the job runs
        with open(self.output, "w") as output:
            self.proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                         env=dict(env_without_msrun(), PIDS=str(self.pids), **(env or {})),
                                         start_new_session=True)

    def kill(self):
        # msrun and its scheduler share a process group; each worker leads its own (msrun setsid()s them)
        groups = [self.proc.pid] + [int(f.read_text()) for f in self.pids.iterdir() if f.name.startswith("MS_WORKER")]
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.proc.wait()

    def logs(self):
        """Wait for the job (until its timeout, counted from its start) -> {log name: text}."""
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        logs = {}
        for name in sorted(os.listdir(self.log_dir)) if self.log_dir.is_dir() else []:
            logs[name] = (self.log_dir / name).read_text(errors="replace")
        assert logs, self.output.read_text(errors="replace")[-3000:]
        return logs


def gpu_missing(tmp_path):
    """The missing-device job; None where a GPU is available (its test skips)."""
    from ddpm_ms.utils.device import backend_available

    if backend_available("GPU"):
        return None
    data_dir = write_blob_dataset(tmp_path / "data")
    return MsrunJob(["--config", TINY, "--device", "GPU", "--no-progress", "--output-dir", str(tmp_path / "run"),
                     "--data-dir", data_dir], tmp_path)


def output_dir_holding_another_run(tmp_path):
    data_dir = write_blob_dataset(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    return MsrunJob(["--config", TINY, "--device", "CPU", "--no-progress", "--output-dir", str(out),
                     "--data-dir", data_dir], tmp_path)


def checkpoint_rank_zero_cannot_write(tmp_path):
    from ddpm_ms.utils import fileio

    data_dir = write_blob_dataset(tmp_path / "data")
    return MsrunJob(["--config", TINY, "--device", "CPU", "--no-progress", "--output-dir", str(tmp_path / "run"),
                     "--data-dir", data_dir, "max_steps=4", "save_every_steps=2"] + FLAT,
                    tmp_path,
                    env={fileio.FAIL_ENV: "ckpt_step00000002.ckpt"})


# {test: the function that starts its msrun job in a directory of its own}
JOBS = {
    "test_a_missing_device_under_msrun_stops_every_rank_with_one_error": gpu_missing,
    "test_an_output_dir_holding_another_run_stops_both_ranks": output_dir_holding_another_run,
    "test_a_checkpoint_rank_zero_cannot_write_stops_both_ranks": checkpoint_rank_zero_cannot_write,
}


@pytest.fixture(scope="module")
def msrun_jobs(request, tmp_path_factory):
    """{test name: (its MsrunJob or None, its directory)} for the msrun tests selected in this session, all jobs
    started at once: a job spends much of its time waiting (msrun's start-up, its cluster forming and tearing
    down, msrun's once-a-second poll), which the other jobs' work fills. Each test checks its own job."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    jobs = {}
    for name, start in JOBS.items():
        if name in selected:
            directory = tmp_path_factory.mktemp(name[len("test_"):][:30])
            jobs[name] = (start(directory), directory)
    yield jobs
    for job, _ in jobs.values():
        if job is not None and job.proc.poll() is None:
            job.kill()


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) not found")
def test_a_missing_device_under_msrun_stops_every_rank_with_one_error(msrun_jobs, request):
    """--device GPU on a machine without one: a single process falls back to CPU with a warning;
    under msrun each rank exits 2 with one `error:` line in its log, and nothing is written."""
    job, tmp_path = msrun_jobs[request.node.name]
    if job is None:
        pytest.skip("a GPU is available here")
    out = tmp_path / "run"
    logs = job.logs()
    everything = "".join(f"--- {name}\n{text[-3000:]}" for name, text in logs.items())
    # msrun runs the command in its scheduler too, with MS_WORKER_NUM set: it stops the same way
    for name in ("worker_0.log", "worker_1.log", "scheduler.log"):
        lines = logs[name].splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, everything
        assert errors[0].startswith("error: device GPU requested but ") and "MS_WORKER_NUM=2" in errors[0], errors
        assert errors[0].endswith("or pass --device CPU"), errors
        assert lines[-1] == "exit status 2", everything
        assert "falling back" not in logs[name], everything
    assert not out.exists(), os.listdir(out)


def rank_errors(logs):
    """{worker log: (its one `error:` line, the exit status)} of both workers."""
    everything = "".join(f"--- {name}\n{text[-3000:]}" for name, text in logs.items())
    found = {}
    for name in ("worker_0.log", "worker_1.log"):
        lines = logs[name].splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1].startswith("exit status "), everything
        found[name] = (errors[0], lines[-1])
    return found


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) not found")
def test_an_output_dir_holding_another_run_stops_both_ranks(msrun_jobs, request):
    """Only rank 0 prepares the output directory; its refusal reaches rank 1 through one AllReduce,
    so both exit 2 with the same line instead of rank 1 waiting in the first gradient AllReduce."""
    job, tmp_path = msrun_jobs[request.node.name]
    out = tmp_path / "run"
    found = rank_errors(job.logs())
    assert found["worker_0.log"] == found["worker_1.log"], found
    line, status = found["worker_0.log"]
    assert line.startswith(f"error: output_dir {out} already holds a run;") and status == "exit status 2", found
    assert os.listdir(out) == ["config.yaml"]


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) not found")
def test_a_checkpoint_rank_zero_cannot_write_stops_both_ranks(msrun_jobs, request):
    """The step-2 checkpoint write fails on rank 0 (DDPM_MS_FAIL_WRITE): both ranks exit 4 with the
    same line naming the file, and the run can continue with --resume (no checkpoint yet)."""
    job, tmp_path = msrun_jobs[request.node.name]
    out = tmp_path / "run"
    found = rank_errors(job.logs())
    assert found["worker_0.log"] == found["worker_1.log"], found
    line, status = found["worker_0.log"]
    assert line.startswith("error: could not write checkpoint") and "ckpt_step00000002.ckpt" in line, found
    assert "no checkpoint was written yet" in line and status == "exit status 4", found
    assert os.listdir(out / "checkpoints") == []


def run_train_sh(args, cwd, timeout=180):
    return subprocess.run(["bash", RUN_TRAIN] + args, capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                          env=env_without_msrun())


def test_run_train_sh_reads_a_relative_config_from_the_callers_directory(tmp_path):
    (tmp_path / "myconf.yaml").write_text("batch_size: 8\nnot_a_key: 1\n")
    proc = run_train_sh(["--config", "myconf.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown config key 'not_a_key' in myconf.yaml; see " \
        "configs/fashion_mnist.yaml for the keys", proc.stderr[-2000:]


def test_run_train_sh_resolves_data_and_output_dirs_against_the_callers_directory(tmp_path):
    """From a directory outside the repository, with the default config (the repository's
    configs/quick.yaml): --data-dir imgs and --output-dir out are found in that directory;
    `out` already holds a run, so training stops right after the dataset is read, before
    anything is compiled or written."""
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("{}\n")
    proc = run_train_sh(["--device", "CPU", "--data-dir", "imgs", "--output-dir", "out", "dataset=folder",
                         "image_size=8", "batch_size=4"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: output_dir out already holds a run;"), \
        proc.stderr[-2000:]
    assert os.listdir(tmp_path / "out") == ["config.yaml"]
    assert not os.path.exists(os.path.join(REPO, "imgs")) and not os.path.exists(os.path.join(REPO, "out"))
