"""Reward normalisation measured on the policy PPO starts from, and the critic put on the same scale.

PPO's rewards are the reward model's scores normalised to mean 0 and std 1. Statistics taken on the reward stage's
own validation replies (human-written text) do not fit the replies the SFT policy writes: there the normalised
scores averaged +0.4 to +2.8, which made the fixed missing-EOS score and the clip arbitrary. As in OpenAI's
lm-human-preferences (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2), the
gain and bias are measured once when PPO starts, on replies the reference (= SFT) policy samples for training
prompts, and stored in the PPO checkpoint.

Only replies that end with EOS count: the others get the fixed ``missing_eos_score`` in PPO, so their reward-model
score never reaches a reward (all replies count when fewer than two ended).

Several data-parallel ranks: each samples its share of the replies (its own seed and prompts) and the mean, std, count
and EOS share are reduced over all ranks (``rlhf_lightning.distributed``), so every rank normalises alike.

The critic starts from the reward model (same trunk, head copied) but must predict PPO's returns, made of shaped
scores, so :func:`fold_normalization` rewrites its copied head to output the expected shaped score of a reference
reply: the normalised score (times the reward model's weight) for the share ``p`` of replies that end with EOS, the
fixed missing-EOS score for the others. Its first values are on the returns' scale, not the raw score's, so value
clipping does not hold the critic back for the first iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.distributed import all_reduce_sum, global_masked_moments
from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.stages.rewards import SequenceScorer
from rlhf_lightning.types import PromptBatch


@dataclass(frozen=True)
class ScoreStats:
    """Mean and std of the reward model's raw scores on ``samples`` reference-policy replies that ended with EOS,
    and the share of all sampled replies that did (``eos_fraction``)."""

    mean: float
    std: float
    samples: int
    eos_fraction: float = 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "std": self.std,
            "samples": self.samples,
            "eos_fraction": self.eos_fraction,
        }


def response_texts(tokenizer, response: torch.Tensor, response_mask: torch.Tensor) -> tuple[str, ...]:
    """Decoded responses (B,) without padding and EOS: the text a user sees."""
    return tuple(
        tokenizer.decode([t for t, keep in zip(ids, keep_row) if keep and t != tokenizer.eos_id])
        for ids, keep_row in zip(response.tolist(), response_mask.tolist())
    )


@torch.no_grad()
def measure_score_stats(
    reference: nn.Module,
    scorer: SequenceScorer,
    tokenizer,
    prompts: PromptBatch,
    generation: GenerationArgs,
    samples: int,
    generator: torch.Generator | None = None,
    forward_batch_size: int | None = None,
    start: int = 0,
) -> ScoreStats:
    """Sample ``samples`` replies from ``reference`` (cycling over the rows of ``prompts``, left-padded, from row
    ``start``) and return the mean and std of the reward model's raw scores on those that ended with EOS.

    A collective under several data-parallel ranks: each rank passes its own share of ``samples`` (and its own
    ``generator`` and ``start``), and the statistics returned are those of the replies of every rank."""
    if samples < 1:
        raise ValueError(f"calibration needs at least 1 sample per rank, got {samples}")
    chunk = forward_batch_size or len(prompts)
    all_scores, all_eos = [], []
    done = 0
    while done < samples:
        rows = [(start + done + i) % len(prompts) for i in range(min(chunk, samples - done))]
        index = torch.tensor(rows, device=prompts.input_ids.device)
        ids, mask = prompts.input_ids[index], prompts.attention_mask[index]
        out = generate(
            reference,
            ids,
            mask,
            generation,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            generator=generator,
        )
        sequences = torch.cat([ids, out.response_ids], dim=1)
        sequence_mask = torch.cat([mask, out.response_mask], dim=1)
        texts = response_texts(tokenizer, out.response_ids, out.response_mask)
        messages = [prompts.rows[r].get("prompt", []) if prompts.rows else [] for r in rows]
        all_scores.append(scorer.model_scores(sequences, sequence_mask, messages, texts))
        all_eos.append((out.response_ids == tokenizer.eos_id).logical_and(out.response_mask).any(dim=1))
        done += len(rows)
    scores, ended = torch.cat(all_scores), torch.cat(all_eos)
    total, ended_total = all_reduce_sum(torch.tensor([float(len(scores)), float(ended.sum())])).tolist()
    counted = ended if ended_total >= 2 else torch.ones_like(ended)
    mean, var, count = global_masked_moments(scores.double(), counted)
    return ScoreStats(
        mean=float(mean),
        std=max(float(var.sqrt()), 1e-6),
        samples=int(count),
        eos_fraction=ended_total / total,
    )


@torch.no_grad()
def fold_normalization(
    head: nn.Linear, stats: ScoreStats, weight: float = 1.0, missing_eos_score: float | None = None
) -> None:
    """Make ``head`` (a copy of the reward head, ``score = w.h + b``) predict the expected shaped score of the
    reference policy's replies instead of the raw score: ``p * weight * (score - mean) / std + (1 - p) * m``, with
    ``p`` the share of replies that ended with EOS and ``m`` the fixed score of the others (``p = 1`` without one)."""
    p = 1.0 if missing_eos_score is None else stats.eos_fraction
    scale = p * weight / stats.std
    head.weight.mul_(scale)
    head.bias.sub_(stats.mean).mul_(scale).add_((1 - p) * (missing_eos_score or 0.0))


__all__ = ["ScoreStats", "fold_normalization", "measure_score_stats", "response_texts"]
