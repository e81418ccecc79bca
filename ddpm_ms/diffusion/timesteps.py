"""Which noise levels a training step sees: the density of the timestep t, and stratified draws.

Algorithm 1 of Ho et al. 2020 draws t uniformly. Two later papers found that a density which
favours the middle noise levels trains faster; both are normal densities over the log
signal-to-noise ratio lambda_t = log(abar_t / (1 - abar_t)):

- ``log_normal`` (Karras et al. 2022, "EDM", Sec. 5 and Table 1): ln sigma ~ N(P_mean, P_std^2)
  with sigma^2 = (1 - abar) / abar = 1 / SNR, so lambda = -2 ln sigma ~ N(-2 P_mean, (2 P_std)^2).
  Their Table 2, config E, uses P_mean = -1.2, P_std = 1.2 (the defaults of ``timestep_mean`` /
  ``timestep_std`` here).
- ``logit_normal`` (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 3.1): the
  rectified-flow time s in (0, 1) with logit(s) ~ N(m, s^2); there x_s = (1 - s) x_0 + s eps, so
  SNR = ((1 - s) / s)^2 and lambda = -2 logit(s) ~ N(-2 m, (2 s)^2). Their best setting
  (Table 1) is m = 0, s = 1 (the defaults here).

The model has T discrete timesteps, so the density is discretised: timestep t gets the normal's
probability mass of the interval of lambda between the midpoints to its neighbours (the first
and last intervals open-ended), see :func:`timestep_probabilities`.

The loss of a batch, mean_i w(t_i) L(t_i) with t_i ~ p (w: the loss weighting, e.g. min-SNR),
is then an unbiased estimate of sum_t p(t) w(t) E[L(t)]: the uniform-t objective with every
timestep weighted by T p(t) w(t). A density and min-SNR multiply.

``stratified_timesteps`` (Kingma et al. 2021, "Variational Diffusion Models", Appendix I.1,
their low-discrepancy sampler): instead of B independent uniforms u_i, one u in each of the B
strata [k/B, (k+1)/B), in random order; t_i is the inverse CDF of u_i. Each t_i still has
density p (the estimate stays unbiased) but the batch covers the noise levels evenly, which
lowers the variance of the loss estimate at no cost.
"""

import math

import numpy as np

from ddpm_ms.diffusion import TIMESTEP_SAMPLINGS

# (mean, std) in each density's own units when the config leaves them unset
DEFAULT_PARAMETERS = {"logit_normal": (0.0, 1.0), "log_normal": (-1.2, 1.2)}


def log_snr(alphas_cumprod):
    """lambda_t = log(abar_t / (1 - abar_t)) for every timestep (float64; -inf where abar_t = 0)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log1p(-a)


def log_snr_normal(sampling, mean=None, std=None):
    """(mu, s) of the normal over lambda that ``sampling`` with its parameters (module docstring) means."""
    default_mean, default_std = DEFAULT_PARAMETERS[sampling]
    mean = default_mean if mean is None else float(mean)
    std = default_std if std is None else float(std)
    return -2.0 * mean, 2.0 * std  # lambda = -2 logit(s) or -2 ln sigma


def _normal_cdf(z):
    return 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in np.ravel(z)]).reshape(np.shape(z))


def timestep_probabilities(alphas_cumprod, sampling="uniform", mean=None, std=None):
    """[T] float64 probabilities of each timestep index (sum 1) under ``sampling``.

    uniform: 1/T. logit_normal / log_normal: the normal N(mu, s^2) over lambda (:func:`log_snr_normal`)
    integrated over each timestep's interval of lambda, bounded by the midpoints between neighbouring
    lambda_t (lambda falls with t; t = 0 takes everything above, t = T-1 everything below).
    """
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep_sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    lam = log_snr(alphas_cumprod)
    T = len(lam)
    if sampling == "uniform":
        return np.full(T, 1.0 / T)
    mu, s = log_snr_normal(sampling, mean, std)
    with np.errstate(invalid="ignore"):  # -inf + finite at a zero terminal SNR
        mids = 0.5 * (lam[:-1] + lam[1:])
    upper = np.concatenate([[np.inf], mids])  # interval of t: (lower_t, upper_t]
    lower = np.concatenate([mids, [-np.inf]])
    cdf_upper, cdf_lower = _normal_cdf((upper - mu) / s), _normal_cdf((lower - mu) / s)
    probs = np.clip(cdf_upper - cdf_lower, 0.0, None)
    return probs / probs.sum()


def stratified_uniforms(rng, batch):
    """``batch`` uniforms in [0, 1), one in each stratum [k/B, (k+1)/B), in random order."""
    return (rng.permutation(batch) + rng.random(batch)) / batch


class TimestepSampler:
    """Draws the timesteps of a training batch from the config's density (module docstring).

    ``draw(rng, batch)`` -> int32 [batch]. With the uniform density and no stratification it is
    exactly ``rng.integers(0, T, batch)``, the draw of Algorithm 1 (so runs from before these
    options are unchanged bit for bit).
    """

    def __init__(self, alphas_cumprod, sampling="uniform", mean=None, std=None, stratified=False):
        self.num_timesteps = len(alphas_cumprod)
        self.sampling, self.stratified = sampling, bool(stratified)
        self.probs = timestep_probabilities(alphas_cumprod, sampling, mean, std)
        self.cdf = np.cumsum(self.probs)
        self.cdf[-1] = 1.0

    @classmethod
    def from_config(cls, sched, cfg):
        return cls(sched.alphas_cumprod, cfg["timestep_sampling"], cfg["timestep_mean"], cfg["timestep_std"],
                   cfg["stratified_timesteps"])

    def from_uniforms(self, u):
        """The inverse CDF: the timestep index of each u in [0, 1)."""
        idx = np.searchsorted(self.cdf, np.asarray(u, dtype=np.float64), side="right")
        return np.minimum(idx, self.num_timesteps - 1).astype(np.int32)

    def draw(self, rng, batch):
        if self.sampling == "uniform" and not self.stratified:
            return rng.integers(0, self.num_timesteps, size=(batch,)).astype(np.int32)
        u = stratified_uniforms(rng, batch) if self.stratified else rng.random(batch)
        return self.from_uniforms(u)
