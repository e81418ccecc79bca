"""Recompute the erf coefficients of ddpm_ms/interop/onnx_forms.py and their float32 error (needs SciPy).

    python scripts/fit_erf.py

Float64 Chebyshev least-squares fits, converted to power series:
* P(u) = erf(sqrt(u)) / sqrt(u) - 1 on u = z^2 in [0, 1], degree 8 (erf(z) = z + z P(z^2));
* for each of [1, 2], [2, 3], [3, 4]: erfc(z) = 1 - erf(z) as a polynomial of degree 9 in
  z - (the interval's midpoint) (erf(z) = 1 - that);
and erf(z) = 1 from z = 4 on (erf(4) = 1 - 1.5e-8). Prints them as float32 values, then the
largest error of the piecewise erf evaluated in float32 (as the exported graph does: additions
and multiplications only, so every runtime rounds it the same way) on 3.6 M points of [-9, 9].
"""

import numpy as np
from scipy.special import erf

P = np.polynomial
SMALL_DEGREE = 8
PIECES = ((1.0, 2.0), (2.0, 3.0), (3.0, 4.0))
PIECE_DEGREE = 9


def power_series(cheb, domain):
    return cheb.convert(kind=P.Polynomial, domain=domain, window=domain).coef


def fit_small():
    u = np.linspace(0.0, 1.0, 20001)[1:]
    z = np.sqrt(u)
    return power_series(P.Chebyshev.fit(u, erf(z) / z - 1.0, SMALL_DEGREE, domain=[0.0, 1.0]), [0.0, 1.0])


def fit_piece(lo, hi):
    mid = 0.5 * (lo + hi)
    z = np.linspace(lo, hi, 20001)
    domain = [lo - mid, hi - mid]
    return mid, power_series(P.Chebyshev.fit(z - mid, 1.0 - erf(z), PIECE_DEGREE, domain=domain), domain)


def horner32(coefs, v):
    out = np.full_like(v, np.float32(coefs[-1]))
    for c in coefs[-2::-1]:
        out = (out * v + np.float32(c)).astype(np.float32)
    return out


def erf32(x, small, pieces):
    """The graph's formula (onnx_forms.erf) in float32 NumPy."""
    a = np.abs(x)
    zs = np.minimum(a, np.float32(1.0))
    out = zs + zs * horner32(small, zs * zs)
    for (lo, hi), (mid, coefs) in zip(PIECES, pieces):
        zc = (np.clip(a, np.float32(lo), np.float32(hi)) - np.float32(mid)).astype(np.float32)
        out = np.where((a >= lo) & (a < hi), np.float32(1.0) - horner32(coefs, zc), out)
    out = np.where(a >= PIECES[-1][1], np.float32(1.0), out)
    return np.where(x >= 0, 1, -1).astype(np.float32) * out


def main():
    small = fit_small()
    pieces = [fit_piece(lo, hi) for lo, hi in PIECES]
    print("ERF_SMALL =", tuple(float(np.float32(c)) for c in small))
    for (lo, hi), (mid, coefs) in zip(PIECES, pieces):
        print(f"piece [{lo}, {hi}), midpoint {mid}:", tuple(float(np.float32(c)) for c in coefs))
    x = np.linspace(-9, 9, 3_600_001).astype(np.float32)
    err = np.abs(erf32(x, small, pieces).astype(np.float64) - erf(x.astype(np.float64)))
    print(f"max |erf32 - erf| on [-9, 9]: {err.max():.3g} at x = {x[err.argmax()]:.6g}")


if __name__ == "__main__":
    main()
