"""Data-parallel training with 2 CPU workers launched by msrun."""

import functools
import os
import shutil
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from idx_files import write_blob_dataset, write_fixed_classifier
from tiny_config import TINY

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
LR = 0.003  # the learning rate dist_worker.py trains with

pytestmark = pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) not found")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(args, log_dir, env=None, timeout=600):
    """Launch 2 ranks of dist_worker.py ARGS -> (the finished process, the tails of its logs)."""
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", "python", WORKER] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=dict(os.environ, **(env or {})))
    logs = ""
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            logs += f"--- {name}\n" + f.read()[-3000:]
    return proc, logs


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One msrun launch for every test here (dist_worker.all_scenarios; each msrun launch costs a cluster
    start-up and teardown and an import of MindSpore in 3 processes): a real 2-step run (2 micro-batches
    per rank, a loss read every step, TensorBoard and an evaluation every step: both ranks sample, rank 0
    scores and keeps the best) into OUT/run; 3 fixed steps in float32, 3 in float16 with 2 micro-batches
    per rank, one dropout step, then 2 steps in which rank 1's own overflow check fails
    (DDPM_MS_FAULT_OVERFLOW_RANK=1 reaches only that trainer); last, a --resume where rank 0's directory
    OUT/resume/node0 holds a step-2 checkpoint and rank 1's none, which must fail on every rank. The
    single-process references of the same global batches run meanwhile (msrun's start-up and teardown
    leave the CPU idle for seconds). -> .out (OUT), .proc, .logs (msrun's), .references (that exit status),
    .watch (whether the real run had TensorBoard and evaluations: tensorboardX installed)."""
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.config import load_config
    from ddpm_ms.training.trainer import Trainer

    out = tmp_path_factory.mktemp("two_workers")
    data_dir = write_blob_dataset(out / "data")
    cfg = load_config(TINY, ["max_steps=4", "batch_size=8"])
    trainer = Trainer(cfg, "CPU", steps_per_epoch=4)
    trainer.step = 2
    trainer.save(ckpt.CheckpointManager(str(out / "resume" / "node0" / "checkpoints"), 3), 0, 2)
    env = dict(os.environ)
    env.pop("MS_WORKER_NUM", None)
    with open(out / "references.log", "w") as log:
        references = subprocess.Popen([sys.executable, WORKER, "references", str(out)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            watch = ["eval_every_steps=1", "eval_num=257", "log_tensorboard=true"] if tensorboard_installed() else []
            proc, logs = msrun(["all", str(out), data_dir, "grad_accum_steps=2", "log_every=1", *watch],
                               str(out / "logs"), env={"DDPM_MS_FAULT_OVERFLOW_RANK": "1",
                                                       "DDPM_MS_CACHE": write_fixed_classifier(out / "cache")})
            references.wait(timeout=600)
        finally:
            if references.poll() is None:
                references.kill()
                references.wait()
    if not os.path.exists(out / "train.rank0.done") and "Failed to" in (proc.stdout + proc.stderr + logs) \
            and "cluster" in logs.lower():
        pytest.skip(f"msrun could not start its cluster here: {logs[-500:]}")
    return types.SimpleNamespace(out=out, proc=proc, logs=logs, references=references.returncode, watch=bool(watch))


def scenario_ran(two_workers, scenario):
    """OUT once ``scenario`` ended normally on both ranks (else the test fails with the logs)."""
    run = two_workers
    for rank in (0, 1):
        assert os.path.exists(run.out / f"{scenario}.rank{rank}.done"), \
            f"{scenario} failed on rank {rank}:\n" + run.proc.stdout[-2000:] + run.proc.stderr[-2000:] + run.logs
    return run.out


def references_ran(two_workers):
    """OUT once the single-process references ended normally (else the test fails with their output)."""
    with open(two_workers.out / "references.log", errors="replace") as f:
        assert two_workers.references == 0, f.read()[-4000:]
    return scenario_ran(two_workers, "cases")


@functools.lru_cache(maxsize=None)
def initial_weights():
    """The seeded initial weights of the tiny config, built in this process (once: the tests only read them)."""
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.config import load_config
    from ddpm_ms.training.trainer import Trainer

    cfg = load_config(TINY, ["max_steps=10", "lr=0.003", "batch_size=8"])
    return {n: p.asnumpy() for n, p in ckpt.named_params(Trainer(cfg, "CPU", 100).model).items()}


def compare_with_single_process(out, tag, loss_rtol, update_rtol, weight_atol, max_off):
    """Both ranks hold bit-identical weights, close to the single-process run's, and log its loss.

    ``update_rtol``: the bound on |update(2 ranks) - update(1 process)| / |update(1 process)| over all
    weights (update = weights - initial weights); ``weight_atol``: per weight; ``max_off``: the share of
    weights allowed outside rtol 1e-4 / atol 1e-5 (None: float16, where most weights are).
    Adam's first steps move every weight by about
    lr * sign(grad): a weight whose summed gradient cancels to rounding level (the two runs add the
    images' terms in a different order) may move the other way, by up to 2 lr a step.
    """
    init = initial_weights()
    for step in range(3):
        r0, r1, single = (np.load(out / f"{tag}_world{w}_rank{r}_step{step}.npz") for w, r in ((2, 0), (2, 1), (1, 0)))
        # the logged loss is the global batch's: the mean of the ranks' own losses, on both ranks
        assert r0["loss"] == r1["loss"] == pytest.approx((r0["rank_loss"] + r1["rank_loss"]) / 2, rel=1e-6)
        assert r0["rank_loss"] != r1["rank_loss"]
        assert r0["loss"] == pytest.approx(single["loss"], rel=loss_rtol)
        off = total = diff = update = 0
        for name, w0 in init.items():
            assert np.array_equal(r0[name], r1[name]), f"ranks differ at step {step}: {name}"
            assert np.allclose(r0[name], single[name], rtol=1e-4, atol=weight_atol), f"step {step}: {name}"
            off += (~np.isclose(r0[name], single[name], rtol=1e-4, atol=1e-5)).sum()
            total += w0.size
            diff += ((r0[name] - single[name]).astype(np.float64) ** 2).sum()
            update += ((single[name] - w0).astype(np.float64) ** 2).sum()
        assert max_off is None or off <= max_off * total, f"step {step}: {off} of {total} weights differ"
        assert update > 0 and np.sqrt(diff / update) < update_rtol, (step, np.sqrt(diff / update))


def test_two_workers_match_single_process_on_the_same_global_batch(two_workers):
    # measured: relative update difference 3e-5, at most 0.1% of the weights outside 1e-4/1e-5
    compare_with_single_process(references_ran(two_workers), "f32", loss_rtol=1e-5, update_rtol=1e-3,
                                weight_atol=0.02 * LR, max_off=1e-3)


def test_float16_with_accumulation_on_two_workers_matches_single_process_float16(two_workers):
    """The Ascend default (float16 compute, loss scaling) data parallel, each rank in 2 micro-batches:
    ranks bit-identical, loss and weights equal to one float16 process on the whole batch within
    float16 rounding (measured: loss within 2e-4, relative update difference 1.5-2.3%)."""
    compare_with_single_process(references_ran(two_workers), "f16", loss_rtol=1e-3, update_rtol=0.05,
                                weight_atol=2 * 3 * LR, max_off=None)


def test_dropout_masks_differ_between_ranks(two_workers):
    """The same batch on both ranks: the ranks' own losses differ only through their dropout masks."""
    out = scenario_ran(two_workers, "cases")
    r0, r1 = (np.load(out / f"dropout_rank{r}.npz")["rank_loss"] for r in (0, 1))
    assert r0 != r1


def test_only_rank_zero_writes_files(two_workers):
    """A real run with 2 micro-batches per rank, a loss read every step (log_every=1), TensorBoard and an
    evaluation every step (both ranks sample, rank 0 scores and keeps the best)."""
    out = scenario_ran(two_workers, "train") / "run"
    watch = two_workers.watch
    expected = ["checkpoints", "config.yaml", "denoising.gif", "loss.csv", "loss_curve.png", "samples.npy",
                "samples.png"]
    assert sorted(os.listdir(out)) == sorted(expected + (["quality.csv", "tensorboard"] if watch else []))
    assert sorted(os.listdir(out / "checkpoints")) == (["best.ckpt"] if watch else []) + ["ckpt_step00000002.ckpt"]
    with open(out / "loss.csv") as f:
        rows = f.read().strip().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    if watch:
        assert len(os.listdir(out / "tensorboard")) == 1  # one event file: rank 0's
        with open(out / "quality.csv") as f:
            assert [r.split(",")[0] for r in f.read().strip().splitlines()[1:]] == ["1", "2"]


def tensorboard_installed():
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def test_an_overflow_seen_by_one_rank_skips_the_step_on_both(two_workers):
    """Rank 1's own overflow check fails after the gradient AllReduce (as Ascend's per-card overflow
    status can, while the averaged gradients are finite): the finite flag is reduced over the ranks,
    so both skip, keep identical weights and still advance Adam's step (the LR schedule)."""
    out = scenario_ran(two_workers, "cases")
    r0, r1 = (np.load(out / f"overflow_rank{r}.npz") for r in (0, 1))
    assert r0["finite"].tolist() == r1["finite"].tolist() == [False, False]
    assert r0["global_step"].tolist() == r1["global_step"].tolist() == [2]
    for name, value in initial_weights().items():
        assert np.array_equal(r0[name], value) and np.array_equal(r1[name], value), name


def test_resume_where_one_rank_lacks_the_checkpoint_fails_on_every_rank(two_workers):
    """Rank 0's directory holds a step-2 checkpoint, rank 1's (another node, no shared filesystem)
    none: every rank exits 2 with the same one-line error instead of hanging in an AllReduce."""
    out = scenario_ran(two_workers, "cases")  # the scenario before it ended on both ranks
    proc, logs = two_workers.proc, two_workers.logs
    assert proc.returncode != 0
    for rank in (0, 1):
        assert not os.path.exists(out / f"resume.rank{rank}.done"), logs
        with open(out / "logs" / f"worker_{rank}.log", errors="replace") as f:
            errors = [line for line in f if line.startswith("error: ")]
        assert len(errors) == 1, logs
        assert "rank 0: step 2, rank 1: no checkpoint" in errors[0] and f"this is rank {rank}" in errors[0]
    assert not os.path.exists(out / "resume" / "node0" / "checkpoints" / "ckpt_step00000004.ckpt")
