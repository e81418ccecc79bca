"""Prediction objectives (eps, x0, v), min-SNR loss weighting and zero-terminal-SNR schedules.

Closed forms only: the optimal eps-, x0- and v-predictors of Gaussian data (tests/gaussian.py),
the exact result of each discretised sampler chain, and the formulas of the papers recomputed
here in NumPy from the betas.
"""

import functools

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.config import load_config
from ddpm_ms.diffusion.gaussian import Schedule, loss_weights, min_snr_weights, model_output_to_eps_x0, p_losses
from ddpm_ms.utils.errors import UserError
from ddpm_ms.diffusion.generation import guided_eps_fn
from ddpm_ms.diffusion.samplers import sample, sampler_timesteps
from ddpm_ms.diffusion.schedules import SCHEDULES, make_beta_schedule, rescale_zero_terminal_snr

try:
    from gaussian import GaussianEps
except ImportError:  # tests/ imported as a package
    from tests.gaussian import GaussianEps

MU, S = -0.4, 0.5
SHAPE = (2048, 1, 4, 4)  # 32,768 pixels: sampling error of the mean ~0.003, of the std ~0.002
TOL = 0.01  # as in test_samplers.py
# (sampler, steps, T): the full DDPM chain (all T steps) runs on a 40-step schedule to keep the test short
RUNS = [("ddpm", None, 40), ("ddpm", 20, 200), ("ddim", 10, 200), ("dpm-solver++", 20, 200)]


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@functools.lru_cache(maxsize=None)
def schedule(zero_terminal_snr, T=200):
    """The tutorial's schedule (T = 200 linear: alpha_bar_T = 0.13, far from pure noise), or its ZTSNR rescale;
    T = 40: betas 1e-4 .. 0.1 (alpha_bar_T = 0.13 too)."""
    return Schedule.from_config("linear", T, 1e-4, 0.02 * 200 / T, zero_terminal_snr=zero_terminal_snr)


@functools.lru_cache(maxsize=None)
def run(sampler, steps, T, prediction_type, zero_terminal_snr=False, clip=False):
    sched = schedule(zero_terminal_snr, T)
    model = GaussianEps(sched, MU, S).predictor(prediction_type)
    out = sample(model, sched, SHAPE, sampler, steps, seed=0, clip_denoised=clip, progress=False,
                 prediction_type=prediction_type)
    return out.asnumpy().astype(np.float64)


def exact_chain(sampler, steps, T, zero_terminal_snr):
    """(mean, std) of the sampler's output for x_T ~ N(0, I): exact for DDPM (= DDIM eta = 1) and DDIM;
    for DPM-Solver++ (20 steps, close to it) the probability-flow ODE from the same x_T."""
    sched = schedule(zero_terminal_snr, T)
    gauss = GaussianEps(sched, MU, S)
    if sampler == "dpm-solver++":
        x_T = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
        x = gauss.ode_map(x_T, sched.num_timesteps - 1)
        return x.mean(), x.std()
    ts = sampler_timesteps(sched.num_timesteps, steps, sampler)
    return gauss.ddim_chain(ts, eta=1.0 if sampler == "ddpm" else 0.0)


# ----- the optimal predictors and the conversion -----


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_optimal_predictors_convert_to_the_optimal_eps_and_x0(prediction_type, zero_terminal_snr):
    sched = schedule(zero_terminal_snr)
    gauss = GaussianEps(sched, MU, S)
    x = np.random.default_rng(0).standard_normal((3, 1, 2, 2)).astype(np.float32)
    for t in (0, 1, 50, 150, 199):
        tt = Tensor(np.full(3, t, np.int32))
        eps, x0 = model_output_to_eps_x0(sched, Tensor(x), t, gauss.predictor(prediction_type)(Tensor(x), tt),
                                         prediction_type)
        a, b = np.sqrt(sched.alphas_cumprod[t]), np.sqrt(1.0 - sched.alphas_cumprod[t])
        var = a * a * S * S + b * b
        np.testing.assert_allclose(x0.asnumpy(), MU + a * S * S * (x - a * MU) / var, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(eps.asnumpy(), b * (x - a * MU) / var, rtol=1e-4, atol=2e-3 if t == 0 else 1e-4)
    if zero_terminal_snr:  # alpha_bar_T = 0: eps = x_T and x_0 = E[x_0] = mu
        eps, x0 = model_output_to_eps_x0(sched, Tensor(x), 199,
                                         gauss.predictor(prediction_type)(Tensor(x), Tensor(np.full(3, 199, np.int32))),
                                         prediction_type)
        np.testing.assert_allclose(eps.asnumpy(), x, atol=1e-6)
        np.testing.assert_allclose(x0.asnumpy(), MU, atol=1e-6)


# ----- every sampler gives the same distribution with every objective -----


@pytest.mark.parametrize("sampler,steps,T", RUNS)
def test_every_sampler_gives_the_eps_result_with_x0_and_v(sampler, steps, T):
    want = run(sampler, steps, T, "eps")
    mean, std = exact_chain(sampler, steps, T, False)
    assert abs(want.mean() - mean) < TOL and abs(want.std() - std) < TOL, (want.mean(), mean, want.std(), std)
    for prediction_type in ("x0", "v"):
        got = run(sampler, steps, T, prediction_type)
        assert abs(got.mean() - mean) < TOL and abs(got.std() - std) < TOL, prediction_type
        # same seed, same noise: the same samples up to float32 rounding of the conversions
        np.testing.assert_allclose(got, want, atol=2e-3, err_msg=prediction_type)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_clipping_acts_on_the_x0_of_every_objective(prediction_type):
    """clip_denoised clips the x_0 prediction whatever the network outputs (DPM-Solver++, 10 steps)."""
    want = run("dpm-solver++", 20, 200, "eps", clip=True)
    got = run("dpm-solver++", 20, 200, prediction_type, clip=True)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert not np.allclose(got, run("dpm-solver++", 20, 200, prediction_type), atol=1e-2)  # clipping did act


# ----- zero terminal SNR -----


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_rescale_is_algorithm_1(name):
    """alpha_bar_T = 0 exactly; sqrt(alpha_bar) is the old one shifted and scaled (first value kept)."""
    betas = make_beta_schedule(name, 300)
    old = np.sqrt(np.cumprod(1.0 - betas))
    new_betas = rescale_zero_terminal_snr(betas)
    new = np.sqrt(np.cumprod(1.0 - new_betas))
    assert new[-1] == 0.0 and new_betas[-1] == 1.0
    assert np.all((new_betas[:-1] > 0) & (new_betas[:-1] < 1))
    np.testing.assert_allclose(new[0], old[0], rtol=1e-12)
    # a linear map of the old sqrt(alpha_bar): new = (old - old_T) * old_0 / (old_0 - old_T)
    np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), rtol=1e-9, atol=1e-12)
    sched = Schedule(new_betas)
    assert sched.alphas_cumprod[-1] == 0.0 and sched.snr[-1] == 0.0
    assert np.all(np.diff(sched.alphas_cumprod) < 0)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
@pytest.mark.parametrize("sampler,steps,T", RUNS)
def test_zero_terminal_snr_samplers_match_the_exact_chain(sampler, steps, T, prediction_type):
    """From pure noise at alpha_bar_T = 0 each sampler gives its exact chain's distribution,
    and the ZTSNR schedule removes the mean bias that the tutorial schedule has (NOTES.md)."""
    got = run(sampler, steps, T, prediction_type, zero_terminal_snr=True)
    mean, std = exact_chain(sampler, steps, T, True)
    assert abs(got.mean() - mean) < TOL and abs(got.std() - std) < TOL, (got.mean(), mean, got.std(), std)
    assert abs(got.mean() - MU) < TOL  # with x_T ~ N(0, I) exact, the mean is right at any step count
    assert abs(run(sampler, steps, T, "eps").mean() - MU) > abs(got.mean() - MU)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_zero_terminal_snr_sampling_starts_at_the_last_timestep(sampler):
    sched = schedule(True)
    calls = []
    model = GaussianEps(sched, MU, S).predictor("v")

    def spy(x, t):
        calls.append(int(t.asnumpy()[0]))
        return model(x, t)

    out = sample(spy, sched, (4, 1, 2, 2), sampler, 5, progress=False, prediction_type="v")
    assert calls[0] == 199 and sched.alphas_cumprod[calls[0]] == 0.0 and np.isfinite(out.asnumpy()).all()
    with pytest.raises(ValueError, match="eps-prediction"):
        sample(GaussianEps(sched, MU, S), sched, (4, 1, 2, 2), sampler, 5, progress=False)


def test_config_keys_and_zero_terminal_snr_needs_v_or_x0():
    cfg = load_config(None, ["prediction_type=v", "zero_terminal_snr=true", "loss_weighting=min_snr"])
    assert cfg["min_snr_gamma"] == 5.0 and cfg["prediction_type"] == "v"
    load_config(None, ["prediction_type=x0", "zero_terminal_snr=true"])
    with pytest.raises(UserError, match="zero_terminal_snr.*prediction_type v"):
        load_config(None, ["zero_terminal_snr=true"])
    with pytest.raises(UserError, match="prediction_type"):
        load_config(None, ["prediction_type=score"])
    with pytest.raises(UserError, match="loss_weighting"):
        load_config(None, ["loss_weighting=p2"])
    with pytest.raises(UserError, match="min_snr_gamma"):
        load_config(None, ["min_snr_gamma=0"])


# ----- min-SNR weights -----


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_the_formulas(gamma):
    betas = make_beta_schedule("linear", 1000)
    abar = np.cumprod(1.0 - betas)
    sched = Schedule(betas)
    for t in (0, 10, 100, 300, 500, 700, 999):
        snr = abar[t] / (1.0 - abar[t])
        want = {"eps": min(snr, gamma) / snr, "x0": min(snr, gamma), "v": min(snr, gamma) / (snr + 1.0)}
        for prediction_type, w in want.items():
            got = loss_weights(sched, prediction_type, "min_snr", gamma).asnumpy()[t]
            assert got == pytest.approx(w, rel=1e-6), (t, prediction_type)
            assert min_snr_weights(sched.snr, prediction_type, gamma)[t] == pytest.approx(w, rel=1e-12)
    assert loss_weights(sched, "v", "none", gamma) is None
    with pytest.raises(ValueError, match="SNR = 0"):
        min_snr_weights(schedule(True).snr, "eps")


class PredictsFromX0:
    """A fixed x_0 guess x0_hat, output in the parametrization of prediction_type (given x_t and t)."""

    def __init__(self, sched, x0_hat, prediction_type):
        self.sched, self.x0_hat, self.prediction_type = sched, x0_hat, prediction_type

    def __call__(self, x_t, t):
        x_t, t = x_t.asnumpy().astype(np.float64), t.asnumpy()
        a = np.sqrt(self.sched.alphas_cumprod[t])[:, None, None, None]
        s = np.sqrt(1.0 - self.sched.alphas_cumprod[t])[:, None, None, None]
        eps_hat = (x_t - a * self.x0_hat) / s
        out = {"x0": self.x0_hat, "eps": eps_hat, "v": a * eps_hat - s * self.x0_hat}[self.prediction_type]
        return Tensor(out.astype(np.float32))


def test_min_snr_weighted_mse_is_the_same_x0_loss_for_every_objective():
    """Hang et al. 2023: with min-SNR weights the eps-, x0- and v-MSE of one x_0 guess all equal
    mean_n min(SNR_n, gamma) ||x_0 - x0_hat||^2 / D, computed here in NumPy."""
    sched = Schedule(make_beta_schedule("linear", 1000))
    rng = np.random.default_rng(3)
    x0, noise = rng.uniform(-1, 1, (6, 1, 4, 4)), rng.standard_normal((6, 1, 4, 4))
    x0_hat = x0 + 0.3 * rng.standard_normal(x0.shape)
    t = np.array([0, 5, 50, 200, 600, 999], np.int32)
    snr = sched.snr[t]
    want = np.mean(np.minimum(snr, 5.0) * ((x0 - x0_hat) ** 2).reshape(6, -1).mean(1))
    for prediction_type in ("eps", "x0", "v"):
        weights = loss_weights(sched, prediction_type, "min_snr", 5.0)
        got = p_losses(PredictsFromX0(sched, x0_hat, prediction_type), sched, x0.astype(np.float32), t,
                       noise.astype(np.float32), "l2", prediction_type=prediction_type, weights=weights)
        assert float(got.asnumpy()) == pytest.approx(want, rel=2e-3), prediction_type


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_p_losses_targets_and_weights_for_every_loss_type(loss_type, prediction_type):
    sched = Schedule(make_beta_schedule("linear", 50))
    rng = np.random.default_rng(4)
    x0, noise = rng.uniform(-1, 1, (5, 1, 3, 3)), rng.standard_normal((5, 1, 3, 3))
    t = np.array([0, 3, 20, 40, 49], np.int32)
    pred = 2.0 * rng.standard_normal(x0.shape)  # errors both below and above huber's delta = 1
    a = np.sqrt(sched.alphas_cumprod[t])[:, None, None, None]
    s = np.sqrt(1.0 - sched.alphas_cumprod[t])[:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction_type]
    d = np.abs(pred - target)
    elem = {"l1": d, "l2": d * d, "huber": np.where(d < 1.0, 0.5 * d * d, d - 0.5)}[loss_type]
    snr = sched.snr[t]
    w = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5), "v": np.minimum(snr, 5) / (snr + 1)}
    model = lambda x, tt: Tensor(pred.astype(np.float32))  # noqa: E731
    args = (model, sched, x0.astype(np.float32), t, noise.astype(np.float32), loss_type)
    plain = float(p_losses(*args, prediction_type=prediction_type).asnumpy())
    assert plain == pytest.approx(elem.mean(), rel=1e-5)
    weighted = float(p_losses(*args, prediction_type=prediction_type,
                              weights=loss_weights(sched, prediction_type, "min_snr")).asnumpy())
    assert weighted == pytest.approx(np.mean(w[prediction_type] * elem.reshape(5, -1).mean(1)), rel=1e-5)


# ----- guidance -----


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_guidance_on_outputs_is_guidance_in_eps_space(prediction_type):
    """Combining x0/v outputs as Ho & Salimans combine eps gives exactly the guided eps (and x_0)."""
    sched = schedule(True)
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((4, 1, 3, 3)).astype(np.float32))
    table = rng.standard_normal((11, 1, 3, 3)).astype(np.float32)  # one fixed output per class, 10 = null

    def net(x_in, t, y):
        return x_in * 0.5 + Tensor(table[y.asnumpy()])

    classes, w = [3, 3, 7, 0], 2.5
    for t in (0, 100, 199):
        tt = Tensor(np.full(4, t, np.int32))
        eps, x0 = model_output_to_eps_x0(sched, x, t, guided_eps_fn(net, classes, w, 10)(x, tt), prediction_type)
        cond = model_output_to_eps_x0(sched, x, t, net(x, tt, Tensor(np.array(classes, np.int32))), prediction_type)
        null = model_output_to_eps_x0(sched, x, t, net(x, tt, Tensor(np.full(4, 10, np.int32))), prediction_type)
        np.testing.assert_allclose(eps.asnumpy(), ((1 + w) * cond[0] - w * null[0]).asnumpy(), atol=1e-4)
        np.testing.assert_allclose(x0.asnumpy(), ((1 + w) * cond[1] - w * null[1]).asnumpy(), atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_diffusers_scheduler_objective_and_zero_terminal_snr_round_trip(prediction):
    """diffusers' DDPMScheduler (prediction_type, rescale_betas_zero_snr) <-> ddpm_ms's keys: same betas."""
    diffusers = pytest.importorskip("diffusers")
    from ddpm_ms import convert
    from ddpm_ms.factory import create_schedule

    ztsnr = prediction != "epsilon"  # refused with eps, as in load_config
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type=prediction,
                                    rescale_betas_zero_snr=ztsnr)
    values = convert.scheduler_config_to_cfg(dict(sched.config))
    cfg = load_config(None, values)
    assert cfg["prediction_type"] == {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction]
    assert cfg["zero_terminal_snr"] == ztsnr
    np.testing.assert_allclose(create_schedule(cfg).alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=1e-5,
                               atol=1e-7)
    back = convert.cfg_to_scheduler_config(cfg)
    assert back["prediction_type"] == prediction and back["rescale_betas_zero_snr"] == ztsnr
