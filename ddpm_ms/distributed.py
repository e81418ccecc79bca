"""Data parallelism under msrun: joining the group, the per-device batch, agreeing on the resume step."""

import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .errors import UserError


def init_distributed():
    """(rank, world_size); under msrun (MS_WORKER_NUM > 1) this joins the data-parallel group."""
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x):
        return self.all_reduce(x)


def check_same_resume_step(step, rank, world_size, checkpoints):
    """Every rank must resume from the same step (``step``: this rank's, -1 without a checkpoint).

    Each rank sees its own filesystem: a node without the run's checkpoints would start at step 0
    and wait forever in the first gradient AllReduce. The steps are gathered by one AllReduce
    (one-hot rows, summed); if they differ every rank raises the same one-line UserError.
    """
    if world_size == 1:
        return
    rows = np.zeros(world_size, np.float32)  # float32 holds every step below 2^24 exactly
    rows[rank] = step + 1
    steps = [int(v) - 1 for v in _AllReduceSum()(Tensor(rows)).asnumpy()]
    if len(set(steps)) > 1:
        held = ", ".join(f"rank {r}: " + (f"step {s}" if s >= 0 else "no checkpoint") for r, s in enumerate(steps))
        raise UserError(f"--resume: the ranks found different checkpoints ({held}; this is rank {rank}, reading "
                        f"{checkpoints}); every node must see the same checkpoints directory (a shared "
                        "filesystem, or a copy of it on each node)")


def device_batch_size(cfg, world_size):
    """batch_size is the global batch; each of world_size devices takes an equal share."""
    if cfg["batch_size"] % world_size:
        raise UserError(f"batch_size {cfg['batch_size']} (the global batch) must be divisible by the number "
                        f"of devices {world_size}")
    return cfg["batch_size"] // world_size
