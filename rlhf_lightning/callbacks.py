"""Callbacks for watching a run: PPO progress, step progress of the other stages, and SFT sample generations.

:class:`PPOProgress` shows where a PPO run is: the phase of the current iteration (generation, scoring, update, or
evaluation), iterations done out of the total, generated tokens per second and seconds per iteration, with the
latest score and KL. On a terminal it rewrites one status line; in a non-interactive log (not a TTY: CI, SLURM, a
pipe) it prints a plain line every ``log_every_n`` iterations, or nothing with ``log_every_n=0``. Use it with
``trainer.enable_progress_bar: false`` (Lightning's bar counts steps, not phases).


:class:`StageProgress` is the same idea for step-counted stages (SFT, reward model, DPO): off a TTY (or with Lightning's
progress bar disabled) it prints a plain line every ``log_every_n`` optimizer steps and at the last one, e.g.
``[sft] step 40/204 | loss 5.123 | 2.1 steps/s | ETA 1m18s``, so a log file shows the run moving between epochs. On a
terminal with the progress bar on it prints nothing (the bar already shows steps).

The phase is read from the networks the PPO module already has, through forward pre-hooks (no change to the module):
an iteration starts in ``generation``; the first forward of the frozen reference, the reward model or a gradient-free
critic forward means ``scoring``; a forward with gradients enabled (policy or critic) means ``update``. The policy's
own log-prob forward right after sampling is therefore shown as generation.

:class:`SFTSamples` samples replies to fixed prompts every ``every_n_steps`` optimizer steps (and at the end of
training) and logs them with :func:`rlhf_lightning.stages.sample_tables.log_table` as ``samples/sft``: a W&B table,
TensorBoard text or a CSV file. The prompts are the first ``num_prompts`` conversations of the validation set (their
turns before the first assistant reply), or ``prompts`` given as user messages; sampling is seeded, so the rows of two
steps differ only because the model did.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.sample_tables import log_table
from rlhf_lightning.stages.sampling import replies_for_ids

PHASES = ("generation", "scoring", "update")


class _StatusLines(Callback):
    """Where progress callbacks write, and whether the stream is interactive (a TTY).

    Args:
        log_every_n: in a non-interactive log, print a plain line every this many steps (0 = print nothing).
        interactive: ``True`` for a terminal, ``False`` for a log file; ``None`` asks whether the stream is a TTY.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(
        self, log_every_n: int = 10, interactive: bool | None = None, stream: TextIO | None = None
    ) -> None:
        if log_every_n < 0:
            raise ValueError(f"log_every_n={log_every_n}; expected 0 (silent) or a positive number")
        self.log_every_n = log_every_n
        self._interactive = interactive
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _due(self, step: int, total: int | None) -> bool:
        """Whether a plain line is due after ``step`` (every ``log_every_n`` steps and at the last one)."""
        return bool(self.log_every_n) and (step % self.log_every_n == 0 or step == total)

    def _write_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class PPOProgress(_StatusLines):
    """Phase, iterations done/total and tokens per second of a PPO run (see the module docstring).

    Args:
        log_every_n: in a non-interactive log, print a plain line every this many iterations (0 = print nothing).
        interactive: ``True`` rewrites a status line, ``False`` prints plain lines; ``None`` asks whether the stream
            is a TTY.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(
        self, log_every_n: int = 10, interactive: bool | None = None, stream: TextIO | None = None
    ) -> None:
        super().__init__(log_every_n, interactive, stream)
        self.phase = "idle"
        self.iteration = 0
        self.total: int | None = None
        self._handles: list[Any] = []
        self._started = 0.0
        self._last: dict[str, float] = {}
        self._evaluating = False

    # -- phase tracking ------------------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        if self._evaluating:
            phase = f"eval {phase}"
        if phase != self.phase:
            self.phase = phase
            if self.interactive:
                self._draw()

    def _hook(self, kind: str):
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                self._set_phase("update")
            elif kind != "policy":
                self._set_phase("scoring")

        return pre_hook

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ppo = getattr(pl_module, "ppo", None) or getattr(pl_module, "grpo", None)  # PPOArgs or GRPOArgs
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.total = steps or getattr(ppo, "iterations", None)
        for kind, name in (("policy", "policy"), ("other", "reference"), ("other", "reward_model"),
                           ("other", "value_model")):  # fmt: skip
            network = getattr(pl_module, name, None)
            if isinstance(network, torch.nn.Module):
                embedding = next((m for m in network.modules() if isinstance(m, torch.nn.Embedding)), network)
                self._handles.append(embedding.register_forward_pre_hook(self._hook(kind)))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.interactive and trainer.is_global_zero:
            self.stream.write("\n")
            self.stream.flush()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.iteration = trainer.global_step
        self._started = time.perf_counter()
        self._set_phase("generation")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.iteration = trainer.global_step
        metrics = trainer.callback_metrics
        for key, short in (
            ("time/generated_tokens_per_sec", "tok_s"),
            ("rollout/score_mean", "score"),
            ("rollout/kl", "kl"),
        ):
            if key in metrics:
                self._last[short] = float(metrics[key])
        self._last["s_iter"] = time.perf_counter() - self._started
        self.phase = "done"
        if not trainer.is_global_zero:
            return
        if self.interactive:
            self._draw()
        elif self._due(self.iteration, self.total):
            self._write_line(self.status())

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluating = True
        self._set_phase("generation")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluating = False
        self.phase = "done"

    # -- display -------------------------------------------------------------------------------------------------------
    def status(self) -> str:
        """The current status line, e.g. ``[ppo] iteration 3/40 | update | 512 tok/s | 2.1 s/it | score ...``."""
        total = f"/{self.total}" if self.total else ""
        parts = [f"[ppo] iteration {self.iteration}{total}", self.phase]
        if "tok_s" in self._last:
            parts.append(f"{self._last['tok_s']:.0f} tok/s")
        if "s_iter" in self._last:
            parts.append(f"{self._last['s_iter']:.1f} s/it")
        if "score" in self._last:
            parts.append(f"score {self._last['score']:+.3f} kl {self._last.get('kl', 0.0):.3f}")
        return " | ".join(parts)

    def _draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.status())
        self.stream.flush()


class StageProgress(_StatusLines):
    """A plain progress line every ``log_every_n`` optimizer steps of an SFT, reward or DPO run (see the module
    docstring): step done/total, the latest ``train/loss``, steps per second and the estimated time left.

    Args:
        log_every_n: print a line every this many optimizer steps (and at the last one); 0 = print nothing.
        name: the stage's name in the line (default: the module's class name without ``Module``, lower-cased).
        interactive: ``True`` for a terminal (silent while Lightning's progress bar is on), ``False`` for a log file;
            ``None`` asks whether the stream is a TTY.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(
        self,
        log_every_n: int = 50,
        name: str | None = None,
        interactive: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__(log_every_n, interactive, stream)
        self.name = name
        self.total: int | None = None
        self._started = 0.0
        self._first_step = 0
        self._last_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.name is None:
            self.name = type(pl_module).__name__.removesuffix("Module").lower() or "train"
        total = trainer.estimated_stepping_batches
        self.total = int(total) if isinstance(total, int | float) and 0 < total < float("inf") else None
        self._started = time.perf_counter()
        self._first_step = self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero or not self._due(step, self.total):
            return
        self._last_step = step
        if self.interactive and getattr(trainer, "progress_bar_callback", None) is not None:
            return  # the progress bar already shows the steps
        self._write_line(self.status(step, trainer.callback_metrics))

    def status(self, step: int, metrics: dict[str, Any]) -> str:
        """The progress line after ``step``, e.g. ``[sft] step 40/204 | loss 5.123 | 2.1 steps/s | ETA 1m18s``."""
        total = f"/{self.total}" if self.total else ""
        parts = [f"[{self.name}] step {step}{total}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4g}")
        elapsed = time.perf_counter() - self._started
        rate = (step - self._first_step) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} steps/s")
            if self.total and self.total > step:
                eta = round((self.total - step) / rate)
                parts.append(
                    f"ETA {eta // 3600}h{eta % 3600 // 60:02d}m"
                    if eta >= 3600
                    else f"ETA {eta // 60}m{eta % 60:02d}s"
                )
        return " | ".join(parts)


class SFTSamples(Callback):
    """Sample table of SFT replies to fixed prompts every ``every_n_steps`` (see the module docstring).

    Args:
        every_n_steps: optimizer steps between tables (0 = only at the end of training).
        num_prompts: validation conversations to take prompts from (when ``prompts`` is not given).
        prompts: user messages to reply to instead of validation prompts.
        max_new_tokens: longest sampled reply.
        temperature: sampling temperature (0 = greedy).
        seed: seed of the sampling generator (the same at every table).
        key: name of the table.
    """

    COLUMNS = ("prompt", "reference", "sample")

    def __init__(
        self,
        every_n_steps: int = 100,
        num_prompts: int = 4,
        prompts: list[str] | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.7,
        seed: int = 0,
        key: str = "samples/sft",
    ) -> None:
        if every_n_steps < 0 or num_prompts < 1 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(
                "SFTSamples: expected every_n_steps >= 0, num_prompts >= 1, max_new_tokens >= 1, temperature >= 0"
            )
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.prompts = prompts
        self.generation = GenerationArgs(
            max_new_tokens=max_new_tokens, temperature=temperature or 1.0, do_sample=temperature > 0
        )
        self.seed = seed
        self.key = key
        self._last_step = -1

    def _prompt_ids(self, trainer: Trainer, tokenizer: Any) -> list[tuple[list[int], str]]:
        """(prompt ids ending in the assistant header, reference reply) pairs."""
        if self.prompts:
            return [(tokenizer.render_prompt([{"role": "user", "content": p}]), "") for p in self.prompts]
        dataset = getattr(getattr(trainer, "datamodule", None), "val_dataset", None)
        pairs = []
        for i in range(min(self.num_prompts, len(dataset) if dataset is not None else 0)):
            ids, mask = dataset[i]
            start = next((j for j, m in enumerate(mask) if m), None)
            if start is None:
                continue
            end = next((j for j in range(start, len(mask)) if not mask[j]), len(mask))
            pairs.append((list(ids[:start]), tokenizer.decode(ids[start:end])))
        return pairs

    @torch.no_grad()
    def log_samples(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sample one reply per prompt with ``pl_module.model`` and log the table."""
        model, tokenizer = getattr(pl_module, "model", None), getattr(pl_module, "tokenizer", None)
        if model is None or tokenizer is None or not trainer.is_global_zero:
            return
        pairs = self._prompt_ids(trainer, tokenizer)
        if not pairs:
            return
        max_seq_len = getattr(getattr(model, "config", None), "max_seq_len", None)
        if isinstance(max_seq_len, int):  # keep the oldest turns out rather than overrun the model
            keep = max(1, max_seq_len - self.generation.max_new_tokens)
            pairs = [(ids[-keep:], reference) for ids, reference in pairs]
        replies = replies_for_ids(
            model, tokenizer, [ids for ids, _ in pairs], self.generation, seed=self.seed
        )
        rows = []
        for (ids, reference), sample in zip(pairs, replies):
            prompt = tokenizer.decode(ids, skip_special_tokens=False)  # role tokens kept: who said what
            rows.append([prompt[-500:], reference, sample])
        log_table(pl_module, self.key, list(self.COLUMNS), rows)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)
