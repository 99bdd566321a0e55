"""Run guards added to every stage: stop on non-finite numbers, and stop cleanly (and resumably) on SIGTERM/SIGINT.

:class:`NonFiniteGuard` stops a stage at the first non-finite loss (before its backward), gradient norm (before the
optimizer step; after each backward under manual optimisation), monitored validation metric (before
``ModelCheckpoint`` can rank it: Lightning's ``ModelCheckpoint`` turns a NaN score into +/-inf and keeps it as "best"
while it has fewer than ``save_top_k`` checkpoints) or checkpoint weight (before the file is written). It raises
:class:`NonFiniteError` naming the stage, the step and the quantity. Stages check their own quantities with
:func:`check_finite` (PPO: sequence scores and advantages after each rollout). ``max_bad_steps > 0`` (opt-in) skips
up to that many optimizer steps whose loss or gradients are not finite (automatic optimisation only: SFT and reward
model) and stops at the next one.

:class:`Preemption` turns SIGTERM (a cluster scheduler's preemption) and SIGINT (Ctrl-C) into a clean stop: the
signal only raises Lightning's ``received_sigterm`` flag, so training stops at the next point where Lightning checks
it (after the running training batch, or inside a validation run), then a resumable ``last.ckpt`` is written to the
stage's checkpoint folder (its ``ModelCheckpoint`` ``dirpath``, else ``<default_root_dir>/checkpoints``) and the
process exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT) instead of Lightning's exit status 0. The
handlers are installed when the loops start and Lightning restores the previous ones at teardown; a signal before
that (model loading, data setup) has its usual effect, with nothing trained to save.

With several processes (DDP, FSDP2) a signal may reach one rank only (``kill`` of the launching process) or every
rank at slightly different moments (a scheduler); ranks that stopped at different batches would wait on each other's
collectives for ever. So there the handler only records the signal, and at the end of every training batch the
ranks agree on it (one all-gather of a number): once any rank has one, every rank stops after that same batch,
every rank joins in writing the one ``last.ckpt``, and every process exits with ``128 + signal``.

Both are added by default by :class:`rlhf_lightning.stage_cli.RLHFLightningCLI` (``rlhf-lightning fit`` and the
pipeline); a config that lists one of them in ``trainer.callbacks`` (e.g. ``NonFiniteGuard`` with
``max_bad_steps: 3``) keeps its own.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlhf_lightning.distributed import all_gather_tensors

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
    """A loss, gradient norm, score, advantage, metric or weight that is NaN or infinite: the stage stops."""


def _stage(pl_module: LightningModule) -> str:
    """``sft``, ``reward``, ``ppo`` for the suite's ``SFTModule``, ``RewardModule``, ``PPOModule``."""
    return type(pl_module).__name__.removesuffix("Module").lower()


def check_finite(stage: str, step: int, **quantities: torch.Tensor | float) -> None:
    """Raise :class:`NonFiniteError` when any of ``quantities`` (name=tensor or number) holds a NaN or infinity.

    The message names the stage, the step and the first bad quantity, with how many of its values are bad.
    """
    for name, value in quantities.items():
        if value is None:
            continue
        tensor = torch.as_tensor(value).detach()
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        bad = int((~finite).sum())
        shown = tensor[~finite].flatten()[0].item()
        raise NonFiniteError(
            f"{stage}: non-finite {name} at step {step} ({bad} of {tensor.numel()} value(s), e.g. {shown}); "
            "stopped before it could reach a checkpoint (lower the learning rate, check the data or the reward "
            "function)"
        )


def grad_norm(parameters: Any) -> torch.Tensor | None:
    """The global L2 norm of the parameters' gradients (None when no parameter has one)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    )


class NonFiniteGuard(Callback):
    """Stops the stage at the first non-finite loss, gradient norm, monitored metric or weight (module docstring).

    Args:
        max_bad_steps: optimizer steps with a non-finite loss or gradient norm to skip (their gradients dropped,
            with a warning) before stopping; 0 (the default) stops at the first. Automatic optimisation only.
    """

    def __init__(self, max_bad_steps: int = 0) -> None:
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps={max_bad_steps}; expected 0 (stop at once) or a positive number")
        self.max_bad_steps = max_bad_steps
        self.skipped = 0
        self._bad_loss: str | None = None

    def _fail_or_skip(self, trainer: Trainer, pl_module: LightningModule, check: dict[str, Any]) -> bool:
        """True when the step must be skipped; raises when it may not be."""
        try:
            check_finite(_stage(pl_module), trainer.global_step, **check)
        except NonFiniteError as err:
            if not pl_module.automatic_optimization or self.skipped >= self.max_bad_steps:
                raise
            self.skipped += 1
            print(
                f"warning: {err} -- step skipped ({self.skipped} of max_bad_steps={self.max_bad_steps})",
                file=sys.stderr,
            )
            return True
        return False

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if bad and (not pl_module.automatic_optimization or self.max_bad_steps == 0):
            check_finite(_stage(pl_module), trainer.global_step, loss=loss)
        if bad:  # skipping is decided before the optimizer step, with the gradients
            self._bad_loss = str(loss.detach().float().flatten()[0].item())

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            not pl_module.automatic_optimization
        ):  # manual optimisation steps raw optimizers: check every backward
            check_finite(
                _stage(pl_module), trainer.global_step, gradient_norm=grad_norm(pl_module.parameters())
            )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: overflowing steps are expected, and the scaler already skips them
        params = [p for group in optimizer.param_groups for p in group["params"]]
        check = {"loss": float(self._bad_loss)} if self._bad_loss is not None else {}
        check["gradient_norm"] = grad_norm(params)
        self._bad_loss = None
        if self._fail_or_skip(trainer, pl_module, check):
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left as they are

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for callback in trainer.checkpoint_callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor in trainer.callback_metrics:
                check_finite(
                    _stage(pl_module), trainer.global_step, **{monitor: trainer.callback_metrics[monitor]}
                )

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for name, tensor in checkpoint.get("state_dict", {}).items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                check_finite(_stage(pl_module), trainer.global_step, **{f"weight {name}": tensor})


class Preemption(Callback):
    """On SIGTERM or SIGINT: stop at Lightning's next check, save a resumable ``last.ckpt`` and exit with
    ``128 + signal`` (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: str | None = None
        self._trainer: Trainer | None = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self._trainer.world_size == 1:  # several processes: on_train_batch_end stops them together
            # Lightning's loops stop at their next check of this flag (SIGINT included: no KeyboardInterrupt mid-step)
            self._trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        """Several processes: if any rank has received a signal, every rank stops after this batch."""
        if trainer.world_size == 1 or not self._installed:
            return
        received = torch.tensor(float(self.signum or 0), device=trainer.strategy.root_device)
        signums = [int(s) for s in all_gather_tensors(received) if s]
        if signums:
            self.signum = self.signum or signums[0]
            trainer._signal_connector.received_sigterm = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signum, self.saved, self._trainer, self._installed = None, None, trainer, False

    def _install(self, trainer: Trainer, *args: Any) -> None:
        """Once the loops run (Lightning has registered its own handlers, and restores them all at teardown)."""
        if self._installed or not hasattr(trainer, "_signal_connector"):
            return
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._handle)
            self._installed = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _install

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.signum is not None:  # the signal came after Lightning's last check: stop anyway
            raise Preempted(self.signum, "after the run's last step")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.signum is None or not isinstance(exception, SystemExit):
            return
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self.saved = self._save(trainer)
        exception.code = 128 + self.signum  # Lightning's SIGTERMException alone exits with status 0
        if trainer.is_global_zero:
            name = signal.Signals(self.signum).name
            where = (
                f"saved {self.saved}; rerun to resume (rlhf-lightning fit: add --ckpt_path {self.saved})"
                if self.saved
                else "no checkpoint saved"
            )
            print(
                f"[{_stage(pl_module)}] stopped by {name} at step {trainer.global_step}: {where}",
                file=sys.stderr,
            )

    @staticmethod
    def _save(trainer: Trainer) -> str | None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = str(Path(folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt")
        try:
            trainer.save_checkpoint(path)
        except NonFiniteError as err:  # never write broken weights, not even to resume from
            print(f"error: not saving {path}: {err}", file=sys.stderr)
            return None
        return path


class Preempted(SystemExit):
    """The run was stopped by a signal: exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, detail: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.detail = detail

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} {self.detail}"


def default_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """The guards ``callbacks`` lacks (a configured guard keeps its own settings)."""
    return [cls() for cls in (NonFiniteGuard, Preemption) if not any(isinstance(c, cls) for c in callbacks)]


__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "Preempted",
    "Preemption",
    "check_finite",
    "default_callbacks",
    "grad_norm",
]
