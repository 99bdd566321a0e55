"""Pure padding and stacking of token-id lists into the named batch types.

Torch and :mod:`rlhf_lightning.types` only: no tokenizer, no Lightning. Every mask is built from the list lengths,
never by comparing ids with the pad id (the checklist's "masks from lengths"), so a pad id that also occurs inside a
sequence can never hide a real token.

Padding sides: SFT, preference and scoring batches are right-padded (the stage shifts for next-token loss and the
heads read the last real token by index); prompt batches are left-padded so every row's last token is the assistant
header and generation appends in one column for the whole batch.

``pad_to_multiple_of`` rounds the common length ``T`` up (e.g. 8 or 64) so GPU kernels see friendly shapes; the
extra columns are padding with every mask False.

Packing (``collate_sft_packed``, ``collate_preference_packed``): the sequences are concatenated into one row
(1, N) with no padding between them, ``position_ids`` restarting at 0 in each sequence and ``cu_seqlens`` (D + 1,)
int32 cumulative lengths, the layout of flash-attention's varlen kernels and of Hugging Face's padding-free
training. ``pad_to_multiple_of`` then pads the row's end only (``attention_mask`` and ``loss_mask`` False there; the
pad positions count 0, 1, ... as a document of their own, so they never join the last real sequence).

``ScoringBatch`` is defined here because ``types.py`` has no batch for "score these conversations" (reward-model
prediction); it follows the same conventions as the types there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlhf_lightning.types import PreferenceBatch, PromptBatch, SFTBatch, _TensorBatch

__all__ = [
    "ScoringBatch",
    "collate_preference",
    "collate_preference_packed",
    "collate_prompts",
    "collate_scoring",
    "collate_sft",
    "collate_sft_packed",
    "pack_sequences",
    "padded_length",
]


@dataclass(frozen=True)
class ScoringBatch(_TensorBatch):
    """Right-padded whole conversations to score (reward-model predict), with their dataset row indices."""

    input_ids: Tensor  # (B, T) long: rendered conversation, padded with the pad id
    attention_mask: Tensor  # (B, T) bool: True on real tokens (built from lengths)
    index: Tensor  # (B,) long: row index in the scored file's dataset
    rows: tuple[dict[str, Any], ...] = field(
        default=()
    )  # B dicts: the parsed rows ({"messages": [...]}), if kept


def padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None = None) -> int:
    """Common length ``T``: the longest sequence, rounded up to a multiple of ``pad_to_multiple_of`` if given."""
    if len(lengths) == 0:
        raise ValueError("cannot collate an empty batch")
    longest = max(lengths)
    if pad_to_multiple_of is not None and pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return max(longest, 1)


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool, pad_to_multiple_of: int | None
) -> tuple[Tensor, Tensor]:
    """Stack ``seqs`` into ``(N, T)`` long ids and an ``(N, T)`` bool mask that is True on the real tokens."""
    lengths = [len(s) for s in seqs]
    t = padded_length(lengths, pad_to_multiple_of)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if n == 0:
            continue
        cols = slice(t - n, t) if left else slice(0, n)
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask


def collate_sft(
    examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> SFTBatch:
    """Right-pad ``(ids, assistant_mask)`` pairs into an :class:`SFTBatch`.

    ``loss_mask[b, t]`` is the example's assistant mask at ``t`` (False on padding). Shapes: (B, T).
    """
    ids_list = [e[0] for e in examples]
    for i, (ids, m) in enumerate(examples):
        if len(ids) != len(m):
            raise ValueError(f"example {i}: {len(ids)} ids but {len(m)} mask entries")
    input_ids, attention_mask = _pad(ids_list, pad_id, left=False, pad_to_multiple_of=pad_to_multiple_of)
    loss_mask = torch.zeros_like(attention_mask)
    for i, (_, m) in enumerate(examples):
        if len(m):
            loss_mask[i, : len(m)] = torch.as_tensor(list(m), dtype=torch.bool)
    return SFTBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)


def pack_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Concatenate ``seqs`` (D sequences) into one row: ``(input_ids, attention_mask, position_ids, cu_seqlens)``.

    Shapes: ids/mask/positions (1, N) with N = the total length rounded up to ``pad_to_multiple_of``, cu_seqlens
    (D + 1,) int32 (``cu_seqlens[-1]`` is the real token count). Trailing pad columns hold ``pad_id``, mask False and
    positions 0, 1, ... (their own document). An empty sequence raises ``ValueError``.
    """
    if len(seqs) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(s) for s in seqs]
    if min(lengths) < 1:
        raise ValueError(
            f"sequence {lengths.index(0)} is empty; packing needs at least one token per sequence"
        )
    total = sum(lengths)
    n = padded_length([total], pad_to_multiple_of)
    ids = torch.full((1, n), pad_id, dtype=torch.long)
    ids[0, :total] = torch.as_tensor([t for s in seqs for t in s], dtype=torch.long)
    mask = torch.zeros((1, n), dtype=torch.bool)
    mask[0, :total] = True
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.as_tensor(lengths, dtype=torch.int32).cumsum(0)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), torch.as_tensor(lengths))  # (total,)
    positions = torch.arange(n)
    positions[:total] -= starts
    positions[total:] -= total
    return ids, mask, positions[None], cu_seqlens


def collate_sft_packed(
    examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> SFTBatch:
    """Pack ``(ids, assistant_mask)`` pairs into one padding-free row (see the module notes); ``len()`` = B.

    ``loss_mask`` is each example's assistant mask, in place. Shapes: (1, N), cu_seqlens (B + 1,).
    """
    for i, (ids, m) in enumerate(examples):
        if len(ids) != len(m):
            raise ValueError(f"example {i}: {len(ids)} ids but {len(m)} mask entries")
    input_ids, attention_mask, position_ids, cu_seqlens = pack_sequences(
        [e[0] for e in examples], pad_id, pad_to_multiple_of
    )
    loss_mask = torch.zeros_like(attention_mask)
    total = int(cu_seqlens[-1])
    loss_mask[0, :total] = torch.as_tensor([bool(b) for e in examples for b in e[1]], dtype=torch.bool)
    return SFTBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
    )


def collate_preference_packed(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], float]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> PreferenceBatch:
    """Pack ``(chosen_ids, rejected_ids, margin)`` triples into one row: documents ``[0, B)`` are the chosen
    sequences, ``[B, 2B)`` the rejected ones (the order of :func:`collate_preference`'s rows). Shapes: (1, N),
    cu_seqlens (2B + 1,), margin (B,)."""
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    input_ids, attention_mask, position_ids, cu_seqlens = pack_sequences(seqs, pad_id, pad_to_multiple_of)
    margin = torch.tensor([float(p[2]) for p in pairs], dtype=torch.float32)
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        margin=margin,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
    )


def collate_preference(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], float]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> PreferenceBatch:
    """Stack ``(chosen_ids, rejected_ids, margin)`` triples: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected.

    Both halves share one right-padded length ``T`` so a single forward scores them. Shapes: ids/mask (2B, T),
    margin (B,).
    """
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    input_ids, attention_mask = _pad(seqs, pad_id, left=False, pad_to_multiple_of=pad_to_multiple_of)
    margin = torch.tensor([float(p[2]) for p in pairs], dtype=torch.float32)
    return PreferenceBatch(input_ids=input_ids, attention_mask=attention_mask, margin=margin)


def collate_prompts(
    ids_list: Sequence[Sequence[int]],
    pad_id: int,
    index: Sequence[int],
    rows: Sequence[dict[str, Any]] = (),
    pad_to_multiple_of: int | None = None,
    ptx: Sequence[tuple[Sequence[int], Sequence[bool]]] | None = None,
) -> PromptBatch:
    """Left-pad rendered prompts into a :class:`PromptBatch` (every row ends in the same last column).

    ``index`` are the dataset row indices (B,), ``rows`` the source row dicts kept for reward functions. ``ptx``
    (PPO-ptx): ``(ids, assistant_mask)`` conversations collated by :func:`collate_sft` into ``PromptBatch.ptx``
    (right-padded, their own length); None leaves ``ptx`` None.
    """
    if len(index) != len(ids_list) or (len(rows) and len(rows) != len(ids_list)):
        raise ValueError("ids_list, index and rows must have the same length")
    input_ids, attention_mask = _pad(ids_list, pad_id, left=True, pad_to_multiple_of=pad_to_multiple_of)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        index=torch.as_tensor(list(index), dtype=torch.long),
        rows=tuple(rows),
        ptx=None if ptx is None else collate_sft(ptx, pad_id, pad_to_multiple_of=pad_to_multiple_of),
    )


def collate_scoring(
    ids_list: Sequence[Sequence[int]],
    pad_id: int,
    index: Sequence[int],
    rows: Sequence[dict[str, Any]] = (),
    pad_to_multiple_of: int | None = None,
) -> ScoringBatch:
    """Right-pad whole conversations into a :class:`ScoringBatch` for reward-model scoring."""
    if len(index) != len(ids_list) or (len(rows) and len(rows) != len(ids_list)):
        raise ValueError("ids_list, index and rows must have the same length")
    input_ids, attention_mask = _pad(ids_list, pad_id, left=False, pad_to_multiple_of=pad_to_multiple_of)
    return ScoringBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        index=torch.as_tensor(list(index), dtype=torch.long),
        rows=tuple(rows),
    )
