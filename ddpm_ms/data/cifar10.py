"""CIFAR-10, binary version: validate the batch files, locate or fetch them, read them as arrays.

Format (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009, and the
dataset's page): each ``*.bin`` file holds 10000 records of 3073 bytes: one label byte
(0..9), then 1024 red, 1024 green and 1024 blue bytes of a 32x32 image in row-major order.
``data_batch_1.bin`` .. ``data_batch_5.bin`` are the train split, ``test_batch.bin`` the test
split. MindSpore's ``Cifar10Dataset`` reads exactly this layout and rejects files that do not
hold 10000 records, so :func:`validate_dir` checks that first, with a message that names the
file.

validate_dir(data_dir, usage)      -> number of images of the split (file sizes only)
locate_cifar10(data_dir=None, cache_dir=None, download=True, ...)
                                   -> directory holding the batch files
load_arrays(data_dir, usage)       -> (images uint8 [N, 32, 32, 3], labels uint8 [N]) with NumPy
"""

import os
import tarfile

import numpy as np

from ddpm_ms.utils import fileio
from ddpm_ms.utils.cache import cache_dir
from ddpm_ms.utils.errors import UserError

from ddpm_ms.data.fetch import cache_lock, directory_problem, download_with_package, fetch_checked, remove_quietly

RECORDS = 10000
SIDE = 32
RECORD_BYTES = 1 + 3 * SIDE * SIDE
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
SPLITS = {"train": TRAIN_FILES, "test": TEST_FILES, "all": TRAIN_FILES + TEST_FILES}
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

ARCHIVE = "cifar-10-binary.tar.gz"
ARCHIVE_DIR = "cifar-10-batches-bin"  # the folder inside the archive
URL = "https://www.cs.toronto.edu/~kriz/" + ARCHIVE
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the dataset's page


def default_cache_dir():
    """``~/.cache/ddpm_ms/cifar-10`` (under ``$XDG_CACHE_HOME`` when set)."""
    return cache_dir("cifar-10")


def _check_file(path):
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UserError(f"{path}: file does not exist") from None
    if size != RECORDS * RECORD_BYTES:
        raise UserError(f"{path}: {size} bytes, expected {RECORDS * RECORD_BYTES} ({RECORDS} records of "
                        f"{RECORD_BYTES} bytes: the CIFAR-10 binary version); re-download it")


def split_files(data_dir, usage):
    """The batch files of ``usage`` present in ``data_dir`` (train: at least data_batch_1.bin)."""
    if usage not in SPLITS:
        raise UserError(f"usage must be 'train', 'test' or 'all', got {usage!r}")
    files = []
    for group in (("train",) if usage == "train" else ("test",) if usage == "test" else ("train", "test")):
        present = [n for n in SPLITS[group] if os.path.isfile(os.path.join(data_dir, n))]
        if not present:
            raise UserError(f"{os.path.join(data_dir, SPLITS[group][0])}: file does not exist (CIFAR-10 "
                            f"binary version: {', '.join(SPLITS[group])})")
        files += present
    return [os.path.join(data_dir, n) for n in files]


def validate_dir(data_dir, usage="all"):
    """Check the batch files of ``usage`` by their sizes; returns the number of images."""
    files = split_files(data_dir, usage)
    for path in files:
        _check_file(path)
    return RECORDS * len(files)


def _complete(directory):
    """None if ``directory`` holds all six full batch files, else why not (str)."""
    if not os.path.isdir(directory):
        return "no such directory"
    try:
        missing = [n for n in SPLITS["all"] if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            return f"missing {', '.join(missing)}"
        validate_dir(directory, "all")
    except UserError as e:
        return str(e)
    return None


def _usable(directory):
    """None if ``directory`` has a train and a test split (fewer than 5 train batches is allowed
    for a --data-dir the user gives), else why not."""
    return directory_problem(directory, lambda d: validate_dir(d, "all"))


def _copy(src, path):
    with open(path, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)


def extract_archive(archive, dest_dir):
    """Extract the six batch files (and batches.meta.txt) of the CIFAR-10 binary archive into
    ``dest_dir`` (flat). Only those regular members are read: nothing else of the archive is
    written. Returns None or why not."""
    wanted = set(SPLITS["all"]) | {"batches.meta.txt"}
    try:
        os.makedirs(dest_dir, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if not member.isfile() or name not in wanted:
                    continue
                src = tar.extractfile(member)
                fileio.atomic_write(os.path.join(dest_dir, name), lambda tmp, src=src: _copy(src, tmp),
                                    "CIFAR-10 batch file", size=member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"{archive}: cannot extract ({' '.join(str(e).split())})"
    return _complete(dest_dir)


def locate_cifar10(data_dir=None, cache_dir=None, download=True, *, downloader=None, checksum=ARCHIVE_MD5,
                   url=URL):
    """Return a directory holding the CIFAR-10 binary batch files.

    Tried in order: ``data_dir`` (the batch files, a ``cifar-10-batches-bin`` folder in it, or
    the ``cifar-10-binary.tar.gz`` archive, which is extracted into the cache; if given but
    unusable, ``UserError`` at once), the cache (default :func:`default_cache_dir`), then, if
    ``download``, the archive fetched with ``downloader(url, path)`` (default: the
    ``download`` package), its MD5 checked against ``checksum``, extracted into the cache.
    Filling the cache runs under :func:`~.fetch.cache_lock` (concurrent processes download
    once); a complete cache is used unlocked.
    """
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir) if cache_dir else default_cache_dir()))
    how = (f"pass --data-dir DIR with the CIFAR-10 binary files ({', '.join(SPLITS['all'])}) or the archive "
           f"{ARCHIVE} (from the CIFAR-10 page, binary version), or put them into {cache_dir}")
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        candidates = [data_dir, os.path.join(data_dir, ARCHIVE_DIR)]
        for directory in candidates:
            if _usable(directory) is None:
                return directory
        archive = os.path.join(data_dir, ARCHIVE) if os.path.isdir(data_dir) else data_dir
        if os.path.isfile(archive) and archive.endswith((".tar.gz", ".tgz")):
            with cache_lock(cache_dir):
                problem = extract_archive(archive, cache_dir)
            if problem is None:
                return cache_dir
        else:
            problem = _usable(data_dir)
        raise UserError(f"CIFAR-10 data dir {data_dir} is unusable: {problem}. Fix: {how}")

    if _complete(cache_dir) is None:
        return cache_dir  # the usual case: only read, so a read-only cache works
    with cache_lock(cache_dir):  # of several processes (msrun) one downloads, the others wait, then find it
        tried = []
        problem = _complete(cache_dir)
        if problem is None:
            return cache_dir
        tried.append(f"cache dir {cache_dir}: {problem}")
        if download:
            os.makedirs(cache_dir, exist_ok=True)
            archive = os.path.join(cache_dir, ARCHIVE)
            problem = fetch_checked(url, archive, downloader or download_with_package, checksum)
            if problem is None:
                problem = extract_archive(archive, cache_dir)
                remove_quietly(archive)
                if problem is None:
                    return cache_dir
            tried.append(f"download from {url}: {problem}")
        else:
            tried.append("download: not allowed (download=False)")
    places = "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
    raise UserError(f"CIFAR-10 not found. Tried: {places}. Fix: {how}")


def decode_records(raw):
    """bytes / uint8 array of whole records -> (images uint8 [N, 32, 32, 3] HWC, labels uint8 [N])."""
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    images = rec[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rec[:, 0].copy()


def load_arrays(data_dir, usage="train"):
    """(images uint8 [N, 32, 32, 3], labels uint8 [N]) of a split, read with NumPy, files in
    the order Cifar10Dataset reads them (data_batch_1 .. 5, then test_batch)."""
    images, labels = [], []
    for path in split_files(os.fspath(data_dir), usage):
        _check_file(path)
        with open(path, "rb") as f:
            im, lb = decode_records(f.read())
        if lb.max(initial=0) > 9:
            raise UserError(f"{path}: label {int(lb.max())} out of range 0..9; is it the CIFAR-10 binary version?")
        images.append(im)
        labels.append(lb)
    return np.concatenate(images), np.concatenate(labels)
