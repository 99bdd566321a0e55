"""Shared pytest fixtures: repository paths, the shared data folder and one small tokenizer per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach W&B's servers: runs that use the W&B logger write offline files (no network probe, no prompt).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The project's full offline data (``../shared/data``); tests that need it skip where it is absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE tokenizer (vocab 512) trained once on the shipped HH SFT data."""
    from rlhf_lightning.tokenization import load_or_train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    return load_or_train_tokenizer(path, [REPO_ROOT / "data" / "hh_rlhf" / "sft_train.jsonl"], vocab_size=512)
