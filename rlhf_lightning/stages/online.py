"""Pieces shared by the online RL stages (PPO in ``stages/ppo.py``, GRPO/RLOO in ``stages/grpo.py``).

- :func:`count_iteration`: one Lightning global step per iteration under manual optimisation (the stages step the
  raw optimizers, so ``max_steps``, ``ModelCheckpoint(every_n_train_steps)`` and resume count iterations),
- :func:`rank_seed` and :func:`sampling_generator`: per-rank sampling seeds and a reproducible generator for the
  rollout's device (CPU: the module's own generator; CUDA: a device generator seeded from it);
  :func:`generator_payload` / :func:`restore_generator`: every rank's generator state in the checkpoint, each rank
  resuming its own stream,
- :func:`backward_unsynced`: a backward without DDP's gradient hooks; the stages average gradients themselves once per
  optimizer step (``distributed.average_gradients``), so a step may accumulate several backwards or leave a network
  out,
- :func:`check_precision` and :func:`check_full_distribution`: settings the stages refuse with one clear error,
- :func:`repeat_prompts`, :func:`group_rollout_metrics`, :func:`log_validation`: group sampling (a group stays on the
  rank that loaded its prompt) and what a critic-free stage logs (global over data-parallel ranks),
- :class:`HeldOutJudges`: reward functions and reward models scored on the validation replies beside the optimised
  score but never optimised (``val/judge/<name>``): the optimised score rising while a judge falls is the mark of
  over-optimisation, the policy exploiting its reward,
- :func:`drop_frozen` / :func:`restore_frozen`: checkpoints hold no frozen network (reference, reward model); they are
  rebuilt from ``policy_from`` / ``reward_from`` and put back before strict loading.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.distributed import (
    all_gather_tensors,
    global_masked_moments,
    global_mean,
    global_rank,
    no_backward_sync,
)
from rlhf_lightning.functional.kl import kl_k1, kl_k3
from rlhf_lightning.stages.ppo_metrics import sequence_kl
from rlhf_lightning.stages.rewards import RewardFunction, load_reward_function
from rlhf_lightning.types import PromptBatch, Rollout

# Expected in these stages, so not worth a warning on every run: checkpoints hold the state AFTER each iteration's
# updates (what resume needs), and the frozen reference and reward model stay in eval mode on purpose.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def rank_seed(seed: int, rank: int) -> int:
    """Sampling seed of data-parallel rank ``rank``: ``seed`` on rank 0, a different one on every other rank."""
    return seed + 1000003 * rank


def generator_payload(generator: torch.Generator) -> dict[str, Any]:
    """Checkpoint entries of the sampling generator: ``generator_states`` (one per data-parallel rank, gathered: a
    collective) and ``generator_state`` (rank 0's, what checkpoints held before ``generator_states``)."""
    return {
        "generator_state": generator.get_state(),
        "generator_states": all_gather_tensors(generator.get_state()),
    }


def restore_generator(generator: torch.Generator, payload: dict[str, Any]) -> None:
    """Each rank takes its own saved generator state; a rank the checkpoint has none for (an older checkpoint, or
    more ranks than when it was saved) seeds a stream of its own from rank 0's state, never a copy of it."""
    rank = global_rank()
    states = payload.get("generator_states") or [payload["generator_state"]]
    if rank < len(states):
        generator.set_state(states[rank])
        return
    source = torch.Generator()
    source.set_state(states[0])
    base = int(torch.randint(0, 2**62, (1,), generator=source))
    generator.manual_seed(rank_seed(base, rank))


def backward_unsynced(module: Any, loss: torch.Tensor) -> None:
    """``module.manual_backward(loss)`` with the DDP wrapper's gradient hooks off (nothing differs on one device).

    DDP's reducer refuses several backwards per forward and parameters left out of a step; the online stages
    accumulate micro-batches and call ``distributed.average_gradients`` once per optimizer step instead."""
    trainer = getattr(module, "_trainer", None)
    with no_backward_sync(trainer.strategy.model if trainer is not None else None):
        module.manual_backward(loss)


def count_iteration(trainer: Any) -> None:
    """Advance Lightning's global step by one (call once per iteration of a manually optimised stage)."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def shuffled_minibatches(
    n: int, minibatch_size: int, epochs: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Row indices (long, on ``device``) of every minibatch of an update: ``epochs`` passes, each over a fresh
    permutation of the ``n`` rollout rows drawn from ``generator`` when the pass starts."""
    size = min(minibatch_size, n)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, size):
            yield order[start : start + size]


def sampling_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself on CPU; on another device a generator there seeded from it (runs stay reproducible)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def check_precision(precision: Any, stage: str) -> None:
    """Refuse fp16: manual optimisation steps the raw optimizers, bypassing the GradScaler's unscaling and skips."""
    precision = str(precision)
    if precision.startswith("16"):
        raise ValueError(
            f"{stage} does not support trainer.precision={precision!r}: its manual optimisation bypasses the fp16 "
            "GradScaler; use bf16-mixed (or 32-true)"
        )


def check_full_distribution(generation: Any, stage: str) -> None:
    """Rollout log-probs are those of the full tempered distribution: the tokens must be sampled from it."""
    if not generation.samples_full_distribution:
        raise ValueError(
            f"{stage} samples from the whole distribution: got generation.top_k={generation.top_k}, "
            f"top_p={generation.top_p}, do_sample={generation.do_sample}, whose tokens do not follow the "
            f"log-probs {stage} stores and recomputes (off-policy ratios); use top_k: 0, top_p: 1.0, do_sample: true"
        )


def drop_frozen(checkpoint: dict[str, Any], prefixes: Iterable[str]) -> None:
    """Remove the ``state_dict`` entries of the frozen networks (keys starting with one of ``prefixes``)."""
    prefixes = tuple(prefixes)
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(prefixes)]:
        del state[key]


def restore_frozen(checkpoint: dict[str, Any], module: torch.nn.Module, prefixes: Iterable[str]) -> None:
    """Fill the frozen networks' entries back in from ``module`` as built (so strict loading holds)."""
    prefixes = tuple(prefixes)
    state = checkpoint.setdefault("state_dict", {})
    for key, value in module.state_dict().items():
        if key.startswith(prefixes):
            state.setdefault(key, value)


def repeat_prompts(batch: PromptBatch, k: int) -> PromptBatch:
    """Each prompt ``k`` times in a row: rows ``[g * k, (g + 1) * k)`` are prompt g's group (no ptx data)."""
    return replace(
        batch,
        input_ids=batch.input_ids.repeat_interleave(k, 0),
        attention_mask=batch.attention_mask.repeat_interleave(k, 0),
        index=batch.index.repeat_interleave(k, 0),
        rows=tuple(row for row in batch.rows for _ in range(k)),
        ptx=None,
    )


def _global_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of every entry of ``x`` on every rank."""
    return global_masked_moments(x.float())[1].sqrt()


def group_rollout_metrics(rollout: Rollout, group_size: int) -> dict[str, torch.Tensor]:
    """``rollout/*`` metrics of a rollout of consecutive groups of ``group_size`` replies, over every data-parallel
    rank's replies (collectives: every rank gets the same values, equal to one process holding all the groups).

    The group statistics are per group (a group lives on one rank); only their means over groups are reduced."""
    scores, mask = rollout.scores, rollout.response_mask
    groups = scores.view(-1, group_size)
    sequence_adv = rollout.advantages.sum(1) / mask.sum(1).clamp_min(1)
    return {
        "rollout/score_mean": global_mean(scores),
        "rollout/score_std": _global_std(scores),
        "rollout/score_normalised_mean": global_mean(rollout.raw_scores),
        "rollout/group_score_std": global_mean(groups.std(dim=1)),  # within-group spread: the learning signal
        "rollout/zero_signal_groups": global_mean((groups.amax(1) == groups.amin(1)).float()),
        "rollout/advantage_std": _global_std(sequence_adv),
        "rollout/kl": global_mean(sequence_kl(kl_k1, rollout)),
        "rollout/kl_k3": global_mean(sequence_kl(kl_k3, rollout)),
        "rollout/response_len": global_mean(mask.sum(1).float()),
        "rollout/eos_rate": global_mean(rollout.ended_with_eos.float()),
    }


class HeldOutJudges:
    """An online stage's held-out judges: reward functions ``"package.module:function"`` and reward models (reward
    checkpoint files or stage folders) that score every validation reply beside the optimised score but are never
    optimised. Each is logged as ``val/judge/<name>``: the function's name, or the checkpoint's file or folder name
    (a reward model's score normalised by the statistics stored with it, as PPO sees its own reward model's).

    Built with the stage: a bad function spec, a missing checkpoint or two judges of one name fail then, before any
    training. The reward models load in :meth:`load_models` (the stage's ``configure_model``) and are kept outside the
    module's state, so checkpoints never hold them.
    """

    def __init__(self, functions: Sequence[str] = (), models: Sequence[str] = ()) -> None:
        missing = [str(path) for path in models if not Path(path).exists()]
        if missing:
            raise FileNotFoundError(
                f"judge_models: {missing} not found; expected reward checkpoints or stage folders"
            )
        function_names = [spec.rsplit(":", 1)[-1] for spec in functions]
        model_names = [Path(path).stem if Path(path).is_file() else Path(path).name for path in models]
        names = function_names + model_names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"judges: more than one judge named {repeated}; expected one judge per name")
        self.functions: dict[str, RewardFunction] = {
            name: load_reward_function(spec) for name, spec in zip(function_names, functions)
        }
        self.model_paths = {name: str(path) for name, path in zip(model_names, models)}
        self.scorers: dict[str, Any] = {}

    def load_models(self, policy_tokenizer: Any, trust_remote_code: bool = False) -> None:
        """Load the reward-model judges (once), each with its own tokenizer when it differs from the policy's."""
        from rlhf_lightning.stages.reward import load_reward_model
        from rlhf_lightning.stages.rewards import RewardArgs, SequenceScorer
        from rlhf_lightning.stages.tokenizer_link import same_tokenizer

        # its stored normalisation, nothing else: no clipping, no penalty for a reply without EOS
        args = RewardArgs(clip=None, missing_eos_score=None, calibration_samples=0)
        for name, path in self.model_paths.items():
            if name in self.scorers:
                continue
            model, tokenizer = load_reward_model(path, trust_remote_code=trust_remote_code)
            model.requires_grad_(False)
            other = (
                tokenizer
                if tokenizer is not None and not same_tokenizer(policy_tokenizer, tokenizer)
                else None
            )
            self.scorers[name] = SequenceScorer(args, model, reward_tokenizer=other)

    def log(self, module: Any, batch: PromptBatch, rollout: Rollout, sync_dist: bool = False) -> None:
        """Log each judge's mean score of the validation replies ``rollout`` to ``batch`` as ``val/judge/<name>``;
        functions are called as the optimised ones are, ``fn(prompt, reply, row)``."""
        rows = list(batch.rows) if batch.rows else [{} for _ in rollout.texts]
        prompts = [list(row.get("prompt", [])) for row in rows]
        device = rollout.scores.device
        scores = {}
        for name, fn in self.functions.items():
            values = [
                float(fn(prompt, text, dict(row))) for prompt, text, row in zip(prompts, rollout.texts, rows)
            ]
            scores[name] = torch.tensor(values, device=device)
        if self.model_paths:
            mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
            for name, scorer in self.scorers.items():
                scorer.reward_model.to(device)
                scores[name] = scorer.raw_scores(rollout.sequences, mask, prompts, rollout.texts, rows)
        for name, values in scores.items():
            module.log(
                f"val/judge/{name}", values.float().mean(), batch_size=len(values), sync_dist=sync_dist
            )


def log_validation(module: Any, rollout: Rollout) -> None:
    """Log ``val/score``, ``val/score_normalised``, ``val/kl`` (k1), ``val/response_len``, ``val/eos_rate`` (means
    over the data-parallel ranks)."""
    n = len(rollout)
    log = partial(module.log, batch_size=n, sync_dist=True)
    log("val/score", rollout.scores.mean(), prog_bar=True)
    log("val/score_normalised", rollout.raw_scores.mean())
    log("val/kl", sequence_kl(kl_k1, rollout).mean())
    log("val/response_len", rollout.response_mask.sum(1).float().mean())
    log("val/eos_rate", rollout.ended_with_eos.float().mean())
