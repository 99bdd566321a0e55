"""GRPO / RLOO stage on CPU with the tiny preset: group layout, hand-worked loss, learning, resume, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_ppo_checklist import reward_checkpoint  # noqa: F401 (module-scoped fixture)
from test_ppo_stage import _prompt_module, _Recorder, sft_checkpoint  # noqa: F401 (module-scoped fixture)
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.functional.kl import kl_k3
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY
from rlhf_lightning.stages.grpo import (
    GRPOArgs,
    GRPOModule,
    repeat_prompts,
    row_weights,
    with_group_advantages,
)
from rlhf_lightning.stages.rollout import response_logprobs_of
from rlhf_lightning.types import PromptBatch, Rollout

BREVITY = dict(model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"], clip=None)


def _grpo(sft: str, tokenizer_path: str, lr: float = 1e-3, **grpo) -> GRPOModule:
    from rlhf_lightning.stages.rewards import RewardArgs

    args = dict(iterations=4, group_size=4, epochs=2, minibatch_size=8, kl_coef=0.02)
    module = GRPOModule(
        policy_from=sft,
        tokenizer_path=tokenizer_path,
        grpo=GRPOArgs(**{**args, **grpo}),
        rewards=RewardArgs(**BREVITY),
        generation=GenerationArgs(max_new_tokens=16),
        sample_every_n=0,
    )
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=lr)
    return module


def test_repeat_prompts_puts_each_group_on_consecutive_rows():
    batch = PromptBatch(
        input_ids=torch.tensor([[0, 5], [6, 7]]),
        attention_mask=torch.tensor([[False, True], [True, True]]),
        index=torch.tensor([10, 11]),
        rows=({"answer": "a"}, {"answer": "b"}),
    )
    out = repeat_prompts(batch, 3)
    assert out.index.tolist() == [10, 10, 10, 11, 11, 11]
    assert out.input_ids[:3].eq(batch.input_ids[0]).all() and out.input_ids[3:].eq(batch.input_ids[1]).all()
    assert [r["answer"] for r in out.rows] == ["a"] * 3 + ["b"] * 3


def _hand_rollout(scores: list[float], lengths: list[int], R: int = 4) -> Rollout:
    B = len(scores)
    mask = torch.arange(R).expand(B, R) < torch.tensor(lengths).unsqueeze(1)
    zeros = torch.zeros(B, R)
    return Rollout(
        query_ids=torch.ones(B, 2, dtype=torch.long),
        query_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.where(mask, 3, 0),
        response_mask=mask,
        logprobs=zeros,
        ref_logprobs=zeros,
        values=zeros,
        scores=torch.tensor(scores),
        raw_scores=torch.tensor(scores),
        rewards=zeros,
        advantages=zeros,
        returns=zeros,
        ended_with_eos=torch.ones(B, dtype=torch.bool),
    )


def test_group_advantages_fill_valid_tokens_of_each_reply_by_hand():
    rollout = _hand_rollout([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4, 4, 3, 2, 1])
    rloo = with_group_advantages(rollout, GRPOArgs(group_size=4, baseline="rloo")).advantages
    # group 1: 1 - 0 = 1 and 0 - 1/3; group 2 (all equal): no signal at all
    assert rloo[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert rloo[1].tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0, 0.0])
    assert torch.all(rloo[4:] == 0)
    dr = with_group_advantages(rollout, GRPOArgs(group_size=4, baseline="dr_grpo")).advantages
    assert dr[0, 0].item() == 0.75 and dr[3].tolist() == [-0.25] * 4
    grpo = with_group_advantages(rollout, GRPOArgs(group_size=4, baseline="grpo")).advantages
    assert grpo[0, 0].item() == pytest.approx(0.75 / 0.5, rel=1e-5)  # unbiased std of (1, 0, 0, 0) = 0.5
    # KL in the reward: the reply's summed k1 leaves its score before the baseline
    kl_rollout = _hand_rollout([0.0, 0.0], [2, 1])
    kl_rollout = Rollout(**{**kl_rollout.__dict__, "logprobs": torch.full((2, 4), 0.5)})
    adv = with_group_advantages(
        kl_rollout, GRPOArgs(group_size=2, baseline="rloo", kl_in_reward=True, kl_coef=0.1)
    )
    assert adv.advantages[0, 0].item() == pytest.approx(-0.1 * (1.0 - 0.5))  # -0.1 * (2 - 1) * 0.5 k1


@pytest.mark.parametrize(
    "aggregation, expected",
    [  # rows: lengths 3 and 1, advantages +1 and -1, ratio 1 -> per-token surrogate -A
        ("token_mean", -(3 * 1 - 1 * 1) / 4),
        ("sequence_mean", -(1 - 1) / 2),
        ("token_sum", -(3 - 1) / (2 * 16)),  # / (replies * max_new_tokens)
    ],
)
def test_loss_on_a_hand_built_rollout(sft_checkpoint, tiny_tokenizer, aggregation, expected):  # noqa: F811
    module = _grpo(sft_checkpoint, tiny_tokenizer.source, loss_aggregation=aggregation, kl_coef=0.0)
    module.configure_model()
    rollout = _hand_rollout([0.0, 0.0], [3, 1])
    rollout = Rollout(**{**rollout.__dict__, "response_ids": torch.where(rollout.response_mask, 40, 0)})
    P = rollout.query_ids.shape[1]
    with torch.no_grad():
        logp = response_logprobs_of(module.policy, rollout.sequences, rollout.sequence_mask, P, 1.0)
    adv = torch.tensor([[1.0], [-1.0]]) * rollout.response_mask
    rollout = Rollout(**{**rollout.__dict__, "logprobs": logp, "ref_logprobs": logp, "advantages": adv})
    rows = torch.arange(2)
    weights = row_weights(rollout.response_mask, aggregation, 16)
    loss, stats = module.loss(rollout, rows, weights)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    # micro-batches add up to the minibatch: row by row gives the same loss
    parts = sum(module.loss(rollout, rows[i : i + 1], weights[i : i + 1])[0] for i in range(2))
    assert parts.item() == pytest.approx(loss.item(), abs=1e-6)
    # ratio 2 on a positive advantage is clipped at 1 + eps; the k3 term to a shifted reference joins the loss
    module.grpo = GRPOArgs(group_size=2, kl_coef=0.5, loss_aggregation=aggregation)
    shifted = Rollout(**{**rollout.__dict__, "logprobs": logp - math.log(2.0), "ref_logprobs": logp - 0.5})
    loss, stats = module.loss(
        shifted, rows[:1], weights[:1] * 2
    )  # the first reply alone, its weight as one row
    k3 = kl_k3(torch.zeros(()), torch.tensor(-0.5)).item()
    per_token = -1.0 * 1.2 + 0.5 * k3
    assert stats["clipfrac"].item() == 1.0 and stats["kl"].item() == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(per_token * 3 * (weights[0] * 2).item(), rel=1e-5)


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_rule_reward_rises_while_kl_stays_bounded(sft_checkpoint, tiny_tokenizer, tmp_path, baseline):  # noqa: F811
    """Replies get shorter (reward = 1 - words/50) within a dozen iterations of 4 prompts x 4 replies."""
    torch.manual_seed(0)
    module = _grpo(
        sft_checkpoint, tiny_tokenizer.source, iterations=12, baseline=baseline, epochs=2, minibatch_size=16
    )
    recorder = _Recorder()
    trainer = quiet_trainer(tmp_path, max_steps=12, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=4))
    assert trainer.global_step == 12  # one global step per iteration
    scores = [h["rollout/score_mean"] for h in recorder.history]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.2, (first, last)
    kls = [h["rollout/kl"] for h in recorder.history]
    assert kls[0] == 0.0 and max(kls) < 20.0
    for key in ("grpo/policy_loss", "grpo/clipfrac", "grpo/kl", "rollout/eos_rate", "rollout/response_len"):
        assert key in recorder.history[-1]


def test_resume_continues_as_if_uninterrupted(sft_checkpoint, tiny_tokenizer, tmp_path):  # noqa: F811
    """4 iterations straight == 2, save, resume, 2: identical weights; the checkpoint holds no frozen network."""

    def run(max_steps: int, ckpt_path: str | None, save_to: Path | None):
        L.seed_everything(0)
        module = _grpo(sft_checkpoint, tiny_tokenizer.source, group_size=2, minibatch_size=4)
        trainer = quiet_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0)
        trainer.fit(
            module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=4), ckpt_path=ckpt_path
        )
        if save_to is not None:
            trainer.save_checkpoint(save_to)
        return module

    straight = run(4, None, None)
    half = tmp_path / "half.ckpt"
    run(2, None, half)
    saved = torch.load(half, weights_only=False)
    assert saved[PAYLOAD_KEY]["stage"] == "grpo" and saved[PAYLOAD_KEY]["backbone_prefix"] == "policy."
    assert not [k for k in saved["state_dict"] if k.startswith(("reference.", "reward_model."))]
    resumed = run(4, str(half), None)
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "bad",
    [
        dict(baseline="ppo"),
        dict(group_size=1),
        dict(loss_aggregation="mean"),
        dict(micro_batch_size=32, minibatch_size=16),
        dict(kl_coef=-1.0),
    ],
)
def test_invalid_grpo_arguments_are_named(bad):
    with pytest.raises(ValueError, match=f"invalid GRPO arguments: {next(iter(bad))}="):
        GRPOArgs(**bad)


def test_held_out_judges_are_logged_beside_the_score(sft_checkpoint, tiny_tokenizer, tmp_path):  # noqa: F811
    """``judges`` score the same validation replies as the optimised reward, under ``val/judge/<name>``."""
    from rlhf_lightning.stages.rewards import RewardArgs

    judges = ["rlhf_lightning.reward_functions:brevity", "rlhf_lightning.reward_functions:contains_target"]
    module = GRPOModule(
        policy_from=sft_checkpoint,
        tokenizer_path=tiny_tokenizer.source,
        rewards=RewardArgs(**BREVITY),
        generation=GenerationArgs(max_new_tokens=16),
        judges=judges,
    )
    trainer = quiet_trainer(tmp_path, limit_val_batches=1)
    (metrics,) = trainer.validate(module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=8))
    # the optimised reward is brevity alone: its unshaped score and the brevity judge see the same replies
    assert metrics["val/judge/brevity"] == pytest.approx(metrics["val/score_normalised"], abs=1e-6)
    assert 0.0 <= metrics["val/judge/contains_target"] <= 1.0
    with pytest.raises(ValueError, match=r"more than one judge named \['brevity'\]"):
        GRPOModule(policy_from=sft_checkpoint, judges=[judges[0], "my_rules:brevity"])


def test_a_held_out_reward_model_judges_outside_the_checkpoint(
    sft_checkpoint,  # noqa: F811
    reward_checkpoint,  # noqa: F811
    tiny_tokenizer,
    tmp_path,
):
    """A reward checkpoint in ``judge_models`` scores the validation replies with its stored normalisation (here the
    optimised reward model itself, so both agree), and stays out of the stage's state and checkpoints."""
    from rlhf_lightning.stages.rewards import RewardArgs

    module = GRPOModule(
        policy_from=sft_checkpoint,
        reward_from=reward_checkpoint,
        tokenizer_path=tiny_tokenizer.source,
        rewards=RewardArgs(clip=None, missing_eos_score=None),
        generation=GenerationArgs(max_new_tokens=16),
        judge_models=[reward_checkpoint],
    )
    trainer = quiet_trainer(tmp_path, limit_val_batches=1)
    (metrics,) = trainer.validate(module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=8))
    assert metrics["val/judge/reward"] == pytest.approx(metrics["val/score_normalised"], abs=1e-5)
    assert not [
        key for key in module.state_dict() if not key.startswith(("policy.", "reference.", "reward_model."))
    ]
    with pytest.raises(FileNotFoundError, match="judge_models"):
        GRPOModule(policy_from=sft_checkpoint, judge_models=[str(tmp_path / "missing.ckpt")])
