"""Learning-rate schedules as multipliers of the peak LR (for ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scldm_scale.config import OptimConfig, Schedule


@dataclass(frozen=True)
class LRSchedule:
    """Picklable LR multiplier: linear warmup, then cosine or warmup-stable-decay (WSD)."""

    kind: str  # a Schedule value (a plain string keeps checkpoints loadable with weights_only=True)
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        if self.kind == Schedule.COSINE.value:
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, int(round(self.decay_fraction * self.total_steps)))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1 - self.min_lr_ratio) * progress


def build_schedule(cfg: OptimConfig, total_steps: int) -> LRSchedule:
    return LRSchedule(
        kind=Schedule(cfg.schedule).value,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction,
    )
