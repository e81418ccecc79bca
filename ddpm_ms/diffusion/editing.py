"""Editing an image with a trained denoiser: inpainting (RePaint) and image-to-image (SDEdit).

Both run the samplers of :mod:`ddpm_ms.diffusion.samplers` unchanged, in the same loop; they change
where the chain starts and what happens between its steps. ``x_in`` is the input image(s),
float32 [N, C, H, W] in [-1, 1]; q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) is the forward
process (Ho et al. 2020, Eq. 4).

Inpainting (Lugmayr et al. 2022, "RePaint", Algorithm 1), ``known`` = the pixels to keep:

* start: x_T with its known pixels drawn from q(x_T | x_in) and the others N(0, I) (one draw, the
  sampler's :func:`initial_noise`; with abar_T ~ 0 this is RePaint's x_T ~ N(0, I));
* after every step t -> t' of the sampler (any of them), the known pixels are replaced by a fresh
  draw of q(x_t' | x_in) (Algorithm 1, lines 4-7), and after the last step (t' = -1, abar = 1) by
  x_in itself: the known pixels come back bit for bit. ``keep_known=False`` skips that last
  replacement: every pixel is then the model's final x_0, a blend that smooths the seam but moves
  the known pixels a little;
* resampling (RePaint Sec. 4.2, :func:`repaint_moves`): after each block of ``jump_length`` steps
  of the sampler's sequence the chain goes back up the block, x_t ~ q(x_t | x_t') =
  N(sqrt(abar_t / abar_t') x_t', (1 - abar_t / abar_t') I) (the forward steps composed: one draw),
  and denoises it again, so that every block is denoised ``jump_n_sample`` times and the unknown
  pixels can adjust to the known ones. DDPM only (the paper's sampler: the jump needs a
  stochastic reverse step to forget what it undid; DPM-Solver++ also keeps state across steps).

Image-to-image (Meng et al. 2022, "SDEdit", Sec. 3): strength s in (0, 1] keeps the part of the
sampler's own timestep sequence at or below s T (indices t with t + 1 <= s T: for the full chain
t_0 = sT - 1, for a respaced one the matching step), draws x_t0 ~ q(x_t0 | x_in) and runs the
sampler from there. s = 1 is plain sampling (exactly, on a zero-terminal-SNR schedule); for s small
enough that no step is left the input is returned.

The heun sampler (Karras et al. 2022) works in both; its churn (EDM Algorithm 2) is a move up
before a step, forward noise like RePaint's jump (:func:`ddpm_ms.diffusion.samplers.forward_jump`,
the one home of q(x_t' | x_t), with EDM's S_noise), and for img2img its gamma = S_churn / N counts
the N steps of the sampler's whole sequence, so a churned step is the same as in plain sampling.

Randomness comes only from the one NumPy Generator, in the order: the start noise, then per step
the sampler's noise (DDPM, DDIM with eta > 0) before the replacement noise; a jump (RePaint's, or
heun's churn before its step) draws its own.
"""

import numpy as np
from mindspore import Tensor, ops

from ddpm_ms.diffusion.gaussian import alpha_bar
from ddpm_ms.diffusion.samplers import (
    NO_CHURN,
    _CheckedEps,
    _run,
    check_options,
    check_start,
    churn_moves,
    forward_jump,
    initial_noise,
    predictor,
    sampler_moves,
    sampler_step,
    sampler_timesteps,
)

__all__ = ["check_arguments", "repaint_moves", "model_calls", "forward_jump", "strength_timesteps", "inpaint",
           "img2img"]


def repaint_moves(ts, jump_length=10, jump_n_sample=1):
    """The walk of RePaint's resampling over a descending sequence ``ts``, as moves (t, t_next).

    Positions 0..S index ts, and S is t = -1 (the sample). Every move down is one sampler step
    (ts[p] -> ts[p+1]); after arriving at a position e that is a multiple of ``jump_length`` and
    still noisy (0 < e < S), the walk jumps back up to e - jump_length (one move up) and steps down
    to e again, ``jump_n_sample - 1`` times. With jump_n_sample = 1 it is the plain sequence.
    """
    if int(jump_length) != jump_length or jump_length < 1:
        raise ValueError(f"jump_length must be an integer >= 1, got {jump_length!r}")
    if int(jump_n_sample) != jump_n_sample or jump_n_sample < 1:
        raise ValueError(f"jump_n_sample must be an integer >= 1, got {jump_n_sample!r}")
    seq = [int(t) for t in ts] + [-1]
    count = len(seq) - 1
    moves = []
    for p in range(count):
        moves.append((seq[p], seq[p + 1]))
        e = p + 1
        if jump_n_sample > 1 and e % jump_length == 0 and e < count:
            for _ in range(int(jump_n_sample) - 1):
                moves.append((seq[e], seq[e - jump_length]))
                moves += [(seq[q], seq[q + 1]) for q in range(e - jump_length, e)]
    return moves


def check_arguments(num_timesteps, sampler="ddpm", steps=None, eta=0.0, variance="posterior", prediction_type="eps",
                    jump_length=10, jump_n_sample=1, strength=None, churn=NO_CHURN):
    """ValueError naming the first bad option of :func:`inpaint` / :func:`img2img` (strength: img2img's)."""
    check_options(sampler, eta, variance, prediction_type, churn)
    sampler_timesteps(num_timesteps, steps, sampler)  # steps in 1..T
    repaint_moves([0], jump_length, jump_n_sample)  # integers >= 1
    if jump_n_sample != 1 and sampler != "ddpm":
        raise ValueError(f"resampling (jump_n_sample > 1) is RePaint's, for the ddpm sampler; got {sampler!r}")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1] (1: plain sampling, near 0: the input back), got {strength}")


def model_calls(moves):
    """Network evaluations of a walk: its moves down (for the heun sampler, plus one correction per move
    down that does not end at t = -1 or start at alpha_bar = 0)."""
    return sum(1 for t, t_next in moves if t_next < t)


def _noised(sched, x_in, t, noise):
    """q(x_t | x_in) for the given standard-normal draw, as float32 NumPy; x_in itself at t = -1."""
    a = alpha_bar(sched, t)
    return (np.sqrt(a) * x_in + np.sqrt(1.0 - a) * noise).astype(np.float32)


def _as_images(x_in):
    x_in = np.asarray(x_in, np.float32)
    if x_in.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(x_in.shape)}")
    return x_in


def inpaint(eps_fn, sched, x_in, known, sampler="ddpm", steps=None, eta=0.0, seed=0, rng=None, clip_denoised=True,
            variance="posterior", spacing="uniform", prediction_type="eps", jump_length=10, jump_n_sample=1,
            keep_known=True, callback=None, progress=True, churn=NO_CHURN):
    """Fill the pixels of ``x_in`` where ``known`` is False (module docstring) -> float32 Tensor [N, C, H, W].

    known: bool, broadcastable to x_in's shape (e.g. [N, 1, H, W]); eps_fn and the sampler options as
    in :func:`ddpm_ms.diffusion.samplers.sample`. jump_length / jump_n_sample: RePaint's resampling
    (DDPM only; jump_n_sample = 1: none). Network evaluations: ``model_calls(repaint_moves(...))``.
    """
    check_arguments(sched.num_timesteps, sampler, steps, eta, variance, prediction_type, jump_length, jump_n_sample,
                    churn=churn)
    x_in = _as_images(x_in)
    known = np.broadcast_to(np.asarray(known, dtype=bool), x_in.shape)
    ts = sampler_timesteps(sched.num_timesteps, steps, sampler, spacing)
    check_start(sched, ts, prediction_type)
    if sampler == "heun":  # its churn (no resampling: jump_n_sample = 1 is checked)
        moves, jump_noise = churn_moves(sched, ts, churn), churn[3]
    else:
        moves, jump_noise = repaint_moves(ts, jump_length, jump_n_sample), 1.0
    rng = np.random.default_rng(seed) if rng is None else rng

    noise = initial_noise(x_in.shape, rng)
    x = Tensor(np.where(known, _noised(sched, x_in, int(ts[0]), noise), noise))
    keep, target = Tensor(known), Tensor(x_in)

    def replace(x, t):  # RePaint Algorithm 1, lines 4-7: the known pixels at the level of t
        if t < 0:
            return ops.select(keep, target, x) if keep_known else x
        return ops.select(keep, Tensor(_noised(sched, x_in, t, initial_noise(x_in.shape, rng))), x)

    eps_fn = _CheckedEps(eps_fn, sampler)
    predict = predictor(eps_fn, sched, prediction_type, clip_denoised)
    name, step = sampler_step(sampler, sched, rng, eta, variance, predict, churn)
    x = _run(f"{name} inpainting", predict, x, moves, step, callback, progress, after_step=replace,
             jump=lambda x, t, t_up: forward_jump(sched, x, t, t_up, rng, jump_noise))
    eps_fn.check()
    return x


def strength_timesteps(ts, strength, num_timesteps):
    """The part of a sampler's sequence ``ts`` that SDEdit at ``strength`` runs: indices t with t + 1 <= s T."""
    check_arguments(num_timesteps, strength=strength)
    ts = np.asarray(ts, np.int64)
    return ts[ts + 1 <= strength * num_timesteps * (1 + 1e-12)]


def img2img(eps_fn, sched, x_in, strength, sampler="ddpm", steps=None, eta=0.0, seed=0, rng=None,
            clip_denoised=True, variance="posterior", spacing="uniform", prediction_type="eps", callback=None,
            progress=True, churn=NO_CHURN):
    """SDEdit (module docstring): noise ``x_in`` to the strength's timestep, then denoise -> float32 Tensor.

    ``steps`` is the sampler's full sequence, of which about strength * steps are run
    (:func:`strength_timesteps`); the other options as in :func:`ddpm_ms.diffusion.samplers.sample`.
    """
    check_arguments(sched.num_timesteps, sampler, steps, eta, variance, prediction_type, strength=strength, churn=churn)
    x_in = _as_images(x_in)
    full = sampler_timesteps(sched.num_timesteps, steps, sampler, spacing)
    ts = strength_timesteps(full, strength, sched.num_timesteps)
    rng = np.random.default_rng(seed) if rng is None else rng
    noise = initial_noise(x_in.shape, rng)
    if len(ts) == 0:  # the strength lies below the sampler's last step: nothing to denoise
        return Tensor(x_in)
    check_start(sched, ts, prediction_type)
    x = Tensor(_noised(sched, x_in, int(ts[0]), noise))
    eps_fn = _CheckedEps(eps_fn, sampler)
    predict = predictor(eps_fn, sched, prediction_type, clip_denoised)
    name, step = sampler_step(sampler, sched, rng, eta, variance, predict, churn)
    moves = sampler_moves(sched, ts, sampler, churn, num_steps=len(full))  # heun's churn: gamma of the whole sequence
    x = _run(f"{name} image-to-image", predict, x, moves, step, callback, progress,
             jump=lambda x, t, t_up: forward_jump(sched, x, t, t_up, rng, churn[3]))
    eps_fn.check()
    return x
