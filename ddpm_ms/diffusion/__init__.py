"""The diffusion math: noise schedules, the Gaussian diffusion and its objectives, samplers, chain frames."""

# What the modules here implement, for ddpm_ms.config to check without importing MindSpore:
# keep this file free of MindSpore imports.
SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")  # schedules.make_beta_schedule (config key beta_schedule)
LOSS_TYPES = ("l1", "l2", "huber")  # gaussian.elementwise_loss (config key loss_type)
VARIANCE_TYPES = ("posterior", "beta")  # gaussian.reverse_variance (config key variance)
PREDICTION_TYPES = ("eps", "x0", "v")  # what the network predicts (see gaussian.model_output_to_eps_x0)
LOSS_WEIGHTINGS = ("none", "min_snr")  # gaussian.loss_weights (config key loss_weighting)
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "heun")  # samplers.sample (heun: Karras et al. 2022, Alg. 1 / 2)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "log_normal")  # timesteps.TimestepSampler (timestep_sampling)
