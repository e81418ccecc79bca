"""Variance (beta) schedules, as float64 NumPy arrays of length T.

- linear: Ho et al. 2020, Sec. 4 (beta_1 = 1e-4 ... beta_T = 0.02 for T = 1000).
- cosine: Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
  beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at 0.999.
- quadratic: betas linear in sqrt(beta) (as in the annotated-diffusion tutorial).
- sigmoid: betas follow a sigmoid over [-6, 6] between beta_start and beta_end.
"""

import numpy as np

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")


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
