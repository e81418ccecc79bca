"""The user's own images and masks, for editing them (ddpm-inpaint, ddpm-img2img).

read_images(source, channels, image_size) -> (uint8 [N, C, S, S], names)
    source: a folder (its image files and those of its subfolders, sorted by path), one image file,
    or an ``.npy`` array ([N, C, S, S], [N, S, S, C] or gray [N, S, S]; uint8, or floats in [-1, 1]
    as ddpm-sample writes). Image files are decoded as a training folder is (``data.folder``):
    converted to the model's channels (gray: ITU-R 601 luma; RGB: gray replicated), the shorter side
    resized to ``image_size`` (PIL bilinear, antialiased), then the centred square crop. An array
    must already have the model's size and channel count: it is checked, never converted.
read_mask(spec, count, image_size, seed) -> bool [count or 1, 1, S, S], True = a pixel to fill
    spec: a mask image (white pixels, >= 128 in gray, are filled; black ones kept; its size must be
    S x S: a mask is not resized), or a named mask: ``half-left``, ``half-right``, ``half-top``,
    ``half-bottom``, ``center`` (the central square of half the side), ``box:x0,y0,x1,y1``
    (columns x0..x1-1, rows y0..y1-1), ``random:p`` (each pixel filled with probability p, a new
    mask per image from ``seed``).
"""

import os

import numpy as np

from ddpm_ms.data.folder import IMAGE_EXTENSIONS, load_image, scan_folder
from ddpm_ms.utils.errors import UserError

NAMED_MASKS = ("half-left", "half-right", "half-top", "half-bottom", "center", "box:x0,y0,x1,y1", "random:p")


def _array_images(path, channels, image_size):
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
    side = image_size
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[2:] != (side, side):
        raise UserError(f"{path}: expected images of {side}x{side} ([N, {channels}, {side}, {side}] or "
                        f"[N, {side}, {side}, {channels}]), got an array of shape {list(images.shape)}")
    if images.shape[1] != channels:
        raise UserError(f"{path}: images have {images.shape[1]} channel(s), the model takes {channels}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
        raise UserError(f"{path}: images must be uint8, or finite floats in [-1, 1]; got dtype {images.dtype}")
    if images.min() < -1.0 or images.max() > 1.0:
        raise UserError(f"{path}: float images must be in [-1, 1], got values in [{images.min():.3g}, "
                        f"{images.max():.3g}] (save 0..255 images as uint8)")
    return np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def read_images(source, channels, image_size):
    """(uint8 [N, C, S, S], names): see the module docstring."""
    if os.path.isdir(source):
        files = scan_folder(source, progress=False).files
        names = [os.path.relpath(f, source) for f in files]
    elif not os.path.exists(source):
        raise UserError(f"--images {source} does not exist")
    elif source.lower().endswith(".npy"):
        images = _array_images(source, channels, image_size)
        return images, [f"{os.path.basename(source)}[{i}]" for i in range(len(images))]
    elif source.lower().endswith(IMAGE_EXTENSIONS):
        files, names = [source], [os.path.basename(source)]
    else:
        raise UserError(f"--images {source}: expected a folder, an image file ({', '.join(IMAGE_EXTENSIONS)}) "
                        "or an .npy array")
    images = [load_image(f, channels, image_size, crop=True).transpose(2, 0, 1) for f in files]
    return np.stack(images), names


def _named_mask(spec, side):
    mask = np.zeros((side, side), bool)
    half = side // 2
    if spec == "half-left":
        mask[:, :half] = True
    elif spec == "half-right":
        mask[:, half:] = True
    elif spec == "half-top":
        mask[:half] = True
    elif spec == "half-bottom":
        mask[half:] = True
    elif spec == "center":
        lo = (side - half) // 2
        mask[lo:lo + half, lo:lo + half] = True
    elif spec.startswith("box:"):
        try:
            x0, y0, x1, y1 = (int(v) for v in spec[4:].split(","))
        except ValueError:
            raise UserError(f"--mask {spec}: expected box:x0,y0,x1,y1 with four integers") from None
        if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
            raise UserError(f"--mask {spec}: the box must satisfy 0 <= x0 < x1 <= {side} and 0 <= y0 < y1 <= {side} "
                            f"(the images are {side}x{side})")
        mask[y0:y1, x0:x1] = True
    else:
        return None
    return mask


def read_mask(spec, count, image_size, seed=0):
    """bool [count or 1, 1, S, S], True = fill: see the module docstring."""
    side = image_size
    if spec.startswith("random:"):
        try:
            p = float(spec[7:])
        except ValueError:
            p = -1.0
        if not 0.0 < p < 1.0:
            raise UserError(f"--mask {spec}: expected random:p with 0 < p < 1 (the share of pixels to fill)")
        return np.random.default_rng(seed).random((count, 1, side, side)) < p
    named = _named_mask(spec, side)
    if named is not None:
        return named[None, None]
    if not os.path.isfile(spec):
        raise UserError(f"--mask {spec}: not a file, nor one of {', '.join(NAMED_MASKS)}")
    from PIL import Image

    try:
        with Image.open(spec) as img:
            gray = np.asarray(img.convert("L"))
    except Exception as e:
        raise UserError(f"--mask {spec}: cannot decode the image ({' '.join(str(e).split())})") from None
    if gray.shape != (side, side):
        raise UserError(f"--mask {spec} is {gray.shape[1]}x{gray.shape[0]}; the images are {side}x{side} "
                        "(a mask is not resized: draw it at the model's size)")
    return (gray >= 128)[None, None]
