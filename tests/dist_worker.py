"""Run under msrun by tests/test_distributed.py (or directly, as the single-process reference).

    python tests/dist_worker.py all OUT_DIR DATA_DIR [ARGS...]   # msrun: every scenario (see all_scenarios)
    python tests/dist_worker.py references OUT_DIR   # one process: the same global batches, whole
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_ms  # noqa: E402,F401
import numpy as np  # noqa: E402
from mindspore import Tensor  # noqa: E402

from ddpm_ms.utils import checkpoint as ckpt  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.utils.device import setup_device  # noqa: E402
from ddpm_ms.training.distributed import init_distributed  # noqa: E402
from ddpm_ms.training.trainer import Trainer, read_stats  # noqa: E402
from ddpm_ms.train import main as train_main  # noqa: E402
from ddpm_ms.training.step import FAULT_OVERFLOW_RANK  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")
GLOBAL_BATCH = 8


@functools.lru_cache(maxsize=None)
def process_group():
    """(rank, world): the device set up and the data-parallel group joined, once per process."""
    setup_device("CPU", "graph")
    return init_distributed()


def distributed_trainer(overrides=()):
    """(trainer, rank, world) of the tiny config, in this process's data-parallel group."""
    cfg = load_config(TINY, ["max_steps=10", "lr=0.003", "batch_size=8"] + list(overrides))
    rank, world = process_group()
    return Trainer(cfg, "CPU", 100, rank, world), rank, world


def global_batch(trainer, step):
    """Global batch ``step`` (x, t, noise): the same batches in every world size."""
    rng = np.random.default_rng([123, step])
    x = rng.uniform(-1, 1, (GLOBAL_BATCH, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, trainer.cfg["timesteps"], GLOBAL_BATCH).astype(np.int32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return x, t, noise


def shard_of_global_batch(trainer, step, rank, world):
    """This rank's share of global batch ``step`` (x, t, noise)."""
    share = GLOBAL_BATCH // world
    return [Tensor(v[rank * share:(rank + 1) * share]) for v in global_batch(trainer, step)]


# the second precision/accumulation case: float16 compute (the Ascend default, loss scaling on)
# with 2 micro-batches per rank under msrun; its single-process reference takes the whole batch
FLOAT16 = ["dtype=float16"]
FLOAT16_ACCUM = FLOAT16 + ["grad_accum_steps=2"]


def fixed_steps(out, overrides=(), tag="f32"):
    """3 steps on the global batches; weights, the logged loss and this rank's loss saved per step."""
    trainer, rank, world = distributed_trainer(overrides)
    for step in range(3):
        stats = read_stats(trainer.run_step(*shard_of_global_batch(trainer, step, rank, world)))
        params = {n: p.asnumpy() for n, p in ckpt.named_params(trainer.model).items()}
        np.savez(os.path.join(out, f"{tag}_world{world}_rank{rank}_step{step}.npz"), loss=stats["loss"],
                 rank_loss=stats["rank_loss"], **params)


def overflow_steps(out):
    """Two steps on the same global batches as fixed_steps; weights, flags and Adam's step saved per rank."""
    trainer, rank, world = distributed_trainer()
    flags = []
    for step in range(2):
        flags.append(read_stats(trainer.run_step(*shard_of_global_batch(trainer, step, rank, world)))["applied"])
    params = {n: p.asnumpy() for n, p in ckpt.named_params(trainer.model).items()}
    np.savez(os.path.join(out, f"overflow_rank{rank}.npz"), finite=np.array(flags),
             global_step=trainer.optimizer.global_step.asnumpy(), **params)


def dropout_step(out):
    """One step of the paper's U-Net with dropout 0.5 on the same whole batch on every rank: the ranks'
    own losses differ only through their dropout masks."""
    trainer, rank, _ = distributed_trainer(["arch=ddpm", "layers_per_block=1", "attn_levels=[1]", "dropout=0.5",
                                            "batch_size=16"])
    stats = read_stats(trainer.run_step(*(Tensor(v) for v in global_batch(trainer, 0))))
    np.savez(os.path.join(out, f"dropout_rank{rank}.npz"), rank_loss=stats["rank_loss"])


def msrun_cases(out):
    """Every step case: fixed steps in float32, in float16 with accumulation, the dropout masks and
    the overflow case (DDPM_MS_FAULT_OVERFLOW_RANK applied to it only, and unset again after it)."""
    fault = os.environ.pop(FAULT_OVERFLOW_RANK, None)
    fixed_steps(out)
    fixed_steps(out, FLOAT16_ACCUM, tag="f16")
    dropout_step(out)
    if fault is not None:
        os.environ[FAULT_OVERFLOW_RANK] = fault
    try:
        overflow_steps(out)
    finally:
        os.environ.pop(FAULT_OVERFLOW_RANK, None)


def single_process_references(out):
    fixed_steps(out)
    fixed_steps(out, FLOAT16, tag="f16")


def real_run(out, data_dir, extra=()):
    train_main(["--config", TINY, "--output-dir", out, "--data-dir", data_dir, "--no-progress", "max_steps=2",
                "batch_size=8", "num_samples=2", "sample_steps=2", "gif_frames=2"] + list(extra))


def resume_run(out, data_dir):
    """ddpm-train --resume where each rank reads its own directory (as nodes without a shared filesystem)."""
    rank = int(os.environ.get("RANK_ID", "0"))  # msrun sets it before init()
    train_main(["--config", TINY, "--output-dir", os.path.join(out, f"node{rank}"), "--data-dir", data_dir,
                "--resume", "--no-progress", "max_steps=4", "batch_size=8", "num_samples=2", "sample_steps=2",
                "gif_frames=2"])


def mark_done(out, scenario):
    """OUT/<scenario>.rank<r>.done: the scenario ended without an exception on this rank."""
    with open(os.path.join(out, f"{scenario}.rank{os.environ.get('RANK_ID', '0')}.done"), "w") as f:
        f.write("ok\n")


def all_scenarios(out, data_dir, train_args):
    """Every scenario of tests/test_distributed.py in one msrun launch (one cluster start-up, one import of
    MindSpore per process), in this order: a real ddpm-train run into OUT/run (the process's first
    init(), as a user's run), the step cases (msrun_cases, npz files in OUT), then the --resume of
    OUT/resume where rank 1 lacks rank 0's checkpoint: it must end every rank with exit 2 and one
    `error:` line, so it comes last. Each scenario that ends normally leaves its .done file."""
    from ddpm_ms.command_line import run_cli

    fault = os.environ.pop(FAULT_OVERFLOW_RANK, None)  # for the overflow case only
    real_run(os.path.join(out, "run"), data_dir, train_args)
    mark_done(out, "train")
    if fault is not None:
        os.environ[FAULT_OVERFLOW_RANK] = fault
    msrun_cases(out)
    mark_done(out, "cases")
    run_cli(lambda argv: resume_run(os.path.join(out, "resume"), data_dir))
    mark_done(out, "resume")  # not reached when the resume fails as it must


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "all":
        all_scenarios(args[0], args[1], args[2:])
    elif mode == "references":
        single_process_references(args[0])
    else:
        sys.exit(f"unknown mode {mode!r}: all or references")
