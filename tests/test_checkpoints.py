"""Checkpoint lookup (best over last), atomic writes, payload loading errors, tokenizer reconciliation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlhf_lightning.stages.checkpoints import (
    PAYLOAD_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    SetupError,
    load_checkpoint,
    resolve_checkpoint,
)
from rlhf_lightning.stages.tokenizer_link import reconcile_tokenizers


def _write(path: Path, best: str | None = None, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    callbacks = (
        {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_path": best}} if best is not None else {}
    )
    torch.save({"callbacks": callbacks, "state_dict": {}, **extra}, path)
    return path


def _age(path: Path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_resolve_picks_the_recorded_best_over_last(tmp_path: Path) -> None:
    best = _write(tmp_path / "ckpts" / "best-1-20.ckpt")
    _write(tmp_path / "ckpts" / "last.ckpt", best=str(best))
    assert resolve_checkpoint(tmp_path / "ckpts") == best
    assert resolve_checkpoint(tmp_path) == best  # a run folder above the checkpoint folder works too


def test_resolve_falls_back_to_last_without_a_recorded_best(tmp_path: Path) -> None:
    _write(tmp_path / "other-0-5.ckpt")
    last = _write(tmp_path / "last.ckpt")
    assert resolve_checkpoint(tmp_path) == last


def test_resolve_falls_back_to_last_when_the_best_file_is_gone(tmp_path: Path) -> None:
    last = _write(tmp_path / "last.ckpt", best=str(tmp_path / "best-0-3.ckpt"))
    assert resolve_checkpoint(tmp_path) == last


def test_resolve_finds_a_moved_best_next_to_last(tmp_path: Path) -> None:
    moved = _write(tmp_path / "new" / "best-0-3.ckpt")
    _write(tmp_path / "new" / "last.ckpt", best="/somewhere/else/best-0-3.ckpt")
    assert resolve_checkpoint(tmp_path / "new") == moved


def test_resolve_without_last_takes_the_newest(tmp_path: Path) -> None:
    old = _write(tmp_path / "a.ckpt")
    _age(old, 100)
    new = _write(tmp_path / "b.ckpt")
    assert resolve_checkpoint(tmp_path) == new
    assert resolve_checkpoint(old) == old  # a file is itself


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"no \*\.ckpt"):
        resolve_checkpoint(tmp_path)


def test_load_checkpoint_rejects_foreign_and_broken_files(tmp_path: Path) -> None:
    foreign = _write(tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not an rlhf-lightning stage checkpoint"):
        load_checkpoint(foreign)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(broken)
    ours = _write(tmp_path / "ours.ckpt", **{PAYLOAD_KEY: {"stage": "sft"}})
    assert load_checkpoint(ours)[PAYLOAD_KEY] == {"stage": "sft"}


class _Boom:
    """Pickling this raises, after the tensors before it have been written."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_save_that_fails_midway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(100_000), "boom": _Boom()}, target)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_atomic_save_replaces_and_is_readable(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "x.ckpt"
    io.save_checkpoint({"step": 1}, target)
    io.save_checkpoint({"step": 2}, target)
    assert io.load_checkpoint(target)["step"] == 2
    assert target.stat().st_mode & 0o777 == 0o644


def test_reconcile_tokenizers(tiny_tokenizer) -> None:
    from rlhf_lightning.tokenization import train_tokenizer

    assert reconcile_tokenizers(None, tiny_tokenizer, "ckpt") is tiny_tokenizer
    assert reconcile_tokenizers(tiny_tokenizer, tiny_tokenizer, "ckpt") is tiny_tokenizer
    other = train_tokenizer(["a different corpus entirely"] * 3, vocab_size=300)
    with pytest.raises(SetupError, match="differs from the one stored"):
        reconcile_tokenizers(other, tiny_tokenizer, "ckpt")
    with pytest.raises(ValueError, match="no tokenizer"):  # SetupError is a ValueError
        reconcile_tokenizers(None, None, "ckpt")
