"""The ``mindspore.dataset`` input pipelines: one reader per dataset, one shared tail.

    reader (FashionMnistDataset | MnistDataset | Cifar10Dataset | GeneratorDataset(FolderSource))
    -> project image (and label) -> [Resize to image_size, fixed datasets, if not native]
    -> [RandomCrop to image_size, folder without center_crop] -> [RandomHorizontalFlip]
    -> ToTensor (HWC uint8 -> CHW float32 in [0, 1]) -> Normalize(0.5, 0.5) (= t * 2 - 1: 0 -> -1,
    255 -> 1 exactly) -> batch

Columns: ``image`` float32 [B, C, S, S], and ``label`` int32 [B] when ``with_labels``. Sharding
(``num_shards``/``shard_id``) is done by the reader, so every dataset shards the same way.
MindSpore is imported inside :func:`build_pipeline` (``ddpm_ms`` sets ``ONEDNN_MAX_CPU_ISA``
before MindSpore first loads).
"""

import os

import numpy as np

from ddpm_ms.utils.errors import UserError

from ddpm_ms.data import cifar10
from ddpm_ms.data import folder
from ddpm_ms.data import idx


def _positive_int(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def check_arguments(batch_size, image_size, num_shards, shard_id):
    if not _positive_int(batch_size):
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not _positive_int(image_size):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if (num_shards is None) != (shard_id is None):
        raise UserError("num_shards and shard_id must be given together")
    if num_shards is not None and not (num_shards >= 1 and 0 <= shard_id < num_shards):
        raise UserError(f"need num_shards >= 1 and 0 <= shard_id < num_shards, got "
                        f"num_shards={num_shards}, shard_id={shard_id}")


def count_samples(name, data_dir, usage, channels, image_size, center_crop):
    """Validate the files of ``usage`` -> (number of samples, reader info)."""
    if name in ("fashion_mnist", "mnist"):
        return idx.validate_dir(data_dir, usage), None
    if name == "cifar10":
        return cifar10.validate_dir(data_dir, usage), None
    if usage == "test":
        raise UserError("folder datasets have no test split (usage must be 'train' or 'all')")
    index = folder.scan_folder(data_dir)
    return len(index.files), index


def _reader(name, data_dir, usage, shuffle, num_shards, shard_id, info, channels, image_size, center_crop,
            num_parallel_workers):
    import mindspore.dataset as msds

    kw = dict(shuffle=shuffle, num_shards=num_shards, shard_id=shard_id)
    if name == "fashion_mnist":
        return msds.FashionMnistDataset(data_dir, usage=usage, **kw)
    if name == "mnist":
        return msds.MnistDataset(data_dir, usage=usage, **kw)
    if name == "cifar10":
        return msds.Cifar10Dataset(data_dir, usage=usage, **kw)
    source = folder.FolderSource(info, channels, image_size, crop=center_crop)
    return msds.GeneratorDataset(source, column_names=["image", "label"], num_parallel_workers=num_parallel_workers,
                                 python_multiprocessing=num_parallel_workers > 1, **kw)


def build_pipeline(name, data_dir, batch_size, native_size, channels, usage="train", image_size=None,
                   random_flip=True, center_crop=True, shuffle=True, num_shards=None, shard_id=None,
                   num_parallel_workers=1, drop_remainder=True, with_labels=False, seed=None):
    """The pipeline of dataset ``name`` (see the module docstring); ``native_size`` is the
    side of the stored images (None for folders: they are resized while decoding)."""
    import mindspore as ms
    import mindspore.dataset as msds
    import mindspore.dataset.transforms as transforms
    import mindspore.dataset.vision as vision

    data_dir = os.fspath(data_dir)
    image_size = native_size if image_size is None else image_size
    check_arguments(batch_size, image_size, num_shards, shard_id)
    if not os.path.isdir(data_dir):
        raise UserError(f"data dir {data_dir} does not exist or is not a directory")
    n, info = count_samples(name, data_dir, usage, channels, image_size, center_crop)
    per_shard = -(-n // num_shards) if num_shards else n
    if drop_remainder and per_shard < batch_size:
        raise UserError(f"batch_size {batch_size} is larger than the {per_shard} samples "
                        f"available{' per shard' if num_shards else ''} in {data_dir} "
                        f"(usage={usage!r}); with drop_remainder no batch would be produced: "
                        f"use a smaller batch size")

    if seed is not None:
        msds.config.set_seed(int(seed))

    ds = _reader(name, data_dir, usage, shuffle, num_shards, shard_id, info, channels, image_size, center_crop,
                 num_parallel_workers)
    ds = ds.project(["image", "label"] if with_labels else ["image"])

    image_ops = []
    if native_size is not None and image_size != native_size:
        image_ops.append(vision.Resize((int(image_size), int(image_size)), interpolation=vision.Inter.BILINEAR))
    if native_size is None and not center_crop:
        image_ops.append(vision.RandomCrop(int(image_size)))
    if random_flip:
        image_ops.append(vision.RandomHorizontalFlip())
    image_ops.append(vision.ToTensor())
    image_ops.append(vision.Normalize(mean=[0.5] * channels, std=[0.5] * channels, is_hwc=False))
    ds = ds.map(operations=image_ops, input_columns="image", num_parallel_workers=num_parallel_workers)
    if with_labels:
        ds = ds.map(operations=transforms.TypeCast(ms.int32), input_columns="label",
                    num_parallel_workers=num_parallel_workers)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds
