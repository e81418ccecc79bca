"""Fashion-MNIST for DDPM: find the IDX files, validate them, build the input pipeline.

Public API
----------
read_idx(path)
    Parse one IDX file (raw or gzip) into a uint8 array, validating it.
locate_fashion_mnist(data_dir=None, cache_dir=None, download=True, *, system_dirs=None,
                     downloader=None, checksums=None, mirror=FASHION_MNIST_MIRROR)
    Return a directory holding the four uncompressed, validated IDX files.
create_dataset(data_dir, batch_size, usage="train", image_size=28, ...)
    A ``mindspore.dataset`` pipeline yielding float32 image batches [B, 1, S, S] in [-1, 1].
load_arrays(data_dir, usage="train")
    (images uint8 [N, 28, 28], labels uint8 [N]) read with ``read_idx``.

Every problem a user can fix (missing, truncated or corrupt files, bad arguments) is raised
as ``ddpm_ms.errors.UserError`` with a one-line message.

MindSpore is imported lazily (inside ``create_dataset``) so that ``ddpm_ms`` can set
``ONEDNN_MAX_CPU_ISA`` before MindSpore first loads.
"""

import gzip
import hashlib
import os
import shutil
import struct
import zlib

import numpy as np

from ddpm_ms import fileio
from ddpm_ms.errors import UserError

# --------------------------------------------------------------------------- constants

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
IMAGE_SIDE = 28

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# (images file, labels file) per split, in the order FashionMnistDataset reads "all".
SPLITS = {"train": ((TRAIN_IMAGES, TRAIN_LABELS),),
          "test": ((TEST_IMAGES, TEST_LABELS),),
          "all": ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))}

# Where Debian's package ``dataset-fashion-mnist`` installs the four gz files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

# The original Fashion-MNIST mirror and the MD5s of its gz files (from the Fashion-MNIST
# README). Debian's package recompresses the files, so its gz files have other MD5s: those
# are validated by their IDX structure instead.
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    TRAIN_IMAGES + ".gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    TRAIN_LABELS + ".gz": "25c81989df183df01b3e8a0aad5dffbe",
    TEST_IMAGES + ".gz": "bef4ecab320f06d8554ea6380940ec79",
    TEST_LABELS + ".gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

_GZIP_MAGIC = b"\x1f\x8b"
_KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


# --------------------------------------------------------------------------- IDX parsing

def _parse_header(head, path, total_len):
    """Validate an IDX header; return (magic, dims, header_len). ``head`` may be longer."""
    if len(head) < 4:
        raise UserError(f"{path}: not an IDX file: only {total_len} bytes, "
                        f"shorter than the 4-byte magic number")
    (magic,) = struct.unpack(">I", head[:4])
    if magic not in _KIND:
        raise UserError(f"{path}: wrong magic number 0x{magic:08x}: expected 0x{IMAGES_MAGIC:08x} "
                        f"(uint8 images, 3 dims) or 0x{LABELS_MAGIC:08x} (uint8 labels, 1 dim); "
                        f"is it a Fashion-MNIST IDX file?")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise UserError(f"{path}: truncated header: expected {header_len} bytes, got {total_len}")
    dims = struct.unpack(">" + "I" * ndim, head[4:header_len])
    if magic == IMAGES_MAGIC and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise UserError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        f"{IMAGE_SIDE}x{IMAGE_SIDE} (Fashion-MNIST)")
    return magic, dims, header_len


def _check_payload(path, dims, header_len, total_len):
    expected = int(np.prod(dims, dtype=np.int64))
    got = total_len - header_len
    if got < expected:
        raise UserError(f"{path}: truncated: expected {expected} bytes of data after the "
                        f"header for shape {tuple(dims)}, got {got}")
    if got > expected:
        raise UserError(f"{path}: {got - expected} unexpected trailing bytes: expected "
                        f"{expected} bytes of data after the header for shape {tuple(dims)}, "
                        f"got {got}")


def _parse_idx(data, path):
    """Validate and parse the bytes of an uncompressed IDX file."""
    magic, dims, header_len = _parse_header(data, path, len(data))
    _check_payload(path, dims, header_len, len(data))
    return magic, np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_bytes(path):
    """Raw bytes of ``path``, gunzipped if it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected an IDX file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt or truncated gzip file ({e}); "
                            f"delete it and provide it again") from None
    return data


def read_idx(path):
    """Parse an IDX file (raw, or gzip-compressed: detected by the 0x1f8b magic).

    Accepts the two layouts of (Fashion-)MNIST: 0x00000803 (uint8 images, [N, 28, 28]) and
    0x00000801 (uint8 labels, [N]); the payload length must match the header exactly.
    Returns a writable uint8 ``np.ndarray``. Raises ``UserError`` naming the file and what is
    wrong with it.
    """
    path = os.fspath(path)
    _, arr = _parse_idx(_read_bytes(path), path)
    return arr.copy()


def _header_of_raw_file(path):
    """Validate an uncompressed IDX file by its header and size alone (no payload read).

    Returns (magic, dims). A gzip file here is an error: FashionMnistDataset needs raw files.
    """
    try:
        total_len = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise UserError(f"{path}: file does not exist") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if head[:2] == _GZIP_MAGIC:
        raise UserError(f"{path}: is gzip-compressed but has no .gz suffix; "
                        f"decompress it (gunzip) or rename it to {os.path.basename(path)}.gz")
    magic, dims, header_len = _parse_header(head, path, total_len)
    _check_payload(path, dims, header_len, total_len)
    return magic, dims


def _expect_kind(path, magic, name):
    want = IMAGES_MAGIC if "images" in name else LABELS_MAGIC
    if magic != want:
        raise UserError(f"{path}: holds {_KIND[magic]} (magic 0x{magic:08x}) but {name} must "
                        f"hold {_KIND[want]} (magic 0x{want:08x})")


def _check_pair(images_path, labels_path, images_dims, labels_dims):
    if images_dims[0] != labels_dims[0]:
        raise UserError(f"{images_path} holds {images_dims[0]} images but {labels_path} holds "
                        f"{labels_dims[0]} labels; the counts must match")


def validate_dir(data_dir, usage="all"):
    """Check that ``data_dir`` holds the uncompressed IDX files that ``usage`` needs.

    Cheap: reads only headers and file sizes. Returns the number of samples of ``usage``.
    """
    if usage not in SPLITS:
        raise UserError(f"usage must be 'train', 'test' or 'all', got {usage!r}")
    total = 0
    for images_name, labels_name in SPLITS[usage]:
        found = {}
        for name in (images_name, labels_name):
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                gz = " (only the .gz file is there; decompress it)" if os.path.isfile(
                    path + ".gz") else ""
                raise UserError(f"{path}: file does not exist{gz}")
            magic, dims = _header_of_raw_file(path)
            _expect_kind(path, magic, name)
            found[name] = (path, dims)
        (ip, idims), (lp, ldims) = found[images_name], found[labels_name]
        _check_pair(ip, lp, idims, ldims)
        total += idims[0]
    return total


# --------------------------------------------------------------------------- locating the data

def default_cache_dir():
    """``$DDPM_MS_DATA`` if set, else ``$XDG_CACHE_HOME/ddpm_ms/fashion-mnist``
    (``~/.cache/ddpm_ms/fashion-mnist`` when XDG_CACHE_HOME is unset)."""
    explicit = os.environ.get("DDPM_MS_DATA")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "ddpm_ms", "fashion-mnist")


def _write_atomic(path, data):
    """Write ``data`` to ``path`` atomically (``fileio.write_bytes``; a WriteError is an OSError)."""
    fileio.write_bytes(path, data, "decompressed data")


def _complete_raw(directory):
    """None if ``directory`` holds the four valid uncompressed files, else why not (str)."""
    if not os.path.isdir(directory):
        return "no such directory"
    try:
        validate_dir(directory, "all")
    except UserError as e:
        return str(e)
    return None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _materialize(src_dir, dest_dir):
    """Make ``dest_dir`` hold the four uncompressed files, taken from ``src_dir``.

    Per file, a valid uncompressed copy in ``src_dir`` is used as is, else its ``.gz`` is
    decompressed and validated. Everything is validated before anything is written, and each
    file is written atomically. Returns None on success, else why not (str).
    """
    if not os.path.isdir(src_dir):
        return "no such directory"
    same = _same_file(src_dir, dest_dir)
    payloads = {}
    dims = {}
    problems = []
    for name in FILES:
        raw, gz = os.path.join(src_dir, name), os.path.join(src_dir, name + ".gz")
        raw_problem = None
        if os.path.isfile(raw):
            try:
                magic, d = _header_of_raw_file(raw)
                _expect_kind(raw, magic, name)
                dims[name] = (raw, d)
                payloads[name] = None if same else raw  # copy later, only if needed
                continue
            except UserError as e:
                raw_problem = str(e)
        if os.path.isfile(gz):
            try:
                data = _read_bytes(gz)
                magic, arr = _parse_idx(data, gz)
                _expect_kind(gz, magic, name)
                dims[name] = (gz, arr.shape)
                payloads[name] = data
                continue
            except UserError as e:
                problems.append(str(e) if raw_problem is None else f"{raw_problem}; {e}")
                continue
        problems.append(raw_problem or f"missing {name} (or {name}.gz)")
    if problems:
        return ", ".join(problems)
    try:
        for images_name, labels_name in SPLITS["all"]:
            (ip, idims), (lp, ldims) = dims[images_name], dims[labels_name]
            _check_pair(ip, lp, idims, ldims)
    except UserError as e:
        return str(e)
    try:
        for name, payload in payloads.items():
            if payload is None:
                continue
            target = os.path.join(dest_dir, name)
            if isinstance(payload, str):  # uncompressed file elsewhere: copy it
                with open(payload, "rb") as f:
                    payload = f.read()
            _write_atomic(target, payload)
    except OSError as e:
        return f"could not write the decompressed files into {dest_dir}: {e}"
    return _complete_raw(dest_dir)


def _download_with_package(url, path):
    """Default downloader: fetch ``url`` to ``path`` with the ``download`` package."""
    import download as _download  # imported lazily: only needed when fetching

    _download.download(url, path, kind="file", progressbar=False, replace=True, timeout=60.0,
                       verbose=False)


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_into(cache_dir, downloader, checksums, mirror):
    """Fetch the four gz files into ``cache_dir``, verify MD5s, decompress.

    Returns None on success, else why not (str).
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        return f"cannot create {cache_dir}: {e}"
    base = mirror if mirror.endswith("/") else mirror + "/"
    for name in FILES:
        gz_name = name + ".gz"
        url = base + gz_name
        final = os.path.join(cache_dir, gz_name)
        part = final + ".part"
        try:
            downloader(url, part)
        except Exception as e:  # network errors come in many types
            _remove_quietly(part)
            detail = " ".join(str(e).split())  # one line: the CLI prints it as one
            return f"fetching {url} failed: {type(e).__name__}: {detail}"
        if not os.path.isfile(part):
            return f"fetching {url} produced no file"
        want = checksums.get(gz_name)
        if want is not None:
            got = _md5(part)
            if got != want:
                _remove_quietly(part)
                return f"{url}: MD5 mismatch: expected {want}, got {got} (download corrupted?)"
        os.replace(part, final)
    problem = _materialize(cache_dir, cache_dir)
    if problem is None:
        for name in FILES:
            _remove_quietly(os.path.join(cache_dir, name + ".gz"))
    return problem


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def locate_fashion_mnist(data_dir=None, cache_dir=None, download=True, *, system_dirs=None,
                         downloader=None, checksums=None, mirror=FASHION_MNIST_MIRROR):
    """Return a directory holding the four uncompressed, validated Fashion-MNIST IDX files.

    Tried in order:

    a. ``data_dir``, if given: it must hold the files, uncompressed or ``.gz`` (gz files are
       decompressed into ``cache_dir``, which is then returned). If it is given but unusable,
       ``UserError`` is raised at once; nothing else is tried.
    b. ``cache_dir`` (default :func:`default_cache_dir`).
    c. each of ``system_dirs`` (default ``(DEBIAN_DIR,)``: Debian's package
       ``dataset-fashion-mnist``); gz files are decompressed into ``cache_dir``.
    d. if ``download``: ``downloader(url, dest_path)`` (default: the ``download`` package)
       fetches the four gz files from ``mirror`` into ``cache_dir``; their MD5s must match
       ``checksums`` (default :data:`FASHION_MNIST_MD5`; files not listed are not checked).

    Files written into the cache are written atomically (temp file + ``os.replace``).
    If everything fails, one ``UserError`` lists every place tried, why each failed, and how
    to provide the files.
    """
    cache_dir = os.path.abspath(os.path.expanduser(
        os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()))
    system_dirs = (DEBIAN_DIR,) if system_dirs is None else tuple(system_dirs)
    checksums = FASHION_MNIST_MD5 if checksums is None else dict(checksums)
    how = (f"pass --data-dir DIR with the four files ({', '.join(FILES)}, uncompressed or .gz), "
           f"or run `apt-get install dataset-fashion-mnist`, "
           f"or copy the four files into {cache_dir}")

    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        if _complete_raw(data_dir) is None:
            return data_dir
        problem = _materialize(data_dir, cache_dir)
        if problem is None:
            return cache_dir
        raise UserError(f"Fashion-MNIST data dir {data_dir} is unusable: {problem}. Fix: {how}")

    tried = []
    problem = _complete_raw(cache_dir)
    if problem is None:
        return cache_dir
    # The cache may hold gz files (e.g. copied in by hand): decompress them in place.
    if os.path.isdir(cache_dir) and any(
            os.path.isfile(os.path.join(cache_dir, n + ".gz")) for n in FILES):
        problem = _materialize(cache_dir, cache_dir)
        if problem is None:
            return cache_dir
    tried.append(f"cache dir {cache_dir}: {problem}")

    for sysdir in system_dirs:
        sysdir = os.path.abspath(os.fspath(sysdir))
        problem = _materialize(sysdir, cache_dir)
        if problem is None:
            return cache_dir
        tried.append(f"system dir {sysdir}: {problem}")

    if download:
        problem = _download_into(cache_dir, downloader or _download_with_package, checksums,
                                 mirror)
        if problem is None:
            return cache_dir
        tried.append(f"download from {mirror}: {problem}")
    else:
        tried.append("download: not allowed (download=False)")

    places = "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
    raise UserError(f"Fashion-MNIST not found. Tried: {places}. Fix: {how}")


# --------------------------------------------------------------------------- arrays

def _split_file(data_dir, name):
    raw = os.path.join(data_dir, name)
    if os.path.isfile(raw) or not os.path.isfile(raw + ".gz"):
        return raw
    return raw + ".gz"


def load_arrays(data_dir, usage="train"):
    """Read a split with :func:`read_idx`: (images uint8 [N, 28, 28], labels uint8 [N]).

    Uses the uncompressed files, or their ``.gz`` when only those exist. ``usage="all"`` is
    train followed by test, as in ``FashionMnistDataset``.
    """
    if usage not in SPLITS:
        raise UserError(f"usage must be 'train', 'test' or 'all', got {usage!r}")
    data_dir = os.fspath(data_dir)
    images, labels = [], []
    for images_name, labels_name in SPLITS[usage]:
        ip, lp = _split_file(data_dir, images_name), _split_file(data_dir, labels_name)
        im, lb = read_idx(ip), read_idx(lp)
        if im.ndim != 3:
            raise UserError(f"{ip}: holds labels, expected images")
        if lb.ndim != 1:
            raise UserError(f"{lp}: holds images, expected labels")
        _check_pair(ip, lp, im.shape, lb.shape)
        images.append(im)
        labels.append(lb)
    if len(images) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------- pipeline

def create_dataset(data_dir, batch_size, usage="train", image_size=28, random_flip=True,
                   shuffle=True, num_shards=None, shard_id=None, num_parallel_workers=1,
                   drop_remainder=True, with_labels=False, seed=None):
    """The DDPM tutorial's Fashion-MNIST pipeline, as a ``mindspore.dataset`` dataset.

    ``FashionMnistDataset`` -> project ``image`` (and ``label``) -> [Resize to
    ``image_size`` if not 28] -> [RandomHorizontalFlip if ``random_flip``] -> ToTensor
    (HWC uint8 -> CHW float32 in [0, 1]) -> Normalize(0.5, 0.5) (= ``t * 2 - 1``, so 0 -> -1
    and 255 -> 1 exactly) -> batch. Columns: ``image`` float32 [B, 1, S, S], and ``label``
    int32 [B] when ``with_labels``. ``ds.get_dataset_size()`` is the number of batches.

    ``data_dir`` must hold the uncompressed IDX files (see :func:`locate_fashion_mnist`);
    they are checked first, since FashionMnistDataset silently yields nothing for a missing
    split.

    ``seed``: if given, calls ``mindspore.dataset.config.set_seed(seed)`` before building, so
    the shuffle order and the flips are reproducible. That seed is GLOBAL to
    ``mindspore.dataset`` in this process: it also affects every other pipeline.
    """
    import mindspore as ms
    import mindspore.dataset as msds
    import mindspore.dataset.transforms as transforms
    import mindspore.dataset.vision as vision

    data_dir = os.fspath(data_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if (num_shards is None) != (shard_id is None):
        raise UserError("num_shards and shard_id must be given together")
    if num_shards is not None and not (num_shards >= 1 and 0 <= shard_id < num_shards):
        raise UserError(f"need num_shards >= 1 and 0 <= shard_id < num_shards, got "
                        f"num_shards={num_shards}, shard_id={shard_id}")
    if not os.path.isdir(data_dir):
        raise UserError(f"data dir {data_dir} does not exist or is not a directory")
    n = validate_dir(data_dir, usage)
    per_shard = -(-n // num_shards) if num_shards else n
    if drop_remainder and per_shard < batch_size:
        raise UserError(f"batch_size {batch_size} is larger than the {per_shard} samples "
                        f"available{' per shard' if num_shards else ''} in {data_dir} "
                        f"(usage={usage!r}); with drop_remainder no batch would be produced: "
                        f"use a smaller batch size")

    if seed is not None:
        msds.config.set_seed(int(seed))

    ds = msds.FashionMnistDataset(data_dir, usage=usage, shuffle=shuffle,
                                  num_shards=num_shards, shard_id=shard_id)
    ds = ds.project(["image", "label"] if with_labels else ["image"])

    image_ops = []
    if image_size != IMAGE_SIDE:
        image_ops.append(vision.Resize((int(image_size), int(image_size)),
                                       interpolation=vision.Inter.BILINEAR))
    if random_flip:
        image_ops.append(vision.RandomHorizontalFlip())
    image_ops.append(vision.ToTensor())
    image_ops.append(vision.Normalize(mean=[0.5], std=[0.5], is_hwc=False))
    ds = ds.map(operations=image_ops, input_columns="image",
                num_parallel_workers=num_parallel_workers)
    if with_labels:
        ds = ds.map(operations=transforms.TypeCast(ms.int32), input_columns="label",
                    num_parallel_workers=num_parallel_workers)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds
