"""What the three DataModules share: the tokenizer they render with.

``ChatDataModule`` loads ``tokenizer_path`` or, on a pipeline's first run, trains one on ``train_path`` and saves it
there; a folder of Hugging Face tokenizer files loads that tokenizer and its chat template instead. Subclasses set
``train_path``, ``tokenizer_path`` and ``tokenizer_vocab_size`` in their constructors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from rlhf_lightning.tokenization import ChatTokenizer


def tokenizer_for(
    tokenizer_path: str, data_paths: Sequence[str], vocab_size: int, cached: ChatTokenizer | None
) -> ChatTokenizer:
    """Load ``tokenizer_path``, or train one on ``data_paths`` and save it there (first run of a pipeline).

    A folder with Hugging Face tokenizer files (a local model folder) loads that tokenizer and its chat template
    through ``rlhf_lightning.tokenization_hf`` (imported only then: the data layer never imports transformers).
    """
    if cached is not None:
        return cached
    if Path(tokenizer_path).is_dir():
        from rlhf_lightning.tokenization_hf import HFChatTokenizer, is_hf_tokenizer_folder

        if not is_hf_tokenizer_folder(tokenizer_path):
            raise FileNotFoundError(f"{tokenizer_path}: a folder without Hugging Face tokenizer files")
        return HFChatTokenizer.from_pretrained(tokenizer_path)
    from rlhf_lightning.tokenization import load_or_train_tokenizer

    return load_or_train_tokenizer(tokenizer_path, list(data_paths), vocab_size=vocab_size)


class RenderedRows(Dataset):
    """Rendered token ids with the source rows they came from: item ``i`` is ``(ids, i, row)``."""

    def __init__(self, ids: Sequence[list[int]], rows: Sequence[dict[str, Any]]) -> None:
        if len(ids) != len(rows):
            raise ValueError(f"{len(ids)} id lists but {len(rows)} rows")
        self.ids = list(ids)
        self.rows = list(rows)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int, dict[str, Any]]:
        return self.ids[i], i, self.rows[i]


def collate_rendered_rows(items, *, collate: Callable, pad_id: int, pad_to_multiple_of: int | None):
    """Collate ``RenderedRows`` items with ``collate(ids_list, pad_id, index, rows, pad_to_multiple_of=...)``."""
    ids, index, rows = zip(*items)
    return collate(list(ids), pad_id, list(index), list(rows), pad_to_multiple_of=pad_to_multiple_of)


class ChatDataModule(LightningDataModule):
    """A LightningDataModule whose rows are rendered with a chat tokenizer (``.tokenizer``, loaded on first use)."""

    train_path: str
    tokenizer_path: str
    tokenizer_vocab_size: int
    _tokenizer: ChatTokenizer | None = None

    def prepare_tokenizer(self) -> ChatTokenizer:
        """Load the tokenizer, training it on ``train_path`` first if the file does not exist."""
        self._tokenizer = tokenizer_for(
            self.tokenizer_path, [self.train_path], self.tokenizer_vocab_size, self._tokenizer
        )
        return self._tokenizer

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The chat tokenizer (loaded on first use)."""
        return self.prepare_tokenizer()

    def prepare_data(self) -> None:
        self.prepare_tokenizer()
