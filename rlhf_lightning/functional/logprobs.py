"""Token log-probabilities and entropies from logits, response slicing, and truncation after the first EOS.

Memory: ``logprobs_from_logits`` never builds a full-vocabulary ``log_softmax`` copy. It gathers the label logit and
subtracts ``logsumexp`` over the vocabulary, block by block (a block holds at most ``_BLOCK_ELEMENTS`` logits), and
upcasts bf16/fp16 logits to float32 one block at a time. With float32 logits and temperature 1 the blocks are views,
so the only extra memory is logsumexp's temporary for one block. (Under autograd each block's upcast copy is kept for
the backward pass, as it would be without blocking.)

Sources: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031): divide logits by the
sampling temperature when recomputing log-probs; logits at position t predict token t + 1; truncate responses after
the first EOS and keep the EOS as the last scored token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TruncatedResponse",
    "entropy_from_logits",
    "logprobs_and_entropy_from_logits",
    "logprobs_from_logits",
    "response_logprobs",
    "sequence_lengths_to_mask",
    "truncate_after_eos",
]

_BLOCK_ELEMENTS = 1 << 24  # logits per block (64 MiB in float32)


def _blockwise(logits: Tensor, fn: Callable[[Tensor, slice, slice], Tensor], block_elements: int) -> Tensor:
    """Apply ``fn(block, rows, cols)`` to (b, t, V) blocks of ``logits`` (B, T, V) and stitch the (b, t) results."""
    b, t, v = logits.shape
    if b == 0 or t == 0:
        return fn(logits, slice(0, b), slice(0, t))
    if t * v <= block_elements:
        rows_per, cols_per = max(1, block_elements // (t * v)), t
    else:
        rows_per, cols_per = 1, max(1, block_elements // v)
    if rows_per >= b and cols_per >= t:
        return fn(logits, slice(0, b), slice(0, t))
    row_parts = []
    for r0 in range(0, b, rows_per):
        rows = slice(r0, min(r0 + rows_per, b))
        col_parts = [
            fn(logits[rows, c0 : c0 + cols_per], rows, slice(c0, min(c0 + cols_per, t)))
            for c0 in range(0, t, cols_per)
        ]
        row_parts.append(col_parts[0] if len(col_parts) == 1 else torch.cat(col_parts, dim=1))
    return row_parts[0] if len(row_parts) == 1 else torch.cat(row_parts, dim=0)


def _scaled(block: Tensor, temperature: float) -> Tensor:
    if block.dtype in (torch.float16, torch.bfloat16):
        block = block.float()
    return block if temperature == 1.0 else block / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, *, block_elements: int = _BLOCK_ELEMENTS
) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``, without a full log_softmax copy.

    Shapes: ``logits`` (B, T, V) float32/bf16/fp16; ``labels`` (B, T) long. Returns (B, T) float32 (float64 if the
    logits are float64): ``logits[b, t, labels[b, t]] / temperature - logsumexp_v(logits[b, t, v] / temperature)``.
    ``block_elements`` bounds how many logits are upcast/processed at once.
    Source: Huang et al. 2024 (arXiv 2403.17031), log-probs recomputed at the sampling temperature.
    """
    _check_temperature(temperature)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )

    def block_logprobs(block: Tensor, rows: slice, cols: slice) -> Tensor:
        z = _scaled(block, temperature)
        picked = z.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(z, dim=-1)

    return _blockwise(logits, block_logprobs, block_elements)


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, *, block_elements: int = _BLOCK_ELEMENTS
) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in nats.

    Shapes: ``logits`` (B, T, V). Returns (B, T) float32: ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` with
    ``z = logits / temperature`` (the same identity as ``-sum p log p``, computed block by block).
    Source: Huang et al. 2024 (arXiv 2403.17031) log the policy entropy; Schulman et al. 2017 (PPO) entropy bonus.
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"expected logits (B, T, V), got {tuple(logits.shape)}")

    def block_entropy(block: Tensor, rows: slice, cols: slice) -> Tensor:
        z = _scaled(block, temperature)
        lse = torch.logsumexp(z, dim=-1)
        return lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)

    return _blockwise(logits, block_entropy, block_elements)


def logprobs_and_entropy_from_logits(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    *,
    entropy_grad: bool = False,
    block_elements: int = _BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """:func:`logprobs_from_logits` and :func:`entropy_from_logits` in one pass over the logits.

    Shapes: ``logits`` (B, T, V), ``labels`` (B, T) long. Returns ``(logprobs, entropy)``, each (B, T) float32. Each
    block is upcast and scaled once and its ``logsumexp`` serves both: ``logp = z[label] - lse`` and ``H = lse -
    sum_v exp(z_v - lse) * z_v``. ``entropy_grad=False`` (an entropy that is only logged) computes the entropy
    without autograd: it is detached and costs the backward pass nothing; ``True`` keeps its graph (entropy bonus).
    Source: as :func:`logprobs_from_logits` and :func:`entropy_from_logits`.
    """
    _check_temperature(temperature)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    entropies: list[Tensor] = []

    def block_logprobs(block: Tensor, rows: slice, cols: slice) -> Tensor:
        z = _scaled(block, temperature)
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            zz, ll = (z, lse) if entropy_grad else (z.detach(), lse.detach())
            entropies.append(ll - (torch.exp(zz - ll.unsqueeze(-1)) * zz).sum(dim=-1))
        return picked - lse

    # _blockwise visits blocks row-major and stitches them in the same order: replay that order for the entropies
    logprobs = _blockwise(logits, block_logprobs, block_elements)
    calls = iter(entropies)
    entropy = _blockwise(logits, lambda block, rows, cols: next(calls), block_elements)
    return logprobs, entropy


def response_logprobs(logits: Tensor, sequences: Tensor, prompt_len: int, temperature: float = 1.0) -> Tensor:
    """Log-probs of the response tokens of ``sequences`` (prompt of length P, then R response tokens).

    Shapes: ``logits`` (B, T, V) from one forward pass over ``sequences`` (B, T) with T = P + R. The logits at
    positions P-1 .. T-2 predict tokens P .. T-1. Returns (B, R) float32. Padding inside the response is not masked
    here: multiply/mask with the response mask downstream.
    Source: Huang et al. 2024 (arXiv 2403.17031): the "off by one" between logits and tokens, temperature scaling.
    """
    if logits.shape[:2] != sequences.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match sequences {tuple(sequences.shape)}")
    total = sequences.shape[1]
    if not 1 <= prompt_len <= total:
        raise ValueError(f"prompt_len must be in [1, T={total}], got {prompt_len}")
    return logprobs_from_logits(logits[:, prompt_len - 1 : total - 1], sequences[:, prompt_len:], temperature)


class TruncatedResponse(NamedTuple):
    """Result of :func:`truncate_after_eos`."""

    ids: Tensor  # (B, R) long: tokens up to and including the first EOS, pad after it
    mask: Tensor  # (B, R) bool: True up to and including the first EOS (all True when there is no EOS)
    ended_with_eos: Tensor  # (B,) bool: the row contains an EOS


def truncate_after_eos(response_ids: Tensor, eos_id: int, pad_id: int) -> TruncatedResponse:
    """Keep each response up to and including its first EOS; later tokens become ``pad_id`` with mask False.

    Shapes: ``response_ids`` (B, R) long. Returns ``TruncatedResponse(ids (B, R), mask (B, R) bool,
    ended_with_eos (B,) bool)``. A row without EOS keeps every token (mask all True, ``ended_with_eos`` False); such
    rows hit the length limit and can be penalised. ``pad_id`` must differ from ``eos_id``: otherwise the EOS would
    be indistinguishable from padding and the policy never learns to stop.
    Source: Huang et al. 2024 (arXiv 2403.17031), truncating after the stop token; PPO checklist "pad != EOS".
    """
    if eos_id == pad_id:
        raise ValueError(f"pad_id must differ from eos_id (both {eos_id}); see the PPO checklist")
    is_eos = response_ids == eos_id
    eos_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    mask = ~eos_before
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    return TruncatedResponse(ids=ids, mask=mask, ended_with_eos=is_eos.any(dim=1))


def sequence_lengths_to_mask(lengths: Tensor, max_len: int, left_padded: bool = False) -> Tensor:
    """Bool mask from per-row lengths: True on the first ``lengths[b]`` positions (or the last, if left-padded).

    Shapes: ``lengths`` (B,) integer; returns (B, max_len) bool. Masks are built from lengths, never by comparing
    token ids with the pad id (a sampled token may equal it only if pad == EOS, which is forbidden).
    Source: Huang et al. 2024 (arXiv 2403.17031), padding handling.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"lengths must lie in [0, {max_len}], got {lengths.tolist()}")
    positions = torch.arange(max_len, device=lengths.device).unsqueeze(0)
    if left_padded:
        return positions >= (max_len - lengths).unsqueeze(1)
    return positions < lengths.unsqueeze(1)
