"""Schedules, q_sample and p_losses against the equations (NumPy float64 references)."""

import ddpm_ms  # noqa: F401

import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ddpm_ms.diffusion.gaussian import Schedule, extract, noise_loss, p_losses, q_sample
from ddpm_ms.diffusion.schedules import make_beta_schedule


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_linear_schedule_endpoints_and_spacing():
    betas = make_beta_schedule("linear", 200, 1e-4, 0.02)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 199)


def test_cosine_schedule_follows_alpha_bar_formula():
    # Nichol & Dhariwal Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1+s)) pi/2)
    T, s = 50, 0.008
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected_alpha_bar = np.array([f[t] / f[0] for t in range(1, T + 1)])
    sched = Schedule(make_beta_schedule("cosine", T))
    # the last beta is clipped at 0.999, so compare all but the last
    assert np.allclose(sched.alphas_cumprod[:-1], expected_alpha_bar[:-1], rtol=1e-10)
    assert sched.betas.max() <= 0.999


def test_quadratic_and_sigmoid_schedules():
    q = make_beta_schedule("quadratic", 10, 1e-4, 0.02)
    assert np.allclose(np.sqrt(q), np.linspace(1e-2, math.sqrt(0.02), 10))
    s = make_beta_schedule("sigmoid", 11, 1e-4, 0.02)
    assert s[5] == pytest.approx((1e-4 + 0.02) / 2)  # sigmoid(0) = 1/2 halfway
    assert np.all(np.diff(s) > 0) and s[0] > 1e-4 and s[-1] < 0.02


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("cubic", 10)


def test_schedule_constants_match_loop_reference():
    betas = make_beta_schedule("linear", 30, 1e-3, 0.2)
    sched = Schedule(betas)
    abar = 1.0
    for t, beta in enumerate(betas):
        abar_prev = abar
        abar *= 1 - beta
        assert sched.alphas_cumprod[t] == pytest.approx(abar, rel=1e-12)
        assert sched.alphas_cumprod_prev[t] == pytest.approx(abar_prev, rel=1e-12)
        # Eq. 7
        assert sched.posterior_variance[t] == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-12)
        assert sched.posterior_mean_coef1[t] == pytest.approx(math.sqrt(abar_prev) * beta / (1 - abar), rel=1e-12)
        assert sched.posterior_mean_coef2[t] == pytest.approx(
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar), rel=1e-12)
        assert sched.sqrt_recipm1_alphas_cumprod[t] == pytest.approx(math.sqrt(1 / abar - 1), rel=1e-12)


def test_tutorial_schedule_does_not_reach_pure_noise():
    # a documented property of T=200 linear betas: alpha_bar_T = 0.132
    sched = Schedule.from_config("linear", 200, 1e-4, 0.02)
    assert sched.alphas_cumprod[-1] == pytest.approx(0.132, abs=0.001)
    assert Schedule.from_config("linear", 1000).alphas_cumprod[-1] < 1e-4


def test_extract_gathers_and_broadcasts():
    a = Tensor(np.arange(10, dtype=np.float32) * 10)
    out = extract(a, Tensor(np.array([3, 0, 9], np.int32)), (3, 1, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.asnumpy().ravel().tolist() == [30.0, 0.0, 90.0]


def test_q_sample_matches_equation_and_statistics():
    sched = Schedule.from_config("linear", 100)
    rng = np.random.default_rng(0)
    n = 20000
    x0 = np.full((n, 1, 2, 2), 0.7, np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.full(n, 60, np.int32)
    xt = q_sample(sched, Tensor(x0), Tensor(t), Tensor(noise)).asnumpy()
    abar = sched.alphas_cumprod[60]
    assert np.allclose(xt, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise, atol=1e-6)
    # q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I): check the moments
    assert xt.mean() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
    assert xt.std() == pytest.approx(math.sqrt(1 - abar), rel=0.01)


def test_q_sample_takes_numpy_arrays():
    sched = Schedule.from_config("linear", 100)
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (3, 1, 4, 4))  # float64 and int64: converted to float32 / int32
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 42, 99])
    expected = q_sample(sched, Tensor(x0, ms.float32), Tensor(t, ms.int32), Tensor(noise, ms.float32))
    for args in [(x0, t, noise), (Tensor(x0, ms.float32), t, noise.astype(np.float32))]:
        xt = q_sample(sched, *args)
        assert isinstance(xt, Tensor) and xt.dtype == ms.float32
        assert np.array_equal(xt.asnumpy(), expected.asnumpy())
    abar = sched.alphas_cumprod[t][:, None, None, None]
    assert np.allclose(expected.asnumpy(), np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_noise_loss_types(loss_type):
    rng = np.random.default_rng(1)
    pred = rng.normal(0, 1.5, (4, 1, 3, 3)).astype(np.float32)
    target = rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32)
    d = (pred - target).astype(np.float64)
    expected = {
        "l1": np.abs(d).mean(),
        "l2": (d ** 2).mean(),
        "huber": np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5).mean(),
    }[loss_type]
    assert abs(d).max() > 1 and abs(d).min() < 1  # both Huber branches are exercised
    got = float(noise_loss(Tensor(pred), Tensor(target), loss_type).asnumpy())
    assert got == pytest.approx(expected, rel=1e-5)
    if loss_type == "huber":  # the same as MindSpore's SmoothL1Loss with beta 1
        assert got == pytest.approx(float(nn.SmoothL1Loss()(Tensor(pred), Tensor(target)).mean().asnumpy()),
                                    rel=1e-5)


def test_p_losses_feeds_noisy_input_and_compares_with_noise():
    sched = Schedule.from_config("linear", 50)
    seen = {}

    def model(x, t):  # predicts zero noise; remembers its input
        seen["x"], seen["t"] = x.asnumpy(), t.asnumpy()
        return x * 0

    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (3, 1, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 10, 49], np.int32)
    loss = float(p_losses(model, sched, Tensor(x0), Tensor(t), Tensor(noise), "l2").asnumpy())
    abar = sched.alphas_cumprod[t][:, None, None, None]
    assert np.allclose(seen["x"], np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, atol=1e-6)
    assert seen["t"].tolist() == t.tolist()
    assert loss == pytest.approx((noise.astype(np.float64) ** 2).mean(), rel=1e-5)


def test_p_losses_takes_numpy_arrays():
    sched = Schedule.from_config("linear", 50)
    seen = []

    def model(x, t, y):  # predicts x_t as the noise; remembers what it was given
        seen.append((x, t, y))
        return x

    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (3, 1, 4, 4))
    noise = rng.standard_normal(x0.shape)
    t, y = np.array([1, 20, 49]), np.array([0, 5, 9])
    from_numpy = p_losses(model, sched, x0, t, noise, "l2", y=y)
    from_tensors = p_losses(model, sched, Tensor(x0, ms.float32), Tensor(t, ms.int32), Tensor(noise, ms.float32),
                            "l2", y=Tensor(y, ms.int32))
    assert float(from_numpy.asnumpy()) == float(from_tensors.asnumpy())
    x, t_seen, y_seen = seen[0]
    assert [type(v) for v in seen[0]] == [Tensor] * 3
    assert (x.dtype, t_seen.dtype, y_seen.dtype) == (ms.float32, ms.int32, ms.int32)
    assert t_seen.asnumpy().tolist() == t.tolist() and y_seen.asnumpy().tolist() == y.tolist()


def test_p_losses_rejects_unknown_loss():
    sched = Schedule.from_config("linear", 5)
    x = Tensor(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="unknown loss_type"):
        p_losses(lambda a, b: a, sched, x, Tensor(np.zeros(1, np.int32)), x, "l3")
