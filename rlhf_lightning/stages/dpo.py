"""Direct preference optimisation (DPO and its offline relatives) on chosen/rejected pairs.

``training_step``:
    1. split each pair into prompt and reply: the reply tokens are those after the longest common prefix of the
       chosen and rejected rows (:func:`pair_response_mask`),
    2. sequence log-probs of the policy: the sum of reply-token log-probs, chosen and rejected in one forward,
    3. the same for the frozen reference, computed once per pair and cached (no forward after the first epoch),
    4. the loss chosen at construction (``DPOArgs.loss``: sigmoid DPO with optional label smoothing, or IPO),
    5. log ``train/loss``, ``train/reward_chosen``, ``train/reward_rejected``, ``train/margin``, ``train/accuracy``
       (implicit rewards ``beta * (log pi - log pi_ref)``); validation logs the same under ``val/``.

Several data-parallel ranks (each training on its own batches, ``data.sampling``): the loss each step optimises and
every logged value are means over all ranks' pairs, so 2 ranks with batch b train and log as 1 rank with batch 2b
(DESIGN.md); each rank caches the reference log-probs of the pairs it sees, keyed by their tokens.

Models: the policy and its reference both come from ``policy_from`` (an SFT checkpoint, or any stage checkpoint
holding a policy: DPO, PPO) through ``stages.ppo_models.policy_and_reference``: dropout off, the reference frozen; a
LoRA policy merges its SFT adapter and trains a fresh one, the reference being the same network with that adapter
disabled (no second copy). The reference is not stored in this stage's checkpoints (it is rebuilt from
``policy_from``), and the payload is that of a policy (stage ``dpo``, ``backbone_prefix``, ``model_spec``,
tokenizer), so ``generate``, ``export`` and PPO's ``policy_from`` read a DPO checkpoint as they read an SFT one.

Sources: Rafailov et al. 2023 (DPO); Mitchell 2023 (conservative DPO, label smoothing); Azar et al. 2023 (IPO); TRL's
``DPOTrainer`` for the logged quantities.

Choices and deviations:

* ``PreferenceBatch`` carries no prompt length, so the reply starts where the chosen and rejected token sequences
  first differ. A reply prefix the two share (e.g. both start with "I") therefore counts as prompt: its tokens have
  the same log-probs in both rows (same context), so the loss, its gradient and the margin are exactly those of DPO
  over the whole replies; only the two implicit rewards each omit the same shared term.
* Reference log-probs are cached per pair, keyed by a digest of the pair's tokens (the batch has no dataset index),
  when a batch first shows the pair (train or validation), instead of in a pass before training: the values are the
  same, and no extra pass over a DataLoader (whose sampler state resume relies on) is needed. The cache is not
  checkpointed; a resumed run fills it again. ``cache_ref_logprobs=False`` recomputes them in every step.
* Packed preference batches (``PreferenceDataModule(packing=True)``) are refused with ``PackingUnsupportedError``
  before training: the reply masks and the reference-log-prob cache work per padded row.
* Accuracy counts a tie (equal implicit rewards, e.g. the policy before any update) as wrong, as ``RewardModule``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from rlhf_lightning.distributed import global_weighted_means, refuse_device_mesh, world_size
from rlhf_lightning.functional.attention import PackingUnsupportedError
from rlhf_lightning.functional.losses import dpo_loss, ipo_loss
from rlhf_lightning.models.factory import model_spec
from rlhf_lightning.models.lm_head import selected_logprobs
from rlhf_lightning.optim import WarmupCosineLR, bind_total_steps
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_checkpoint, submodule_state
from rlhf_lightning.stages.ppo_models import policy_and_reference
from rlhf_lightning.stages.tokenizer_link import (
    reconcile_tokenizers,
    resolve_tokenizer,
    tokenizer_from_payload,
    tokenizer_payload,
)
from rlhf_lightning.types import PreferenceBatch

_NO_PACKING = (
    "DPO reads padded preference batches (its reply masks and reference cache work per row); set "
    "data.packing=false (packed batches serve SFT and the reward model)"
)

__all__ = ["DPOArgs", "DPOModule", "pair_response_mask", "sequence_logprobs"]

LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {"sigmoid": dpo_loss, "ipo": ipo_loss}
STATS = (
    "loss",
    "accuracy",
    "reward_chosen",
    "reward_rejected",
    "margin",
)  # what every preference loss reports
FROZEN_PREFIX = "reference."  # rebuilt from policy_from: not stored in DPO checkpoints


@dataclass(frozen=True)
class DPOArgs:
    """The preference loss.

    Args:
        loss: ``sigmoid`` (DPO, Rafailov et al. 2023; with ``label_smoothing`` > 0 conservative DPO) or ``ipo``
            (Azar et al. 2023, squared distance of the log-ratio gap to ``1 / (2 beta)``).
        beta: strength of the implicit KL constraint to the reference (IPO's tau); larger stays closer.
        label_smoothing: assumed probability that a preference label is flipped (conservative DPO), in [0, 0.5);
            only with ``loss: sigmoid``.
    """

    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"dpo.loss={self.loss!r}; expected one of {sorted(LOSSES)}")
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta}; expected a positive number")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing}; expected a value in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"dpo.label_smoothing applies to loss 'sigmoid' only, got loss {self.loss!r}")

    def loss_fn(self) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
        """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> (loss, stats)`` with these settings."""
        if self.loss == "sigmoid":
            return partial(dpo_loss, beta=self.beta, label_smoothing=self.label_smoothing)
        return partial(LOSSES[self.loss], beta=self.beta)


# ``--ckpt_path`` hyper-parameters are read with weights_only=True: the frozen dataclass must be an allowed global
torch.serialization.add_safe_globals([DPOArgs])


def pair_response_mask(batch: PreferenceBatch) -> Tensor:
    """(2B, T) bool: True on the reply tokens of each row, i.e. the real tokens after the pair's common prefix.

    Rows ``[0, B)`` are chosen and ``[B, 2B)`` rejected (``PreferenceBatch``); both share one prompt, so the first
    position where the two rows differ is where the replies start (see the module docstring for a shared reply start).
    """
    b = len(batch)
    ids, real = batch.input_ids, batch.attention_mask
    same = (ids[:b] == ids[b:]) & real[:b] & real[b:]  # (B, T)
    shared = same.long().cumprod(dim=1).sum(dim=1)  # (B,) length of the common prefix
    positions = torch.arange(ids.shape[1], device=ids.device)
    return real & (positions[None, :] >= shared.repeat(2)[:, None])


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, chunked: bool = True
) -> Tensor:
    """(N,) sum over each row of the log-probs of its ``response_mask`` tokens under ``model``.

    Shapes: ``input_ids``, ``attention_mask``, ``response_mask`` (N, T). The trunk runs over every row; the LM head
    and log-softmax only over the positions that predict a response token (as ``SFTModule.loss``), a chunk of tokens
    at a time when ``chunked`` and the head is a plain linear (``models.lm_head.selected_logprobs``).
    """
    target = response_mask[:, 1:]  # position t predicts token t + 1
    hidden = model.hidden_states(input_ids, attention_mask)[:, :-1][target]  # (M, D)
    logp = selected_logprobs(model, hidden, input_ids[:, 1:][target], chunked=chunked)  # (M,)
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(target)[target]
    return torch.zeros(len(input_ids), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def pair_keys(batch: PreferenceBatch) -> list[bytes]:
    """B digests, one per pair, of its chosen and rejected real tokens (the reference cache's keys)."""
    b = len(batch)
    ids, lengths = batch.input_ids.cpu(), batch.attention_mask.sum(dim=1).cpu().tolist()

    def tokens(row: int) -> bytes:
        return ids[row, : lengths[row]].numpy().tobytes()

    return [hashlib.blake2b(tokens(i) + b"|" + tokens(b + i), digest_size=16).digest() for i in range(b)]


class DPOModule(LightningModule):
    """Offline preference optimisation of a policy against its frozen reference (numbered steps: module docstring).

    Args:
        policy_from: checkpoint (file or stage folder) of the policy to start from, usually the SFT stage's; it is
            also the frozen reference.
        dpo: the loss and its settings.
        cache_ref_logprobs: compute each pair's reference log-probs once and reuse them (False: every step).
        tokenizer_path: a ``tokenizer.json`` to use when the DataModule provides no tokenizer.
        optimizer: optimizer factory (AdamW by default; set lr and weight decay in the config).
        scheduler: learning-rate schedule factory, stepped every optimizer step (warm-up + cosine by default).
        gradient_checkpointing: recompute the policy's activations in the backward pass (per transformer block) to
            save memory; the frozen reference never keeps activations.
        chunked_logprobs: project the reply positions through the LM head a chunk of tokens at a time, never holding
            the (tokens x vocab) float32 logits (``functional.chunked``; the same values and gradients).
    """

    def __init__(
        self,
        policy_from: str,
        dpo: DPOArgs = DPOArgs(),
        cache_ref_logprobs: bool = True,
        tokenizer_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosineLR,
        gradient_checkpointing: bool = False,
        chunked_logprobs: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.gradient_checkpointing = gradient_checkpointing
        self.chunked_logprobs = chunked_logprobs
        self.policy_from = policy_from
        self.dpo = dpo
        self.loss_fn = dpo.loss_fn()
        self.cache_ref_logprobs = cache_ref_logprobs
        self.tokenizer_path = tokenizer_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.policy: nn.Module | None = None
        self.reference: Any = None
        self.tokenizer = None
        self._ref_cache: dict[bytes, tuple[float, float]] = {}
        self._val_sums = torch.zeros(1 + len(STATS), dtype=torch.float64)

    # -- weights ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the policy and its frozen reference from ``policy_from`` (dropout off)."""
        if self.policy is not None:
            return
        refuse_device_mesh(self.device_mesh, "DPO")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "packing", False) is True:
            raise PackingUnsupportedError(_NO_PACKING)
        checkpoint = load_checkpoint(self.policy_from)
        payload = checkpoint[PAYLOAD_KEY]
        state = submodule_state(
            checkpoint["state_dict"], payload.get("policy_prefix", payload["backbone_prefix"])
        )
        self.policy, self.reference = policy_and_reference(payload["model_spec"], state)
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing = True
        provided = resolve_tokenizer(self, self.tokenizer_path)
        self.tokenizer = reconcile_tokenizers(provided, tokenizer_from_payload(payload), self.policy_from)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen reference; store the payload of a policy checkpoint (as SFT's, stage ``dpo``)."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]
        checkpoint[PAYLOAD_KEY] = {
            "stage": "dpo",
            "backbone_prefix": "policy.",
            "model_spec": model_spec(self.policy),
            **tokenizer_payload(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back the reference weights ``configure_model`` built, so strict loading holds."""
        if self.reference is not None:
            state = checkpoint.setdefault("state_dict", {})
            for key, value in self.state_dict().items():
                if key.startswith(FROZEN_PREFIX):
                    state.setdefault(key, value)

    # -- steps -------------------------------------------------------------------------------------------------------
    def reference_logprobs(self, batch: PreferenceBatch, response_mask: Tensor) -> Tensor:
        """(2B,) reference sequence log-probs, from the cache when every pair of the batch is in it."""
        if not self.cache_ref_logprobs:
            with torch.no_grad():
                return sequence_logprobs(
                    self.reference,
                    batch.input_ids,
                    batch.attention_mask,
                    response_mask,
                    self.chunked_logprobs,
                )
        b, keys = len(batch), pair_keys(batch)
        if any(k not in self._ref_cache for k in keys):
            with torch.no_grad():
                ref = sequence_logprobs(
                    self.reference,
                    batch.input_ids,
                    batch.attention_mask,
                    response_mask,
                    self.chunked_logprobs,
                )
            values = ref.float().cpu().tolist()
            for i, key in enumerate(keys):
                self._ref_cache[key] = (values[i], values[b + i])
        cached = [self._ref_cache[k] for k in keys]
        values = [c for c, _ in cached] + [r for _, r in cached]
        return torch.tensor(values, dtype=torch.float32, device=batch.input_ids.device)

    def loss(self, batch: PreferenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Steps 1-4 of the module docstring: ``(loss, stats)`` of the configured preference loss."""
        if batch.packed:
            raise PackingUnsupportedError(_NO_PACKING)
        b = len(batch)
        response_mask = pair_response_mask(batch)  # 1
        policy = sequence_logprobs(  # 2
            self.policy, batch.input_ids, batch.attention_mask, response_mask, self.chunked_logprobs
        )
        ref = self.reference_logprobs(batch, response_mask).to(policy.dtype)  # 3
        return self.loss_fn(policy[:b], policy[b:], ref[:b], ref[b:])  # 4

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, stats = self.loss(batch)
        pairs = len(batch)
        means, total = global_weighted_means(stats, pairs)  # over every data-parallel rank's pairs
        for key, value in means.items():  # 5
            self.log(f"train/{key}", value, prog_bar=key in ("loss", "accuracy"), batch_size=pairs)
        # DDP averages the ranks' gradients: weighting this rank's pair mean by its share of the step's pairs makes
        # the step the mean over every rank's pairs (ranks hold different numbers in an epoch's short batch);
        # exactly 1 on one process
        return loss * (pairs * world_size() / float(total))

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(1 + len(STATS), dtype=torch.float64)  # pairs, then pair-weighted sums

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        _, stats = self.loss(batch)
        pairs = len(batch)
        values = torch.stack([stats[key].detach().double().cpu() for key in STATS])
        self._val_sums += torch.cat([values.new_tensor([pairs]), values * pairs])

    def on_validation_epoch_end(self) -> None:
        """Log the epoch means over every rank's validation pairs (the same on every rank). Not ``sync_dist``:
        Lightning 2.6 floors the summed batch sizes when averaging them over ranks (pytorch-lightning#21859), which
        inflates every mean when the ranks' pair counts do not add up to a multiple of the world size."""
        pairs, *sums = self._val_sums.unbind()
        local = {key: total / pairs.clamp_min(1) for key, total in zip(STATS, sums)}
        means, total = global_weighted_means(local, int(pairs))
        if total > 0:
            for key, value in means.items():
                self.log(f"val/{key}", value.float(), prog_bar=key == "loss")

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """Two parameter groups of the trainable policy weights (no weight decay on norms and biases), per-step
        schedule."""
        params = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        no_decay = [p for n, p in params if p.ndim < 2 or "norm" in n]
        decay = [p for n, p in params if not (p.ndim < 2 or "norm" in n)]
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        scheduler = self.scheduler_factory(optimizer)
        bind_total_steps(scheduler, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
