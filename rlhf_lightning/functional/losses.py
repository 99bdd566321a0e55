"""Training losses. Each returns ``(loss, stats)``: a scalar loss with gradient, and detached scalar stats.

Means over tokens are token-level means over every valid token of the batch (``masked_mean`` with ``dim=None``), as
in Huang et al. 2024; quantities the loss must not differentiate through (old log-probs, advantages, old values,
returns, reference log-probs) are detached inside the loss.

Stats keys are bare quantity names (``loss``, ``clipfrac``, ...); the stage adds its ``<phase>/`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logprobs import entropy_from_logits, logprobs_from_logits
from .masked import masked_mean, masked_var

__all__ = [
    "dpo_loss",
    "entropy_bonus",
    "entropy_loss",
    "ipo_loss",
    "pairwise_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
]

Stats = dict[str, Tensor]


def _detached(**stats: Tensor) -> Stats:
    return {k: v.detach() for k, v in stats.items()}


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Stats]:
    """Next-token cross-entropy over the tokens whose ``loss_mask`` is True at the *target* position.

    Shapes: ``logits`` (B, T, V) from a forward pass over ``input_ids`` (B, T); ``loss_mask`` (B, T) bool, True on
    assistant tokens (content and closing EOS). Targets are ``input_ids[:, 1:]`` predicted by ``logits[:, :-1]``;
    a target counts when ``loss_mask[:, 1:]`` is True. Returns the mean negative log-likelihood over counted tokens
    (0 if none) and stats ``{"loss", "tokens"}`` (tokens = number of counted targets, float).
    Source: standard causal-LM SFT (Ouyang et al. 2022, InstructGPT); loss on assistant tokens only as in Huang et
    al. 2024 (arXiv 2403.17031). Log-probs via the memory-lean :func:`logprobs_from_logits`.
    """
    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits (B, T, V), input_ids and loss_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(loss_mask.shape)}"
        )
    target_mask = loss_mask[:, 1:]
    logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    loss = -masked_mean(logp, target_mask)
    return loss, _detached(loss=loss, tokens=target_mask.sum().to(logp.dtype))


def token_nll_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Stats]:
    """Mean negative log-likelihood of already-selected target tokens: the SFT loss without padding work.

    Shapes: ``logits`` (N, V) for the N positions whose next token counts (e.g. hidden states gathered where the SFT
    ``loss_mask`` is True at the target, then projected by the LM head), ``targets`` (N,). Equals :func:`sft_loss` on
    the full (B, T, V) logits, while the vocabulary projection and log-softmax run only over counted positions.
    Returns the loss (0 with a zero gradient when N == 0) and stats ``{"loss", "tokens"}``.
    Source: as :func:`sft_loss`; selecting positions before the LM head follows the "don't compute on padding" habit.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V) and targets (N,); got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        loss = logits.sum() * 0.0
    else:
        loss = -logprobs_from_logits(logits[None], targets[None]).mean()
    return loss, _detached(loss=loss, tokens=torch.tensor(float(targets.numel()), device=logits.device))


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> tuple[Tensor, Stats]:
    """Bradley-Terry reward-model loss ``mean(-log sigmoid(chosen - rejected - margin))``.

    Shapes: ``chosen``, ``rejected`` (B,) scalar scores; ``margin`` (B,) or None (= 0). Returns the mean loss and
    stats ``{"loss", "accuracy" (fraction with chosen > rejected), "chosen_mean", "rejected_mean",
    "margin_mean" (mean of chosen - rejected)}``.
    Source: Ouyang et al. 2022 (InstructGPT) reward loss; Llama 2 (Touvron et al. 2023) margin term; Huang et al.
    2024 (arXiv 2403.17031).
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected must both be (B,), got {tuple(chosen.shape)}, {tuple(rejected.shape)}"
        )
    diff = chosen - rejected
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(logits).mean()
    return loss, _detached(
        loss=loss,
        accuracy=(chosen > rejected).float().mean(),
        chosen_mean=chosen.mean(),
        rejected_mean=rejected.mean(),
        margin_mean=diff.mean(),
    )


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Stats]:
    """PPO clipped surrogate: ``masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    Shapes: ``logp`` (B, R) current policy log-probs (with gradient); ``old_logp`` (B, R) rollout log-probs;
    ``advantages`` (B, R) (whitened); ``mask`` (B, R) bool. ``ratio = exp(logp - old_logp)``. Returns the token-mean
    loss and stats ``{"policy_loss", "clipfrac" (fraction of valid tokens where the clipped term is the larger
    loss), "approx_kl", "ratio_mean", "ratio_max"}``. ``approx_kl`` is the k3 estimator of KL(old || new) from
    tokens sampled by the old policy: ``mean((ratio - 1) - log ratio)`` (>= 0, exactly 0 when ratio == 1).
    Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7; Huang et al. 2024 (arXiv
    2403.17031); k3: Schulman, "Approximating KL divergence".
    """
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_max = torch.where(mask, ratio, torch.zeros_like(ratio)).max() if ratio.numel() else ratio.sum()
    return loss, _detached(
        policy_loss=loss, clipfrac=clipfrac, approx_kl=approx_kl, ratio_mean=ratio_mean, ratio_max=ratio_max
    )


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps_v: float = 0.2
) -> tuple[Tensor, Stats]:
    """Clipped value loss ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))``.

    Shapes: ``values`` (B, R) current critic values (with gradient); ``old_values`` (B, R) rollout values;
    ``returns`` (B, R) GAE returns; ``mask`` (B, R) bool. Returns the loss and stats ``{"value_loss",
    "value_clipfrac" (fraction of valid tokens where the clipped error is the larger), "explained_variance"
    (``1 - Var(R - V) / Var(R)`` over valid tokens, with the current ``values``)}``.
    Source: Huang et al. 2024 (arXiv 2403.17031) and the OpenAI baselines PPO2 value clipping; PPO checklist.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps_v, clip_eps_v)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        explained_variance = 1.0 - var_residual / var_returns.clamp_min(1e-8)
    return loss, _detached(value_loss=loss, value_clipfrac=clipfrac, explained_variance=explained_variance)


def entropy_loss(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, Stats]:
    """Negative mean policy entropy, to add with a small positive coefficient (an entropy bonus).

    Shapes: ``logits`` (B, R, V) at the response positions; ``mask`` (B, R) bool. Returns ``-masked_mean(H)`` (so
    minimising it raises entropy) and stats ``{"entropy"}`` (the mean entropy in nats, positive).
    Source: Schulman et al. 2017 (PPO), entropy bonus c2 * S; off by default in RLHF (Huang et al. 2024).
    """
    entropy = masked_mean(entropy_from_logits(logits, temperature), mask)
    return -entropy, _detached(entropy=entropy)


entropy_bonus = (
    entropy_loss  # same function under the name used in some briefs: returns (-mean entropy, stats)
)


def _preference_stats(loss: Tensor, chosen_reward: Tensor, rejected_reward: Tensor) -> Stats:
    """Stats shared by the offline preference losses: implicit rewards, their margin and the pair accuracy."""
    return _detached(
        loss=loss,
        accuracy=(chosen_reward > rejected_reward).float().mean(),
        reward_chosen=chosen_reward.mean(),
        reward_rejected=rejected_reward.mean(),
        margin=(chosen_reward - rejected_reward).mean(),
    )


def _implicit_rewards(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """``beta * (policy - reference)`` for chosen and rejected (B,) each; the reference is detached."""
    shapes = {
        tuple(t.shape) for t in (policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp)
    }
    if len(shapes) != 1 or policy_chosen_logp.dim() != 1:
        raise ValueError(
            f"expected four (B,) sequence log-prob tensors of one shape, got shapes {sorted(shapes)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = beta * (policy_chosen_logp - ref_chosen_logp.detach())
    rejected = beta * (policy_rejected_logp - ref_rejected_logp.detach())
    return chosen, rejected


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Stats]:
    """Sigmoid DPO loss ``mean(-(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h))``.

    ``h = (pc - rc) - (pr - rr)``; with ``label_smoothing`` ``e = 0`` this is DPO, with ``0 < e < 0.5`` conservative
    DPO (the preference label is taken to be flipped with probability ``e``).
    Shapes: each input (B,) = sum of response-token log-probs of a sequence (policy or frozen reference, chosen or
    rejected). Returns the mean loss and stats ``{"loss", "accuracy" (implicit chosen reward > rejected; a tie is
    wrong), "reward_chosen", "reward_rejected", "margin" (mean chosen - rejected reward)}``, the implicit rewards being
    ``beta * (policy - reference)``.
    Source: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7; conservative DPO: Mitchell 2023, "A note
    on DPO with noisy preferences and relationship to IPO".
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _implicit_rewards(
        policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta
    )
    margin = chosen - rejected
    losses = -F.logsigmoid(margin)
    if label_smoothing > 0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-margin)
    loss = losses.mean()
    return loss, _preference_stats(loss, chosen, rejected)


def ipo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Stats]:
    """Identity preference optimisation ``mean((h - 1 / (2 * beta)) ** 2)``, ``h = (pc - rc) - (pr - rr)``.

    Regresses the log-likelihood-ratio gap onto a fixed target instead of pushing it to infinity, so it does not
    overfit deterministic preferences. ``beta`` is the paper's tau (the target gap is ``1 / (2 beta)``).
    Shapes and stats as :func:`dpo_loss` (implicit rewards ``beta * (policy - reference)``).
    Source: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17
    (sequence log-likelihoods as in the paper; TRL averages them per token instead).
    """
    chosen, rejected = _implicit_rewards(
        policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta
    )
    gap = (chosen - rejected) / beta  # h
    loss = ((gap - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _preference_stats(loss, chosen, rejected)
