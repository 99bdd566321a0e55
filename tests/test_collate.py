"""Collation: shapes, padding sides, masks built from lengths (not from pad-id comparisons)."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data.collate import (
    ScoringBatch,
    collate_preference,
    collate_prompts,
    collate_scoring,
    collate_sft,
    padded_length,
)
from rlhf_lightning.types import PreferenceBatch, PromptBatch, SFTBatch

PAD = 0


def test_collate_sft_right_pads_and_keeps_loss_mask():
    examples = [
        ([5, 6, 7, 8], [False, False, True, True]),
        ([9, 10], [False, True]),
    ]
    batch = collate_sft(examples, pad_id=PAD)
    assert isinstance(batch, SFTBatch)
    assert batch.input_ids.shape == (2, 4) and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool and batch.loss_mask.dtype == torch.bool
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.loss_mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert len(batch) == 2


def test_masks_come_from_lengths_not_pad_id():
    # a real token equal to the pad id must still count as real
    batch = collate_sft([([3, PAD, 4], [False, True, True]), ([3], [False])], pad_id=PAD)
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.loss_mask[0].tolist() == [False, True, True]
    prompts = collate_prompts([[PAD, 7], [1, 2, 3]], pad_id=PAD, index=[0, 1])
    assert prompts.attention_mask.tolist() == [[False, True, True], [True, True, True]]


def test_collate_sft_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask"):
        collate_sft([([1, 2, 3], [True])], pad_id=PAD)


def test_collate_preference_stacks_chosen_then_rejected_with_common_length():
    pairs = [([1, 2, 3], [1, 2], 0.5), ([4], [4, 5, 6, 7, 8], 0.0)]
    batch = collate_preference(pairs, pad_id=PAD)
    assert isinstance(batch, PreferenceBatch)
    assert batch.input_ids.shape == (4, 5)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, PAD, PAD],  # chosen 0
        [4, PAD, PAD, PAD, PAD],  # chosen 1
        [1, 2, PAD, PAD, PAD],  # rejected 0
        [4, 5, 6, 7, 8],  # rejected 1
    ]
    assert batch.attention_mask.sum(1).tolist() == [3, 1, 2, 5]
    assert batch.margin.dtype == torch.float32 and batch.margin.tolist() == [0.5, 0.0]
    assert len(batch) == 2


def test_collate_prompts_left_pads_and_keeps_rows():
    rows = [{"prompt": [{"role": "user", "content": "a"}], "answer": "72"}, {"prompt": []}]
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=PAD, index=[10, 3], rows=rows)
    assert isinstance(batch, PromptBatch)
    assert batch.input_ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch.attention_mask.tolist() == [[True, True, True], [False, False, True]]
    # every row ends in the same (last) column: generation appends in one column
    assert batch.attention_mask[:, -1].all()
    assert batch.index.tolist() == [10, 3] and batch.index.dtype == torch.long
    assert batch.rows[0]["answer"] == "72"
    moved = batch.to("cpu")
    assert moved.rows == batch.rows


def test_collate_scoring_right_pads_with_index():
    batch = collate_scoring([[1, 2], [3, 4, 5]], pad_id=PAD, index=[7, 2])
    assert isinstance(batch, ScoringBatch)
    assert batch.input_ids.tolist() == [[1, 2, PAD], [3, 4, 5]]
    assert batch.attention_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.index.tolist() == [7, 2] and len(batch) == 2


def test_pad_to_multiple_of_rounds_up_with_false_masks():
    batch = collate_sft([([1, 2, 3, 4, 5], [True] * 5)], pad_id=PAD, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (1, 8)
    assert batch.attention_mask.sum().item() == 5 and batch.loss_mask.sum().item() == 5
    prompts = collate_prompts([[1, 2, 3]], pad_id=PAD, index=[0], pad_to_multiple_of=4)
    assert prompts.input_ids.tolist() == [[PAD, 1, 2, 3]]
    pref = collate_preference([([1] * 9, [2] * 3, 0.0)], pad_id=PAD, pad_to_multiple_of=8)
    assert pref.input_ids.shape == (2, 16)
    assert padded_length([8], 8) == 8 and padded_length([3, 7]) == 7


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        collate_sft([], pad_id=PAD)


def test_batch_to_moves_nested_batches():
    import torch

    from rlhf_lightning.types import PromptBatch, SFTBatch

    ptx = SFTBatch(
        torch.ones(1, 2, dtype=torch.long),
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1, 2, dtype=torch.bool),
    )
    batch = PromptBatch(
        torch.ones(1, 3, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.bool),
        torch.zeros(1, dtype=torch.long),
        ptx=ptx,
    )
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.ptx.input_ids.device.type == "meta"
