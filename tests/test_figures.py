"""Slerp and the interpolation noise."""

import numpy as np
import pytest

from ddpm_ms.utils.errors import UserError
from ddpm_ms.figures import interpolation_noise, parse_steps, slerp


def test_slerp_endpoints_and_great_circle():
    rng = np.random.default_rng(0)
    z0, z1 = rng.standard_normal((2, 1, 8, 8))
    assert np.allclose(slerp(z0, z1, 0.0), z0) and np.allclose(slerp(z0, z1, 1.0), z1)
    # orthogonal, equal norms: every point keeps the norm and the angle moves linearly
    a = np.zeros(64)
    a[0] = 3.0
    b = np.zeros(64)
    b[1] = 3.0
    for alpha in (0.25, 0.5, 0.9):
        p = slerp(a, b, alpha)
        assert np.linalg.norm(p) == pytest.approx(3.0)
        assert np.degrees(np.arctan2(p[1], p[0])) == pytest.approx(90 * alpha)
    # a straight line would shrink the midpoint of two independent noise maps by about 1/sqrt(2)
    mid = slerp(z0, z1, 0.5)
    assert np.linalg.norm(mid) > 0.9 * min(np.linalg.norm(z0), np.linalg.norm(z1))
    assert np.allclose(slerp(z0, z0, 0.3), z0)  # parallel: falls back to the line


def test_interpolation_noise_rows():
    noise = interpolation_noise((1, 4, 4), pairs=2, points=5, seed=3)
    assert noise.shape == (10, 1, 4, 4) and noise.dtype == np.float32
    rng = np.random.default_rng(3)
    first = rng.standard_normal((2, 1, 4, 4))
    assert np.allclose(noise[0], first[0], atol=1e-6) and np.allclose(noise[4], first[1], atol=1e-6)
    assert not np.allclose(noise[5], noise[0])


def test_parse_steps():
    assert parse_steps("5, 10,full", 1000) == [5, 10, 1000]
    with pytest.raises(UserError):
        parse_steps("0,5", 1000)
    with pytest.raises(UserError):
        parse_steps("many", 1000)
