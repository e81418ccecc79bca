"""Variance (beta) schedules, as float64 NumPy arrays of length T.

- linear: Ho et al. 2020, Sec. 4 (beta_1 = 1e-4 ... beta_T = 0.02 for T = 1000).
- cosine: Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
  beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at 0.999.
- quadratic: betas linear in sqrt(beta) (as in the annotated-diffusion tutorial).
- sigmoid: betas follow a sigmoid over [-6, 6] between beta_start and beta_end.

Any of them can be rescaled to a zero terminal SNR (Lin et al. 2024, "Common Diffusion
Noise Schedules and Sample Steps are Flawed", Algorithm 1): alpha_bar_T = 0 exactly.
"""

import numpy as np

from ddpm_ms.diffusion import SCHEDULES  # defined MindSpore-free there, for ddpm_ms.config


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999):
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, max_beta)


def quadratic_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    return np.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=np.float64) ** 2


def sigmoid_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    x = np.linspace(-6.0, 6.0, timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024, Algorithm 1: shift sqrt(alpha_bar) so its last value is 0 and scale it so
    its first value is unchanged (a linear map of sqrt(alpha_bar)), then recompute the betas.
    The last beta becomes 1 (alpha_bar_T = 0: x_T is pure noise)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    if len(sqrt_abar) < 2 or not first > last:
        raise ValueError("a zero-terminal-SNR rescale needs at least 2 timesteps with decreasing alpha_bar")
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def make_beta_schedule(name, timesteps, beta_start=1e-4, beta_end=0.02):
    """Betas for schedule ``name``; beta_start/beta_end are ignored by ``cosine``."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if name == "cosine":
        return cosine_beta_schedule(timesteps)
    makers = {
        "linear": linear_beta_schedule,
        "quadratic": quadratic_beta_schedule,
        "sigmoid": sigmoid_beta_schedule,
    }
    if name not in makers:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return makers[name](timesteps, beta_start, beta_end)
