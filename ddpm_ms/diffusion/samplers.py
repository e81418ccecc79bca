"""Samplers for a trained noise predictor: DDPM, DDIM and DPM-Solver++(2M).

All samplers share :class:`ddpm_ms.diffusion.gaussian.Schedule` and its x_0 / eps
conversions; they differ only in the update from timestep index ``t`` to the next
index ``t_next`` of a descending sequence (see :func:`timestep_sequence`). The index
after the last one is ``-1``, where alpha_bar = 1 by definition, so every sampler
ends by returning a data-space sample (for DDIM/DPM-Solver++ the last step returns
the final x_0 prediction, matching the last step of Algorithm 2 of Ho et al.).

- ``ddpm``: ancestral sampling, Ho et al. 2020, Algorithm 2 (all T steps: one
  :func:`ddpm_ms.diffusion.gaussian.p_sample` per step). With ``steps < T`` it is the respaced
  DDPM of Nichol & Dhariwal 2021 (Sec. 4): betas recomputed from alpha_bar on the
  sub-sequence, beta'_t = 1 - abar_t / abar_t'. Its posterior-variance form is DDIM
  with eta = 1 (Song et al. 2021, Sec. 4.1), which is how it is implemented here;
  ``variance="beta"`` keeps that mean and uses the noise scale sqrt(beta'_t).
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

Every sampler is a step function run by the same loop (``_run``: one progress bar, one
finite check, one callback ``callback(i, t, x, x0)``). The network may predict eps, x_0 or
v (``prediction_type``): its output is turned into the pair (eps, x_0) by
:func:`ddpm_ms.diffusion.gaussian.model_output_to_eps_x0` in that loop only, and
every step takes that pair, so no sampler depends on the objective. Every sampler starts
at the last index T-1 ("trailing"; Lin et al. 2024, Sec. 3.3), where a zero-terminal-SNR
schedule has alpha_bar = 0 and x_T ~ N(0, I) is exact (with x0- or v-prediction only:
there eps-prediction cannot give x_0).

Randomness comes only from one NumPy Generator: x_T ~ N(0, I) is drawn first, then
the per-step noise (DDPM, DDIM with eta > 0), so a seed fixes the result exactly.
"""

import numpy as np
from mindspore import Tensor, ops

from ddpm_ms.diffusion.gaussian import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    NonFiniteError,
    model_output_to_eps_x0,
    p_sample,
    predict_noise_from_start,
    predict_start_from_noise,
)

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "NonFiniteError",
    "timestep_sequence",
    "sampler_timesteps",
    "sample",
    "alpha_bar",
    "ddim_sigma",
    "respaced_beta",
    "ddim_step",
    "log_snr",
    "dpm_solver_pp_step",
]

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
SPACINGS = ("uniform", "quadratic")
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
    """The timestep indices at which ``sampler`` evaluates the model (len == steps).

    ddpm/ddim: timestep_sequence(T, steps). dpm-solver++: the first ``steps`` points of
    timestep_sequence(T, steps + 1) (ending above t = 0; all T indices if steps == T).
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


def alpha_bar(sched, t):
    """alpha_bar at index t; 1 at t = -1 (the step after the last: x_{-1} = x_0)."""
    return 1.0 if t < 0 else float(sched.alphas_cumprod[t])


def ddim_sigma(sched, t, t_next, eta):
    """Eq. 16: sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')."""
    a_t, a_next = alpha_bar(sched, t), alpha_bar(sched, t_next)
    var = (1.0 - a_next) / (1.0 - a_t) * (1.0 - a_t / a_next)
    return float(eta * np.sqrt(max(var, 0.0)))


def respaced_beta(sched, t, t_next):
    """Nichol & Dhariwal 2021, Sec. 4: beta of the respaced chain, 1 - abar_t / abar_t'."""
    return 1.0 - alpha_bar(sched, t) / alpha_bar(sched, t_next)


def ddim_step(sched, x_t, t, t_next, eps, sigma=0.0, noise=None, clip_denoised=True, noise_std=None, x0=None):
    """Eq. 12: x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z.

    x0 is the model's x_0 prediction (computed from eps if not given). With clip_denoised,
    x0 is clipped to [-1, 1] and eps recomputed from it. noise_std (default sigma) scales z
    separately from the sigma in the mean (respaced DDPM with variance="beta"). Returns (x_t', x0).
    """
    if x0 is None:
        x0 = predict_start_from_noise(sched, x_t, t, eps)
    if clip_denoised:
        x0 = ops.clamp(x0, -1.0, 1.0)
        eps = predict_noise_from_start(sched, x_t, t, x0)
    a_next = alpha_bar(sched, t_next)
    x_next = float(np.sqrt(a_next)) * x0 + float(np.sqrt(max(1.0 - a_next - sigma**2, 0.0))) * eps
    std = sigma if noise_std is None else noise_std
    if std > 0:
        x_next = x_next + float(std) * noise
    return x_next, x0


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


# ----- the sampling loop: one for all samplers -----
#
# A sampler is a step function step(i, t, t_next, x_t, eps, x0) -> (x_t', x0) from timestep
# index t to the next index t_next of its sequence (-1 after the last), given the model's
# prediction as the pair (eps, x0). _run draws nothing itself: a stochastic step draws its
# noise from the rng when it is called, so the order is x_T first (in sample), then per step.


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

    def __call__(self, x, t):
        eps = self.eps_fn(x, t)
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


def _run(name, eps_fn, sched, x, ts, step, callback, progress, prediction_type="eps"):
    """The loop: over ts, network output -> (eps, x0) -> step -> callback(i, t, x, x0) -> finite check."""
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in notebooks without ipywidgets

    batch = x.shape[0]
    for i in tqdm(range(len(ts)), desc=f"{name} sampling", disable=not progress, leave=False):
        t = int(ts[i])
        t_next = int(ts[i + 1]) if i + 1 < len(ts) else -1
        eps, x0 = model_output_to_eps_x0(sched, x, t, eps_fn(x, timestep_tensor(t, batch)), prediction_type)
        x, x0 = step(i, t, t_next, x, eps, x0)
        if callback is not None:
            callback(i, t, x, x0)
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == len(ts):
            check_finite(x, f"{name} step {i + 1}/{len(ts)} (timestep {t})")
    return x


def _noise(rng, x, draw):
    """z ~ N(0, I) shaped like x, drawn from rng only if the step uses it (draw), else None."""
    return Tensor(rng.standard_normal(tuple(x.shape), dtype=np.float32)) if draw else None


def ddpm_full_step(sched, rng, variance="posterior", clip_denoised=True):
    """Algorithm 2 of Ho et al. (all T indices): x_{t-1} = p_sample(x_t), noise z unless t = 0."""

    def step(i, t, t_next, x_t, eps, x0):
        return p_sample(sched, x_t, t, eps, _noise(rng, x_t, t > 0), variance, clip_denoised, x0)

    return step


def ddim_loop_step(sched, rng, eta, clip_denoised=True, variance=None):
    """DDIM with eta (Eq. 12, sigma from Eq. 16) or, with variance set, the respaced DDPM
    (eta = 1; variance "beta" draws its noise with std sqrt(beta'_t) instead of sigma)."""

    def step(i, t, t_next, x_t, eps, x0):
        sigma = ddim_sigma(sched, t, t_next, eta)
        noise_std = None
        if variance == "beta":
            noise_std = float(np.sqrt(respaced_beta(sched, t, t_next))) if t_next >= 0 else 0.0
        noise = _noise(rng, x_t, (sigma if noise_std is None else noise_std) > 0)
        return ddim_step(sched, x_t, t, t_next, eps, sigma, noise, clip_denoised, noise_std, x0)

    return step


def dpm_solver_pp_loop_step(sched, clip_denoised=True):
    """Algorithm 2 of Lu et al. 2022; first and final steps first order (it keeps the previous x_0)."""
    prev = {}

    def step(i, t, t_next, x_t, eps, x0):
        if clip_denoised:  # thresholding (Sec. 5 of the paper) with a fixed [-1, 1] range
            x0 = ops.clamp(x0, -1.0, 1.0)
        second_order = bool(prev) and t_next >= 0
        x_next = dpm_solver_pp_step(sched, x_t, t, t_next, x0,
                                    prev.get("x0") if second_order else None, prev.get("t"))
        prev.update(x0=x0, t=t)
        return x_next, x0

    return step


def sampler_step(sampler, sched, ts, rng, eta=0.0, variance="posterior", clip_denoised=True):
    """(progress-bar name, step function) of ``sampler`` on its timesteps ts."""
    if sampler == "ddpm" and len(ts) == sched.num_timesteps:
        return "DDPM", ddpm_full_step(sched, rng, variance, clip_denoised)
    if sampler == "ddpm":  # respaced DDPM = DDIM with eta = 1 (module docstring)
        return "DDPM", ddim_loop_step(sched, rng, 1.0, clip_denoised, variance)
    if sampler == "ddim":
        return "DDIM", ddim_loop_step(sched, rng, eta, clip_denoised)
    return "DPM-Solver++", dpm_solver_pp_loop_step(sched, clip_denoised)


def sample(eps_fn, sched, shape, sampler="ddpm", steps=None, eta=0.0, seed=0, rng=None,
           clip_denoised=True, variance="posterior", spacing="uniform", callback=None, progress=True,
           x_T=None, prediction_type="eps"):
    """Draw samples of ``shape`` from the reverse process with the chosen sampler.

    eps_fn(x [N, ...] float32 Tensor, t [N] int32 Tensor) -> the network output: the predicted
    noise, or with prediction_type "x0" / "v" the predicted x_0 / v (module docstring).
    steps: number of network evaluations, 1..T (None: all T); the timesteps used are
    sampler_timesteps(T, steps, sampler, spacing), spacing "uniform" or "quadratic".
    eta: DDIM stochasticity in [0, 1] (validated always, used by ddim only: ddpm is
    eta = 1 by definition and dpm-solver++ is deterministic).
    variance: "posterior" (beta_tilde) or "beta"; used by ddpm only.
    clip_denoised: clip each x_0 prediction to [-1, 1] (DDPM/DDIM as in Ho et al.'s
    code; fixed-range thresholding for DPM-Solver++).
    seed / rng: all noise comes from rng (default np.random.default_rng(seed)).
    callback(step_index, t, x, x0_pred) is called after every step.
    x_T: optional starting noise (a Tensor of ``shape``) instead of the first draw from rng.
    Raises NonFiniteError if the model output or x has NaN/inf. Returns the float32 Tensor x_0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCE_TYPES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    T = sched.num_timesteps
    ts = sampler_timesteps(T, steps, sampler, spacing)  # validates steps and spacing
    if prediction_type == "eps" and sched.alphas_cumprod[ts[0]] == 0.0:
        raise ValueError("alpha_bar is 0 at the first timestep (zero terminal SNR): an eps-prediction gives no "
                         "x_0 there; use an x0- or v-prediction model")
    rng = np.random.default_rng(seed) if rng is None else rng
    shape = tuple(int(s) for s in shape)

    eps_fn = _CheckedEps(eps_fn, sampler)
    x = Tensor(rng.standard_normal(shape, dtype=np.float32)) if x_T is None else x_T  # x_T ~ N(0, I)
    name, step = sampler_step(sampler, sched, ts, rng, eta, variance, clip_denoised)
    x = _run(name, eps_fn, sched, x, ts, step, callback, progress, prediction_type)
    eps_fn.check()
    return x
