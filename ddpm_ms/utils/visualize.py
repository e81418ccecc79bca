"""Pictures: image grids (PNG), denoising animations (GIF) and loss curves."""

import csv
import os

import numpy as np

from ddpm_ms.utils import fileio


def to_uint8(images):
    """[N, C, H, W] floats in [-1, 1] -> [N, H, W, C] uint8."""
    images = np.asarray(images, dtype=np.float32)
    images = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return images.transpose(0, 2, 3, 1)


def to_display(image):
    """One [C, H, W] image in [-1, 1] -> what ``matplotlib``'s ``imshow`` shows with vmin=0, vmax=1:
    float [H, W] in [0, 1] for C = 1 (use a gray colormap), float [H, W, 3] in [0, 1] for C = 3."""
    image = np.clip((np.asarray(image, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


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


def save_image(pixels, path):
    """Write one uint8 [H, W, C] image (C = 1 or 3) at its own size, atomically."""
    array = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    img = _pil_image(np.ascontiguousarray(array), 1)
    return fileio.write_bytes(path, fileio.encoded(lambda f: img.save(f, format=_image_format(path))), "image")


PANEL_GAP = 4  # white columns between the panels of a two-panel frame (before scaling)


def frame_grid(frame, nrow=None):
    """One frame as a uint8 picture: a grid of [N, C, H, W] images in [-1, 1] (C = 1 or 3), or
    [P, N, C, H, W] -> P grids side by side (e.g. x_t | predicted x_0), PANEL_GAP white columns apart."""
    frame = np.asarray(frame)
    if frame.ndim == 4:
        return make_grid(frame, nrow)
    grids = [make_grid(panel, nrow) for panel in frame]
    gap = np.full((grids[0].shape[0], PANEL_GAP) + grids[0].shape[2:], 255, dtype=np.uint8)
    return np.concatenate([part for g in grids for part in (gap, g)][1:], axis=1)


LABEL_HEIGHT = 14  # pixels of the strip under a labelled frame (after scaling)


def label_image(img, text):
    """``img`` with a white strip below holding ``text`` (PIL's default font); the picture itself
    is pasted unchanged at (0, 0)."""
    from PIL import Image, ImageDraw, ImageFont

    out = Image.new(img.mode, (img.width, img.height + LABEL_HEIGHT), 255 if img.mode == "L" else (255,) * 3)
    out.paste(img, (0, 0))
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    ImageDraw.Draw(out).text((3, img.height + 1), text, fill=0 if img.mode == "L" else (0,) * 3, font=font)
    return out


GRAY_LEVELS = 255  # grayscale GIF frames: 255 of the 256 levels (error <= 1/255), index 255 stays free


def _gif_palette(grids):
    """One palette image for every frame of an animation (no per-frame palettes, no flicker) and
    with a free index, which PIL's optimize uses to make unchanged pixels transparent.

    Grayscale: GRAY_LEVELS evenly spaced grays. RGB: white, black and a median-cut palette of
    253 colours from up to 8 of the grids spread over the animation.
    """
    from PIL import Image

    pal = Image.new("P", (1, 1))
    if grids[0].mode == "L":
        n = GRAY_LEVELS - 1
        pal.putpalette([round(i * 255 / n) for i in range(GRAY_LEVELS) for _ in range(3)])
        return pal
    some = [grids[k] for k in sorted(set(np.linspace(0, len(grids) - 1, 8).round().astype(int)))]
    montage = Image.new("RGB", (some[0].width, some[0].height * len(some)))
    for k, im in enumerate(some):
        montage.paste(im, (0, k * im.height))
    colours = montage.quantize(colors=253, method=Image.Quantize.MEDIANCUT).getpalette()[:3 * 253]
    pal.putpalette([255, 255, 255, 0, 0, 0] + colours)
    return pal


def _to_palette(im, pal):
    """An L or RGB image as a P image on ``pal`` (grayscale: v -> round(v * 254 / 255), no dithering)."""
    from PIL import Image

    if im.mode == "RGB":
        return im.quantize(palette=pal, dither=Image.Dither.NONE)
    lut = np.round(np.arange(256) * (GRAY_LEVELS - 1) / 255).astype(np.uint8)
    q = Image.frombytes("P", im.size, lut[np.asarray(im)].tobytes())
    q.putpalette(pal.getpalette())
    return q


def save_gif(frames, path, nrow=None, duration=4.0, hold_last=1.0, scale=2, labels=None):
    """Write an animation from a list of frames (see :func:`frame_grid`: [N, C, H, W] or [P, N, C, H, W]).

    duration: seconds for the whole animation; the last frame is held for hold_last seconds
    before the loop restarts. labels: one text per frame, drawn in a strip below the grid
    (the grid's pixels are not touched). A path ending in .webp writes a lossless animated
    WebP, anything else a GIF with one shared palette and only the changed pixels of each frame.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"got {len(labels)} labels for {len(frames)} frames")
    grids = [_pil_image(frame_grid(f, nrow), scale) for f in frames]
    images = grids if labels is None else [label_image(im, text) for im, text in zip(grids, labels)]
    per_frame = max(20, int(1000 * duration / len(images)))
    durations = [per_frame] * (len(images) - 1) + [max(per_frame, int(1000 * hold_last))]
    if path.lower().endswith(".webp"):
        kw = {"lossless": True, "method": 4}
    else:
        pal = _gif_palette(grids)  # from the pictures alone: a label cannot change their colours
        images, kw = [_to_palette(im, pal) for im in images], {"optimize": True}
    data = fileio.encoded(lambda f: images[0].save(f, format=_image_format(path, "GIF"), save_all=True,
                                                   append_images=images[1:], duration=durations, loop=0, **kw))
    return fileio.write_bytes(path, data, "animation")


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
