"""Training for a time budget (config train_minutes): the decision, the LR schedule it rewrites, resume."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ddpm_ms.training.budget import PROBE_STEPS, SLOWDOWN, TimeBudget, left_text, probe_length
from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_budget_fixes_the_steps_from_the_probe_and_counts_compilation():
    clock = FakeClock()
    budget = TimeBudget(1.0, first_step=0, cap=10_000, probe_steps=20, clock=clock)
    budget.started()
    assert [s for s in range(40) if budget.wants_sync(s)] == [1, 21]
    clock.now += 15.0  # step 1 compiles
    assert budget.observe(1) is None
    clock.now += 20 * 0.25  # 20 steps of 0.25 s
    total = budget.observe(21)
    # 60 s - 20 s spent = 40 s left = 145 steps of 0.25 s planned at SLOWDOWN x 0.25 = 0.275 s after step 21
    assert SLOWDOWN == pytest.approx(1.1)
    assert total == budget.total == 21 + 145
    assert not budget.wants_sync(21) and budget.seconds_left(21) == pytest.approx(145 * 0.275)
    assert "250 ms per step" in budget.describe() and "planned at 275 -> 166 steps" in budget.describe()
    assert left_text(75.4) == "1:15"


def test_the_probe_is_half_the_warm_up_and_ends_inside_it():
    """Longer probes average more of a shared machine's noise; they stay in the warm-up, whose rates
    do not depend on the run's length (the decision comes after step 1 + probe)."""
    assert PROBE_STEPS == 20 and probe_length(0) == probe_length(25) == 20  # short warm-ups: 20 steps
    assert probe_length(50) == 25 and probe_length(200) == 100  # quick.yaml, fashion_mnist_20min.yaml
    assert all(1 + probe_length(w) < w for w in range(42, 1000))
    clock = FakeClock()
    budget = TimeBudget(1.0, first_step=0, cap=10_000, probe_steps=probe_length(200), clock=clock)
    budget.started()
    assert [s for s in range(300) if budget.wants_sync(s)] == [1, 101]


def test_the_budget_stops_at_the_cap_and_never_before_the_steps_done():
    clock = FakeClock()
    capped = TimeBudget(60.0, 0, cap=50, probe_steps=5, clock=clock)
    capped.started()
    capped.observe(1)
    clock.now += 1.0
    assert capped.observe(6) == 50 and "the cap" in capped.describe()
    clock = FakeClock()
    spent = TimeBudget(0.1, 7, cap=50, probe_steps=5, clock=clock)  # a resumed run: the probe starts at its step
    spent.started()
    clock.now += 30.0
    assert spent.observe(8) is None
    clock.now += 1.0
    assert spent.observe(13) == 13  # the budget (6 s) was spent: stop now


def test_set_total_steps_rewrites_the_schedule_of_the_compiled_step():
    """A budget trainer (cap 40) fixed at 20 steps after its 2 warm-up steps trains bit for bit like a
    max_steps=20 trainer: the new rates reach the compiled graph (a Parameter's set_data would not)."""
    import ddpm_ms  # noqa: F401
    from mindspore import Tensor

    from ddpm_ms.config import load_config
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.utils.device import setup_device
    from ddpm_ms.training.trainer import Trainer

    setup_device("CPU", "graph", quiet=True)
    common = ["image_size=8", "batch_size=2", "warmup_steps=2", "lr=0.01", "epochs=4", *FLAT]
    fixed = Trainer(load_config(TINY, common + ["max_steps=20"]), "CPU", steps_per_epoch=10)
    budget = Trainer(load_config(TINY, common + ["max_steps=null", "train_minutes=1"]), "CPU", steps_per_epoch=10)
    assert budget.total_steps == 40 and budget.lrs[5] != fixed.lrs[5]
    rng = np.random.default_rng(0)
    for step in range(6):
        if step == 2:
            budget.set_total_steps(20)
            assert budget.total_steps == 20 and budget.epochs == 2 and budget.cfg["max_steps"] == 20
            assert budget.lrs[:20] == fixed.lrs and len(budget.lrs) == 40
        x = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
        t = rng.integers(0, 20, 2).astype(np.int32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        for trainer in (fixed, budget):
            trainer.run_step(Tensor(x), Tensor(t), Tensor(noise))
    for name, p in ckpt.named_params(fixed.model).items():
        assert np.array_equal(p.asnumpy(), ckpt.named_params(budget.model)[name].asnumpy()), name
    with pytest.raises(ValueError):
        budget.set_total_steps(41)


def run_train(out, data_dir, *extra, kill_at=None, resume=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DDPM_MS_KILL_AT", None)
    if kill_at:
        env["DDPM_MS_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir", data_dir,
           "--no-progress", "max_steps=null", "warmup_steps=25", "save_every_steps=1", "keep_checkpoints=2",
           "log_every=1", "num_samples=2", "sample_steps=2", "gif_frames=2", "sample_every=0", *FLAT, *extra]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_budget_run_killed_after_its_decision_resumes_with_the_same_steps(tmp_path):
    """The run (cap 30 = 6 epochs of 5 steps) fixes 30 steps at step 21, records them and is killed at step 23;
    resumed with a larger cap (12 epochs) and another budget it still ends at step 30, on the same schedule."""
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.training.lr_schedule import learning_rates

    data_dir = write_blob_dataset(tmp_path / "data", n_train=40)
    out = tmp_path / "run"
    proc = run_train(out, data_dir, "epochs=6", "train_minutes=100", kill_at="step:23")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "-> 30 steps (the cap" in proc.stderr
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["max_steps"] == 30
    assert ckpt.load(str(out / "checkpoints" / "ckpt_step00000022.ckpt"))[1]["config"]["max_steps"] == 30

    proc = run_train(out, data_dir, "epochs=12", "train_minutes=50", resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "time budget: 30 steps, as fixed by this run" in proc.stderr and "measured over" not in proc.stderr
    assert sorted(os.listdir(out / "checkpoints"))[-1] == "ckpt_step00000030.ckpt"
    assert ckpt.load(str(out / "checkpoints" / "ckpt_step00000030.ckpt"))[1]["config"]["max_steps"] == 30
    with open(out / "loss.csv") as f:
        rows = [line.split(",") for line in f.read().strip().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 31))
    expected = learning_rates(0.001, 1e-7, 30, 25)  # tiny.yaml's lr, the default min_lr, warm-up 25
    assert [float(r[3]) for r in rows] == [float(f"{v:.6g}") for v in expected]
