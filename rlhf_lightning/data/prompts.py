"""PPO prompts: left-padded ``PromptBatch`` es from an endless, seeded, resumable stream.

Rows are ``{"prompt": str | [msgs], **extra}`` (``data.formats.parse_prompt``); each renders with
``ChatTokenizer.render_prompt`` so it ends in the ``<|assistant|>`` header, ready for generation. The row (its prompt
messages and every extra field, e.g. GSM8K's ``answer``) travels in ``PromptBatch.rows`` for reward functions.

Choices:

* One PPO iteration = one batch, and PPO runs for a number of iterations, not epochs: the training loader is an
  endless stream that walks epoch 0 of a seeded permutation, then epoch 1, ... (``EpochCyclingBatchSampler``); the
  run is bounded by ``Trainer(max_steps=...)``. Every batch holds exactly ``batch_size`` prompts (the short tail of
  each epoch's permutation is left out of that epoch; a new permutation brings those rows back next epoch).
* Resume: the DataModule counts the training batches the Trainer actually consumed (in ``on_before_batch_transfer``,
  which runs for the batch handed to ``training_step``, so the loader's prefetching does not count), and its
  ``state_dict`` (epoch, batch in epoch, batches consumed) goes into every checkpoint. A resumed run starts the
  stream at exactly the next unseen batch. Manual loops call :meth:`PromptDataModule.mark_consumed` themselves.
* Prompts longer than ``max_prompt_length`` keep their end (``data.sft.left_truncate``: oldest whole turns first,
  then the oldest tokens of the latest question; the template's preamble, a leading system message and the assistant
  header stay), so the question being answered survives; a prompt of which not even that fits is dropped. Counts
  are logged.
* Random batches by default (``bucket_by_length=False``): batch composition in PPO affects advantage whitening and
  the KL controller, so it is not tied to prompt length unless asked for.
* Validation prompts (``val_path``, or a seeded ``val_fraction`` of the train rows) come in file order, finite.
* Multi-device runs need ``Trainer(use_distributed_sampler=False)``: the stream shards batches by rank itself.
* PPO-ptx (``ptx_path``): every training batch also carries ``ptx_batch_size`` SFT conversations in
  ``PromptBatch.ptx`` (an :class:`~rlhf_lightning.types.SFTBatch`, loss on assistant tokens), rendered and truncated
  as ``SFTDataModule`` does (left truncation to ``ptx_max_length``). They come from a second endless, seeded stream
  over the ptx file that advances in lock-step with the prompt stream: prompt batch ``p`` always travels with ptx
  batch ``p`` of its own cycling order, so one ``batches_consumed`` counter resumes both exactly. Bad ptx rows raise
  at ``setup()`` with file, line and field.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rlhf_lightning.data.base import ChatDataModule, RenderedRows, collate_rendered_rows
from rlhf_lightning.data.collate import collate_prompts
from rlhf_lightning.data.formats import PromptRow, parse_prompt
from rlhf_lightning.data.sampling import EpochCyclingBatchSampler, LengthBucketBatchSampler
from rlhf_lightning.data.sft import (
    ConversationDataset,
    SFTDataModule,
    check_loader_args,
    left_truncate,
    load_checked,
    split_rows,
    world_size_and_rank,
)

if TYPE_CHECKING:
    from rlhf_lightning.tokenization import ChatTokenizer
    from rlhf_lightning.types import PromptBatch

__all__ = ["PromptDataModule", "PromptDataset"]

log = logging.getLogger(__name__)


class PromptDataset(RenderedRows):
    """Rendered prompts: item ``i`` is ``(ids, i, row)`` with ``row = {"prompt": [msgs], **extra}``."""


class _PromptPtxDataset(Dataset):
    """Prompts and ptx conversations behind one index space: ``(0, i)`` is prompt ``i``, ``(1, j)`` conversation j."""

    def __init__(self, prompts: PromptDataset, ptx: ConversationDataset) -> None:
        self.parts = (prompts, ptx)

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        part, i = key
        return part, self.parts[part][i]


class _PairedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Zip of the endless prompt and ptx streams: each batch is the prompt batch's keys then the ptx batch's."""

    def __init__(self, prompts: EpochCyclingBatchSampler, ptx: EpochCyclingBatchSampler) -> None:
        self.prompts, self.ptx = prompts, ptx

    def resume_from(self, position: int) -> None:
        self.prompts.resume_from(position)
        self.ptx.resume_from(position)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for prompt_batch, ptx_batch in zip(self.prompts, self.ptx):
            yield [(0, i) for i in prompt_batch] + [(1, j) for j in ptx_batch]


def _collate_prompt_ptx_items(items, pad_id: int, pad_to_multiple_of: int | None):
    prompts = [item for part, item in items if part == 0]
    ptx = [item for part, item in items if part == 1]
    ids, index, rows = zip(*prompts)
    return collate_prompts(
        list(ids), pad_id, list(index), list(rows), pad_to_multiple_of=pad_to_multiple_of, ptx=ptx
    )


class PromptDataModule(ChatDataModule):
    """Prompts for PPO rollouts, as left-padded ``PromptBatch`` es from a resumable endless stream.

    Args:
        train_path: JSONL of ``{"prompt": str | [messages], ...extra}`` rows ending with a user turn.
        val_path: JSONL of held-out prompts for evaluation; None holds out ``val_fraction`` of the train rows.
        val_fraction: share of train rows held out when ``val_path`` is None (seeded split; 0 = no validation).
        tokenizer_path: tokenizer.json to load (the SFT stage's); trained on ``train_path`` if it does not exist.
        tokenizer_vocab_size: vocabulary size when a tokenizer has to be trained.
        max_prompt_length: longest rendered prompt in tokens; longer ones keep their end (left truncation).
        batch_size: prompts per PPO iteration (every training batch has exactly this many).
        shuffle: draw a new seeded permutation of the prompts every epoch; False = file order.
        bucket_by_length: group prompts of similar length into a batch (less padding, less random batches).
        pad_to_multiple_of: round each batch's length up to a multiple of this (e.g. 8 on GPU); None = exact.
        skip_bad_rows: skip (and count) rows that fail validation instead of raising.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split, of the prompt order and of the ptx order.
        ptx_path: PPO-ptx: JSONL of SFT conversations (any row ``SFTDataModule`` accepts) streamed into
            ``PromptBatch.ptx`` beside every training batch; None (default) = no ptx data.
        ptx_batch_size: conversations per training batch's ``ptx``.
        ptx_max_length: longest rendered ptx conversation in tokens (longer ones are left-truncated).
    """

    def __init__(
        self,
        train_path: str = "data/hh_rlhf/prompts_train.jsonl",
        val_path: str | None = None,
        val_fraction: float = 0.1,
        tokenizer_path: str = "runs/tokenizer.json",
        tokenizer_vocab_size: int = 4096,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        shuffle: bool = True,
        bucket_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        skip_bad_rows: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        ptx_path: str | None = None,
        ptx_batch_size: int = 8,
        ptx_max_length: int = 512,
    ) -> None:
        super().__init__()
        check_loader_args(max_prompt_length, batch_size, val_fraction, num_workers)
        check_loader_args(ptx_max_length, ptx_batch_size, 0.0, num_workers)
        self.train_path = train_path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.tokenizer_path = tokenizer_path
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucket_by_length = bucket_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.skip_bad_rows = skip_bad_rows
        self.num_workers = num_workers
        self.seed = seed
        self.ptx_path, self.ptx_batch_size, self.ptx_max_length = ptx_path, ptx_batch_size, ptx_max_length
        self._tokenizer: ChatTokenizer | None = None
        self.ptx_dataset: ConversationDataset | None = None
        self.train_dataset: PromptDataset | None = None
        self.val_dataset: PromptDataset | None = None
        self.stats: dict[str, int] = {}
        self.batches_consumed = 0  # training batches handed to training_step since the start of the run
        self._train_sampler: EpochCyclingBatchSampler | _PairedBatchSampler | None = None

    # ------------------------------------------------------------------------------------------ tokenizer
    # ---------------------------------------------------------------------------------------------- rows
    def _read(self) -> tuple[list[PromptRow], list[PromptRow], int]:
        train, skipped = load_checked(
            self.train_path, parse_prompt, skip_bad=self.skip_bad_rows, what="prompts"
        )
        if self.val_path is None:
            train, val = split_rows(train, self.val_fraction, self.seed)
            return train, val, skipped
        val, more = load_checked(self.val_path, parse_prompt, skip_bad=self.skip_bad_rows, what="val prompts")
        return train, val, skipped + more

    def validate_inputs(self) -> dict[str, int]:
        """Parse every row of the data files (no tokenizer); raise ``DataFormatError`` naming file/line/field."""
        train, val, skipped = self._read()
        counts = {"train_rows": len(train), "val_rows": len(val), "skipped": skipped}
        if self.ptx_path is not None:
            counts["ptx_rows"] = self._ptx_module().validate_inputs()["train_rows"]
        return counts

    def _ptx_module(self) -> SFTDataModule:
        """The SFT data layer over ``ptx_path`` (same parsing, rendering, truncation and errors), all rows train."""
        module = SFTDataModule(
            train_path=self.ptx_path,
            val_fraction=0.0,
            tokenizer_path=self.tokenizer_path,
            max_length=self.ptx_max_length,
            batch_size=self.ptx_batch_size,
            skip_bad_rows=self.skip_bad_rows,
            seed=self.seed,
        )
        module._tokenizer = self._tokenizer
        return module

    def _render(self, rows: list[PromptRow], counts: dict[str, int]) -> PromptDataset:
        ids_list, kept_rows = [], []
        for row in rows:
            kept = left_truncate(self.tokenizer, row.messages, self.max_prompt_length, prompt=True)
            if kept is None:  # not even the end of the last message fits after the template's preamble
                counts["dropped"] += 1
                continue
            counts["truncated"] += kept[0] != row.messages
            counts["tokens"] += len(kept[1])
            ids_list.append(kept[1])
            kept_rows.append({"prompt": row.messages, **row.extra})
        return PromptDataset(ids_list, kept_rows)

    def setup(self, stage: str | None = None) -> None:
        """Parse, validate, render and truncate the prompts (once); fill ``.stats``."""
        if self.train_dataset is not None:
            return
        train, val, skipped = self._read()
        counts = {"truncated": 0, "dropped": 0, "tokens": 0}
        self.train_dataset = self._render(train, counts)
        self.val_dataset = self._render(val, counts)
        if self.ptx_path is not None:
            ptx = self._ptx_module()
            ptx._tokenizer = self.tokenizer
            ptx.setup("fit")
            self.ptx_dataset = ptx.train_dataset
            counts["ptx_examples"] = len(self.ptx_dataset)
        self.stats = {
            "rows": len(train) + len(val),
            "skipped": skipped,
            **counts,
            "train_prompts": len(self.train_dataset),
            "val_prompts": len(self.val_dataset),
        }
        if counts["truncated"] or counts["dropped"]:
            log.warning(
                "prompt data: %d of %d prompt(s) longer than max_prompt_length=%d were left-truncated, %d dropped",
                counts["truncated"],
                self.stats["rows"],
                self.max_prompt_length,
                counts["dropped"],
            )

    # ---------------------------------------------------------------------------------------- position
    @property
    def batches_per_epoch(self) -> int:
        """Full training batches per pass over the prompts, on this rank (after ``setup()``)."""
        return len(self._base_sampler())

    def _base_sampler(self) -> LengthBucketBatchSampler:
        assert self.train_dataset is not None, "call setup() first"
        replicas, rank = world_size_and_rank(self.trainer)
        if len(self.train_dataset) < self.batch_size * replicas:
            raise ValueError(
                f"{self.train_path}: {len(self.train_dataset)} training prompts cannot fill one batch of "
                f"{self.batch_size} per device on {replicas} device(s); lower batch_size or add prompts"
            )
        return LengthBucketBatchSampler(
            self.train_dataset.lengths,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=True,
            bucket_size_multiplier=50 if self.bucket_by_length else 1,
            num_replicas=replicas,
            rank=rank,
        )

    def _ptx_sampler(self) -> LengthBucketBatchSampler:
        assert self.ptx_dataset is not None, "call setup() first"
        replicas, rank = world_size_and_rank(self.trainer)
        if len(self.ptx_dataset) < self.ptx_batch_size * replicas:
            raise ValueError(
                f"{self.ptx_path}: {len(self.ptx_dataset)} ptx conversations cannot fill one batch of "
                f"{self.ptx_batch_size} per device on {replicas} device(s); lower ptx_batch_size or add rows"
            )
        return LengthBucketBatchSampler(
            self.ptx_dataset.lengths,
            self.ptx_batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
            bucket_size_multiplier=1,
            num_replicas=replicas,
            rank=rank,
        )

    def calibration_prompts(self, n: int) -> PromptBatch:
        """Up to ``n`` training prompts (a seeded sample, independent of the training stream), as one left-padded
        batch: what PPO samples reference-policy replies on to measure its reward normalisation."""
        assert self.train_dataset is not None, "call setup() first"
        count = min(n, len(self.train_dataset))
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(self.seed))
        return self._collate()([self.train_dataset[i] for i in order[:count].tolist()])

    def mark_consumed(self, n: int = 1) -> None:
        """Record that ``n`` more training batches were used (manual loops; the Trainer path counts itself)."""
        self.batches_consumed += n

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Stream position, stored in checkpoints by Lightning."""
        state: dict[str, Any] = {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }
        if self.train_dataset is not None:
            per_epoch = self.batches_per_epoch
            state.update(
                epoch=self.batches_consumed // per_epoch,
                batch_in_epoch=self.batches_consumed % per_epoch,
                batches_per_epoch=per_epoch,
                train_prompts=len(self.train_dataset),
            )
        if (
            self.ptx_dataset is not None
        ):  # the ptx stream moves in lock-step: its position is batches_consumed too
            per_epoch = len(self._ptx_sampler())
            state.update(
                ptx_path=self.ptx_path,
                ptx_batch_size=self.ptx_batch_size,
                ptx_examples=len(self.ptx_dataset),
                ptx_epoch=self.batches_consumed // per_epoch,
                ptx_batch_in_epoch=self.batches_consumed % per_epoch,
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream where a checkpoint left it (the next batch is the first one not yet consumed)."""
        self.batches_consumed = int(state_dict["batches_consumed"])
        mine = self.state_dict()
        changed = [
            k
            for k in (
                "seed",
                "batch_size",
                "shuffle",
                "train_prompts",
                "ptx_path",
                "ptx_batch_size",
                "ptx_examples",
            )
            if k in state_dict and k in mine and state_dict[k] != mine[k]
        ]
        if changed:
            log.warning(
                "prompt stream resumed with different %s than the checkpoint: continuing at batch %d of a "
                "different order",
                ", ".join(changed),
                self.batches_consumed,
            )
        if self._train_sampler is not None:
            self._train_sampler.resume_from(self.batches_consumed)

    # ------------------------------------------------------------------------------------------ loaders
    def _collate(self) -> Callable:
        return functools.partial(
            collate_rendered_rows,
            collate=collate_prompts,
            pad_id=self.tokenizer.pad_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def train_dataloader(self) -> DataLoader:
        """Endless stream of ``batch_size``-prompt batches, starting at ``batches_consumed``."""
        prompts = EpochCyclingBatchSampler(self._base_sampler(), start_position=self.batches_consumed)
        dataset, collate = self.train_dataset, self._collate()
        self._train_sampler = prompts
        if self.ptx_dataset is not None:
            ptx = EpochCyclingBatchSampler(self._ptx_sampler(), start_position=self.batches_consumed)
            self._train_sampler = _PairedBatchSampler(prompts, ptx)
            dataset = _PromptPtxDataset(self.train_dataset, self.ptx_dataset)
            collate = functools.partial(
                _collate_prompt_ptx_items,
                pad_id=self.tokenizer.pad_id,
                pad_to_multiple_of=self.pad_to_multiple_of,
            )
        return DataLoader(
            dataset,
            batch_sampler=self._train_sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_dataset is not None, "call setup() first"
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
