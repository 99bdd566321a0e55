"""Train, load and save the project's tokenizer, and render chats into token ids with an assistant mask.

The tokenizer is a byte-level BPE (GPT-2 style byte-to-unicode alphabet, Radford et al. 2019) trained with the
Hugging Face ``tokenizers`` library and stored as one ``tokenizer.json``. Special tokens come first, so ``<|pad|>`` is
id 0, then ``<|bos|>``, ``<|eos|>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>``; pad is never EOS.

Chat template (built in, see docs/ARCHITECTURE.md)::

    <|bos|> <|role|> content <|eos|> <|role|> content <|eos|> ...      render(messages)
    <|bos|> <|role|> content <|eos|> ... <|assistant|>                  render_prompt(messages)

Choices:

* No normalizer and no added prefix space: every byte of the text is kept, so ``decode(encode(text)) == text`` for any
  string (unicode, emoji, newlines, leading spaces). Each message content is encoded on its own, so the assistant mask
  is exact (no BPE merge crosses a role boundary) and a reply encodes the same whether or not a prompt precedes it.
* ``encode`` treats text as plain text: a literal ``"<|eos|>"`` in user data is encoded as ordinary bytes, never as the
  special token, so data cannot forge role boundaries. (``Tokenizer.encode_special_tokens`` is not serialized in
  tokenizer.json, so ``ChatTokenizer`` sets it on every load.)
* Training is deterministic for the same texts in the same order (checked by a test); the BPE trainer breaks count
  ties by pair order.
* ``iter_texts_from_jsonl`` reuses the row parsers of ``rlhf_lightning.data.formats`` (imported inside the function,
  so importing this module stays cheap and no import cycle with ``rlhf_lightning.data`` can arise), so the tokenizer
  is trained on exactly the message contents the data layer reads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf_lightning.types import Message

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS: dict[str, str] = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *ROLE_TOKENS.values())  # in id order: <|pad|> is 0

PathLike = str | Path


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with the project's special tokens and chat template.

    Args:
        tokenizer: a tokenizer that holds every entry of ``SPECIAL_TOKENS``, with ``<|pad|>`` at id 0.
        source: where it came from, named in error messages.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>") -> None:
        ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"{source}: tokenizer lacks the special tokens {missing}; expected all of {list(SPECIAL_TOKENS)} "
                "(train one with `rlhf-lightning tokenizer` or rlhf_lightning.tokenization.train_tokenizer)"
            )
        if ids[PAD] != 0:
            raise ValueError(f"{source}: {PAD} has id {ids[PAD]}; expected id 0")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"{source}: special tokens share ids {ids}; expected distinct ids")
        tokenizer.encode_special_tokens = True  # data text never turns into special tokens
        self.tokenizer = tokenizer
        self.source = source
        self._pad_id, self._bos_id, self._eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.role_ids: dict[str, int] = {role: ids[token] for role, token in ROLE_TOKENS.items()}

    # --------------------------------------------------------------------------------------------------- files
    @classmethod
    def from_file(cls, path: PathLike) -> ChatTokenizer:
        """Load a ``tokenizer.json``; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found (or not a regular file)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from err
        return cls(tokenizer, source=str(path))

    def save(self, path: PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temp file in the same folder, then rename); creates parent folders."""
        _atomic_write_text(Path(path), self.tokenizer.to_str())

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def pad_id(self) -> int:
        """Id of ``<|pad|>`` (always 0)."""
        return self._pad_id

    @property
    def bos_id(self) -> int:
        """Id of ``<|bos|>``."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of ``<|eos|>`` (ends every turn; never the pad id)."""
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding size a model needs)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: no special tokens are added or recognised."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, or anything iterable of ints such as a 1-D tensor's ``tolist()``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """Texts of several id sequences."""
        return self.tokenizer.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def _role_id(self, role: str) -> int:
        try:
            return self.role_ids[role]
        except KeyError:
            raise ValueError(f"unknown role {role!r}; expected one of {list(self.role_ids)}") from None

    def render(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """Render a conversation: ``<|bos|>`` then per message ``<|role|>`` content ``<|eos|>``.

        Returns ``(ids, assistant_mask)`` of equal length; the mask is True on each assistant turn's content tokens
        and its closing ``<|eos|>``, False on ``<|bos|>``, role tokens and system/user turns.
        """
        ids = [self.bos_id]
        mask = [False]
        for message in messages:
            role_id = self._role_id(message["role"])
            content = self.encode(message["content"])
            is_assistant = message["role"] == "assistant"
            ids.append(role_id)
            ids.extend(content)
            ids.append(self.eos_id)
            mask.append(False)
            mask.extend([is_assistant] * (len(content) + 1))
        return ids, mask

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Render prompt messages followed by the ``<|assistant|>`` header, ready for generation."""
        ids, _ = self.render(messages)
        ids.append(self.role_ids["assistant"])
        return ids

    def __repr__(self) -> str:
        return f"ChatTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a tokenizer is an ordinary, shareable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> ChatTokenizer:
    """Train a byte-level BPE tokenizer with the special tokens at ids 0..5.

    Args:
        texts: training texts (message contents).
        vocab_size: the target number of ids, special tokens and the 256 byte symbols included.
        min_frequency: a pair must occur this often to be merged.
    """
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is too small; expected at least {floor} (specials + 256 bytes)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}; expected >= 1")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("no training texts; expected at least one message content")
    return ChatTokenizer(tokenizer, source="<trained>")


def iter_texts_from_jsonl(paths: Iterable[PathLike]) -> Iterator[str]:
    """Yield every message content of every row, for any row shape the data layer reads.

    Rows are tried as conversations, preference pairs, then prompts; a shared prompt is yielded once. Rows no parser
    accepts are skipped (the data layer would not read them either); file-level problems (missing, empty, not UTF-8,
    not JSON) raise ``DataFormatError``.
    """
    from rlhf_lightning.data.formats import (
        DataFormatError,
        parse_conversation,
        parse_preference,
        parse_prompt,
        read_rows,
    )

    for path in paths:
        for line, row in read_rows(path):
            messages: list[Message] | None = None
            try:
                messages = parse_conversation(row, path=path, line=line).messages
            except DataFormatError:
                try:
                    pair = parse_preference(row, path=path, line=line)
                    messages = pair.prompt + pair.chosen + pair.rejected
                except DataFormatError:
                    try:
                        messages = parse_prompt(row, path=path, line=line).messages
                    except DataFormatError:
                        continue
            for message in messages:
                yield message["content"]


def load_or_train_tokenizer(
    path: PathLike, data_paths: Sequence[PathLike], vocab_size: int = 4096, min_frequency: int = 2
) -> ChatTokenizer:
    """Load ``path`` if it exists; otherwise train on ``data_paths`` and save to ``path`` (atomically).

    An existing file is reused as is, whatever ``vocab_size`` says (a trained tokenizer is part of a run's state).
    """
    path = Path(path)
    if path.exists():
        return ChatTokenizer.from_file(path)
    if not data_paths:
        raise ValueError(f"{path}: tokenizer not found and no data paths to train one on")
    tokenizer = train_tokenizer(
        iter_texts_from_jsonl(data_paths), vocab_size=vocab_size, min_frequency=min_frequency
    )
    tokenizer.save(path)
    tokenizer.source = str(path)
    return tokenizer


def train_tokenizer_cli(
    data_paths: Sequence[PathLike], output: PathLike, vocab_size: int = 4096, min_frequency: int = 2
) -> ChatTokenizer:
    """Body of ``rlhf-lightning tokenizer --data a.jsonl b.jsonl --output tok.json --vocab_size 4096``.

    Always trains (overwriting ``output`` atomically) and returns the tokenizer; the CLI prints the path and size.
    """
    if not data_paths:
        raise ValueError("no --data files given; expected one or more JSON Lines files")
    tokenizer = train_tokenizer(
        iter_texts_from_jsonl(data_paths), vocab_size=vocab_size, min_frequency=min_frequency
    )
    tokenizer.save(output)
    tokenizer.source = str(output)
    return tokenizer
