"""Batched autoregressive sampling with a KV cache.

Prompts come left-padded (B, P) with a bool attention mask. One prefill forward fills the cache, then each step feeds
one token per row. Sampling follows the usual recipe: divide logits by the temperature, optionally keep the top-k
logits (Fan et al., 2018) and/or the smallest set of tokens whose probability reaches top-p (nucleus sampling,
Holtzman et al., 2020; at least one token is always kept), then sample; greedy (argmax) when ``do_sample`` is False.

Responses are truncated at each row's first EOS: the EOS itself counts (mask True); later positions hold
``pad_token_id`` and mask False. Decoding stops as soon as every row has finished, so R <= ``max_new_tokens`` (for a
model sharded with FSDP2, every row of every data-parallel rank: the ranks' forwards are collectives).

For PPO the log-probs seen during the rollout must match the ones recomputed in training, so
``output_logprobs=True`` returns ``log_softmax(logits / temperature)`` of each chosen token, before any top-k/top-p
filtering. With filtering (or greedy decoding) the tokens do not come from that distribution, so PPO's ratios would be
off-policy: ``PPOModule`` refuses such settings (:attr:`GenerationArgs.samples_full_distribution`).

Prompts must be left-padded (every row's real tokens end in the last column): :func:`check_left_padded` refuses a
right-padded mask with the offending row, since each step reads the last column's hidden state.

``use_cache=False`` recomputes the whole sequence at every step; it is the naive baseline for the equivalence tests
and ``benchmarks/generation.py``. The model contract: ``hidden_states(input_ids, attention_mask, position_ids=None,
cache=None) -> (B, T, D)``, ``lm_head`` (D -> V), and for ``use_cache=True`` also ``new_cache(batch_size, max_len)``.
Only the last position's hidden state is projected to the vocabulary at each step.

Deliberate additions to docs/ARCHITECTURE.md: the ``output_logprobs`` flag and the optional ``logprobs`` field of
:class:`GenerationOutput`; the model is switched to eval mode during generation (dropout off, as PPO requires) and
restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf_lightning.distributed import all_reduce_sum

__all__ = ["GenerationArgs", "GenerationOutput", "check_left_padded", "generate", "sample_next_token"]


@dataclass(frozen=True)
class GenerationArgs:
    """How to sample responses."""

    max_new_tokens: int
    """Most tokens generated per row (R <= max_new_tokens)."""
    temperature: float = 1.0
    """Logits are divided by this before sampling (and before log-probs are taken); > 0."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens with total probability >= top_p; 1.0 disables."""
    do_sample: bool = True
    """Sample from the (filtered) distribution; False = greedy argmax."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def samples_full_distribution(self) -> bool:
        """True when tokens are drawn from the whole tempered distribution (sampling, no top-k / top-p filtering):
        the only setting whose stored log-probs are those of the sampling distribution (on-policy for PPO)."""
        return self.do_sample and self.top_k == 0 and self.top_p == 1.0


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([GenerationArgs])


@dataclass(frozen=True)
class GenerationOutput:
    """Prompts and generated responses."""

    sequences: Tensor  # (B, P + R) long: the left-padded prompt followed by the response
    response_ids: Tensor  # (B, R) long: generated tokens, pad_token_id after the first EOS
    response_mask: Tensor  # (B, R) bool: True up to and including the first EOS
    logprobs: Tensor | None = None  # (B, R) float32: log p(token | logits / temperature); 0 where mask False


def check_left_padded(attention_mask: Tensor, what: str = "generate", hint: str = "") -> None:
    """Raise ``ValueError`` unless each row of the (B, P) mask is padding first, then real tokens (left padding).

    The message names ``what`` was given the mask, the first offending row, and ends with ``hint``.
    """
    mask = attention_mask.bool()
    bad = (mask[:, :-1] & ~mask[:, 1:]).any(-1)  # (B,): a real token followed by padding
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: prompts must be left-padded (padding first, then the prompt), but row {row} has padding "
            f"after a real token{hint}"
        )


def sample_next_token(
    logits: Tensor, args: GenerationArgs, generator: torch.Generator | None = None
) -> Tensor:
    """Choose one token per row from ``logits`` (B, V) already divided by the temperature -> (B,) long."""
    if not args.do_sample:
        return logits.argmax(-1)
    if args.top_k and args.top_k < logits.shape[-1]:
        kth = torch.topk(logits, args.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if args.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the first token is always kept.
        drop_sorted = (probs.cumsum(-1) - probs) >= args.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform per row and a binary search (about 10x cheaper than torch.multinomial on
    # CPU for a 4k vocabulary). float64 keeps u * total strictly below the total mass, so a token filtered to
    # probability 0 is never chosen.
    cdf = logits.softmax(-1).double().cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def _all_finished(finished: Tensor, model: nn.Module) -> bool:
    """Every row has finished; for a model sharded with FSDP2, every row of every rank: each forward gathers the
    parameters from all ranks, so the ranks must take the same number of steps (a rank whose rows are all done keeps
    stepping, emitting padding, until the others finish)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return bool(all_reduce_sum((~finished).sum().float()) == 0)
    return bool(finished.all())


def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    args: GenerationArgs,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    output_logprobs: bool = False,
) -> GenerationOutput:
    """Sample responses for left-padded prompts.

    input_ids (B, P) long, attention_mask (B, P) bool (True on real prompt tokens). Returns sequences (B, P + R),
    response_ids (B, R), response_mask (B, R) and, with ``output_logprobs``, logprobs (B, R).
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, P), got {input_ids.shape} and {attention_mask.shape}"
        )
    if eos_token_id == pad_token_id:
        raise ValueError("pad_token_id must differ from eos_token_id (otherwise EOS is masked out)")
    check_left_padded(attention_mask)
    b, p = input_ids.shape
    device = input_ids.device
    n_new = args.max_new_tokens
    max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_seq_len is not None and p + n_new > max_seq_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {n_new} > the model's max_seq_len {max_seq_len}"
        )
    attention_mask = attention_mask.bool()

    was_training = model.training
    model.eval()
    try:
        response = torch.full((b, n_new), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(b, n_new, dtype=torch.bool, device=device)
        logprobs = torch.zeros(b, n_new, dtype=torch.float32, device=device) if output_logprobs else None
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)

        if use_cache:
            cache = model.new_cache(b, p + n_new)
            h = model.hidden_states(input_ids, attention_mask, cache=cache)[:, -1]
        else:
            seq, seq_mask = input_ids, attention_mask
            h = model.hidden_states(seq, seq_mask)[:, -1]

        steps = 0
        for step in range(n_new):
            logits = model.lm_head(h).float() / args.temperature  # (B, V)
            token = sample_next_token(logits, args, generator)  # (B,)
            alive = ~finished
            if logprobs is not None:
                lp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
                logprobs[:, step] = torch.where(alive, lp, 0.0)
            token = torch.where(alive, token, pad_token_id)
            response[:, step] = token
            mask[:, step] = alive
            finished = finished | (token == eos_token_id)
            steps = step + 1
            if step == n_new - 1 or _all_finished(finished, model):
                break
            if use_cache:
                h = model.hidden_states(token[:, None], ones, cache=cache)[:, -1]
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                seq_mask = torch.cat([seq_mask, ones], dim=1)
                h = model.hidden_states(seq, seq_mask)[:, -1]
    finally:
        model.train(was_training)

    response, mask = response[:, :steps], mask[:, :steps]
    return GenerationOutput(
        sequences=torch.cat([input_ids, response], dim=1),
        response_ids=response,
        response_mask=mask,
        logprobs=None if logprobs is None else logprobs[:, :steps],
    )
