"""What a PPO iteration computes, and how often: one trunk forward per network in the rollout and none after it, one
trunk forward for both heads when the value head shares the policy's trunk, micro-batches sized by tokens that
accumulate to exactly the unsplit minibatch, padding columns cut before the forwards, and the frozen networks (KL 0 at
the first iteration under bf16 autocast, never in an optimizer or a checkpoint's optimizer state).

Tiny preset on CPU, random-init checkpoints written through the stages' own save hooks (no training needed: nothing
here depends on what the model says, only on what is computed). Each "fails without" is named in the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ppo_probes import attach_optimizers as _attach_optimizers
from ppo_probes import mixed_lengths
from ppo_probes import save_stage_checkpoint as _save
from ppo_probes import seeded_rollout as _rollout
from trainers import quiet_trainer

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer) -> tuple[str, str]:
    """Random-init tiny SFT and reward checkpoints (the reward model on the SFT backbone, a fresh head)."""
    root = tmp_path_factory.mktemp("ppo_efficiency")
    torch.manual_seed(0)
    sft = SFTModule(model=ModelArgs(preset="tiny", dropout=0.0), tokenizer_path=tiny_tokenizer.source)
    sft.configure_model()
    sft_path = _save(sft, root / "sft.ckpt")
    reward = RewardModule(init_from=sft_path, tokenizer_path=tiny_tokenizer.source)
    reward.configure_model()
    return sft_path, _save(reward, root / "reward.ckpt")


def _data(tokenizer_path: str, batch_size: int = 8) -> PromptDataModule:
    return PromptDataModule(
        train_path=str(PROMPTS), tokenizer_path=tokenizer_path, batch_size=batch_size, max_prompt_length=40
    )


@pytest.fixture(scope="module")
def prompt_batch(tiny_tokenizer):
    data = _data(tiny_tokenizer.source)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < lengths.max()  # prompts of several lengths: padding to cut
    return batch


def _ppo(checkpoints, tokenizer_path: str, build: bool = True, **overrides) -> PPOModule:
    sft, reward = checkpoints
    args = dict(
        policy_from=sft,
        reward_from=reward,
        tokenizer_path=tokenizer_path,
        ppo=PPOArgs(iterations=1, epochs=1, minibatch_size=4, max_grad_norm=None),
        rewards=RewardArgs(normalize=False, clip=None),
        generation=GenerationArgs(max_new_tokens=10),
        sample_every_n=0,
    )
    module = PPOModule(**{**args, **overrides})
    module.policy_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
    module.value_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
    if build:
        module.configure_model()
    return module


def _mixed_lengths(module: PPOModule, bias: float = 3.5) -> PPOModule:
    return mixed_lengths(module, bias)


class _TrunkCounter:
    """Counts full (uncached) trunk forwards of a network and the widths they ran over."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.calls, self.widths = 0, []
        inner = net.hidden_states

        def counted(input_ids, *args, **kwargs):
            if kwargs.get("cache") is None and (len(args) < 3 or args[2] is None):
                self.calls += 1
                self.widths.append(input_ids.shape[1])
            return inner(input_ids, *args, **kwargs)

        net.hidden_states = counted


def _counters(module: PPOModule) -> dict[str, _TrunkCounter]:
    nets = {"policy": module.policy, "reference": module.reference, "reward": module.reward_model.backbone}
    if module.value_model.backbone is not module.policy:
        nets["critic"] = module.value_model.backbone
    return {name: _TrunkCounter(net) for name, net in nets.items()}


# ------------------------------------------------------------------------------------------------ forward counts


@pytest.mark.parametrize("shared", [False, True])
def test_one_trunk_forward_per_network_in_the_rollout_and_none_recomputed_in_the_update(
    checkpoints, tiny_tokenizer, prompt_batch, shared
):
    """Rollout: the policy (also giving the values when the value head shares its trunk), the reference, the critic
    and the reward model each run once over the batch. Update: one trunk forward per trained network per micro-batch
    (one in all when shared; two before the shared forward), never the reference or the reward model."""
    module = _ppo(checkpoints, tiny_tokenizer.source, share_value_trunk=shared)
    counts = _counters(module)
    rollout = _rollout(module, prompt_batch)
    expected = {"policy": 1, "reference": 1, "reward": 1, **({} if shared else {"critic": 1})}
    assert {name: c.calls for name, c in counts.items()} == expected
    if shared:  # the values came out of the policy's forward
        assert rollout.values[rollout.response_mask].abs().sum() > 0

    _attach_optimizers(module)
    for c in counts.values():
        c.calls = 0
    module._update(rollout, update_policy=True)
    minibatches = len(rollout) // module.ppo.minibatch_size
    expected = {
        "policy": minibatches,
        "reference": 0,
        "reward": 0,
        **({} if shared else {"critic": minibatches}),
    }
    assert {name: c.calls for name, c in counts.items()} == expected


def test_shared_trunk_critic_warmup_runs_the_trunk_without_autograd(
    checkpoints, tiny_tokenizer, prompt_batch
):
    """While only the critic trains, the shared trunk gets no gradient (only the head's optimizer steps): the value
    head still moves, the trunk's parameters get no .grad at all."""
    module = _ppo(checkpoints, tiny_tokenizer.source, share_value_trunk=True)
    rollout = _rollout(module, prompt_batch)
    _attach_optimizers(module)
    head = module.value_model.head.linear.weight.detach().clone()
    module._update(rollout, update_policy=False)
    assert not torch.equal(head, module.value_model.head.linear.weight)
    assert all(p.grad is None for p in module.policy.parameters())


def test_shared_trunk_update_equals_separate_forwards_of_the_same_trunk(
    checkpoints, tiny_tokenizer, prompt_batch
):
    """One trunk forward for both heads gives the gradient of two forwards of the (same) trunk: compared against
    the value loss and the policy loss computed from two separate forwards."""
    from rlhf_lightning.functional.logprobs import logprobs_from_logits
    from rlhf_lightning.functional.losses import ppo_policy_loss, ppo_value_loss
    from rlhf_lightning.stages.rollout import policy_logits, response_values

    module = _ppo(checkpoints, tiny_tokenizer.source, share_value_trunk=True)
    rollout = _rollout(module, prompt_batch)
    rows = torch.tensor([3, 0, 6, 1])
    loss, _ = module._losses(rollout, rows, update_policy=True)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in module.value_model.named_parameters()}
    module.zero_grad(set_to_none=True)

    seq, mask, P = rollout.sequences[rows], rollout.sequence_mask[rows], rollout.query_ids.shape[1]
    r_mask = rollout.response_mask[rows]
    values = response_values(module.value_model, seq, mask, P)
    value_loss, _ = ppo_value_loss(values, rollout.values[rows], rollout.returns[rows], r_mask, 0.2)
    logp = logprobs_from_logits(policy_logits(module.policy, seq, mask, P), seq[:, P:])
    policy_loss, _ = ppo_policy_loss(logp, rollout.logprobs[rows], rollout.advantages[rows], r_mask, 0.2)
    naive = module.ppo.vf_coef * value_loss + policy_loss
    torch.testing.assert_close(loss, naive, atol=1e-6, rtol=1e-5)
    naive.backward()
    for name, param in module.value_model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------- micro-batches and trimming


def _update_params(module: PPOModule, rollout) -> dict[str, torch.Tensor]:
    _attach_optimizers(module)
    module.generator.manual_seed(7)
    module._update(rollout, update_policy=True)
    nets = {"policy": module.policy, "critic": module.value_model}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "split", [dict(micro_batch_size=1), dict(micro_batch_tokens=1), dict(micro_batch_tokens=90)]
)
def test_micro_batches_by_tokens_accumulate_to_the_unsplit_minibatch(
    checkpoints, tiny_tokenizer, prompt_batch, split
):
    """1 x minibatch vs the same minibatch split by rows (2 x ... x 1) or by tokens (each row alone; or groups of
    similar length), each split trimmed to its own columns: the same update (rows of unequal prompt and response
    lengths, so weighting micro-batches by rows, or letting padding count, would fail)."""
    rollouts, results = [], []
    for extra in ({}, split):
        module = _mixed_lengths(
            _ppo(
                checkpoints,
                tiny_tokenizer.source,
                ppo=PPOArgs(epochs=1, minibatch_size=8, max_grad_norm=None, **extra),
            )
        )
        rollouts.append(_rollout(module, prompt_batch))
        results.append(_update_params(module, rollouts[-1]))
    lengths = rollouts[0].response_mask.sum(1)
    assert lengths.min() < lengths.max(), lengths
    torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs)
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=1e-5, msg=key)


def test_micro_batch_forwards_run_over_fewer_padded_tokens(checkpoints, tiny_tokenizer, prompt_batch):
    """With ``micro_batch_tokens`` each micro-batch forward covers only its rows' columns: the update's policy
    forwards process fewer padded tokens than rows x the rollout's full width (what they did before trimming)."""
    module = _mixed_lengths(
        _ppo(
            checkpoints,
            tiny_tokenizer.source,
            ppo=PPOArgs(epochs=1, minibatch_size=8, micro_batch_tokens=120, max_grad_norm=None),
        )
    )
    rollout = _rollout(module, prompt_batch)
    counter = _TrunkCounter(module.policy)
    rows_seen: list[int] = []
    losses = module._losses

    def spy(rollout, rows, update_policy):
        rows_seen.append(len(rows))
        return losses(rollout, rows, update_policy)

    module._losses = spy
    _attach_optimizers(module)
    module._update(rollout, update_policy=True)
    assert len(rows_seen) > 1 and sum(rows_seen) == len(rollout)
    padded = sum(n * w for n, w in zip(rows_seen, counter.widths))
    full = len(rollout) * rollout.sequences.shape[1]
    assert padded < full
    assert all(n * w <= 120 or n == 1 for n, w in zip(rows_seen, counter.widths))


def test_rollout_forwards_by_tokens_equal_the_whole_batch_forward(checkpoints, tiny_tokenizer, prompt_batch):
    """``forward_batch_tokens`` (groups of similar length, trimmed) gives the whole-batch forward's log-probs and
    values on every valid token, and KL exactly 0 (policy and reference see the same groups)."""
    rollouts = []
    for tokens in (None, 60):
        module = _mixed_lengths(
            _ppo(
                checkpoints,
                tiny_tokenizer.source,
                ppo=PPOArgs(forward_batch_tokens=tokens, max_grad_norm=None),
            )
        )
        rollouts.append(_rollout(module, prompt_batch))
    whole, grouped = rollouts
    mask = whole.response_mask
    assert torch.equal(mask, grouped.response_mask)
    for name in ("logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(grouped, name)[mask], getattr(whole, name)[mask], msg=name)
    assert torch.equal(grouped.logprobs[mask], grouped.ref_logprobs[mask])


# -------------------------------------------------------------------------------------------- frozen networks


def test_kl_is_zero_at_the_first_iteration_under_bf16_autocast(checkpoints, tiny_tokenizer, prompt_batch):
    """Policy == reference at step 0: identical log-probs under bf16-mixed autocast (the reference keeps the
    policy's dtype; ``stages/ppo_models.py`` explains why a bf16 reference would not give 0)."""
    module = _ppo(checkpoints, tiny_tokenizer.source)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = _rollout(module, prompt_batch)
    mask = rollout.response_mask
    assert torch.equal(rollout.logprobs[mask], rollout.ref_logprobs[mask])


def test_frozen_networks_are_bf16_frozen_and_outside_optimizers_and_checkpoints(
    checkpoints, tiny_tokenizer, tmp_path
):
    """Under bf16-mixed: the reward backbone is stored in bf16 (head and score statistics float32), the reference in
    the policy's dtype; both in eval mode without gradients, in no optimizer, and neither their weights nor any
    optimizer state for them in the checkpoint."""
    module = _ppo(checkpoints, tiny_tokenizer.source, build=False, ppo=PPOArgs(iterations=1, epochs=1))
    trainer = quiet_trainer(
        tmp_path, max_steps=1, precision="bf16-mixed", limit_val_batches=0, num_sanity_val_steps=0
    )
    trainer.fit(module, datamodule=_data(tiny_tokenizer.source))

    reward = module.reward_model
    assert {p.dtype for p in reward.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reward.head.parameters()} == {torch.float32}
    assert reward.score_mean.dtype == reward.score_std.dtype == torch.float32
    policy_dtypes = {p.dtype for p in module.policy.parameters()}
    assert {p.dtype for p in module.reference.parameters()} == policy_dtypes == {torch.float32}

    frozen = [*module.reference.parameters(), *reward.parameters()]
    assert not any(p.requires_grad for p in frozen)
    assert not module.reference.training and not reward.training
    optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in frozen}

    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(("reference.", "reward_model."))]
    trainable = [
        sum(1 for p in module.policy.parameters()),
        sum(1 for p in module.value_model.parameters()),
    ]
    stored = [
        sum(len(g["params"]) for g in state["param_groups"]) for state in checkpoint["optimizer_states"]
    ]
    assert stored == trainable
