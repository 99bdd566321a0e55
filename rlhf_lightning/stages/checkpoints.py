"""Self-describing stage checkpoints: find them, read them, rebuild their models.

Every stage writes, next to Lightning's usual contents, a payload under :data:`PAYLOAD_KEY` with the stage name, the
backbone's architecture (``model_spec``), the tokenizer (its whole ``tokenizer.json`` text) and stage extras such as
the reward model's score statistics. A later stage, ``generate`` or ``export`` can therefore rebuild a model from a
checkpoint alone, without the config or tokenizer file that produced it.

``resolve_checkpoint`` turns a stage's output folder into the checkpoint its ``ModelCheckpoint`` chose: the best one by
the stage's monitor when the callback recorded it, else ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
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


def read_checkpoint_file(
    file: str | Path, *, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The object stored in checkpoint ``file``, read with ``torch.load(weights_only=True)``: the one loader for every
    file the suite reads (stage checkpoints, ``--ckpt_path`` resumes, ``last.ckpt`` lookups).

    Only tensors, plain containers and the suite's allow-listed config dataclasses (``add_safe_globals`` next to
    each) unpickle, so a crafted file cannot run code. A refused, missing or unreadable file raises
    :class:`CheckpointError` naming it in one line. ``mmap`` maps the tensors instead of reading them.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only refused a global or opcode
        found = re.search(r"GLOBAL [\w.]+|Unsupported operand \w+", str(err))
        what = found.group(0) if found else "an unsupported pickle instruction"
        raise CheckpointError(
            f"{file}: cannot read checkpoint: refused by torch.load(weights_only=True), which reads only tensors "
            f"and plain data so that a file cannot run code ({what})"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such checkpoint file") from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{file}: cannot read checkpoint ({type(err).__name__}: {first_line})"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (a file or a stage folder), on CPU, with a clear error when it is unusable."""
    file = resolve_checkpoint(path)
    checkpoint = read_checkpoint_file(file)
    if not isinstance(checkpoint, dict) or PAYLOAD_KEY not in checkpoint:
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
        checkpoint = read_checkpoint_file(checkpoint_file, mmap=True)
    except CheckpointError:
        try:  # files written with the legacy (non-zip) format cannot be memory-mapped
            checkpoint = read_checkpoint_file(checkpoint_file)
        except (
            CheckpointError
        ):  # unusable: resolve_checkpoint falls back to this file and loading it reports why
            return None
    if not isinstance(checkpoint, dict):
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
    """Writes each checkpoint to a temporary file in the same folder and renames it into place; reads them safely.

    A run killed (or failing) while saving therefore leaves the previous file intact instead of a truncated one; the
    temporary file is removed on failure, and a failed write (full disk, lost permission: any ``OSError``) raises a
    one-line :class:`CheckpointError` saying which file was kept. Loading (``--ckpt_path``) goes through
    :func:`read_checkpoint_file` (``weights_only=True``). Remote paths (``s3://...``) go through Lightning's own
    writer and reader, the latter also with ``weights_only=True``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        kept = target.is_file()
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
            os.replace(tmp, target)
        except BaseException as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink(missing_ok=True)
            if not isinstance(err, OSError):
                raise
            outcome = (
                f"the previous {target.name} is kept unchanged" if kept else "no checkpoint file was written"
            )
            raise CheckpointError(
                f"{target}: cannot write checkpoint ({err.strerror or type(err).__name__}); {outcome}"
            ) from None

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` read with ``weights_only=True`` whatever the caller asks (see the class)."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # Lightning's default keeps each tensor on the device it was saved from; the strategy moves it afterwards
        return read_checkpoint_file(path, map_location=map_location or (lambda storage, loc: storage))


def check_writable(folder: str | Path) -> None:
    """Check that checkpoints can be written to ``folder`` before training, so an unwritable folder is reported now
    instead of at the first save; raises a one-line :class:`CheckpointError` naming it.

    Creates (and removes) a probe folder in ``folder``, or in its nearest existing parent when it does not exist yet:
    nothing is left behind and no folder is created.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        os.rmdir(tempfile.mkdtemp(prefix=".write-check.", dir=existing))
    except OSError as err:
        raise CheckpointError(
            f"checkpoint folder {folder} is not writable ({err.strerror or type(err).__name__}: "
            f"{err.filename or existing}); nothing was trained. Choose another folder (ModelCheckpoint dirpath / "
            "logger save_dir) or fix its permissions."
        ) from None


def load_backbone(
    path: str | Path, prefix: str | None = None, *, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the backbone stored in a stage checkpoint: ``(backbone, tokenizer or None, checkpoint)``.

    ``prefix`` picks which network's weights to read (default: the payload's ``backbone_prefix``, the stage's main
    model: the SFT model, the reward model's trunk, or the PPO policy). ``trust_remote_code`` is the user's flag for
    a Hugging Face backbone with its own modelling code; the checkpoint's recorded value is ignored.
    """
    from rlhf_lightning.models.factory import model_from_spec
    from rlhf_lightning.stages.tokenizer_link import tokenizer_from_payload

    checkpoint = load_checkpoint(path)
    payload = checkpoint[PAYLOAD_KEY]
    backbone = model_from_spec(payload["model_spec"], trust_remote_code=trust_remote_code)
    backbone.load_state_dict(submodule_state(checkpoint["state_dict"], prefix or payload["backbone_prefix"]))
    return backbone, tokenizer_from_payload(payload), checkpoint


def load_policy(path: str | Path, *, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """The language model and tokenizer stored in a stage checkpoint (SFT or PPO), in eval mode on CPU."""
    model, tokenizer, _ = load_backbone(path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise CheckpointError(f"{resolve_checkpoint(path)}: checkpoint carries no tokenizer")
    return model.eval(), tokenizer
