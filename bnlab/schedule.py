"""Learning-rate schedules (optim.schedule): the rate of every SGD step as a pure function of the
step index, so that tests and plots can ask for the rate at any step."""
from __future__ import annotations

import math

from bnlab.config import OptimConfig, Schedule


def lr_at(o: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate of SGD step `step` (0-based, counted over the whole run).

    t = step / steps_per_epoch is the number of epochs done before the step. During the warm-up
    (t < optim.warmup_epochs) the rate rises linearly, lr x (step + 1) / warm-up steps, so the last
    warm-up step uses the full rate. Then:
    - constant: lr;
    - step: lr x gamma ** (number of milestones m with t >= m): milestone 5 lowers the rate from
      the first step of the 6th epoch on (as torch's MultiStepLR stepped once per epoch);
    - cosine: lr x (1 + cos(pi x (t - w) / (epochs - w))) / 2 with w the warm-up epochs (0 at the
      end of training, as torch's CosineAnnealingLR with eta_min 0, evaluated per step).
    """
    if steps_per_epoch < 1 or step < 0:
        raise ValueError(f"steps_per_epoch must be >= 1 and step >= 0, got {steps_per_epoch}, {step}")
    t = step / steps_per_epoch
    warm_steps = o.warmup_epochs * steps_per_epoch
    if step < warm_steps:
        return o.lr * (step + 1) / math.ceil(warm_steps)
    if o.schedule == Schedule.step:
        return o.lr * o.gamma ** sum(t >= m for m in o.milestones)
    if o.schedule == Schedule.cosine:
        w = o.warmup_epochs
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - w) / (epochs - w))))
    return o.lr
