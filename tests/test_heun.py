"""The heun sampler (Karras et al. 2022, "EDM", Algorithms 1 and 2) against closed forms.

The data is N(mu, s^2) per pixel (tests/gaussian.py). In EDM's variables, sigma_t = sqrt((1 - abar_t) / abar_t)
and y = x / sqrt(abar_t), y ~ N(mu, s^2 + sigma^2), the optimal denoiser is D(y; sigma) = mu + s^2 (y - mu) /
(s^2 + sigma^2), so the ODE's slope eps = (y - D) / sigma = k(sigma) (y - mu) with k = sigma / (s^2 + sigma^2):
every Euler / Heun step and every churn is affine in y - mu plus Gaussian noise. ``edm_chain`` runs
Algorithms 1 and 2 on the model's discrete sigmas in float64 from those formulas (written out again here, not
ddpm_ms's code), giving the exact per-sample map (deterministic) or the exact output mean and std (churn).
"""

import functools

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
import numpy as np
import pytest
from mindspore import Tensor

from ddpm_ms.diffusion.editing import img2img, inpaint
from ddpm_ms.diffusion.gaussian import NonFiniteError, Schedule
from ddpm_ms.diffusion.samplers import (
    NO_CHURN,
    check_options,
    churn_moves,
    denoised,
    edm_sigma,
    heun_sampler,
    initial_noise,
    sample,
    sampler_timesteps,
    steps_of,
    timestep_sequence,
)

from gaussian import GaussianEps

MU, S = -0.4, 0.5
SHAPE = (4096, 1, 4, 4)  # 65,536 pixels: standard error of the mean ~0.002, of the std ~0.0014
TOL = 0.01  # Monte Carlo tolerance for SHAPE: 5 standard errors of the mean, 7 of the std
SMALL = (256, 1, 4, 4)  # deterministic runs: compared per sample, no sampling error


@functools.lru_cache(maxsize=None)
def linear_schedule(T=1000, zero_terminal_snr=False):
    return Schedule.from_config("linear", T, zero_terminal_snr=zero_terminal_snr)


@functools.lru_cache(maxsize=None)
def gaussian(T=1000, zero_terminal_snr=False):
    return GaussianEps(linear_schedule(T, zero_terminal_snr), MU, S)


@functools.lru_cache(maxsize=None)
def run(sampler, steps, seed=0, shape=SMALL, churn=NO_CHURN, spacing="uniform"):
    """float64 NumPy samples for the Gaussian data (T = 1000, linear), clip_denoised=False."""
    out = sample(gaussian(), linear_schedule(), shape, sampler, steps, seed=seed, clip_denoised=False,
                 spacing=spacing, progress=False, churn=churn)
    return out.asnumpy().astype(np.float64)


def x_T_of(seed=0, shape=SMALL):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def sigmas_of(sched):
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - abar) / abar)


def edm_chain(sched, ts, churn=NO_CHURN, x_T=None, num_steps=None):
    """Algorithm 1 (S_churn = 0) or 2 of Karras et al. on the discrete sigmas of ``sched`` for the Gaussian data.

    With x_T (deterministic only): the final samples (float64); else (mean, std) of the output for x_T ~ N(0, I).
    sigma_hat is rounded up to the smallest discrete sigma >= sigma_t (1 + gamma) (at most sigma_{T-1}).
    """
    s_churn, s_tmin, s_tmax, s_noise = churn
    s_tmax = np.inf if s_tmax is None else s_tmax
    sig = sigmas_of(sched)
    n = len(ts) if num_steps is None else num_steps
    grid = [float(sig[t]) for t in ts] + [0.0]
    k = lambda sigma: sigma / (S**2 + sigma**2)  # noqa: E731  eps = k(sigma) (y - mu)
    # u = y - mu: mean m, variance v, and the per-sample factor p (u = p u_T, deterministic)
    abar_T = float(sched.alphas_cumprod[ts[0]])
    m, v, p = -MU, 1.0 / abar_T, 1.0
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        gamma = min(s_churn / n, np.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
        t_hat = int(ts[i])
        if gamma > 0:  # the smallest discrete sigma >= sigma (1 + gamma)
            t_hat = min(int(np.searchsorted(sig, sigma * (1.0 + gamma), side="left")), len(sig) - 1)
        sigma_hat = float(sig[t_hat])
        v += (sigma_hat**2 - sigma**2) * s_noise**2  # Algorithm 2, line 5
        h = sigma_next - sigma_hat
        c = 1.0 + h * k(sigma_hat)  # Euler: u' = u + h k(sigma_hat) u
        if sigma_next > 0:  # Heun: u'' = u + h (k(sigma_hat) u + k(sigma') u') / 2
            c = 1.0 + 0.5 * h * (k(sigma_hat) + k(sigma_next) * c)
        m, v, p = c * m, c * c * v, c * p
    if x_T is not None:
        assert s_churn == 0
        return MU + p * (np.asarray(x_T, np.float64) / np.sqrt(abar_T) - MU)
    return MU + m, float(np.sqrt(v))


def max_err(x, want):
    return float(np.abs(x - want).max())


# ----- the grid, the evaluations, the step -----


def test_timesteps_evaluations_and_callback():
    """steps = grid points (the DDIM sequence); evaluations 2 steps - 1 (no correction into t = -1);
    the callback sees every step: i = 0, 1, ... and t = the level the step starts from."""
    sched = linear_schedule(30)
    eps = gaussian(30)
    for steps in (1, 7, None):
        ts = sampler_timesteps(30, steps, "heun")
        np.testing.assert_array_equal(ts, timestep_sequence(30, steps or 30))
        for churn in (NO_CHURN, (20.0, 0.0, None, 1.0)):
            calls, seen = [], []

            def counted(x, t, calls=calls):
                calls.append(int(t.asnumpy()[0]))
                return eps(x, t)

            sample(counted, sched, (2, 1, 2, 2), "heun", steps, progress=False, churn=churn,
                   callback=lambda i, t, x, x0, seen=seen: seen.append((i, t)))
            starts = [t for t, t_next in churn_moves(sched, ts, churn) if t_next < t]
            assert len(calls) == 2 * len(ts) - 1, (steps, churn, calls)
            assert seen == list(enumerate(starts)), (seen, starts)
            assert calls[0] == ts[0] and calls[-1] == starts[-1]
    assert starts != list(ts)  # the churned run starts its steps above the grid


def test_heun_step_is_euler_plus_the_correction():
    """Euler in (sigma, y) is DDIM; into sigma = 0 it returns x_0: y + (0 - sigma) eps = x_0 for the
    consistent pair of denoised(); with the same eps at both ends the correction vanishes; the
    correction is (sigma' - sigma)(eps' - eps) / 2 in y = x / sqrt(abar')."""
    sched = linear_schedule()
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((4, 1, 3, 3)).astype(np.float32))
    out = Tensor(rng.standard_normal((4, 1, 3, 3)).astype(np.float32))
    other = Tensor(rng.standard_normal((4, 1, 3, 3)).astype(np.float32))
    for clip in (False, True):
        eps, x0 = denoised(sched, x, 400, out, "eps", clip)
        same = heun_sampler(sched, lambda x, t, pair=(eps, x0): pair)
        np.testing.assert_allclose(same(400, -1, x, eps, x0).asnumpy(), x0.asnumpy(), atol=2e-5)
        euler = sched.alphas_cumprod[300] ** 0.5 * x0.asnumpy() + (1 - sched.alphas_cumprod[300]) ** 0.5 * eps.asnumpy()
        np.testing.assert_allclose(same(400, 300, x, eps, x0).asnumpy(), euler, atol=1e-5)
        heun = heun_sampler(sched, lambda x, t: (other, None))
        s, s2, a2 = edm_sigma(sched, 400), edm_sigma(sched, 300), sched.alphas_cumprod[300]
        y2 = x.asnumpy() / sched.alphas_cumprod[400] ** 0.5 + (s2 - s) * (eps.asnumpy() + other.asnumpy()) / 2
        np.testing.assert_allclose(heun(400, 300, x, eps, x0).asnumpy(), a2**0.5 * y2, atol=1e-5)


def test_one_step_heun_is_one_step_ddim():
    sched, eps = linear_schedule(30), gaussian(30)
    a = sample(eps, sched, (4, 1, 2, 2), "heun", 1, seed=4, progress=False)
    b = sample(eps, sched, (4, 1, 2, 2), "ddim", 1, seed=4, progress=False)
    np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


# ----- Algorithm 1 on Gaussian data -----


@pytest.mark.parametrize("steps,spacing", [(5, "uniform"), (10, "uniform"), (20, "quadratic")])
def test_heun_is_edm_algorithm_1(steps, spacing):
    """Per sample, the deterministic run is the closed form of Algorithm 1 on the same grid (float32 rounding)."""
    x = run("heun", steps, spacing=spacing)
    want = edm_chain(linear_schedule(), sampler_timesteps(1000, steps, "heun", spacing), x_T=x_T_of())
    np.testing.assert_allclose(x, want, atol=1e-4)


def test_heun_matches_the_data_and_beats_euler():
    """Against the exact probability-flow ODE solution from the same x_T (no sampling error): Heun's error in
    the std at 10/20/40 uniform steps is 0.043/0.0097/0.0023 (measured), Euler's (= DDIM) -0.14/-0.070/-0.035;
    the max per-sample error 0.15/0.034/0.0078 vs 0.48/0.24/0.12. The bounds shrink with steps (2x margin)."""
    exact = gaussian().ode_map(x_T_of(), 999)
    bounds = {10: 0.09, 20: 0.02, 40: 0.005}
    for steps, bound in bounds.items():
        heun, euler = run("heun", steps), run("ddim", steps)
        assert abs(heun.std() - exact.std()) < bound, (steps, heun.std(), exact.std())
        assert abs(heun.mean() - exact.mean()) < bound / 4, (steps, heun.mean(), exact.mean())
        assert abs(heun.std() - exact.std()) < 0.5 * abs(euler.std() - exact.std())
        assert max_err(heun, exact) < 0.5 * max_err(euler, exact)
    x = run("heun", 20, shape=SHAPE)  # the data distribution itself, with 65k pixels
    assert abs(x.mean() - MU) < TOL and abs(x.std() - S) < 0.02, (x.mean(), x.std())


def test_heun_is_second_order():
    """Doubling the steps divides Heun's max error by ~4 (measured 4.5 and 4.3 for 10 -> 20 -> 40 uniform steps)
    and Euler's (DDIM) by ~2 (measured 1.99 and 1.98)."""
    exact = gaussian().ode_map(x_T_of(), 999)
    heun = [max_err(run("heun", n), exact) for n in (10, 20, 40)]
    euler = [max_err(run("ddim", n), exact) for n in (10, 20, 40)]
    heun_ratios = np.array(heun[:-1]) / np.array(heun[1:])
    euler_ratios = np.array(euler[:-1]) / np.array(euler[1:])
    assert np.all(heun_ratios > 3.5), (heun, heun_ratios)
    assert np.all((euler_ratios > 1.7) & (euler_ratios < 2.5)), (euler, euler_ratios)


# ----- Algorithm 2 (churn) -----

EDM_IMAGENET = (40.0, 0.05, 50.0, 1.003)  # EDM's ImageNet-64 settings (their Table 5 / README)


@pytest.mark.parametrize("steps,churn,spacing,data_bound", [
    (40, (10.0, 0.0, None, 1.0), "quadratic", 0.012),  # gamma = 0.25 at every step but the first
    (40, (5.0, 0.05, 50.0, 1.0), "uniform", 0.012),  # gamma = 0.125 inside a window
    (40, EDM_IMAGENET, "quadratic", 0.02),  # gamma = 0.414 (capped) in EDM's window, S_noise = 1.003
])
def test_churn_has_the_exact_distribution_of_its_chain(steps, churn, spacing, data_bound):
    """Monte Carlo over 65k pixels vs the closed form of Algorithm 2 (TOL); that closed form vs the data:
    measured std - s of the exact chain +0.0059, +0.0061, +0.0110 (mean within 1e-4 of mu); bounds ~2x."""
    x = run("heun", steps, shape=SHAPE, churn=churn, spacing=spacing)
    mean, std = edm_chain(linear_schedule(), sampler_timesteps(1000, steps, "heun", spacing), churn)
    assert abs(x.mean() - mean) < TOL and abs(x.std() - std) < TOL, (x.mean(), mean, x.std(), std)
    assert abs(mean - MU) < data_bound and abs(std - S) < data_bound, (mean, std)
    assert abs(x.mean() - MU) < TOL + data_bound and abs(x.std() - S) < TOL + data_bound


def test_churn_converges_to_the_data():
    """With the exact denoiser and S_noise = 1, Algorithm 2's output tends to the data as the steps grow (closed
    form; measured std - s for S_churn = 10 at 20/40/80/160 uniform steps: 0.037/0.010/0.0024/0.0005, and for
    S_churn = 0: 0.0097/0.0023/0.0005/0.00005): churn costs accuracy at few steps with a perfect denoiser."""
    sched = linear_schedule()
    errors = {c: [edm_chain(sched, sampler_timesteps(1000, n, "heun"), (c, 0.0, None, 1.0))[1] - S
                  for n in (20, 40, 80, 160)] for c in (0.0, 10.0)}
    for c, err in errors.items():
        assert all(a > b > 0 for a, b in zip(err, err[1:])), (c, err)
        assert err[-1] < 0.001, (c, err)
    assert all(a > b for a, b in zip(errors[10.0], errors[0.0])), errors


def test_churn_zero_or_outside_its_window_is_algorithm_1_bit_for_bit():
    """No churn: no move up, nothing drawn after x_T, the deterministic result bit for bit - for S_churn = 0
    and for S_tmin/S_tmax windows that hold no grid sigma (sigma in [0.010, 157] on this schedule)."""
    plain = run("heun", 10)
    sched, ts = linear_schedule(), sampler_timesteps(1000, 10, "heun")
    for churn in ((0.0, 0.05, 50.0, 1.003), (30.0, 200.0, None, 1.0), (30.0, 0.0, 0.005, 1.0), (30.0, 2.0, 2.1, 1.0)):
        assert churn_moves(sched, ts, churn) == steps_of(ts), churn
    for churn in ((0.0, 0.05, 50.0, 1.003), (30.0, 2.0, 2.1, 1.0)):
        np.testing.assert_array_equal(run("heun", 10, churn=churn), plain)
    churned = run("heun", 10, churn=(30.0, 0.05, 50.0, 1.0))
    assert np.abs(churned - plain).max() > 0.01


def test_churn_moves_follow_the_window_and_round_up():
    """gamma = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_t <= S_tmax; sigma_hat rounded up to the
    smallest discrete sigma >= sigma_t (1 + gamma); no churn at t = T - 1 (no level above it)."""
    sched = linear_schedule()
    sig = sigmas_of(sched)
    for steps, churn in ((10, (30.0, 0.05, 50.0, 1.0)), (20, (4.0, 0.0, None, 1.0)), (50, (80.0, 0.0, 1.0, 1.0))):
        ts = sampler_timesteps(1000, steps, "heun")
        gamma = min(churn[0] / steps, np.sqrt(2) - 1)
        moves = churn_moves(sched, ts, churn)
        ups = {t: t_hat for t, t_hat in moves if t_hat > t}
        downs = [(t, t_next) for t, t_next in moves if t_next < t]
        assert [t_next for _, t_next in downs] == list(ts[1:]) + [-1]
        for t in ts:
            inside = churn[1] <= sig[t] <= (churn[2] or np.inf) and t < 999
            assert (t in ups) == inside, (steps, t, sig[t])
            if t in ups:
                t_hat = ups[t]
                assert sig[t_hat] >= sig[t] * (1 + gamma) > sig[t_hat - 1], (t, t_hat)
    # gamma is capped at sqrt(2) - 1: any S_churn >= N (sqrt(2) - 1) gives the same walk, a smaller one another
    capped = churn_moves(sched, ts, (len(ts) * (np.sqrt(2) - 1), 0.0, None, 1.0))
    assert churn_moves(sched, ts, (1e6, 0.0, None, 1.0)) == capped
    assert churn_moves(sched, ts, (0.9 * len(ts) * (np.sqrt(2) - 1), 0.0, None, 1.0)) != capped


def test_churn_is_fixed_by_the_seed_and_drawn_from_the_rng():
    sched, eps, shape = linear_schedule(30), gaussian(30), (8, 1, 2, 2)
    churn = (20.0, 0.0, None, 1.0)
    go = lambda **kw: sample(eps, sched, shape, "heun", 5, progress=False, churn=churn, **kw).asnumpy()  # noqa: E731
    a = go(seed=1)
    np.testing.assert_array_equal(a, go(rng=np.random.default_rng(1)))
    rng = np.random.default_rng(1)
    x_T = Tensor(initial_noise(shape, rng))
    np.testing.assert_array_equal(a, go(rng=rng, x_T=x_T))  # x_T is the first draw, then the churn noise
    assert not np.array_equal(a, go(x_T=x_T, seed=2))  # same start, other churn noise


def test_s_noise_scales_the_churn_noise():
    """S_noise > 1 adds more noise than the exact q: the exact chain's std grows, and so does the sample's."""
    churn, more = (10.0, 0.0, None, 1.0), (10.0, 0.0, None, 1.05)  # the first: as in the test above (cached)
    a, b = (run("heun", 40, shape=SHAPE, churn=c, spacing="quadratic") for c in (churn, more))
    _, std = edm_chain(linear_schedule(), sampler_timesteps(1000, 40, "heun", "quadratic"), more)
    assert abs(b.std() - std) < TOL and b.std() > a.std() + 0.01, (a.std(), b.std(), std)


# ----- zero terminal SNR, NaN, editing -----


def test_zero_terminal_snr_first_step_is_ddim():
    """abar_{T-1} = 0: sigma = inf, so the first step is Euler (= DDIM: the x_0 prediction re-noised) without a
    correction, and churn never reaches the sigma = inf level. Measured at 20 steps: mean -0.398, std 0.508
    (S_churn = 10: -0.400, 0.537, as on the schedule without zero terminal SNR: churn costs at few steps)."""
    sched = linear_schedule(1000, zero_terminal_snr=True)
    net = gaussian(1000, True).predictor("v")
    calls = []

    def counted(x, t):
        calls.append(int(t.asnumpy()[0]))
        return net(x, t)

    ts = sampler_timesteps(1000, 20, "heun")
    for churn in (NO_CHURN, (10.0, 0.0, None, 1.0)):
        calls.clear()
        x = sample(counted, sched, SHAPE, "heun", 20, seed=0, clip_denoised=False, prediction_type="v",
                   progress=False, churn=churn).asnumpy()
        moves = churn_moves(sched, ts, churn)
        starts = [t for t, t_next in moves if t_next < t]
        assert len(calls) == 2 * 20 - 2  # no correction in the first step: the second call starts step 2
        assert calls[:2] == starts[:2] and starts[0] == 999, (calls[:2], starts[:2])
        bound = 0.02 if churn == NO_CHURN else 0.05  # measured std - s: +0.008 and +0.037 (churn at 20 steps)
        assert abs(x.mean() - MU) < TOL and abs(x.std() - S) < bound, (churn, x.mean(), x.std())
        ups = [t_hat for t, t_hat in moves if t_hat > t]
        assert len(ups) == (0 if churn == NO_CHURN else 19) and all(t_hat < 999 for t_hat in ups), ups


def test_nan_in_the_correction_is_reported():
    """The correction goes through the same checked network call: NaN only there is reported."""
    sched, eps = linear_schedule(30), gaussian(30)
    count = []

    def nan_second(x, t):
        count.append(1)
        out = eps(x, t)
        return out * float("nan") if len(count) == 2 else out

    with pytest.raises(NonFiniteError, match="model output .*NaN/inf"):
        sample(nan_second, sched, (2, 1, 2, 2), "heun", 5, clip_denoised=True, progress=False)


def test_editing_with_heun_and_churn():
    """img2img at strength 1 on a zero-terminal-SNR schedule is plain sampling bit for bit, churn included;
    inpainting keeps the known pixels."""
    sched = linear_schedule(100, zero_terminal_snr=True)
    net = gaussian(100, True).predictor("x0")
    x_in = np.random.default_rng(0).uniform(-1, 1, (8, 1, 2, 2)).astype(np.float32)
    for churn in (NO_CHURN, (10.0, 0.0, None, 1.003)):
        plain = sample(net, sched, x_in.shape, "heun", 10, seed=2, prediction_type="x0", progress=False, churn=churn)
        edited = img2img(net, sched, x_in, 1.0, "heun", 10, seed=2, prediction_type="x0", progress=False, churn=churn)
        np.testing.assert_array_equal(edited.asnumpy(), plain.asnumpy())
        known = np.zeros((8, 1, 2, 2), bool)
        known[:, :, 0] = True
        filled = inpaint(net, sched, x_in, known, "heun", 10, seed=2, prediction_type="x0", progress=False,
                         churn=churn).asnumpy()
        np.testing.assert_array_equal(filled[known], x_in[known])
        assert np.isfinite(filled).all()


# ----- bad values -----


@pytest.mark.parametrize("churn,match", [
    ((-1.0, 0.0, None, 1.0), "s_churn"), ((float("nan"), 0.0, None, 1.0), "s_churn"),
    ((1.0, 0.0, None, 0.0), "s_noise"), ((1.0, -0.1, None, 1.0), "s_tmin"),
    ((1.0, 1.0, 0.5, 1.0), "s_tmax"), ((1.0, 0.0, None), "churn must be"), (30.0, "churn must be"),
])
def test_bad_churn_is_a_value_error(churn, match):
    with pytest.raises(ValueError, match=match):
        check_options("heun", churn=churn)
    sched, eps, x_in = linear_schedule(30), gaussian(30), np.zeros((1, 1, 2, 2), np.float32)
    for run_it in (lambda: sample(eps, sched, (1, 1, 2, 2), "heun", 5, progress=False, churn=churn),
                   lambda: sample(eps, sched, (1, 1, 2, 2), "ddim", 5, progress=False, churn=churn),
                   lambda: inpaint(eps, sched, x_in, np.ones_like(x_in, bool), "heun", 5, progress=False, churn=churn),
                   lambda: img2img(eps, sched, x_in, 0.5, "heun", 5, progress=False, churn=churn)):
        with pytest.raises(ValueError, match=match):
            run_it()


def test_churn_flags_and_pipeline(tmp_path, capsys):
    """--churn -1 is one error line and exit 2 before anything is loaded; given flags replace the config's
    keys; the pipeline's churn= is checked and leaves its own config alone."""
    import argparse

    from ddpm_ms.command_line import add_sampling_args, apply_churn_args
    from ddpm_ms.config import DEFAULTS
    from ddpm_ms.pipeline import with_churn
    from ddpm_ms.sample import main
    from ddpm_ms.utils.errors import UserError

    try:
        from cli_checks import one_line_error
    except ImportError:
        from tests.cli_checks import one_line_error

    missing = str(tmp_path / "missing.ckpt")
    assert "--churn" in one_line_error(main, ["--checkpoint", missing, "--sampler", "heun", "--churn", "-1"], capsys)
    assert "--s-noise" in one_line_error(main, ["--checkpoint", missing, "--s-noise", "0"], capsys)
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    cfg = dict(DEFAULTS)
    apply_churn_args(parser.parse_args(["--checkpoint", "x", "--churn", "30", "--s-tmax", "50"]), cfg)
    assert (cfg["s_churn"], cfg["s_tmin"], cfg["s_tmax"], cfg["s_noise"]) == (30.0, 0.0, 50.0, 1.0)
    with pytest.raises(UserError, match="S_tmax"):
        apply_churn_args(parser.parse_args(["--checkpoint", "x", "--s-tmin", "2", "--s-tmax", "1"]), dict(DEFAULTS))
    assert with_churn(DEFAULTS, 30)["s_churn"] == 30 and DEFAULTS["s_churn"] == 0.0
    assert with_churn(DEFAULTS, EDM_IMAGENET)["s_noise"] == 1.003
    with pytest.raises(UserError, match="s_churn"):
        with_churn(DEFAULTS, -1)
