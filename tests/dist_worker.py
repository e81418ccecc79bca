"""Run under msrun by tests/test_distributed.py (or directly, as the single-process reference).

    python tests/dist_worker.py steps OUT_DIR   # 3 steps on fixed global batches, weights saved per step
    python tests/dist_worker.py train OUT_DIR DATA_DIR   # a real train() run
    python tests/dist_worker.py steps+overflow OUT_DIR   # steps, then 2 steps in which rank 1 sees an overflow
                                                         # (DDPM_MS_FAULT_OVERFLOW_RANK, applied to those 2 only)
    python tests/dist_worker.py resume OUT_DIR DATA_DIR   # --resume with rank r reading OUT_DIR/node{r}
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_ms  # noqa: E402,F401
import numpy as np  # noqa: E402
from mindspore import Tensor  # noqa: E402

from ddpm_ms import checkpoint as ckpt  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.device import setup_device  # noqa: E402
from ddpm_ms.distributed import init_distributed  # noqa: E402
from ddpm_ms.train import train  # noqa: E402
from ddpm_ms.trainer import Trainer  # noqa: E402
from ddpm_ms.train import main as train_main  # noqa: E402
from ddpm_ms.train_step import FAULT_OVERFLOW_RANK  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")
GLOBAL_BATCH = 8


@functools.lru_cache(maxsize=None)
def process_group():
    """(rank, world): the device set up and the data-parallel group joined, once per process."""
    setup_device("CPU", "graph")
    return init_distributed()


def distributed_trainer():
    """(trainer, rank, world) of the tiny config, in this process's data-parallel group."""
    cfg = load_config(TINY, ["max_steps=10", "lr=0.003", "batch_size=8"])
    rank, world = process_group()
    return Trainer(cfg, "CPU", 100, rank, world), rank, world


def shard_of_global_batch(trainer, step, rank, world):
    """This rank's share of global batch ``step`` (x, t, noise): the same batches in every world size."""
    rng = np.random.default_rng([123, step])
    x = rng.uniform(-1, 1, (GLOBAL_BATCH, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, trainer.cfg["timesteps"], GLOBAL_BATCH).astype(np.int32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    share = GLOBAL_BATCH // world
    part = slice(rank * share, (rank + 1) * share)
    return Tensor(x[part]), Tensor(t[part]), Tensor(noise[part])


def fixed_steps(out):
    trainer, rank, world = distributed_trainer()
    for step in range(3):
        trainer.step_cell(*shard_of_global_batch(trainer, step, rank, world))
        params = {n: p.asnumpy() for n, p in ckpt.named_params(trainer.model).items()}
        np.savez(os.path.join(out, f"world{world}_rank{rank}_step{step}.npz"), **params)


def real_run(out, data_dir):
    cfg = load_config(TINY, [f"output_dir={out}", f"data_dir={data_dir}", "max_steps=2", "batch_size=8",
                             "num_samples=2", "sample_steps=2", "gif_frames=2"])
    train(cfg, progress=False)


def overflow_steps(out):
    """Two steps on the same global batches as fixed_steps; weights, flags and Adam's step saved per rank."""
    trainer, rank, world = distributed_trainer()
    flags = []
    for step in range(2):
        flags.append(bool(trainer.step_cell(*shard_of_global_batch(trainer, step, rank, world))[1].asnumpy()))
    params = {n: p.asnumpy() for n, p in ckpt.named_params(trainer.model).items()}
    np.savez(os.path.join(out, f"overflow_rank{rank}.npz"), finite=np.array(flags),
             global_step=trainer.optimizer.global_step.asnumpy(), **params)


def steps_then_overflow(out):
    """fixed_steps without the overflow fault, then overflow_steps with it: one msrun launch for both."""
    fault = os.environ.pop(FAULT_OVERFLOW_RANK, None)
    fixed_steps(out)
    if fault is not None:
        os.environ[FAULT_OVERFLOW_RANK] = fault
    overflow_steps(out)


def resume_run(out, data_dir):
    """ddpm-train --resume where each rank reads its own directory (as nodes without a shared filesystem)."""
    rank = int(os.environ.get("RANK_ID", "0"))  # msrun sets it before init()
    train_main(["--config", TINY, "--output-dir", os.path.join(out, f"node{rank}"), "--data-dir", data_dir,
                "--resume", "--no-progress", "max_steps=4", "batch_size=8", "num_samples=2", "sample_steps=2",
                "gif_frames=2"])


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        fixed_steps(sys.argv[2])
    elif sys.argv[1] == "steps+overflow":
        steps_then_overflow(sys.argv[2])
    elif sys.argv[1] == "resume":
        from ddpm_ms.cli import run_cli

        run_cli(lambda argv: resume_run(sys.argv[2], sys.argv[3]))
    else:
        real_run(sys.argv[2], sys.argv[3])
