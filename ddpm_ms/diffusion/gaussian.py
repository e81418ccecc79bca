"""Gaussian diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

Every coefficient is computed once, in float64 NumPy, by :class:`Schedule`; the
functions below apply one equation each to MindSpore tensors (``q_sample`` and
``p_losses`` also take NumPy arrays). ``t`` is always the 0-based index into the
schedule (the paper's t = index + 1).

Equation numbers refer to Ho et al. 2020 unless stated otherwise.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ddpm_ms.diffusion.schedules import make_beta_schedule, rescale_zero_terminal_snr

from ddpm_ms.diffusion import LOSS_TYPES, LOSS_WEIGHTINGS, PREDICTION_TYPES, VARIANCE_TYPES  # MindSpore-free there


class NonFiniteError(FloatingPointError):
    """Sampling or training produced NaN/inf values."""


class Schedule:
    """All per-timestep constants of the forward and reverse processes.

    Attributes are float64 NumPy arrays of shape [T]; ``self.tensors`` holds the
    float32 MindSpore copies used inside compiled graphs.
    """

    def __init__(self, betas):
        betas = np.asarray(betas, dtype=np.float64)
        # beta = 1 is allowed at the last step only: a zero-terminal-SNR schedule (alpha_bar_T = 0)
        if betas.ndim != 1 or not (np.all((betas[:-1] > 0) & (betas[:-1] < 1)) and 0 < betas[-1] <= 1):
            raise ValueError("betas must be a 1-D array with values in (0, 1) (the last one may be 1)")
        self.num_timesteps = len(betas)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas = alphas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

        # q(x_t | x_0), Eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

        # x_0 from x_t and eps, Eq. 4 solved for x_0 (inf where alpha_bar = 0: there x_0 needs x0- or v-prediction)
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
            # signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021); 0 at a zero terminal SNR
            self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        # q(x_{t-1} | x_t, x_0), Eqs. 6-7
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        self.posterior_mean_coef1 = betas * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)

        self.tensors = {
            name: Tensor(getattr(self, name), ms.float32)
            for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                         "sqrt_recipm1_alphas_cumprod")
        }

    @classmethod
    def from_config(cls, beta_schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                    zero_terminal_snr=False):
        betas = make_beta_schedule(beta_schedule, timesteps, beta_start, beta_end)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)


def extract(a, t, x_shape):
    """Gather a[t] for a batch of indices t and reshape to broadcast over x: [N, 1, 1, ...]."""
    out = ops.gather(a, t, 0)
    return out.reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def as_tensor(value, dtype):
    """A NumPy array as a Tensor of ``dtype``; anything else (a Tensor) is returned unchanged.

    Inside a compiled graph the inputs are Tensors and the check is resolved at compile time.
    """
    if isinstance(value, np.ndarray):
        return Tensor(value, dtype)
    return value


def as_inputs(x_start, t, noise):
    """(x_start, t, noise) with NumPy arrays converted to float32, int32 and float32 Tensors."""
    return as_tensor(x_start, ms.float32), as_tensor(t, ms.int32), as_tensor(noise, ms.float32)


def q_sample(sched, x_start, t, noise):
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    x_start, t and noise are Tensors or NumPy arrays; arrays are converted to float32
    (x_start, noise) and int32 (t) Tensors. Returns a Tensor.
    """
    x_start, t, noise = as_inputs(x_start, t, noise)
    return (
        extract(sched.tensors["sqrt_alphas_cumprod"], t, x_start.shape) * x_start
        + extract(sched.tensors["sqrt_one_minus_alphas_cumprod"], t, x_start.shape) * noise
    )


def elementwise_loss(diff, loss_type="huber"):
    """Per-element loss of a prediction error: l1, l2 (Eq. 14) or huber (smooth L1, delta 1)."""
    if loss_type == "l1":
        return ops.abs(diff)
    if loss_type == "l2":
        return diff * diff
    if loss_type == "huber":
        adiff = ops.abs(diff)
        return ops.where(adiff < 1.0, 0.5 * diff * diff, adiff - 0.5)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def noise_loss(predicted, target, loss_type="huber"):
    """Mean loss between predicted and true noise (or any target): l1, l2 (Eq. 14) or huber."""
    return elementwise_loss(predicted - target, loss_type).mean()


def weighted_loss(predicted, target, weight, loss_type="huber"):
    """Mean over the batch of weight[n] * (mean loss of sample n); weight is a [N] Tensor."""
    per_sample = elementwise_loss(predicted - target, loss_type).reshape((predicted.shape[0], -1)).mean(1)
    return (per_sample * weight).mean()


# ----- prediction objectives (Salimans & Ho 2022, Sec. 4 and Appendix D) -----


def v_target(sched, x_start, t, noise):
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
    return (extract(sched.tensors["sqrt_alphas_cumprod"], t, x_start.shape) * noise
            - extract(sched.tensors["sqrt_one_minus_alphas_cumprod"], t, x_start.shape) * x_start)


def training_target(sched, x_start, t, noise, prediction_type="eps"):
    """What the network learns to output: eps, x_0 or v."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x_start
    if prediction_type == "v":
        return v_target(sched, x_start, t, noise)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(snr, prediction_type="eps", gamma=5.0):
    """Min-SNR-gamma loss weights (Hang et al. 2023, Sec. 3.4), float64 [T] from the SNR per timestep.

    The x_0-loss weight is min(SNR, gamma); the same weighting of an eps-MSE is min(SNR, gamma) / SNR
    (||eps - eps_hat||^2 = SNR ||x_0 - x_0_hat||^2), of a v-MSE min(SNR, gamma) / (SNR + 1)
    (||v - v_hat||^2 = (SNR + 1) ||x_0 - x_0_hat||^2).
    """
    snr = np.asarray(snr, dtype=np.float64)
    clipped = np.minimum(snr, gamma)
    if prediction_type == "x0":
        return clipped
    if prediction_type == "v":
        return clipped / (snr + 1.0)
    if prediction_type == "eps":
        if np.any(snr <= 0):
            raise ValueError("min-SNR weights of an eps loss are undefined at SNR = 0 (zero terminal SNR): "
                             "use prediction_type x0 or v")
        return clipped / snr
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def loss_weights(sched, prediction_type="eps", weighting="none", gamma=5.0):
    """The [T] float32 Tensor of per-timestep loss weights for p_losses, or None (unweighted)."""
    if weighting == "none":
        return None
    if weighting == "min_snr":
        return Tensor(min_snr_weights(sched.snr, prediction_type, gamma), ms.float32)
    raise ValueError(f"unknown loss_weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def self_condition_estimate(model, sched, x_noisy, t, y, mask, prediction_type="eps"):
    """The self-conditioning input of a training step (Chen, Zhang & Hinton 2022, "Analog Bits", Sec. 3).

    The network's own x_0 estimate from (x_t, zeros), without gradient, clipped to [-1, 1] as the
    samplers clip theirs, times ``mask`` ([N] of 0/1: 1 where the sample is self-conditioned, 0
    where it gets zeros, as at the first sampling step).
    """
    first = model(x_noisy, t, y, ops.zeros_like(x_noisy))
    _, x0 = model_output_to_eps_x0(sched, x_noisy, t, first.astype(ms.float32), prediction_type)
    x0 = ops.stop_gradient(ops.clamp(x0, -1.0, 1.0))
    return x0 * mask.astype(x0.dtype).reshape((x0.shape[0],) + (1,) * (x0.ndim - 1))


def p_losses(model, sched, x_start, t, noise, loss_type="huber", y=None, prediction_type="eps", weights=None,
             self_cond_mask=None):
    """Algorithm 1, one step: the loss between the network's output and its target.

    The target is eps (Ho et al.), x_0 or v (see :func:`training_target`); ``weights`` (a [T]
    Tensor from :func:`loss_weights`, e.g. min-SNR) weights each sample's loss by its timestep.
    As in :func:`q_sample`, x_start / t / noise (and class labels y) may be NumPy arrays:
    they are converted to float32 / int32 / float32 (int32) Tensors before the model sees them.
    ``self_cond_mask`` ([N] of 0/1, for a model with self-conditioning): the network is called a
    second time, with :func:`self_condition_estimate` as its second input (zeros where the mask is 0).
    """
    x_start, t, noise = as_inputs(x_start, t, noise)
    y = as_tensor(y, ms.int32)
    x_noisy = q_sample(sched, x_start, t, noise)
    if self_cond_mask is not None:
        self_cond_mask = as_tensor(self_cond_mask, ms.float32)
        x_self_cond = self_condition_estimate(model, sched, x_noisy, t, y, self_cond_mask, prediction_type)
        predicted = model(x_noisy, t, y, x_self_cond)
    else:
        predicted = model(x_noisy, t) if y is None else model(x_noisy, t, y)
    target = training_target(sched, x_start, t, noise, prediction_type)
    if weights is None:
        return noise_loss(predicted.astype(ms.float32), target, loss_type)
    return weighted_loss(predicted.astype(ms.float32), target, ops.gather(weights, t, 0), loss_type)


def classifier_free_guidance(eps_cond, eps_uncond, w):
    """Ho & Salimans 2022, Eq. 6: eps = (1 + w) eps(x, c) - w eps(x, null); w = 0 is the conditional model."""
    return (1.0 + w) * eps_cond - w * eps_uncond


# ----- reverse process: scalar coefficients for one timestep index t (Python int) -----


def predict_start_from_noise(sched, x_t, t, eps):
    """Eq. 4 solved for x_0: x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps."""
    return float(sched.sqrt_recip_alphas_cumprod[t]) * x_t - float(sched.sqrt_recipm1_alphas_cumprod[t]) * eps


def predict_noise_from_start(sched, x_t, t, x0):
    """Eq. 4 solved for eps: (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t) (finite at alpha_bar_t = 0)."""
    return (x_t - float(sched.sqrt_alphas_cumprod[t]) * x0) / float(sched.sqrt_one_minus_alphas_cumprod[t])


def model_output_to_eps_x0(sched, x_t, t, out, prediction_type="eps"):
    """The network output at timestep index t as the pair (eps, x_0) that every sampler uses.

    eps: x_0 by Eq. 4; x0: eps by Eq. 4; v (Salimans & Ho 2022, Eq. 5 and Appendix D):
    x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v.
    Each is affine in ``out`` with an x_t-coefficient that does not depend on it, so a
    classifier-free-guidance combination of outputs (weights summing to 1) is the same
    combination of the eps (and x_0) it converts to. ``t`` is an int (the samplers: float64
    coefficients rounded once) or a [N] int Tensor, one index per sample (training's
    self-conditioning, inside the compiled step: the float32 coefficients of ``sched.tensors``).
    """
    if isinstance(t, Tensor):
        return _batch_eps_x0(sched, x_t, t, out, prediction_type)
    if prediction_type == "eps":
        return out, predict_start_from_noise(sched, x_t, t, out)
    if prediction_type == "x0":
        return predict_noise_from_start(sched, x_t, t, out), out
    if prediction_type == "v":
        a, s = float(sched.sqrt_alphas_cumprod[t]), float(sched.sqrt_one_minus_alphas_cumprod[t])
        return s * x_t + a * out, a * x_t - s * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def _batch_eps_x0(sched, x_t, t, out, prediction_type):
    """:func:`model_output_to_eps_x0` for a [N] Tensor of timestep indices t (graph-safe)."""

    def coef(name):
        return extract(sched.tensors[name], t, x_t.shape)

    if prediction_type == "eps":
        return out, coef("sqrt_recip_alphas_cumprod") * x_t - coef("sqrt_recipm1_alphas_cumprod") * out
    if prediction_type == "x0":
        return (x_t - coef("sqrt_alphas_cumprod") * out) / coef("sqrt_one_minus_alphas_cumprod"), out
    if prediction_type == "v":
        a, s = coef("sqrt_alphas_cumprod"), coef("sqrt_one_minus_alphas_cumprod")
        return s * x_t + a * out, a * x_t - s * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def q_posterior_mean(sched, x_start, x_t, t):
    """Eq. 7: mean of q(x_{t-1} | x_t, x_0)."""
    return float(sched.posterior_mean_coef1[t]) * x_start + float(sched.posterior_mean_coef2[t]) * x_t


def alpha_bar(sched, t):
    """alpha_bar at index t; 1 at t = -1 (the index after the last step of a chain: x_{-1} = x_0)."""
    return 1.0 if t < 0 else float(sched.alphas_cumprod[t])


def reverse_variance(sched, t, variance="posterior", t_next=None):
    """sigma^2 of p(x_t' | x_t) for the step from index t to t' = t_next (default t - 1: a step of the schedule).

    "beta": beta'_t = 1 - abar_t / abar_t' (Sec. 3.2: sigma_t^2 = beta_t); "posterior": the variance of
    q(x_t' | x_t, x_0), beta~'_t = (1 - abar_t') / (1 - abar_t) beta'_t (Eq. 7: sigma_t^2 = beta~_t).
    For t' = t - 1 these are beta_t and beta~_t (the stored betas / posterior_variance up to float64
    rounding); for a longer step, those of the respaced chain (Nichol & Dhariwal 2021, Sec. 4). This is
    the one variance rule of the DDPM sampler; sqrt(beta~'_t) is DDIM's sigma (Song et al. 2021, Eq. 16) at eta = 1.
    """
    a_t, a_next = alpha_bar(sched, t), alpha_bar(sched, t - 1 if t_next is None else t_next)
    beta = 1.0 - a_t / a_next
    if variance == "posterior":
        return (1.0 - a_next) / (1.0 - a_t) * beta
    if variance == "beta":
        return beta
    raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCE_TYPES)}")


def p_mean(sched, x_t, t, eps, clip_denoised=True, x0=None):
    """Mean of p_theta(x_{t-1} | x_t) and the predicted x_0 (from eps unless given).

    With clip_denoised=False this equals Eq. 11; with clipping, x_0 is clipped to
    [-1, 1] before the posterior mean (Eq. 7) is taken.
    """
    if x0 is None:
        x0 = predict_start_from_noise(sched, x_t, t, eps)
    if clip_denoised:
        x0 = ops.clamp(x0, -1.0, 1.0)
    return q_posterior_mean(sched, x0, x_t, t), x0


def p_sample(sched, x_t, t, eps, noise, variance="posterior", clip_denoised=True, x0=None):
    """Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z (no noise at t = 0); x0 as in p_mean."""
    mean, x0 = p_mean(sched, x_t, t, eps, clip_denoised, x0)
    if t == 0:
        return mean, x0
    return mean + float(np.sqrt(reverse_variance(sched, t, variance))) * noise, x0
