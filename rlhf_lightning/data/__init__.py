"""Data layer: row parsing (``formats``), collation (``collate``), samplers (``sampling``) and the three DataModules.

Importing this package is cheap: the DataModules (which import Lightning) load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_lightning.data.preference import PreferenceDataModule, create_preference_dataloader
    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.data.sft import SFTDataModule

_LAZY = {
    "SFTDataModule": "rlhf_lightning.data.sft",
    "PreferenceDataModule": "rlhf_lightning.data.preference",
    "create_preference_dataloader": "rlhf_lightning.data.preference",
    "PromptDataModule": "rlhf_lightning.data.prompts",
}

__all__ = ["PreferenceDataModule", "PromptDataModule", "SFTDataModule", "create_preference_dataloader"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
