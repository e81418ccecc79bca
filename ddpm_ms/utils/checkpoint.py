"""Crash-safe checkpoints that rebuild their own model.

A checkpoint is one MindSpore ``.ckpt`` file (loadable with ``ms.load_checkpoint``)
holding named groups of tensors -- ``model.*``, ``ema.*``, ``opt.*``, ``state.*`` --
plus a JSON metadata record (format version, resolved config, step, epoch position; no RNG state: the
training randomness is re-derived from seed, epoch, step and rank) stored
as a uint8 tensor. ``ms.save_checkpoint`` deletes an existing file before writing
and does not fsync, so we always write a new name, fsync it, rename it into place,
fsync the directory (``fileio.atomic_write``), and only then delete old checkpoints (the
last ``keep``). A write that fails (a full disk) removes its partial files, leaves every
older checkpoint as it was and raises ``WriteError``. A CRC32 written by MindSpore is
verified on load. ``resolve_checkpoint(path)`` turns what a command's ``--checkpoint``
accepts (a file, or a run directory: its newest checkpoint) into the file to load.
"""

import contextlib
import glob
import json
import logging
import os
import re
import signal
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.utils import fileio
from ddpm_ms.utils.errors import UserError

FORMAT_VERSION = 1
META_KEY = "meta.json"
GROUPS = ("model", "ema", "opt", "state")
_NAME_RE = re.compile(r"^ckpt_step(\d+)\.ckpt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, or for another model."""


def fault_point(name, step):
    """Test hook: SIGKILL this process at a named point when DDPM_MS_KILL_AT == "name:step".

    Used by the crash tests to kill a run inside a training step or inside a checkpoint write.
    """
    if os.environ.get("DDPM_MS_KILL_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _encode_meta(meta):
    return Tensor(np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy())


def save(path, groups, meta):
    """Atomically write ``groups`` ({group: {name: Parameter|Tensor|ndarray}}) and ``meta``.

    A failed write (a full disk) raises WriteError and leaves no partial file behind.
    """
    meta = dict(meta, format_version=FORMAT_VERSION)
    entries = [{"name": META_KEY, "data": _encode_meta(meta)}]
    for group, tensors in groups.items():
        if group not in GROUPS:
            raise ValueError(f"unknown checkpoint group {group!r}")
        for name, value in tensors.items():
            data = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
            entries.append({"name": f"{group}.{name}", "data": data})

    def write(tmp):
        try:
            with _no_mindspore_save_log():
                ms.save_checkpoint(entries, tmp, crc_check=True)
        except BaseException:
            fileio.remove_quietly(os.path.splitext(tmp)[0] + ".tmp")  # MindSpore's own temporary name
            raise
        fault_point("save", meta.get("step"))

    return fileio.atomic_write(path, write, "checkpoint", size=_size_estimate(entries))


def _size_estimate(entries):
    """Bytes a checkpoint of ``entries`` takes: the tensors' bytes plus a little framing per tensor."""
    return sum(int(np.prod(e["data"].shape)) * e["data"].itemsize + len(e["name"]) + 32 for e in entries)


@contextlib.contextmanager
def _no_mindspore_save_log():
    """MindSpore logs a CRITICAL line of its own when a save fails; the WriteError says it in one line."""
    try:
        from mindspore import log

        logger = log._get_logger()
    except Exception:  # pragma: no cover - another MindSpore layout
        logger = logging.getLogger("mindspore")

    def keep(record):
        return record.levelno < logging.CRITICAL

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load(path):
    """-> (groups, meta); raises CheckpointError with the reason when the file is unusable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = ms.load_checkpoint(path, crc_check=True)
    except Exception as e:  # MindSpore raises ValueError/RuntimeError on corrupt files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason})") from None
    if META_KEY not in raw:
        raise CheckpointError(f"{path} is not a ddpm_ms checkpoint (no {META_KEY} record)")
    try:
        meta = json.loads(raw.pop(META_KEY).asnumpy().tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} has a damaged metadata record") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')}, "
                              f"this ddpm_ms reads version {FORMAT_VERSION}")
    groups = {g: {} for g in GROUPS}
    for key, value in raw.items():
        group, _, name = key.partition(".")
        if group in groups:
            groups[group][name] = value
    return groups, meta


def named_params(cell):
    """{name relative to the cell: Parameter}: stable names whatever the cell is nested in."""
    return dict(cell.parameters_and_names())


def assign(params, tensors, what, path):
    """Copy ``tensors`` into ``params`` ({name: Parameter}); names and shapes must match exactly."""
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the {what}: "
            + (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "")
            + (", " if missing and extra else "")
            + (f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "")
        )
    for name, param in params.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"checkpoint {path}: {what} tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(param.shape)}")
        param.set_data(Tensor(value.asnumpy(), param.dtype))


def check_compatible(meta, cfg, keys, path):
    """Raise CheckpointError naming every key in ``keys`` whose value differs between meta and cfg.

    ``meta["config"]`` must hold every key in ``keys``: the caller merges the checkpoint's saved
    config with ``ddpm_ms.config.DEFAULTS`` first (keys added to ddpm_ms after the checkpoint was
    written have their defaults); utils does not import config. A key missing there is a KeyError.
    """
    saved = meta["config"]
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {cfg[k]!r}" for k in keys if saved[k] != cfg[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with another architecture ({'; '.join(diffs)}); "
                              "use the matching config or a new output_dir")


class CheckpointManager:
    """Checkpoints ``ckpt_step{N}.ckpt`` in one directory, keeping the newest ``keep``."""

    def __init__(self, directory, keep=3):
        self.directory = directory
        self.keep = keep

    def path_for(self, step):
        return os.path.join(self.directory, f"ckpt_step{step:08d}.ckpt")

    def list(self):
        """Checkpoint paths, oldest first."""
        found = []
        for path in glob.glob(os.path.join(self.directory, "ckpt_step*.ckpt")):
            m = _NAME_RE.search(os.path.basename(path))
            if m:
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]

    def save(self, step, groups, meta):
        """Write the checkpoint of ``step``, then delete all but the newest ``keep`` (never before)."""
        for stale in glob.glob(os.path.join(self.directory, fileio.TMP_PREFIX + "*")):  # left by a crash mid-save
            fileio.remove_quietly(stale)
        path = save(self.path_for(step), groups, meta)
        for old in self.list()[:-self.keep]:
            try:
                os.remove(old)
            except OSError:
                pass
        return path

    def load_latest(self):
        """Newest readable checkpoint -> (path, groups, meta), or None if there is none.

        A corrupt newest checkpoint is reported and the previous one is used.
        """
        for path in reversed(self.list()):
            try:
                groups, meta = load(path)
            except CheckpointError as e:
                print(f"WARNING: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
                continue
            return path, groups, meta
        return None


BEST_NAME = "best.ckpt"  # a run's lowest-FD checkpoint (keep_best), beside the rotated ckpt_step*.ckpt


def best_checkpoint(run_dir):
    """The best checkpoint of a run directory (written during training with eval_every_steps and keep_best)."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--best takes a run directory as --checkpoint, got {run_dir}")
    for path in (os.path.join(run_dir, "checkpoints", BEST_NAME), os.path.join(run_dir, BEST_NAME)):
        if os.path.isfile(path):
            return path
    raise UserError(f"{run_dir} has no best checkpoint ({run_dir}/checkpoints/{BEST_NAME}); runs write it when they "
                    "evaluate during training (eval_every_steps > 0, keep_best: true)")


def resolve_checkpoint(path):
    """A checkpoint file, or a run directory (its newest checkpoint)."""
    if os.path.isdir(path):
        manager = CheckpointManager(os.path.join(path, "checkpoints"))
        found = manager.list() or CheckpointManager(path).list()
        if not found:
            raise UserError(f"{path} holds no checkpoints (expected {path}/checkpoints/ckpt_step*.ckpt)")
        return found[-1]
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass a .ckpt file or a run directory")
    return path
