"""The output directory of a training run: its files, its lock and its loss log.

One training process per directory. :meth:`RunDir.prepare` takes an exclusive advisory lock
(``fcntl.flock``) on ``<output_dir>/.lock`` before it looks at or writes anything and keeps it
until :meth:`RunDir.release` (``train`` releases it when it returns or fails). A second
training process started on the same directory stops at once with one line naming the
directory and the holder's pid. The kernel drops the lock when its process dies, so a run
killed with SIGKILL leaves at most the file, never a lock that blocks the next run. Under
msrun only rank 0 writes and only rank 0 locks. Processes that only read a run (sampling,
GIF, evaluation) take no lock: every file is replaced atomically (``fileio``), so they read
the newest complete checkpoint.
"""

import csv
import errno
import io
import os
import shutil
import sys
import time

from ddpm_ms.utils import fileio
from ddpm_ms.utils.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not protected
    fcntl = None

CSV_FIELDS = ("step", "epoch", "loss", "lr", "loss_scale", "finite")
QUALITY_FIELDS = ("step", "epoch", "fd", "fd_floor", "precision", "recall", "is", "min_class_share", "num_samples",
                  "seconds")
LOCK_NAME = ".lock"


def _not_writable(root, err):
    return UserError(f"output_dir {root} is not writable ({err.strerror or err}); choose another output_dir=...")


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock``, holding the owner's pid as text.

    Released by :meth:`release`, which removes the file (and the directory, when this lock
    created it and nothing else was written there). The file is removed while the lock is still
    held and a new owner checks, after locking, that the file it locked is still the one under
    that name, so two processes can never both believe they hold the lock.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None
        self.created_directory = False

    def acquire(self):
        try:
            self.created_directory = not os.path.isdir(self.directory)
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise _not_writable(self.directory, e) from None
        if fcntl is None:
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a holder that had created the directory just removed it with its lock
                os.makedirs(self.directory, exist_ok=True)
                continue
            except OSError as e:
                raise _not_writable(self.directory, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _not_writable(self.directory, e) from None
                raise UserError(f"output_dir {self.directory} is in use by another training process "
                                f"(pid {holder or 'unknown'}, lock {self.path}); wait for it to finish or stop it, "
                                "or choose another output_dir=...") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its owner removed that file while we opened it: lock the new one
        else:
            raise UserError(f"output_dir {self.directory}: could not lock {self.path} (it keeps being replaced)")
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # the pid is only for the message a second process prints
            pass
        return self

    def release(self):
        if self.fd is None:
            return
        fileio.remove_quietly(self.path)
        if self.created_directory:
            try:
                os.rmdir(self.directory)  # only if this run wrote nothing there
            except OSError:
                pass
        os.close(self.fd)  # drops the lock
        self.fd = None


def _same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd, wait=1.0):
    """The pid a lock holder wrote into its lock file (it writes it just after locking: wait a little)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        if text.isdigit() or time.monotonic() > deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.02)


class RunDir:
    """The output directory of one run and the files in it."""

    def __init__(self, root):
        self.root = root
        self.config = os.path.join(root, "config.yaml")
        self.checkpoints = os.path.join(root, "checkpoints")
        self.loss_csv = os.path.join(root, "loss.csv")
        self.loss_png = os.path.join(root, "loss_curve.png")
        self.samples_dir = os.path.join(root, "samples")
        self.samples_png = os.path.join(root, "samples.png")
        self.samples_npy = os.path.join(root, "samples.npy")
        self.gif = os.path.join(root, "denoising.gif")
        self.quality_csv = os.path.join(root, "quality.csv")  # in-training evaluations (eval_every_steps)
        self.tensorboard = os.path.join(root, "tensorboard")  # event files (log_tensorboard)
        self.lock = RunLock(root)

    @property
    def best_checkpoint(self):
        """The checkpoint of the lowest in-training FD so far (keep_best); never rotated away."""
        from ddpm_ms.utils.checkpoint import BEST_NAME  # at call time: the lock needs no MindSpore

        return os.path.join(self.checkpoints, BEST_NAME)

    def holds_run(self):
        return os.path.exists(self.config) or os.path.isdir(self.checkpoints)

    def prepare(self, resume, overwrite):
        """Lock the directory, then check that it may be (re)used and make it ready; raises UserError."""
        self.lock.acquire()
        if self.holds_run() and not (resume or overwrite):
            raise UserError(f"output_dir {self.root} already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another output_dir=...")
        try:
            probe = os.path.join(self.root, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise _not_writable(self.root, e) from None
        if overwrite and not resume:
            for path in (self.checkpoints, self.samples_dir, self.tensorboard):
                shutil.rmtree(path, ignore_errors=True)
            try:
                for path in (self.loss_csv, self.loss_png, self.samples_png, self.samples_npy, self.gif,
                             self.quality_csv):
                    if os.path.exists(path):
                        os.remove(path)
            except OSError as e:
                raise UserError(f"--overwrite: cannot remove {path} ({e.strerror or e})") from None

    def release(self):
        self.lock.release()

    def resume_hint(self, err):
        """What to do after ``err`` (a WriteError) stopped the run: the newest complete checkpoint and --resume."""
        from ddpm_ms.utils import checkpoint as ckpt  # at call time: the lock needs no MindSpore

        fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        found = ckpt.CheckpointManager(self.checkpoints).list()
        if not found:
            return f"no checkpoint was written yet: {fix} and start the run again"
        return f"the newest complete checkpoint is {found[-1]}: {fix} and continue with --resume"


def resume_point(manager, resume, verbose=True):
    """The checkpoint a run starts from -> (path, groups, meta), or None for a new run.

    ``--resume`` on a directory without checkpoints starts a new run (with one notice line:
    a job script may always pass --resume); with checkpoints none of which can be read it is
    an error rather than a silent restart.
    """
    from ddpm_ms.utils import checkpoint as ckpt

    if not resume:
        return None
    latest = manager.load_latest()
    if latest is None:
        found = manager.list()
        if found:
            raise ckpt.CheckpointError(
                f"--resume: none of the {len(found)} checkpoints in {manager.directory} can be read; pass "
                "--overwrite to start a new run there, or choose another output_dir=...")
        if verbose:
            print(f"note: --resume: {manager.directory} holds no checkpoint yet; starting a new run",
                  file=sys.stderr, flush=True)
    return latest


def _csv_text(rows, header=None):
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


class CsvLog:
    """A CSV of one row per step (loss.csv, quality.csv); on resume rows after the checkpoint's step are dropped.

    The file is rewritten atomically when the log opens; each row is then appended with one
    ``write`` (readable at once while training). A row that cannot be written (a full disk) is
    cut off again, so the file only ever holds whole rows, and raises WriteError.
    """

    def __init__(self, path, resume_step=None, fields=CSV_FIELDS, what="loss log"):
        self.path, self.what = path, what
        self.rows = []  # the kept rows, as {field: text}
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        fileio.write_text(path, _csv_text([[r.get(k, "") for k in fields] for r in self.rows], fields), what)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self.fd).st_size

    def write(self, *values):
        data = _csv_text([values]).encode("utf-8")
        try:
            if fileio.injected_failure(self.path):
                os.write(self.fd, data[:len(data) // 2])
                raise fileio.injected_error(self.path)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.size)  # no half row
            except OSError:
                pass
            raise fileio.write_error(self.what, self.path, e, len(data)) from None
        self.size += len(data)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
