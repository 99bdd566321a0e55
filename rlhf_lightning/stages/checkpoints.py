"""Self-describing stage checkpoints: find them, read them, rebuild their models.

Every stage writes, next to Lightning's usual contents, a payload under :data:`PAYLOAD_KEY` with the stage name, the
backbone's architecture (``model_spec``), the tokenizer (its whole ``tokenizer.json`` text) and stage extras such as
the reward model's score statistics. A later stage, ``generate`` or ``export`` can therefore rebuild a model from a
checkpoint alone, without the config or tokenizer file that produced it.

``resolve_checkpoint`` turns a stage's output folder into the checkpoint its ``ModelCheckpoint`` chose: the best one by
the stage's monitor when the callback recorded it, else ``last.ckpt``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

PAYLOAD_KEY = "rlhf_lightning"


class CheckpointError(RuntimeError):
    """A checkpoint path that is missing, unreadable, or not from this suite (or a run that would overwrite one)."""


class SetupError(ValueError):
    """A stage's inputs that do not fit together: a tokenizer that differs from the checkpoint's, data longer than
    the model accepts. Raised before training starts."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (a file or a stage folder), on CPU, with a clear error when it is unusable."""
    file = resolve_checkpoint(path)
    try:
        # A user's own checkpoint: Lightning stores hyper-parameters (optimizer classes, ...) that need full pickling.
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{file}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    if PAYLOAD_KEY not in checkpoint:
        raise CheckpointError(f"{file}: not an rlhf-lightning stage checkpoint (no '{PAYLOAD_KEY}' entry)")
    return checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file for ``path``: the file itself, or for a folder the best checkpoint its ``ModelCheckpoint``
    recorded (read from ``last.ckpt``), falling back to ``last.ckpt`` and then to the newest ``*.ckpt`` below it."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    candidates = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"{path}: folder holds no *.ckpt file")
    lasts = [p for p in candidates if p.name == "last.ckpt"]
    if lasts:
        last = lasts[-1]
        best = best_model_path(last)
        if best is not None:
            best_path = Path(best)
            if not best_path.is_file():  # the run folder was moved or the path was relative to another cwd
                best_path = last.parent / best_path.name
            if best_path.is_file():
                return best_path
        return last
    return candidates[-1]


def best_model_path(checkpoint_file: Path) -> str | None:
    """The ``best_model_path`` a ``ModelCheckpoint`` stored in ``checkpoint_file``, if any."""
    try:  # mmap: only the callback states are read, not the weights
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        try:  # files written with the legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        except Exception:
            return None
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("ModelCheckpoint") and state.get("best_model_path"):
            return str(state["best_model_path"])
    return None


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (e.g. ``"model."``), with the prefix removed."""
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"checkpoint has no weights under '{prefix}'")
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder and renames it into place.

    A run killed (or failing) while saving therefore leaves the previous file intact instead of a truncated one; the
    temporary file is removed on failure. Remote paths (``s3://...``) go through Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_backbone(path: str | Path, prefix: str | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the backbone stored in a stage checkpoint: ``(backbone, tokenizer or None, checkpoint)``.

    ``prefix`` picks which network's weights to read (default: the payload's ``backbone_prefix``, the stage's main
    model: the SFT model, the reward model's trunk, or the PPO policy).
    """
    from rlhf_lightning.models.factory import model_from_spec
    from rlhf_lightning.stages.tokenizer_link import tokenizer_from_payload

    checkpoint = load_checkpoint(path)
    payload = checkpoint[PAYLOAD_KEY]
    backbone = model_from_spec(payload["model_spec"])
    backbone.load_state_dict(submodule_state(checkpoint["state_dict"], prefix or payload["backbone_prefix"]))
    return backbone, tokenizer_from_payload(payload), checkpoint


def load_policy(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """The language model and tokenizer stored in a stage checkpoint (SFT or PPO), in eval mode on CPU."""
    model, tokenizer, _ = load_backbone(path)
    if tokenizer is None:
        raise CheckpointError(f"{resolve_checkpoint(path)}: checkpoint carries no tokenizer")
    return model.eval(), tokenizer
