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
scores (normalised, clipped, the fixed missing-EOS score for replies without EOS). :func:`fit_value_head` refits its
head affinely, by least squares on the same reference replies, to the shaped score each got: its first values are
on the returns' scale, not the raw score's (a raw copy starts off by about mean / std, and value clipping then slows
the fix), and its first explained variance is not negative. A linear map of the head is exactly a linear map of the
values, so nothing else of the critic changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.distributed import all_reduce_sum, global_masked_moments
from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.stages.rewards import SequenceScorer
from rlhf_lightning.stages.sampling import ended_with_eos, response_texts
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


@dataclass(frozen=True)
class CalibrationChunk:
    """Reference-policy replies sampled for the calibration: sequences / sequence_mask (B, P + R), the prompt
    length P, the prompt messages, decoded texts and rows (what reward functions read), ended_with_eos (B,) and the
    reward model's raw scores (B,)."""

    sequences: torch.Tensor
    sequence_mask: torch.Tensor
    prompt_len: int
    messages: list
    texts: tuple[str, ...]
    rows: list[dict]
    ended_with_eos: torch.Tensor
    model_scores: torch.Tensor


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
    keep: list[CalibrationChunk] | None = None,
    eos_only: bool = True,
) -> ScoreStats:
    """Sample ``samples`` replies from ``reference`` (cycling over the rows of ``prompts``, left-padded, from row
    ``start``) and return the mean and std of the reward model's raw scores on those that ended with EOS
    (``eos_only``: the others get the fixed missing-EOS score in PPO, so their model score is never used), or on every
    reply (``eos_only=False``: no missing-EOS score is set, and every reply is scored by the model).

    A collective under several data-parallel ranks: each rank passes its own share of ``samples`` (and its own
    ``generator`` and ``start``), and the statistics returned are those of the replies of every rank. ``keep``
    collects the sampled replies (:class:`CalibrationChunk`) for :func:`fit_value_head`."""
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
        all_eos.append(ended_with_eos(out.response_ids, out.response_mask, tokenizer.eos_id))
        if keep is not None:
            extra = [dict(prompts.rows[r]) if prompts.rows else {} for r in rows]
            keep.append(
                CalibrationChunk(
                    sequences,
                    sequence_mask,
                    ids.shape[1],
                    messages,
                    texts,
                    extra,
                    all_eos[-1],
                    all_scores[-1],
                )
            )
        done += len(rows)
    scores, ended = torch.cat(all_scores), torch.cat(all_eos)
    total, ended_total = all_reduce_sum(torch.tensor([float(len(scores)), float(ended.sum())])).tolist()
    counted = ended if eos_only and ended_total >= 2 else torch.ones_like(ended)
    mean, var, count = global_masked_moments(scores.double(), counted)
    return ScoreStats(
        mean=float(mean),
        std=max(float(var.sqrt()), 1e-6),
        samples=int(count),
        eos_fraction=ended_total / total,
    )


@torch.no_grad()
def fit_value_head(
    head: nn.Linear, value_model: nn.Module, scorer: SequenceScorer, chunks: list[CalibrationChunk]
) -> tuple[float, float]:
    """Refit the critic's head ``w.h + b`` as ``a * (w.h + b) + c`` so that its values at every response position of
    the calibration replies best predict (least squares) the shaped score each reply received: the normalised,
    clipped score, or the missing-EOS score (the returns PPO's critic regresses on at its first iteration, where the
    KL to the reference is 0). The affine fit with an intercept never does worse than a constant on that data, so the
    first explained variance is not negative by construction, and the values start on the returns' scale (a copied
    reward head starts on the raw score's: off by about mean / std, which value clipping then slows to fix).
    Sums are reduced over data-parallel ranks, so every rank fits the same head. Returns the explained variance of
    the critic's values on the calibration replies before and after the fit."""
    from rlhf_lightning.stages.rollout import response_values

    sums = torch.zeros(6, dtype=torch.float64)  # n, x, y, xx, xy, yy
    for c in chunks:
        raw = scorer.raw_scores(  # the reward model's scores of these replies are known: no second forward
            c.sequences, c.sequence_mask, c.messages, c.texts, c.rows, model_scores=c.model_scores
        )
        target = scorer.shape(raw, c.ended_with_eos, update_running=False)  # (B,)
        values = response_values(value_model, c.sequences, c.sequence_mask, c.prompt_len)  # (B, R)
        valid = c.sequence_mask[:, c.prompt_len :]
        x = values[valid].double().cpu()
        y = target[:, None].expand_as(values)[valid].double().cpu()
        sums += torch.stack(
            [torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), y.sum(), x @ x, x @ y, y @ y]
        )
    n, sx, sy, sxx, sxy, syy = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    var_x, var_y = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
    cov = sxy / n - (sx / n) * (sy / n)
    a = cov / var_x if var_x > 1e-12 else 0.0
    c0 = sy / n - a * sx / n
    # explained variance 1 - Var(y - v) / Var(y) before (v = x) and after (v = a x + c0) the fit
    resid_before = var_y + var_x - 2 * cov
    resid_after = var_y - a * cov
    before = 1 - resid_before / var_y if var_y > 1e-12 else 0.0
    after = 1 - resid_after / var_y if var_y > 1e-12 else 0.0
    head.weight.mul_(a)
    head.bias.mul_(a).add_(c0)
    return before, after


__all__ = ["CalibrationChunk", "ScoreStats", "fit_value_head", "measure_score_stats"]
