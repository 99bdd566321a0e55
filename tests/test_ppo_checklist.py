"""PPO checklist items (``../shared/PPO_CHECKLIST.md``) not covered by ``test_ppo_stage.py``, each a test that fails
when the item is wrong. Tiny preset on CPU: one SFT checkpoint trained for a few steps (with dropout in its stored
architecture) and one reward checkpoint built on it, shared by the whole module. Most tests drive the module's own
rollout / loss / update methods directly; the ones about iteration counting (warm-up, KL controller, resume) run a
real Trainer for two or three iterations."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from ppo_probes import attach_optimizers as _attach_optimizers
from ppo_probes import mixed_lengths
from ppo_probes import seeded_rollout as _rollout
from trainers import quiet_trainer

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.functional.kl import AdaptiveKLController, kl_k1, kl_k3
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule, rank_seed, sequence_kl
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.rollout import rewards_and_advantages
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"
SCORE_MEAN, SCORE_STD = 0.25, 2.0


_trainer = partial(quiet_trainer, num_sanity_val_steps=0, limit_val_batches=0)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny SFT policy trained for a few steps, stored with dropout 0.1 and attention dropout 0.1."""
    root = tmp_path_factory.mktemp("ppo_sft")
    torch.manual_seed(0)
    data = SFTDataModule(tokenizer_path=tiny_tokenizer.source, max_length=128, batch_size=8, val_fraction=0.1)
    module = SFTModule(model=ModelArgs(preset="tiny", dropout=0.1))
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    trainer = _trainer(root, max_steps=12)
    trainer.fit(module, datamodule=data)
    path = root / "sft.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint[PAYLOAD_KEY]["model_spec"]["config"]["attn_dropout"] = 0.1  # dropout everywhere it can be
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory, tiny_tokenizer, sft_checkpoint) -> str:
    """A reward model on the SFT backbone (fresh head) with stored score statistics, via the module's save hook."""
    torch.manual_seed(1)
    module = RewardModule(init_from=sft_checkpoint, tokenizer_path=tiny_tokenizer.source)
    module.configure_model()
    module.reward_model.set_score_stats(SCORE_MEAN, SCORE_STD)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("ppo_reward") / "reward.ckpt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def prompt_batch(tiny_tokenizer):
    data = _prompts(tiny_tokenizer.source, batch_size=8)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _prompts(tokenizer_path: str, batch_size: int) -> PromptDataModule:
    return PromptDataModule(
        train_path=str(PROMPTS), tokenizer_path=tokenizer_path, batch_size=batch_size, max_prompt_length=48
    )


def _ppo(sft: str, reward: str | None, tokenizer_path: str, build: bool = True, **overrides) -> PPOModule:
    args = dict(
        policy_from=sft,
        reward_from=reward,
        tokenizer_path=tokenizer_path,
        ppo=PPOArgs(iterations=3, epochs=1, minibatch_size=4, kl_beta=0.05),
        rewards=RewardArgs(clip=None),
        generation=GenerationArgs(max_new_tokens=12),
        sample_every_n=0,
    )
    module = PPOModule(**{**args, **overrides})
    module.policy_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    module.value_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    if build:
        module.configure_model()
    return module


def _mixed_lengths(module: PPOModule, bias: float = 2.5) -> PPOModule:
    return mixed_lengths(module, bias)


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class _Snapshots(Callback):
    """Policy / critic weights and KL coefficient at the start of the fit and after every iteration."""

    def __init__(self) -> None:
        self.policy, self.critic, self.beta = [], [], []

    def _take(self, module: PPOModule) -> None:
        self.policy.append(_params(module.policy))
        self.critic.append(_params(module.value_model))
        self.beta.append(module.kl_controller.value)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take(pl_module)


# ------------------------------------------------------------------------------------------------- optimisation


def test_gradient_accumulation_equals_one_full_minibatch(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    """micro_batch_size < minibatch_size accumulates to the same update as one minibatch (rows of unequal length,
    so weighting micro-batches by rows instead of tokens would fail)."""
    results = []
    for micro in (None, 3):
        module = _mixed_lengths(
            _ppo(
                sft_checkpoint,
                reward_checkpoint,
                tiny_tokenizer.source,
                ppo=PPOArgs(epochs=1, minibatch_size=8, micro_batch_size=micro, max_grad_norm=None),
            )
        )
        module.policy_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
        module.value_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
        rollout = _rollout(module, prompt_batch)
        lengths = rollout.response_mask.sum(1)
        assert lengths.min() < lengths.max(), lengths  # the test needs rows of different lengths
        _attach_optimizers(module)
        before = _params(module.policy)
        module.generator.manual_seed(7)
        module._update(rollout, update_policy=True)
        assert not _same(before, _params(module.policy))
        results.append((_params(module.policy), _params(module.value_model)))
    (policy_a, critic_a), (policy_b, critic_b) = results
    for a, b in ((policy_a, policy_b), (critic_a, critic_b)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_critic_warmup_updates_only_the_critic(sft_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path):
    module = _ppo(
        sft_checkpoint,
        reward_checkpoint,
        tiny_tokenizer.source,
        build=False,
        ppo=PPOArgs(epochs=1, minibatch_size=4, critic_warmup_iterations=1),
    )
    snaps = _Snapshots()
    _trainer(tmp_path, max_steps=2, callbacks=[snaps]).fit(
        module, datamodule=_prompts(tiny_tokenizer.source, 4)
    )
    assert len(snaps.policy) == 3
    assert _same(snaps.policy[0], snaps.policy[1])  # warm-up iteration: policy untouched
    assert not _same(snaps.critic[0], snaps.critic[1])  # ... while the critic learns
    assert not _same(snaps.policy[1], snaps.policy[2])  # after warm-up the policy trains


def test_adaptive_kl_beta_moves_and_is_restored_on_resume(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path
):
    ppo = PPOArgs(epochs=1, minibatch_size=4, kl_beta=0.1, kl_target=0.5, kl_horizon=8)

    def run(max_steps: int, ckpt_path: str | None = None, save_to: Path | None = None) -> _Snapshots:
        L.seed_everything(0)
        module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, build=False, ppo=ppo)
        assert isinstance(module.kl_controller, AdaptiveKLController)
        snaps = _Snapshots()
        trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=[snaps])
        trainer.fit(module, datamodule=_prompts(tiny_tokenizer.source, 4), ckpt_path=ckpt_path)
        if save_to is not None:
            trainer.save_checkpoint(save_to)
        return snaps

    straight = run(3).beta  # [initial, after 1, after 2, after 3]
    assert straight[0] == 0.1
    assert len(set(straight)) == 4, straight  # beta changes every iteration
    assert straight[1] == pytest.approx(0.1 * (1 - 0.2 * 4 / 8))  # first KL is 0: error clipped at -0.2
    half = tmp_path / "half.ckpt"
    run(2, save_to=half)
    resumed = run(3, ckpt_path=str(half)).beta  # [restored, after 3]
    assert resumed[0] == straight[2]
    assert resumed[1] == pytest.approx(straight[3], rel=1e-9)


def test_entropy_bonus_is_off_by_default_and_changes_the_loss_when_on(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    assert PPOArgs().entropy_coef == 0.0
    off = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source)
    assert off.ppo.entropy_coef == 0.0
    on = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, ppo=PPOArgs(entropy_coef=0.5))
    rollout = _rollout(off, prompt_batch)
    rows = torch.arange(len(rollout))
    loss_off, stats_off = off._losses(rollout, rows, update_policy=True)
    loss_on, stats_on = on._losses(rollout, rows, update_policy=True)
    torch.testing.assert_close(loss_on, loss_off - 0.5 * stats_off["entropy"])
    assert stats_on["entropy"] > 0
    grads = []
    for module, loss in ((off, loss_off), (on, loss_on)):
        module.policy.zero_grad()
        loss.backward()
        grads.append(module.policy.lm_head.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_shared_value_trunk_trains_value_head_on_the_policy_trunk(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch, tmp_path
):
    module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, share_value_trunk=True)
    assert module.value_model.backbone is module.policy
    _, value_opt = module.configure_optimizers()
    value_params = {id(p) for g in value_opt.param_groups for p in g["params"]}
    assert value_params == {id(p) for p in module.value_model.head.parameters()}
    # values are the head applied to the policy's hidden states
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        expected = module.value_model.head(module.policy.hidden_states(ids, mask))
        torch.testing.assert_close(module.value_model(ids, mask), expected)
    # a real run: the head and the shared trunk both move, and a checkpoint is written
    module = _ppo(
        sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, build=False, share_value_trunk=True
    )
    snaps = _Snapshots()
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[snaps])
    trainer.fit(module, datamodule=_prompts(tiny_tokenizer.source, 4))
    assert not torch.equal(snaps.critic[0]["head.linear.weight"], snaps.critic[1]["head.linear.weight"])
    assert not _same(snaps.policy[0], snaps.policy[1])
    trainer.save_checkpoint(tmp_path / "shared.ckpt")


# ----------------------------------------------------------------------------------------- reward model and critic


def test_reward_model_scores_prompt_plus_truncated_response_at_eos(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    module = _mixed_lengths(_ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source))
    rollout = _rollout(module, prompt_batch)
    assert rollout.ended_with_eos.any() and not rollout.ended_with_eos.all()
    eos = tiny_tokenizer.eos_id
    with torch.no_grad():
        for i in range(len(rollout)):
            prompt = rollout.query_ids[i][rollout.query_mask[i]]
            response = rollout.response_ids[i][rollout.response_mask[i]]  # truncated after the first EOS
            if rollout.ended_with_eos[i]:
                assert response[-1] == eos and (response[:-1] != eos).all()
            seq = torch.cat([prompt, response])[None]  # what a user saw, no padding anywhere
            score = module.reward_model(seq, torch.ones_like(seq, dtype=torch.bool))
            expected = (score - SCORE_MEAN) / SCORE_STD  # normalised with the checkpoint's statistics
            torch.testing.assert_close(rollout.raw_scores[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_critic_starts_from_the_reward_model_with_separate_weights(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source)
    critic, reward = module.value_model, module.reward_model
    assert critic.backbone is not reward.backbone
    reward_state = reward.state_dict()
    for name, param in critic.named_parameters():
        assert torch.equal(param, reward_state[name]), name  # same values (before calibration) ...
        assert param.data_ptr() != reward_state[name].data_ptr(), name  # ... own storage
        assert param.requires_grad
    assert not any(p.requires_grad for p in reward.parameters())
    # once PPO measured its reward normalisation, the critic's head is refit (least squares on the same
    # reference replies) to predict the shaped scores PPO's returns are made of: on those replies its explained
    # variance is >= 0 and never worse than the raw-scale copy's (which starts off by about mean / std)
    stats = module.calibrate_scores(prompt_batch)
    assert (stats.mean, stats.std) != (SCORE_MEAN, SCORE_STD)
    ev_copy, ev_fit = module.critic_fit
    assert ev_fit >= 0 and ev_fit > ev_copy
    # a fresh rollout at iteration 0 (another seed): values and returns on the same scale
    rollout = _rollout(module, prompt_batch, seed=5)
    m = rollout.response_mask
    assert abs(float(rollout.values[m].mean() - rollout.returns[m].mean())) < 0.5
    before = _params(reward)
    _attach_optimizers(module)
    module._update(_rollout(module, prompt_batch), update_policy=True)
    assert _same(before, _params(reward))  # training the critic leaves the reward model alone
    assert not torch.equal(critic.head.linear.weight, reward.head.linear.weight)


# ---------------------------------------------------------------------------------------------------- rollout


def test_recomputed_logprobs_use_the_sampling_temperature(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    generation = GenerationArgs(max_new_tokens=12, temperature=0.7)
    module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, generation=generation)
    rollout = _rollout(module, prompt_batch, seed=3)
    # the log-probs of the sampling distribution itself (same seed -> same tokens)
    sampled = generate(
        module.policy,
        prompt_batch.input_ids,
        prompt_batch.attention_mask,
        generation,
        eos_token_id=tiny_tokenizer.eos_id,
        pad_token_id=tiny_tokenizer.pad_id,
        generator=torch.Generator().manual_seed(3),
        output_logprobs=True,
    )
    assert torch.equal(sampled.response_ids, rollout.response_ids)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.logprobs[mask], sampled.logprobs[mask], atol=1e-4, rtol=1e-4)
    module.policy.train(), module.value_model.train()
    _, stats = module._losses(rollout, torch.tensor([6, 1, 3, 0]), update_policy=True)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    # at temperature 1 the same tokens have other log-probs: a recomputation ignoring the temperature would fail
    untempered = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source)
    _, stats = untempered._losses(rollout, torch.arange(len(rollout)), update_policy=True)
    assert abs(stats["ratio_mean"].item() - 1.0) > 1e-3


def test_sampling_seeds_differ_per_rank(sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch):
    """Two data-parallel ranks seeded by on_fit_start sample different replies to the same prompts; the same rank
    twice samples the same ones."""
    from unittest import mock

    assert rank_seed(123, 0) == 123 and rank_seed(0, 1) != rank_seed(1, 0)
    replies = []
    for rank in (0, 1, 1):
        module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source)
        module.rewards = dataclasses.replace(module.rewards, calibration_samples=0)  # no trainer here
        with (
            mock.patch.object(PPOModule, "global_rank", new_callable=mock.PropertyMock, return_value=rank),
            mock.patch.object(PPOModule, "trainer", new_callable=mock.PropertyMock, return_value=None),
        ):
            module.on_fit_start()
        rollout, _ = module._rollout(prompt_batch)
        replies.append(rollout.response_ids)
    assert not torch.equal(replies[0], replies[1])
    assert torch.equal(replies[1], replies[2])


def test_dropout_is_off_in_every_network(sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch):
    stored = torch.load(sft_checkpoint, map_location="cpu", weights_only=False)[PAYLOAD_KEY]["model_spec"]
    assert (
        stored["config"]["dropout"] > 0 and stored["config"]["attn_dropout"] > 0
    )  # the test means something
    module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source)
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    nets = {
        "policy": module.policy,
        "reference": module.reference,
        "critic": module.value_model,
        "reward": module.reward_model,
    }
    for name, net in nets.items():
        for sub in net.modules():
            if isinstance(sub, torch.nn.Dropout):
                assert sub.p == 0.0, name
            if hasattr(sub, "attn_dropout"):
                assert sub.attn_dropout == 0.0, name
        net.train()
        with torch.no_grad():
            assert torch.equal(net(ids, mask), net(ids, mask)), name  # train mode is deterministic


def _garbage_at_padding(rollout, seed: int = 0):
    """The same rollout with random values at every padded position (prompt and response)."""
    g = torch.Generator().manual_seed(seed)
    mask, query_mask = rollout.response_mask, rollout.query_mask
    noisy = {
        name: torch.where(mask, getattr(rollout, name), 10 * torch.randn(mask.shape, generator=g))
        for name in ("logprobs", "ref_logprobs", "values", "advantages", "returns", "rewards")
    }
    noisy["response_ids"] = torch.where(
        mask, rollout.response_ids, torch.randint(5, 500, mask.shape, generator=g)
    )
    noisy["query_ids"] = torch.where(
        query_mask, rollout.query_ids, torch.randint(5, 500, query_mask.shape, generator=g)
    )
    return dataclasses.replace(rollout, **noisy)


def test_padding_never_contributes_to_losses_or_gradients(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    module = _mixed_lengths(
        _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, ppo=PPOArgs(entropy_coef=0.01))
    )
    rollout = _rollout(module, prompt_batch)
    assert (~rollout.response_mask).any() and (~rollout.query_mask).any()
    noisy = _garbage_at_padding(rollout)
    rows = torch.tensor([4, 0, 7, 2, 5])
    module.policy.train(), module.value_model.train()
    results = []
    for r in (rollout, noisy):
        module.zero_grad()
        loss, stats = module._losses(r, rows, update_policy=True)
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results.append((loss.detach(), stats, grads))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_padding_never_contributes_to_kl_rewards_or_whitening(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    module = _mixed_lengths(_ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source))
    rollout = _rollout(module, prompt_batch)
    noisy = _garbage_at_padding(rollout, seed=1)
    mask = rollout.response_mask
    outputs = [
        rewards_and_advantages(
            r.scores,
            r.logprobs,
            r.ref_logprobs,
            r.values,
            mask,
            kl_beta=0.3,
            gamma=1.0,
            lam=0.95,
            whiten=True,
        )
        for r in (rollout, noisy)
    ]
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
        assert torch.all(a[~mask] == 0)
    advantages = outputs[0][1]
    assert advantages[mask].mean().abs() < 1e-5 and advantages[mask].std() == pytest.approx(1.0, abs=1e-4)
    for estimator in (kl_k1, kl_k3):
        assert torch.equal(sequence_kl(estimator, rollout), sequence_kl(estimator, noisy))


def test_validation_is_bounded_and_leaves_training_statistics_alone(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path
):
    module = _ppo(
        sft_checkpoint,
        reward_checkpoint,
        tiny_tokenizer.source,
        build=False,
        rewards=RewardArgs(running_normalize=True),
        eval_max_prompts=4,
    )
    calls = []
    original = module._rollout
    module._rollout = lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs)
    trainer = _trainer(tmp_path, limit_val_batches=3)
    metrics = trainer.validate(module, datamodule=_prompts(tiny_tokenizer.source, 4), verbose=False)[0]
    assert len(calls) == 1  # 3 batches of 4 prompts, only the first 4 prompts are evaluated
    assert calls[0]["update_running_stats"] is False
    assert module.scorer.running.count == 0
    assert {"val/score", "val/kl", "val/response_len", "val/eos_rate"} <= metrics.keys()


@pytest.mark.parametrize(
    "bad",
    [
        dict(micro_batch_size=9, minibatch_size=8),
        dict(value_clip_eps=0.0),
        dict(entropy_coef=-0.1),
        dict(max_grad_norm=0.0),
        dict(critic_warmup_iterations=-1),
        dict(kl_target=0.0),
        dict(kl_horizon=0),
        dict(forward_batch_size=0),
    ],
)
def test_invalid_ppo_arguments_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PPOArgs(**bad)


# -------------------------------------------------------------------------------------------- reward normalisation


def _normalised_policy_scores(
    module: PPOModule, batch, samples: int, seed: int, eos_only: bool = True
) -> torch.Tensor:
    """Normalised reward-model scores of ``samples`` fresh policy replies (those that ended with EOS: ``eos_only``)."""
    from rlhf_lightning.stages.sampling import ended_with_eos, response_texts

    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(samples // len(batch)):
        out = generate(
            module.policy,
            batch.input_ids,
            batch.attention_mask,
            module.generation,
            eos_token_id=module.tokenizer.eos_id,
            pad_token_id=module.tokenizer.pad_id,
            generator=generator,
        )
        ended = ended_with_eos(out.response_ids, out.response_mask, module.tokenizer.eos_id)
        seq = torch.cat([batch.input_ids, out.response_ids], 1)
        seq_mask = torch.cat([batch.attention_mask, out.response_mask], 1)
        texts = response_texts(module.tokenizer, out.response_ids, out.response_mask)
        raw = module.scorer.model_scores(seq, seq_mask, [r["prompt"] for r in batch.rows], texts)
        scores.append(module.reward_model.normalize(raw)[ended if eos_only else slice(None)])
    return torch.cat(scores)


def test_reward_normalisation_is_measured_on_the_sft_policys_own_replies(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    """The reward checkpoint's statistics (0.25, 2.0) do not fit this policy's replies; after calibration on
    reference-policy samples, fresh SFT-policy replies (another seed) score mean ~0 and std ~1."""
    module = _mixed_lengths(
        _ppo(
            sft_checkpoint,
            reward_checkpoint,
            tiny_tokenizer.source,
            rewards=RewardArgs(calibration_samples=256),
        )
    )
    before = _normalised_policy_scores(module, prompt_batch, 256, seed=11)
    assert abs(float(before.mean())) > 0.3 or abs(float(before.std()) - 1) > 0.3  # the stored stats are off
    stats = module.calibrate_scores(prompt_batch)
    assert 2 <= stats.samples < 256  # replies without EOS are not counted
    after = _normalised_policy_scores(module, prompt_batch, 256, seed=11)
    assert abs(float(after.mean())) < 0.2
    assert 0.8 < float(after.std()) < 1.25


def test_without_a_missing_eos_score_calibration_counts_every_reply(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, prompt_batch
):
    """``missing_eos_score: null`` (replies cut by the token budget keep their model score): every reply's score is
    used in PPO, so all of them enter the statistics, and all fresh replies score mean ~0 and std ~1. Counting only
    the few that ended with EOS left the tiny pipeline's normalised scores at ~+3.8."""
    module = _mixed_lengths(
        _ppo(
            sft_checkpoint,
            reward_checkpoint,
            tiny_tokenizer.source,
            rewards=RewardArgs(calibration_samples=256, missing_eos_score=None),
        )
    )
    stats = module.calibrate_scores(prompt_batch)
    assert stats.samples == 256 and stats.eos_fraction < 1
    after = _normalised_policy_scores(module, prompt_batch, 256, seed=11, eos_only=False)
    assert abs(float(after.mean())) < 0.2
    assert 0.8 < float(after.std()) < 1.25


def test_running_normalisation_skips_scores_replaced_by_the_missing_eos_score():
    from rlhf_lightning.stages.rewards import SequenceScorer

    scorer = SequenceScorer(
        RewardArgs(
            model_weight=0, functions=["rlhf_lightning.reward_functions:brevity"], running_normalize=True
        ),
        None,
    )
    raw = torch.tensor([1.0, 3.0, 100.0, -50.0])
    ended = torch.tensor([True, True, False, False])
    shaped = scorer.shape(raw, ended)
    assert scorer.running.count == 2 and scorer.running.mean == pytest.approx(2.0)
    assert shaped[2:].tolist() == [-1.0, -1.0]


def test_calibration_runs_when_ppo_starts_is_stored_and_never_redone_on_resume(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path
):
    rewards = RewardArgs(calibration_samples=32)
    module = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, build=False, rewards=rewards)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=_prompts(tiny_tokenizer.source, 4))
    stats = module.score_stats
    assert stats is not None and (stats.mean, stats.std) != (SCORE_MEAN, SCORE_STD)
    assert module.reward_model.score_mean.item() == pytest.approx(stats.mean)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved[PAYLOAD_KEY]["score_stats"]["mean"] == stats.mean
    # the frozen networks are rebuilt from policy_from / reward_from, never stored (resume still loads strictly)
    assert not any(k.startswith(("reference.", "reward_model.")) for k in saved["state_dict"])
    assert any(k.startswith("policy.") for k in saved["state_dict"])
    resumed = _ppo(sft_checkpoint, reward_checkpoint, tiny_tokenizer.source, build=False, rewards=rewards)
    calls = []
    resumed.calibrate_scores = lambda prompts: calls.append(prompts)
    snaps = _Snapshots()
    _trainer(tmp_path, max_steps=2, callbacks=[snaps]).fit(
        resumed, datamodule=_prompts(tiny_tokenizer.source, 4), ckpt_path=str(path)
    )
    assert calls == []  # the trained critic head is not folded a second time
    assert resumed.reward_model.score_mean.item() == pytest.approx(stats.mean)
    assert resumed.reward_model.score_std.item() == pytest.approx(stats.std)
