"""How long a run is and which learning rate each step uses."""

import sys

from mindspore import nn


def learning_rates(lr, min_lr, total_steps, warmup_steps=0, schedule="cosine"):
    """Per-step learning rates: linear warm-up, then cosine decay (nn.cosine_decay_lr) or constant."""
    if schedule == "cosine" and total_steps > 1:
        rates = nn.cosine_decay_lr(min_lr, lr, total_steps, 1, total_steps)
    else:
        rates = [lr] * total_steps
    warm = min(warmup_steps, total_steps)
    return [lr * (i + 1) / warm if i < warm else r for i, r in enumerate(rates)]


def steps_and_epochs(epochs, max_steps, steps_per_epoch, notify=True):
    """(epochs, total steps) of a run: ``epochs`` full epochs, or exactly ``max_steps`` steps when set.

    max_steps below the epochs' steps ends the run early; above them, the run gets the epochs it
    needs and one notice line says so (not silently fewer steps than asked for).
    """
    total = epochs * steps_per_epoch
    if not max_steps:
        return epochs, total
    if max_steps > total:
        needed = -(-max_steps // steps_per_epoch)
        if notify:
            print(f"note: max_steps={max_steps} needs {needed} epochs of {steps_per_epoch} steps; training "
                  f"{needed} epochs instead of epochs={epochs} (the run still stops at step {max_steps})",
                  file=sys.stderr, flush=True)
        epochs = needed
    return epochs, max_steps
