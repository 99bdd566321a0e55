"""What the PPO stage logs each iteration (the checklist's "What to watch"), computed from a rollout.

Metric keys follow ``<phase>/<quantity>``: ``rollout/*`` (scores, KL to the reference as k1 and k3, response length,
EOS rate, advantage/return/value means), ``ppo/*`` (update statistics, KL coefficient) and ``time/*`` (seconds per
phase and generated tokens per second). Per-sequence KL sums only valid response tokens: padding never contributes.

Data-parallel ranks: the stds, the token means and the explained variance are computed over every rank's rollout
(``distributed.global_masked_moments``), so one process holding the whole rollout logs the same values; the other
``rollout/*`` means are over equal-sized per-rank rollouts, which the stage's ``sync_dist`` averages exactly.

Scores: ``rollout/score_*`` (and ``val/score``) is the shaped score that enters the reward (after running
normalisation, clipping and the missing-EOS score); ``rollout/score_normalised_mean`` (and ``val/score_normalised``) is
the weighted sum of the reward sources before that shaping, with the reward model's output already normalised by the
mean/std stored in its checkpoint (``rewards.normalize``): not the reward model's raw output.
Split out of ``stages/ppo.py`` to keep that file about the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlhf_lightning.distributed import global_masked_moments
from rlhf_lightning.functional.kl import kl_k1, kl_k3
from rlhf_lightning.functional.masked import masked_sum
from rlhf_lightning.types import Rollout

Moments = tuple[Tensor, Tensor, Tensor]  # (mean, var, count) from global_masked_moments

SAMPLE_COLUMNS = ["iteration", "prompt", "response", "score", "kl", "length"]


def sequence_kl(estimator: Callable[[Tensor, Tensor], Tensor], rollout: Rollout) -> Tensor:
    """Per-sequence KL (B,) to the reference: ``estimator`` (k1, k3) summed over valid response tokens only."""
    return masked_sum(estimator(rollout.logprobs, rollout.ref_logprobs), rollout.response_mask, dim=1)


def rollout_explained_variance(rollout: Rollout) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over every valid response token of the rollout, on all ranks.

    The critic's values as the rollout recorded them (before this iteration's update) against the returns they were
    meant to predict, on data the critic has not trained on: the explained variance Stable-Baselines3 and CleanRL
    report. ``ppo/explained_variance`` is the per-minibatch figure during the update (a few sequences each, so noisy
    and, after the first epoch, measured on data the critic has just fitted). 0 when the returns do not vary."""
    mask = rollout.response_mask
    returns = global_masked_moments(rollout.returns, mask)
    residual = global_masked_moments(rollout.returns - rollout.values, mask)
    return explained_variance_from(returns, residual)


def explained_variance_from(returns: Moments, residual: Moments) -> Tensor:
    """:func:`rollout_explained_variance` from the global moments of the returns and of ``returns - values``."""
    (_, var_returns, _), (_, var_residual, _) = returns, residual
    if float(var_returns) <= 1e-12:
        return torch.zeros_like(var_returns)
    return 1.0 - var_residual / var_returns


def iteration_metrics(
    rollout: Rollout, timings: Any, stats: dict[str, Tensor], train_time: float, kl_beta: float
) -> dict[str, Tensor]:
    """Scalar metrics of one iteration: rollout statistics, update ``stats`` (prefixed ``ppo/``) and timings."""
    mask = rollout.response_mask
    k1, k3 = sequence_kl(kl_k1, rollout), sequence_kl(kl_k3, rollout)
    # over every rank's replies / valid tokens (one process holding the whole rollout logs the same): sync_dist's
    # mean of per-rank values is not a global std, nor a token mean when ranks hold different numbers of tokens
    advantages = global_masked_moments(rollout.advantages, mask)
    # before whitening: returns - values = the GAE advantages themselves
    raw = global_masked_moments(rollout.returns - rollout.values, mask)
    returns = global_masked_moments(rollout.returns, mask)
    total = timings.generation + timings.scoring + train_time
    metrics = {
        "rollout/score_mean": rollout.scores.mean(),
        "rollout/score_std": global_masked_moments(rollout.scores)[1].sqrt(),
        "rollout/score_normalised_mean": rollout.raw_scores.mean(),  # before shaping (see the module docstring)
        "rollout/kl": k1.mean(),
        "rollout/kl_k3": k3.mean(),
        "rollout/response_len": mask.sum(1).float().mean(),
        "rollout/eos_rate": rollout.ended_with_eos.float().mean(),
        "rollout/advantage_mean": advantages[0],
        "rollout/advantage_std": advantages[1].sqrt(),
        "rollout/advantage_raw_mean": raw[0],
        "rollout/advantage_raw_std": raw[1].sqrt(),
        "rollout/return_mean": returns[0],
        "rollout/value_mean": global_masked_moments(rollout.values, mask)[0],
        "rollout/explained_variance": explained_variance_from(returns, raw),
        "ppo/kl_beta": torch.tensor(kl_beta),
        "time/generation": torch.tensor(timings.generation),
        "time/scoring": torch.tensor(timings.scoring),
        "time/training": torch.tensor(train_time),
        "time/iteration": torch.tensor(total),
        "time/generated_tokens_per_sec": torch.tensor(
            timings.generated_tokens / max(timings.generation, 1e-9)
        ),
    }
    metrics.update({f"ppo/{key}": value for key, value in stats.items()})
    return metrics


def sample_rows(rollout: Rollout, iteration: int) -> list[list[Any]]:
    """Rows of the sample table (columns :data:`SAMPLE_COLUMNS`), prompts cut to their last 500 characters."""
    k1 = sequence_kl(kl_k1, rollout)
    return [
        [iteration, prompt[-500:], text, float(score), float(kl), int(length)]
        for prompt, text, score, kl, length in zip(
            rollout.prompts, rollout.texts, rollout.scores, k1, rollout.response_mask.sum(1)
        )
    ]
