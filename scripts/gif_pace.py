"""How evenly a denoising GIF shows the picture forming (the metric of issue 22).

    python scripts/gif_pace.py runs/quick/denoising.gif [more.gif ...] [--crop-bottom 14]

For each file: its size, the number of distinct frames (a frame equal to the one before it is
shown as one, as a GIF stores it), the mean absolute pixel distance of every frame to the
final frame (0..255 grey levels, as decoded), the share of frames still at least 90% as far
from the final frame as the first frame is, and the largest rise of the distance from one
frame to the next (0 for a monotone fall). --crop-bottom drops a label strip of that many
pixel rows before measuring (``ddpm-gif --label``: 14).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ddpm_ms.diffusion.frames import distance_to_final, still_noise_share  # noqa: E402


def gif_frames(path, crop_bottom=0):
    """All frames of an animation as [K, H, W, 3] uint8 (composited as a viewer shows them)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    frames = np.stack(frames)
    return frames[:, : frames.shape[1] - crop_bottom] if crop_bottom else frames


def distinct(frames):
    """The frames without those equal to the frame before (a GIF encoder merges them into one)."""
    keep = [0] + [k for k in range(1, len(frames)) if not np.array_equal(frames[k], frames[k - 1])]
    return frames[keep]


def pace(frames):
    """(distance of every distinct frame to the final one, share still >= 90% as far as the first, largest rise)."""
    d = distance_to_final(distinct(frames))
    still_noise = still_noise_share(d)
    rise = float(np.max(np.diff(d), initial=0.0))
    return d, still_noise, rise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--crop-bottom", type=int, default=0)
    args = parser.parse_args(argv)
    for path in args.paths:
        d, still_noise, rise = pace(gif_frames(path, args.crop_bottom))
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB, {len(d)} distinct frames, "
              f"{still_noise:.0%} still >= 90% as far as the first, largest rise {rise:.2f}")
        print("  distance to final: " + " ".join(f"{v:.1f}" for v in d))


if __name__ == "__main__":
    main()
