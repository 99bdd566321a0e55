"""Preference data for the reward model: (prompt, chosen, rejected) pairs as stacked ``PreferenceBatch`` es.

Rows are read by ``data.formats.parse_preference`` (explicit prompt, implicit prompt, HH transcripts, optional
``margin``). Each pair renders as ``render(prompt + chosen)`` and ``render(prompt + rejected)``; the tokenizer encodes
every message on its own, so the prompt is tokenized once and the two replies are appended to the same prompt ids.

Choices:

* The score position: every sequence ends at the reply's EOS (the tokenizers' ``render`` drops what a template
  writes after the last EOS, e.g. ChatML's ``"\\n"``), the token the reward model reads its score at here, in
  ``rlhf-lightning score`` and in PPO (whose rollouts stop at EOS).
* Truncation keeps the replies whole: the reward model reads its score at the last real token, so cutting the end
  of a reply would score text nobody wrote. ``left`` (default) shortens the shared prompt messages
  (``data.sft.left_truncate``: oldest whole turns first, then the oldest tokens of the latest question; the
  template's preamble and a leading system message stay) until the longer reply fits, and renders the kept prompt
  with each reply again, identically for chosen and rejected; a pair whose longer reply leaves no room is dropped. ``right`` cuts each sequence's end (dropped if
  no reply token is left), ``drop`` drops long pairs. Counts are logged and kept in ``.stats``.
* ``val_path`` defaults to the shipped held-out preference file; with ``val_path=None`` a seeded ``val_fraction`` of
  the train rows is held out. ``test_dataloader`` reads ``test_path`` (or the validation data).
* ``predict_dataloader`` scores a JSONL of conversations (``{"messages": [...]}`` or prompt/response rows) as
  right-padded :class:`~rlhf_lightning.data.collate.ScoringBatch` es in file order, left-truncated like SFT.
* Training batches are length-bucketed by the longer sequence of each pair; evaluation batches are sorted longest
  first. Multi-device training needs ``Trainer(use_distributed_sampler=False)`` (the sampler shards itself). The
  train loader resumes mid-epoch at the next batch (:class:`~rlhf_lightning.data.sampling.ResumableDataLoader`).
* ``packing=True`` serves the same pair batches packed padding-free into one row (train, validation and test;
  ``data.collate.collate_preference_packed``); prediction batches stay padded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import ChatDataModule, RenderedRows, collate_rendered_rows
from rlhf_lightning.data.collate import collate_preference, collate_preference_packed, collate_scoring
from rlhf_lightning.data.formats import PreferencePair, load_rows, parse_conversation, parse_preference
from rlhf_lightning.data.sampling import LengthBucketBatchSampler, ResumableDataLoader
from rlhf_lightning.data.sft import (
    Truncation,
    check_loader_args,
    left_truncate,
    load_checked,
    render_conversations,
    split_rows,
    world_size_and_rank,
)

if TYPE_CHECKING:
    from rlhf_lightning.tokenization import ChatTokenizer

__all__ = [
    "PreferenceDataModule",
    "PreferenceDataset",
    "ScoringDataset",
    "create_preference_dataloader",
    "encode_pair",
]

log = logging.getLogger(__name__)


def encode_pair(
    tok: ChatTokenizer, pair: PreferencePair, max_length: int, truncation: Truncation = "left"
) -> tuple[list[int], list[int], str]:
    """Render ``pair`` as ``(chosen_ids, rejected_ids, status)``; status is ``ok``, ``truncated`` or ``dropped``.

    A dropped pair comes back with empty id lists.
    """
    # The prompt as the model sees it before replying (ending in the assistant header), and each reply as the
    # tokens the full conversation adds after it. Rendering whole conversations (not the reply alone) keeps this
    # right for any chat template: with or without BOS, with default system prompts, ChatML-style headers, ...
    prompt = tok.render_prompt(pair.prompt)
    chosen = _reply_ids(tok, pair.prompt, pair.chosen, prompt)
    rejected = _reply_ids(tok, pair.prompt, pair.rejected, prompt)
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt + chosen, prompt + rejected, "ok"
    if truncation == "drop":
        return [], [], "dropped"
    if truncation == "right":
        if len(prompt) >= max_length:
            return [], [], "dropped"
        return (prompt + chosen)[:max_length], (prompt + rejected)[:max_length], "truncated"
    # shorten the prompt messages until their generation prompt leaves room for the longer reply, then render the
    # kept prompt with each reply again: both sequences are exactly the template's rendering of what is kept
    kept = (
        left_truncate(tok, pair.prompt, max_length - longest, prompt=True) if longest < max_length else None
    )
    if kept is None:
        return [], [], "dropped"
    kept_prompt, prompt, _ = kept
    chosen = _reply_ids(tok, kept_prompt, pair.chosen, prompt)
    rejected = _reply_ids(tok, kept_prompt, pair.rejected, prompt)
    if (
        len(prompt) + max(len(chosen), len(rejected)) > max_length
    ):  # a template whose replies depend on the prompt
        return [], [], "dropped"
    return prompt + chosen, prompt + rejected, "truncated"


def _reply_ids(tok: ChatTokenizer, prompt: list, reply: list, prompt_ids: list[int]) -> list[int]:
    """Token ids that rendering ``prompt + reply`` adds after ``prompt_ids`` (the rendered generation prompt)."""
    full, _ = tok.render([*prompt, *reply])
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"{getattr(tok, 'source', 'tokenizer')}: the chat template renders a conversation whose start differs "
            "from its generation prompt; expected a prefix-stable template (prompt + reply starts with the prompt)"
        )
    return full[len(prompt_ids) :]


class PreferenceDataset(Dataset):
    """Encoded pairs: item ``i`` is ``(chosen_ids, rejected_ids, margin)``."""

    def __init__(self, items: Sequence[tuple[list[int], list[int], float]]) -> None:
        self.items = list(items)

    @property
    def lengths(self) -> list[int]:
        """Padded length each pair needs (its longer sequence)."""
        return [max(len(c), len(r)) for c, r, _ in self.items]

    def sorted_by_length(self) -> PreferenceDataset:
        return PreferenceDataset(sorted(self.items, key=lambda it: -max(len(it[0]), len(it[1]))))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], float]:
        return self.items[i]


class ScoringDataset(RenderedRows):
    """Conversations to score: item ``i`` is ``(ids, i, row)`` with ``row = {"messages": [msgs]}``."""


def encode_pairs(
    tok: ChatTokenizer, pairs: Sequence[PreferencePair], max_length: int, truncation: Truncation, counts: dict
) -> PreferenceDataset:
    """Encode ``pairs``, adding to ``counts['truncated' | 'dropped' | 'tokens']``."""
    items = []
    for pair in pairs:
        chosen, rejected, status = encode_pair(tok, pair, max_length, truncation)
        if status == "dropped":
            counts["dropped"] += 1
            continue
        counts["truncated"] += status == "truncated"
        counts["tokens"] += len(chosen) + len(rejected)
        items.append((chosen, rejected, pair.margin))
    return PreferenceDataset(items)


def create_preference_dataloader(
    path: str | Path,
    tokenizer: ChatTokenizer,
    batch_size: int = 8,
    max_length: int = 512,
    shuffle: bool = False,
) -> DataLoader:
    """A DataLoader of ``PreferenceBatch`` es over one preference JSONL (scripts, notebooks, evaluation).

    Bad rows raise ``DataFormatError``; long pairs are left-truncated (prompt side) as in the DataModule.
    """
    pairs = load_rows(path, parse_preference).rows
    counts = dict.fromkeys(("truncated", "dropped", "tokens"), 0)
    dataset = encode_pairs(tokenizer, pairs, max_length, "left", counts)
    if counts["truncated"] or counts["dropped"]:
        log.warning(
            "%s: %d pair(s) truncated, %d dropped (max_length=%d)",
            path,
            counts["truncated"],
            counts["dropped"],
            max_length,
        )
    collate = functools.partial(collate_preference, pad_id=tokenizer.pad_id)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


class PreferenceDataModule(ChatDataModule):
    """Chosen/rejected pairs for reward-model training, as ``PreferenceBatch`` es (chosen rows first).

    Args:
        train_path: JSONL of preference rows (``prompt``/``chosen``/``rejected``, implicit prompt or HH transcripts).
        val_path: JSONL for validation; None holds out ``val_fraction`` of the train rows instead.
        val_fraction: share of train rows held out when ``val_path`` is None (seeded split).
        test_path: JSONL for ``trainer.test``; None tests on the validation data.
        predict_path: JSONL of conversations to score with ``trainer.predict`` (``ScoringBatch`` es).
        tokenizer_path: tokenizer.json to load; trained on ``train_path`` and saved there if it does not exist.
        tokenizer_vocab_size: vocabulary size when a tokenizer has to be trained.
        max_length: longest rendered prompt + reply in tokens.
        truncation: ``left`` shortens the prompt and keeps the replies whole (pairs whose reply alone is too long
            are dropped), ``right`` cuts the end, ``drop`` drops long pairs.
        batch_size: pairs per batch (a batch holds 2 x batch_size sequences).
        bucket_by_length: batch training pairs of similar length; False = random batches.
        pad_to_multiple_of: round each batch's length up to a multiple of this (e.g. 8 on GPU); None = exact.
        packing: serve padding-free batches: the batch's 2 x batch_size sequences (chosen ones first, then rejected) end to end in one (1, N) row with per-sequence
            ``position_ids`` and ``cu_seqlens`` (``data.collate.pack_sequences``); the stage attends within each
            sequence only, so loss and gradients equal the padded batches'. ``batch_size`` still counts pairs
            (``len(batch)``); ``bucket_by_length`` then only shapes which examples share a batch. Only for stages
            that read packed batches (SFT, reward model; DPO refuses them).
        skip_bad_rows: skip (and count) rows that fail validation instead of raising.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and of the batch order.
    """

    def __init__(
        self,
        train_path: str = "data/hh_rlhf/preference_train.jsonl",
        val_path: str | None = "data/hh_rlhf/preference_test.jsonl",
        val_fraction: float = 0.1,
        test_path: str | None = None,
        predict_path: str | None = None,
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
        self.test_path = test_path
        self.predict_path = predict_path
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
        self.train_dataset: PreferenceDataset | None = None
        self.val_dataset: PreferenceDataset | None = None
        self.test_dataset: PreferenceDataset | None = None
        self.predict_dataset: ScoringDataset | None = None
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ tokenizer
    # ---------------------------------------------------------------------------------------------- rows
    def _read_fit(self) -> tuple[list[PreferencePair], list[PreferencePair], int]:
        train, skipped = load_checked(
            self.train_path, parse_preference, skip_bad=self.skip_bad_rows, what="preference train"
        )
        if self.val_path is None:
            train, val = split_rows(train, self.val_fraction, self.seed)
            return train, val, skipped
        val, more = load_checked(
            self.val_path, parse_preference, skip_bad=self.skip_bad_rows, what="preference val"
        )
        return train, val, skipped + more

    def validate_inputs(self) -> dict[str, int]:
        """Parse every row of every configured file (no tokenizer); raise ``DataFormatError`` naming file/line/field."""
        train, val, skipped = self._read_fit()
        out = {"train_rows": len(train), "val_rows": len(val)}
        if self.test_path is not None:
            test, more = load_checked(
                self.test_path, parse_preference, skip_bad=self.skip_bad_rows, what="test"
            )
            out["test_rows"], skipped = len(test), skipped + more
        if self.predict_path is not None:
            conv, more = load_checked(
                self.predict_path, parse_conversation, skip_bad=self.skip_bad_rows, what="predict"
            )
            out["predict_rows"], skipped = len(conv), skipped + more
        out["skipped"] = skipped
        return out

    def _bump(self, key: str, value: int) -> None:
        self.stats[key] = self.stats.get(key, 0) + value

    def _encode(self, pairs: list[PreferencePair], skipped: int) -> PreferenceDataset:
        counts = dict.fromkeys(("truncated", "dropped", "tokens"), 0)
        dataset = encode_pairs(self.tokenizer, pairs, self.max_length, self.truncation, counts)
        self._bump("rows", len(pairs))
        self._bump("skipped", skipped)
        for key, value in counts.items():
            self._bump(key, value)
        if counts["truncated"] or counts["dropped"]:
            log.warning(
                "preference data: %d of %d pair(s) longer than max_length=%d were truncated (%s), %d dropped",
                counts["truncated"],
                len(pairs),
                self.max_length,
                self.truncation,
                counts["dropped"],
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Parse, validate and encode what ``stage`` needs (all configured splits when None); fill ``.stats``."""
        if stage in (None, "fit", "validate", "test") and self.train_dataset is None:
            train, val, skipped = self._read_fit()
            self.train_dataset = self._encode(train, skipped)
            self.val_dataset = self._encode(val, 0)
            if len(self.train_dataset) == 0:
                raise ValueError(
                    f"{self.train_path}: no pair left after truncation (max_length={self.max_length})"
                )
            self.stats["train_pairs"], self.stats["val_pairs"] = (
                len(self.train_dataset),
                len(self.val_dataset),
            )
        if stage in (None, "test") and self.test_dataset is None:
            if self.test_path is None:
                self.test_dataset = self.val_dataset
            else:
                test, skipped = load_checked(
                    self.test_path, parse_preference, skip_bad=self.skip_bad_rows, what="preference test"
                )
                self.test_dataset = self._encode(test, skipped)
            self.stats["test_pairs"] = len(self.test_dataset)
        if stage == "predict" or (stage is None and self.predict_path is not None):
            self._setup_predict()

    def _setup_predict(self) -> None:
        if self.predict_dataset is not None:
            return
        if self.predict_path is None:
            raise ValueError("predict_path is not set; expected a JSONL of conversations to score")
        convs, skipped = load_checked(
            self.predict_path, parse_conversation, skip_bad=self.skip_bad_rows, what="predict"
        )
        ids_list, truncated = render_conversations(
            self.tokenizer, [c.messages for c in convs], self.max_length, what=str(self.predict_path)
        )
        if truncated:
            log.warning("predict data: %d of %d conversation(s) left-truncated", truncated, len(convs))
        self.predict_dataset = ScoringDataset(ids_list, [{"messages": c.messages} for c in convs])
        self.stats.update(predict_rows=len(convs), predict_skipped=skipped, predict_truncated=truncated)

    # ------------------------------------------------------------------------------------------ loaders
    def _collate(self) -> Callable:
        return functools.partial(
            collate_preference_packed if self.packing else collate_preference,
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

    def _eval_loader(self, dataset: PreferenceDataset | None) -> DataLoader | list:
        assert dataset is not None, "call setup() first"
        if len(dataset) == 0:
            return []
        return DataLoader(
            dataset.sorted_by_length(),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        self._setup_predict()
        collate = functools.partial(
            collate_rendered_rows,
            collate=collate_scoring,
            pad_id=self.tokenizer.pad_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return DataLoader(
            self.predict_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate,
            **self._loader_kwargs(),
        )
