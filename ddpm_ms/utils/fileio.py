"""Writing a file so that no reader, crash or full disk ever sees half of it under its name.

Every file ddpm_ms writes goes through :func:`atomic_write`: the data goes to a hidden
temporary name in the target's directory (``.tmp-<pid>-<name>``, so it keeps the target's
extension), is fsynced, renamed over the target (``os.replace``, atomic on POSIX) and the
directory is fsynced. On any error the temporary file is removed and the target keeps its
previous content. An OSError (a full disk, a quota, an I/O or permission error) becomes a
:class:`~ddpm_ms.utils.errors.WriteError` whose one-line message names the file, the reason, the
space the write needed and the space that was free; the command lines exit with code 4.

Test hook: ``DDPM_MS_FAIL_WRITE="name[:n][,name[:n]...]"`` makes the n-th write (default: the
first) of a file whose base name is ``name`` fail in this process with ENOSPC, after its data
was written: what is tested is the clean-up of a partial file and what the caller does next.
"""

import errno
import io
import os

from ddpm_ms.utils.errors import WriteError

TMP_PREFIX = ".tmp-"
FAIL_ENV = "DDPM_MS_FAIL_WRITE"
_writes = {}  # base name -> number of writes so far (for the test hook)


def temp_path(path):
    """The temporary name ``path`` is written under: hidden, per process, same directory and extension."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{name}")


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def free_bytes(directory):
    """Bytes an unprivileged writer may still use on the filesystem holding ``directory`` (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    return st.f_bavail * st.f_frsize


def format_bytes(n):
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def injected_failure(path):
    """True when the DDPM_MS_FAIL_WRITE hook asks this write of ``path`` to fail (counts every call)."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return False
    name = os.path.basename(path)
    count = _writes[name] = _writes.get(name, 0) + 1
    for item in spec.split(","):
        target, _, nth = item.strip().partition(":")
        if target == name and count == int(nth or 1):
            return True
    return False


def injected_error(path):
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAIL_ENV})", path)


def write_error(what, path, err, needed=None):
    """The WriteError for ``err`` (an OSError raised while writing ``what`` to ``path``)."""
    reason = err.strerror or str(err) or type(err).__name__
    space = ""
    if needed is not None:
        free = free_bytes(os.path.dirname(os.path.abspath(path)))
        space = f" (needs {format_bytes(needed)}" + (f", {format_bytes(free)} free" if free is not None else "") + ")"
    return WriteError(f"could not write {what} {path}: {reason}{space}", err.errno, path, needed)


def atomic_write(path, write, what="file", size=None, sync=True):
    """Write the file ``path`` by calling ``write(tmp)``, which creates the file ``tmp``; returns ``path``.

    ``what`` names the file in an error message ("checkpoint", "image", ...); ``size`` is the
    number of bytes the file takes, for that message (default: the size the temporary file had
    reached when the error happened). Exceptions other than OSError pass through unchanged
    (after the temporary file is removed).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        if injected_failure(path):
            raise injected_error(tmp)
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if sync:
            fsync_path(directory, directory=True)
    except WriteError:
        remove_quietly(tmp)
        raise
    except OSError as e:
        if size is None and os.path.isfile(tmp):
            size = os.path.getsize(tmp)
        remove_quietly(tmp)
        raise write_error(what, path, e, size) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(path, data, what="file", sync=True):
    """Write ``data`` (bytes) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: _write_file(tmp, data), what, size=len(data), sync=sync)


def write_text(path, text, what="file", sync=True):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), what, sync=sync)


def encoded(save):
    """The bytes ``save(file_object)`` writes (to know a file's size before it is written)."""
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


def npy_bytes(array):
    """``array`` in NumPy's .npy format."""
    import numpy as np

    return encoded(lambda f: np.save(f, array))
