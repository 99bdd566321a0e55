"""GRPO, Dr. GRPO and RLOO: critic-free online RL (e.g. with verifiable rewards), as one LightningModule.

Where this differs from PPO (``stages/ppo.py``):
    * no critic and no GAE: each prompt is sampled ``group_size`` times (its group; the batch's prompts are repeated
      on the rank that loaded them, so a group never spans ranks), and every token of a reply gets the reply's
      sequence advantage computed from its group's scores (``functional/advantages.group_advantages``):
        ``grpo``     (s - mean_g) / (std_g + eps)         Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300
        ``dr_grpo``  s - mean_g                           Liu et al. 2025, "Dr. GRPO", arXiv 2503.20783
        ``rloo``     s - mean of the other k - 1 scores   Ahmadian et al. 2024, arXiv 2402.14740
    * the KL to the reference is a loss term ``kl_coef * k3`` per token (GRPO), or with ``kl_in_reward``
      ``-kl_coef * sum_t k1`` is added to each score before the baseline (RLOO); no adaptive controller,
    * the loss aggregation over tokens (``loss_aggregation``): ``token_mean`` (every valid token of the minibatch
      weighs the same), ``sequence_mean`` (mean per reply, then over replies: GRPO's paper) or ``token_sum`` (sum
      per reply over the constant ``max_new_tokens``: no length normalisation, Dr. GRPO; the whole reply's
      log-prob, RLOO). ``None`` picks the baseline's own: grpo -> sequence_mean, dr_grpo and rloo -> token_sum.
      Implemented with PPO's ``ppo_policy_loss`` by scaling each row's advantage by a positive weight (the clipped
      max commutes with it), which also keeps micro-batch accumulation exact.

Same as PPO: sampling, EOS, padding and temperature rules and the scoring (``rollout.sample_and_score``), the networks
(``ppo_models.load_networks`` without critic: LoRA-aware policy + reference, optional frozen reward model), reward
functions and score shaping (``RewardArgs``), the clipped ratio over ``epochs`` passes of shuffled minibatches,
manual optimisation with one global step per iteration, and a checkpoint without the frozen networks
(``stages/online.py``). Reward-model scores are normalised with the reward stage's stored statistics (no
calibration run: the group baselines centre the scores anyway).

Several data-parallel ranks (DDP): each rank samples the groups of the prompts it loaded, with its own generator
(every rank's state is in the checkpoint), so group statistics never need another rank; what spans the minibatch is
global: :func:`row_weights` counts the tokens and replies of every rank, the backwards run without DDP's hooks and the
gradients are averaged once per optimizer step (as PPO), so two ranks with b prompts step as one rank with 2b. The
logged rollout metrics and running score moments are reduced over ranks; update statistics are means over ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from rlhf_lightning.distributed import all_reduce_sum, average_gradients, refuse_device_mesh, world_size
from rlhf_lightning.functional.advantages import BASELINES, group_advantages
from rlhf_lightning.functional.kl import kl_k1, kl_k3
from rlhf_lightning.functional.losses import ppo_policy_loss
from rlhf_lightning.functional.masked import masked_mean
from rlhf_lightning.guards import check_finite
from rlhf_lightning.models.factory import model_spec
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages import online
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY
from rlhf_lightning.stages.online import group_rollout_metrics, log_validation, repeat_prompts
from rlhf_lightning.stages.ppo_metrics import SAMPLE_COLUMNS, sample_rows, sequence_kl
from rlhf_lightning.stages.ppo_models import load_networks
from rlhf_lightning.stages.rewards import RewardArgs, SequenceScorer, load_reward_function
from rlhf_lightning.stages.rollout import response_logprobs_of, sample_and_score, shared_response_logprobs
from rlhf_lightning.stages.sample_tables import log_table
from rlhf_lightning.stages.tokenizer_link import resolve_tokenizer, tokenizer_payload
from rlhf_lightning.types import PromptBatch, Rollout

AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum")
DEFAULT_AGGREGATION = {"grpo": "sequence_mean", "dr_grpo": "token_sum", "rloo": "token_sum"}
FROZEN_PREFIXES = ("reference.", "reward_model.")  # never trained: not stored in checkpoints


@dataclass(frozen=True)
class GRPOArgs:
    """GRPO / Dr. GRPO / RLOO hyper-parameters (see the module docstring).

    Args:
        iterations: iterations to run (one iteration = one batch of prompts, ``group_size`` replies each + updates).
        group_size: replies sampled per prompt (k >= 2).
        baseline: ``grpo``, ``dr_grpo`` or ``rloo``.
        epochs: passes over each rollout batch (1 = on-policy; > 1 makes the ratio clipping matter).
        minibatch_size: replies per optimizer step.
        micro_batch_size: replies per forward/backward (gradient accumulation when < minibatch_size; None = all).
        forward_batch_size: rows per no-grad forward during the rollout (None = the whole batch).
        clip_eps: policy ratio clipping epsilon.
        kl_coef: weight of the KL to the reference (loss term, or in the reward with ``kl_in_reward``).
        kl_in_reward: subtract ``kl_coef * sum k1`` from each score instead of adding a k3 loss term.
        loss_aggregation: ``token_mean``, ``sequence_mean``, ``token_sum`` or None (the baseline's own).
        max_grad_norm: global gradient-norm clip of the policy (None = off).
    """

    iterations: int = 100
    group_size: int = 4
    baseline: str = "grpo"
    epochs: int = 1
    minibatch_size: int = 16
    micro_batch_size: int | None = None
    forward_batch_size: int | None = None
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    kl_in_reward: bool = False
    loss_aggregation: str | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 1,
            "group_size": self.group_size >= 2,
            "baseline": self.baseline in BASELINES,
            "epochs": self.epochs >= 1,
            "minibatch_size": self.minibatch_size >= 1,
            "micro_batch_size": self.micro_batch_size is None
            or 1 <= self.micro_batch_size <= self.minibatch_size,
            "forward_batch_size": self.forward_batch_size is None or self.forward_batch_size >= 1,
            "clip_eps": self.clip_eps > 0,
            "kl_coef": self.kl_coef >= 0,
            "loss_aggregation": self.loss_aggregation is None or self.loss_aggregation in AGGREGATIONS,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid GRPO arguments: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} (baseline: "
                f"{'|'.join(BASELINES)}; loss_aggregation: {'|'.join(AGGREGATIONS)}; group_size >= 2)"
            )

    @property
    def aggregation(self) -> str:
        return self.loss_aggregation or DEFAULT_AGGREGATION[self.baseline]


torch.serialization.add_safe_globals([GRPOArgs])  # typed config in checkpoint hyper-parameters


def row_weights(response_mask: torch.Tensor, aggregation: str, max_new_tokens: int) -> torch.Tensor:
    """Per-reply weights (b,) so that a minibatch's loss is ``sum_i w_i * sum_t loss_it`` over its valid tokens.

    The token and reply counts are those of the minibatch on every data-parallel rank (a collective), scaled by the
    number of ranks: the mean over ranks of each rank's weighted loss (``average_gradients``) is the aggregation over
    all of the minibatch's replies, even when the ranks' replies have different lengths. One process: plain counts.
    """
    lengths = response_mask.sum(1).clamp_min(1).float()
    tokens, n = all_reduce_sum(torch.stack([lengths.sum(), lengths.new_tensor(float(len(lengths)))])).unbind()
    scale = torch.full_like(lengths, float(world_size()))
    if aggregation == "token_mean":
        return scale / tokens
    if aggregation == "sequence_mean":
        return scale / (n * lengths)
    return scale / (n * max_new_tokens)  # token_sum


class GRPOModule(LightningModule):
    """Critic-free online RL stage: GRPO, Dr. GRPO or RLOO (``grpo.baseline``; see the module docstring).

    Args:
        policy_from: SFT (or PPO/GRPO) checkpoint, file or stage folder: the policy and the frozen reference.
        reward_from: reward-model checkpoint; ``None`` when only reward functions are used.
        tokenizer_path: a ``tokenizer.json`` to use when the DataModule provides no tokenizer.
        grpo: algorithm hyper-parameters.
        rewards: reward sources and score shaping (``rewards.calibration_samples`` is not used).
        generation: sampling settings (the same temperature recomputes log-probs).
        optimizer: optimizer factory for the policy.
        sample_every_n: log a table of prompts, responses and scores every this many iterations (0 = never).
        eval_max_prompts: held-out prompts scored per validation run (one reply each).
        seed: seed of the sampling and shuffling generator (offset by the data-parallel rank).
        judges: held-out judges, reward functions ``"package.module:function"`` scored on the validation replies and
            logged as ``val/judge/<name>`` beside ``val/score`` (and plotted next to it), never optimised: the
            optimised score rising while a judge falls is the mark of over-optimisation.
        judge_models: held-out reward models (reward checkpoints or stage folders, e.g. one trained on other
            preference data) judging the same way, as ``val/judge/<file or folder name>`` (``online.HeldOutJudges``).
    """

    def __init__(
        self,
        policy_from: str,
        reward_from: str | None = None,
        tokenizer_path: str | None = None,
        grpo: GRPOArgs = GRPOArgs(),
        rewards: RewardArgs = RewardArgs(),
        generation: GenerationArgs = GenerationArgs(max_new_tokens=64),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        sample_every_n: int = 10,
        eval_max_prompts: int = 64,
        seed: int = 0,
        judges: list[str] | None = None,
        judge_models: list[str] | None = None,
    ) -> None:
        super().__init__()
        for spec in rewards.functions:  # a bad "module:function" fails here, before any training
            load_reward_function(spec)
        self.judge_specs = list(judges or [])
        self.judges = online.HeldOutJudges(self.judge_specs, judge_models or [])
        online.check_full_distribution(generation, "GRPO")
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False
        self.policy_from, self.reward_from, self.tokenizer_path = policy_from, reward_from, tokenizer_path
        self.grpo, self.rewards, self.generation = grpo, rewards, generation
        self.optimizer_factory = optimizer
        self.sample_every_n, self.eval_max_prompts, self.seed = sample_every_n, eval_max_prompts, seed
        self.policy: torch.nn.Module | None = None
        self.tokenizer = None
        self.generator = torch.Generator()
        self._generator_seeded = False

    def setup(self, stage: str) -> None:
        online.check_precision(self.trainer.precision, "GRPO")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        refuse_device_mesh(self.device_mesh, "GRPO/RLOO")
        tokenizer = resolve_tokenizer(self, self.tokenizer_path)
        nets = load_networks(self.policy_from, self.reward_from, None, False, tokenizer)  # no critic
        self.policy, self.reference, self.tokenizer = nets.policy, nets.reference, nets.tokenizer
        self.reward_model = nets.reward_model
        self.scorer = SequenceScorer(
            self.rewards, self.reward_model, reward_tokenizer=nets.reward_tokenizer, reduce=all_reduce_sum
        )
        self.judges.load_models(self.tokenizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        online.drop_frozen(checkpoint, FROZEN_PREFIXES)
        checkpoint[PAYLOAD_KEY] = {
            "stage": "grpo",
            "backbone_prefix": "policy.",
            "model_spec": model_spec(self.policy),
            "running_scores": self.scorer.running.state_dict(),
            **online.generator_payload(self.generator),  # every rank's state (a collective)
            **tokenizer_payload(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint[PAYLOAD_KEY]
        if (
            self.policy is not None
        ):  # the frozen networks as configure_model built them (strict loading holds)
            online.restore_frozen(checkpoint, self, FROZEN_PREFIXES)
            self.scorer.running.load_state_dict(payload["running_scores"])
        online.restore_generator(self.generator, payload)
        self._generator_seeded = True

    def on_fit_start(self) -> None:
        if not self._generator_seeded:  # different sampling seeds per data-parallel rank
            self.generator.manual_seed(online.rank_seed(self.seed, self.global_rank))
            self._generator_seeded = True

    # -- one iteration -----------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Rollout]:
        """One iteration; returns ``{"rollout": rollout}`` for callbacks (``on_train_batch_end``'s ``outputs``)."""
        iteration = self.global_step
        rollout, timings = self._rollout(batch)  # 1. groups of replies, scores, group advantages
        check_finite("grpo", iteration, score=rollout.scores, advantage=rollout.advantages)
        started = time.perf_counter()
        stats = self._update(rollout)  # 2. clipped-ratio epochs over shuffled minibatches
        self._log_iteration(rollout, timings, stats, time.perf_counter() - started)  # 3. log
        if self.sample_every_n and iteration % self.sample_every_n == 0:
            log_table(self, "samples/grpo", SAMPLE_COLUMNS, sample_rows(rollout, iteration))
        online.count_iteration(self.trainer)
        return {"rollout": rollout}

    def _sample(self, batch: PromptBatch, generator=None, update_running_stats: bool = True):
        self.policy.eval()
        return sample_and_score(
            policy=self.policy,
            reference=self.reference,
            scorer=self.scorer,
            tokenizer=self.tokenizer,
            batch=batch,
            generation=self.generation,
            forward_batch_size=self.grpo.forward_batch_size,
            generator=generator or online.sampling_generator(self.generator, self.device),
            update_running_stats=update_running_stats,
            share_prompts=True,
        )

    def _rollout(self, batch: PromptBatch) -> tuple[Rollout, Any]:
        """``group_size`` replies per prompt; each reply's group advantage on every one of its valid tokens."""
        rollout, timings = self._sample(repeat_prompts(batch, self.grpo.group_size))
        return with_group_advantages(rollout, self.grpo), timings

    def _update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        opt = self.optimizers(use_pl_optimizer=False)
        self.policy.train()  # dropout is 0: train mode changes nothing numerically
        B = len(rollout)
        micro = min(self.grpo.micro_batch_size or self.grpo.minibatch_size, self.grpo.minibatch_size, B)
        history: dict[str, list[torch.Tensor]] = {}
        g = self.grpo
        for rows in online.shuffled_minibatches(B, g.minibatch_size, g.epochs, self.generator, self.device):
            opt.zero_grad(set_to_none=True)
            weights = row_weights(
                rollout.response_mask[rows], self.grpo.aggregation, self.generation.max_new_tokens
            )
            total = torch.zeros((), device=self.device)
            for m in range(0, len(rows), micro):  # the micro losses add up to the minibatch's loss
                loss, stats = self.loss(rollout, rows[m : m + micro], weights[m : m + micro])
                online.backward_unsynced(self, loss)
                total = total + loss.detach()
                for key, value in stats.items():
                    history.setdefault(key, []).append(value)
            history.setdefault("loss", []).append(total)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            average_gradients(params)  # the mean over data-parallel ranks (DDP's hooks are off)
            if self.grpo.max_grad_norm is not None and params:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grpo.max_grad_norm)
                history.setdefault("grad_norm", []).append(norm)
            opt.step()
        self.policy.eval()
        return {key: torch.stack(values).mean() for key, values in history.items()}

    def loss(
        self, rollout: Rollout, rows: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sum_i w_i sum_t [clipped surrogate + kl_coef * k3]`` over valid tokens of ``rows`` (the weights from
        :func:`row_weights`); stats are token means of the rows."""
        response_mask = rollout.response_mask[rows]
        # each prompt once for all its replies in the minibatch when the policy allows it (same log-probs)
        logp = shared_response_logprobs(
            self.policy,
            rollout.query_ids[rows],
            rollout.query_mask[rows],
            rollout.response_ids[rows],
            response_mask,
            self.generation.temperature,
        )
        if logp is None:
            sequences, mask = rollout.sequences[rows], rollout.sequence_mask[rows]
            P = rollout.query_ids.shape[1]
            logp = response_logprobs_of(self.policy, sequences, mask, P, self.generation.temperature)
        # masked_mean(x * scale) == sum_i w_i sum_t x_it; a positive scale commutes with the clipped max
        scale = (weights * response_mask.sum()).unsqueeze(1)
        loss, stats = ppo_policy_loss(
            logp, rollout.logprobs[rows], rollout.advantages[rows] * scale, response_mask, self.grpo.clip_eps
        )
        stats["policy_loss"] = loss.detach()
        kl = kl_k3(logp, rollout.ref_logprobs[rows])
        if self.grpo.kl_coef and not self.grpo.kl_in_reward:
            loss = loss + self.grpo.kl_coef * masked_mean(kl * scale, response_mask)
        return loss, {**stats, "kl": masked_mean(kl.detach(), response_mask)}

    # -- logging and evaluation ----------------------------------------------------------------------------------------
    def _log_iteration(
        self, rollout: Rollout, timings, stats: dict[str, torch.Tensor], train_time: float
    ) -> None:
        n = len(rollout)
        metrics = group_rollout_metrics(rollout, self.grpo.group_size)  # global already
        self.log_dict(metrics, batch_size=n)
        local = {f"grpo/{key}": value for key, value in stats.items()}
        local.update(
            {
                "time/generation": torch.tensor(timings.generation),
                "time/scoring": torch.tensor(timings.scoring),
                "time/training": torch.tensor(train_time),
            }
        )
        self.log_dict(local, batch_size=n, sync_dist=True)  # means over data-parallel ranks
        self.log("score", metrics["rollout/score_mean"], prog_bar=True, logger=False, batch_size=n)
        self.log("kl", metrics["rollout/kl"], prog_bar=True, logger=False, batch_size=n)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Score, KL to the reference and length of one reply per held-out prompt (fixed seed, stats untouched)."""
        if batch_idx * len(batch) >= self.eval_max_prompts:
            return
        generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        rollout, _ = self._sample(batch, generator=generator, update_running_stats=False)
        log_validation(self, rollout)
        self.judges.log(self, batch, rollout)

    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.parameters())


def with_group_advantages(rollout: Rollout, args: GRPOArgs) -> Rollout:
    """The rollout with ``advantages`` (B, R): each reply's group advantage on its valid tokens, 0 on padding.

    With ``kl_in_reward`` the scores first lose ``kl_coef * sum_t k1``. ``values``, ``rewards`` and ``returns``
    stay 0 (no critic, no per-token rewards).
    """
    scores = rollout.scores
    if args.kl_in_reward and args.kl_coef:
        scores = scores - args.kl_coef * sequence_kl(kl_k1, rollout)
    advantages = group_advantages(scores, args.group_size, args.baseline)
    mask = rollout.response_mask
    return replace(rollout, advantages=advantages.unsqueeze(1) * mask.to(advantages.dtype))
