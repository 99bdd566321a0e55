"""The suite's ``LightningCLI``: shared by ``rlhf-lightning fit|validate|test|predict`` and the pipeline.

Defaults it adds to a plain LightningCLI: precision chosen per device when the config leaves it unset (bf16-mixed on
CUDA GPUs that support it and on CPUs with native bf16 instructions, 32-true elsewhere; the choice is printed), atomic checkpoint writes and ``weights_only`` reads (``--ckpt_path``
included), guards before training (a fresh run may not start in a checkpoint folder that already holds
checkpoints, and every checkpoint folder must be writable: :class:`WritableCheckpointFolders`),
``trainer.use_distributed_sampler: false`` (the DataModules' batch samplers shard by rank themselves, so the shipped
configs run on several devices as they are), and the run guards
of ``rlhf_lightning.guards`` (stop on a non-finite loss or gradient; save and exit 143/130 on SIGTERM/SIGINT) in
every Trainer's callbacks.

Checks made right after parsing, before the model or data are built: a fresh ``fit`` into a checkpoint folder that
already holds checkpoints is refused at once when the config names the folder (``ModelCheckpoint`` ``dirpath``; a
folder that depends on the logger is checked in ``before_fit``), and ``test`` / ``predict`` with a stage that has no
test (predict) step or data refuse in one line naming the stages that have them (:data:`STAGES`). ``fit --ckpt_path``
with a checkpoint that already reached ``max_steps`` / ``max_epochs`` says in one line that nothing was trained.
``fit --help`` ends with the stage and DataModule classes.

Start-up noise is kept off the console (:func:`quiet_startup`): Lightning's "GPU available / TPU available" lines, its
litlogger tip and "Loading `train_dataloader` to estimate ..." note, and torch's ``LeafSpec`` deprecation warning from
Lightning's ``_pytree``; the progress bar no longer shows the logger's version (a W&B run id) as ``v_num``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from rlhf_lightning.guards import default_callbacks
from rlhf_lightning.stages.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    SetupError,
    check_writable,
    read_checkpoint_file,
)

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of x86 CPUs with native bf16 matmuls (AVX512-BF16 dot products, AMX tiles)."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags listed in ``cpuinfo`` (the ``flags`` line of Linux's ``/proc/cpuinfo``); empty when the
    file is missing or unreadable (macOS, Windows), so such machines keep fp32."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_precision(
    accelerator: object,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
    flags: frozenset[str] | None = None,
) -> str:
    """The Trainer precision used when a config leaves ``trainer.precision`` unset ("auto").

    ``bf16-mixed`` when the run will use a CUDA GPU that supports bf16, or will run on a CPU whose flags show native
    bf16 (:data:`CPU_BF16_FLAGS`: autocast then runs the matmuls in bf16, about 2x faster than fp32 on such a CPU for
    a model past the tiny presets); ``32-true`` elsewhere (CPUs without bf16 instructions, MPS, older GPUs). An
    explicit ``trainer.precision`` is never replaced.

    Args:
        accelerator: the config's ``trainer.accelerator`` (``None``, ``"auto"``, ``"gpu"``, ``"cuda"``, ``"cpu"``, ...).
        cuda_available: whether CUDA is usable (None: ask torch).
        bf16_supported: whether the GPU supports bf16 (None: ask torch; only asked when CUDA is usable).
        flags: the CPU's feature flags (None: read ``/proc/cpuinfo`` with :func:`cpu_flags`; only read for a CPU run).
    """
    auto = accelerator is None or accelerator == "auto"
    if auto or accelerator in ("gpu", "cuda"):
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if cuda_available:
            if bf16_supported is None:
                bf16_supported = torch.cuda.is_bf16_supported()
            return "bf16-mixed" if bf16_supported else "32-true"
    if auto or accelerator == "cpu":
        if flags is None:
            flags = cpu_flags()
        return "bf16-mixed" if CPU_BF16_FLAGS & set(flags) else "32-true"
    return "32-true"


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


#: The project's stages: name -> (LightningModule, LightningDataModule) class paths for ``--model`` / ``--data``.
STAGES = {
    "sft": ("rlhf_lightning.stages.sft.SFTModule", "rlhf_lightning.data.sft.SFTDataModule"),
    "reward": (
        "rlhf_lightning.stages.reward.RewardModule",
        "rlhf_lightning.data.preference.PreferenceDataModule",
    ),
    "ppo": ("rlhf_lightning.stages.ppo.PPOModule", "rlhf_lightning.data.prompts.PromptDataModule"),
    "dpo": ("rlhf_lightning.stages.dpo.DPOModule", "rlhf_lightning.data.preference.PreferenceDataModule"),
    "grpo": ("rlhf_lightning.stages.grpo.GRPOModule", "rlhf_lightning.data.prompts.PromptDataModule"),
}
STAGES_EPILOG = (
    "Stages (--model / --data class paths; shipped configs in configs/, e.g. --config configs/sft.yaml): "
    + "; ".join(f"{name}: {model} with {data}" for name, (model, data) in STAGES.items())
    + ". GRPOModule also runs Dr. GRPO and RLOO (configs/rloo.yaml)."
)
#: The hooks ``test`` and ``predict`` need from the stage and from its DataModule.
_EVAL_HOOKS = {"test": ("test_step", "test_dataloader"), "predict": ("predict_step", "predict_dataloader")}


def _import(class_path: str) -> type:
    from jsonargparse.typing import import_object

    return import_object(class_path)


def _defines(cls: type, hook: str) -> bool:
    """Whether ``cls`` defines ``hook`` itself (not only Lightning's base class)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    lightning = {*LightningModule.__mro__, *LightningDataModule.__mro__}
    return any(hook in vars(klass) for klass in cls.__mro__ if klass not in lightning)


def supports(subcommand: str, model_class: type, data_class: type | None) -> bool:
    """Whether a stage (``model_class`` with ``data_class``) can run ``test`` or ``predict``."""
    step, loader = _EVAL_HOOKS[subcommand]
    return _defines(model_class, step) and (
        data_class is None or _defines(data_class, loader) or _defines(model_class, loader)
    )


def refuse_existing_checkpoints(folder: Path | None) -> None:
    """Raise :class:`CheckpointError` when ``folder`` already holds checkpoints (a fresh fit would overwrite them)."""
    existing = sorted(folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
    if existing:
        names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise CheckpointError(
            f"checkpoint folder {folder} already holds {names} from an earlier run; a fresh fit would "
            "overwrite them. Resume that run with --ckpt_path <file>, or choose a new folder "
            "(ModelCheckpoint dirpath / logger save_dir), or delete the old checkpoints."
        )


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

    def __init__(self, *args, defer_trainer: bool = False, **kwargs) -> None:
        """``defer_trainer=True`` (``run=False`` only): parse the config and build the DataModule and the
        LightningModule (whose networks are built later, in ``configure_model``), but neither seed nor build the
        Trainer: a silent, cheap check of a config. :meth:`build_trainer` finishes the same build when it runs."""
        self._defer_trainer = defer_trainer
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
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        for subcommand in ("fit", "validate", "test", "predict"):
            parser_kwargs[subcommand] = {"epilog": STAGES_EPILOG, **(parser_kwargs.get(subcommand) or {})}
        kwargs["parser_kwargs"] = parser_kwargs
        self._resumed_from: tuple[str, Any, Any] | None = None
        quiet_startup()
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:
            accelerator = config.trainer.get("accelerator")
            config.trainer.precision = choose_precision(accelerator)
            if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
                print(
                    f"rlhf-lightning: trainer.precision={config.trainer.precision} chosen for accelerator="
                    f"{accelerator or 'auto'} (set trainer.precision to override)",
                    file=sys.stderr,
                )
        if self.subcommand in _EVAL_HOOKS:
            self._check_supports(self.subcommand, config)
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            for callback in _listed(
                config.trainer.get("callbacks")
            ):  # folders named in the config: before building
                if _class_name(callback) == "ModelCheckpoint":
                    dirpath = (callback.get("init_args") or {}).get("dirpath")
                    if dirpath and "://" not in str(dirpath):
                        refuse_existing_checkpoints(Path(dirpath))

    @staticmethod
    def _check_supports(subcommand: str, config: Namespace) -> None:
        model_path = _class_path(config.get("model"))
        data_path = _class_path(config.get("data"))
        if model_path is None:
            return
        model_class = _import(model_path)
        data_class = _import(data_path) if data_path else None
        if supports(subcommand, model_class, data_class):
            return
        able = [
            f"{model.rsplit('.', 1)[1]} with {data.rsplit('.', 1)[1]}"
            for model, data in STAGES.values()
            if supports(subcommand, _import(model), _import(data))
        ]
        pair = model_class.__name__ + (f" with {data_class.__name__}" if data_class else "")
        raise SetupError(
            f"`{subcommand}` is not supported by {pair} (no {' / '.join(_EVAL_HOOKS[subcommand])}); stages that "
            f"support it: {', '.join(able) or 'none'}"
        )

    def _set_seed(self) -> None:
        if not self._defer_trainer:  # deferred: seeded by build_trainer, right before the Trainer is built
            super()._set_seed()

    def build_trainer(self):
        """Seed and build the Trainer of a ``defer_trainer=True`` build (a no-op once it exists); returns it."""
        if self._defer_trainer:
            self._defer_trainer = False
            self._set_seed()
            self.trainer = self.instantiate_trainer()
        return self.trainer

    def instantiate_trainer(self, **kwargs):
        if self._defer_trainer:
            return None  # LightningCLI.instantiate_classes stores it as .trainer; build_trainer makes the real one
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
            checkpoint = read_checkpoint_file(ckpt_path, mmap=True)  # mmap: the tensors are mapped, not read
            if isinstance(checkpoint, dict):
                self._resumed_from = (str(ckpt_path), checkpoint.get("global_step"), checkpoint.get("epoch"))
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config, callbacks):
        listed = config.get("callbacks") or []
        configured = [*(listed if isinstance(listed, list) else [listed]), *callbacks]
        return super()._instantiate_trainer(config, [*callbacks, *default_callbacks(configured)])

    def before_fit(self) -> None:
        """Refuse a fresh run (no ``--ckpt_path``) whose checkpoint folder already holds checkpoints (the folders
        that depend on the logger; those named in the config were checked before anything was built)."""
        config = self.config[self.subcommand]
        if config.get("ckpt_path"):
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                refuse_existing_checkpoints(checkpoint_dir(callback, self.trainer))

    def after_fit(self) -> None:
        """Say so when ``--ckpt_path`` was a finished run: the fit restored it and trained nothing."""
        if self._resumed_from is None or not self.trainer.is_global_zero:
            return
        path, step, epoch = self._resumed_from
        if step is not None and self.trainer.global_step == step:
            print(
                f"nothing to train: {path} (step {step}, epoch {epoch}) already reached trainer.max_steps="
                f"{self.trainer.max_steps} / max_epochs={self.trainer.max_epochs}; raise them to train further",
                file=sys.stderr,
            )


def _listed(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _class_path(value: Any) -> str | None:
    path = value.get("class_path") if isinstance(value, dict | Namespace) else None
    return str(path) if path else None


def _class_name(value: Any) -> str:
    return (_class_path(value) or "").rsplit(".", 1)[-1]
