"""Sample quality during training: every ``eval_every_steps`` steps, ``eval_num`` samples from the EMA
weights (the config's sampler and sample_steps, seed = the run's seed) scored as ``ddpm-evaluate``
scores them: FD, precision and recall in the dataset classifier's feature space, class shares.

The numbers equal those of ``ddpm-evaluate --checkpoint <that step's checkpoint> --num eval_num
--seed <seed>``: the same images (same weights, sampler and noise) through the same classifier and
:func:`ddpm_ms.evaluation.metrics.evaluate_images`. They go to ``quality.csv`` and TensorBoard, and
with ``keep_best`` the checkpoint of the lowest FD so far is kept as ``checkpoints/best.ckpt``.
A 256-dimensional feature covariance needs more than 256 samples: ``eval_num`` > 256 (500 gives a
usable trend; the README's reference numbers use 10,000).
"""

import sys
import time

from ddpm_ms.utils.errors import UserError


def wanted(cfg, explicit):
    """Whether this run evaluates during training (``explicit``: eval_every_steps was set on the command line).

    A dataset without a feature classifier (an image folder) turns an inherited setting off with one
    notice, and refuses an explicit one; ``eval_num`` below the feature dimension is an error.
    """
    from ddpm_ms.evaluation.classifier import FEATURE_DIM, require_feature_network

    if not cfg["eval_every_steps"]:
        return False
    try:
        require_feature_network(cfg["dataset"])
    except UserError as e:
        if explicit:
            raise UserError(f"eval_every_steps: {e}") from None
        print(f"note: no quality evaluation during training: dataset {cfg['dataset']!r} has no feature classifier "
              "(eval_every_steps ignored)", file=sys.stderr, flush=True)
        return False
    if cfg["eval_num"] <= FEATURE_DIM:
        raise UserError(f"eval_num must be above {FEATURE_DIM} (the classifier's feature dimension: FD needs an "
                        f"invertible-ish {FEATURE_DIM}x{FEATURE_DIM} covariance), got {cfg['eval_num']}; 500 is a "
                        "good start")
    return True


def row_of(step, epoch, result, seconds):
    """One quality.csv row (QUALITY_FIELDS) of an evaluate_images result."""
    shares = result.get("class_shares")
    return {"step": step, "epoch": epoch, "fd": result["fd"], "fd_floor": result["fd_floor"],
            "precision": result["precision"], "recall": result["recall"], "is": result["is"],
            "min_class_share": min(shares) if shares else None, "num_samples": result["num_samples"],
            "seconds": seconds}


class QualityMonitor:
    """The dataset's classifier and real reference, loaded (or trained and cached) once at the run's start."""

    def __init__(self, cfg, data_dir, progress=True):
        from ddpm_ms.evaluation.metrics import prepare_reference

        self.cfg = cfg
        self.net, self.info, self.reference = prepare_reference(data_dir, None, progress, cfg["dataset"])

    def evaluate(self, trainer, step, epoch, progress=True):
        """Sample eval_num images with the EMA weights and score them -> a quality.csv row (as a dict)."""
        from ddpm_ms.evaluation.metrics import evaluate_images

        t0 = time.perf_counter()
        images, _ = trainer.generate(self.cfg["eval_num"], seed=self.cfg["seed"], progress=progress)
        result = evaluate_images(images, self.net, self.reference, seed=self.cfg["seed"])
        return row_of(step, epoch, result, time.perf_counter() - t0), images
