"""Loggers for watching a run: a W&B logger that never prompts or fails, and the pipeline's logger choice.

:class:`RLHFWandbLogger` is Lightning's ``WandbLogger`` with one decision made in code: the W&B mode. Without an API
key (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``) or without a reachable W&B server it runs
**offline**: the run is written under ``<save_dir>/wandb/offline-run-*`` and can be uploaded later with
``wandb sync <save_dir>/wandb/offline-run-*``. An explicit ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) or the
``offline``/``mode`` argument wins, except that ``online`` without a key falls back to offline with a warning rather
than stopping at a login prompt.

Switching logger in a stage config is one line: the ``class_path`` of the second ``trainer.logger`` entry
(``rlhf_lightning.loggers.RLHFWandbLogger``, ``lightning.pytorch.loggers.TensorBoardLogger`` or
``lightning.pytorch.loggers.CSVLogger``); the shipped configs give it only ``save_dir`` and ``name``, which all three
accept. The pipeline takes ``logger: wandb | tensorboard | csv`` (:func:`stage_loggers`) and always keeps a CSV record
first, which its plots read.

Deviation from Lightning's ``WandbLogger``: the mode goes to ``wandb.init(mode=...)`` instead of Lightning's
``offline=True``, which sets ``WANDB_MODE=dryrun`` in the process environment for every later run.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "rlhf-lightning"
LOGGER_CHOICES = ("wandb", "tensorboard", "csv")
_PROBE_TIMEOUT_S = 2.0


def _wandb_host(env: dict[str, str]) -> str:
    return urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def has_wandb_key(env: dict[str, str] | None = None) -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY``, or a ``~/.netrc`` entry for the W&B host."""
    env = dict(os.environ if env is None else env)
    if env.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_wandb_host(env)) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def can_reach(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores the socket timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def wandb_mode(env: dict[str, str] | None = None, reachable: Any = can_reach) -> str:
    """The W&B mode to run in: ``online``, ``offline`` or ``disabled`` (see the module docstring).

    Args:
        env: environment to read (default ``os.environ``).
        reachable: ``host -> bool`` network probe (tests replace it).
    """
    env = dict(os.environ if env is None else env)
    requested = (env.get("WANDB_MODE") or "").strip().lower()
    if env.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes") or requested == "disabled":
        return "disabled"
    if requested in ("offline", "dryrun"):
        return "offline"
    if not has_wandb_key(env):
        if requested == "online":
            log.warning("WANDB_MODE=online but no W&B API key found: logging offline instead")
        return "offline"
    if not reachable(_wandb_host(env)):
        log.warning(
            "W&B server %s unreachable: logging offline (upload later with `wandb sync`)", _wandb_host(env)
        )
        return "offline"
    return "online"


class RLHFWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that picks online or offline itself and never prompts.

    Args:
        save_dir: folder of the run; W&B writes ``<save_dir>/wandb/``.
        name: display name of the run (default: W&B's random name).
        project: W&B project (default: ``WANDB_PROJECT``, else ``rlhf-lightning``).
        group: W&B group (the pipeline groups its three stages under the run folder's name).
        job_type: W&B job type (default: ``name``; the pipeline sets the stage).
        offline: ``True``/``False`` forces the mode; ``None`` decides it (:func:`wandb_mode`).
        tags: W&B tags.
        log_model: upload checkpoints as W&B artifacts (off: checkpoints stay in the run folder).
        kwargs: passed on to ``WandbLogger`` and ``wandb.init``.
    """

    def __init__(
        self,
        save_dir: str = ".",
        name: str | None = None,
        project: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        offline: bool | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        mode = kwargs.pop("mode", None)
        if mode is None:
            mode = "offline" if offline else wandb_mode() if offline is None else "online"
            if mode == "online" and not has_wandb_key():
                mode = "offline"
        self.mode = mode
        kwargs.setdefault("settings", _quiet_settings())
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            log_model=log_model if mode == "online" else False,
            group=group,
            job_type=job_type or name,
            tags=tags,
            mode=mode,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the setting even when it is None
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:
        """The W&B run, started on first use (its folder is created then, not when the logger is built)."""
        if self._experiment is None and self._save_dir:
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)
        return WandbLogger.experiment.fget(self)

    def finish(self) -> None:
        """End the W&B run (the next stage in this process starts its own); no-op when none was started."""
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish()
        self._experiment = None


def _quiet_settings() -> Any:
    """W&B settings for a training run: no code saving, no job artifacts."""
    import wandb

    return wandb.Settings(save_code=False, disable_job_creation=True)


def finish_wandb(loggers: list[Any]) -> None:
    """Finish the W&B runs of ``loggers`` (Lightning leaves them open until the process exits)."""
    for logger in loggers:
        if isinstance(logger, RLHFWandbLogger):
            logger.finish()
        elif isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def stage_loggers(backend: str, folder: str | Path, stage: str, group: str) -> list[dict[str, Any]]:
    """The pipeline's ``trainer.logger`` list for one stage: the CSV record, then ``backend``'s logger.

    The CSV logger writes ``<folder>/logs/metrics.csv`` (read by :mod:`rlhf_lightning.plots`) and comes first, so
    ``trainer.log_dir`` and the sample-table CSV files stay in ``<folder>/logs``.
    """
    if backend not in LOGGER_CHOICES:
        raise ValueError(f"logger={backend!r}; expected one of {LOGGER_CHOICES}")
    folder = str(folder)
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": folder, "name": "logs", "version": ""},
        }
    ]
    if backend == "wandb":
        loggers.append(
            {
                "class_path": "rlhf_lightning.loggers.RLHFWandbLogger",
                "init_args": {
                    "save_dir": folder,
                    "name": f"{group}-{stage}",
                    "group": group,
                    "job_type": stage,
                },
            }
        )
    elif backend == "tensorboard":
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": folder, "name": "tensorboard", "version": ""},
            }
        )
    return loggers
