"""Recompute the erf coefficients of ddpm_ms/onnx_forms.py and their float32 error (needs SciPy).

    python scripts/fit_erf.py

Fits, in float64 by Chebyshev least squares, P(u) = erf(sqrt(u)) / sqrt(u) - 1 on u = z^2 in
[0, 1] (degree 8) and Q(s) = erfcx(z) = exp(z^2) erfc(z) on s = 2 / (2 + z) in (0, 2/3]
(z >= 1, degree 8); prints them as float32 values, then the largest error of the two-piece
erf evaluated in float32 (as the exported graph does) on 3.6 M points of [-9, 9].
"""

import numpy as np
from scipy.special import erf, erfcx

SPLIT = 1.0
DEGREE = 8
P = np.polynomial


def fit_small():
    u = np.linspace(0.0, SPLIT**2, 20001)[1:]
    z = np.sqrt(u)
    cheb = P.Chebyshev.fit(u, erf(z) / z - 1.0, DEGREE, domain=[0.0, SPLIT**2])
    return cheb.convert(kind=P.Polynomial, domain=[0.0, SPLIT**2], window=[0.0, SPLIT**2]).coef


def fit_large():
    s_max = 2.0 / (2.0 + SPLIT)
    k = np.arange(6000)
    s = s_max * (0.5 + 0.5 * np.cos(np.pi * (k + 0.5) / len(k)))  # Chebyshev nodes in (0, s_max)
    s = s[s > 1e-5]
    z = 2.0 / s - 2.0
    cheb = P.Chebyshev.fit(s, erfcx(z), DEGREE, domain=[0.0, s_max])
    return cheb.convert(kind=P.Polynomial, domain=[0.0, s_max], window=[0.0, s_max]).coef


def horner32(coefs, v):
    out = np.full_like(v, np.float32(coefs[-1]))
    for c in coefs[-2::-1]:
        out = (out * v + np.float32(c)).astype(np.float32)
    return out


def erf32(x, small, large):
    """The graph's formula (onnx_forms.erf) in float32 NumPy."""
    a = np.abs(x)
    zs, zl = np.minimum(a, np.float32(SPLIT)), np.maximum(a, np.float32(SPLIT))
    e_small = zs + zs * horner32(small, zs * zs)
    s = (np.float32(2) / (np.float32(2) + zl)).astype(np.float32)
    e_large = np.float32(1) - np.exp(-(zl * zl)) * horner32(large, s)
    return np.where(x >= 0, 1, -1).astype(np.float32) * np.where(a < SPLIT, e_small, e_large)


def main():
    small, large = fit_small(), fit_large()
    print("ERF_SMALL =", tuple(float(np.float32(c)) for c in small))
    print("ERF_LARGE =", tuple(float(np.float32(c)) for c in large))
    x = np.linspace(-9, 9, 3_600_001).astype(np.float32)
    err = np.abs(erf32(x, small, large).astype(np.float64) - erf(x.astype(np.float64)))
    print(f"max |erf32 - erf| on [-9, 9]: {err.max():.3g} at x = {x[err.argmax()]:.6g}")


if __name__ == "__main__":
    main()
