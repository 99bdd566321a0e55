"""A quiet CPU ``Trainer`` for the stage tests: no logger, progress bar, model summary or checkpoint callback.

Imported as ``from trainers import quiet_trainer`` (tests/ is on sys.path under pytest).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    """A one-device CPU Trainer writing under ``root``; ``kwargs`` override any default."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    return L.Trainer(**{**defaults, **kwargs})
