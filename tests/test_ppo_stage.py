"""PPO stage on CPU with the tiny preset: first-minibatch invariants, pad/EOS handling, learning, resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"


_trainer = quiet_trainer


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny SFT policy trained for a few steps (so it produces text and EOS sometimes)."""
    root = tmp_path_factory.mktemp("sft")
    data = SFTDataModule(tokenizer_path=tiny_tokenizer.source, max_length=128, batch_size=8, val_fraction=0.1)
    module = SFTModule(model=ModelArgs(preset="tiny", dropout=0.1))
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    trainer = _trainer(root, max_steps=30, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    path = root / "sft.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _prompt_module(tokenizer_path: str, batch_size: int):
    from rlhf_lightning.data.prompts import PromptDataModule

    return PromptDataModule(
        train_path=str(PROMPTS), tokenizer_path=tokenizer_path, batch_size=batch_size, max_prompt_length=64
    )


def _ppo(sft_checkpoint: str, tokenizer_path: str, **overrides) -> PPOModule:
    args = dict(
        policy_from=sft_checkpoint,
        tokenizer_path=tokenizer_path,
        ppo=PPOArgs(iterations=4, epochs=2, minibatch_size=4, kl_beta=0.02),
        rewards=RewardArgs(model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"]),
        generation=GenerationArgs(max_new_tokens=24),
        sample_every_n=0,
    )
    args.update(overrides)
    module = PPOModule(**args)
    module.policy_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    module.value_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    return module


def _first_batch(tokenizer_path: str, batch_size: int = 8):
    data = _prompt_module(tokenizer_path, batch_size)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_first_iteration_has_ratio_one_and_zero_kl(sft_checkpoint, tiny_tokenizer):
    module = _ppo(sft_checkpoint, tiny_tokenizer.source)
    module.configure_model()
    module.generator.manual_seed(0)
    rollout, _ = module._rollout(_first_batch(tiny_tokenizer.source))
    mask = rollout.response_mask
    # the reference is its own frozen network (no shared storage), rebuilt from the same checkpoint (stored with
    # dropout 0.1): at the first iteration every per-token KL is exactly zero
    policy_storage = {p.data_ptr() for p in module.policy.parameters()}
    assert not policy_storage & {p.data_ptr() for p in module.reference.parameters()}
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert torch.equal(rollout.logprobs[mask], rollout.ref_logprobs[mask])
    # a shuffled minibatch recomputed in training mode sees the rollout's log-probs: ratio 1, approx KL 0
    rows = torch.tensor([5, 2, 7, 0])
    module.policy.train(), module.value_model.train()
    _, stats = module._losses(rollout, rows, update_policy=True)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["clipfrac"].item() == 0.0
    # ... and the KL is zero because the networks agree, not because it cannot move: after one update the same
    # rollout's tokens have other log-probs under the policy, while the reference's are unchanged
    _attach_optimizers(module)
    module._update(rollout, update_policy=True)
    module.generator.manual_seed(0)
    again, _ = module._rollout(_first_batch(tiny_tokenizer.source))
    assert not torch.equal(again.logprobs[again.response_mask], again.ref_logprobs[again.response_mask])
    with torch.no_grad():
        from rlhf_lightning.stages.rollout import response_logprobs_of

        P = rollout.query_ids.shape[1]
        seq, seq_mask = rollout.sequences, rollout.sequence_mask
        ref_now = response_logprobs_of(module.reference, seq, seq_mask, P, module.generation.temperature)
    assert torch.equal(ref_now[mask], rollout.ref_logprobs[mask])


def _attach_optimizers(module: PPOModule) -> None:
    """``module._update`` without a Trainer: its own optimizers and a plain backward."""
    optimizers = module.configure_optimizers()
    module.optimizers = lambda use_pl_optimizer=True: optimizers
    module.manual_backward = lambda loss: loss.backward()


def test_rollout_truncates_at_eos_and_masks_padding(sft_checkpoint, tiny_tokenizer):
    module = _ppo(sft_checkpoint, tiny_tokenizer.source, generation=GenerationArgs(max_new_tokens=24))
    module.configure_model()
    module.generator.manual_seed(1)
    rollout, _ = module._rollout(_first_batch(tiny_tokenizer.source))
    eos, pad = tiny_tokenizer.eos_id, tiny_tokenizer.pad_id
    for ids, mask, ended in zip(
        rollout.response_ids.tolist(), rollout.response_mask.tolist(), rollout.ended_with_eos
    ):
        n = sum(mask)
        assert mask == [True] * n + [False] * (len(mask) - n)  # masks from lengths, contiguous
        assert all(t == pad for t in ids[n:])
        assert bool(ended) == (eos in ids[:n])
        if ended:
            assert ids[n - 1] == eos and eos not in ids[: n - 1]  # stops at the first EOS, EOS kept
    # padding never contributes: advantages and rewards are zero there
    assert torch.all(rollout.advantages[~rollout.response_mask] == 0)
    assert torch.all(rollout.rewards[~rollout.response_mask] == 0)
    # responses without EOS get the fixed missing-EOS score
    assert torch.all(rollout.scores[~rollout.ended_with_eos] == module.rewards.missing_eos_score)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})


def test_rule_reward_rises_while_kl_stays_bounded(sft_checkpoint, tiny_tokenizer, tmp_path):
    """The policy learns to answer briefly (reward = 1 - words/50) within a few dozen iterations."""
    torch.manual_seed(0)
    module = _ppo(
        sft_checkpoint,
        tiny_tokenizer.source,
        ppo=PPOArgs(iterations=30, epochs=2, minibatch_size=8, kl_beta=0.02),
        rewards=RewardArgs(
            model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"], clip=None
        ),
    )
    recorder = _Recorder()
    trainer = _trainer(tmp_path, max_steps=30, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=16))
    assert trainer.global_step == 30  # one global step per PPO iteration
    scores = [h["rollout/score_mean"] for h in recorder.history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.1, (first, last)
    kls = [h["rollout/kl"] for h in recorder.history]
    assert max(kls) < 20.0 and min(kls) > -1e-3  # k1 on samples from the policy: non-negative on average
    for key in (
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/explained_variance",
        "ppo/entropy",
        "rollout/eos_rate",
        "rollout/kl_k3",
        "time/generation",
        "time/generated_tokens_per_sec",
    ):
        assert key in recorder.history[-1]


def test_resume_continues_as_if_uninterrupted(sft_checkpoint, tiny_tokenizer, tmp_path):
    """N iterations straight == N/2, save, fresh process state, resume, N/2: identical weights on CPU."""

    def run(max_steps: int, ckpt_path: str | None, save_to: Path | None):
        L.seed_everything(0)
        module = _ppo(
            sft_checkpoint, tiny_tokenizer.source, ppo=PPOArgs(iterations=4, epochs=2, minibatch_size=4)
        )
        trainer = _trainer(tmp_path, max_steps=max_steps, limit_val_batches=0)
        trainer.fit(
            module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=8), ckpt_path=ckpt_path
        )
        if save_to is not None:
            trainer.save_checkpoint(save_to)
        return module

    straight = run(4, None, None)
    half = tmp_path / "half.ckpt"
    run(2, None, half)
    resumed = run(4, str(half), None)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.dumps(straight.kl_controller.state_dict()) == json.dumps(resumed.kl_controller.state_dict())


def test_rollout_explained_variance_is_the_critics_fit_on_the_fresh_rollout():
    """``rollout/explained_variance``: rollout-time values against returns over valid tokens only (padding ignored),
    1 for a perfect critic, 0 for a constant one at the mean, negative for a worse one, 0 when returns are flat."""
    from types import SimpleNamespace

    from rlhf_lightning.stages.ppo_metrics import rollout_explained_variance

    returns = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    valid = returns[mask]

    def ev(values):
        return float(
            rollout_explained_variance(SimpleNamespace(returns=returns, values=values, response_mask=mask))
        )

    assert ev(returns.clone()) == pytest.approx(1.0)
    assert ev(torch.full_like(returns, float(valid.mean()))) == pytest.approx(0.0, abs=1e-6)
    noisy = returns + torch.tensor([[1.0, -1.0, 500.0], [1.0, -1.0, 1.0]])
    expected = 1 - float((valid - noisy[mask]).var()) / float(valid.var())
    assert ev(noisy) == pytest.approx(expected, rel=1e-5)
    flat = SimpleNamespace(returns=torch.ones(2, 3), values=torch.zeros(2, 3), response_mask=mask)
    assert float(rollout_explained_variance(flat)) == 0.0


def test_held_out_judges_are_logged_beside_the_score(sft_checkpoint, tiny_tokenizer, tmp_path):
    """``judges`` score the same validation replies as the optimised reward, under ``val/judge/<name>``."""
    module = _ppo(
        sft_checkpoint,
        tiny_tokenizer.source,
        rewards=RewardArgs(
            model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"], clip=None
        ),
        judges=["rlhf_lightning.reward_functions:brevity", "rlhf_lightning.reward_functions:contains_target"],
    )
    (metrics,) = _trainer(tmp_path, limit_val_batches=1).validate(
        module, datamodule=_prompt_module(tiny_tokenizer.source, batch_size=8)
    )
    assert metrics["val/judge/brevity"] == pytest.approx(metrics["val/score_normalised"], abs=1e-6)
    assert 0.0 <= metrics["val/judge/contains_target"] <= 1.0
