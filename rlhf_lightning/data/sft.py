"""SFT data: conversations rendered with the chat template, assistant-only loss masks, length-bucketed batches.

``SFTDataModule`` reads ``{"messages": [...]}`` or prompt/response rows (``data.formats.parse_conversation``), renders
them with ``ChatTokenizer.render`` (loss mask True on assistant content and its ``<|eos|>``), applies the truncation
policy and serves right-padded :class:`~rlhf_lightning.types.SFTBatch` es.

This module also holds the pieces the preference and prompt DataModules share (row loading with counted skips, the
seeded train/val split, turn-aware left truncation, the tokenizer bootstrap), so the three stay consistent.

Choices:

* Errors come before training: ``setup()`` (and the cheaper ``validate_inputs()``) parse every row and raise the
  ``DataFormatError`` that names file, line and field; ``skip_bad_rows=True`` skips and counts instead.
* Left truncation (default, :func:`left_truncate`) works on messages and re-renders what it keeps, so it is exact
  for any chat template: it drops the oldest whole turns first (restarting at a user/system turn, a leading system
  message kept) and trims the oldest content tokens when no such restart fits; the end of the final assistant reply
  (with its EOS) is always kept, and the template's own preamble (BOS, a default system prompt) always stays.
  ``right`` cuts the end, ``drop`` drops long rows. Examples left with no assistant token (possible with ``right``)
  are dropped. Counts are logged as one warning and kept in ``.stats``.
* The validation split (when no ``val_path``) is a seeded permutation of the parsed rows, independent of the tokenizer.
* Training batches come from :class:`~rlhf_lightning.data.sampling.LengthBucketBatchSampler` (on the shipped HH data
  it cuts padding from ~58% to ~3%); validation batches are the examples sorted longest first, unshuffled, through a
  plain ``DataLoader`` (so Lightning may shard them in distributed runs). Multi-device training with the bucketing
  sampler needs ``Trainer(use_distributed_sampler=False)``: the sampler shards by rank itself. The train loader is a
  :class:`~rlhf_lightning.data.sampling.ResumableDataLoader`: a mid-epoch checkpoint resumes at the next batch.
* ``packing=True`` serves the same batches (same sampler, same examples) packed padding-free into one row
  (``data.collate.collate_sft_packed``), train and validation alike.
* ``prepare_data()`` trains (or loads) the tokenizer once, on rank 0; ``setup()`` loads it on every rank.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import ChatDataModule
from rlhf_lightning.data.collate import collate_sft, collate_sft_packed
from rlhf_lightning.data.formats import Conversation, load_rows, parse_conversation
from rlhf_lightning.data.sampling import LengthBucketBatchSampler, ResumableDataLoader
from rlhf_lightning.types import Message

if TYPE_CHECKING:
    from rlhf_lightning.tokenization import ChatTokenizer

__all__ = ["ConversationDataset", "SFTDataModule", "Truncation", "left_truncate", "split_rows"]

log = logging.getLogger(__name__)

Truncation = Literal["left", "right", "drop"]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ shared helpers


def load_checked(
    path: str | Path, parser: Callable[..., T], *, skip_bad: bool, what: str
) -> tuple[list[T], int]:
    """Parse every row of ``path``; with ``skip_bad`` count and log the skipped rows. Returns (rows, skipped)."""
    loaded = load_rows(path, parser, skip_bad=skip_bad)
    if loaded.skipped:
        first = "; ".join(str(e) for e in loaded.first_errors)
        log.warning("%s: skipped %d bad row(s) of %s; first: %s", what, loaded.skipped, path, first)
    return loaded.rows, loaded.skipped


def split_rows(rows: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic train/val split: a ``seed``-ed permutation, the first ``round(n * val_fraction)`` rows to val.

    At least one row goes to each side when ``0 < val_fraction`` and there are two rows or more. Both sides keep
    the file order of their rows.
    """
    n = len(rows)
    if val_fraction <= 0 or n < 2:
        return list(rows), []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [
        r for i, r in enumerate(rows) if i in val_idx
    ]


Rendered = tuple[list[Message], list[int], list[bool]]


def left_truncate(
    tok: ChatTokenizer, messages: Sequence[Message], max_length: int, *, prompt: bool = False
) -> Rendered | None:
    """Shorten a conversation from the left until its rendering fits ``max_length`` tokens; keep its end.

    Works on messages, never on assumed token positions, so it is right for any chat template (BOS or none, ChatML
    headers, a default system prompt the template inserts): every candidate is rendered by the tokenizer itself, and
    the result is exactly the rendering of the kept messages. In order:

    1. the whole conversation, if it fits;
    2. a leading system message plus the messages from the earliest user/system turn ``k`` on whose rendering fits
       (oldest whole turns dropped first; a restart at an assistant turn would read as a reply with no question);
    3. else, from the latest such restart (or the first message after the leading system message), the oldest
       tokens of the first kept message's content, then of the next messages' (a message whose content runs out
       stays as an empty turn; the last one must keep a token): the end of the latest turns beats no context;
    4. else, the same without the leading system message (it alone leaves no room).

    Args:
        tok: the tokenizer (``render``, ``render_prompt``, ``encode``, ``decode``).
        messages: the conversation.
        max_length: the longest rendering, in tokens.
        prompt: render with ``render_prompt`` (a generation prompt: ends in the assistant header; mask all False)
            instead of ``render``.

    Returns ``(kept_messages, ids, mask)``, or None when not even a shortened last message fits.
    """

    def render(msgs: list[Message]) -> tuple[list[int], list[bool]]:
        if prompt:
            ids = tok.render_prompt(msgs)
            return ids, [False] * len(ids)
        return tok.render(msgs)

    messages = list(messages)
    ids, mask = render(messages)
    if len(ids) <= max_length:
        return messages, ids, mask
    lead = messages[:1] if messages and messages[0]["role"] == "system" else []
    restarts = [k for k in range(len(lead) + 1, len(messages)) if messages[k]["role"] != "assistant"]
    # binary search for the earliest restart that fits (the kept length shrinks as k grows)
    lo, hi, best = 0, len(restarts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = lead + messages[restarts[mid] :]
        ids, mask = render(kept)
        if len(ids) <= max_length:
            best, hi = (kept, ids, mask), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    rest = messages[restarts[-1] if restarts else len(lead) :]
    for head in (lead, []) if lead else ([],):
        out = _trim_front(tok, head, rest, max_length, render)
        if out is not None:
            return out
    return None


def render_conversations(
    tok: ChatTokenizer, conversations: Sequence[Sequence[Message]], max_length: int | None, what: str
) -> tuple[list[list[int]], int]:
    """Render conversations to score, each left-truncated to ``max_length`` (None = no limit).

    Returns the id lists and how many were truncated; a conversation of which nothing fits raises ``ValueError``
    naming ``what`` and its index.
    """
    out, truncated = [], 0
    for i, messages in enumerate(conversations):
        if max_length is None:
            out.append(tok.render(messages)[0])
            continue
        kept = left_truncate(tok, messages, max_length)
        if kept is None:
            raise ValueError(
                f"{what}: conversation {i} does not fit in max_length={max_length} tokens even cut to the end of its "
                "last message; expected a larger max_length"
            )
        truncated += kept[0] != list(messages)
        out.append(kept[1])
    return out, truncated


def _trim_front(
    tok: ChatTokenizer,
    head: list[Message],
    rest: list[Message],
    max_length: int,
    render: Callable[[list[Message]], tuple[list[int], list[bool]]],
) -> Rendered | None:
    """``head`` + ``rest`` with the fewest oldest content tokens of ``rest`` dropped so that the rendering fits.

    A message whose content runs out stays as an empty turn (templates that check role order still render it).
    """
    kept = [*head, *rest]
    for i in range(len(head), len(kept)):
        content = kept[i]["content"]
        content_ids = tok.encode(content)
        drop = 0
        while drop < len(content_ids):
            tail = tok.decode(content_ids[drop:], skip_special_tokens=False) if drop else content
            if not content.endswith(
                tail
            ):  # cut inside a character, or a decoder's clean-up: keep as many chars
                tail = content[len(content) - len(tail) :]
            kept[i] = {**kept[i], "content": tail}
            ids, mask = render(kept)
            if len(ids) <= max_length:
                return kept, ids, mask
            drop += len(ids) - max_length
        kept[i] = {**kept[i], "content": ""}
    return None


def check_loader_args(max_length: int, batch_size: int, val_fraction: float, num_workers: int) -> None:
    if max_length < 4:
        raise ValueError(f"max_length={max_length}; expected >= 4 (bos, role, one token, eos)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}; expected 0 <= val_fraction < 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}; expected >= 0")


def world_size_and_rank(trainer: Any) -> tuple[int, int]:
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))


# --------------------------------------------------------------------------------------------------- dataset


class ConversationDataset(Dataset):
    """Rendered conversations: item ``i`` is ``(ids, assistant_mask)``, two lists of equal length."""

    def __init__(self, ids: Sequence[list[int]], masks: Sequence[list[bool]]) -> None:
        if len(ids) != len(masks):
            raise ValueError(f"{len(ids)} id lists but {len(masks)} masks")
        self.ids = list(ids)
        self.masks = list(masks)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def sorted_by_length(self) -> ConversationDataset:
        """The same examples, longest first (stable): evaluation order with the least padding."""
        order = sorted(range(len(self)), key=lambda i: -len(self.ids[i]))
        return ConversationDataset([self.ids[i] for i in order], [self.masks[i] for i in order])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[bool]]:
        return self.ids[i], self.masks[i]


# ------------------------------------------------------------------------------------------------ datamodule


class SFTDataModule(ChatDataModule):
    """Conversations for supervised fine-tuning, as right-padded ``SFTBatch`` es.

    Args:
        train_path: JSONL of ``{"messages": [...]}`` or ``{"prompt": ..., "response": ...}`` rows.
        val_path: JSONL for validation; when None, ``val_fraction`` of the train rows are held out.
        val_fraction: share of train rows held out when ``val_path`` is None (seeded split; 0 = no validation).
        tokenizer_path: tokenizer.json to load; trained on ``train_path`` and saved there if it does not exist.
        tokenizer_vocab_size: vocabulary size when a tokenizer has to be trained.
        max_length: longest rendered conversation in tokens (bos, role tokens and eos included).
        truncation: what to do with longer ones: ``left`` drops the oldest turns / tokens and keeps the final
            assistant reply, ``right`` cuts the end, ``drop`` drops the example.
        batch_size: conversations per batch.
        bucket_by_length: batch training examples of similar length (far less padding); False = random batches.
        pad_to_multiple_of: round each batch's length up to a multiple of this (e.g. 8 on GPU); None = exact.
        packing: serve padding-free batches: the batch's conversations end to end in one (1, N) row with per-sequence
            ``position_ids`` and ``cu_seqlens`` (``data.collate.pack_sequences``); the stage attends within each
            sequence only, so loss and gradients equal the padded batches'. ``batch_size`` still counts conversations
            (``len(batch)``); ``bucket_by_length`` then only shapes which examples share a batch. Only for stages
            that read packed batches (SFT, reward model; DPO refuses them).
        skip_bad_rows: skip (and count) rows that fail validation instead of raising.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and of the batch order.
    """

    def __init__(
        self,
        train_path: str = "data/hh_rlhf/sft_train.jsonl",
        val_path: str | None = None,
        val_fraction: float = 0.1,
        tokenizer_path: str = "runs/tokenizer.json",
        tokenizer_vocab_size: int = 4096,
        max_length: int = 512,
        truncation: Truncation = "left",
        batch_size: int = 8,
        bucket_by_length: bool = True,
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
        skip_bad_rows: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(max_length, batch_size, val_fraction, num_workers)
        if truncation not in ("left", "right", "drop"):
            raise ValueError(f"truncation={truncation!r}; expected 'left', 'right' or 'drop'")
        self.train_path = train_path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.tokenizer_path = tokenizer_path
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.truncation = truncation
        self.batch_size = batch_size
        self.bucket_by_length = bucket_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing
        self.skip_bad_rows = skip_bad_rows
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: ChatTokenizer | None = None
        self.train_dataset: ConversationDataset | None = None
        self.val_dataset: ConversationDataset | None = None
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ tokenizer
    # ---------------------------------------------------------------------------------------------- rows
    def _read(self) -> tuple[list[Conversation], list[Conversation], int]:
        train, skipped = load_checked(
            self.train_path, parse_conversation, skip_bad=self.skip_bad_rows, what="SFT train"
        )
        if self.val_path is not None:
            val, val_skipped = load_checked(
                self.val_path, parse_conversation, skip_bad=self.skip_bad_rows, what="SFT val"
            )
            return train, val, skipped + val_skipped
        train, val = split_rows(train, self.val_fraction, self.seed)
        return train, val, skipped

    def validate_inputs(self) -> dict[str, int]:
        """Parse every row of the data files (no tokenizer); raise ``DataFormatError`` naming file/line/field."""
        train, val, skipped = self._read()
        return {"train_rows": len(train), "val_rows": len(val), "skipped": skipped}

    def _render(self, rows: list[Conversation], counts: dict[str, int]) -> ConversationDataset:
        tok = self.tokenizer
        ids_out, masks_out = [], []
        for conv in rows:
            ids, mask = tok.render(conv.messages)
            if len(ids) > self.max_length:
                if self.truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                if self.truncation == "left":
                    kept = left_truncate(tok, conv.messages, self.max_length)
                    if kept is None:
                        counts["dropped"] += 1
                        continue
                    _, ids, mask = kept
                else:
                    ids, mask = ids[: self.max_length], mask[: self.max_length]
            if not any(mask):
                counts["dropped"] += 1
                continue
            ids_out.append(ids)
            masks_out.append(mask)
            counts["tokens"] += len(ids)
            counts["loss_tokens"] += sum(mask)
        return ConversationDataset(ids_out, masks_out)

    def setup(self, stage: str | None = None) -> None:
        """Parse, validate, tokenize and truncate (once); fill ``.stats``."""
        if self.train_dataset is not None:
            return
        train, val, skipped = self._read()
        counts = dict.fromkeys(("truncated", "dropped", "tokens", "loss_tokens"), 0)
        self.train_dataset = self._render(train, counts)
        self.val_dataset = self._render(val, counts)
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"{self.train_path}: no training example left after truncation "
                f"(max_length={self.max_length}, truncation={self.truncation!r})"
            )
        self.stats = {
            "rows": len(train) + len(val),
            "skipped": skipped,
            **counts,
            "train_examples": len(self.train_dataset),
            "val_examples": len(self.val_dataset),
        }
        if counts["truncated"] or counts["dropped"]:
            log.warning(
                "SFT data: %d of %d conversation(s) longer than max_length=%d were truncated (%s), %d dropped",
                counts["truncated"],
                self.stats["rows"],
                self.max_length,
                self.truncation,
                counts["dropped"],
            )

    # ------------------------------------------------------------------------------------------ loaders
    def _collate(self) -> Callable:
        return functools.partial(
            collate_sft_packed if self.packing else collate_sft,
            pad_id=self.tokenizer.pad_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        replicas, rank = world_size_and_rank(self.trainer)
        sampler = LengthBucketBatchSampler(
            self.train_dataset.lengths,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            bucket_size_multiplier=50 if self.bucket_by_length else 1,
            num_replicas=replicas,
            rank=rank,
        )
        return ResumableDataLoader(  # resumable mid-epoch: Lightning saves its position in checkpoints
            self.train_dataset, batch_sampler=sampler, collate_fn=self._collate(), **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_dataset is not None, "call setup() first"
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset.sorted_by_length(),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            **self._loader_kwargs(),
        )

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch on this rank (after ``setup()``)."""
        assert self.train_dataset is not None, "call setup() first"
        replicas, _ = world_size_and_rank(self.trainer)
        # one batch per global batch of batch_size x replicas rows (data/sampling.py)
        return math.ceil(len(self.train_dataset) / (self.batch_size * replicas))
