"""One PPO rollout: sample, score, and turn scores into advantages. No optimizer, no logging.

Steps 1-3 are :func:`sample_and_score`, shared with the critic-free GRPO/RLOO stage (``stages/grpo.py``);
:func:`make_rollout` adds PPO's values, rewards and GAE advantages (steps 4-5).

Steps (Huang et al. 2024, arXiv 2403.17031, and ``../shared/PPO_CHECKLIST.md``):
    1. sample responses with the KV cache at the training temperature (left-padded prompts, checked; stop at EOS),
    2. one batched forward each for policy log-probs, reference log-probs and values over prompt + response,
       dividing logits by the same temperature as sampling (a value head on the policy's trunk gets its values from
       the policy's forward: one trunk forward gives both),
    3. score the truncated responses (reward model at the last real token, reward functions on decoded text),
    4. per-token reward ``-beta * k1`` plus the shaped score at the last response token,
    5. GAE over response tokens (gamma, lambda), returns = advantages + values, advantages whitened over valid tokens
       (of every data-parallel rank: the whitening moments are global, ``rlhf_lightning.distributed``).

Each no-grad forward of step 2 runs over groups of rows (``forward_batch_size`` rows, or rows of similar length
grouped up to ``forward_batch_tokens`` padded tokens) cut to the columns where one of the group's rows has a real
token (``functional/microbatch.py``); positions a group does not cover are 0 in the rollout's (B, R) tensors (padding,
never read). Policy and reference see the same groups, so their log-probs of identical networks are identical (KL 0).
Everything runs under ``torch.no_grad`` (not ``inference_mode``: the update reuses the rollout's tensors as inputs of
autograd graphs, which inference tensors cannot be).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.profiler import record_function

from rlhf_lightning.distributed import all_gather_tensors, global_masked_moments, world_size
from rlhf_lightning.functional.advantages import gae
from rlhf_lightning.functional.kl import kl_penalized_rewards
from rlhf_lightning.functional.logprobs import logprobs_from_logits
from rlhf_lightning.functional.masked import masked_whiten
from rlhf_lightning.functional.microbatch import split_to_count, token_budget_groups, trimmed_span
from rlhf_lightning.functional.prefix_sharing import share_group_prefix
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


def response_hidden(model: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int) -> Tensor:
    """Hidden states (B, R, D) at the positions that predict the response tokens (one trunk forward)."""
    with record_function("trunk_forward"):
        return model.hidden_states(sequences, mask)[:, prompt_len - 1 : -1]


def policy_logits(policy: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int) -> Tensor:
    """Logits (B, R, V) that predict the response tokens, projecting only response positions through the LM head."""
    return policy.lm_head(response_hidden(policy, sequences, mask, prompt_len))


def shares_trunk(value_model: torch.nn.Module | None, policy: torch.nn.Module) -> bool:
    """The critic is a value head on ``policy`` itself (``share_value_trunk``): one trunk forward serves both."""
    return value_model is not None and getattr(value_model, "backbone", None) is policy


def response_logprobs_and_values(
    policy: torch.nn.Module,
    value_head: torch.nn.Module,
    sequences: Tensor,
    mask: Tensor,
    prompt_len: int,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Log-probs and values (B, R) each from one trunk forward of ``policy`` (a value head on the policy's trunk)."""
    hidden = response_hidden(policy, sequences, mask, prompt_len)
    logprobs = logprobs_from_logits(policy.lm_head(hidden), sequences[:, prompt_len:], temperature)
    return logprobs, value_head(hidden).float()


def response_logprobs_of(
    policy: torch.nn.Module, sequences: Tensor, mask: Tensor, prompt_len: int, temperature: float
) -> Tensor:
    """Log-probs (B, R) of the response tokens ``sequences[:, P:]`` under ``policy`` at ``temperature``."""
    logits = policy_logits(policy, sequences, mask, prompt_len)
    return logprobs_from_logits(logits, sequences[:, prompt_len:], temperature)


def shared_response_logprobs(
    policy: torch.nn.Module,
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    temperature: float,
) -> Tensor | None:
    """:func:`response_logprobs_of` with each prompt computed once for all its replies (GRPO/RLOO groups):
    log-probs (B, R) of the counted reply tokens (0 elsewhere), or None when ``policy`` takes no (B, 1, T, T) mask
    or the rows do not share enough (``functional.prefix_sharing.share_group_prefix``)."""
    if not getattr(policy, "accepts_4d_mask", False):
        return None
    layout = share_group_prefix(query_ids, query_mask, response_ids, response_mask)
    if layout is None:
        return None
    with record_function("trunk_forward"):
        hidden = policy.hidden_states(layout.input_ids, layout.attention_mask(), layout.position_ids)
    h = hidden[layout.predict_row, layout.predict_col]  # (N, D)
    labels = response_ids[layout.target_row, layout.target_col]  # (N,)
    lp = logprobs_from_logits(policy.lm_head(h)[None], labels[None], temperature)[0]  # (N,)
    out = torch.zeros(response_ids.shape, dtype=lp.dtype, device=lp.device)
    return out.index_put((layout.target_row, layout.target_col), lp)


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


def row_groups(
    query_mask: Tensor, response_mask: Tensor, rows: int | None = None, tokens: int | None = None
) -> list[Tensor]:
    """Row indices of each forward over a (B, P) + (B, R) batch: groups of similar length holding at most ``tokens``
    padded tokens (and at most ``rows`` rows) when ``tokens`` is set, else consecutive chunks of ``rows`` rows
    (None = all rows at once).

    With ``tokens`` and several data-parallel ranks every rank splits its groups up to the largest count of any rank
    (a collective), so that ranks whose forwards gather sharded weights (FSDP2) run the same number of them."""
    B = query_mask.shape[0]
    if tokens is not None:
        groups = token_budget_groups(query_mask.sum(1), response_mask.sum(1), tokens, max_rows=rows)
        if world_size() > 1:
            counts = all_gather_tensors(torch.tensor([len(groups)], device=query_mask.device))
            groups = split_to_count(groups, min(max(int(c) for c in counts), B))
        return groups
    size = rows or B
    return [torch.arange(i, min(i + size, B), device=query_mask.device) for i in range(0, B, size)]


def trimmed_rows(
    query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor, int, int]:
    """``(sequences, mask, prompt_len, response_len)`` of ``rows``, cut to the columns where one of them has a real
    token (:func:`~rlhf_lightning.functional.microbatch.trimmed_span`): sequences and mask (n, P' + R') with
    ``prompt_len`` = P' and ``response_len`` = R'."""
    q_mask, r_mask = query_mask[rows], response_mask[rows]
    p0, r = trimmed_span(q_mask, r_mask)
    sequences = torch.cat([query[rows, p0:], response[rows, :r]], dim=1)
    mask = torch.cat([q_mask[:, p0:], r_mask[:, :r]], dim=1)
    return sequences, mask, query.shape[1] - p0, r


def grouped_forward(
    fn: Callable[[Tensor, Tensor, int], Tensor | tuple[Tensor, ...]],
    query: Tensor,
    query_mask: Tensor,
    response: Tensor,
    response_mask: Tensor,
    groups: list[Tensor],
) -> tuple[Tensor, ...]:
    """``fn(sequences, mask, prompt_len) -> (n, R')`` tensor(s) over each group of rows (trimmed, see
    :func:`trimmed_rows`), put back in place in (B, R) float32 tensors that are 0 where no group reached."""
    B, R = response.shape
    outs: list[Tensor] | None = None
    for rows in groups:
        sequences, mask, P, r = trimmed_rows(query, query_mask, response, response_mask, rows)
        parts = fn(sequences, mask, P)
        parts = parts if isinstance(parts, tuple) else (parts,)
        if outs is None:
            outs = [torch.zeros(B, R, dtype=torch.float32, device=response.device) for _ in parts]
        for out, part in zip(outs, parts):
            out[rows, :r] = part.float()
    return tuple(outs)


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
    forward_batch_tokens: int | None = None,
    value_head: torch.nn.Module | None = None,
    share_prompts: bool = False,
) -> tuple[Rollout, RolloutTimings]:
    """Steps 1-3 (sample, policy and reference log-probs, shaped scores), shared by PPO and GRPO/RLOO.

    The returned rollout's ``values``, ``rewards``, ``advantages`` and ``returns`` are zeros (B, R): the caller's
    algorithm fills them, except ``values`` when ``value_head`` (a value head on the policy's trunk) is given: then
    the policy's forward gives log-probs and values at once. ``update_running_stats=False`` (evaluation) shapes
    scores with the running statistics without updating them. ``forward_batch_size`` / ``forward_batch_tokens``:
    rows / padded tokens per no-grad forward (:func:`row_groups`). ``share_prompts`` (GRPO/RLOO, no value head,
    one forward per model): each prompt computed once for its replies (:func:`shared_response_logprobs`), the
    layout the update's forwards use, so the first minibatch's ratio and KL come out exactly as the rollout's.
    """
    check_left_padded(
        batch.attention_mask,
        "make_rollout: PromptBatch",
        "; a DataModule of your own must pad prompts on the left (see data/collate.collate_prompts)",
    )
    started = time.perf_counter()
    with record_function("rollout/generate"):
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
    B = query.shape[0]
    temperature = generation.temperature

    groups = row_groups(query_mask, response_mask, forward_batch_size, forward_batch_tokens)

    def per_group(fn):
        return grouped_forward(fn, query, query_mask, response, response_mask, groups)

    def logprobs_of(model: torch.nn.Module) -> Tensor:
        if share_prompts and value_head is None and len(groups) == 1:
            shared = shared_response_logprobs(model, query, query_mask, response, response_mask, temperature)
            if shared is not None:
                return shared
        (out,) = per_group(lambda s, m, p: response_logprobs_of(model, s, m, p, temperature))
        return out

    # 2. one batched forward per model (the policy's also gives the values of a value head on its trunk)
    with record_function("rollout/policy_forward"):
        if value_head is None:
            logprobs = logprobs_of(policy)
            values = torch.zeros_like(logprobs)
        else:
            logprobs, values = per_group(
                lambda s, m, p: response_logprobs_and_values(policy, value_head, s, m, p, temperature)
            )
    with record_function("rollout/reference_forward"):
        ref_logprobs = logprobs_of(reference)

    # 3. score what a user would see
    ended = ended_with_eos(response, response_mask, tokenizer.eos_id)
    texts = response_texts(tokenizer, response, response_mask)
    prompts = [row.get("prompt", []) for row in batch.rows] if batch.rows else [[] for _ in range(B)]
    extra_rows = list(batch.rows) if batch.rows else [{} for _ in range(B)]
    with record_function("rollout/score"):
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
        values=values,
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
    forward_batch_tokens: int | None = None,
) -> tuple[Rollout, RolloutTimings]:
    """Sample responses to ``batch`` and compute everything a PPO update needs (see the module docstring).

    ``update_running_stats=False`` (evaluation) shapes scores with the running statistics without updating them.
    A ``value_model`` on the policy's own trunk (:func:`shares_trunk`) takes its values from the policy's forward.
    """
    shared = shares_trunk(value_model, policy)
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
        forward_batch_tokens=forward_batch_tokens,
        value_head=value_model.head if shared else None,
    )
    started = time.perf_counter()
    values = rollout.values
    if not shared:
        with record_function("rollout/value_forward"):
            groups = row_groups(
                rollout.query_mask, rollout.response_mask, forward_batch_size, forward_batch_tokens
            )
            (values,) = grouped_forward(
                lambda s, m, p: response_values(value_model, s, m, p),
                rollout.query_ids,
                rollout.query_mask,
                rollout.response_ids,
                rollout.response_mask,
                groups,
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
