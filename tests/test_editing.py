"""Inpainting (RePaint) and image-to-image (SDEdit) against closed forms on correlated Gaussian data.

The data: 4 pixels x_0 ~ N(mu, Sigma) with Sigma_ij = s^2 rho^|i-j| (rho = 0.9), pixels 0 and 1
known, 2 and 3 to fill; the linear schedule of Ho et al. (T = 1000). With the optimal denoiser
(tests/gaussian.py, CorrelatedGaussian) every sampler step is an affine map of the chain's state
plus Gaussian noise, and so are RePaint's replacement of the known pixels and its jumps back up,
and SDEdit's start: the exact output distribution of every method is a Gaussian. ``ExactChain``
propagates its mean and covariance in float64 from the papers' equations, written out again here
(not ddpm_ms's code). The tests check that

* ddpm_ms's chains (Monte Carlo over N images) have the exact distribution of their chain;
* how far that distribution lies from the true conditional p(x_U | x_K), for plain replacement
  and for RePaint's resampling (exact numbers: RePaint is an approximation, and the bounds are
  the measured ones);
* the known pixels come back bit for bit, strength 1 is plain sampling, a tiny strength the input.
"""

import functools

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
import numpy as np
import pytest

from ddpm_ms.diffusion.editing import img2img, inpaint, model_calls, repaint_moves, strength_timesteps
from ddpm_ms.diffusion.gaussian import Schedule
from ddpm_ms.diffusion.samplers import sample, sampler_timesteps, steps_of

try:
    from gaussian import CorrelatedGaussian, GaussianEps, gaussian_kl
except ImportError:  # tests/ imported as a package
    from tests.gaussian import CorrelatedGaussian, GaussianEps, gaussian_kl

D, S, RHO = 4, 0.5, 0.9
MU = np.array([0.2, -0.1, 0.3, 0.0])
COV = S**2 * RHO ** np.abs(np.subtract.outer(np.arange(D), np.arange(D)))
KNOWN = np.array([True, True, False, False])
X_KNOWN = np.array([0.8, 0.7])  # 1.2 and 1.6 standard deviations above the mean: the fill must follow them
N = 20000  # Monte Carlo images per run: standard error of a mean ~0.0015, of a covariance entry ~0.0006


@functools.lru_cache(maxsize=None)
def data():
    return CorrelatedGaussian(Schedule.from_config("linear", 1000), MU, COV)


# ----- the exact distribution of a chain (float64, from the papers' equations) -----


def log_snr(abar):
    return np.inf if abar == 1.0 else 0.5 * (np.log(abar) - np.log1p(-abar))


class ExactChain:
    """Mean and covariance of the state [x (d pixels); x0_prev (d)] of a chain driven by the optimal
    denoiser; x0_prev is the previous x_0 prediction that DPM-Solver++(2M) keeps."""

    def __init__(self, g, mean, cov):
        d = g.d
        self.g, self.d, self.prev_t = g, d, None
        self.m = np.concatenate([mean, np.zeros(d)])
        self.C = np.zeros((2 * d, 2 * d))
        self.C[:d, :d] = cov

    def apply(self, F, c, q):
        """state' = F state + c + noise of variances q (independent)."""
        self.m = F @ self.m + c
        self.C = F @ self.C @ F.T + np.diag(q)

    def _affine(self, A, c, x0_map, q):
        d, (K, k) = self.d, x0_map
        F = np.zeros((2 * d, 2 * d))
        F[:d, :d], F[d:, :d] = A, K
        return F, np.concatenate([c, k]), np.concatenate([np.full(d, q), np.zeros(d)])

    def song_step(self, t, t_next, eta, noise_var=None):
        """Song et al. 2021, Eq. 12: x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z with sigma from
        Eq. 16 (eta = 1: the DDPM posterior step, Ho et al. Eq. 6-7); noise_var replaces sigma^2 as the
        added noise (DDPM's "beta" variance) while the mean keeps it."""
        g = self.g
        a, a2 = g.abar(t), g.abar(t_next)
        sigma2 = eta**2 * (1 - a2) / (1 - a) * (1 - a / a2)
        (K, k), (E, e) = g.x0_map(t), g.eps_map(t)
        w = np.sqrt(max(1 - a2 - sigma2, 0.0))
        q = sigma2 if noise_var is None else noise_var
        self.apply(*self._affine(np.sqrt(a2) * K + w * E, np.sqrt(a2) * k + w * e, (K, k), q))

    def ddpm_step(self, t, t_next, variance="posterior"):
        a, a2 = self.g.abar(t), self.g.abar(t_next)
        noise = 0.0 if t_next < 0 else (None if variance == "posterior" else 1 - a / a2)
        self.song_step(t, t_next, 1.0, noise)

    def dpm_solver_pp_step(self, t, t_next):
        """Lu et al. 2022, Algorithm 2 (2M): second order from the previous x_0 prediction, first order
        at the first step and into abar = 1."""
        g, d = self.g, self.d
        a, a2 = g.abar(t), g.abar(t_next)
        lam, lam2 = log_snr(a), log_snr(a2)
        h = lam2 - lam
        cx, cd = np.sqrt((1 - a2) / (1 - a)), -np.sqrt(a2) * np.expm1(-h)
        K, k = g.x0_map(t)
        F = np.zeros((2 * d, 2 * d))
        F[d:, :d] = K
        if self.prev_t is not None and t_next >= 0:
            r = (lam - log_snr(g.abar(self.prev_t))) / h
            F[:d, :d] = cx * np.eye(d) + cd * (1 + 0.5 / r) * K
            F[:d, d:] = -cd * (0.5 / r) * np.eye(d)
            c = cd * (1 + 0.5 / r) * k
        else:
            F[:d, :d] = cx * np.eye(d) + cd * K
            c = cd * k
        self.apply(F, np.concatenate([c, k]), np.zeros(2 * d))
        self.prev_t = t

    def replace_known(self, t, known, x_known):
        """RePaint's known region at level t: q(x_t | x_0) for the known pixels, x_0 itself at t = -1."""
        d, a = self.d, self.g.abar(t)
        F, c, q = np.eye(2 * d), np.zeros(2 * d), np.zeros(2 * d)
        idx = np.flatnonzero(known)
        F[idx, :] = 0.0
        c[idx] = np.sqrt(a) * x_known
        q[idx] = 1 - a
        self.apply(F, c, q)

    def jump(self, t, t_up):
        """x_t_up ~ q(x_t_up | x_t): the forward process's steps from t to t_up."""
        d, ratio = self.d, self.g.abar(t_up) / self.g.abar(t)
        F = np.eye(2 * d)
        F[:d, :d] *= np.sqrt(ratio)
        self.apply(F, np.zeros(2 * d), np.concatenate([np.full(d, 1 - ratio), np.zeros(d)]))

    def step(self, sampler, t, t_next, eta=0.0):
        if sampler == "ddpm":
            self.ddpm_step(t, t_next)
        elif sampler == "ddim":
            self.song_step(t, t_next, eta)
        else:
            self.dpm_solver_pp_step(t, t_next)

    def x(self):
        return self.m[:self.d], self.C[:self.d, :self.d]


def exact_inpainting(sampler, steps, jump_length=10, jump_n_sample=1, eta=0.0):
    """(mean, cov) of the filled pixels, exactly, for the inpainting chain of ddpm_ms's walk."""
    g = data()
    ts = sampler_timesteps(1000, steps, sampler)
    a_T = g.abar(int(ts[0]))
    start_mean, start_var = np.zeros(D), np.ones(D)
    start_mean[KNOWN], start_var[KNOWN] = np.sqrt(a_T) * X_KNOWN, 1 - a_T
    chain = ExactChain(g, start_mean, np.diag(start_var))
    for t, t_next in repaint_moves(ts, jump_length, jump_n_sample):
        if t_next > t:
            chain.jump(t, t_next)
            continue
        chain.step(sampler, t, t_next, eta)
        chain.replace_known(t_next, KNOWN, X_KNOWN)
    mean, cov = chain.x()
    assert np.allclose(mean[KNOWN], X_KNOWN) and np.allclose(cov[KNOWN], 0.0)
    return mean[~KNOWN], cov[np.ix_(~KNOWN, ~KNOWN)]


def exact_img2img(sampler, steps, strength, x_in, eta=0.0):
    g = data()
    ts = strength_timesteps(sampler_timesteps(1000, steps, sampler), strength, 1000)
    a = g.abar(int(ts[0]))
    chain = ExactChain(g, np.sqrt(a) * x_in, (1 - a) * np.eye(D))
    for t, t_next in steps_of(ts):
        chain.step(sampler, t, t_next, eta)
    return chain.x()


# ----- ddpm_ms's chains, Monte Carlo -----

def run_inpaint(sampler, steps, jump_length=10, jump_n_sample=1, eta=0.0, seed=0, n=N, fill=0.0):
    x_in = np.full((n, 1, 1, D), fill, np.float32)
    x_in[..., KNOWN] = X_KNOWN
    out = inpaint(data(), data().sched, x_in, KNOWN.reshape(1, 1, 1, D), sampler, steps, eta=eta, seed=seed,
                  clip_denoised=False, jump_length=jump_length, jump_n_sample=jump_n_sample, progress=False)
    return x_in, out.asnumpy().reshape(n, D)


def assert_moments(samples, mean, cov, z=5.0):
    """Sample mean and covariance within z standard errors of (mean, cov) (plus 2e-4 for float32)."""
    n = len(samples)
    got_mean, got_cov = samples.mean(0), np.cov(samples.T)
    var = np.diag(cov)
    assert np.all(np.abs(got_mean - mean) < z * np.sqrt(var / n) + 2e-4), (got_mean, mean)
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / n)
    assert np.all(np.abs(got_cov - cov) < z * se_cov + 2e-4), (got_cov, cov)


# ----- the walk -----


@pytest.mark.parametrize("steps,jump_length,jump_n_sample", [(50, 10, 1), (50, 10, 3), (23, 5, 4), (7, 10, 5)])
def test_repaint_walk(steps, jump_length, jump_n_sample):
    ts = sampler_timesteps(1000, steps, "ddpm")
    moves = repaint_moves(ts, jump_length, jump_n_sample)
    assert moves[0][0] == ts[0] and moves[-1][1] == -1
    assert all(a[1] == b[0] for a, b in zip(moves, moves[1:]))  # one continuous walk
    position = {int(t): i for i, t in enumerate(ts)}
    ups = [(t, u) for t, u in moves if u > t]
    assert all(position[u] - position[t] == -jump_length for t, u in ups)  # every jump goes one block up
    blocks = (steps - 1) // jump_length  # blocks that end above t = -1
    assert len(ups) == blocks * (jump_n_sample - 1)
    assert model_calls(moves) == steps + (jump_n_sample - 1) * jump_length * blocks
    if jump_n_sample == 1:
        assert moves == steps_of(ts)


def test_resampling_is_for_ddpm_and_options_are_checked():
    x_in, known = np.zeros((2, 1, 1, D), np.float32), KNOWN.reshape(1, 1, 1, D)
    with pytest.raises(ValueError, match="ddpm"):
        inpaint(data(), data().sched, x_in, known, "ddim", 10, jump_n_sample=2, progress=False)
    with pytest.raises(ValueError, match="jump_length"):
        repaint_moves([3, 2, 1, 0], 0, 2)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            img2img(data(), data().sched, x_in, strength, "ddim", 10, progress=False)


# ----- inpainting: ddpm_ms's chain is the exact chain -----

@pytest.mark.parametrize("sampler,steps,jump_length,jump_n_sample", [
    ("ddpm", 50, 10, 1), ("ddpm", 50, 5, 4), ("ddim", 20, 10, 1), ("dpm-solver++", 10, 10, 1)])
def test_inpainting_has_the_exact_distribution_of_its_chain(sampler, steps, jump_length, jump_n_sample):
    x_in, out = run_inpaint(sampler, steps, jump_length, jump_n_sample)
    np.testing.assert_array_equal(out[:, KNOWN], x_in.reshape(N, D)[:, KNOWN])  # bit for bit
    mean, cov = exact_inpainting(sampler, steps, jump_length, jump_n_sample)
    assert_moments(out[:, ~KNOWN], mean, cov)


def test_inpainting_ignores_the_unknown_pixels_of_the_input_and_is_seeded():
    _, a = run_inpaint("ddpm", 20, n=64, seed=3)
    _, b = run_inpaint("ddpm", 20, n=64, seed=3, fill=0.9)
    _, c = run_inpaint("ddpm", 20, n=64, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, ~KNOWN], c[:, ~KNOWN])


# ----- inpainting: how far each chain lands from the true conditional (exact numbers) -----

def kl_to_truth(sampler, steps, jump_length=10, jump_n_sample=1):
    return gaussian_kl(*exact_inpainting(sampler, steps, jump_length, jump_n_sample),
                       *data().conditional(KNOWN, X_KNOWN))


def test_plain_replacement_is_biased_and_resampling_removes_most_of_it():
    """Replacing the known pixels is not conditioning: at step t the unknown pixels are denoised from
    x_t, which saw the known ones only through noise, and each step pulls them back toward the
    marginal mean. Here the fill's mean stays ~0.28 below the true conditional mean at every step
    count (KL 0.73 with all 1000 DDPM steps, 0.90 with 50), and the deterministic samplers, which add
    no noise to correct with, land further (KL 1.5-1.7). Resampling lets the unknown pixels see the
    known ones again: RePaint's setting (250 steps, jump 10, 10 samples) gives KL 0.11 and the full
    chain with 10 (20) samples 0.023 (0.010). The bounds below are those values with a margin."""
    plain = {steps: kl_to_truth("ddpm", steps) for steps in (50, 250, 1000)}
    assert all(kl > 0.7 for kl in plain.values()), plain
    assert kl_to_truth("ddim", 50) > 1.4 and kl_to_truth("dpm-solver++", 20) > 1.4
    repaint = {r: kl_to_truth("ddpm", 250, 10, r) for r in (1, 2, 5, 10)}
    assert repaint[1] > repaint[2] > repaint[5] > repaint[10], repaint  # more resampling, closer
    assert repaint[10] < 0.12 < plain[250] / 6
    full = kl_to_truth("ddpm", 1000, 10, 10), kl_to_truth("ddpm", 1000, 10, 20)
    assert full[0] < 0.025 and full[1] < 0.011, full
    mean, _ = exact_inpainting("ddpm", 1000, 10, 20)
    true_mean, _ = data().conditional(KNOWN, X_KNOWN)
    assert np.abs(mean - true_mean).max() < 0.035, (mean, true_mean)


# ----- image-to-image -----

@pytest.mark.parametrize("sampler,steps,strength", [("ddpm", 50, 0.5), ("ddim", 20, 0.3), ("dpm-solver++", 10, 0.7)])
def test_img2img_has_the_exact_distribution_of_its_chain(sampler, steps, strength):
    x_in = np.array([0.9, -0.6, 0.2, 0.5])
    images = np.broadcast_to(x_in.astype(np.float32).reshape(1, 1, 1, D), (N, 1, 1, D))
    out = img2img(data(), data().sched, images, strength, sampler, steps, seed=1, clip_denoised=False, progress=False)
    mean, cov = exact_img2img(sampler, steps, strength, x_in)
    assert_moments(out.asnumpy().reshape(N, D), mean, cov)
    full = sampler_timesteps(1000, steps, sampler)
    ts = strength_timesteps(full, strength, 1000)  # the tail of the sequence from the first t + 1 <= s T
    first = len(full) - len(ts)
    assert 0 < first and np.array_equal(ts, full[first:])
    assert ts[0] + 1 <= strength * 1000 < full[first - 1] + 1


def test_img2img_strength_one_is_plain_sampling_and_a_tiny_strength_the_input():
    """On a zero-terminal-SNR schedule q(x_T | x_in) is N(0, I) and x_T is the same draw: the samples are
    the plain sampler's bit for bit. With no step of the sequence at or below s T the input comes back."""
    sched = Schedule.from_config("linear", 1000, zero_terminal_snr=True)
    predictor = GaussianEps(sched, -0.4, 0.5).predictor("x0")
    x_in = np.random.default_rng(0).uniform(-1, 1, (8, 1, 2, 2)).astype(np.float32)
    for sampler in ("ddpm", "dpm-solver++"):
        plain = sample(predictor, sched, x_in.shape, sampler, 10, seed=2, prediction_type="x0", progress=False)
        edited = img2img(predictor, sched, x_in, 1.0, sampler, 10, seed=2, prediction_type="x0", progress=False)
        np.testing.assert_array_equal(edited.asnumpy(), plain.asnumpy())
    same = img2img(predictor, sched, x_in, 0.0009, "ddim", 10, seed=2, prediction_type="x0", progress=False)
    np.testing.assert_array_equal(same.asnumpy(), x_in)  # the grid's last index is t = 0: it needs s T >= 1


# ----- inputs: masks, images, channels -----

def test_named_and_drawn_masks(tmp_path):
    from PIL import Image

    from ddpm_ms.data.user_images import read_mask

    box = read_mask("box:1,2,4,3", 1, 6)[0, 0]  # columns 1..3 of row 2
    assert box.sum() == 3 and box[2, 1:4].all()
    left = read_mask("half-left", 1, 6)[0, 0]
    assert left[:, :3].all() and not left[:, 3:].any()
    assert read_mask("half-bottom", 1, 6)[0, 0][3:].all() and read_mask("half-bottom", 1, 6).sum() == 18
    center = read_mask("center", 1, 8)[0, 0]
    assert center[2:6, 2:6].all() and center.sum() == 16
    rand = read_mask("random:0.5", 3, 28, seed=1)
    assert rand.shape == (3, 1, 28, 28) and 0.4 < rand.mean() < 0.6 and not np.array_equal(rand[0], rand[1])
    assert np.array_equal(rand, read_mask("random:0.5", 3, 28, seed=1))
    drawn = np.zeros((6, 6), np.uint8)
    drawn[1:3, 4:] = 255
    Image.fromarray(drawn).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(str(tmp_path / "m.png"), 2, 6)[0, 0], drawn == 255)  # white = fill


def test_images_are_read_in_the_models_channels_and_size(tmp_path):
    from PIL import Image

    from ddpm_ms.data.user_images import read_images
    from ddpm_ms.utils.errors import UserError

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    three, names = read_images(str(tmp_path / "wide.png"), 3, 8)
    one, _ = read_images(str(tmp_path / "wide.png"), 1, 8)
    assert three.shape == (1, 3, 8, 8) and one.shape == (1, 1, 8, 8) and names == ["wide.png"]
    floats = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    np.save(tmp_path / "f.npy", floats)
    pixels, _ = read_images(str(tmp_path / "f.npy"), 1, 8)
    np.testing.assert_allclose(pixels / 127.5 - 1.0, floats, atol=0.5 / 127.5)
    with pytest.raises(UserError, match="the model takes 3"):
        read_images(str(tmp_path / "f.npy"), 3, 8)


def test_rgb_inpainting_keeps_every_channel_of_the_known_pixels():
    sched = data().sched
    rng = np.random.default_rng(3)
    x_in = rng.uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    known = rng.random((2, 1, 4, 4)) < 0.5  # one mask for the three channels of a pixel
    out = inpaint(lambda x, t: x * 0.5, sched, x_in, known, "dpm-solver++", 5, clip_denoised=False,
                  progress=False).asnumpy()
    keep = np.broadcast_to(known, x_in.shape)
    assert np.array_equal(out[keep], x_in[keep]) and not np.allclose(out[~keep], x_in[~keep])
