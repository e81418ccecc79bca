"""Writing small IDX datasets (the Fashion-MNIST file format) for tests."""

import gzip
import os
import struct

import numpy as np

FILE_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def idx_bytes(arr, magic=None, count=None):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x800 | arr.ndim) if magic is None else magic
    dims = list(arr.shape)
    if count is not None:
        dims[0] = count
    return (struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *dims)
            + arr.tobytes())


def write_idx(path, arr, gz=False, **kw):
    payload = idx_bytes(arr, **kw)
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return str(path)


def write_blob_dataset(directory, n_train=64, n_test=16, seed=0):
    """A Fashion-MNIST-shaped dataset of bright blobs on dark ground; returns the directory."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]

    def images(n):
        cy, cx = rng.uniform(9, 19, (2, n, 1, 1))
        r = rng.uniform(4, 8, (n, 1, 1))
        return (255 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2)).astype(np.uint8)

    os.makedirs(directory, exist_ok=True)
    arrays = (images(n_train), rng.integers(0, 10, n_train), images(n_test), rng.integers(0, 10, n_test))
    for name, arr in zip(FILE_NAMES, arrays):
        write_idx(os.path.join(directory, name), arr)
    return str(directory)


def write_fixed_classifier(cache_root, seed=123):
    """An untrained Fashion-MNIST classifier with fixed-seed weights (a fixed random feature map), cached under
    ``cache_root/classifier`` with the default key, so evaluation finds it (DDPM_MS_CACHE=cache_root) and trains
    nothing; returns ``str(cache_root)``."""
    import mindspore as ms

    from ddpm_ms.evaluation import classifier as C

    ms.set_seed(seed)
    net = C.FashionCNN()
    net.set_train(False)
    C.save_classifier(net, os.path.join(str(cache_root), "classifier", C.cache_key() + ".ckpt"),
                      {"version": C.CLASSIFIER_VERSION, "key": C.cache_key(), "test_accuracy": 0.0})
    return str(cache_root)
