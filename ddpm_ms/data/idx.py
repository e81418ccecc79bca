"""The IDX format of MNIST and Fashion-MNIST: parse, validate, read a split as arrays.

read_idx(path)                      one IDX file (raw or gzip) -> uint8 array, validated
validate_dir(data_dir, usage)       check the uncompressed files of a split (headers and sizes only)
load_arrays(data_dir, usage)        (images uint8 [N, 28, 28], labels uint8 [N])

Both datasets use the same four file names (FILES) and 28x28 uint8 images. Every problem a
user can fix (missing, truncated or corrupt files) is a ``UserError`` naming the file.
"""

import gzip
import os
import struct
import zlib

import numpy as np

from ddpm_ms.utils.errors import UserError

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
                        f"is it an MNIST / Fashion-MNIST IDX file?")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise UserError(f"{path}: truncated header: expected {header_len} bytes, got {total_len}")
    dims = struct.unpack(">" + "I" * ndim, head[4:header_len])
    if magic == IMAGES_MAGIC and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise UserError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        f"{IMAGE_SIDE}x{IMAGE_SIDE} (MNIST / Fashion-MNIST)")
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
