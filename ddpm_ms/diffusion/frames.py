"""Frames of a denoising animation: record every state of a sampling chain, keep the ones
at which the picture has changed by even amounts.

With a linear schedule most sampler steps change nothing visible: x_t stays (clipped)
noise for about the first half of the chain and the images form in the last few steps.
Frames spaced evenly in steps therefore show static noise for most of the animation.
Here the frame times are chosen after sampling, from the chain itself (so they suit every
sampler and step count):

    d_k = mean |frame_k - frame_final|   (displayed uint8 pixels; the issue's metric)
    p_k = 1 - d_k / d_0                  (progress: 0 at the start noise, 1 at the sample)

and the frames are the states whose progress moves in even steps from 0 to 1
(see :func:`even_pace_indices`). The first frame is the starting noise x_T, the last one the
returned sample.

What a frame shows (``source``):

- ``x``: the chain's states x_t (the classic animation);
- ``x0``: x_T, then the model's prediction of x_0 made at each step (the last prediction is
  the sample): noise -> the model's blurry first guess -> the sample;
- ``both``: x_t and the prediction of x_0 from it, side by side;
- ``auto`` (the default of the run's GIF and of ``generate``): ``x`` when the chain has at
  least :data:`AUTO_STATES_PER_FRAME` (3) states per frame, else ``x0``.

Why ``auto``: an even pace needs states to choose from. A chain with few states per frame
(``quick.yaml``: 20 DPM-Solver++ steps, 21 states for 21 frames) has to show nearly every
state, and its x_t is noise for about half of them: 48% of the quick run's frames were still
>= 90% as far from the final frame as the first. The predictions of x_0 are not: the first
one (from pure noise) is already a grainy, blurry average picture, 60-80% as far from the
sample as x_T, and later ones sharpen steadily, so only x_T itself counts as noise (1 of 21
frames, 5%, for the quick run and a 20-minute run).

The threshold, measured on the quick run's checkpoint (16 images, seed 0; share of x_t frames,
at an even pace, still >= 90% as far as the first): 21 frames from 21 / 31 / 41 / 51 / 61 / 101
/ 1001 states (DPM-Solver++ 20 steps, DDIM 30 / 40 / 50 / 60 / 100, DDPM 1000): 48 / 19 / 10 /
14 / 10 / 10 / 10%; 40 frames from 31 / 41 / 51 / 61 / 81 / 101 / 1001 states (DDIM 30 / 40 /
50 / 60 / 80 / 100, DDPM 1000): 45 / 42 / 30 / 15 / 10 / 10 / 10%. The predicted x_0 frames
were at 5% (21 frames) and 2-3% (40) in every one of these chains. x_t frames meet 15% from
about 2 states per frame; 3 leaves a margin (another model or seed) and keeps the classic x_t
animation of the 1000-step DDPM default and of 100-step chains with up to 33 frames. The rule
depends only on the number of states, so it holds for every sampler; it is cheap (no extra
network call: every step's prediction is already passed to the callback), and once the chain
is long enough for ``x`` the recorder drops the predictions. Why not ``x0`` always: x_t is the
diffusion process itself, the familiar animation, and with enough states it meets the pace too.
"""

import numpy as np

SOURCES = ("auto", "x", "x0", "both")
AUTO_STATES_PER_FRAME = 3  # auto: x_t frames from at least this many chain states per frame, else predicted x_0
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


def still_noise_share(distance):
    """The issue's metric: the share of frames at least 90% as far from the final frame as the first."""
    d = np.asarray(distance, dtype=np.float64)
    return float(np.mean(d >= 0.9 * d[0])) if len(d) and d[0] > 0 else 0.0


def auto_source(num_states, num_frames, states_per_frame=AUTO_STATES_PER_FRAME):
    """What ``auto`` shows for a chain of ``num_states`` states (x_T and one per step): "x" when
    there are at least ``states_per_frame`` states per frame, else "x0" (module docstring)."""
    return "x" if num_states >= states_per_frame * max(1, int(num_frames)) else "x0"


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
    whose progress (:func:`progress_curve`) is as close as possible to F evenly spaced levels.

    The levels are j / (F-1), j = 0..F-1, until a frame lands more than half a level's spacing
    beyond its own level (a jump in progress: in the predicted x_0 stream, from the noise x_T
    straight to the model's first guess, a quarter of the way): from there the remaining
    frames get evenly spaced levels over the rest of the way, instead of piling up on the
    states just after the jump.
    """
    k = len(distance)
    f = max(1, min(int(num_frames), k))
    if f == 1:
        return np.array([k - 1])
    p = progress_curve(distance, step_weight)
    idx, base_j, base_p = [0], 0, 0.0  # levels: base_p + (1 - base_p) (j - base_j) / (F-1 - base_j)
    for j in range(1, f - 1):
        spacing = (1.0 - base_p) / (f - 1 - base_j)
        target = base_p + (j - base_j) * spacing
        c = min(int(np.searchsorted(p, target)), k - 1)  # first state with p >= target
        if c > 0 and target - p[c - 1] < p[c] - target:
            c -= 1
        c = min(max(c, idx[-1] + 1), k - 1 - (f - 1 - j))  # room for the frames still to come
        idx.append(c)
        if p[c] > target + 0.5 * spacing:  # past a jump: spread the remaining frames over what remains
            base_j, base_p = j, p[c]
    idx.append(k - 1)
    return np.array(idx)


def noise_level(sched, t):
    """sqrt(1 - alpha_bar_t): the share of noise in x_t (0 at t = -1, the sample)."""
    return 0.0 if t < 0 else float(np.sqrt(1.0 - sched.alphas_cumprod[t]))


SHOWS = {"x_T": "x_T (start noise)", "x_t": "x_t", "x0": "predicted x_0", "both": "x_t | predicted x_0",
         "sample": "sample"}


def frame_label(t, noise, shows):
    """The text under a frame: t (1-based), the noise level of the x_t it shows or predicts from, what it shows."""
    return f"t={t + 1}   noise {noise:.2f}   {SHOWS[shows]}"


class DenoisingFrames(list):
    """The chosen frames: a list of float32 arrays in [-1, 1], [N, C, H, W] (``x``, ``x0``) or
    [2, N, C, H, W] (``both``: x_t and the predicted x_0, shown side by side).

    ``source`` is what the frames show ("x", "x0" or "both"; ``auto`` resolved), ``requested``
    the source asked for. ``timesteps[k]`` is the 0-based index of the x_t that frame k shows or
    predicts from (-1: the sample; non-increasing, strictly decreasing for ``x`` and ``both``),
    ``noise[k]`` its noise level, ``shows[k]`` what the frame shows ("x_T", "x_t", "x0", "both",
    "sample"), ``labels[k]`` a short text saying so.
    """

    def __init__(self, frames, timesteps, noise, source, shows=None, requested=None):
        super().__init__(frames)
        self.timesteps, self.noise, self.source = list(timesteps), list(noise), source
        self.requested = requested or source
        default = {"x": "x_t", "x0": "x0", "both": "both"}[source]
        self.shows = list(shows) if shows is not None else [default] * len(self.timesteps)
        self.labels = [frame_label(t, s, w) for t, s, w in zip(self.timesteps, self.noise, self.shows)]


class FrameRecorder:
    """A sampler callback that keeps every state of the chain (as uint8) and, after sampling,
    picks ``num_frames`` of them at an even pace (:func:`even_pace_indices`).

    ``source`` "auto" records both streams until the chain has reached
    ``states_per_frame * num_frames`` states (then ``x`` is certain and the predictions are
    dropped), and picks with :func:`auto_source`.

    Memory: one uint8 copy of the batch per sampler step and stream, e.g. 50 kB per step for 64
    Fashion-MNIST images, 50 MB for a 1000-step DDPM chain (``both`` keeps two streams, ``auto``
    a second one for at most ``states_per_frame * num_frames`` steps).
    """

    def __init__(self, x_T, num_frames, source="auto", states_per_frame=AUTO_STATES_PER_FRAME):
        if source not in SOURCES:
            raise ValueError(f"unknown GIF source {source!r}; choose one of {', '.join(SOURCES)}")
        self.num_frames, self.source, self.states_per_frame = int(num_frames), source, states_per_frame
        self.x_T = quantize(x_T)
        self.x = [] if source != "x0" else None  # x after each step
        self.x0 = [] if source != "x" else None  # the prediction of x_0 made at each step
        self.t = []  # the timestep each step started from

    def __call__(self, i, t, x, x0):
        if self.x is not None:
            self.x.append(quantize(x.asnumpy()))
        if self.x0 is not None:
            self.x0.append(quantize(x0.asnumpy()))
        self.t.append(int(t))
        if self.source == "auto" and self.x0 is not None and \
                auto_source(len(self.t) + 1, self.num_frames, self.states_per_frame) == "x":
            self.x0 = None  # long enough for x_t frames: no need for the predictions

    def resolved_source(self, num_frames=None):
        """What the frames show: the source, or for ``auto`` :func:`auto_source` of this chain
        (``x`` also when the predictions were dropped, i.e. when ``num_frames`` exceeds the
        recorder's own and the chain was long enough for that)."""
        if self.source != "auto":
            return self.source
        if self.x0 is None:
            return "x"
        return auto_source(len(self.t) + 1, num_frames or self.num_frames, self.states_per_frame)

    def chain(self, final, source=None):
        """(states [K, (2,) N, C, H, W] uint8, timesteps [K], shows [K]) from x_T to ``final``
        (the returned sample), K = steps + 1, for ``source`` (default: :meth:`resolved_source`)."""
        source = source or self.resolved_source()
        last, n = quantize(final), len(self.t)
        shows = ["x_T"] + [{"x": "x_t", "x0": "x0", "both": "both"}[source]] * (n - 1) + ["sample"]
        if source == "x0":  # x_T, the prediction of every step but the last, the sample (= the last prediction)
            return np.stack([self.x_T] + self.x0[:-1] + [last]), self.t[:1] + self.t[:-1] + [-1], shows
        xs = [self.x_T] + self.x[:-1] + [last]  # x_T, the state after every step but the last, the sample
        if source == "x":
            return np.stack(xs), self.t + [-1], shows
        shows[0] = "both"
        return np.stack([np.stack(p) for p in zip(xs, self.x0 + [last])]), self.t + [-1], shows

    def states(self, final):
        """[K, (2,) N, C, H, W] uint8 states ending with ``final`` (the returned sample)."""
        return self.chain(final)[0]

    def frames(self, final, sched, num_frames=None):
        """The chosen frames (a :class:`DenoisingFrames`) for the returned sample ``final``."""
        num_frames = num_frames or self.num_frames
        source = self.resolved_source(num_frames)
        states, ts, shows = self.chain(final, source)
        keep = even_pace_indices(distance_to_final(states), num_frames)
        chosen_t = [ts[k] for k in keep]
        return DenoisingFrames([dequantize(states[k]) for k in keep], chosen_t,
                               [noise_level(sched, t) for t in chosen_t], source,
                               [shows[k] for k in keep], self.source)
