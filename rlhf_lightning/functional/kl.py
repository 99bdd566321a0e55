"""Per-token KL estimators, KL-penalised per-token rewards, and the KL coefficient controllers.

Estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL divergence", 2020,
http://joschu.net/blog/kl-approx.html), with ``logp = log pi(token)``, ``ref_logp = log pi_ref(token)`` and
``r = pi_ref / pi = exp(ref_logp - logp)``:

- k1 = -log r = logp - ref_logp: unbiased, high variance, can be negative per token. Used for the reward penalty.
- k2 = (log r)^2 / 2: biased, low variance, non-negative.
- k3 = (r - 1) - log r: unbiased, low variance, non-negative. Log it next to k1.

The controllers are the one deliberate exception to "functional is stateless": they are tiny plain-Python objects
(no tensors, no nn.Module) holding a single float, kept here because they are the math of Ziegler et al. 2019 and
every stage that penalises KL shares them. ``state_dict``/``load_state_dict`` let a checkpoint restore them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp, per token.

    Shapes: ``logp``, ``ref_logp`` (B, R) log-probs of the sampled tokens. Returns (B, R).
    Source: Schulman, "Approximating KL divergence" (k1); Ziegler et al. 2019 / Huang et al. 2024 (arXiv
    2403.17031) use it as the per-token KL penalty.
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2, per token (>= 0).

    Shapes: (B, R) each; returns (B, R). Source: Schulman, "Approximating KL divergence" (k2).
    """
    diff = logp - ref_logp
    return 0.5 * diff * diff


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = exp(ref_logp - logp), per token (>= 0, 0 where logp == ref_logp).

    Shapes: (B, R) each; returns (B, R). Computed as ``expm1(d) - d`` with ``d = ref_logp - logp`` for accuracy
    near 0, and clamped at 0 against rounding.
    Source: Schulman, "Approximating KL divergence" (k3); Huang et al. 2024 (arXiv 2403.17031) log it.
    """
    d = ref_logp - logp
    return (torch.expm1(d) - d).clamp_min(0.0)


def kl_penalized_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float | Tensor
) -> Tensor:
    """Per-token PPO rewards: ``-beta * k1`` on every valid token, plus the sequence score at the last valid token.

    Shapes: ``scores`` (B,) sequence scores (already normalised/clipped/penalised by the caller); ``logp``,
    ``ref_logp`` (B, R); ``mask`` (B, R) bool, True on response tokens (up to and including the first EOS).
    Returns (B, R): 0 on padding. The "last valid token" is the highest index where ``mask`` is True, so any mask
    layout works; a row with no valid token gets no reward at all (its score is dropped).
    Source: Ziegler et al. 2019; Huang et al. 2024 (arXiv 2403.17031), "reward = score at the EOS token minus the
    per-token KL penalty".
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = counts), got {mask.dtype}")
    if scores.shape != mask.shape[:1] or logp.shape != mask.shape or ref_logp.shape != mask.shape:
        raise ValueError(
            f"expected scores (B,), logp/ref_logp/mask (B, R); got {tuple(scores.shape)}, {tuple(logp.shape)}, "
            f"{tuple(ref_logp.shape)}, {tuple(mask.shape)}"
        )
    kl = kl_k1(logp, ref_logp)
    rewards = torch.where(mask, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,), -1 if empty
    has_valid = last >= 0
    last_onehot = (positions == last.unsqueeze(1)) & has_valid.unsqueeze(1)
    return rewards + last_onehot.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(1)


class FixedKLController:
    """A constant KL coefficient beta with the same interface as :class:`AdaptiveKLController`.

    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (fixed-beta variant).
    """

    def __init__(self, beta: float) -> None:
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steer the measured KL towards ``target``.

    ``update(current_kl, n_steps)``: ``error = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``value *= 1 + error * n_steps / horizon``. ``current_kl`` is the mean per-sequence KL (sum of k1 over the
    response) of the last rollout batch; ``n_steps`` the number of samples (sequences) in it.
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if not init_beta >= 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Apply one proportional update and return the new coefficient."""
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"current_kl must be finite, got {kl}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
