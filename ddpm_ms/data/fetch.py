"""Helpers shared by the dataset locators: atomic writes, checked downloads (caches: ddpm_ms.utils.cache).

write_atomic(path, data)           through ddpm_ms.utils.fileio (temp file, fsync, os.replace)
md5(path)                          hex MD5 of a file
fetch_checked(url, dest, downloader, md5_hex)
                                   download to a unique dest.<pid>.<random>.part, verify the MD5,
                                   rename; None or why not
download_with_package(url, path)   the default downloader (the ``download`` package)
cache_lock(cache_dir)              context manager: an exclusive lock while a cache is filled

Several processes may fill one cache at once (msrun starts the training command in every worker
and in its scheduler). A locator first looks at its cache without a lock (a complete cache is
only read, so a read-only one works); if the cache has to be filled it does so inside
``cache_lock(cache_dir)``, an ``fcntl.flock`` on ``<parent>/.<name>.lock`` beside the cache, and
looks again once it holds the lock: one process downloads and decompresses, the others wait and
then find the finished cache. A lock that cannot be created or taken (read-only directory, no
flock support) is skipped: the locator goes on unlocked, as before.
"""

import contextlib
import hashlib
import os
import secrets
import sys
import time

from ddpm_ms.utils import fileio
from ddpm_ms.utils.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, caches are not protected
    fcntl = None

LOCK_NOTE_AFTER = 5.0  # seconds a process waits for the lock before it says so (one line on stderr)


def write_atomic(path, data, what="decompressed data"):
    """Write ``data`` to ``path`` atomically (``fileio.write_bytes``; its WriteError is an OSError)."""
    fileio.write_bytes(path, data, what)


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def directory_problem(directory, validate):
    """None if ``directory`` exists and ``validate(directory)`` raises no UserError, else why not (str)."""
    if not os.path.isdir(directory):
        return "no such directory"
    try:
        validate(directory)
    except UserError as e:
        return str(e)
    return None


def download_with_package(url, path):
    """Default downloader: fetch ``url`` to ``path`` with the ``download`` package."""
    import download as _download  # imported lazily: only needed when fetching

    _download.download(url, path, kind="file", progressbar=False, replace=True, timeout=60.0,
                       verbose=False)


def lock_path(cache_dir):
    """``<parent>/.<name>.lock``: beside the cache, so the cache itself holds only the dataset."""
    parent, name = os.path.split(os.path.abspath(cache_dir))
    return os.path.join(parent, f".{name}.lock")


def _lock_fd(cache_dir, note_after):
    """An fd holding an exclusive flock on :func:`lock_path`, or None if no lock can be had."""
    if fcntl is None:
        return None
    path = lock_path(cache_dir)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # not inherited by child processes
    except OSError:
        return None  # read-only: nothing can be written into the cache either; go on unlocked
    try:
        deadline = time.monotonic() + note_after
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:  # another process holds it
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        print(f"waiting for another process to fill {cache_dir} (lock {path})", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:  # e.g. ENOLCK on a network filesystem: go on unlocked
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def cache_lock(cache_dir, note_after=LOCK_NOTE_AFTER):
    """Hold an exclusive inter-process lock on the cache ``cache_dir`` (see the module docstring).

    Waits as long as another process holds it (that one is downloading); after ``note_after``
    seconds of waiting it prints one line to stderr. The lock file is left in place (removing
    it would let two processes lock two different files); the kernel drops the lock when the
    holder closes it or dies.
    """
    fd = _lock_fd(cache_dir, note_after)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_checked(url, dest, downloader, want_md5=None):
    """``downloader(url, part)``, check its MD5 (if ``want_md5``), rename ``part`` to ``dest``.

    ``part`` is ``dest.<pid>.<random>.part``: unique, so concurrent downloads never touch each
    other's files. Returns None on success, else why not (one line). A failed, corrupt or
    interrupted download leaves nothing behind.
    """
    part = f"{dest}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        try:
            downloader(url, part)
        except Exception as e:  # network errors come in many types
            detail = " ".join(str(e).split())  # one line: the CLI prints it as one
            return f"fetching {url} failed: {type(e).__name__}: {detail}"
        if not os.path.isfile(part):
            return f"fetching {url} produced no file"
        if want_md5 is not None:
            got = md5(part)
            if got != want_md5:
                return f"{url}: MD5 mismatch: expected {want_md5}, got {got} (download corrupted?)"
        os.replace(part, dest)
        return None
    finally:
        remove_quietly(part)  # gone already after the rename
