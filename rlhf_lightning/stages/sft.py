"""Supervised fine-tuning of a chat model on conversations.

``training_step``:
    1. forward the right-padded conversations through the trunk (one causal pass),
    2. next-token cross-entropy on assistant tokens only (every assistant turn, each reply's closing EOS included),
       projecting through the LM head only the positions that predict such a token, a chunk of tokens at a time
       (``functional.chunked``: no (tokens x vocab) float32 logits in forward or backward),
    3. log ``train/loss`` and non-padding tokens per second.

Validation logs the token-weighted ``val/loss`` and ``val/ppl = exp(val/loss)``.

Choices: the loss is a mean over assistant tokens of the whole optimizer step (not a mean of per-conversation means),
as in most SFT trainers, so long replies weigh by their length. "Whole step" means every batch accumulated into it
(``accumulate_grad_batches``) on every data-parallel rank: ``training_step`` backpropagates the token *sum* and
``on_before_optimizer_step`` divides the gradients by the step's global token count, so 2 ranks x batch b, or 2
accumulated batches of b, step exactly as one batch of 2b (not as a mean of per-batch token means). ``train/loss``
logs each batch's token mean. Weights are built in ``configure_model`` (never in
``__init__``), from a fresh preset or from ``init_from`` (a checkpoint or a stage folder). The tokenizer comes from the
DataModule that meets this module in the Trainer (duck-typed ``datamodule.tokenizer``), or from ``tokenizer_path``.

Checkpoints are self-describing (``stages.checkpoints``): the architecture and tokenizer travel in the payload, so
``SFTModule.load_from_checkpoint(path)`` needs no Trainer, config or tokenizer file, and validating or resuming a
checkpoint uses the checkpoint's architecture even when the config names another preset (with a warning). Without a
Trainer ``init_from`` is not read: the checkpoint being loaded holds the weights. A DataModule ``max_length`` above the
model's ``max_seq_len`` fails in ``configure_model``, before the first step, rather than in the middle of an epoch.

Packed batches (``SFTDataModule(packing=True)``: the conversations of a batch end to end in one row, no padding) give
the same loss and gradients as padded ones: the trunk attends within each conversation only
(``functional.attention``) and the boundary position (the last token of one conversation "predicting" the first of
the next) never counts.

Deviation: ``train/tokens_per_sec`` counts non-padding tokens over the wall time of one optimisation step (forward,
backward, optimizer), excluding data loading.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from rlhf_lightning.distributed import all_reduce_sum, shard_for_strategy, world_size
from rlhf_lightning.functional.chunked import lm_head_nll_loss
from rlhf_lightning.functional.losses import token_nll_loss
from rlhf_lightning.models.factory import ModelArgs, build_model, model_from_spec, model_spec
from rlhf_lightning.models.lm_head import linear_head
from rlhf_lightning.optim import WarmupCosineLR, bind_total_steps
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, SetupError, load_backbone
from rlhf_lightning.stages.tokenizer_link import (
    reconcile_tokenizers,
    resolve_tokenizer,
    tokenizer_from_payload,
    tokenizer_payload,
)
from rlhf_lightning.types import SFTBatch

log = logging.getLogger(__name__)


class SFTModule(LightningModule):
    """Causal-LM fine-tuning with the loss on assistant tokens.

    Args:
        model: architecture of the built-in model (ignored when ``init_from`` is set: the checkpoint's is used, with
            this ``gradient_checkpointing`` setting).
        init_from: start from this checkpoint (file or stage folder) instead of random weights.
        tokenizer_path: a ``tokenizer.json`` to use when the DataModule provides no tokenizer.
        optimizer: optimizer factory (AdamW by default; set lr and weight decay in the config).
        scheduler: learning-rate schedule factory, stepped every optimizer step (warm-up + cosine by default).
        chunked_loss: project the assistant positions through the LM head a chunk of tokens at a time, so the
            (tokens x vocab) float32 logits are never held (``functional.chunked``; same loss and gradients). Only
            with a plain linear head; a LoRA-wrapped or custom head always takes the plain path.
    """

    def __init__(
        self,
        model: ModelArgs = ModelArgs(),
        init_from: str | None = None,
        tokenizer_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosineLR,
        chunked_loss: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_args = model
        self.chunked_loss = chunked_loss
        self.init_from = init_from
        self.tokenizer_path = tokenizer_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.val_loss = MeanMetric()
        self._step_started: float | None = None
        self._tokens_in_step = 0
        self._target_tokens = torch.zeros(())  # assistant tokens backpropagated since the last optimizer step

    def setup(self, stage: str) -> None:
        """Refuse DeepSpeed: ZeRO keeps gradients out of ``param.grad``, so :meth:`on_before_optimizer_step` could
        not turn the backpropagated token sums into the token mean, and the run would step on token sums."""
        if type(self.trainer.strategy).__name__.startswith("DeepSpeed"):
            raise SetupError(
                "SFT under DeepSpeed would step on token sums (its loss is rescaled on param.grad, which ZeRO leaves "
                "empty); use DDP or FSDP2 for SFT (configs/strategies/ddp_gpus.yaml, fsdp2.yaml)"
            )

    # -- weights ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the network (fresh preset, or ``init_from``'s weights) and check it fits the data."""
        if self.model is not None:
            return
        self.tokenizer = resolve_tokenizer(self, self.tokenizer_path)
        if self.init_from is not None:
            if self._trainer is None:
                return  # load_from_checkpoint: the checkpoint's payload rebuilds the model (on_load_checkpoint)
            self.model, stored, _ = load_backbone(
                self.init_from, trust_remote_code=self.model_args.trust_remote_code
            )
            self.tokenizer = reconcile_tokenizers(self.tokenizer, stored, self.init_from)
            if self.model_args.gradient_checkpointing:  # the loaded architecture, this run's memory setting
                self.model.gradient_checkpointing = True
        elif self.tokenizer is not None:
            self.model = build_model(self.model_args, self.tokenizer.vocab_size)
        # else: built from the checkpoint payload in on_load_checkpoint (load_from_checkpoint without a Trainer)
        if self.model is not None:
            self._check_fits_data()
            # FSDP2 under ModelParallelStrategy, else nothing
            shard_for_strategy(self.model, self.device_mesh)

    def _check_fits_data(self) -> None:
        """Fail before training when the DataModule serves sequences longer than the model accepts."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        max_length = getattr(datamodule, "max_length", None)
        max_seq_len = getattr(getattr(self.model, "config", None), "max_seq_len", None)
        if isinstance(max_length, int) and isinstance(max_seq_len, int) and max_length > max_seq_len:
            raise SetupError(
                f"data max_length={max_length} is longer than the model's max_seq_len={max_seq_len}; expected "
                f"data.max_length <= {max_seq_len} (or a model with a larger max_seq_len)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PAYLOAD_KEY] = {
            "stage": "sft",
            "backbone_prefix": "model.",
            "model_spec": model_spec(self.model),
            **tokenizer_payload(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network from the checkpoint's own spec when it differs (or none was built yet)."""
        payload = checkpoint.get(PAYLOAD_KEY)
        if payload is None:
            return  # a plain Lightning checkpoint: load_state_dict reports any mismatch
        spec = payload["model_spec"]
        if self.model is None or model_spec(self.model) != spec:
            if self.model is not None:
                log.warning(
                    "checkpoint architecture %s differs from the configured one; using the checkpoint's",
                    spec.get("config"),
                )
            self.model = model_from_spec(spec, trust_remote_code=self.model_args.trust_remote_code)
        stored = tokenizer_from_payload(payload)
        if stored is not None:
            self.tokenizer = reconcile_tokenizers(self.tokenizer, stored, "the checkpoint being loaded")
        if self._trainer is not None:
            self._check_fits_data()

    # -- steps -------------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the language model for ``input_ids`` (B, T)."""
        return self.model(input_ids, attention_mask=attention_mask)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def loss(self, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token-mean NLL of the assistant tokens: the trunk runs over the batch, the LM head and log-softmax only over
        the positions that predict an assistant token (equal to ``sft_loss`` on full logits; less work and memory)."""
        target_mask = batch.loss_mask[:, 1:]  # (B, T-1): position t predicts token t+1
        if batch.packed:  # one row of conversations: never predict across a boundary (a start has position 0)
            target_mask = target_mask & (batch.position_ids[:, 1:] != 0)
            hidden = self.model.hidden_states(
                batch.input_ids, batch.attention_mask, batch.position_ids, cu_seqlens=batch.cu_seqlens
            )
        else:
            hidden = self.model.hidden_states(batch.input_ids, batch.attention_mask)
        hidden = hidden[:, :-1][target_mask]  # (N, D)
        targets = batch.input_ids[:, 1:][target_mask]  # (N,)
        head = linear_head(self.model) if self.chunked_loss else None
        if head is not None:  # chunked over tokens: never the (N, V) float32 logits (functional.chunked)
            return lm_head_nll_loss(hidden, head.weight, targets, head.bias)
        return token_nll_loss(self.model.lm_head(hidden), targets)

    def training_step(self, batch: SFTBatch, batch_idx: int) -> torch.Tensor:
        loss, stats = self.loss(batch)  # 1. forward, 2. loss on assistant tokens
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))  # 3. log
        self.log("train/target_tokens", stats["tokens"].float(), reduce_fx="sum", batch_size=len(batch))
        self._tokens_in_step = int(batch.attention_mask.sum())
        self._target_tokens = self._target_tokens.to(loss.device) + stats["tokens"]
        return (
            loss * stats["tokens"]
        )  # the token sum: on_before_optimizer_step divides by the step's token count

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turn the accumulated gradient of token sums into the gradient of the token mean over the whole step.

        Lightning divides each backward by ``accumulate_grad_batches`` and DDP averages over ranks; multiplying by
        both and dividing by the assistant tokens of every accumulated batch on every rank leaves the exact token
        mean (an all-reduce of one number per optimizer step)."""
        tokens = all_reduce_sum(self._target_tokens.float()).clamp_min(1)
        scale = self.trainer.accumulate_grad_batches * world_size() / tokens
        self._target_tokens = torch.zeros((), device=tokens.device)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale.to(param.grad.device, param.grad.dtype))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            self.log("train/tokens_per_sec", self._tokens_in_step / max(elapsed, 1e-9), prog_bar=True)

    def validation_step(self, batch: SFTBatch, batch_idx: int) -> None:
        loss, stats = self.loss(batch)
        self.val_loss.update(loss, weight=stats["tokens"].float())  # token-weighted over the whole split

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=50.0)))

    def test_step(self, batch: SFTBatch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss.clamp(max=50.0)))

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = self.optimizer_factory(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        )
        scheduler = self.scheduler_factory(optimizer)
        bind_total_steps(scheduler, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
