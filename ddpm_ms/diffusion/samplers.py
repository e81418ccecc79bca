"""Samplers for a trained noise predictor: DDPM, DDIM, DPM-Solver++(2M) and Heun (EDM).

All samplers share :class:`ddpm_ms.diffusion.gaussian.Schedule` and its x_0 / eps
conversions; they differ only in the update from timestep index ``t`` to the next
index ``t_next`` of a descending sequence (see :func:`timestep_sequence`). The index
after the last one is ``-1``, where alpha_bar = 1 by definition, so every sampler
ends by returning a data-space sample (its last step returns the final x_0 prediction,
as the last step of Algorithm 2 of Ho et al. does).

- ``ddpm``: ancestral sampling, Ho et al. 2020, Algorithm 2, on the chain of the
  sampler's timesteps: with all T of them the paper's chain, with ``steps < T`` the
  respaced DDPM of Nichol & Dhariwal 2021 (Sec. 4), whose betas are beta'_t = 1 - abar_t / abar_t'.
  One step function for both (:func:`ddpm_sampler`): x_t' ~ q(x_t' | x_t, x_0) at the
  model's x_0, with the variance of ``variance`` ("posterior": beta~'_t, "beta": beta'_t;
  :func:`ddpm_ms.diffusion.gaussian.reverse_variance`) and no noise into t' = -1. Its mean is
  the same Gaussian's written two ways: Ho et al.'s Eq. 7 (the schedule's stored
  coefficients) for a step t' = t - 1, and DDIM's Eq. 12 with eta = 1 (Song et al. 2021,
  Sec. 4.1: the same mean, from alpha_bar alone) for a longer step. So the respaced DDPM
  with variance "posterior" is DDIM with eta = 1 (bit for bit when no step but the last,
  which gives x_0 either way, is t' = t - 1).
- ``ddim``: Song et al. 2021, Eq. 12 with sigma from Eq. 16 (eta in [0, 1]).
- ``dpm-solver++``: Lu et al. 2022 (arXiv 2211.01095), Algorithm 2, multistep
  second order in data (x_0) prediction, with the first and the final step first
  order. As in the DPM-Solver reference setup, the ``steps`` evaluations are at the
  first ``steps`` points of ``timestep_sequence(T, steps + 1)`` and the final
  (first-order, "lower order final") step goes from the last of them straight to
  alpha_bar = 1 (lambda = +inf, where a 2nd-order step is undefined) and returns the
  x_0 prediction. (DDIM's grid ends with an evaluation at t = 0 instead, so its big
  step is the one into t = 0; a 2nd-order step there, with a small step-size ratio
  r, overshoots: +39% in std on the Gaussian test data at 10 uniform steps.)
- ``heun``: Karras et al. 2022 ("EDM"), Algorithm 1 (deterministic 2nd-order Heun) and, with
  churn, Algorithm 2 (stochastic), on the model's own discrete noise levels (:func:`heun_sampler`,
  :func:`churn_moves`). In EDM's variables sigma_t = sqrt((1 - abar_t) / abar_t) and
  y = x / sqrt(abar_t) the probability-flow ODE is dy/dsigma = eps (EDM Table 1, VP). Euler,
  y' = y + (sigma' - sigma) eps, is exactly DDIM with eta = 0; Heun corrects it with a second
  evaluation eps' at (x', t_next): y'' = y + (sigma' - sigma)(eps + eps') / 2. The step into
  t_next = -1 (sigma = 0) stays Euler and returns the x_0 prediction. ``steps`` counts grid
  points (the ``timestep_sequence``, as for DDIM); network evaluations: 2 steps - 1.

Every sampler is a step function ``step(t, t_next, x_t, eps, x0) -> x_t'`` run by the same
loop (``_run``: one progress bar, one finite check, one callback ``callback(i, t, x, x0)``).
The network may predict eps, x_0 or v (``prediction_type``): its output is turned into the
pair (eps, x_0), x_0 clipped if asked, by :func:`denoised` in ``predict`` (:func:`predictor`)
only, and every step takes that pair, so no sampler depends on the objective or on clipping.
A step that needs another evaluation (Heun's correction) calls the same ``predict``, so
guidance, clipping and the NaN check apply to it too. A move up the walk (t_next > t: RePaint's
resampling, EDM's churn) is forward noise, :func:`forward_jump`, with no network call. Every sampler starts
at the last index T-1 ("trailing"; Lin et al. 2024, Sec. 3.3), where a zero-terminal-SNR
schedule has alpha_bar = 0 and x_T ~ N(0, I) is exact (with x0- or v-prediction only:
there eps-prediction cannot give x_0).

Randomness comes only from one NumPy Generator: x_T ~ N(0, I) is drawn first
(:func:`initial_noise`), then the per-step noise (DDPM, DDIM with eta > 0, Heun's churn), so
a seed fixes the result exactly.
"""

import numpy as np
from mindspore import Tensor, ops

from ddpm_ms.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    NonFiniteError,
    alpha_bar,
    model_output_to_eps_x0,
    predict_noise_from_start,
    q_posterior_mean,
    reverse_variance,
)

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "NonFiniteError",
    "timestep_sequence",
    "sampler_timesteps",
    "sample",
    "initial_noise",
    "denoised",
    "alpha_bar",
    "ddim_sigma",
    "ddim_mean",
    "log_snr",
    "dpm_solver_pp_step",
    "ddpm_sampler",
    "ddim_sampler",
    "dpm_solver_pp_sampler",
    "NO_CHURN",
    "edm_sigma",
    "churn_moves",
    "forward_jump",
    "predictor",
    "heun_sampler",
]

from ddpm_ms.diffusion import SAMPLERS  # defined MindSpore-free there, for ddpm_ms.config

SPACINGS = ("uniform", "quadratic")
NO_CHURN = (0.0, 0.0, None, 1.0)  # (s_churn, s_tmin, s_tmax, s_noise): Heun without churn (EDM Algorithm 1)
CHECK_EVERY = 50  # steps between NaN/inf checks of x and of the model output (also after step 1 and the last)


def timestep_sequence(num_timesteps, steps, spacing="uniform"):
    """Descending int64 timestep indices: ``steps`` unique values from T-1 down to 0.

    uniform: round(linspace(0, T-1, steps)). quadratic: round((T-1) (i/(steps-1))^2)
    (Song et al. 2021, Sec. D.2: tau_i = floor(c i^2)), raised to at least i so values
    stay unique - dense near t = 0. ``steps == 1`` gives [T-1]; ``steps == T`` gives
    every index for either spacing.
    """
    T = int(num_timesteps)
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (num_timesteps), got {steps!r}")
    steps = int(steps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if steps == 1:
        return np.array([T - 1], dtype=np.int64)
    frac = np.linspace(0.0, 1.0, steps)
    if spacing == "uniform":
        seq = np.round(frac * (T - 1))
    else:
        seq = np.maximum(np.round(frac**2 * (T - 1)), np.arange(steps))
    return seq.astype(np.int64)[::-1].copy()


def sampler_timesteps(num_timesteps, steps=None, sampler="ddim", spacing="uniform"):
    """The timestep indices at which ``sampler`` evaluates the model (len == steps; heun: its grid, where it
    also evaluates its corrections, and with churn starts its steps from the levels above, :func:`churn_moves`).

    ddpm/ddim/heun: timestep_sequence(T, steps). dpm-solver++: the first ``steps`` points of
    timestep_sequence(T, steps + 1) (ending above t = 0; all T indices if steps == T).
    For heun these are EDM's grid sigma_0 > ... > sigma_{N-1} (N = steps, then sigma_N = 0), the
    model's own discrete levels: EDM's rho = 7 discretisation is not used, as the network only
    takes integer timesteps; ``spacing`` "quadratic" is the one dense near sigma = 0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    T = int(num_timesteps)
    steps = T if steps is None else steps
    ts = timestep_sequence(T, steps, spacing)  # validates
    if sampler == "dpm-solver++" and len(ts) < T:
        ts = timestep_sequence(T, len(ts) + 1, spacing)[:-1]
    return ts


# ----- DDIM (Song et al. 2021) -----


def ddim_sigma(sched, t, t_next, eta):
    """Eq. 16: sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t') = eta sqrt(beta~'_t),
    with beta~'_t the posterior variance of the step t -> t' (:func:`ddpm_ms.diffusion.gaussian.reverse_variance`)."""
    return float(eta * np.sqrt(max(reverse_variance(sched, t, "posterior", t_next), 0.0)))


def ddim_mean(sched, t_next, eps, x0, sigma=0.0):
    """Eq. 12 without its noise term sigma z: sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps,
    from the pair (eps, x0) predicted at x_t (:func:`denoised`)."""
    a_next = alpha_bar(sched, t_next)
    return float(np.sqrt(a_next)) * x0 + float(np.sqrt(max(1.0 - a_next - sigma**2, 0.0))) * eps


# ----- DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) -----


def log_snr(sched, t):
    """lambda_t = log(alpha_t / sigma_t), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); +inf at t = -1,
    -inf where abar_t = 0 (zero terminal SNR: the first step is then DDIM's, and the next one first order)."""
    if t < 0:
        return np.inf
    a = alpha_bar(sched, t)
    if a == 0.0:
        return -np.inf
    return 0.5 * (np.log(a) - np.log1p(-a))


def dpm_solver_pp_step(sched, x_t, t, t_next, x0, x0_prev=None, t_prev=None):
    """One DPM-Solver++(2M) update (Algorithm 2) from t to t_next, given x0 = x_theta(x_t, t).

    First order (= DDIM, eta = 0) if x0_prev is None, else second order using the x_0
    prediction x0_prev made at t_prev:
      h = lambda_t' - lambda_t, r = h_prev / h,
      D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,
      x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (e^{-h} - 1) D.
    """
    a_t, a_next = alpha_bar(sched, t), alpha_bar(sched, t_next)
    h = log_snr(sched, t_next) - log_snr(sched, t)
    d = x0
    if x0_prev is not None:
        r = float((log_snr(sched, t) - log_snr(sched, t_prev)) / h)  # a Python float: never np.float64 * Tensor
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    coef_x = float(np.sqrt((1.0 - a_next) / (1.0 - a_t)))
    coef_d = float(-np.sqrt(a_next) * np.expm1(-h))  # = 1 at t_next = -1 (h = inf)
    return coef_x * x_t + coef_d * d


# ----- Heun / EDM (Karras et al. 2022) on the discrete levels of a VP model -----


def edm_sigma(sched, t):
    """EDM's noise level of index t: sigma_t = sqrt((1 - abar_t) / abar_t) (x_t = sqrt(abar_t) (x_0 + sigma_t eps));
    0 at t = -1, inf where abar_t = 0 (zero terminal SNR)."""
    a = alpha_bar(sched, t)
    return np.inf if a == 0.0 else float(np.sqrt((1.0 - a) / a))


def forward_jump(sched, x, t, t_up, rng, noise=1.0):
    """x_t_up ~ q(x_t_up | x_t) = N(sqrt(abar_up / abar_t) x_t, (1 - abar_up / abar_t) I), one draw from rng.

    The forward process from t up to t_up >= t (the forward steps composed). In EDM's variables
    (y = x / sqrt(abar)) it is y_up = y + sqrt(sigma_up^2 - sigma_t^2) z: the noise of a jump back
    up (RePaint's resampling) and of churn (EDM Algorithm 2, line 5). ``noise`` scales the std of
    the added noise (EDM's S_noise; 1: exactly q).
    """
    ratio = alpha_bar(sched, t_up) / alpha_bar(sched, t)
    z = Tensor(rng.standard_normal(tuple(x.shape), dtype=np.float32))
    return float(np.sqrt(ratio)) * x + float(noise * np.sqrt(1.0 - ratio)) * z


def churned_timestep(sched, t, gamma, s_tmin=0.0, s_tmax=None):
    """The index t_hat >= t at which EDM's churned step starts: sigma_hat = sigma_t (1 + gamma) rounded up.

    EDM Algorithm 2, lines 4-5: churn only if S_tmin <= sigma_t <= S_tmax. The network only takes
    the schedule's discrete levels, so sigma_hat is rounded up to the smallest discrete sigma >= it
    (a churn never rounds back to no churn), and capped at the largest finite sigma of the schedule
    (there is nothing above T - 1, and abar = 0 has sigma = inf): so at t = T - 1 (and at an abar = 0
    start) there is no churn. (EDM's own code rounds sigma_hat of its discretised ADM model to the
    nearest discrete sigma.)
    """
    sigma = edm_sigma(sched, t)
    s_tmax = np.inf if s_tmax is None else s_tmax
    if t < 0 or gamma <= 0.0 or not np.isfinite(sigma) or not s_tmin <= sigma <= s_tmax:
        return t
    abar = np.asarray(sched.alphas_cumprod, np.float64)[t:]
    finite = abar > 0.0
    if not finite.any():
        return t
    sigmas = np.sqrt((1.0 - abar[finite]) / abar[finite])  # increasing: t, t + 1, ... (abar decreasing)
    above = np.nonzero(sigmas >= sigma * (1.0 + gamma))[0]
    return t + int(above[0] if len(above) else len(sigmas) - 1)


def churn_moves(sched, ts, churn=NO_CHURN, num_steps=None):
    """The walk of the heun sampler over its grid ``ts``: moves (t, t_next), a move up being churn's noise.

    For every grid point t (EDM Algorithm 2, lines 3-5): gamma = min(S_churn / N, sqrt(2) - 1) where
    S_tmin <= sigma_t <= S_tmax (else 0), N = ``num_steps`` (default len(ts); img2img passes its
    whole sequence's), t_hat = :func:`churned_timestep`; a move up (t, t_hat) if t_hat > t (forward
    noise, :func:`forward_jump` with S_noise), then the Heun step (t_hat, t_next). Without churn
    (S_churn = 0, or no grid sigma in [S_tmin, S_tmax]) it is ``steps_of(ts)``: Algorithm 1.
    """
    s_churn, s_tmin, s_tmax, _ = churn
    n = len(ts) if num_steps is None else int(num_steps)
    gamma = min(float(s_churn) / max(n, 1), np.sqrt(2.0) - 1.0)
    moves = []
    for t, t_next in steps_of(ts):
        t_hat = churned_timestep(sched, t, gamma, s_tmin, s_tmax)
        if t_hat > t:
            moves.append((t, t_hat))
        moves.append((t_hat, t_next))
    return moves


# ----- the sampling loop: one for all samplers -----
#
# A sampler is a step function step(t, t_next, x_t, eps, x0) -> x_t' from timestep index t
# to the next index t_next of its sequence (-1 after the last), given the model's prediction
# at (x_t, t) as the pair (eps, x0) from predict(x, t) (predictor: the network output through
# denoised()). A step that needs more evaluations (Heun's correction) gets the same predict
# from its factory. _run draws nothing itself: a stochastic step draws its noise from the rng
# when it is called (add_noise), and so does a move up (jump), so the order is x_T first
# (initial_noise, in sample), then per move.


def initial_noise(shape, rng):
    """x_T ~ N(0, I) as a float32 NumPy array of ``shape``: the first draw from rng, before any
    per-step noise. The one place x_T is drawn (:func:`sample`, ``generation.generate``)."""
    return rng.standard_normal(tuple(int(s) for s in shape), dtype=np.float32)


def add_noise(x, std, rng):
    """x + std z with z ~ N(0, I) drawn from rng; x itself (nothing drawn) if std is 0.
    The noise term of Algorithm 2, line 4 (Ho et al.) and of Eq. 12 (Song et al.)."""
    if std > 0:
        return x + float(std) * Tensor(rng.standard_normal(tuple(x.shape), dtype=np.float32))
    return x


def denoised(sched, x_t, t, out, prediction_type="eps", clip_denoised=True):
    """The network output ``out`` at x_t, index t, as the pair (eps, x_0) that every step takes.

    The conversion is :func:`ddpm_ms.diffusion.gaussian.model_output_to_eps_x0`. With clip_denoised,
    x_0 is clipped to [-1, 1] and eps recomputed from it (Eq. 4 of Ho et al.), so the pair stays
    consistent: as in Ho et al.'s code for DDPM/DDIM, fixed-range thresholding for DPM-Solver++
    (Lu et al. 2022, Sec. 5).
    """
    eps, x0 = model_output_to_eps_x0(sched, x_t, t, out, prediction_type)
    if clip_denoised:
        x0 = ops.clamp(x0, -1.0, 1.0)
        eps = predict_noise_from_start(sched, x_t, t, x0)
    return eps, x0


def self_conditioned(eps_fn):
    """Whether ``eps_fn`` takes a self-conditioning input: ``eps_fn(x, t, x_self_cond=...)`` (an estimate of x_0,
    Chen, Zhang & Hinton 2022, Sec. 3). Such an eps_fn says so with an attribute ``self_condition = True``."""
    return bool(getattr(eps_fn, "self_condition", False))


def predictor(eps_fn, sched, prediction_type="eps", clip_denoised=True):
    """predict(x, t) -> (eps, x0): the network ``eps_fn`` at x and timestep index t (an int), as
    :func:`denoised` gives it. The one way the loop and the steps evaluate the network.

    A self-conditioned eps_fn (:func:`self_conditioned`) gets, at every call, the x_0 prediction of the
    previous call (clipped to [-1, 1], as in training; the x0 :func:`denoised` returns when clip_denoised),
    and zeros at the first: every sampler, Heun's correction call and the editing loops included, since
    all of them evaluate the network through this one predict of their run.
    """
    if not self_conditioned(eps_fn):
        def predict(x, t):
            return denoised(sched, x, t, eps_fn(x, timestep_tensor(t, x.shape[0])), prediction_type, clip_denoised)

        return predict
    last = {}

    def predict_self_conditioned(x, t):
        x_self_cond = last.get("x0")
        if x_self_cond is None:
            x_self_cond = ops.zeros_like(x)
        out = eps_fn(x, timestep_tensor(t, x.shape[0]), x_self_cond=x_self_cond)
        eps, x0 = denoised(sched, x, t, out, prediction_type, clip_denoised)
        last["x0"] = x0 if clip_denoised else ops.clamp(x0, -1.0, 1.0)
        return eps, x0

    return predict_self_conditioned


def timestep_tensor(t, batch):
    """The [batch] int32 Tensor of timestep index t that the network takes."""
    return Tensor(np.full((batch,), t, dtype=np.int32))


def check_finite(x, where):
    if not bool(ops.isfinite(x).all()):
        raise NonFiniteError(
            f"sampling produced NaN/inf values at {where}; the model or checkpoint is broken "
            "(diverged training?) - try the EMA weights, a lower learning rate or float32"
        )


class _CheckedEps:
    """eps_fn wrapper (the raw network output) that raises NonFiniteError if the model ever outputs NaN/inf.

    Checking x alone is not enough: with clip_denoised, ops.clamp turns a NaN x_0 into
    -1 on MindSpore CPU, so a broken model would silently give finite garbage. The
    flag is accumulated on the device and read (one host sync) after the first call,
    every CHECK_EVERY calls and by a final check(), so a broken model fails at once.
    """

    def __init__(self, eps_fn, name):
        self.eps_fn, self.name, self.ok, self.calls, self.t = eps_fn, name, None, 0, None
        self.self_condition = self_conditioned(eps_fn)  # passed on to predictor()

    def __call__(self, x, t, **self_cond):
        eps = self.eps_fn(x, t, **self_cond)
        ok = ops.isfinite(eps).all()
        self.ok = ok if self.ok is None else ops.logical_and(self.ok, ok)
        self.calls, self.t = self.calls + 1, t
        if self.calls == 1 or self.calls % CHECK_EVERY == 0:
            self.check()
        return eps

    def check(self):
        if self.ok is not None and not bool(self.ok):
            t = int(self.t.asnumpy()[0])
            where = f"timestep {t}" if self.calls == 1 else f"one of the first {self.calls} steps (now at timestep {t})"
            raise NonFiniteError(
                f"the {self.name} model output (its prediction) has NaN/inf values at {where}; "
                "the model or checkpoint is broken (diverged training?) - try the EMA weights"
            )


def steps_of(ts):
    """The moves (t, t_next) of a descending timestep sequence: each index to the next, the last to -1."""
    ts = [int(t) for t in ts]
    return list(zip(ts, ts[1:] + [-1]))


def _run(name, predict, x, moves, step, callback, progress, after_step=None, jump=None):
    """The loop over ``moves`` (t, t_next): predict (eps, x0) at (x, t) -> step -> ``after_step(x, t_next)``
    (inpainting's known-region replacement, ``ddpm_ms.diffusion.editing``) -> callback(i, t, x, x0) -> finite check.
    A move up (t_next > t: RePaint's resampling, EDM's churn) is ``jump(x, t, t_next)``: noise, no network call
    and no callback. The callback's i counts the steps (moves down): 0, 1, 2, ..."""
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

    i = 0
    for k in tqdm(range(len(moves)), desc=f"{name} sampling", disable=not progress, leave=False):
        t, t_next = moves[k]
        if t_next > t:
            x = jump(x, t, t_next)
            continue
        eps, x0 = predict(x, t)
        x = step(t, t_next, x, eps, x0)
        if after_step is not None:
            x = after_step(x, t_next)
        if callback is not None:
            callback(i, t, x, x0)
        i += 1
        if (k + 1) % CHECK_EVERY == 0 or k + 1 == len(moves):
            check_finite(x, f"{name} step {k + 1}/{len(moves)} (timestep {t})")
    return x


# ----- the samplers: one step function each -----


def ddpm_sampler(sched, rng, variance="posterior"):
    """DDPM: Algorithm 2 of Ho et al. on the sampler's timesteps (all T, or respaced: Nichol & Dhariwal, Sec. 4).

    x_t' = mean + sigma z, the posterior q(x_t' | x_t, x_0) at the model's x_0. sigma^2 is the variance
    rule ``variance`` (:func:`ddpm_ms.diffusion.gaussian.reverse_variance`), with no noise into t' = -1 (line 3).
    The mean is one Gaussian's in two forms (module docstring): Eq. 7 where the schedule stores its
    coefficients (t' = t - 1), Eq. 12 of Song et al. with eta = 1 for a longer step.
    """

    def step(t, t_next, x_t, eps, x0):
        if t_next == t - 1:  # Ho et al. Eq. 7, the schedule's own coefficients
            mean = q_posterior_mean(sched, x0, x_t, t)
        else:  # a respaced step: the same mean as Eq. 12 of Song et al. with eta = 1 (their Sec. 4.1)
            mean = ddim_mean(sched, t_next, eps, x0, ddim_sigma(sched, t, t_next, 1.0))
        sigma = np.sqrt(reverse_variance(sched, t, variance, t_next)) if t_next >= 0 else 0.0
        return add_noise(mean, sigma, rng)  # Algorithm 2, line 4

    return step


def ddim_sampler(sched, rng, eta=0.0):
    """DDIM: Song et al. 2021, Eq. 12 with sigma from Eq. 16 (eta = 0: deterministic)."""

    def step(t, t_next, x_t, eps, x0):
        sigma = ddim_sigma(sched, t, t_next, eta)  # Eq. 16
        return add_noise(ddim_mean(sched, t_next, eps, x0, sigma), sigma, rng)  # Eq. 12

    return step


def dpm_solver_pp_sampler(sched):
    """DPM-Solver++(2M): Lu et al. 2022, Algorithm 2; the first step and the final one (into
    lambda = +inf) first order. It keeps the previous x_0 prediction."""
    prev = {}

    def step(t, t_next, x_t, eps, x0):
        second_order = bool(prev) and t_next >= 0
        x_next = dpm_solver_pp_step(sched, x_t, t, t_next, x0,
                                    prev.get("x0") if second_order else None, prev.get("t"))
        prev.update(x0=x0, t=t)
        return x_next

    return step


def heun_sampler(sched, predict):
    """Heun: Karras et al. 2022, Algorithm 1, lines 4-8, on the model's discrete levels (module docstring).

    With sigma = :func:`edm_sigma` and y = x / sqrt(abar): the Euler step y' = y + (sigma' - sigma) eps,
    which is DDIM's (:func:`ddim_mean`, eta = 0: sqrt(abar') x_0 + sqrt(1 - abar') eps), then, unless
    t_next = -1 (sigma' = 0: Euler, which returns the x_0 prediction) or abar_t = 0 (sigma = inf:
    the first step of a zero-terminal-SNR schedule stays DDIM's, as DPM-Solver++'s does at
    lambda = -inf), the correction with eps' = predict(x', t_next):
    y'' = y + (sigma' - sigma)(eps + eps') / 2, i.e. x'' = x' + sqrt(abar') (sigma' - sigma)(eps' - eps) / 2.
    The churn of Algorithm 2 is a move up before the step (:func:`churn_moves`), so t may be t_hat.
    """

    def step(t, t_next, x_t, eps, x0):
        x_next = ddim_mean(sched, t_next, eps, x0)  # Euler in (sigma, y)
        a_t = alpha_bar(sched, t)
        if t_next < 0 or a_t == 0.0:
            return x_next
        eps_next, _ = predict(x_next, t_next)
        coef = float(0.5 * np.sqrt(alpha_bar(sched, t_next)) * (edm_sigma(sched, t_next) - edm_sigma(sched, t)))
        return x_next + coef * (eps_next - eps)

    return step


def sampler_step(sampler, sched, rng, eta=0.0, variance="posterior", predict=None, churn=NO_CHURN):
    """(progress-bar name, step function) of ``sampler``; eta is DDIM's, variance DDPM's; predict (the loop's,
    :func:`predictor`) and churn are heun's (its name: "Heun", or "EDM (churn)" with S_churn > 0)."""
    if sampler == "ddpm":
        return "DDPM", ddpm_sampler(sched, rng, variance)
    if sampler == "ddim":
        return "DDIM", ddim_sampler(sched, rng, eta)
    if sampler == "heun":
        return ("EDM (churn)" if churn[0] > 0 else "Heun"), heun_sampler(sched, predict)
    return "DPM-Solver++", dpm_solver_pp_sampler(sched)


def sampler_moves(sched, ts, sampler, churn=NO_CHURN, num_steps=None):
    """The moves of ``sampler`` over its timesteps ``ts``: steps_of(ts), with heun's churn (:func:`churn_moves`)."""
    return churn_moves(sched, ts, churn, num_steps) if sampler == "heun" else steps_of(ts)


def check_churn(churn):
    """ValueError unless churn = (s_churn, s_tmin, s_tmax, s_noise) is valid for EDM's Algorithm 2."""
    try:
        s_churn, s_tmin, s_tmax, s_noise = churn
        values = [float(v) for v in (s_churn, s_tmin, s_noise)] + [None if s_tmax is None else float(s_tmax)]
    except (TypeError, ValueError):
        raise ValueError(f"churn must be (s_churn, s_tmin, s_tmax, s_noise) numbers (s_tmax may be None), "
                         f"got {churn!r}") from None
    s_churn, s_tmin, s_noise, s_tmax = values
    if not (np.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"s_churn must be a finite number >= 0 (0: deterministic Heun), got {s_churn}")
    if not (np.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"s_noise must be a finite number > 0 (1: the exact noise), got {s_noise}")
    if not (np.isfinite(s_tmin) and s_tmin >= 0):
        raise ValueError(f"s_tmin must be a finite number >= 0, got {s_tmin}")
    if s_tmax is not None and not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be None (no upper bound) or >= s_tmin ({s_tmin}), got {s_tmax}")


def check_options(sampler, eta=0.0, variance="posterior", prediction_type="eps", churn=NO_CHURN):
    """ValueError naming the first bad option of :func:`sample` (and of the editing functions)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCE_TYPES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    check_churn(churn)


def check_start(sched, ts, prediction_type):
    """ValueError if the first timestep of ``ts`` has alpha_bar = 0 and the network predicts eps."""
    if prediction_type == "eps" and sched.alphas_cumprod[ts[0]] == 0.0:
        raise ValueError("alpha_bar is 0 at the first timestep (zero terminal SNR): an eps-prediction gives no "
                         "x_0 there; use an x0- or v-prediction model")


def sample(eps_fn, sched, shape, sampler="ddpm", steps=None, eta=0.0, seed=0, rng=None,
           clip_denoised=True, variance="posterior", spacing="uniform", callback=None, progress=True,
           x_T=None, prediction_type="eps", churn=NO_CHURN):
    """Draw samples of ``shape`` from the reverse process with the chosen sampler.

    eps_fn(x [N, ...] float32 Tensor, t [N] int32 Tensor) -> the network output: the predicted
    noise, or with prediction_type "x0" / "v" the predicted x_0 / v (module docstring). With an
    attribute ``self_condition = True`` it is called as eps_fn(x, t, x_self_cond=...) with the
    previous call's x_0 prediction (zeros at the first; :func:`predictor`).
    steps: number of timesteps, 1..T (None: all T); the timesteps used are
    sampler_timesteps(T, steps, sampler, spacing), spacing "uniform" or "quadratic". One network
    evaluation per step, except heun: 2 steps - 1 (its correction; none into t = -1).
    eta: DDIM stochasticity in [0, 1] (validated always, used by ddim only: ddpm is
    eta = 1 by definition and dpm-solver++ is deterministic).
    variance: "posterior" (beta_tilde) or "beta"; used by ddpm only.
    churn: (s_churn, s_tmin, s_tmax, s_noise), EDM's S_churn, S_tmin, S_tmax (None: no bound),
    S_noise (validated always, used by heun only; s_churn = 0: deterministic, Algorithm 1).
    clip_denoised: clip each x_0 prediction to [-1, 1] (DDPM/DDIM as in Ho et al.'s
    code; fixed-range thresholding for DPM-Solver++).
    seed / rng: all noise comes from rng (default np.random.default_rng(seed)).
    callback(step_index, t, x, x0_pred) is called after every step (heun with churn: t is t_hat,
    the level the step starts from).
    x_T: optional starting noise (a Tensor of ``shape``) instead of the first draw from rng
    (:func:`initial_noise`).
    Raises NonFiniteError if the model output or x has NaN/inf. Returns the float32 Tensor x_0.
    """
    check_options(sampler, eta, variance, prediction_type, churn)
    T = sched.num_timesteps
    ts = sampler_timesteps(T, steps, sampler, spacing)  # validates steps and spacing
    check_start(sched, ts, prediction_type)
    rng = np.random.default_rng(seed) if rng is None else rng
    shape = tuple(int(s) for s in shape)

    eps_fn = _CheckedEps(eps_fn, sampler)
    predict = predictor(eps_fn, sched, prediction_type, clip_denoised)
    x = Tensor(initial_noise(shape, rng)) if x_T is None else x_T
    name, step = sampler_step(sampler, sched, rng, eta, variance, predict, churn)
    x = _run(name, predict, x, sampler_moves(sched, ts, sampler, churn), step, callback, progress,
             jump=lambda x, t, t_up: forward_jump(sched, x, t, t_up, rng, churn[3]))
    eps_fn.check()
    return x
