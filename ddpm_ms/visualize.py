"""Pictures: image grids (PNG), denoising animations (GIF) and loss curves."""

import csv
import os

import numpy as np

from . import fileio


def to_uint8(images):
    """[N, C, H, W] floats in [-1, 1] -> [N, H, W, C] uint8."""
    images = np.asarray(images, dtype=np.float32)
    images = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return images.transpose(0, 2, 3, 1)


def make_grid(images, nrow=None, pad=2, pad_value=255):
    """Tile [N, C, H, W] images in [-1, 1] into one [rows*(H+pad)+pad, ...] uint8 array (H x W or H x W x 3)."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = imgs[i]
    return grid[..., 0] if c == 1 else grid


def _pil_image(array, scale):
    from PIL import Image

    img = Image.fromarray(array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def _image_format(path, default="PNG"):
    """PIL's format name for ``path``'s extension (PNG when it has none PIL knows)."""
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower(), default)


def save_grid(images, path, nrow=None, scale=2):
    """Write [N, C, H, W] images in [-1, 1] as one PNG grid (atomically: fileio)."""
    img = _pil_image(make_grid(images, nrow), scale)
    return fileio.write_bytes(path, fileio.encoded(lambda f: img.save(f, format=_image_format(path))), "image")


def save_gif(frames, path, nrow=None, duration=4.0, hold_last=1.0, scale=2):
    """Write a GIF from a list of [N, C, H, W] batches (one grid per frame).

    duration: seconds for the whole animation; the last frame is held for hold_last seconds.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    images = [_pil_image(make_grid(f, nrow), scale) for f in frames]
    per_frame = max(20, int(1000 * duration / len(images)))
    durations = [per_frame] * (len(images) - 1) + [max(per_frame, int(1000 * hold_last))]
    data = fileio.encoded(lambda f: images[0].save(f, format=_image_format(path, "GIF"), save_all=True,
                                                   append_images=images[1:], duration=durations, loop=0))
    return fileio.write_bytes(path, data, "animation")


def frame_indices(num_steps, num_frames):
    """Which of num_steps sampler steps to keep as GIF frames (always including the last)."""
    num_frames = max(1, min(num_frames, num_steps))
    return set(np.linspace(0, num_steps - 1, num_frames).round().astype(int).tolist())


def plot_loss(csv_path, png_path, smooth=50):
    """Loss per step (light) and its running mean (dark) from a training loss CSV."""
    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    fig = new_figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    if len(losses) >= 2:
        k = max(1, min(smooth, len(losses) // 5 or 1))
        running = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], running, color="tab:blue", lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fmt = os.path.splitext(png_path)[1][1:].lower() or "png"
    fileio.write_bytes(png_path, fileio.encoded(lambda f: fig.savefig(f, format=fmt)), "loss curve")
    return png_path


def new_figure(**kw):
    """A matplotlib Figure drawn with the Agg canvas, without touching pyplot's global backend
    (so inline plots in a notebook keep working after training)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig
