"""Advantage estimators: GAE for PPO, group-relative baselines (GRPO, RLOO), and running reward moments.

Mask semantics of :func:`gae`: positions where ``mask`` is False are skipped entirely, as if they were removed from
the row: they get advantage 0 and return 0, and the value that follows the last valid token is 0 (the episode ends
there). For the usual left-aligned response masks this is exactly "padding after the EOS contributes nothing".

:class:`RunningMoments` is a small stateful helper (plain Python floats) kept here because it is the math of
PPO-max's reward scaling; ``state_dict``/``load_state_dict`` let checkpoints restore it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .masked import masked_sum

__all__ = [
    "BASELINES",
    "RunningMoments",
    "gae",
    "group_advantages",
    "group_relative_advantages",
    "rloo_advantages",
]


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens, vectorised over the batch.

    Shapes: ``rewards``, ``values`` (B, R) float; ``mask`` (B, R) bool, True on response tokens. Returns
    ``(advantages (B, R), returns (B, R))`` with ``returns = advantages + values`` on valid tokens and both 0 on
    padding. Recursion, over valid tokens only (reverse loop over R, vectorised over B):
    ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``; V_next = 0 after the last
    valid token. Pass detached rewards and values (this runs on rollout data, without gradients).
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation";
    Huang et al. 2024 (arXiv 2403.17031): gamma = 1, lambda = 0.95, returns = advantages + values.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be (B, R); got {tuple(rewards.shape)}, {tuple(values.shape)}, "
            f"{tuple(mask.shape)}"
        )
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values, zero)
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(batch, dtype=values.dtype, device=values.device)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv_t, zero)
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"batch size {scores.shape[0]} is not a multiple of group_size {group_size}")
    return scores.view(-1, group_size)


def group_relative_advantages(
    scores: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantages: each score minus its group's mean, optionally divided by the group's std.

    Shapes: ``scores`` (B,) with B = G * group_size; rows ``[g * group_size, (g + 1) * group_size)`` are the samples
    of prompt g (consecutive). Returns (B,): ``(s - mean_g) / (std_g + eps)`` (unbiased std, as torch.std) or
    ``s - mean_g`` when ``normalize_std`` is False (Dr. GRPO's choice). A group of identical scores gives 0.
    Source: Shao et al. 2024, "DeepSeekMath" (GRPO), arXiv 2402.03300.
    """
    groups = _grouped(scores, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO advantages: each score minus the mean of the *other* samples of its group (leave-one-out baseline).

    Shapes: ``scores`` (B,), B = G * group_size with consecutive groups, ``group_size >= 2``. Returns (B,):
    ``s_i - (sum_g - s_i) / (k - 1)`` which equals ``k / (k - 1) * (s_i - mean_g)``.
    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv 2402.14740 (after Kool et al. 2019).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    groups = _grouped(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


BASELINES = ("grpo", "dr_grpo", "rloo")


def group_advantages(scores: Tensor, group_size: int, baseline: str) -> Tensor:
    """Sequence advantages (B,) of consecutive groups of ``group_size`` scores under a named baseline.

    ``grpo``: ``(s - mean_g) / (std_g + eps)`` (Shao et al. 2024); ``dr_grpo``: ``s - mean_g``, no std division
    (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783); ``rloo``:
    ``s - mean of the other samples`` (Ahmadian et al. 2024). See :func:`group_relative_advantages` and
    :func:`rloo_advantages` for shapes and layout.
    """
    if baseline == "grpo":
        return group_relative_advantages(scores, group_size, normalize_std=True)
    if baseline == "dr_grpo":
        return group_relative_advantages(scores, group_size, normalize_std=False)
    if baseline == "rloo":
        return rloo_advantages(scores, group_size)
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}")


class RunningMoments:
    """Running mean / variance / count of a stream of values, combined batch by batch (Chan et al. parallel Welford).

    ``update(x, mask=None)`` folds in the valid entries of ``x`` (any shape) and returns that batch's
    ``(mean, std)``. ``combine(mean, var, count)`` folds in precomputed population moments (for example after an
    all-reduce across ranks). ``var`` is the population variance of everything seen; ``std`` is the unbiased std.
    ``reduce``: an element-wise sum over data-parallel ranks (e.g. ``rlhf_lightning.distributed.all_reduce_sum``)
    applied to each batch's float64 ``(count, sum, sum of squares)``, so every rank folds in the same global batch;
    with it every rank must call ``update`` at the same time, even with no valid entry.
    Used for PPO-max reward scaling: divide rewards by the running std.
    Source: Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO" (PPO-max), arXiv 2307.04964;
    Chan, Golub & LeVeque 1979 for the parallel update.
    """

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.reduce = reduce
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (0 before two values)."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    def combine(self, mean: float, var: float, count: int) -> None:
        """Fold in a batch with population mean ``mean``, population variance ``var`` and ``count`` values."""
        count = int(count)
        if count <= 0:
            return
        total = self.count + count
        delta = float(mean) - self.mean
        m2 = self.var * self.count + float(var) * count + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.var = m2 / total
        self.count = total

    @torch.no_grad()
    def update(self, x: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
        """Fold in the entries of ``x`` where ``mask`` is True (all when None); return this batch's (mean, std)
        (over every rank with ``reduce``)."""
        x = x.detach().to(torch.float64)
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
        sums = torch.stack([valid.sum().double(), masked_sum(x, valid), masked_sum(x * x, valid)])
        if self.reduce is not None:
            sums = self.reduce(sums)
        count, total, squares = int(sums[0]), float(sums[1]), float(sums[2])
        if count == 0:
            return 0.0, 0.0
        mean = total / count
        var = max(squares / count - mean * mean, 0.0)
        self.combine(mean, var, count)
        batch_std = math.sqrt(var * count / (count - 1)) if count > 1 else 0.0
        return mean, batch_std

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
