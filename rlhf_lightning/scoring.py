"""``rlhf-lightning score``: score a JSONL of conversations with a reward-model checkpoint.

Every input row is read with :func:`rlhf_lightning.data.formats.parse_conversation` (``{"messages": [...]}`` or
prompt/response rows), so a bad row stops the command before any scoring with an error naming file, line and field.
Each conversation is rendered with the checkpoint's own tokenizer and scored at its last real token (the closing
``<|eos|>`` of the final turn). The output repeats each input row, in input order, with two fields added:

* ``score``: the raw reward-model score;
* ``score_normalized``: ``(score - score_mean) / score_std`` with the statistics stored in the checkpoint (measured on
  the validation replies of the reward run), the scale PPO sees.

Choices: conversations are batched longest first (least padding) and written back in file order; one longer than
the model accepts (``--max_length``, default the model's ``max_seq_len``) keeps its final turns (turn-aware left
truncation, as in the data layer) and is counted in a warning. The output file is written to a temporary name and
renamed, so a failed run never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.data.collate import collate_scoring
from rlhf_lightning.data.formats import DataFormatError, load_rows, parse_conversation
from rlhf_lightning.data.sft import render_conversations
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.stages.reward import load_reward_model
from rlhf_lightning.tokenization import ChatTokenizer
from rlhf_lightning.types import Message

__all__ = ["ScoredRows", "main", "read_conversations", "score_conversations", "score_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredRows:
    """What :func:`score_file` wrote: the number of rows and how many were left-truncated."""

    rows: int
    truncated: int


def read_conversations(path: str | Path) -> list[tuple[dict[str, Any], list[Message]]]:
    """``(row, messages)`` for every row of ``path`` (any source ``read_rows`` reads); errors name file, line or row, field."""
    return load_rows(path, lambda row, **where: (row, parse_conversation(row, **where).messages)).rows


@torch.no_grad()
def score_conversations(
    model: RewardModel,
    tokenizer: ChatTokenizer,
    conversations: Sequence[list[Message]],
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Raw scores (N,) float32 of ``conversations`` in their given order, and the number left-truncated.

    ``max_length`` defaults to the backbone's ``config.max_seq_len`` when it has one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if max_length is None:
        max_length = getattr(getattr(model.backbone, "config", None), "max_seq_len", None)
    device = next(model.parameters()).device
    encoded, truncated = render_conversations(tokenizer, conversations, max_length, what="score")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: least padding
    scores = torch.zeros(len(encoded), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate_scoring([encoded[i] for i in index], tokenizer.pad_id, index)
        raw = model(batch.input_ids.to(device), batch.attention_mask.to(device))  # (b,)
        scores[batch.index] = raw.float().cpu()
    return scores, truncated


def _atomic_write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; scores are an ordinary, shareable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def score_file(
    ckpt: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> ScoredRows:
    """Score every conversation of ``input_path`` with the reward model in ``ckpt`` (file or stage folder).

    Writes ``output_path`` (JSONL, input order): each input row plus ``score`` and ``score_normalized``. The input is
    fully validated before the checkpoint is loaded.
    """
    rows = read_conversations(input_path)
    model, tokenizer = load_reward_model(str(ckpt), trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError(
            f"{ckpt}: the reward checkpoint carries no tokenizer; expected one embedded by training"
        )
    model = model.to(device)
    raw, truncated = score_conversations(model, tokenizer, [m for _, m in rows], batch_size, max_length)
    normalized = model.normalize(raw.to(model.score_mean.device)).cpu()
    out = [
        {**row, "score": float(s), "score_normalized": float(z)}
        for (row, _), s, z in zip(rows, raw.tolist(), normalized.tolist())
    ]
    _atomic_write_jsonl(Path(output_path), out)
    if truncated:
        log.warning(
            "%s: %d of %d conversation(s) were left-truncated to fit", input_path, truncated, len(rows)
        )
    return ScoredRows(rows=len(out), truncated=truncated)


def main(args: Sequence[str]) -> None:
    """``rlhf-lightning score --ckpt <reward ckpt or folder> --input convs.jsonl --output scored.jsonl``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="rlhf-lightning score",
        description="Score conversations with a reward-model checkpoint; adds 'score' and 'score_normalized'.",
    )
    parser.add_argument(
        "--ckpt", type=str, required=True, help="reward checkpoint file, or the reward stage folder"
    )
    parser.add_argument(
        "--input", type=str, required=True, help="JSONL of conversations (messages or prompt/response)"
    )
    parser.add_argument("--output", type=str, required=True, help="where to write the scored JSONL")
    parser.add_argument("--batch_size", type=int, default=16, help="conversations per forward pass")
    parser.add_argument(
        "--max_length",
        type=int | None,
        default=None,
        help="longest sequence in tokens (default: model's limit)",
    )
    parser.add_argument("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--trust_remote_code",
        type=bool,
        default=False,
        help="allow a Hugging Face backbone's own modelling code (only for folders you trust)",
    )
    cfg = parser.parse_args(list(args))
    try:
        result = score_file(
            cfg.ckpt,
            cfg.input,
            cfg.output,
            cfg.batch_size,
            cfg.max_length,
            cfg.device,
            trust_remote_code=cfg.trust_remote_code,
        )
    except DataFormatError as err:
        raise SystemExit(f"error: {err}") from err
    note = f", {result.truncated} left-truncated" if result.truncated else ""
    print(f"wrote {cfg.output} ({result.rows} scored rows{note})")
