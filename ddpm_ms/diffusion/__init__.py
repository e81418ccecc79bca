"""The diffusion math: noise schedules, the Gaussian diffusion and its objectives, samplers, chain frames."""
