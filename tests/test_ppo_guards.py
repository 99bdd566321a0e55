"""PPO settings that would silently break the algorithm are refused with a clear error, and the logged score names say
what they hold: off-policy sampling (top-k / top-p / greedy), fp16 precision under manual optimisation, right-padded
prompts from a user's DataModule, and the pre-shaping score metric."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.models.generation import GenerationArgs, check_left_padded
from rlhf_lightning.stages.ppo import PPOModule
from rlhf_lightning.stages.ppo_metrics import iteration_metrics
from rlhf_lightning.stages.rollout import make_rollout
from rlhf_lightning.types import PromptBatch, Rollout


def _module(**kwargs) -> PPOModule:
    """Construction reads no checkpoint, so the paths need not exist."""
    return PPOModule(policy_from="unused.ckpt", reward_from="unused.ckpt", **kwargs)


@pytest.mark.parametrize(
    "generation",
    [
        GenerationArgs(max_new_tokens=8, top_k=20),
        GenerationArgs(max_new_tokens=8, top_p=0.9),
        GenerationArgs(max_new_tokens=8, do_sample=False),
    ],
)
def test_ppo_refuses_sampling_that_is_not_the_full_distribution(generation):
    with pytest.raises(ValueError, match=r"off-policy ratios\); use top_k: 0, top_p: 1.0, do_sample: true"):
        _module(generation=generation)


def test_ppo_accepts_full_distribution_sampling_at_any_temperature():
    assert GenerationArgs(max_new_tokens=8, temperature=0.7).samples_full_distribution
    _module(generation=GenerationArgs(max_new_tokens=8, temperature=0.7))


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_ppo_refuses_fp16_precision(precision):
    module = _module()
    module.trainer = SimpleNamespace(precision=precision)  # what Trainer(precision=...) exposes
    with pytest.raises(ValueError, match=f"precision='{precision}'.*GradScaler; use bf16-mixed"):
        module.setup("fit")


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_ppo_accepts_bf16_and_fp32(precision):
    module = _module()
    module.trainer = SimpleNamespace(precision=precision)
    module.setup("fit")


def test_make_rollout_refuses_right_padded_prompts():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)  # row 1 is right-padded
    batch = PromptBatch(
        input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=mask, index=torch.arange(2)
    )
    with pytest.raises(ValueError, match=r"make_rollout: PromptBatch: .*left-padded.* row 1 .*DataModule"):
        make_rollout(  # refused before any network is touched
            policy=None,
            reference=None,
            value_model=None,
            scorer=None,
            tokenizer=None,
            batch=batch,
            generation=GenerationArgs(max_new_tokens=4),
            kl_beta=0.1,
            gamma=1.0,
            lam=0.95,
        )
    check_left_padded(mask[:1])  # left padding (and no padding) passes
    check_left_padded(torch.ones(2, 3, dtype=torch.bool))


def test_pre_shaping_score_is_logged_as_normalised_not_raw():
    B, R = 2, 3
    zeros, mask = torch.zeros(B, R), torch.ones(B, R, dtype=torch.bool)
    rollout = Rollout(
        query_ids=torch.ones(B, 2, dtype=torch.long),
        query_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.ones(B, R, dtype=torch.long),
        response_mask=mask,
        logprobs=zeros,
        ref_logprobs=zeros,
        values=zeros,
        scores=torch.tensor([1.0, -1.0]),
        raw_scores=torch.tensor([3.0, 5.0]),
        rewards=zeros,
        advantages=zeros,
        returns=zeros,
        ended_with_eos=torch.ones(B, dtype=torch.bool),
    )
    timings = SimpleNamespace(generation=1.0, scoring=1.0, generated_tokens=6)
    metrics = iteration_metrics(rollout, timings, {}, 1.0, 0.1)
    assert metrics["rollout/score_normalised_mean"].item() == 4.0
    assert metrics["rollout/score_mean"].item() == 0.0
    assert not any("raw_score" in key for key in metrics)
