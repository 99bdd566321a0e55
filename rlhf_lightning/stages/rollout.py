"""One PPO rollout: sample, score, and turn scores into advantages. No optimizer, no logging.

Steps 1-3 are :func:`sample_and_score`, shared with the critic-free GRPO/RLOO stage (``stages/grpo.py``);
:func:`make_rollout` adds PPO's values, rewards and GAE advantages (steps 4-5).

Steps (Huang et al. 2024, arXiv 2403.17031, and ``../shared/PPO_CHECKLIST.md``):
    1. sample responses with the KV cache at the training temperature (left-padded prompts, checked; stop at EOS),
    2. one batched forward each for policy log-probs, reference log-probs and values over prompt + response,
       dividing logits by the same temperature as sampling,
    3. score the truncated responses (reward model at the last real token, reward functions on decoded text),
    4. per-token reward ``-beta * k1`` plus the shaped score at the last response token,
    5. GAE over response tokens (gamma, lambda), returns = advantages + values, advantages whitened over valid tokens
       (of every data-parallel rank: the whitening moments are global, ``rlhf_lightning.distributed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rlhf_lightning.distributed import global_masked_moments
from rlhf_lightning.functional.advantages import gae
from rlhf_lightning.functional.kl import kl_penalized_rewards
from rlhf_lightning.functional.logprobs import logprobs_from_logits
from rlhf_lightning.functional.masked import masked_whiten
from rlhf_lightning.models.generation import GenerationArgs, check_left_padded, generate
from rlhf_lightning.stages.rewards import SequenceScorer
from rlhf_lightning.stages.sampling import ended_with_eos, response_texts
from rlhf_lightning.types import PromptBatch, Rollout


@dataclass(frozen=True)
class RolloutTimings:
    """Seconds spent in each phase of one rollout, and the number of generated tokens."""

    generation: float
    scoring: float  # log-prob, value and reward forwards
    generated_tokens: int


def policy_logits(policy: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int) -> Tensor:
    """Logits (B, R, V) that predict the response tokens, projecting only response positions through the LM head."""
    hidden = policy.hidden_states(sequences, mask)  # (B, T, D)
    return policy.lm_head(hidden[:, prompt_len - 1 : -1])


def response_logprobs_of(
    policy: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int, temperature: float
) -> Tensor:
    """Log-probs (B, R) of the response tokens ``sequences[:, P:]`` under ``policy`` at ``temperature``."""
    logits = policy_logits(policy, sequences, mask, prompt_len)
    return logprobs_from_logits(logits, sequences[:, prompt_len:], temperature)


def response_values(value_model: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int) -> Tensor:
    """Values (B, R): the critic's estimate at the state before each response token is chosen."""
    return value_model(sequences, mask)[:, prompt_len - 1 : -1].float()


def rewards_and_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    response_mask: Tensor,
    kl_beta: float,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 4-5: per-token rewards, advantages and returns (B, R) each, 0 on padding.

    scores (B,); logprobs, ref_logprobs, values (B, R); response_mask (B, R) bool. Values at padded positions never
    reach the rewards, the GAE recursion or the whitening statistics. The whitening mean and variance are those of
    the valid tokens of every data-parallel rank (a collective: every rank calls this together).
    """
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, response_mask, kl_beta)
    advantages, returns = gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    if whiten:
        mean, var, _ = global_masked_moments(advantages, response_mask)
        advantages = masked_whiten(advantages, response_mask, moments=(mean, var))
    return rewards, advantages, returns


def _chunked(fn: Callable[[slice], Tensor], batch: int, chunk: int | None) -> Tensor:
    chunk = chunk or batch
    return torch.cat([fn(slice(i, i + chunk)) for i in range(0, batch, chunk)])


@torch.no_grad()
def sample_and_score(
    *,
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    scorer: SequenceScorer,
    tokenizer,
    batch: PromptBatch,
    generation: GenerationArgs,
    forward_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    update_running_stats: bool = True,
) -> tuple[Rollout, RolloutTimings]:
    """Steps 1-3 (sample, policy and reference log-probs, shaped scores), shared by PPO and GRPO/RLOO.

    The returned rollout's ``values``, ``rewards``, ``advantages`` and ``returns`` are zeros (B, R): the caller's
    algorithm fills them. ``update_running_stats=False`` (evaluation) shapes scores with the running statistics
    without updating them.
    """
    check_left_padded(
        batch.attention_mask,
        "make_rollout: PromptBatch",
        "; a DataModule of your own must pad prompts on the left (see data/collate.collate_prompts)",
    )
    started = time.perf_counter()
    out = generate(  # 1. sample with the KV cache; tokens after the first EOS are pad, mask False
        policy,
        batch.input_ids,
        batch.attention_mask,
        generation,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        generator=generator,
    )
    generated = time.perf_counter()
    query, query_mask = batch.input_ids, batch.attention_mask
    response, response_mask = out.response_ids, out.response_mask
    sequences = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    P, B = query.shape[1], query.shape[0]
    temperature = generation.temperature

    def rows(fn):
        return _chunked(lambda s: fn(sequences[s], mask[s]), B, forward_batch_size)

    # 2. one batched forward per model
    logprobs = rows(lambda s, m: response_logprobs_of(policy, s, m, P, temperature))
    ref_logprobs = rows(lambda s, m: response_logprobs_of(reference, s, m, P, temperature))

    # 3. score what a user would see
    ended = ended_with_eos(response, response_mask, tokenizer.eos_id)
    texts = response_texts(tokenizer, response, response_mask)
    prompts = [row.get("prompt", []) for row in batch.rows] if batch.rows else [[] for _ in range(B)]
    extra_rows = list(batch.rows) if batch.rows else [{} for _ in range(B)]
    raw_scores = scorer.raw_scores(sequences, mask, prompts, texts, extra_rows, forward_batch_size)
    scores = scorer.shape(raw_scores, ended, update_running=update_running_stats)
    scored = time.perf_counter()

    zeros = torch.zeros_like(logprobs)
    rollout = Rollout(
        query_ids=query,
        query_mask=query_mask,
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=zeros,
        scores=scores,
        raw_scores=raw_scores,
        rewards=zeros,
        advantages=zeros,
        returns=zeros,
        ended_with_eos=ended,
        texts=texts,
        prompts=tuple(tokenizer.decode(ids) for ids in query.tolist()),
    )
    timings = RolloutTimings(
        generation=generated - started, scoring=scored - generated, generated_tokens=int(response_mask.sum())
    )
    return rollout, timings


@torch.no_grad()
def make_rollout(
    *,
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    value_model: torch.nn.Module,
    scorer: SequenceScorer,
    tokenizer,
    batch: PromptBatch,
    generation: GenerationArgs,
    kl_beta: float,
    gamma: float,
    lam: float,
    whiten_advantages: bool = True,
    forward_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    update_running_stats: bool = True,
) -> tuple[Rollout, RolloutTimings]:
    """Sample responses to ``batch`` and compute everything a PPO update needs (see the module docstring).

    ``update_running_stats=False`` (evaluation) shapes scores with the running statistics without updating them.
    """
    rollout, timings = sample_and_score(  # steps 1-3
        policy=policy,
        reference=reference,
        scorer=scorer,
        tokenizer=tokenizer,
        batch=batch,
        generation=generation,
        forward_batch_size=forward_batch_size,
        generator=generator,
        update_running_stats=update_running_stats,
    )
    started = time.perf_counter()
    sequences, mask, P = rollout.sequences, rollout.sequence_mask, rollout.query_ids.shape[1]
    values = _chunked(
        lambda s: response_values(value_model, sequences[s], mask[s], P), len(rollout), forward_batch_size
    )
    # 4. KL-penalised per-token rewards, 5. GAE and whitening over valid tokens only
    rewards, advantages, returns = rewards_and_advantages(
        rollout.scores,
        rollout.logprobs,
        rollout.ref_logprobs,
        values,
        rollout.response_mask,
        kl_beta,
        gamma,
        lam,
        whiten_advantages,
    )
    rollout = replace(rollout, values=values, rewards=rewards, advantages=advantages, returns=returns)
    timings = replace(timings, scoring=timings.scoring + time.perf_counter() - started)
    return rollout, timings
