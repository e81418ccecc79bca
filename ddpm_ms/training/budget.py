"""Training for a time budget (config ``train_minutes``): the run's steps fixed once from its measured speed.

A budget run starts with a provisional length, the cap ``epochs * steps_per_epoch`` (the LR table
and the progress bar are sized for it). The clock starts at the first step, so graph compilation
is spent from the budget. After the first step (which compiles) the next ``probe_length(warmup)``
steps are timed between two host reads (half the warm-up, at least ``PROBE_STEPS``: a longer probe
averages over more of a shared machine's ups and downs, and inside the warm-up it changes nothing
else); then

    total = steps done + floor((budget - time spent) / (SLOWDOWN x seconds per probe step)),

at most the cap. SLOWDOWN (1.1) is measured: over whole runs the steps took 8-10% longer on average
than the probe's steps (the 20-minute recipe on the Intel VM: 368 ms in the probe, 399 ms over
3153 steps; the quick recipe: 565 against 620 ms), from checkpoints, log reads and a shared machine.
From then on the run is an ordinary ``max_steps = total`` run: the trainer rewrites the rest of its
LR schedule for ``total`` (``Trainer.set_total_steps``), the number is written into the run's
config.yaml and every checkpoint (as ``max_steps``), and ``--resume`` reads it back instead of
measuring again, so a resumed run continues the same schedule exactly.

What the budget does not count: sampling inside the run after the decision (``eval_every_steps``,
per-epoch grids) and the final samples and GIF. The steps taken before the decision used the
provisional schedule; with ``warmup_steps`` > ``PROBE_STEPS`` + 1 (both shipped budget configs)
the probe ends inside the warm-up, so those are warm-up steps, whose rates do not depend on the
length, so the run equals a ``max_steps = total`` run bit for bit.
"""

import math
import time

PROBE_STEPS = 20  # the fewest steps timed after the compiling first step
SLOWDOWN = 1.1  # a whole run's mean step time over the probe's (measured, see above)


def probe_length(warmup_steps):
    """Steps to time: half the warm-up (it ends inside it), at least PROBE_STEPS."""
    return max(PROBE_STEPS, int(warmup_steps) // 2)


class TimeBudget:
    """Decides a run's total steps from ``minutes`` of training; ``clock`` returns seconds (perf_counter)."""

    def __init__(self, minutes, first_step, cap, probe_steps=PROBE_STEPS, clock=time.perf_counter):
        self.seconds = 60.0 * float(minutes)
        self.first_step, self.cap, self.probe_steps = int(first_step), int(cap), int(probe_steps)
        self.clock = clock
        self.start = self.mark = None
        self.total = None  # set once decided
        self.step_seconds = None

    def started(self):
        """Call just before the first step is launched."""
        self.start = self.clock()

    def wants_sync(self, step):
        """True at the steps after which the caller must wait for the device and call :meth:`observe`."""
        return self.total is None and step in (self.first_step + 1, self.first_step + 1 + self.probe_steps)

    def observe(self, step):
        """After a synced ``step``: start the probe, or end it and return the decided total (else None)."""
        now = self.clock()
        if step == self.first_step + 1:
            self.mark = now
            return None
        self.step_seconds = SLOWDOWN * (now - self.mark) / self.probe_steps  # planned seconds per step
        left = self.seconds - (now - self.start)
        self.total = max(step, min(self.cap, step + math.floor(max(left, 0.0) / self.step_seconds)))
        return self.total

    def seconds_left(self, step):
        """Estimated seconds of training left at ``step`` (None before the decision)."""
        if self.total is None:
            return None
        return max(self.total - step, 0) * self.step_seconds

    def describe(self):
        """One line for the log, once decided."""
        cap = " (the cap: epochs x steps per epoch)" if self.total == self.cap else ""
        probe, planned = self.step_seconds / SLOWDOWN * 1000, self.step_seconds * 1000
        return (f"time budget {self.seconds / 60:g} min: {probe:.0f} ms per step measured over {self.probe_steps} "
                f"steps, planned at {planned:.0f} -> {self.total} steps{cap}")


def left_text(seconds):
    """'m:ss' for the progress bar."""
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
