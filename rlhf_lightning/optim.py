"""Learning-rate schedules injected through the CLI (``LRSchedulerCallable``).

``WarmupCosineLR`` is linear warm-up then cosine decay to ``min_lr_ratio`` of the peak. Its length defaults to the
Trainer's ``estimated_stepping_batches``: stages call :func:`bind_total_steps` in ``configure_optimizers`` so a config
never has to repeat the number of steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up for ``warmup_steps`` (a fraction of the run if < 1), then cosine decay.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warm-up; a value below 1 is a fraction of ``total_steps``.
        total_steps: length of the schedule in optimizer steps; ``None`` lets the stage fill in the Trainer's estimate.
        min_lr_ratio: the learning rate at the end, as a fraction of the peak.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: float = 0.05,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (or None), got {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        """The multiplier of the peak rate for optimizer step ``step`` (0-based).

        Warm-up: ``(step + 1) / (warmup + 1)`` (never 0, so the first step learns); then
        ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2`` with
        ``progress = (step - warmup) / (total - warmup)`` clamped to 1.
        """
        total = max(1, self.total_steps or 1)
        warmup = self.warmup_steps * total if self.warmup_steps < 1 else self.warmup_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def bind_total_steps(scheduler: object, total_steps: int | float) -> None:
    """Give a schedule that was built without a length the run's number of optimizer steps.

    Other schedulers, and a ``WarmupCosineLR`` given an explicit ``total_steps``, are left alone. On resume Lightning
    then loads the scheduler's saved state, whose ``total_steps`` (the original run's) wins, so a resumed run follows
    the schedule it started with.
    """
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
        if not math.isfinite(total_steps):
            raise ValueError("WarmupCosineLR needs total_steps when the Trainer has no max_steps/max_epochs")
        scheduler.total_steps = int(total_steps)
        # recompute the first factor now that the length is known
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = lr * scheduler._factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
