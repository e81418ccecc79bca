"""Closed-form diffusion of Gaussian data, for testing samplers without a network.

For x_0 ~ N(mu, s^2) i.i.d. per pixel and x_t = a x_0 + b eps (a = sqrt(abar_t),
b = sqrt(1 - abar_t)), x_t ~ N(a mu, a^2 s^2 + b^2) and the optimal (MMSE) noise
predictor is E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2).

The probability-flow ODE keeps each marginal Gaussian and is linear, so it maps
x_t -> x_t' = a' mu + sqrt(a'^2 s^2 + b'^2) (x_t - a mu) / sqrt(a^2 s^2 + b^2).

The optimal x_0- and v-predictors follow from the same Gaussian conditional:
E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2) and E[v | x_t] = a E[eps | x_t] - b E[x_0 | x_t]
(v = a eps - b x_0, Salimans & Ho 2022); they stay finite at a = 0 (zero terminal SNR).

A DDIM step (Song et al. 2021, Eq. 12) with this predictor is linear too:
x_0_hat = mu + a s^2 (x_t - a mu) / v and eps_hat = b (x_t - a mu) / v (v = a^2 s^2 + b^2),
so x_t' - a' mu = c (x_t - a mu) + n z with c = (a a' s^2 + b sqrt(b'^2 - sigma^2)) / v:
the exact output distribution of a discretised chain follows by recursion.
"""

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops


class GaussianEps:
    """eps_fn(x, t) for data N(mu, s^2), evaluated on MindSpore tensors (float32)."""

    def __init__(self, sched, mu=-0.4, s=0.5):
        self.sched, self.mu, self.s = sched, float(mu), float(s)
        # eps_hat = c1 x_t - c0 with c1 = b / (a^2 s^2 + b^2), c0 = a mu c1, per timestep
        a, b = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
        self.c1_np = b / (a * a * self.s**2 + b * b)
        self.c0_np = a * self.mu * self.c1_np
        self.c1, self.c0 = Tensor(self.c1_np, ms.float32), Tensor(self.c0_np, ms.float32)

    def __call__(self, x, t):
        t_np = t.asnumpy()
        if np.all(t_np == t_np[0]):
            # one timestep for the batch (as in the samplers): Python-float coefficients,
            # since ops on broadcast [N,1,1,1] tensors are slow on MindSpore CPU
            i = int(t_np[0])
            return x * float(self.c1_np[i]) - float(self.c0_np[i])
        bshape = (-1,) + (1,) * (len(x.shape) - 1)
        return x * ops.gather(self.c1, t, 0).reshape(bshape) - ops.gather(self.c0, t, 0).reshape(bshape)

    def predictor(self, prediction_type):
        """The optimal network for prediction_type "eps", "x0" or "v" (eps_fn(x, t) on tensors)."""
        return self if prediction_type == "eps" else GaussianPrediction(self, prediction_type)

    def _ab(self, t):
        """(a, b) at index t; t = -1 means alpha_bar = 1 (clean data)."""
        abar = 1.0 if t < 0 else float(self.sched.alphas_cumprod[t])
        return np.sqrt(abar), np.sqrt(1.0 - abar)

    def marginal_std(self, t):
        a, b = self._ab(t)
        return float(np.sqrt(a * a * self.s**2 + b * b))

    def ode_map(self, x, t_from, t_to=-1):
        """Exact probability-flow ODE solution (float64 NumPy) from index t_from to t_to."""
        a, _ = self._ab(t_from)
        a_to, _ = self._ab(t_to)
        scale = self.marginal_std(t_to) / self.marginal_std(t_from)
        return a_to * self.mu + scale * (np.asarray(x, dtype=np.float64) - a * self.mu)

    def ddim_chain(self, ts, eta=0.0, noise="sigma", x_T=None):
        """Exact result of DDIM over the indices ts and a final step to abar = 1.

        noise: "sigma" (noise scale = the sigma of Eq. 16, DDIM) or "beta" (noise scale
        sqrt(1 - abar_t / abar_t'), the respaced DDPM with variance="beta"; none on the
        final step). With x_T given (eta = 0 only) returns the mapped samples;
        otherwise (mean, std) of the output for x_T ~ N(0, I).
        """
        ts = [int(t) for t in ts] + [-1]
        a_T, _ = self._ab(ts[0])
        dev_mean, dev_var, scale = -a_T * self.mu, 1.0, 1.0
        for t, t_next in zip(ts[:-1], ts[1:]):
            (a, b), (a2, b2) = self._ab(t), self._ab(t_next)
            jump = 1.0 - a * a / (a2 * a2)  # 1 - abar_t / abar_t'
            sigma2 = eta**2 * (b2 * b2) / (b * b) * jump
            c = (a * a2 * self.s**2 + b * np.sqrt(max(b2 * b2 - sigma2, 0.0))) / (a * a * self.s**2 + b * b)
            n2 = sigma2 if noise == "sigma" else (jump if t_next >= 0 else 0.0)
            dev_mean, dev_var, scale = c * dev_mean, c * c * dev_var + n2, c * scale
        if x_T is not None:
            assert eta == 0.0
            return self.mu + scale * (np.asarray(x_T, dtype=np.float64) - a_T * self.mu)
        return self.mu + dev_mean, float(np.sqrt(dev_var))


class GaussianPrediction:
    """The optimal x_0- or v-predictor for the data of a GaussianEps, from the closed forms above."""

    def __init__(self, eps, prediction_type):
        assert prediction_type in ("x0", "v")
        self.eps, self.prediction_type = eps, prediction_type
        sched, mu, s = eps.sched, eps.mu, eps.s
        a, b = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
        var = a * a * s**2 + b * b
        # x0_hat = k1 x_t + k0, eps_hat = c1 x_t - c0; v_hat = a eps_hat - b x0_hat
        k1 = a * s**2 / var
        k0 = mu - a * mu * k1
        if prediction_type == "x0":
            self.c1_np, self.c0_np = k1, -k0
        else:
            self.c1_np, self.c0_np = a * eps.c1_np - b * k1, a * eps.c0_np + b * k0

    def __call__(self, x, t):
        i = int(t.asnumpy()[0])
        assert np.all(t.asnumpy() == i)
        return x * float(self.c1_np[i]) - float(self.c0_np[i])


class CorrelatedGaussian:
    """Data x_0 ~ N(mu, Sigma) over d correlated pixels (images [N, 1, 1, d]): the optimal denoiser
    (linear in x_t for every t) and the affine maps that chains built from it apply.

    With a = sqrt(abar_t), b = sqrt(1 - abar_t): x_t ~ N(a mu, a^2 Sigma + b^2 I) jointly with x_0, so
    E[x_0 | x_t] = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu) = K_t x_t + k_t and
    E[eps | x_t] = (x_t - a E[x_0 | x_t]) / b. The true conditional of pixels U given pixels K is
    N(mu_U + S_UK S_KK^-1 (x_K - mu_K), S_UU - S_UK S_KK^-1 S_KU).
    """

    def __init__(self, sched, mu, cov):
        self.sched, self.mu, self.cov = sched, np.asarray(mu, np.float64), np.asarray(cov, np.float64)
        self.d = len(self.mu)
        eye = np.eye(self.d)
        self.K, self.k = [], []
        for abar in sched.alphas_cumprod:
            a, b2 = np.sqrt(abar), 1.0 - abar
            gain = a * self.cov @ np.linalg.inv(a * a * self.cov + b2 * eye)
            self.K.append(gain)
            self.k.append(self.mu - a * gain @ self.mu)

    def abar(self, t):
        return 1.0 if t < 0 else float(self.sched.alphas_cumprod[t])

    def x0_map(self, t):
        """(K, k): E[x_0 | x_t] = K x_t + k."""
        return self.K[t], self.k[t]

    def eps_map(self, t):
        """(E, e): E[eps | x_t] = E x_t + e."""
        a, b = np.sqrt(self.abar(t)), np.sqrt(1.0 - self.abar(t))
        return (np.eye(self.d) - a * self.K[t]) / b, -a * self.k[t] / b

    def __call__(self, x, t):
        """eps_fn on MindSpore tensors x [N, 1, 1, d], t [N] (one timestep for the batch)."""
        i = int(t.asnumpy()[0])
        E, e = self.eps_map(i)
        flat = x.asnumpy().reshape(-1, self.d).astype(np.float64)
        return Tensor((flat @ E.T + e).astype(np.float32).reshape(x.shape))

    def conditional(self, known, x_known):
        """(mean, cov) of the unknown pixels given the known ones (boolean mask ``known``)."""
        u, k = ~known, known
        s_uk = self.cov[np.ix_(u, k)]
        solve = s_uk @ np.linalg.inv(self.cov[np.ix_(k, k)])
        mean = self.mu[u] + solve @ (np.asarray(x_known) - self.mu[k])
        return mean, self.cov[np.ix_(u, u)] - solve @ s_uk.T


def gaussian_kl(m0, c0, m1, c1):
    """KL(N(m0, c0) || N(m1, c1))."""
    inv1 = np.linalg.inv(c1)
    diff = m1 - m0
    return 0.5 * (np.trace(inv1 @ c0) + diff @ inv1 @ diff - len(m0)
                  + np.linalg.slogdet(c1)[1] - np.linalg.slogdet(c0)[1])
