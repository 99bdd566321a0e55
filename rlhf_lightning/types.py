"""Named batch and rollout types that cross module boundaries.

Every tensor carries a shape comment: B batch, P prompt length, R response length, T = P + R (or any sequence
length), V vocabulary. Every ``*_mask`` is ``bool`` and ``True`` means "this token counts". This module is a leaf: it
imports torch and nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class _TensorBatch:
    """Shared helpers: move every tensor field (and nested batch, e.g. ``PromptBatch.ptx``) to a device, count rows."""

    def to(self, device: torch.device | str):
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (Tensor, _TensorBatch))
        }
        return replace(self, **changes)

    def __len__(self) -> int:
        return next(
            getattr(self, f.name).shape[0] for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        )


class _Packable:
    """Padding-free ("packed") layout shared by SFT and preference batches.

    Packed, the D documents lie end to end in one row: every tensor is (1, N) with N the total token count (plus
    padding to a multiple, ``attention_mask`` False there), ``position_ids`` restart at 0 in each document and
    ``cu_seqlens`` (D + 1,) int32 holds the cumulative document lengths (document d is columns
    ``cu_seqlens[d]:cu_seqlens[d + 1]``). Unpacked (the default) both are None and rows are right-padded.
    """

    cu_seqlens: Tensor | None

    @property
    def packed(self) -> bool:
        """True when the documents are concatenated in one row (``cu_seqlens`` set)."""
        return self.cu_seqlens is not None

    @property
    def num_sequences(self) -> int:
        """Sequences (documents) in the batch: rows when padded, ``len(cu_seqlens) - 1`` when packed."""
        if self.cu_seqlens is not None:
            return self.cu_seqlens.shape[0] - 1
        return self.input_ids.shape[0]  # type: ignore[attr-defined]

    @property
    def sequence_lengths(self) -> Tensor:  # (D,) long: real tokens of each sequence (document)
        if self.cu_seqlens is not None:
            return self.cu_seqlens.diff().long()
        return self.attention_mask.sum(-1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SFTBatch(_Packable, _TensorBatch):
    """Right-padded conversations for supervised fine-tuning, or the same conversations packed in one row.

    ``len(batch)`` is the number of conversations in both layouts.
    """

    input_ids: Tensor  # (B, T) long: rendered conversation, padded with the pad id; packed: (1, N)
    attention_mask: Tensor  # (B, T) bool: True on real tokens (built from lengths); packed: (1, N)
    loss_mask: Tensor  # (B, T) bool: True where input_ids[t] is an assistant token (content or its EOS) to predict  # packed: (1, N)
    position_ids: Tensor | None = None  # packed only: (1, N) long, 0, 1, ... restarting in each conversation
    cu_seqlens: Tensor | None = (
        None  # packed only: (B + 1,) int32 cumulative conversation lengths, [0, ..., n_real]
    )

    def __len__(self) -> int:
        return self.num_sequences


@dataclass(frozen=True)
class PreferenceBatch(_Packable, _TensorBatch):
    """Chosen and rejected conversations stacked so one forward scores both: rows [0, B) chosen, [B, 2B) rejected.

    Packed, the same 2B sequences are documents in that order (chosen 0..B-1, then rejected) in one row.
    ``len(batch)`` is the number of pairs B in both layouts.
    """

    input_ids: Tensor  # (2B, T) long: right-padded prompt + response; packed: (1, N)
    attention_mask: Tensor  # (2B, T) bool: True on real tokens; packed: (1, N)
    margin: Tensor  # (B,) float: required score margin of chosen over rejected (0 when the data has none)
    position_ids: Tensor | None = None  # packed only: (1, N) long, 0, 1, ... restarting in each sequence
    cu_seqlens: Tensor | None = None  # packed only: (2B + 1,) int32 cumulative sequence lengths

    def __len__(self) -> int:
        return self.margin.shape[0]


@dataclass(frozen=True)
class PromptBatch(_TensorBatch):
    """Left-padded prompts for generation, with the source rows kept for reward functions."""

    input_ids: Tensor  # (B, P) long: rendered prompt ending in the assistant header, left-padded
    attention_mask: Tensor  # (B, P) bool: True on real prompt tokens
    index: Tensor  # (B,) long: row index in the dataset (for data-position bookkeeping)
    rows: tuple[dict[str, Any], ...] = field(
        default=()
    )  # B dicts: {"prompt": [Message], **extra fields of the row}
    ptx: SFTBatch | None = None  # (B_ptx, T_ptx) SFT conversations for the PPO-ptx loss, or None (PPO only)


@dataclass(frozen=True)
class Rollout(_TensorBatch):
    """One PPO rollout batch: everything the update needs, computed without gradients.

    Response tokens after the first EOS are padding (``response_mask`` False) and never count.
    """

    query_ids: Tensor  # (B, P) long: left-padded prompts
    query_mask: Tensor  # (B, P) bool: True on real prompt tokens
    response_ids: Tensor  # (B, R) long: sampled tokens, pad after the first EOS
    response_mask: Tensor  # (B, R) bool: True up to and including the first EOS
    logprobs: Tensor  # (B, R) float: policy log-probs of the response tokens (old policy)
    ref_logprobs: Tensor  # (B, R) float: reference-model log-probs of the response tokens
    values: Tensor  # (B, R) float: critic values before each response token is scored
    scores: Tensor  # (B,) float: final (normalised, clipped, penalised) sequence score
    raw_scores: (
        Tensor  # (B,) float: weighted reward sources (reward model normalised by its stored stats), unshaped
    )
    rewards: Tensor  # (B, R) float: per-token reward = -beta * k1 + score at the last response token
    advantages: Tensor  # (B, R) float: whitened GAE advantages (0 on padding)
    returns: Tensor  # (B, R) float: advantages (before whitening) + values
    ended_with_eos: Tensor  # (B,) bool: the response stopped at EOS before the length limit
    texts: tuple[str, ...] = field(default=())  # B decoded responses (what a user would see)
    prompts: tuple[str, ...] = field(default=())  # B decoded prompts

    @property
    def sequences(self) -> Tensor:  # (B, T) long: query then response
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def sequence_mask(self) -> Tensor:  # (B, T) bool
        return torch.cat([self.query_mask, self.response_mask], dim=1)
