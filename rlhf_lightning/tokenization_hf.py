"""A Hugging Face tokenizer and its chat template behind the project's tokenizer protocol.

:class:`HFChatTokenizer` wraps ``AutoTokenizer.from_pretrained(folder, local_files_only=True)`` and offers what
``tokenization.ChatTokenizer`` offers: ``pad_id``, ``bos_id``, ``eos_id``, ``vocab_size``, ``encode``, ``decode``,
``render(messages) -> (ids, assistant_mask)``, ``render_prompt(messages) -> ids``, ``source``.

Choices:

* Rendering is the folder's own chat template (``apply_chat_template``) tokenized with ``add_special_tokens=False``
  (the template writes BOS and role markers itself). A folder without a template gets :data:`DEFAULT_CHAT_TEMPLATE`
  (plain-text role headers, each turn closed by EOS), stored on the tokenizer so export writes it out.
* The assistant mask is exact for any prefix-stable template: for each assistant turn ``k`` the character span runs
  from the end of ``template(messages[:k], add_generation_prompt=True)`` to the end of ``template(messages[:k+1])``;
  a token is in the mask when its character offsets overlap a span. So the mask covers the reply and whatever the
  template writes to close the turn (EOS, ``<|im_end|>\\n``, ...), never the role header. A template whose rendering of
  a prefix is not a prefix of the whole conversation (e.g. one that rewrites earlier turns) raises ``ValueError``.
* ``render`` ends at the last EOS (the final turn's): text a template writes after it (ChatML's ``"\\n"``) is
  dropped. One rule for every path: a reward model is trained, scored (``rlhf-lightning score``) and used by PPO (whose
  rollouts stop at EOS) reading its score at the reply's EOS, and SFT trains on what generation produces.
* Pad: the tokenizer's own pad token when it is not EOS; else its UNK token when that is not EOS; else a new
  ``<|pad|>`` special token is added (``vocab_size`` grows by one and ``models.hf`` grows the embeddings to match; the
  new row is never trained because padding is masked everywhere). Pad is never EOS: masks are built from lengths,
  but generation writes pad after EOS and must not confuse the two.
* ``bos_id`` is the BOS token, or the pad id when the tokenizer has none (then nothing uses it).
* ``eos_id`` is the tokenizer's EOS: rollouts stop on it, so a template must close assistant turns with EOS (true of
  the default template; for chat models whose turns end with another token, set that token as the tokenizer's EOS).
* Text in user data that spells a special token (``<|im_end|>``) is parsed as that token by the HF tokenizer, unlike
  the built-in tokenizer which encodes it as plain bytes.
* Checkpoints carry the tokenizer as the text of the files ``save_pretrained`` writes (:meth:`files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_lightning.types import Message

__all__ = ["DEFAULT_CHAT_TEMPLATE", "HFChatTokenizer", "is_hf_tokenizer_folder"]

log = logging.getLogger(__name__)

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PAD_TOKEN = "<|pad|>"


def is_hf_tokenizer_folder(path: str | Path | None) -> bool:
    """True when ``path`` is a folder with Hugging Face tokenizer files."""
    if path is None or not Path(path).is_dir():
        return False
    return any((Path(path) / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))


def _end_at_last_eos(ids: Sequence[int], eos_id: int) -> int:
    """Length of ``ids`` up to and including its last ``eos_id`` (all of ``ids`` when there is none)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos_id:
            return i + 1
    return len(ids)


class HFChatTokenizer:
    """A ``PreTrainedTokenizer(Fast)`` with the project's tokenizer protocol (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str = "<in memory>") -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{source}: the tokenizer has no EOS token; expected one (it ends every reply)")
        if not getattr(tokenizer, "chat_template", None):
            log.warning("%s: no chat template; using the default plain-text template", source)
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        eos = tokenizer.eos_token_id
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
                tokenizer.pad_token = tokenizer.unk_token
            else:
                tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> HFChatTokenizer:
        """Load the tokenizer files of a local folder (never from the network)."""
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
        return cls(tokenizer, source=str(path))

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.pad_id if bos is None else int(bos)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding rows a model needs)."""
        return len(self.tokenizer)

    # ------------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def _template(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not msgs and not add_generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """Token ids of the templated conversation and the assistant mask (reply tokens + the turn's closing tokens).

        The ids end at the last EOS: what the template writes after it (ChatML's ``"\\n"``) is dropped, so a
        conversation renders exactly as a rollout of it ends (generation stops at EOS) and a reward model reads its
        score at the reply's EOS in training, in ``rlhf-lightning score`` and in PPO alike.
        """
        text = self._template(messages, False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._template(messages[:k], True) if k else ""
            whole = self._template(messages[: k + 1], False)
            if not (text.startswith(whole) and whole.startswith(head)):
                raise ValueError(
                    f"{self.source}: the chat template is not prefix-stable (rendering the first {k + 1} messages "
                    "is not a prefix of the whole conversation); the assistant mask cannot be computed"
                )
            spans.append((len(head), len(whole)))
        mask = [any(s < end and e > start for start, end in spans) for s, e in offsets]
        end = _end_at_last_eos(ids, self.eos_id)
        return ids[:end], mask[:end]

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt messages followed by the template's generation prompt (assistant header)."""
        return self.encode_rendered(self._template(messages, True))

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of template output (special tokens in it are parsed, none added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> None:
        """``save_pretrained`` into ``folder`` (tokenizer files and chat template)."""
        self.tokenizer.save_pretrained(str(folder))

    def files(self) -> dict[str, str]:
        """Text of every file ``save_pretrained`` writes, for embedding in a checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}

    @classmethod
    def from_files(cls, files: dict[str, str], source: str = "checkpoint") -> HFChatTokenizer:
        """Rebuild from :meth:`files` output."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        return cls(tokenizer, source=source)

    def identity(self) -> str:
        """A fingerprint of the vocabulary, special tokens and chat template (equal tokenizers, equal strings)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str()
            if backend is not None
            else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        )
        parts: dict[str, Any] = {
            "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
            "template": self.tokenizer.chat_template,
            "special": [self.pad_id, self.bos_id, self.eos_id],
        }
        return json.dumps(parts, sort_keys=True)

    def __repr__(self) -> str:
        return f"HFChatTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"
