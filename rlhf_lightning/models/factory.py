"""Build a backbone from typed arguments (the ``model:`` block of every stage config).

The built-in GPT (``models/gpt.py``) is the default. ``ModelArgs`` fields left at ``None`` keep the preset's value, so
``preset: tiny`` plus ``dropout: 0.0`` is a complete spec. The resolved architecture is stored in every checkpoint so a
later stage rebuilds the same network without the config that made it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rlhf_lightning.models.gpt import GPT, PRESETS, GPTConfig, create_model


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of the built-in decoder-only model.

    Args:
        preset: a named size: ``tiny`` (tests), ``small`` (CPU in minutes), ``medium``, ``large`` (GPUs).
        n_layer: transformer blocks (None: the preset's).
        n_head: attention heads (None: the preset's).
        n_embd: hidden size (None: the preset's).
        max_seq_len: longest sequence the model accepts (None: the preset's).
        dropout: dropout probability during SFT / reward training (None: the preset's). PPO turns it off.
        tie_embeddings: share input embedding and output projection (None: the preset's).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    preset: str = "small"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    max_seq_len: int | None = None
    dropout: float | None = None
    tie_embeddings: bool | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; expected one of {sorted(PRESETS)}")

    def overrides(self) -> dict[str, Any]:
        keys = ("n_layer", "n_head", "n_embd", "max_seq_len", "dropout", "tie_embeddings")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([ModelArgs])


def build_model(args: ModelArgs, vocab_size: int) -> GPT:
    """A freshly initialised built-in model for ``vocab_size`` tokens."""
    model = create_model(args.preset, vocab_size=vocab_size, **args.overrides())
    model.gradient_checkpointing = args.gradient_checkpointing
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """A plain-dict description of ``model`` that :func:`model_from_spec` turns back into the same network."""
    if isinstance(model, GPT):
        return {"kind": "builtin", "config": asdict(model.config)}
    raise TypeError(f"cannot describe a backbone of type {type(model).__name__}")


def model_from_spec(spec: dict[str, Any]) -> GPT:
    """Rebuild (random-initialised) the network described by :func:`model_spec`."""
    if spec.get("kind") != "builtin":
        raise ValueError(f"unknown backbone kind {spec.get('kind')!r} in checkpoint")
    return GPT(GPTConfig(**spec["config"]))
