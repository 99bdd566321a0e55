"""Where a stage gets its tokenizer, and how a checkpoint carries it.

A stage never imports a DataModule: it meets one in the Trainer and takes ``trainer.datamodule.tokenizer`` when the
DataModule offers one (duck typing, so users' own DataModules work too), else the stage's own ``tokenizer_path``.
Checkpoints embed the tokenizer's ``tokenizer.json`` text so a checkpoint alone is enough to sample or continue.
A Hugging Face tokenizer (``rlhf_lightning.tokenization_hf``, imported only when one is met) travels as the text of
its ``save_pretrained`` files under ``hf_tokenizer_files``. ``tokenizer_path`` may name such a folder too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rlhf_lightning.stages.checkpoints import SetupError
from rlhf_lightning.tokenization import ChatTokenizer


def resolve_tokenizer(module: Any, tokenizer_path: str | None) -> ChatTokenizer | None:
    """The tokenizer of the DataModule attached to ``module``'s Trainer, else the one at ``tokenizer_path``."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None:
        getter = getattr(datamodule, "prepare_tokenizer", None)
        tok = getattr(datamodule, "tokenizer", None)
        if tok is None and callable(getter):
            tok = getter()
        if tok is not None:
            return tok
    if tokenizer_path is not None:
        if Path(tokenizer_path).is_dir():
            from rlhf_lightning.tokenization_hf import HFChatTokenizer

            return HFChatTokenizer.from_pretrained(tokenizer_path)
        return ChatTokenizer.from_file(tokenizer_path)
    return None


def tokenizer_identity(tokenizer: Any) -> str:
    """A string equal for two tokenizers exactly when they tokenize and render alike."""
    identity = getattr(tokenizer, "identity", None)
    if callable(identity):
        return identity()
    return tokenizer.tokenizer.to_str()


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` are interchangeable (same vocabulary, specials and chat template)."""
    return type(a) is type(b) and tokenizer_identity(a) == tokenizer_identity(b)


def tokenizer_payload(tokenizer: ChatTokenizer | None) -> dict[str, Any]:
    """Checkpoint entries that carry ``tokenizer``."""
    if tokenizer is None:
        return {}
    files = getattr(tokenizer, "files", None)
    if callable(files):  # tokenization_hf.HFChatTokenizer
        return {"hf_tokenizer_files": files()}
    return {"tokenizer_json": tokenizer.tokenizer.to_str()}


def tokenizer_from_payload(payload: dict[str, Any]) -> ChatTokenizer | None:
    """The tokenizer a checkpoint payload carries, if any."""
    files = payload.get("hf_tokenizer_files")
    if files is not None:
        from rlhf_lightning.tokenization_hf import HFChatTokenizer

        return HFChatTokenizer.from_files(files)
    text = payload.get("tokenizer_json")
    return None if text is None else ChatTokenizer(Tokenizer.from_str(text), source="checkpoint")


def reconcile_tokenizers(
    provided: ChatTokenizer | None, stored: ChatTokenizer | None, checkpoint: str
) -> ChatTokenizer:
    """The tokenizer a stage starting from ``checkpoint`` must use.

    The checkpoint's embeddings only make sense with the tokenizer it was trained with, so a DataModule tokenizer that
    differs from the stored one is an error (:class:`SetupError`, a ``ValueError``), not something to paper over.
    """
    if provided is None and stored is None:
        raise SetupError(
            f"{checkpoint}: no tokenizer: the checkpoint carries none and the DataModule offers none"
        )
    if provided is None:
        return stored
    if stored is not None and not same_tokenizer(provided, stored):
        raise SetupError(
            f"the DataModule's tokenizer ({provided.source}) differs from the one stored in {checkpoint}; "
            "expected the same tokenizer: point the data's tokenizer_path at the file the earlier stage used"
        )
    return provided
