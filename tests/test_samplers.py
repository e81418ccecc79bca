"""Sampler tests against closed forms: no hard-coded outputs.

The data distribution is N(mu, s^2) per pixel, for which the optimal noise predictor
and the probability-flow ODE are known exactly (tests/gaussian.py). The schedule is
the linear one of Ho et al. (T = 1000, abar_T ~ 4e-5) so x_T is pure noise.
"""

import functools

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
import numpy as np
import pytest
from mindspore import Tensor

from ddpm_ms.diffusion.gaussian import NonFiniteError, Schedule, model_output_to_eps_x0, p_sample, reverse_variance
from ddpm_ms.diffusion.samplers import (
    SAMPLERS,
    ddim_mean,
    ddim_sigma,
    denoised,
    dpm_solver_pp_step,
    initial_noise,
    sample,
    sampler_timesteps,
    timestep_sequence,
)

try:
    from gaussian import GaussianEps
except ImportError:  # tests/ imported as a package
    from tests.gaussian import GaussianEps

MU, S = -0.4, 0.5
SHAPE = (4096, 1, 4, 4)  # 65,536 pixels: sampling error of the mean ~0.002, of the std ~0.0014
TOL = 0.01


@functools.lru_cache(maxsize=None)
def linear_schedule(T=1000):
    return Schedule.from_config("linear", T)


@functools.lru_cache(maxsize=None)
def gaussian_eps():
    return GaussianEps(linear_schedule(), MU, S)


@functools.lru_cache(maxsize=None)
def gaussian_run(sampler, steps, seed=0, shape=SHAPE, variance="posterior", eta=0.0, spacing="uniform"):
    """float64 NumPy samples for the Gaussian data, clip_denoised=False."""
    out = sample(gaussian_eps(), linear_schedule(), shape, sampler, steps, eta=eta, seed=seed,
                 clip_denoised=False, variance=variance, spacing=spacing, progress=False)
    return out.asnumpy().astype(np.float64)


def exact_ode(seed=0, shape=SHAPE):
    """The probability-flow ODE solution from the sampler's own x_T (its first draw)."""
    x_T = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return gaussian_eps().ode_map(x_T, linear_schedule().num_timesteps - 1)


def std_err(x):
    return abs(x.std() - S)


def mean_err(x):
    return abs(x.mean() - MU)


def tensor(a):
    return Tensor(np.asarray(a, dtype=np.float32))


# ----- timestep_sequence -----


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_timestep_sequence_properties(spacing):
    cases = [(T, n) for T in (1, 2, 3, 7, 20) for n in range(1, T + 1)]
    cases += [(1000, n) for n in (1, 2, 3, 10, 20, 50, 100, 250, 500, 999, 1000)]
    for T, n in cases:
        seq = timestep_sequence(T, n, spacing)
        assert len(seq) == n and len(np.unique(seq)) == n, (T, n)
        assert np.all(np.diff(seq) < 0), (T, n, seq)
        assert seq[0] == T - 1 and seq.min() >= 0, (T, n)
        if n >= 2:
            assert seq[-1] == 0, (T, n)
        if n == T:
            np.testing.assert_array_equal(seq, np.arange(T)[::-1])


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_sampler_timesteps(spacing):
    for n in (1, 2, 10, 999, 1000):
        for sampler in SAMPLERS:
            seq = sampler_timesteps(1000, n, sampler, spacing)
            assert len(seq) == n and seq[0] == 999 and np.all(np.diff(seq) < 0)
            if sampler != "dpm-solver++" or n == 1000:
                np.testing.assert_array_equal(seq, timestep_sequence(1000, n, spacing))
            else:  # no evaluation at t = 0: the last step goes from seq[-1] to alpha_bar = 1
                np.testing.assert_array_equal(seq, timestep_sequence(1000, n + 1, spacing)[:-1])
    np.testing.assert_array_equal(sampler_timesteps(1000, None, "ddim"), np.arange(1000)[::-1])


def test_quadratic_spacing_is_dense_near_zero():
    uni, quad = timestep_sequence(1000, 20, "uniform"), timestep_sequence(1000, 20, "quadratic")
    assert quad[-2] < uni[-2]  # small first step from t = 0
    assert quad[0] - quad[1] > uni[0] - uni[1]  # big steps at high noise


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
def test_timestep_sequence_invalid_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(1000, steps)


def test_invalid_arguments():
    sched, eps = linear_schedule(), gaussian_eps()
    with pytest.raises(ValueError, match="spacing"):
        timestep_sequence(1000, 10, "cubic")
    with pytest.raises(ValueError, match="sampler"):
        sample(eps, sched, (1, 1, 2, 2), "euler", 10, progress=False)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            sample(eps, sched, (1, 1, 2, 2), "ddim", 10, eta=eta, progress=False)
    with pytest.raises(ValueError, match="eta"):
        sample(eps, sched, (1, 1, 2, 2), "dpm-solver++", 10, eta=2.0, progress=False)
    with pytest.raises(ValueError, match="variance"):
        sample(eps, sched, (1, 1, 2, 2), "ddpm", 10, variance="learned", progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(eps, sched, (1, 1, 2, 2), "ddim", 0, progress=False)


# ----- single steps against the papers' formulas -----


def ddpm_reference(betas, x_t, t, eps, z, variance):
    """Ho et al. Eq. 11 + Algorithm 2 line 4 in float64, from the betas alone (0-based t)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = abar[t - 1] if t > 0 else 1.0
    mean = (x_t - betas[t] / np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(alphas[t])
    var = betas[t] if variance == "beta" else (1.0 - abar_prev) / (1.0 - abar[t]) * betas[t]
    return mean + (np.sqrt(var) * z if t > 0 else 0.0)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_ddpm_step_matches_eq11(variance, t):
    sched = linear_schedule()
    rng = np.random.default_rng(t)
    x_t, eps, z = (rng.standard_normal((8, 1, 3, 3)).astype(np.float32) for _ in range(3))
    got, _ = p_sample(sched, tensor(x_t), t, tensor(eps), tensor(z), variance, clip_denoised=False)
    want = ddpm_reference(sched.betas.copy(), x_t.astype(np.float64), t, eps.astype(np.float64),
                          z.astype(np.float64), variance)
    np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_ddpm_step_clipping_clamps_x0():
    sched, t = linear_schedule(), 300
    betas = sched.betas.copy()
    abar = np.cumprod(1.0 - betas)
    rng = np.random.default_rng(1)
    x_t, eps = 3.0 * rng.standard_normal((2, 1, 8, 8)), rng.standard_normal((2, 1, 8, 8))
    x0 = (x_t - np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(abar[t])
    assert np.abs(x0).max() > 1.5  # the test needs out-of-range predictions
    mean, x0_got = p_sample(sched, tensor(x_t), t, tensor(eps), tensor(np.zeros_like(x_t)),
                            "posterior", clip_denoised=True)
    x0_clip = np.clip(x0, -1.0, 1.0)
    np.testing.assert_allclose(x0_got.asnumpy(), x0_clip, atol=1e-5)
    # Eq. 7 with the clipped x_0, from the betas
    coef1 = betas[t] * np.sqrt(abar[t - 1]) / (1.0 - abar[t])
    coef2 = (1.0 - abar[t - 1]) * np.sqrt(1.0 - betas[t]) / (1.0 - abar[t])
    np.testing.assert_allclose(mean.asnumpy(), coef1 * x0_clip + coef2 * x_t, atol=1e-5)


def test_ddim_eta1_sigma_is_posterior_variance():
    sched = linear_schedule()
    sigma2 = np.array([ddim_sigma(sched, t, t - 1, 1.0) ** 2 for t in range(sched.num_timesteps)])
    np.testing.assert_allclose(sigma2[1:], sched.posterior_variance[1:], rtol=1e-10)
    assert sigma2[0] == 0.0 and sched.posterior_variance[0] == 0.0
    assert all(ddim_sigma(sched, t, t - 1, 0.0) == 0.0 for t in (0, 5, 999))


def test_reverse_variance_of_a_one_index_step_is_beta_and_beta_tilde():
    """The one variance rule, from alpha_bar, gives Ho et al.'s beta_t and beta~_t for t -> t - 1."""
    sched = linear_schedule()
    ts = range(1, sched.num_timesteps)
    np.testing.assert_allclose([reverse_variance(sched, t, "beta") for t in ts], sched.betas[1:], rtol=1e-10)
    np.testing.assert_allclose([reverse_variance(sched, t, "posterior", t - 1) for t in ts],
                               sched.posterior_variance[1:], rtol=1e-10)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_ddim_eta1_step_equals_ddpm_posterior_step(t, clip):
    sched = linear_schedule()
    rng = np.random.default_rng(100 + t)
    x_t, eps, z = (tensor(2.0 * rng.standard_normal((8, 1, 3, 3))) for _ in range(3))
    want, want_x0 = p_sample(sched, x_t, t, eps, z, "posterior", clip_denoised=clip)
    sigma = ddim_sigma(sched, t, t - 1, 1.0)
    eps, got_x0 = denoised(sched, x_t, t, eps, "eps", clip)  # x_0 clipped and eps recomputed as the loop does
    got = ddim_mean(sched, t - 1, eps, got_x0, sigma) + sigma * z  # Eq. 12
    np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_x0.asnumpy(), want_x0.asnumpy(), atol=1e-5, rtol=1e-6)


def test_dpm_solver_pp_first_order_step_is_ddim():
    sched = linear_schedule()
    rng = np.random.default_rng(7)
    x_t, eps = tensor(rng.standard_normal((4, 1, 3, 3))), tensor(rng.standard_normal((4, 1, 3, 3)))
    for t, t_next in ((999, 899), (500, 0), (40, -1)):
        _, x0 = denoised(sched, x_t, t, eps, "eps", clip_denoised=False)
        ddim = ddim_mean(sched, t_next, eps, x0)  # Eq. 12 with eta = 0
        dpm = dpm_solver_pp_step(sched, x_t, t, t_next, x0)
        np.testing.assert_allclose(dpm.asnumpy(), ddim.asnumpy(), atol=1e-5, rtol=1e-5)


def test_dpm_solver_pp_second_order_local_error_is_cubic():
    """For x_theta linear in lambda the exact solution of the data-prediction ODE is known;
    the 2M step's local error shrinks ~8x per halving of h, the first-order step's ~4x."""
    sched = linear_schedule()
    lam = lambda t: 0.5 * np.log(sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t]))  # noqa: E731
    sig = lambda t: np.sqrt(1 - sched.alphas_cumprod[t])  # noqa: E731
    c0, c1, x_t = 0.3, -0.2, 0.7  # x_theta(lambda) = c0 + c1 * lambda
    F = lambda lam: np.exp(lam) * (c0 + c1 * (lam - 1.0))  # antiderivative of e^lam (c0 + c1 lam)  # noqa: E731
    errors = {1: [], 2: []}
    for k in (80, 40, 20):
        t_prev, t, t_next = 500 + k, 500, 500 - k
        # x_t' = (sigma'/sigma) x_t + sigma' * int_{lam_t}^{lam_t'} e^l x_theta(l) dl
        exact = sig(t_next) / sig(t) * x_t + sig(t_next) * (F(lam(t_next)) - F(lam(t)))
        x0, x0_prev = c0 + c1 * lam(t), c0 + c1 * lam(t_prev)
        first = dpm_solver_pp_step(sched, x_t, t, t_next, x0)
        second = dpm_solver_pp_step(sched, x_t, t, t_next, x0, x0_prev, t_prev)
        errors[1].append(abs(first - exact))
        errors[2].append(abs(second - exact))
    for order, lo, hi in ((1, 3.0, 5.0), (2, 6.0, 10.0)):
        ratios = np.array(errors[order][:-1]) / np.array(errors[order][1:])
        assert np.all((ratios > lo) & (ratios < hi)), (order, errors[order], ratios)
    assert np.all(np.array(errors[2]) < 0.1 * np.array(errors[1])), errors


# ----- whole chains on Gaussian data -----
# Few-step DDIM/DPM-Solver++ are biased here (see the module docstring of
# tests/gaussian.py: every DDIM step shrinks the spread by a factor < 1), so the
# few-step runs are checked against the exact result of the discretised chain, and
# against the data distribution only where the discretisation error is small.


def test_ddpm_full_chain_matches_data_distribution():
    x = gaussian_run("ddpm", None)
    assert mean_err(x) < TOL and std_err(x) < TOL, (x.mean(), x.std())


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_respaced_matches_closed_form_chain(variance):
    x = gaussian_run("ddpm", 50, variance=variance)
    ts = sampler_timesteps(1000, 50, "ddpm")
    mean, std = gaussian_eps().ddim_chain(ts, eta=1.0, noise="sigma" if variance == "posterior" else "beta")
    assert abs(x.mean() - mean) < TOL and abs(x.std() - std) < TOL, (x.mean(), mean, x.std(), std)
    assert mean_err(x) < TOL


def test_ddpm_respaced_is_ddim_eta1():
    sched, eps, small = linear_schedule(), gaussian_eps(), (16, 1, 2, 2)
    a = sample(eps, sched, small, "ddpm", 20, seed=5, clip_denoised=False, progress=False)
    b = sample(eps, sched, small, "ddim", 20, eta=1.0, seed=5, clip_denoised=False, progress=False)
    np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_ddim_eta_half_matches_closed_form_chain():
    x = gaussian_run("ddim", 20, eta=0.5)
    mean, std = gaussian_eps().ddim_chain(sampler_timesteps(1000, 20, "ddim"), eta=0.5)
    assert abs(x.mean() - mean) < TOL and abs(x.std() - std) < TOL, (x.mean(), mean, x.std(), std)


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_eta0_few_steps_is_the_exact_discrete_chain(steps):
    x = gaussian_run("ddim", steps)
    x_T = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    want = gaussian_eps().ddim_chain(sampler_timesteps(1000, steps, "ddim"), x_T=x_T)
    np.testing.assert_allclose(x, want, atol=2e-4)
    assert mean_err(x) < TOL, x.mean()


def test_ddim_eta0_std_error_shrinks_with_steps():
    errors = [std_err(gaussian_run("ddim", n)) for n in (10, 20, 50)]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_beats_ddim(steps, spacing):
    x = gaussian_run("dpm-solver++", steps, spacing=spacing)
    ddim, exact = gaussian_run("ddim", steps, spacing=spacing), exact_ode()
    assert mean_err(x) < TOL, x.mean()
    # same x_T: compare discretisation errors with and without the sampling noise
    assert abs(x.std() - exact.std()) < abs(ddim.std() - exact.std())
    assert std_err(x) < std_err(ddim)
    assert np.abs(x - exact).max() < np.abs(ddim - exact).max()


@pytest.mark.parametrize("steps,spacing,ode_tol", [(50, "uniform", 1e-2), (20, "quadratic", 5e-2)])
def test_dpm_solver_pp_matches_data_and_ode(steps, spacing, ode_tol):
    x = gaussian_run("dpm-solver++", steps, spacing=spacing)
    assert mean_err(x) < TOL and std_err(x) < TOL, (x.mean(), x.std())
    assert np.abs(x - exact_ode()).max() < ode_tol


def test_ddim_and_dpm_solver_pp_converge_to_probability_flow_ode():
    shape = (64, 1, 4, 4)
    exact = exact_ode(seed=3, shape=shape)
    errors = [np.abs(gaussian_run("ddim", n, seed=3, shape=shape) - exact).max() for n in (10, 50, 1000)]
    assert errors[-1] < 1e-2, errors
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    dpm = [np.abs(gaussian_run("dpm-solver++", n, seed=3, shape=shape) - exact).max() for n in (10, 20, 50)]
    assert all(a > b for a, b in zip(dpm, dpm[1:])), dpm
    assert dpm[-1] < 1e-2, dpm


# ----- determinism, callback, NaN -----


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("dpm-solver++", 0.0), ("ddpm", 0.0)])
def test_same_seed_is_bit_identical(sampler, eta):
    sched, eps = linear_schedule(), gaussian_eps()
    run = lambda **kw: sample(eps, sched, (8, 1, 4, 4), sampler, 10, eta=eta, progress=False,  # noqa: E731
                              **kw).asnumpy()
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, run(rng=np.random.default_rng(1)))


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 7), ("ddim", 7), ("dpm-solver++", 7)])
def test_x_T_from_initial_noise_is_the_seeded_run(sampler, steps):
    """generation.generate draws x_T with initial_noise from the rng it then passes on: the same run."""
    sched = Schedule.from_config("linear", 30)
    eps, shape = GaussianEps(sched, MU, S), (4, 1, 2, 2)
    a = sample(eps, sched, shape, sampler, steps, eta=0.5, seed=3, progress=False).asnumpy()
    rng = np.random.default_rng(3)
    x_T = Tensor(initial_noise(shape, rng))
    b = sample(eps, sched, shape, sampler, steps, eta=0.5, rng=rng, x_T=x_T, progress=False).asnumpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_eta_is_ignored_by_non_ddim_samplers(sampler):
    sched, eps = linear_schedule(), gaussian_eps()
    run = lambda eta: sample(eps, sched, (4, 1, 2, 2), sampler, 10, eta=eta, seed=2, progress=False)  # noqa: E731
    np.testing.assert_array_equal(run(0.0).asnumpy(), run(0.5).asnumpy())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_sees_every_step(sampler):
    sched = Schedule.from_config("linear", 30)
    eps = GaussianEps(sched, MU, S)
    for steps in (None, 7):
        calls = []

        def record(i, t, x, x0, calls=calls):
            calls.append((i, t, x.asnumpy(), x0.shape))

        out = sample(eps, sched, (2, 1, 2, 2), sampler, steps, progress=False, callback=record)
        ts = sampler_timesteps(30, steps, sampler)
        assert [c[0] for c in calls] == list(range(len(ts)))
        assert [c[1] for c in calls] == list(ts)
        assert all(c[3] == (2, 1, 2, 2) for c in calls)
        np.testing.assert_array_equal(calls[-1][2], out.asnumpy())


@pytest.mark.parametrize("variance,prediction_type", [("posterior", "eps"), ("beta", "v")])
def test_ddpm_full_chain_is_algorithm_2(variance, prediction_type):
    """The full chain run by the shared loop is Algorithm 2 of Ho et al. written out with p_sample:
    x_T first from the rng, then z per step for t = T-1 ... 1 (none at t = 0)."""
    sched = Schedule.from_config("linear", 30)
    net = GaussianEps(sched, MU, S).predictor(prediction_type)
    shape = (4, 1, 2, 2)
    got = sample(net, sched, shape, "ddpm", seed=9, variance=variance, prediction_type=prediction_type,
                 progress=False).asnumpy()
    rng = np.random.default_rng(9)
    x = tensor(rng.standard_normal(shape, dtype=np.float32))
    for t in range(29, -1, -1):
        out = net(x, Tensor(np.full((4,), t, dtype=np.int32)))
        eps, x0 = model_output_to_eps_x0(sched, x, t, out, prediction_type)
        z = tensor(rng.standard_normal(shape, dtype=np.float32)) if t > 0 else None
        x, _ = p_sample(sched, x, t, eps, z, variance, True, x0)
    np.testing.assert_array_equal(got, x.asnumpy())


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 5), ("ddim", 5), ("dpm-solver++", 5)])
def test_nan_from_model_raises_non_finite_error(sampler, steps, clip):
    sched = Schedule.from_config("linear", 30)
    calls = []

    def nan_eps(x, t):
        calls.append(t)
        return x * float("nan")

    with pytest.raises(NonFiniteError, match="model output .*NaN/inf values at timestep 29"):
        sample(nan_eps, sched, (2, 1, 2, 2), sampler, steps, clip_denoised=clip, progress=False)
    assert len(calls) == 1  # fails at the first step, not after the whole chain


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_late_inf_from_model_raises_despite_clipping(sampler):
    """inf only near t = 0 is hidden from x by the clipping of x_0 but still reported."""
    sched = Schedule.from_config("linear", 30)
    eps = GaussianEps(sched, MU, S)

    def late_inf_eps(x, t):
        out = eps(x, t)
        return out * float("inf") if int(t.asnumpy()[0]) < 3 else out

    with pytest.raises(NonFiniteError, match="model output .*NaN/inf"):
        sample(late_inf_eps, sched, (2, 1, 2, 2), sampler, None, clip_denoised=True, progress=False)


def test_gaussian_eps_per_sample_timesteps():
    """The test predictor gathers coefficients per sample when t differs across the batch."""
    sched, eps = linear_schedule(), gaussian_eps()
    x = np.random.default_rng(4).standard_normal((3, 1, 2, 2)).astype(np.float32)
    ts = np.array([0, 400, 999], dtype=np.int32)
    mixed = eps(tensor(x), Tensor(ts)).asnumpy()
    for i, t in enumerate(ts):
        one = eps(tensor(x[i:i + 1]), Tensor(ts[i:i + 1])).asnumpy()
        np.testing.assert_allclose(mixed[i:i + 1], one, rtol=1e-5, atol=1e-6)
        a, b = np.sqrt(sched.alphas_cumprod[t]), np.sqrt(1 - sched.alphas_cumprod[t])
        np.testing.assert_allclose(one, b * (x[i:i + 1] - a * MU) / (a * a * S * S + b * b), rtol=1e-5, atol=1e-6)
