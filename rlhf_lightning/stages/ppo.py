"""PPO for language models (RLHF), as a LightningModule with manual optimisation.

One ``training_step`` is one PPO iteration over a batch of ``ppo_batch_size`` prompts:
    1. rollout: sample responses, score them, per-token KL-penalised rewards, GAE, whitened advantages
       (``stages/rollout.py``; no gradients),
    2. update: ``epochs`` passes over shuffled minibatches; each minibatch accumulates gradients over micro-batches,
       clips each network's global gradient norm, and steps the policy and critic optimizers (micro-batch losses
       are weighted by their share of the minibatch's response tokens, so accumulation equals one full minibatch),
    3. adapt the KL coefficient (fixed or adaptive controller),
    4. log everything in the checklist's "What to watch" and, every ``sample_every_n`` iterations, a sample table.

Models: policy (trainable, from the SFT checkpoint), reference (frozen copy of the same checkpoint), reward model
(frozen, from the reward checkpoint), critic (own weights initialised from the reward model, value per token; or a
value head on the policy trunk with ``share_value_trunk``). Dropout is switched off in all of them so that the
first minibatch of an iteration sees ratio == 1 exactly (``stages/ppo_models.py`` loads them). Sampling seeds differ
per data-parallel rank (:func:`rank_seed`); evaluation never moves the running reward statistics.

Cost of an iteration (DESIGN.md "never compute what you can keep"): the rollout runs each network once over the
batch without gradients (policy and reference log-probs, critic values, reward-model scores) and nothing is
recomputed afterwards; a value head on the policy's trunk (``share_value_trunk``) gets its values from the policy's
forward. Each micro-batch of the update runs one trunk forward per trained network (one for both heads when the
trunk is shared; without autograd while only the critic trains), over the columns where its rows have real tokens
(``rollout.trimmed_rows``), with the LM head at the response positions only and log-probs and entropy taken in one
pass over those logits. ``micro_batch_tokens`` / ``forward_batch_tokens`` group rows of similar length so that
micro-batches hold about the same number of padded tokens (``functional/microbatch.py``). Under bf16-mixed the frozen
reward model is stored in bf16; the reference keeps the policy's dtype (KL 0 at the first iteration,
``stages/ppo_models.py``).

Several data-parallel ranks (DESIGN.md "every statistic that normalises or steers is global"): advantage whitening,
the running reward moments, the KL controller's input, the reward calibration and the logged means are reduced over
ranks (``rlhf_lightning/distributed.py``), so every rank keeps the same beta; every rank's generator state is in the
checkpoint. Deviation from Lightning's DDP: the PPO backwards run without DDP's gradient hooks (a step may leave the
policy out, and a minibatch accumulates several backwards) and ``_clip_and_step`` averages gradients over ranks once
per optimizer step.

Sources: Schulman et al. 2017 (PPO); Ziegler et al. 2019 and Ouyang et al. 2022 (RLHF PPO, adaptive KL);
Huang et al. 2024 "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031); Zheng et al. 2023 (PPO-max).
Choices: k1 is the KL penalty in the reward (k1 and k3 are logged); the score is added at the last response token;
a response without EOS gets a fixed score; each network's gradient norm is clipped separately (they have separate
optimizers).

PPO-ptx (``ppo.ptx_coef > 0``, off by default; Ouyang et al. 2022 eq. 2): every policy optimizer step adds
``ptx_coef * sft_loss`` of the policy on the batch's whole ``PromptBatch.ptx`` (the DataModule's ``ptx_path``),
reused by every minibatch of every epoch; it runs in ``micro_batch_size``-row chunks weighted by their share of its
target tokens, so accumulation stays exact. Skipped while only the critic trains; logged as ``ppo/ptx_loss``.

Layout: the networks are loaded in ``stages/ppo_models.py`` and the logged metrics built in ``stages/ppo_metrics.py``;
this file keeps the algorithm.

Deliberate deviation from "override public hooks only": Lightning counts one global step per optimizer step, which
would make ``max_steps``, ``ModelCheckpoint(every_n_train_steps)`` and resume count minibatches. The PPO updates step
the raw optimizers and the module counts one global step per PPO iteration (``_count_iteration``), so every
Lightning mechanism counts iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch.profiler import record_function

from rlhf_lightning.distributed import (
    all_reduce_sum,
    average_gradients,
    clip_grad_norm_,
    global_mean,
    global_rank,
    shard_for_strategy,
    token_mean_scale,
    world_size,
)
from rlhf_lightning.functional.kl import AdaptiveKLController, FixedKLController, kl_k1
from rlhf_lightning.functional.logprobs import logprobs_and_entropy_from_logits
from rlhf_lightning.functional.losses import ppo_policy_loss, ppo_value_loss, sft_loss
from rlhf_lightning.functional.masked import masked_mean
from rlhf_lightning.guards import check_finite
from rlhf_lightning.models.factory import model_spec
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, SetupError
from rlhf_lightning.stages.online import (
    HeldOutJudges,
    backward_unsynced,
    check_full_distribution,
    check_precision,
    count_iteration,
    drop_frozen,
    generator_payload,
    rank_seed,
    restore_frozen,
    restore_generator,
    sampling_generator,
    shuffled_minibatches,
)
from rlhf_lightning.stages.ppo_metrics import SAMPLE_COLUMNS, iteration_metrics, sample_rows, sequence_kl
from rlhf_lightning.stages.ppo_models import cast_frozen_for_precision, load_networks
from rlhf_lightning.stages.rewards import RewardArgs, SequenceScorer, load_reward_function
from rlhf_lightning.stages.rollout import (
    make_rollout,
    response_hidden,
    response_values,
    row_groups,
    shares_trunk,
    trimmed_rows,
)
from rlhf_lightning.stages.sample_tables import log_table
from rlhf_lightning.stages.score_calibration import (
    CalibrationChunk,
    ScoreStats,
    fit_value_head,
    measure_score_stats,
)
from rlhf_lightning.stages.tokenizer_link import resolve_tokenizer, tokenizer_payload
from rlhf_lightning.types import PromptBatch, Rollout, SFTBatch


@dataclass(frozen=True)
class PPOArgs:
    """PPO hyper-parameters.

    Args:
        iterations: PPO iterations to run (one iteration = one rollout batch + its updates).
        epochs: passes over each rollout batch.
        minibatch_size: rollout rows per optimizer step.
        micro_batch_size: rows per forward/backward (gradient accumulation when < minibatch_size; None = minibatch).
        micro_batch_tokens: padded tokens per forward/backward instead: each minibatch's rows are sorted by length
            and grouped so that rows x (longest prompt + longest response) of a micro-batch stays within this
            (a longer row alone), at most ``micro_batch_size`` rows each when that is set too; None = off. The
            micro-batch losses are weighted by their share of the minibatch's response tokens, so the gradient is
            the unsplit minibatch's whatever the split.
        forward_batch_size: rows per no-grad forward during the rollout (None = the whole batch).
        forward_batch_tokens: padded tokens per no-grad forward during the rollout (rows of similar length grouped
            as for ``micro_batch_tokens``, at most ``forward_batch_size`` rows each when that is set); None = off.
        clip_eps: policy ratio clipping epsilon.
        value_clip_eps: value clipping range around the rollout values.
        vf_coef: weight of the value loss.
        entropy_coef: weight of an entropy bonus (0 = off, the default).
        gamma: discount.
        lam: GAE lambda.
        whiten_advantages: normalise advantages over the valid tokens of the batch.
        max_grad_norm: global gradient-norm clip per network (None = off).
        critic_warmup_iterations: first iterations that train only the critic.
        kl_beta: (initial) KL penalty coefficient.
        kl_target: target KL per sequence for the adaptive controller; None keeps beta fixed.
        kl_horizon: horizon of the adaptive controller, in sequences.
        ptx_coef: weight of the SFT loss on the batches' ptx data (PPO-ptx; 0 = off, the default).
    """

    iterations: int = 100
    epochs: int = 4
    minibatch_size: int = 8
    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    forward_batch_size: int | None = None
    forward_batch_tokens: int | None = None
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float | None = 1.0
    critic_warmup_iterations: int = 0
    kl_beta: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    ptx_coef: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 1,
            "epochs": self.epochs >= 1,
            "minibatch_size": self.minibatch_size >= 1,
            "micro_batch_size": self.micro_batch_size is None
            or 1 <= self.micro_batch_size <= self.minibatch_size,
            "micro_batch_tokens": self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
            "forward_batch_size": self.forward_batch_size is None or self.forward_batch_size >= 1,
            "forward_batch_tokens": self.forward_batch_tokens is None or self.forward_batch_tokens >= 1,
            "clip_eps": self.clip_eps > 0,
            "value_clip_eps": self.value_clip_eps > 0,
            "vf_coef": self.vf_coef >= 0,
            "entropy_coef": self.entropy_coef >= 0,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "critic_warmup_iterations": self.critic_warmup_iterations >= 0,
            "kl_beta": self.kl_beta >= 0,
            "kl_target": self.kl_target is None or self.kl_target > 0,
            "kl_horizon": self.kl_horizon > 0,
            "gamma": 0 <= self.gamma <= 1,
            "lam": 0 <= self.lam <= 1,
            "ptx_coef": self.ptx_coef >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid PPO arguments: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


# typed config stored in checkpoint hyper-parameters: loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([PPOArgs])


FROZEN_PREFIXES = ("reference.", "reward_model.")  # networks PPO never trains: not stored in its checkpoints


class PPOModule(LightningModule):
    """RLHF PPO stage (see the module docstring for the numbered steps of ``training_step``).

    Args:
        policy_from: SFT checkpoint (file or stage folder): the policy and the frozen reference.
        reward_from: reward-model checkpoint (file or folder); ``None`` when only reward functions are used.
        value_from: checkpoint whose backbone initialises the critic (default: ``reward_from``, else the policy).
        tokenizer_path: a ``tokenizer.json`` to use when the DataModule provides no tokenizer.
        ppo: PPO hyper-parameters.
        rewards: reward sources and score shaping.
        generation: sampling settings for rollouts (the same temperature is used to recompute log-probs).
        policy_optimizer: optimizer factory for the policy (its lr is the seed's ``ppo_lr_policy``).
        value_optimizer: optimizer factory for the critic (its lr is the seed's ``ppo_lr_value``).
        share_value_trunk: put the value head on the policy's trunk instead of a separate critic (saves memory).
        sample_every_n: log a table of prompts, responses and scores every this many iterations (0 = never).
        eval_max_prompts: held-out prompts scored per validation run.
        seed: seed of the sampling and shuffling generator (offset by the data-parallel rank).
        trust_remote_code: allow Hugging Face backbones that need their folder's own modelling code (only for
            folders you trust; a value stored in a checkpoint is never used).
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
        value_from: str | None = None,
        tokenizer_path: str | None = None,
        ppo: PPOArgs = PPOArgs(),
        rewards: RewardArgs = RewardArgs(),
        generation: GenerationArgs = GenerationArgs(max_new_tokens=64),
        policy_optimizer: OptimizerCallable = torch.optim.AdamW,
        value_optimizer: OptimizerCallable = torch.optim.AdamW,
        share_value_trunk: bool = False,
        sample_every_n: int = 10,
        eval_max_prompts: int = 64,
        seed: int = 0,
        trust_remote_code: bool = False,
        judges: list[str] | None = None,
        judge_models: list[str] | None = None,
    ) -> None:
        super().__init__()
        for spec in rewards.functions:  # a bad "module:function" fails here, before any training
            load_reward_function(spec)
        self.judge_specs = list(judges or [])
        self.judges = HeldOutJudges(self.judge_specs, judge_models or [])
        check_full_distribution(generation, "PPO")
        self.save_hyperparameters(ignore=["policy_optimizer", "value_optimizer"])
        self.automatic_optimization = False
        self.policy_from, self.reward_from = policy_from, reward_from
        self.value_from = value_from or reward_from or policy_from
        self.tokenizer_path = tokenizer_path
        self.ppo, self.rewards, self.generation = ppo, rewards, generation
        self.policy_optimizer_factory, self.value_optimizer_factory = policy_optimizer, value_optimizer
        self.share_value_trunk = share_value_trunk
        self.sample_every_n, self.eval_max_prompts, self.seed = sample_every_n, eval_max_prompts, seed
        self.trust_remote_code = trust_remote_code
        self.policy: torch.nn.Module | None = None
        self.tokenizer = None
        self.kl_controller = (
            FixedKLController(ppo.kl_beta)
            if ppo.kl_target is None
            else AdaptiveKLController(ppo.kl_beta, ppo.kl_target, ppo.kl_horizon)
        )
        self.generator = torch.Generator()
        self._generator_seeded = False
        self.score_stats: ScoreStats | None = None  # reward normalisation measured on the reference policy
        self._restored = False

    # -- weights ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision, "PPO")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        nets = load_networks(
            self.policy_from,
            self.reward_from,
            self.value_from,
            self.share_value_trunk,
            resolve_tokenizer(self, self.tokenizer_path),
            trust_remote_code=self.trust_remote_code,
        )
        self.policy, self.reference, self.tokenizer = nets.policy, nets.reference, nets.tokenizer
        self.reward_model, self.value_model = nets.reward_model, nets.value_model
        # the frozen reward model in bf16 under bf16-mixed (stages/ppo_models.py)
        trainer = getattr(self, "_trainer", None)
        cast_frozen_for_precision(self.reward_model, trainer.precision if trainer is not None else None)
        self.scorer = SequenceScorer(
            self.rewards, self.reward_model, reward_tokenizer=nets.reward_tokenizer, reduce=all_reduce_sum
        )
        self._critic_from_reward_head = nets.critic_from_reward_head
        self.judges.load_models(self.tokenizer, self.trust_remote_code)
        self._shard_trained_networks()
        if self.score_stats is not None:  # restored from a checkpoint before the networks were built
            self.reward_model.set_score_stats(self.score_stats.mean, self.score_stats.std)

    def _shard_trained_networks(self) -> None:
        """Under FSDP2 (a strategy that gives a device mesh): shard the policy and the critic, the two networks that
        train. The frozen reference and reward model stay whole on every rank (each forwards its own rows). Resume
        loads the checkpoint before ``on_load_checkpoint`` can put the frozen networks (left out of checkpoints)
        back, so loading is not strict here."""
        if self.device_mesh is None:
            return
        if self.share_value_trunk:
            raise SetupError(
                "share_value_trunk is not supported under FSDP2: the critic would shard the policy twice"
            )
        shard_for_strategy(self.policy, self.device_mesh)
        # the (1, D) value head stays whole on every rank (no even shards); _clip_and_step averages its gradient
        head = list(self.value_model.head.parameters())
        shard_for_strategy(self.value_model, self.device_mesh, forward_methods=(), replicated=head)
        self.strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen networks are rebuilt from policy_from / reward_from: a checkpoint stores what resume needs
        drop_frozen(checkpoint, FROZEN_PREFIXES)
        checkpoint[PAYLOAD_KEY] = {
            "stage": "ppo",
            "backbone_prefix": "policy.",
            "model_spec": model_spec(self.policy),
            "kl_controller": self.kl_controller.state_dict(),
            "running_scores": self.scorer.running.state_dict(),
            **generator_payload(self.generator),  # every rank's state (a collective)
            "score_stats": self.score_stats.as_dict() if self.score_stats else None,
            **tokenizer_payload(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint[PAYLOAD_KEY]
        if (
            self.policy is not None
        ):  # the frozen networks as configure_model built them (strict loading holds)
            restore_frozen(checkpoint, self, FROZEN_PREFIXES)
        self.kl_controller.load_state_dict(payload["kl_controller"])
        if self.policy is not None:
            self.scorer.running.load_state_dict(payload["running_scores"])
        restore_generator(self.generator, payload)
        self._generator_seeded = True
        self._restored = True  # the critic head is the trained one: never calibrate (and fold) again
        stats = payload.get("score_stats")
        if stats:
            self.score_stats = ScoreStats(**stats)
            if self.policy is not None and self.reward_model is not None:
                self.reward_model.set_score_stats(self.score_stats.mean, self.score_stats.std)

    # -- reward normalisation ----------------------------------------------------------------------------------------
    @property
    def _needs_score_stats(self) -> bool:
        r = self.rewards
        return (
            self.score_stats is None
            and not self._restored
            and getattr(self, "reward_model", None) is not None
            and r.model_weight != 0
            and r.normalize
            and r.calibration_samples > 0
        )

    def _calibrate_from_datamodule(self) -> None:
        """Measure the score statistics on the DataModule's ``calibration_prompts(n)`` (training prompts), if any."""
        source = getattr(getattr(self.trainer, "datamodule", None), "calibration_prompts", None)
        if self._needs_score_stats and callable(source):
            self.calibrate_scores(source(self.rewards.calibration_samples).to(self.device))

    def calibrate_scores(self, prompts: PromptBatch) -> ScoreStats:
        """Sample ``rewards.calibration_samples`` replies from the reference policy for ``prompts``, normalise the
        reward model's scores to mean 0 / std 1 on them and fold the same normalisation into a critic head copied
        from the reward head (``stages/score_calibration.py``). With several data-parallel ranks each samples its
        share of the replies (its own seed and prompts) and all get the statistics of every rank's replies."""
        rank, ranks = global_rank(), world_size()
        share = -(-self.rewards.calibration_samples // ranks)
        chunks: list[CalibrationChunk] = []
        generator = torch.Generator(device=self.device).manual_seed(rank_seed(self.seed + 2**31, rank))
        stats = measure_score_stats(
            self.reference,
            self.scorer,
            self.tokenizer,
            prompts,
            self.generation,
            share,
            generator=generator,
            forward_batch_size=self.ppo.forward_batch_size or 32,
            start=rank * share,
            keep=chunks,
            eos_only=self.rewards.missing_eos_score is not None,
        )
        self.reward_model.set_score_stats(stats.mean, stats.std)
        self.score_stats = stats
        rank_zero_info(
            f"[ppo] reward normalisation from {stats.samples} reference-policy replies: "
            f"mean {stats.mean:+.4g}, std {stats.std:.4g}"
        )
        if self.value_model is not None:  # any critic head: a reward-head copy, or a fresh one
            before, after = fit_value_head(
                self.value_model.head.linear, self.value_model, self.scorer, chunks
            )
            self.critic_fit = (before, after)
            rank_zero_info(
                f"[ppo] critic head refit to the shaped scores of those replies: explained variance "
                f"{before:+.3f} -> {after:+.3f}"
            )
        return stats

    # -- one iteration -----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if not self._generator_seeded:  # different sampling seeds per data-parallel rank
            self.generator.manual_seed(rank_seed(self.seed, self.global_rank))
            self._generator_seeded = True
        # FSDP (and DeepSpeed) restore a checkpoint only after this hook: calibrate in on_train_start there, so that
        # a resumed run takes its statistics and critic head from the checkpoint instead of sampling and refitting
        if not getattr(getattr(self._trainer, "strategy", None), "restore_checkpoint_after_setup", False):
            self._calibrate_from_datamodule()

    def on_train_start(self) -> None:
        self._calibrate_from_datamodule()  # nothing left to do unless the strategy restored after on_fit_start

    def on_validation_start(self) -> None:
        self._calibrate_from_datamodule()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        iteration = self.global_step
        if self._needs_score_stats:  # a DataModule without calibration_prompts(): the first batch's prompts
            self.calibrate_scores(batch)
        ptx = self._ptx_batch(batch)
        rollout, timings = self._rollout(batch)  # 1. rollout
        check_finite(
            "ppo", iteration, raw_score=rollout.raw_scores, score=rollout.scores, advantage=rollout.advantages
        )
        started = time.perf_counter()
        update_policy = iteration >= self.ppo.critic_warmup_iterations
        stats = self._update(rollout, update_policy, ptx)  # 2. PPO epochs over shuffled minibatches
        train_time = time.perf_counter() - started
        # 3. adapt beta from the mean KL and the number of sequences of every data-parallel rank (same beta on all)
        n_sequences = int(all_reduce_sum(torch.tensor(float(len(rollout)))))
        self.kl_controller.update(global_mean(sequence_kl(kl_k1, rollout)), n_steps=n_sequences)
        self._log_iteration(rollout, timings, stats, train_time)  # 4. log
        if self.sample_every_n and iteration % self.sample_every_n == 0:
            self._log_samples(rollout, iteration)
        self._count_iteration()

    def _rollout(
        self, batch: PromptBatch, generator: torch.Generator | None = None, update_running_stats: bool = True
    ) -> tuple[Rollout, Any]:
        self.policy.eval(), self.value_model.eval()
        if generator is None:
            generator = sampling_generator(self.generator, self.device)
        return make_rollout(
            policy=self.policy,
            reference=self.reference,
            value_model=self.value_model,
            scorer=self.scorer,
            tokenizer=self.tokenizer,
            batch=batch,
            generation=self.generation,
            kl_beta=self.kl_controller.value,
            gamma=self.ppo.gamma,
            lam=self.ppo.lam,
            whiten_advantages=self.ppo.whiten_advantages,
            forward_batch_size=self.ppo.forward_batch_size,
            generator=generator,
            update_running_stats=update_running_stats,
            forward_batch_tokens=self.ppo.forward_batch_tokens,
        )

    def _ptx_batch(self, batch: PromptBatch) -> SFTBatch | None:
        if self.ppo.ptx_coef and batch.ptx is None:
            raise ValueError(
                "ppo.ptx_coef > 0 but the batches carry no ptx data: set the DataModule's ptx_path"
            )
        return batch.ptx.to(self.device) if self.ppo.ptx_coef else None

    def _update(
        self, rollout: Rollout, update_policy: bool, ptx: SFTBatch | None = None
    ) -> dict[str, torch.Tensor]:
        policy_opt, value_opt = self.optimizers(use_pl_optimizer=False)
        self.policy.train(), self.value_model.train()  # dropout is 0: train mode changes nothing numerically
        B = len(rollout)
        micro = min(self.ppo.micro_batch_size or self.ppo.minibatch_size, self.ppo.minibatch_size, B)
        history: dict[str, list[torch.Tensor]] = {}
        batches = shuffled_minibatches(
            B, self.ppo.minibatch_size, self.ppo.epochs, self.generator, self.device
        )
        for rows in batches:
            policy_opt.zero_grad(set_to_none=True)
            value_opt.zero_grad(set_to_none=True)
            # every rank's tokens of this minibatch: with average_gradients the step is their token mean
            scale = token_mean_scale(rollout.response_mask[rows].sum())
            for part in self._micro_batches(rollout, rows, micro):
                with record_function("ppo/forward"):
                    loss, stats = self._losses(rollout, part, update_policy)
                # losses are token means: weight each micro-batch by its share of the minibatch's tokens (on
                # every rank), so the accumulated gradient equals the full minibatch's
                with record_function("ppo/backward"):
                    self._backward(loss * rollout.response_mask[part].sum() * scale)
                for key, value in stats.items():
                    history.setdefault(key, []).append(value)
            if ptx is not None and update_policy:
                with record_function("ppo/ptx"):
                    history.setdefault("ptx_loss", []).append(self._ptx_backward(ptx, micro))
            with record_function("ppo/optimizer_step"):
                grad_norms = self._clip_and_step(policy_opt, value_opt, update_policy)
            for key, value in grad_norms.items():
                history.setdefault(key, []).append(value)
        self.policy.eval(), self.value_model.eval()
        return {key: torch.stack(values).mean() for key, values in history.items()}

    def _micro_batches(self, rollout: Rollout, rows: torch.Tensor, micro: int) -> list[torch.Tensor]:
        """The minibatch ``rows`` split for accumulation: by padded tokens (``micro_batch_tokens``, similar lengths
        together) or into chunks of ``micro`` rows."""
        if self.ppo.micro_batch_tokens is None:
            return list(rows.split(micro))
        groups = row_groups(
            rollout.query_mask[rows],
            rollout.response_mask[rows],
            self.ppo.micro_batch_size,
            self.ppo.micro_batch_tokens,
        )
        return [rows[group] for group in groups]

    def _losses(
        self, rollout: Rollout, rows: torch.Tensor, update_policy: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO losses of the rollout's ``rows``, over the columns where one of them has a real token: one trunk
        forward per network (one in all when the value head shares the policy's trunk); the policy's logits, at the
        response positions only, give the log-probs and the entropy in one pass."""
        sequences, mask, P, R = trimmed_rows(
            rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, rows
        )
        response_mask = rollout.response_mask[rows, :R]
        old = {
            name: getattr(rollout, name)[rows, :R] for name in ("values", "returns", "logprobs", "advantages")
        }
        logits = None
        if shares_trunk(self.value_model, self.policy):
            # one trunk forward for both heads; while only the critic trains, the trunk gets no gradient (only the
            # head's optimizer steps), so it runs without autograd
            with torch.set_grad_enabled(update_policy and torch.is_grad_enabled()):
                hidden = response_hidden(self.policy, sequences, mask, P)
            values = self.value_model.head(hidden).float()
            if update_policy:
                logits = self.policy.lm_head(hidden)
        else:
            values = response_values(self.value_model, sequences, mask, P)
            if update_policy:
                logits = self.policy.lm_head(response_hidden(self.policy, sequences, mask, P))
        value_loss, stats = ppo_value_loss(
            values, old["values"], old["returns"], response_mask, self.ppo.value_clip_eps
        )
        loss = self.ppo.vf_coef * value_loss
        if logits is not None:
            logp, token_entropy = logprobs_and_entropy_from_logits(
                logits,
                sequences[:, P:],
                self.generation.temperature,
                entropy_grad=bool(self.ppo.entropy_coef),
            )
            policy_loss, policy_stats = ppo_policy_loss(
                logp, old["logprobs"], old["advantages"], response_mask, self.ppo.clip_eps
            )
            entropy = masked_mean(token_entropy, response_mask)
            loss = loss + policy_loss
            if self.ppo.entropy_coef:
                loss = loss - self.ppo.entropy_coef * entropy
            stats = {**stats, **policy_stats, "entropy": entropy.detach()}
        return loss, stats

    def _ptx_backward(self, ptx: SFTBatch, micro: int) -> torch.Tensor:
        """Backward of ``ptx_coef * sft_loss`` on the ptx batch, equal to one full-batch backward; returns the loss."""
        tokens = ptx.loss_mask[:, 1:].sum().clamp_min(1)
        total = torch.zeros((), device=self.device)
        chunks = (t.split(micro) for t in (ptx.input_ids, ptx.attention_mask, ptx.loss_mask))
        for ids, mask, loss_mask in zip(*chunks):
            loss, _ = sft_loss(self.policy(ids, mask), ids, loss_mask)
            share = loss_mask[:, 1:].sum() / tokens
            self._backward(self.ppo.ptx_coef * loss * share)
            total = total + loss.detach() * share
        return total

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward without DDP's gradient hooks: a step may leave a network out (critic warm-up) and accumulates
        several backwards, which DDP's reducer refuses; :meth:`_clip_and_step` averages the gradients over the
        data-parallel ranks once per optimizer step instead."""
        backward_unsynced(self, loss)

    def _clip_and_step(self, policy_opt, value_opt, update_policy: bool) -> dict[str, torch.Tensor]:
        norms = {}
        groups = [("value", value_opt)] + ([("policy", policy_opt)] if update_policy else [])
        for name, opt in groups:
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            average_gradients(params)  # the mean gradient over data-parallel ranks (DDP's hooks are off)
            if self.ppo.max_grad_norm is not None and params:
                # distributed.clip_grad_norm_: FSDP2-sharded gradients may sit beside plain ones
                norms[f"{name}_grad_norm"] = clip_grad_norm_(params, self.ppo.max_grad_norm)
            opt.step()
        return norms

    def _count_iteration(self) -> None:
        """Advance Lightning's global step by one per PPO iteration (see the module docstring)."""
        count_iteration(self.trainer)

    # -- logging ----------------------------------------------------------------------------------------------------
    def _log_iteration(
        self, rollout: Rollout, timings, stats: dict[str, torch.Tensor], train_time: float
    ) -> None:
        metrics = iteration_metrics(rollout, timings, stats, train_time, self.kl_controller.value)
        self.log_dict(metrics, batch_size=len(rollout), sync_dist=True)  # means over data-parallel ranks
        self.log("score", metrics["rollout/score_mean"], prog_bar=True, logger=False, batch_size=len(rollout))
        self.log("kl", metrics["rollout/kl"], prog_bar=True, logger=False, batch_size=len(rollout))

    def _log_samples(self, rollout: Rollout, iteration: int) -> None:
        log_table(self, "samples/ppo", SAMPLE_COLUMNS, sample_rows(rollout, iteration))

    # -- evaluation on held-out prompts --------------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Reward-model score, KL to the reference and length of responses to held-out prompts (fixed seed)."""
        if batch_idx * len(batch) >= self.eval_max_prompts:  # bound the cost of each evaluation
            return
        generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
        # evaluation must not move the training reward statistics
        rollout, _ = self._rollout(batch, generator=generator, update_running_stats=False)
        mask = rollout.response_mask
        n = len(rollout)
        self.log("val/score", rollout.scores.mean(), batch_size=n, prog_bar=True, sync_dist=True)
        self.log("val/score_normalised", rollout.raw_scores.mean(), batch_size=n, sync_dist=True)
        self.log("val/kl", sequence_kl(kl_k1, rollout).mean(), batch_size=n, sync_dist=True)
        self.log("val/response_len", mask.sum(1).float().mean(), batch_size=n, sync_dist=True)
        self.log("val/eos_rate", rollout.ended_with_eos.float().mean(), batch_size=n, sync_dist=True)
        self.judges.log(self, batch, rollout, sync_dist=True)

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        value_params = (
            list(self.value_model.head.parameters())
            if self.share_value_trunk
            else list(self.value_model.parameters())
        )
        return [
            self.policy_optimizer_factory(self.policy.parameters()),
            self.value_optimizer_factory(value_params),
        ]
