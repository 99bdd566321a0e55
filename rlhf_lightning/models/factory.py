"""Build a backbone from typed arguments (the ``model:`` block of every stage config).

The built-in GPT (``models/gpt.py``) is the default. ``ModelArgs`` fields left at ``None`` keep the preset's value, so
``preset: tiny`` plus ``dropout: 0.0`` is a complete spec. The resolved architecture is stored in every checkpoint so a
later stage rebuilds the same network without the config that made it.

``hf_path`` switches to a local Hugging Face model folder (``models/hf.py``, imported lazily so that this module and
the built-in model never import ``transformers``); ``lora`` adds a peft LoRA adapter to it. Specs have a ``kind``:
``builtin`` (the GPT config) or ``hf`` (the folder, the resolved HF config dict and the LoRA settings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rlhf_lightning.models.gpt import GPT, PRESETS, GPTConfig, create_model


class UntrustedCodeError(ValueError):
    """A stored backbone that needs its folder's own modelling code (``trust_remote_code``), which only the user's
    own flag may allow: a checkpoint's recorded value never does."""


@dataclass(frozen=True)
class LoRAArgs:
    """A LoRA adapter (peft) on a Hugging Face backbone: only the adapter weights train.

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter's input.
        target_modules: module names to adapt (e.g. ``[q_proj, v_proj]``); None = peft's default for the
            architecture.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an int >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


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
        hf_path: a local Hugging Face model folder (config.json + weights) to use instead of the built-in model;
            the size fields above are then ignored. Nothing is downloaded.
        trust_remote_code: allow the folder's own modelling code (only for folders you trust).
        lora: train a LoRA adapter instead of every weight (Hugging Face backbones only).
    """

    preset: str = "small"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    max_seq_len: int | None = None
    dropout: float | None = None
    tie_embeddings: bool | None = None
    gradient_checkpointing: bool = False
    hf_path: str | None = None
    trust_remote_code: bool = False
    lora: LoRAArgs | None = None

    def __post_init__(self) -> None:
        if self.lora is not None and self.hf_path is None:
            raise ValueError("model.lora needs model.hf_path (LoRA is for Hugging Face backbones)")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; expected one of {sorted(PRESETS)}")

    def overrides(self) -> dict[str, Any]:
        keys = ("n_layer", "n_head", "n_embd", "max_seq_len", "dropout", "tie_embeddings")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([ModelArgs, LoRAArgs])


def build_model(args: ModelArgs, vocab_size: int) -> nn.Module:
    """A freshly initialised built-in model for ``vocab_size`` tokens, or the ``hf_path`` folder's pretrained weights
    (embeddings grown to ``vocab_size`` when the tokenizer has more ids, e.g. an added pad token)."""
    if args.hf_path is not None:
        from rlhf_lightning.models.hf import HFCausalLM

        model = HFCausalLM.from_pretrained(
            args.hf_path, trust_remote_code=args.trust_remote_code, lora=args.lora, vocab_size=vocab_size
        )
        model.gradient_checkpointing = args.gradient_checkpointing
        return model
    model = create_model(args.preset, vocab_size=vocab_size, **args.overrides())
    model.gradient_checkpointing = args.gradient_checkpointing
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """A plain-dict description of ``model`` that :func:`model_from_spec` turns back into the same network."""
    if isinstance(model, GPT):
        return {"kind": "builtin", "config": asdict(model.config)}
    if callable(getattr(model, "spec", None)):  # models.hf.HFCausalLM
        return model.spec()
    raise TypeError(f"cannot describe a backbone of type {type(model).__name__}")


def model_from_spec(spec: dict[str, Any], *, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild (random-initialised) the network described by :func:`model_spec`.

    ``trust_remote_code`` is the caller's (the user's) own flag: a ``trust_remote_code`` recorded in the spec, which
    comes from a checkpoint file, never turns on a folder's own modelling code.
    """
    if spec.get("kind") == "hf":
        from rlhf_lightning.models.hf import HFCausalLM

        return HFCausalLM.from_spec(spec, trust_remote_code=trust_remote_code)
    if spec.get("kind") != "builtin":
        raise ValueError(f"unknown backbone kind {spec.get('kind')!r} in checkpoint")
    return GPT(GPTConfig(**spec["config"]))
