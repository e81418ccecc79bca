"""Frames of a denoising animation: record every state of a sampling chain, keep the ones
at which the picture has changed by even amounts.

With a linear schedule most sampler steps change nothing visible: x_t stays (clipped)
noise for about the first half of the chain and the images form in the last few steps.
Frames spaced evenly in steps therefore show static noise for most of the animation.
Here the frame times are chosen after sampling, from the chain itself (so they suit every
sampler and step count):

    d_k = mean |frame_k - frame_final|   (displayed uint8 pixels; the issue's metric)
    p_k = 1 - d_k / d_0                  (progress: 0 at the start noise, 1 at the sample)

and the frames are the states whose progress is closest to 0, 1/(F-1), 2/(F-1), ..., 1
(see :func:`even_pace_indices`). The first frame is the starting noise x_T (for ``x`` and
``both``), the last one the returned sample.
"""

import numpy as np

SOURCES = ("x", "x0", "both")
STEP_WEIGHT = 0.0  # share of the pace measured in sampler steps instead (> 0: strictly increasing progress)


def quantize(images):
    """[N, C, H, W] floats in [-1, 1] -> uint8, as the GIF shows them (ddpm_ms.utils.visualize.to_uint8)."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def dequantize(pixels):
    """uint8 -> float32 in [-1, 1]; quantize(dequantize(u)) == u."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def distance_to_final(states):
    """Mean absolute pixel distance of every state [K, ...] (uint8) to the last one -> [K] float64."""
    final = states[-1].astype(np.int16)
    return np.array([np.abs(s.astype(np.int16) - final).mean() for s in states], dtype=np.float64)


def progress_curve(distance, step_weight=STEP_WEIGHT):
    """Non-decreasing progress in [0, 1] from distances to the final frame (distance[-1] == 0).

    p_k = 1 - d_k / d_0, clipped to [0, 1] and made monotone (running maximum, so sampling
    noise cannot move a frame backwards), then mixed with the step fraction k / (K-1) by
    ``step_weight`` (strictly increasing if step_weight > 0).
    """
    d = np.asarray(distance, dtype=np.float64)
    k = len(d)
    steps = np.linspace(0.0, 1.0, k) if k > 1 else np.ones(1)
    if d[0] > 0:
        p = np.maximum.accumulate(np.clip(1.0 - d / d[0], 0.0, 1.0))
        p[-1] = 1.0
    else:  # the chain never moved (or a single state): even in steps
        p = steps
    return (1.0 - step_weight) * p + step_weight * steps


def even_pace_indices(distance, num_frames, step_weight=STEP_WEIGHT):
    """Strictly increasing state indices, min(num_frames, K) of them, first 0 and last K-1,
    whose progress (:func:`progress_curve`) is as close as possible to j / (F-1), j = 0..F-1."""
    k = len(distance)
    f = max(1, min(int(num_frames), k))
    if f == 1:
        return np.array([k - 1])
    p = progress_curve(distance, step_weight)
    idx = [0]
    for j in range(1, f - 1):
        target = j / (f - 1)
        c = int(np.searchsorted(p, target))  # first state with p >= target
        if c > 0 and target - p[c - 1] < p[min(c, k - 1)] - target:
            c -= 1
        idx.append(min(max(c, idx[-1] + 1), k - 1 - (f - 1 - j)))  # room for the frames still to come
    idx.append(k - 1)
    return np.array(idx)


def noise_level(sched, t):
    """sqrt(1 - alpha_bar_t): the share of noise in x_t (0 at t = -1, the sample)."""
    return 0.0 if t < 0 else float(np.sqrt(1.0 - sched.alphas_cumprod[t]))


class DenoisingFrames(list):
    """The chosen frames: a list of float32 arrays in [-1, 1], [N, C, H, W] (``x``, ``x0``) or
    [2, N, C, H, W] (``both``: x_t and the predicted x_0, shown side by side).

    ``timesteps[k]`` is the 0-based index of the x_t that frame k shows or predicts from
    (-1: the sample), ``noise[k]`` its noise level, ``labels[k]`` a short text for the frame.
    """

    def __init__(self, frames, timesteps, noise, source):
        super().__init__(frames)
        self.timesteps, self.noise, self.source = list(timesteps), list(noise), source
        names = {"x": "x_t", "x0": "predicted x_0", "both": "x_t | predicted x_0"}[source]
        self.labels = [f"t={t + 1}   noise {s:.2f}   {names}" for t, s in zip(self.timesteps, self.noise)]


class FrameRecorder:
    """A sampler callback that keeps every state of the chain (as uint8) and, after sampling,
    picks ``num_frames`` of them at an even pace (:func:`even_pace_indices`).

    Memory: one uint8 copy of the batch per sampler step (per stream: ``both`` keeps two),
    e.g. 50 kB per step for 64 Fashion-MNIST images, 50 MB for a 1000-step DDPM chain.
    """

    def __init__(self, x_T, num_frames, source="x"):
        if source not in SOURCES:
            raise ValueError(f"unknown GIF source {source!r}; choose one of {', '.join(SOURCES)}")
        self.num_frames, self.source = int(num_frames), source
        self.x = [quantize(x_T)] if source != "x0" else []
        self.x0, self.t = [], []

    def __call__(self, i, t, x, x0):
        if self.source != "x0":
            self.x.append(quantize(x.asnumpy()))
        if self.source != "x":
            self.x0.append(quantize(x0.asnumpy()))
        self.t.append(int(t))

    def states(self, final):
        """[K, (2,) N, C, H, W] uint8 states ending with ``final`` (the returned sample)."""
        last = quantize(final)
        if self.source == "x":
            return np.stack(self.x[:-1] + [last])
        if self.source == "x0":  # the last prediction is the sample (every sampler's final step)
            return np.stack(self.x0[:-1] + [last])
        return np.stack([np.stack(p) for p in zip(self.x[:-1] + [last], self.x0 + [last])])

    def frames(self, final, sched, num_frames=None):
        """The chosen frames (a :class:`DenoisingFrames`) for the returned sample ``final``."""
        states = self.states(final)
        keep = even_pace_indices(distance_to_final(states), num_frames or self.num_frames)
        ts = self.t[:-1] + [-1] if self.source == "x0" else self.t + [-1]  # state k shows x_t at ts[k]
        chosen_t = [ts[k] for k in keep]
        return DenoisingFrames([dequantize(states[k]) for k in keep], chosen_t,
                               [noise_level(sched, t) for t in chosen_t], self.source)
