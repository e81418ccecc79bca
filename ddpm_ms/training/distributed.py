"""Data parallelism under msrun: joining the group, the per-device batch, agreeing on the resume step and errors."""

import os

import numpy as np
from mindspore import Tensor, nn, ops

from ddpm_ms.utils.errors import UserError, WriteError


def init_distributed():
    """(rank, world_size); under msrun (MS_WORKER_NUM > 1) this joins the data-parallel group.

    Data parallelism is explicit (the train step's ``DistributedGradReducer(mean=True)`` and
    AllReduce ops, the dataset's shards), so no auto-parallel context is set:
    ``set_auto_parallel_context`` is deprecated in MindSpore 2.10 in favour of ``AutoParallel``,
    which is for the semi-/auto-parallel modes ddpm_ms does not use.
    """
    if int(os.environ.get("MS_WORKER_NUM", "1")) <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return get_rank(), get_group_size()


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x):
        return self.all_reduce(x)


# the errors a rank can report to the others (the CLI's exit code follows the class), and the
# bytes of its message that travel (one line, UTF-8)
AGREED_ERRORS = (UserError, WriteError, FloatingPointError)
MESSAGE_BYTES = 1024


def agree(error, rank, world_size):
    """Every rank raises the error that any rank had (``error``: this rank's, or None).

    Work that only rank 0 does (preparing the output directory, writing the loss log, saving a
    checkpoint) can fail on rank 0 alone; the other ranks would then wait in the next gradient
    AllReduce until the collective times out, and msrun on another node would never see it.
    One AllReduce of a [world_size, 2 + MESSAGE_BYTES] table (each rank fills its row with the
    error's kind, errno and message) lets every rank raise the same error: the first failed rank's.
    """
    if world_size == 1:
        if error is not None:
            raise error
        return
    rows = np.zeros((world_size, 2 + MESSAGE_BYTES), np.float32)  # float32 holds bytes and codes exactly
    if error is not None:
        text = str(error).encode("utf-8")[:MESSAGE_BYTES]
        rows[rank, 0] = 1 + next(i for i, kind in enumerate(AGREED_ERRORS) if isinstance(error, kind))
        rows[rank, 1] = getattr(error, "errno", None) or 0  # a WriteError's errno chooses its advice
        rows[rank, 2:2 + len(text)] = np.frombuffer(text, np.uint8)
    table = _all_reduce_sum(rows)
    failed = np.flatnonzero(table[:, 0])
    if failed.size == 0:
        return
    first = failed[0]
    if first == rank:
        raise error
    text = bytes(table[first, 2:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
    kind = AGREED_ERRORS[int(table[first, 0]) - 1]
    raise kind(text, int(table[first, 1]) or None) if kind is WriteError else kind(text)


def run_on_main(fn, rank, world_size):
    """``fn()`` on rank 0 only, then :func:`agree`: a failure there ends every rank with the same error."""
    error = None
    if rank == 0:
        try:
            fn()
        except AGREED_ERRORS as e:
            error = e
    agree(error, rank, world_size)


_REDUCER = []


def _all_reduce_sum(array):
    """The sum of ``array`` over all ranks (one compiled AllReduce, reused)."""
    if not _REDUCER:
        _REDUCER.append(_AllReduceSum())
    return _REDUCER[0](Tensor(array)).asnumpy()


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
    steps = [int(v) - 1 for v in _all_reduce_sum(rows)]
    if len(set(steps)) > 1:
        held = ", ".join(f"rank {r}: " + (f"step {s}" if s >= 0 else "no checkpoint") for r, s in enumerate(steps))
        raise UserError(f"--resume: the ranks found different checkpoints ({held}; this is rank {rank}, reading "
                        f"{checkpoints}); every node must see the same checkpoints directory (a shared "
                        "filesystem, or a copy of it on each node)")


def rank_zero_value(value, rank, world_size):
    """Rank 0's ``value`` (an int below 2^24) on every rank: one AllReduce of one-hot rows. A time budget's
    total steps (:mod:`ddpm_ms.training.budget`) is measured on each rank; all must take the same one."""
    if world_size == 1:
        return value
    rows = np.zeros(world_size, np.float32)
    rows[rank] = value
    return int(_all_reduce_sum(rows)[0])


def device_batch_size(cfg, world_size):
    """batch_size is the global batch; each of world_size devices takes an equal share.

    With grad_accum_steps N each device's share is cut into N equal micro-batches.
    """
    parts = world_size * cfg["grad_accum_steps"]
    if cfg["batch_size"] % parts:
        raise UserError(f"batch_size {cfg['batch_size']} (the global batch) must be divisible by the number "
                        f"of devices {world_size} times grad_accum_steps {cfg['grad_accum_steps']}")
    return cfg["batch_size"] // world_size
