"""A folder of the user's own images: find, check and decode them, labels from class subfolders.

scan_folder(root)                 -> FolderIndex(files, labels, class_names, skipped)
load_image(path, channels, image_size, center_crop)
                                  -> uint8 [H, W, C]: decoded, converted, resized, (cropped)
FolderSource(index, ...)          random-access source for ``mindspore.dataset.GeneratorDataset``

Rules
-----
* Images are the files ending in .png, .jpg, .jpeg, .bmp or .webp (any case), found in
  ``root`` and all its subfolders (hidden files and folders are ignored).
* Classes: when ``root`` holds no images itself and two or more subfolders that hold images,
  each top-level subfolder is a class (its images may be nested further); class names are
  the sorted subfolder names, labels their indices. Otherwise the folder has no classes.
* Every candidate is decoded once when the folder is first scanned (in this process);
  files that cannot be decoded, and files that are not images by their extension, are
  skipped with ONE warning that counts and names them. Nothing usable -> ``UserError``.
* Decoding (PIL): palette and alpha images are composited over white; then converted to
  ``channels`` (1: ITU-R 601 luma, PIL's "L"; 3: RGB, gray replicated).
* Geometry: the shorter side is resized to ``image_size`` (PIL bilinear with antialiasing;
  the longer side to ``round(long * image_size / short)``), then a square ``image_size``
  crop: centred (top = (H - S) // 2, left = (W - S) // 2) here, or random in the pipeline.
"""

import os
import sys
from collections import namedtuple

import numpy as np

from ddpm_ms.utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_NAMED = 10  # skipped files named in the warning; the rest are counted

FolderIndex = namedtuple("FolderIndex", "root files labels class_names skipped")

_SCANS = {}  # (root, listing signature) -> FolderIndex: each folder is decoded once per process


def _is_hidden(name):
    return name.startswith(".")


def _walk(root):
    """Sorted relative paths of every non-hidden file under ``root``."""
    out = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        rel = os.path.relpath(directory, root)
        for name in sorted(files):
            if not _is_hidden(name):
                out.append(name if rel == "." else os.path.join(rel, name))
    return sorted(out)


def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_layout(images):
    """Class names (sorted top-level subfolders) if the images are laid out one folder per
    class, else None."""
    tops = {p.split(os.sep, 1)[0] for p in images}
    if any(os.sep not in p for p in images) or len(tops) < 2:
        return None
    return sorted(tops)


def _decodes(path):
    """None if PIL decodes the whole file, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # PIL raises many types for damaged files
        return " ".join(str(e).split()) or type(e).__name__
    return None


def _describe(skipped):
    names = [f"{p} ({why})" for p, why in skipped[:MAX_NAMED]]
    more = f" and {len(skipped) - MAX_NAMED} more" if len(skipped) > MAX_NAMED else ""
    return "; ".join(names) + more


def scan_folder(root, progress=True, log=None):
    """Index the images of ``root`` (see the module docstring) -> :class:`FolderIndex`.

    The result is remembered for this process (keyed by the folder's listing: names, sizes and
    modification times), so later pipelines over the same folder cost one directory walk.
    The warning goes to ``log`` (default ``sys.stderr``; ``False``: none).
    """
    log = sys.stderr if log is None else log
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist or is not a directory")
    listing = _walk(root)
    signature = []
    for rel in listing:
        try:
            st = os.stat(os.path.join(root, rel))
            signature.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append((rel, -1, -1))
    key = (root, tuple(signature))
    if key in _SCANS:
        return _SCANS[key]
    if not listing:
        raise UserError(f"image folder {root} is empty: put PNG, JPEG, BMP or WebP images in it (or in "
                        "one subfolder per class)")
    candidates = [p for p in listing if _is_image_name(p)]
    skipped = [(p, "not an image file by its extension") for p in listing if not _is_image_name(p)]
    good = []
    from tqdm import tqdm

    for rel in tqdm(candidates, desc=f"checking images in {os.path.basename(root)}", file=sys.stderr,
                    disable=not progress or len(candidates) < 1000, dynamic_ncols=True):
        why = _decodes(os.path.join(root, rel))
        if why is None:
            good.append(rel)
        else:
            skipped.append((rel, f"cannot decode: {why}"))
    skipped.sort()
    if not good:
        raise UserError(f"image folder {root} holds no usable images ({len(listing)} files, none a readable PNG, "
                        f"JPEG, BMP or WebP image: {_describe(skipped)})")
    if skipped and log:
        print(f"WARNING: image folder {root}: skipped {len(skipped)} of {len(listing)} files: {_describe(skipped)}",
              file=log, flush=True)
    class_names = _class_layout(good)
    if class_names:
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[p.split(os.sep, 1)[0]] for p in good], np.int32)
    else:
        labels = np.zeros(len(good), np.int32)
    result = FolderIndex(root, tuple(os.path.join(root, p) for p in good), labels,
                         tuple(class_names) if class_names else None, tuple(skipped))
    _SCANS[key] = result
    return result


def _to_mode(img, channels):
    """PIL image -> mode "L" (channels 1) or "RGB" (channels 3); transparency over white."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def resized_size(width, height, image_size):
    """(width, height) with the shorter side ``image_size`` and the aspect ratio kept."""
    short = min(width, height)
    if width <= height:
        return image_size, max(image_size, round(height * image_size / short))
    return max(image_size, round(width * image_size / short)), image_size


def center_crop(array, size):
    """The centred ``size`` x ``size`` window of an [H, W, ...] array (top = (H - size) // 2)."""
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top:top + size, left:left + size]


def load_image(path, channels, image_size, crop=True):
    """Decode ``path`` -> uint8 [H, W, channels]: converted, shorter side resized to
    ``image_size``, and centre-cropped to ``image_size`` square if ``crop``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = _to_mode(img, channels)
    except Exception as e:  # damaged since the scan
        raise UserError(f"{path}: cannot decode the image ({' '.join(str(e).split())})") from None
    size = resized_size(img.width, img.height, image_size)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(center_crop(array, image_size) if crop else array)


class FolderSource:
    """Random-access source of (image uint8 [H, W, C], label int32) for GeneratorDataset."""

    def __init__(self, index, channels, image_size, crop=True):
        self.files, self.labels = index.files, index.labels
        self.channels, self.image_size, self.crop = int(channels), int(image_size), bool(crop)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = load_image(self.files[i], self.channels, self.image_size, self.crop)
        return image, np.array(self.labels[i], dtype=np.int32)
