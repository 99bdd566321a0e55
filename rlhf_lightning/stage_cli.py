"""The suite's ``LightningCLI``: shared by ``rlhf-lightning fit|validate|test|predict`` and the pipeline.

Defaults it adds to a plain LightningCLI: precision chosen per device when the config leaves it unset (bf16-mixed on
CUDA GPUs that support it, 32-true elsewhere), atomic checkpoint writes and ``weights_only`` reads (``--ckpt_path``
included), guards before training (a fresh run may not start in a checkpoint folder that already holds
checkpoints, and every checkpoint folder must be writable: :class:`WritableCheckpointFolders`),
``trainer.use_distributed_sampler: false`` (the DataModules' batch samplers shard by rank themselves, so the shipped
configs run on several devices as they are), and the run guards
of ``rlhf_lightning.guards`` (stop on a non-finite loss or gradient; save and exit 143/130 on SIGTERM/SIGINT) in
every Trainer's callbacks.

Start-up noise is kept off the console (:func:`quiet_startup`): Lightning's "GPU available / TPU available" lines, its
litlogger tip and "Loading `train_dataloader` to estimate ..." note, and torch's ``LeafSpec`` deprecation warning from
Lightning's ``_pytree``; the progress bar no longer shows the logger's version (a W&B run id) as ``v_num``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from rlhf_lightning.guards import default_callbacks
from rlhf_lightning.stages.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    check_writable,
    read_checkpoint_file,
)


def choose_precision(
    accelerator: object, *, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> str:
    """The Trainer precision used when a config leaves ``trainer.precision`` unset.

    ``bf16-mixed`` when the run will use a CUDA GPU that supports bf16, ``32-true`` elsewhere (CPU, MPS, older GPUs).

    Args:
        accelerator: the config's ``trainer.accelerator`` (``None``, ``"auto"``, ``"gpu"``, ``"cuda"``, ``"cpu"``, ...).
        cuda_available: whether CUDA is usable (None: ask torch).
        bf16_supported: whether the GPU supports bf16 (None: ask torch; only asked when CUDA is usable).
    """
    wants_cuda = accelerator is None or (
        isinstance(accelerator, str) and accelerator in ("auto", "gpu", "cuda")
    )
    if not wants_cuda:
        return "32-true"
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "32-true"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16-mixed" if bf16_supported else "32-true"


def checkpoint_dir(callback: object, trainer: object) -> Path | None:
    """The folder a ``ModelCheckpoint`` will write to in ``trainer``'s run, computed before the run starts.

    Its ``dirpath`` when set; else, as Lightning resolves it, ``<logger save_dir>/<name>/<version>/checkpoints``
    (``<default_root_dir>/checkpoints`` without a logger). None when it cannot be told beforehand.
    """
    dirpath = getattr(callback, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    loggers = getattr(trainer, "loggers", None) or []
    if not loggers:
        return Path(getattr(trainer, "default_root_dir", ".")) / "checkpoints"
    logger = loggers[0]
    save_dir = logger.save_dir or getattr(trainer, "default_root_dir", ".")
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir, str(logger.name or ""), version, "checkpoints")


#: Lightning's start-up log lines that tell the user nothing they asked for (matched at the start of the message).
NOISE_PREFIXES = (
    "GPU available:",
    "TPU available:",
    "💡 Tip: For seamless cloud logging",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropStartupNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE_PREFIXES)


_NOISE_FILTER = _DropStartupNoise()


def quiet_startup() -> None:
    """Keep Lightning's start-up noise off the console (see the module docstring); safe to call again."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)
    # torch deprecated LeafSpec; Lightning's _pytree still builds it (not the user's code)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def _drop_v_num(get_metrics: Any) -> Any:
    def metrics(trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = dict(get_metrics(trainer, pl_module))
        items.pop("v_num", None)  # the logger's version (a W&B run id): not a training metric
        return items

    return metrics


class WritableCheckpointFolders(Callback):
    """At the start of ``fit`` (before the model is built or any step runs), check that every ``ModelCheckpoint``
    folder can be written: an unwritable or impossible folder is a one-line :class:`CheckpointError` now instead of
    a traceback at the first save, an epoch later. Every :class:`RLHFLightningCLI` trainer (``fit``, pipeline) has
    one."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                folder = checkpoint_dir(callback, trainer)
                if folder is not None and "://" not in str(folder):
                    check_writable(folder)


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` to the log folder (as Lightning does) and also sends the whole resolved config to every
    logger, so a W&B run (or TensorBoard's hparams) shows exactly what was run, not only the module's arguments."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with the suite's defaults (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        defaults = dict(kwargs.get("trainer_defaults") or {})
        # the DataModules' batch samplers shard by rank themselves (data/sampling.py): Lightning must not replace them
        defaults.setdefault("use_distributed_sampler", False)
        extra = defaults.get("callbacks") or []
        defaults["callbacks"] = [
            *(extra if isinstance(extra, list) else [extra]),
            WritableCheckpointFolders(),
        ]
        kwargs["trainer_defaults"] = defaults
        quiet_startup()
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:
            config.trainer.precision = choose_precision(config.trainer.get("accelerator"))

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if not config["trainer"].get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.get_metrics = _drop_v_num(bar.get_metrics)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` through the suite's safe loader first, so a refused or unreadable file ends in one
        :class:`CheckpointError` line instead of an unpickling traceback from LightningCLI's own read."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            read_checkpoint_file(ckpt_path, mmap=True)  # mmap: the tensors are mapped, not read
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config, callbacks):
        listed = config.get("callbacks") or []
        configured = [*(listed if isinstance(listed, list) else [listed]), *callbacks]
        return super()._instantiate_trainer(config, [*callbacks, *default_callbacks(configured)])

    def before_fit(self) -> None:
        """Refuse a fresh run (no ``--ckpt_path``) whose checkpoint folder already holds checkpoints."""
        config = self.config[self.subcommand]
        if config.get("ckpt_path"):
            return
        for callback in self.trainer.callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            folder = checkpoint_dir(callback, self.trainer)
            existing = sorted(folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
            if existing:
                names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
                raise CheckpointError(
                    f"checkpoint folder {folder} already holds {names} from an earlier run; a fresh fit would "
                    "overwrite them. Resume that run with --ckpt_path <file>, or choose a new folder "
                    "(ModelCheckpoint dirpath / logger save_dir), or delete the old checkpoints."
                )
