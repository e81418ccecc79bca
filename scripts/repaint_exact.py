"""How far each inpainting chain lands from the true conditional, exactly, on correlated Gaussian data.

    python scripts/repaint_exact.py

The data and the exact chains are those of tests/test_editing.py (4 pixels, Sigma_ij = 0.25 * 0.9^|i-j|,
pixels 0 and 1 known at 0.8 and 0.7, the optimal denoiser, the linear schedule with T = 1000): each
chain's output is Gaussian, propagated in float64. Prints KL(chain || true conditional) and the
largest error of the fill's mean, for plain replacement with each sampler and for RePaint's resampling.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import numpy as np  # noqa: E402

from test_editing import KNOWN, X_KNOWN, data, exact_inpainting, gaussian_kl  # noqa: E402

from ddpm_ms.diffusion.editing import model_calls, repaint_moves  # noqa: E402
from ddpm_ms.diffusion.samplers import sampler_timesteps  # noqa: E402

CHAINS = [("ddpm", 50, 10, 1), ("ddpm", 250, 10, 1), ("ddpm", 1000, 10, 1), ("ddim", 50, 10, 1),
          ("dpm-solver++", 20, 10, 1), ("ddpm", 50, 5, 4), ("ddpm", 250, 10, 2), ("ddpm", 250, 10, 5),
          ("ddpm", 250, 10, 10), ("ddpm", 1000, 10, 10), ("ddpm", 1000, 10, 20)]


def main():
    true_mean, true_cov = data().conditional(KNOWN, X_KNOWN)
    std = np.sqrt(np.diag(true_cov))
    print(f"true conditional mean {np.round(true_mean, 4).tolist()}, std {np.round(std, 4).tolist()}")
    print("| sampler | steps | jump length | samples per block | network calls | KL to the truth | max mean error |")
    print("|---|---|---|---|---|---|---|")
    for sampler, steps, jump, n_sample in CHAINS:
        mean, cov = exact_inpainting(sampler, steps, jump, n_sample)
        calls = model_calls(repaint_moves(sampler_timesteps(1000, steps, sampler), jump, n_sample))
        resampled = (jump, n_sample) if n_sample > 1 else ("-", 1)
        print(f"| {sampler} | {steps} | {resampled[0]} | {resampled[1]} | {calls} | "
              f"{gaussian_kl(mean, cov, true_mean, true_cov):.3f} | {np.abs(mean - true_mean).max():.3f} |")


if __name__ == "__main__":
    main()
