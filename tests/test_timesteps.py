"""The density of the training timesteps and stratified draws (ddpm_ms.diffusion.timesteps)."""

import numpy as np
import pytest

from ddpm_ms.config import load_config
from ddpm_ms.diffusion.schedules import make_beta_schedule
from ddpm_ms.diffusion.timesteps import TimestepSampler, log_snr, log_snr_normal, stratified_uniforms, \
    timestep_probabilities

T = 1000
ABAR = np.cumprod(1.0 - make_beta_schedule("linear", T, 1e-4, 0.02))


def chi_square_bound(counts, probs, sigmas=6.0):
    """(statistic, bound): Pearson's chi-square of ``counts`` against ``probs`` (bins with an expected count
    below 5 merged into their neighbours) and mean + ``sigmas`` standard deviations of its distribution."""
    n = counts.sum()
    expected, observed, e_acc, o_acc = [], [], 0.0, 0
    for e, o in zip(probs * n, counts):
        e_acc, o_acc = e_acc + e, o_acc + o
        if e_acc >= 5:
            expected.append(e_acc), observed.append(o_acc)
            e_acc, o_acc = 0.0, 0
    expected[-1] += e_acc
    observed[-1] += o_acc
    expected, observed = np.array(expected), np.array(observed)
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    return stat, dof + sigmas * np.sqrt(2 * dof)


@pytest.mark.parametrize("sampling", ["logit_normal", "log_normal"])
def test_the_discrete_density_is_the_normal_over_log_snr_rounded_to_the_nearest_timestep(sampling):
    """Monte Carlo reference: lambda ~ N(mu, s^2) assigned to the timestep with the nearest lambda_t."""
    mu, s = log_snr_normal(sampling)
    probs = timestep_probabilities(ABAR, sampling)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12) and (probs >= 0).all()
    lam = log_snr(ABAR)
    draws = np.random.default_rng(0).normal(mu, s, 400_000)
    order = np.argsort(lam)  # ascending lambda: descending t
    pos = np.clip(np.searchsorted(lam[order], draws), 1, T - 1)
    left, right = order[pos - 1], order[pos]
    nearest = np.where(np.abs(draws - lam[left]) <= np.abs(draws - lam[right]), left, right)
    stat, bound = chi_square_bound(np.bincount(nearest, minlength=T), probs)
    assert stat < bound, (stat, bound)


def test_the_papers_parameters_in_log_snr():
    # EDM: ln sigma ~ N(-1.2, 1.2^2), sigma^2 = 1/SNR; SD3: logit(s) ~ N(0, 1), SNR = ((1 - s)/s)^2
    assert log_snr_normal("log_normal") == pytest.approx((2.4, 2.4))
    assert log_snr_normal("logit_normal") == pytest.approx((0.0, 2.0))
    assert log_snr_normal("log_normal", 0.5, 2.0) == pytest.approx((-1.0, 4.0))
    # the discretised density's mean and std of lambda are the normal's (it lies well inside the schedule's range)
    for sampling in ("log_normal", "logit_normal"):
        probs, lam = timestep_probabilities(ABAR, sampling), log_snr(ABAR)
        mean = (probs * lam).sum()
        std = np.sqrt((probs * (lam - mean) ** 2).sum())
        mu, s = log_snr_normal(sampling)
        assert mean == pytest.approx(mu, abs=0.02) and std == pytest.approx(s, rel=0.01)


@pytest.mark.parametrize("sampling", ["uniform", "log_normal", "logit_normal"])
@pytest.mark.parametrize("stratified", [False, True])
def test_draws_follow_the_configured_density(sampling, stratified):
    sampler = TimestepSampler(ABAR, sampling, stratified=stratified)
    rng = np.random.default_rng(1)
    t = np.concatenate([sampler.draw(rng, 64) for _ in range(3000)])
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T
    stat, bound = chi_square_bound(np.bincount(t, minlength=T), sampler.probs)
    assert stat < bound, (stat, bound)
    if sampling != "uniform":  # and it is not the uniform density
        assert chi_square_bound(np.bincount(t, minlength=T), np.full(T, 1.0 / T))[0] > 10 * bound


def test_stratified_draws_put_one_t_in_each_equal_probability_stratum():
    rng = np.random.default_rng(2)
    for batch in (1, 7, 64):
        u = stratified_uniforms(rng, batch)
        assert sorted(np.floor(u * batch).astype(int)) == list(range(batch))
    # in t: B = 8 strata of the uniform density are 8 runs of 125 timesteps
    sampler = TimestepSampler(ABAR, "uniform", stratified=True)
    for _ in range(20):
        assert sorted(sampler.draw(rng, 8) // 125) == list(range(8))
    # a non-uniform density: the k-th smallest t is the inverse CDF of a u in [k/B, (k+1)/B), so its CDF
    # interval [F(t-1), F(t)) meets that stratum
    sampler = TimestepSampler(ABAR, "log_normal", stratified=True)
    cdf_low = np.concatenate([[0.0], sampler.cdf[:-1]])
    for _ in range(20):
        t = np.sort(sampler.draw(rng, 16))
        k = np.arange(16)
        assert (cdf_low[t] <= (k + 1) / 16).all() and (sampler.cdf[t] >= k / 16).all(), t


def test_stratified_draws_lower_the_variance_of_the_batch_mean():
    """The point of stratification: the batch's mean of f(t) (any smooth per-t loss) varies less."""
    f = np.sqrt(np.arange(T, dtype=np.float64))
    rng = np.random.default_rng(3)
    plain, strat = (TimestepSampler(ABAR, "log_normal", stratified=s) for s in (False, True))
    var_plain = np.var([f[plain.draw(rng, 32)].mean() for _ in range(2000)])
    var_strat = np.var([f[strat.draw(rng, 32)].mean() for _ in range(2000)])
    assert var_strat < 0.2 * var_plain, (var_strat, var_plain)


def test_uniform_unstratified_is_algorithm_1s_draw_bit_for_bit():
    sampler = TimestepSampler(ABAR)
    a, b = np.random.default_rng([0, 5, 0]), np.random.default_rng([0, 5, 0])
    assert np.array_equal(sampler.draw(a, 64), b.integers(0, T, size=(64,)).astype(np.int32))
    assert np.array_equal(a.standard_normal(4), b.standard_normal(4))  # the noise draw after it is unchanged


def test_a_zero_terminal_snr_schedule_keeps_a_finite_density():
    from ddpm_ms.diffusion.schedules import rescale_zero_terminal_snr

    betas = rescale_zero_terminal_snr(make_beta_schedule("linear", T, 1e-4, 0.02))
    abar = np.cumprod(1.0 - betas)
    assert abar[-1] == 0.0
    probs = timestep_probabilities(abar, "logit_normal")
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0) and probs[-1] < 1e-3


def test_config_checks_and_the_trainer_uses_the_density():
    from ddpm_ms.utils.errors import UserError

    with pytest.raises(UserError, match="timestep_mean"):
        load_config(None, ["timestep_std=1.0"])
    with pytest.raises(UserError, match="timestep_sampling"):
        load_config(None, ["timestep_sampling=beta"])
    cfg = load_config(None, ["timestep_sampling=log_normal", "timestep_mean=0.5", "stratified_timesteps=true"])
    sampler = TimestepSampler.from_config(type("S", (), {"alphas_cumprod": ABAR})(), cfg)
    assert sampler.stratified and np.allclose(sampler.probs, timestep_probabilities(ABAR, "log_normal", 0.5, 1.2))
