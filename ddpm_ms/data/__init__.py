"""Datasets for DDPM: one module per dataset behind one ``create_dataset(name, ...)``.

    name            images                      classes  module
    fashion_mnist   28x28x1, 60k train/10k test  10       idx.py (format), mnist.py (locating)
    mnist           28x28x1, 60k train/10k test  10       idx.py, mnist.py
    cifar10         32x32x3, 50k train/10k test  10       cifar10.py
    folder          any size, gray or colour     from class subfolders, if any   folder.py

Public API
----------
DATASETS                                  the names above (the ``dataset`` config key)
dataset_spec(name, data_dir=None, image_size=None, channels=None) -> DatasetSpec
    image_size, channels, class_names, num_classes, title (folders: class names from a scan)
locate(name, data_dir=None, download=True) -> a directory that holds the dataset
    (``--data-dir``, the per-user cache, a system location, a checksum-verified download)
create_dataset(name, data_dir, batch_size, usage="train", image_size=None, channels=None, ...)
    a ``mindspore.dataset`` pipeline of float32 batches [B, C, S, S] in [-1, 1] (see dataset.py)
load_split(name, data_dir, usage)         -> (images uint8 [N, C, H, W], labels int64 [N])
check_config(spec, cfg)                   a run's channels / num_classes against the dataset

The format helpers live in their modules (``idx.read_idx``, ``mnist.locate_fashion_mnist``, ...).
Importing this package imports no MindSpore (``ddpm_ms.config`` reads DATASETS from here):
only ``create_dataset`` does. This package imports ddpm_ms.utils only.
"""

from collections import namedtuple

import numpy as np

from ddpm_ms.utils.errors import UserError

from ddpm_ms.data import cifar10, folder, idx, mnist  # the dataset modules
from ddpm_ms.data.dataset import build_pipeline

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

DatasetSpec = namedtuple("DatasetSpec", "name title image_size channels class_names num_classes")

# the labelled datasets with a fixed image format: (title, side, channels, class names)
_FIXED = {
    "fashion_mnist": ("Fashion-MNIST", idx.IMAGE_SIDE, 1, FASHION_MNIST_CLASSES),
    "mnist": ("MNIST", idx.IMAGE_SIDE, 1, MNIST_CLASSES),
    "cifar10": ("CIFAR-10", cifar10.SIDE, 3, cifar10.CLASS_NAMES),
}
DATASETS = tuple(_FIXED) + ("folder",)
LABELLED = tuple(_FIXED)


def _check_name(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def dataset_spec(name, data_dir=None, image_size=None, channels=None):
    """What dataset ``name`` holds. Fixed datasets: their stored size and channels. ``folder``:
    ``image_size`` and ``channels`` as asked (the images are converted), class names from the
    class subfolders of ``data_dir`` (scanned), or None."""
    _check_name(name)
    if name in _FIXED:
        title, side, chans, classes = _FIXED[name]
        return DatasetSpec(name, title, side, chans, classes, len(classes))
    if image_size is None or channels is None:
        raise UserError("a folder dataset needs image_size and channels (what the images are converted to)")
    if data_dir is None:
        raise UserError("dataset: folder needs data_dir (the folder of images): pass --data-dir DIR")
    index = folder.scan_folder(data_dir)
    classes = index.class_names
    return DatasetSpec("folder", f"image folder {index.root}", int(image_size), int(channels), classes,
                       len(classes) if classes else None)


def locate(name, data_dir=None, download=True):
    """A directory holding dataset ``name`` (see each module's locate function for the search order)."""
    _check_name(name)
    if name == "fashion_mnist":
        return mnist.locate_fashion_mnist(data_dir, download=download)
    if name == "mnist":
        return mnist.locate_mnist(data_dir, download=download)
    if name == "cifar10":
        return cifar10.locate_cifar10(data_dir, download=download)
    if data_dir is None:
        raise UserError("dataset: folder needs data_dir (the folder of images): pass --data-dir DIR")
    index = folder.scan_folder(data_dir)  # errors (missing, empty, nothing decodable) show up here
    return index.root


def create_dataset(name, data_dir, batch_size, usage="train", image_size=None, channels=None, random_flip=True,
                   center_crop=True, shuffle=True, num_shards=None, shard_id=None, num_parallel_workers=1,
                   drop_remainder=True, with_labels=False, seed=None):
    """The input pipeline of dataset ``name`` from ``data_dir`` (a directory :func:`locate` returned).

    Batches of ``image`` float32 [B, C, S, S] in [-1, 1] (and ``label`` int32 [B] when
    ``with_labels``); ``ds.get_dataset_size()`` is the number of batches. ``image_size``:
    default the stored size (fixed datasets are resized bilinearly to another size); folders
    need it, and ``channels`` (1 or 3). Folders: shorter side resized to ``image_size``, then
    a centre crop (``center_crop``) or a random crop. ``random_flip``: horizontal flips, p=0.5.

    The files are validated first (readers of MindSpore silently yield nothing for a missing
    split). ``seed``: if given, ``mindspore.dataset.config.set_seed(seed)`` before building, so
    the order, crops and flips are reproducible; that seed is GLOBAL to ``mindspore.dataset``.
    """
    _check_name(name)
    if name in _FIXED:
        native, native_channels = _FIXED[name][1], _FIXED[name][2]
        if channels is not None and channels != native_channels:
            raise UserError(f"{_FIXED[name][0]} images have {native_channels} channel(s), got channels={channels}")
        channels = native_channels
    else:
        native = None
        if image_size is None or channels not in (1, 3):
            raise UserError(f"a folder dataset needs image_size and channels 1 or 3, got image_size={image_size}, "
                            f"channels={channels}")
    return build_pipeline(name, data_dir, batch_size, native, channels, usage=usage, image_size=image_size,
                          random_flip=random_flip, center_crop=center_crop, shuffle=shuffle, num_shards=num_shards,
                          shard_id=shard_id, num_parallel_workers=num_parallel_workers,
                          drop_remainder=drop_remainder, with_labels=with_labels, seed=seed)


def load_split(name, data_dir, usage="train"):
    """A labelled dataset's split as arrays: (images uint8 [N, C, H, W], labels int64 [N])."""
    _check_name(name)
    if name not in _FIXED:
        raise UserError("folder datasets have no fixed splits to load as arrays")
    if name == "cifar10":
        images, labels = cifar10.load_arrays(data_dir, usage)
        images = images.transpose(0, 3, 1, 2)
    else:
        images, labels = idx.load_arrays(data_dir, usage)
        images = images[:, None]
    return np.ascontiguousarray(images), labels.astype(np.int64)


def check_config(spec, cfg):
    """A run config's ``channels`` and ``num_classes`` against the dataset -> UserError if they cannot work."""
    if cfg["channels"] != spec.channels:
        raise UserError(f"{spec.title} images have {spec.channels} channel(s) ({spec.image_size}x{spec.image_size}): "
                        f"set channels={spec.channels}")
    if cfg["num_classes"] is not None:
        if not spec.num_classes:
            raise UserError(f"num_classes={cfg['num_classes']} needs labels, but {spec.title} has none: give it one "
                            "subfolder per class, or set num_classes=null")
        if cfg["num_classes"] != spec.num_classes:
            names = ", ".join(spec.class_names)
            raise UserError(f"num_classes={cfg['num_classes']} but {spec.title} has {spec.num_classes} classes "
                            f"({names}): set num_classes={spec.num_classes}")
