"""What a run shows while it trains: TensorBoard event files, speed and memory.

TensorBoard logging writes with tensorboardX (``pip install "ddpm_ms[tensorboard]"``, which also
installs the ``tensorboard`` viewer): a small, maintained writer with no framework behind it
(NumPy, protobuf and packaging, all of which MindSpore 2.10 already needs). ``log_tensorboard``
is ``auto`` (on when tensorboardX is installed: installing the extra is asking for it, and no
run fails for want of an optional package), ``true`` (an error without tensorboardX) or ``false``.
The events go to ``<output_dir>/tensorboard``; ``loss.csv`` stays the record the run resumes from.

A resumed run opens a new event file with ``purge_step`` = the checkpoint's step + 1: TensorBoard
then drops what the killed run logged after that checkpoint, and the resumed run logs those
steps again, so the curves have neither gaps nor doubled steps. The writer is flushed before
every checkpoint, so nothing logged up to a checkpoint can be lost with the process.
"""

import resource
import sys

import numpy as np

from ddpm_ms.utils.errors import UserError
from ddpm_ms.utils.visualize import make_grid

TENSORBOARD_HINT = 'pip install "ddpm_ms[tensorboard]" (tensorboardX and the tensorboard viewer)'


def _tensorboardx():
    """The tensorboardX module, imported without PyTorch when this process has not imported it: tensorboardX
    2.x imports torch (if installed) only to accept torch tensors, which ddpm_ms never passes, and that import
    costs a training process as much time as MindSpore's (2-3 s of CPU) and hundreds of MB. Raises ImportError."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        import tensorboardX
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tensorboardX


def tensorboard_available():
    try:
        _tensorboardx()
    except ImportError:
        return False
    return True


def check_tensorboard(cfg):
    """``log_tensorboard: true`` without tensorboardX is a UserError; -> whether to write event files."""
    wanted = cfg["log_tensorboard"]
    if wanted is True and not tensorboard_available():
        raise UserError(f"log_tensorboard: true needs tensorboardX: {TENSORBOARD_HINT}; or set log_tensorboard=false")
    return bool(wanted) and tensorboard_available()  # "auto" and True are truthy


def peak_rss_bytes():
    """The peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def device_peak_bytes(backend):
    """The peak device memory MindSpore has allocated (Ascend / GPU), or None (CPU, or not reported)."""
    if backend not in ("Ascend", "GPU"):
        return None
    try:
        import mindspore as ms

        return int(ms.runtime.max_memory_allocated())
    except Exception:  # an older runtime without the query: the line just leaves it out
        return None


def gib(num_bytes):
    return f"{num_bytes / 2**30:.2f} GiB"


def speed_line(images, seconds, steps, backend):
    """"412.3 img/s, 0.155 s/step, peak RSS 1.93 GiB[, device peak 3.10 GiB]" for ``steps`` steps of ``images``."""
    line = (f"{images / max(seconds, 1e-9):.1f} img/s, {seconds / max(steps, 1):.3f} s/step, "
            f"peak RSS {gib(peak_rss_bytes())}")
    device = device_peak_bytes(backend)
    return line + (f", device peak {gib(device)}" if device is not None else "")


class Board:
    """TensorBoard events of one run (rank 0); every method is a no-op when logging is off."""

    def __init__(self, log_dir, enabled, purge_step=None):
        self.writer = None
        if enabled:
            self.writer = _tensorboardx().SummaryWriter(log_dir, purge_step=purge_step, flush_secs=30)

    def scalars(self, step, values, prefix=""):
        """Add ``{name: number or None}`` at ``step`` (None values are left out)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(prefix + name, float(value), step)

    def grid(self, tag, images, step, nrow=None):
        """[N, C, H, W] images in [-1, 1] as one image grid."""
        if self.writer is not None:
            grid = make_grid(images, nrow)
            grid = grid[..., None] if grid.ndim == 2 else grid
            self.writer.add_image(tag, np.ascontiguousarray(grid), step, dataformats="HWC")

    def text(self, tag, text, step=0):
        if self.writer is not None:
            # markdown: indent four spaces to keep YAML's layout
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
