"""Does a dataset's class have a left and a right? (Whether ``random_flip`` makes images the data never shows.)

    python scripts/orientation.py [--dataset fashion_mnist] [--data-dir DIR] [--usage train]

Per class: the share of images with more ink (grey level, summed) in the right half than in the
left, and the mirror asymmetry of the class's mean image, sum |m - mirror(m)| / (2 sum m): 0 for a
class that looks the same mirrored, 1 when the mean image and its mirror do not overlap at all.
Colour images are measured on their mean over the channels.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ddpm_ms import data  # noqa: E402


def orientation(images, labels, num_classes):
    """[(right-heavy share, mirror asymmetry of the mean image)] per class of images [N, C, H, W]."""
    x = images.astype(np.float64).mean(axis=1)  # [N, H, W]
    half = x.shape[2] // 2
    left = x[:, :, :half].sum(axis=(1, 2))
    right = x[:, :, x.shape[2] - half:].sum(axis=(1, 2))
    rows = []
    for c in range(num_classes):
        pick = labels == c
        mean = x[pick].mean(axis=0)
        asym = np.abs(mean - mean[:, ::-1]).sum() / (2.0 * mean.sum())
        rows.append((float(np.mean(right[pick] > left[pick])), float(asym)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "mnist", "cifar10"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--usage", default="train", choices=("train", "test"))
    args = ap.parse_args(argv)
    spec = data.dataset_spec(args.dataset)
    images, labels = data.load_split(args.dataset, data.locate(args.dataset, args.data_dir), args.usage)
    print(f"{spec.title} {args.usage}: {len(labels)} images")
    print(f"{'class':14s} {'right-heavy':>11s} {'mirror asymmetry':>16s}")
    for name, (share, asym) in zip(spec.class_names, orientation(images, labels, spec.num_classes)):
        print(f"{name:14s} {100 * share:10.1f}% {asym:16.3f}")


if __name__ == "__main__":
    main()
