"""Reward model: Bradley-Terry training on chosen/rejected pairs.

``training_step``:
    1. score chosen and rejected in one forward (rows [0, B) chosen, [B, 2B) rejected), each read at its last real
       token,
    2. loss ``-log sigmoid(r_chosen - r_rejected - margin)`` (``functional.losses.pairwise_loss``),
    3. log loss, accuracy (torchmetrics), mean chosen and rejected scores and their margin.

Metric keys follow ``<phase>/<quantity>`` (``train/loss``, ``val/accuracy``, ``val/margin``, ...); the training
accuracy is ``reward/accuracy``, the key DESIGN.md names.

Every validation pass also records the mean and standard deviation of the scores of all validation responses (chosen
and rejected) in the reward model's ``score_mean`` / ``score_std`` buffers, so the checkpoint the ModelCheckpoint keeps
carries the statistics of its own weights and PPO can normalise rewards to ~N(0, 1) (Ziegler et al. 2019; Huang et
al. 2024, "reward normalisation"). The scalar head starts small (std 1/sqrt(d+1), bias 0) so early scores sit near 0.

Choices and fixes:

* Accuracy is fed to torchmetrics as ``sigmoid(r_chosen - r_rejected)`` (the Bradley-Terry probability that chosen
  wins) with target 1: raw differences would be read as probabilities whenever a whole batch of them falls in
  [0, 1] (common early on, when scores sit near 0), counting small positive margins as wrong. A tie counts as wrong.
* The training accuracy is logged per step only (``reward/accuracy``); ``val/accuracy`` and ``test/accuracy`` are
  epoch-level over the whole split. Checkpoint on ``val/loss``: accuracy alone is a weak criterion (it ignores
  calibration and saturates).
* Each validation pass logs the ``worst_pairs`` pairs the model gets most wrong (largest ``r_rejected - r_chosen``)
  as a sample table ``samples/reward_worst_pairs`` (``stages.sample_tables``: W&B table, TensorBoard text or CSV);
  the prompt shown is the common prefix of the two token sequences. With several ranks each rank's worst pairs are
  its own and rank zero logs its share.
* Score statistics are reduced as (count, sum, sum of squares) in float64 across ranks, so ranks with uneven
  validation shards still give the exact mean and the unbiased (n - 1) standard deviation of all scores. They are
  measured on the validation replies; PPO may re-measure them on reference-policy samples.
* Shared prompt (``share_prompt``, default on): a padded pair batch runs as B rows ``[prompt | chosen reply |
  rejected reply]`` under a tree-shaped causal mask instead of 2B rows, so the prompt (most of an HH conversation)
  is computed once; exact (tested equal to the 2B-row scores and gradients). With dropout on, the shared prompt
  draws one dropout mask for both replies instead of two (the score difference then sees no prompt-dropout noise).
* Packed batches (``PreferenceDataModule(packing=True)``): the 2B sequences are documents of one padding-free row
  (chosen first, then rejected, as the padded rows), each scored at its own last token; same scores, loss and
  gradients as padded batches.

Sources: Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) for the pairwise loss; margin as in Llama 2
(Touvron et al. 2023).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from rlhf_lightning.distributed import shard_for_strategy
from rlhf_lightning.functional.losses import pairwise_loss
from rlhf_lightning.models.factory import ModelArgs, build_model, model_from_spec, model_spec
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.optim import WarmupCosineLR, bind_total_steps
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_backbone, load_checkpoint, submodule_state
from rlhf_lightning.stages.sample_tables import log_table
from rlhf_lightning.stages.tokenizer_link import (
    reconcile_tokenizers,
    resolve_tokenizer,
    tokenizer_from_payload,
    tokenizer_payload,
)
from rlhf_lightning.types import PreferenceBatch

PREFIX = "reward_model."
WORST_PAIR_COLUMNS = ["prompt", "chosen", "rejected", "r_chosen", "r_rejected", "gap"]

# LightningCLI reads ``--ckpt_path`` hyper-parameters with ``torch.load(weights_only=True)``; ``ModelArgs`` (a frozen
# dataclass of plain values) is among them, so it must be an allowed global or ``test``/``validate`` cannot start.
torch.serialization.add_safe_globals([ModelArgs])


class RewardModule(LightningModule):
    """Pairwise (Bradley-Terry) reward-model training.

    Args:
        init_from: the SFT checkpoint (file or stage folder) whose backbone the reward model starts from; a reward
            checkpoint also works (its head is kept). ``None`` trains from random weights built from ``model``.
        model: architecture when ``init_from`` is ``None`` (its ``gradient_checkpointing`` applies to either).
        tokenizer_path: a ``tokenizer.json`` to use when the DataModule provides no tokenizer.
        optimizer: optimizer factory (AdamW by default).
        scheduler: learning-rate schedule factory, stepped every optimizer step.
        worst_pairs: validation pairs with the largest ``r_rejected - r_chosen`` logged as a table at each
            validation end (0 = none).
        merge_lora: when ``init_from`` is a LoRA model, fold its adapter into the weights and train every weight
            (the usual recipe for a reward model from a pretrained model: full fine-tuning at ~1e-5; Ouyang et al.
            2022, Touvron et al. 2023). False keeps training the SFT adapter with the base frozen.
        share_prompt: run each padded pair as one row whose common prefix (the prompt) is computed once, chosen
            and rejected branching off it under a tree-shaped attention mask (``functional.prefix_sharing``): the
            same scores, loss and gradients with fewer tokens (0.62x on the shipped HH pairs). Applies to padded
            batches on backbones that take a (B, 1, T, T) mask (the built-in GPT; Hugging Face models with sdpa or
            eager attention); anything else runs the two rows as before.
    """

    def __init__(
        self,
        init_from: str | None = None,
        model: ModelArgs = ModelArgs(),
        tokenizer_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosineLR,
        worst_pairs: int = 8,
        merge_lora: bool = False,
        share_prompt: bool = True,
    ) -> None:
        super().__init__()
        if worst_pairs < 0:
            raise ValueError(f"worst_pairs={worst_pairs}; expected 0 (off) or a positive count")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.worst_pairs = worst_pairs
        self.merge_lora = merge_lora
        self.share_prompt = share_prompt
        self._worst: list[tuple[float, float, float, list[int], list[int]]] = []
        self.init_from = init_from
        self.model_args = model
        self.tokenizer_path = tokenizer_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.reward_model: RewardModel | None = None
        self.tokenizer = None
        self.val_accuracy = BinaryAccuracy()
        self.test_accuracy = BinaryAccuracy()
        self.val_loss = MeanMetric()
        self._val_scores: list[torch.Tensor] = []

    # -- weights ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the reward model: from ``init_from`` (SFT backbone + fresh head, or a whole reward model), else a
        fresh ``model`` preset; the tokenizer must match the one stored in ``init_from``."""
        if self.reward_model is not None:
            return
        self.tokenizer = resolve_tokenizer(self, self.tokenizer_path)
        if self.init_from is not None:
            backbone, stored, checkpoint = load_backbone(
                self.init_from, trust_remote_code=self.model_args.trust_remote_code
            )
            self.tokenizer = reconcile_tokenizers(self.tokenizer, stored, self.init_from)
            if self.model_args.gradient_checkpointing:  # the loaded architecture, this run's memory setting
                backbone.gradient_checkpointing = True
            self.reward_model = RewardModel(backbone)
            payload = checkpoint[PAYLOAD_KEY]
            if payload["stage"] == "reward":  # continue from a reward model: keep its head and statistics too
                prefix = payload.get("reward_prefix", PREFIX)
                self.reward_model.load_state_dict(submodule_state(checkpoint["state_dict"], prefix))
            if self.merge_lora and getattr(backbone, "is_lora", False):
                backbone.merge_adapter(fresh=False)  # the same function, every weight now trainable
        elif self.tokenizer is not None:
            self.reward_model = RewardModel(build_model(self.model_args, self.tokenizer.vocab_size))
        if self.reward_model is not None:  # FSDP2 under ModelParallelStrategy, else nothing
            shard_for_strategy(self.reward_model, self.device_mesh, forward_methods=())

    def _model(self) -> RewardModel:
        """The reward model, or a clear error when nothing could build it."""
        if self.reward_model is None:
            raise RuntimeError(
                "RewardModule has no weights: set init_from, give a tokenizer_path, or use a DataModule that "
                "offers a tokenizer (e.g. PreferenceDataModule)"
            )
        return self.reward_model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the self-describing payload: architecture, tokenizer and score statistics."""
        checkpoint[PAYLOAD_KEY] = {
            "stage": "reward",
            "backbone_prefix": PREFIX + "backbone.",
            "reward_prefix": PREFIX,
            "model_spec": model_spec(self._model().backbone),
            "score_mean": float(self._model().score_mean),
            "score_std": float(self._model().score_std),
            **tokenizer_payload(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network from the payload when no Trainer built it (``load_from_checkpoint``)."""
        if self.reward_model is None:
            payload = checkpoint[PAYLOAD_KEY]
            trust = self.model_args.trust_remote_code  # the user's flag, never the checkpoint's
            self.reward_model = RewardModel(model_from_spec(payload["model_spec"], trust_remote_code=trust))
            self.tokenizer = tokenizer_from_payload(payload)

    # -- steps -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        share_prompt: bool = False,
    ) -> torch.Tensor:
        """Raw scores (B,) of right- or left-padded sequences; (D,) of a packed row's documents (``cu_seqlens``);
        ``share_prompt``: the rows are stacked pairs, scored with their common prefix computed once."""
        return self._model()(input_ids, attention_mask, position_ids, cu_seqlens, share_prompt=share_prompt)

    def _pair_step(
        self, batch: PreferenceBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Scores (2B,) of one batch and its Bradley-Terry loss and stats."""
        # 1. one forward for chosen and rejected: (2B,) (packed: one document each, in the same order; shared
        # prompt: one row per pair)
        scores = self(
            batch.input_ids,
            batch.attention_mask,
            batch.position_ids,
            batch.cu_seqlens,
            share_prompt=self.share_prompt and batch.cu_seqlens is None,
        )
        chosen, rejected = scores.chunk(2)
        loss, stats = pairwise_loss(chosen, rejected, batch.margin)  # 2. Bradley-Terry loss
        return loss, stats, scores

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        loss, stats, _ = self._pair_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))  # 3. log
        self.log("reward/accuracy", stats["accuracy"], prog_bar=True, batch_size=len(batch))
        self._log_scores("train", stats, len(batch))
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        loss, stats, scores = self._pair_step(batch)
        self.val_loss.update(loss, weight=len(batch))
        self._update_accuracy(self.val_accuracy, scores)
        self._log_scores("val", stats, len(batch))
        self._val_scores.append(scores.detach().double())
        if self.worst_pairs and not self.trainer.sanity_checking:
            self._keep_worst(batch, scores.detach().float())

    def _keep_worst(self, batch: PreferenceBatch, scores: torch.Tensor) -> None:
        """Keep the token ids of the ``worst_pairs`` pairs with the largest ``r_rejected - r_chosen`` so far."""
        chosen, rejected = scores.chunk(2)
        gaps = rejected - chosen
        B = len(batch)
        floor = self._worst[-1][0] if len(self._worst) >= self.worst_pairs else float("-inf")
        for i in torch.topk(gaps, min(self.worst_pairs, B)).indices.tolist():
            if float(gaps[i]) <= floor:
                break
            ids = [_sequence_ids(batch, j) for j in (i, B + i)]
            self._worst.append((float(gaps[i]), float(chosen[i]), float(rejected[i]), ids[0], ids[1]))
        self._worst = sorted(self._worst, key=lambda w: -w[0])[: self.worst_pairs]

    def _log_worst_pairs(self) -> None:
        """Log the kept pairs as the ``samples/reward_worst_pairs`` table (prompt = common token prefix)."""
        worst, self._worst = self._worst, []
        if not worst or self.tokenizer is None:
            return
        rows = []
        for gap, r_chosen, r_rejected, chosen_ids, rejected_ids in worst:
            cut = 0
            while cut < min(len(chosen_ids), len(rejected_ids)) and chosen_ids[cut] == rejected_ids[cut]:
                cut += 1
            header = getattr(self.tokenizer, "role_ids", {}).get("assistant")
            # replies start after the last assistant header, even when both start with the same word
            if header in chosen_ids[:cut]:
                cut = cut - chosen_ids[:cut][::-1].index(header)
            prompt = self.tokenizer.decode(chosen_ids[:cut], skip_special_tokens=False)  # role tokens kept
            replies = [self.tokenizer.decode(ids[cut:]) for ids in (chosen_ids, rejected_ids)]
            rows.append([prompt[-500:], *replies, r_chosen, r_rejected, gap])
        log_table(self, "samples/reward_worst_pairs", WORST_PAIR_COLUMNS, rows)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.val_accuracy.reset()
        scores = torch.cat(self._val_scores) if self._val_scores else torch.zeros(0, dtype=torch.float64)
        self._val_scores.clear()
        if self.trainer.sanity_checking:
            return
        self._log_worst_pairs()
        moments = torch.stack([scores.new_tensor(float(scores.numel())), scores.sum(), scores.square().sum()])
        n, total, squares = self.all_gather(moments).reshape(-1, 3).sum(0)
        if n < 1:
            return
        mean = total / n
        var = (squares - n * mean.square()) / (n - 1) if n > 1 else torch.ones_like(mean)
        std = var.clamp(min=0).sqrt().clamp(min=1e-6)
        self._model().set_score_stats(mean.float(), std.float())
        self.log("val/score_mean", mean.float())
        self.log("val/score_std", std.float())

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        loss, stats, scores = self._pair_step(batch)
        self.log("test/loss", loss, batch_size=len(batch))
        self._update_accuracy(self.test_accuracy, scores)
        self.log("test/accuracy", self.test_accuracy, on_epoch=True, batch_size=len(batch))
        self._log_scores("test", stats, len(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Raw scores (B,) of a batch with ``input_ids`` and ``attention_mask`` (e.g. conversations to score)."""
        return self(batch.input_ids, batch.attention_mask)

    @staticmethod
    def _update_accuracy(metric: BinaryAccuracy, scores: torch.Tensor) -> None:
        """Count pairs with r_chosen > r_rejected: preds = sigmoid(r_c - r_r) in (0, 1), target 1."""
        chosen, rejected = scores.detach().float().chunk(2)
        metric.update(torch.sigmoid(chosen - rejected), torch.ones_like(chosen, dtype=torch.long))

    def _log_scores(self, phase: str, stats: dict[str, torch.Tensor], batch_size: int) -> None:
        """Mean chosen and rejected scores and their mean difference."""
        self.log(f"{phase}/chosen_score", stats["chosen_mean"], batch_size=batch_size)
        self.log(f"{phase}/rejected_score", stats["rejected_mean"], batch_size=batch_size)
        self.log(f"{phase}/margin", stats["margin_mean"], batch_size=batch_size)

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """Two parameter groups (no weight decay on norms and biases) and a per-step schedule."""
        decay, no_decay = [], []
        for name, param in self._model().named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        scheduler = self.scheduler_factory(optimizer)
        bind_total_steps(scheduler, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _sequence_ids(batch: PreferenceBatch, j: int) -> list[int]:
    """The real token ids of sequence ``j`` (row ``j``, or document ``j`` of a packed row)."""
    if batch.cu_seqlens is not None:
        start, end = int(batch.cu_seqlens[j]), int(batch.cu_seqlens[j + 1])
        return batch.input_ids[0, start:end].tolist()
    return batch.input_ids[j][batch.attention_mask[j]].tolist()


def reward_model_from_checkpoint(
    checkpoint: dict[str, Any],
    where: str,
    build: Callable[[dict[str, Any]], torch.nn.Module] = model_from_spec,
) -> RewardModel:
    """The reward model (with its score statistics) stored in a loaded reward ``checkpoint`` (named ``where`` in
    errors); ``build`` turns the stored model spec into a backbone (PPO passes one that switches dropout off)."""
    payload = checkpoint[PAYLOAD_KEY]
    if payload["stage"] != "reward":
        raise ValueError(f"{where}: a '{payload['stage']}' checkpoint; expected a reward-model checkpoint")
    model = RewardModel(build(payload["model_spec"]))
    model.load_state_dict(submodule_state(checkpoint["state_dict"], payload["reward_prefix"]))
    return model


def load_reward_model(path: str, *, trust_remote_code: bool = False) -> tuple[RewardModel, Any]:
    """The reward model (with its score statistics) and tokenizer stored in a reward checkpoint; ``trust_remote_code``
    is the user's own flag for a Hugging Face backbone that needs its folder's code."""
    checkpoint = load_checkpoint(path)
    build = functools.partial(model_from_spec, trust_remote_code=trust_remote_code)
    model = reward_model_from_checkpoint(checkpoint, path, build)
    return model.eval(), tokenizer_from_payload(checkpoint[PAYLOAD_KEY])
