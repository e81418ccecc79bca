"""Helpers shared by the dataset locators: atomic writes, checked downloads (caches: ddpm_ms.cache).

write_atomic(path, data)           through ddpm_ms.fileio (temp file, fsync, os.replace)
md5(path)                          hex MD5 of a file
fetch_checked(url, dest, downloader, md5_hex)
                                   download to dest.part, verify the MD5, rename; None or why not
download_with_package(url, path)   the default downloader (the ``download`` package)
"""

import hashlib
import os

from ddpm_ms import fileio
from ddpm_ms.errors import UserError


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


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_checked(url, dest, downloader, want_md5=None):
    """``downloader(url, dest + ".part")``, check its MD5 (if ``want_md5``), rename to ``dest``.

    Returns None on success, else why not (one line). A failed or corrupt download leaves
    nothing behind.
    """
    part = dest + ".part"
    try:
        downloader(url, part)
    except Exception as e:  # network errors come in many types
        remove_quietly(part)
        detail = " ".join(str(e).split())  # one line: the CLI prints it as one
        return f"fetching {url} failed: {type(e).__name__}: {detail}"
    if not os.path.isfile(part):
        return f"fetching {url} produced no file"
    if want_md5 is not None:
        got = md5(part)
        if got != want_md5:
            remove_quietly(part)
            return f"{url}: MD5 mismatch: expected {want_md5}, got {got} (download corrupted?)"
    os.replace(part, dest)
    return None
