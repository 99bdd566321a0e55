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


@dataclass(frozen=True)
class SFTBatch(_TensorBatch):
    """Right-padded conversations for supervised fine-tuning."""

    input_ids: Tensor  # (B, T) long: rendered conversation, padded with the pad id
    attention_mask: Tensor  # (B, T) bool: True on real tokens (built from lengths)
    loss_mask: (
        Tensor  # (B, T) bool: True where input_ids[t] is an assistant token (content or its EOS) to predict
    )


@dataclass(frozen=True)
class PreferenceBatch(_TensorBatch):
    """Chosen and rejected conversations stacked so one forward scores both: rows [0, B) chosen, [B, 2B) rejected."""

    input_ids: Tensor  # (2B, T) long: right-padded prompt + response
    attention_mask: Tensor  # (2B, T) bool: True on real tokens
    margin: Tensor  # (B,) float: required score margin of chosen over rejected (0 when the data has none)

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
