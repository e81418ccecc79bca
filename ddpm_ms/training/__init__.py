"""A training run: the compiled step, the trainer, LR schedule, EMA, msrun, the run directory."""
