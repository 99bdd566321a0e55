"""SFT, reward model and PPO on CPU from local Hugging Face folders (tiny random Llama and GPT-2; nothing downloaded).

One module-scoped chain: SFT a GPT-2 (all weights) and a Llama with LoRA, a reward model from the Llama SFT
checkpoint, then PPO with the GPT-2 policy scored by the Llama reward model (different tokenizers) and PPO with the
LoRA Llama policy, whose SFT adapter is merged and whose reference is the SFT model (the fresh PPO adapter
disabled). DPO and GRPO from the same LoRA SFT checkpoint get the same reference (``policy_and_reference``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from hf_folders import make_gpt2_folder, make_llama_folder
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.export import export_checkpoint
from rlhf_lightning.models.factory import LoRAArgs, ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.checkpoints import load_backbone
from rlhf_lightning.stages.dpo import DPOModule, pair_response_mask, sequence_logprobs
from rlhf_lightning.stages.grpo import GRPOArgs, GRPOModule, row_weights
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule, load_reward_model
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.rollout import response_logprobs_of
from rlhf_lightning.stages.sft import SFTModule

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "hh_rlhf"


_trainer = partial(quiet_trainer, limit_val_batches=0, num_sanity_val_steps=0)


def _sft(root: Path, folder: Path, lora: LoRAArgs | None, name: str) -> tuple[str, dict, dict]:
    data = SFTDataModule(tokenizer_path=str(folder), max_length=96, batch_size=4, val_fraction=0.1)
    module = SFTModule(
        model=ModelArgs(hf_path=str(folder), lora=lora, gradient_checkpointing=lora is not None),
        tokenizer_path=str(folder),
    )
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-2)
    trainer = _trainer(root, max_steps=3)
    module.configure_model()  # built from tokenizer_path (the same folder the DataModule reads)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data)
    path = root / f"{name}_sft.ckpt"
    trainer.save_checkpoint(path)
    return str(path), before, {k: v.clone() for k, v in module.model.state_dict().items()}


def _pairs(folder: Path) -> PreferenceDataModule:
    """The shipped training pairs in ``folder``'s tokenizer, no validation split (every stage here reads these)."""
    return PreferenceDataModule(
        train_path=str(DATA / "preference_train.jsonl"),
        val_path=None,
        tokenizer_path=str(folder),
        max_length=96,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_stages")
    llama = make_llama_folder(root / "llama")
    gpt2 = make_gpt2_folder(root / "gpt2")
    torch.manual_seed(0)
    gpt2_sft, gpt2_before, gpt2_after = _sft(root, gpt2, None, "gpt2")
    llama_sft, llama_before, llama_after = _sft(root, llama, LoRAArgs(r=4, alpha=8.0), "llama")

    data = _pairs(llama)
    reward = RewardModule(init_from=llama_sft)
    reward.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-2)
    trainer = _trainer(root, max_steps=3)
    trainer.fit(reward, datamodule=data)
    reward_ckpt = root / "llama_reward.ckpt"
    trainer.save_checkpoint(reward_ckpt)
    return dict(
        root=root,
        llama=llama,
        gpt2=gpt2,
        gpt2_sft=gpt2_sft,
        llama_sft=llama_sft,
        reward=str(reward_ckpt),
        reward_module=reward,
        gpt2_change=(gpt2_before, gpt2_after),
        llama_change=(llama_before, llama_after),
    )


def test_sft_full_and_lora_update_the_right_weights(chain):
    before, after = chain["gpt2_change"]
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("c_attn.weight"))
    before, after = chain["llama_change"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)  # only the adapter trained
    backbone, tokenizer, _ = load_backbone(chain["llama_sft"])
    assert backbone.is_lora and type(tokenizer).__name__ == "HFChatTokenizer"
    state = backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in after.items())


def test_reward_model_reloads_without_missing_weights(chain):
    model, tokenizer = load_reward_model(chain["reward"])
    trained = chain["reward_module"].reward_model.eval()
    ids = torch.tensor(
        [tokenizer.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])[0]]
    )
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), trained(ids, mask))


def test_reward_model_with_merge_lora_trains_every_weight_of_the_sft_model(chain, tmp_path):
    """``merge_lora``: the SFT adapter is folded in (same scores before training), then every weight trains (full
    fine-tuning, the reward-model recipe), and the checkpoint reloads as a plain model with no adapter."""
    data = _pairs(chain["llama"])
    kept = RewardModule(init_from=chain["llama_sft"])
    merged = RewardModule(init_from=chain["llama_sft"], merge_lora=True)
    kept.configure_model(), merged.configure_model()
    merged.reward_model.head.load_state_dict(kept.reward_model.head.state_dict())
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(merged.reward_model.eval()(ids, mask), kept.reward_model.eval()(ids, mask))
    assert not merged.reward_model.backbone.is_lora
    before = {k: v.clone() for k, v in merged.reward_model.state_dict().items()}
    merged.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(merged, datamodule=data)
    after = merged.reward_model.state_dict()
    assert not any("lora_" in k for k in after)
    trained = [k for k in before if k.endswith(("q_proj.weight", "mlp.down_proj.weight"))]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)
    path = tmp_path / "merged_reward.ckpt"
    trainer.save_checkpoint(path)
    model, _ = load_reward_model(str(path))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), merged.reward_model.eval()(ids, mask))


def _prompts(folder: Path, batch_size: int = 4) -> PromptDataModule:
    return PromptDataModule(
        train_path=str(DATA / "prompts_train.jsonl"),
        tokenizer_path=str(folder),
        batch_size=batch_size,
        max_prompt_length=48,
    )


def _ppo(policy_from: str, reward_from: str | None, **kwargs) -> PPOModule:
    module = PPOModule(
        policy_from=policy_from,
        reward_from=reward_from,
        ppo=PPOArgs(iterations=2, epochs=1, minibatch_size=4, kl_beta=0.05),
        rewards=RewardArgs(model_weight=1.0, missing_eos_score=None),
        generation=GenerationArgs(max_new_tokens=12),
        sample_every_n=0,
        **kwargs,
    )
    module.policy_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    module.value_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    return module


def test_ppo_policy_and_reward_model_with_different_tokenizers(chain):
    module = _ppo(chain["gpt2_sft"], chain["reward"])
    trainer = _trainer(chain["root"], max_steps=2)
    trainer.fit(module, datamodule=_prompts(chain["gpt2"]))
    assert trainer.global_step == 2
    scorer = module.scorer
    assert (
        scorer.reward_tokenizer is not None
        and scorer.reward_tokenizer.vocab_size != module.tokenizer.vocab_size
    )
    # the scorer's score equals the reward model on the response re-rendered with the reward model's template
    prompt = [{"role": "user", "content": "How do I bake bread?"}]
    raw = scorer.raw_scores(
        torch.zeros(1, 3, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.bool),
        [prompt],
        ["Use flour."],
        [{}],
    )
    ids = torch.tensor(
        [scorer.reward_tokenizer.render([*prompt, {"role": "assistant", "content": "Use flour."}])[0]]
    )
    with torch.no_grad():
        expected = module.reward_model.normalize(
            module.reward_model(ids, torch.ones_like(ids, dtype=torch.bool))
        )
    torch.testing.assert_close(raw, expected)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask)


def test_ppo_with_lora_policy_uses_the_sft_model_as_reference(chain, tmp_path):
    # Replaces a test that asserted the old behaviour (reference == the pretrained base, so KL > 0 at step 0) and an
    # assertion that could not fail (``AdapterDisabledView`` is no ``nn.Module``, so ``isinstance`` was always False).
    sft_model, _, _ = load_backbone(chain["llama_sft"])
    sft_model.eval()
    lora_b = [p for n, p in sft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.any() for p in lora_b)  # SFT trained the adapter (peft starts lora_B at 0)
    module = _ppo(chain["llama_sft"], chain["reward"])
    data = _prompts(chain["llama"], batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.configure_model()
    # no second copy: the reference reads the policy's own parameters and registers none
    assert module.reference.policy is module.policy
    assert not any(n.startswith("reference.") for n, _ in module.named_parameters())

    # first iteration: KL exactly 0, and the first minibatch's ratio exactly 1
    module.generator.manual_seed(0)
    rollout, _ = module._rollout(batch)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    module.policy.train(), module.value_model.train()
    _, stats = module._losses(rollout, torch.arange(len(rollout)), update_policy=True)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    # the reference is the SFT model (adapter merged), not the folder's base model
    seq = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], 1)
    P, m = rollout.query_ids.shape[1], rollout.response_mask
    with torch.no_grad():
        sft = response_logprobs_of(sft_model, seq, mask, P, 1.0)
        with sft_model.adapter_disabled():
            base = response_logprobs_of(sft_model, seq, mask, P, 1.0)
    torch.testing.assert_close(rollout.ref_logprobs[m], sft[m], atol=1e-5, rtol=1e-5)
    assert (rollout.ref_logprobs[m] - base[m]).abs().max() > 1e-3

    # PPO trains the fresh adapter; its checkpoint rebuilds the PPO policy for generate, export and resume
    trainer = _trainer(chain["root"], max_steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    module.policy.eval()
    ids, ids_mask = batch.input_ids, batch.attention_mask
    expected = _logits(module.policy, ids, ids_mask)
    assert (expected - _logits(sft_model, ids, ids_mask)).abs().max() > 1e-4  # PPO changed the policy
    rebuilt, _, checkpoint = load_backbone(path)  # what generate and export read
    torch.testing.assert_close(_logits(rebuilt.eval(), ids, ids_mask), expected)
    resumed = _ppo(chain["llama_sft"], chain["reward"])
    resumed.configure_model()
    resumed.on_load_checkpoint(checkpoint)  # as Lightning does: fills in the frozen networks it did not store
    resumed.load_state_dict(checkpoint["state_dict"])  # strict: what a resumed fit loads
    torch.testing.assert_close(_logits(resumed.policy.eval(), ids, ids_mask), expected)
    exported = export_checkpoint(path, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=ids_mask.long()).logits
    torch.testing.assert_close(theirs[ids_mask], expected[ids_mask], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- DPO and GRPO with LoRA
def _lora_sft_model(chain) -> torch.nn.Module:
    model, _, _ = load_backbone(chain["llama_sft"])
    return model.eval()


def _assert_no_second_copy(module, sft_model) -> None:
    """The reference reads the policy's own parameters: no ``reference.`` weights, no more parameters than SFT's."""
    assert module.reference.policy is module.policy
    assert not any(n.startswith("reference.") for n, _ in module.named_parameters())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in sft_model.parameters())


def test_dpo_with_a_lora_sft_checkpoint_starts_at_the_sft_model_and_keeps_it_as_reference(chain):
    """Step 0: policy and reference log-probs are equal (implicit rewards 0, loss log 2); the reference is the SFT
    model (adapter merged), not the base; after an optimizer step the policy moved and the reference did not."""
    sft_model = _lora_sft_model(chain)
    module = DPOModule(
        policy_from=chain["llama_sft"], tokenizer_path=str(chain["llama"]), cache_ref_logprobs=False
    )
    module.optimizer_factory = lambda groups: torch.optim.AdamW(groups, lr=1e-2)
    data = _pairs(chain["llama"])
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.configure_model()
    _assert_no_second_copy(module, sft_model)

    mask = pair_response_mask(batch)
    ids, attention = batch.input_ids, batch.attention_mask

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logprobs(model, ids, attention, mask)

    module.policy.train()  # as in the training step (dropout off, gradient checkpointing on)
    policy, reference = logprobs(module.policy), logprobs(module.reference)
    assert torch.equal(policy, reference)
    loss, stats = module.loss(batch)
    assert stats["reward_chosen"].item() == 0.0 and stats["reward_rejected"].item() == 0.0
    assert loss.item() == -torch.nn.functional.logsigmoid(torch.zeros(())).item()  # log 2, sigmoid DPO
    torch.testing.assert_close(reference, logprobs(sft_model), atol=1e-4, rtol=1e-5)
    with sft_model.adapter_disabled():
        assert (
            reference - logprobs(sft_model)
        ).abs().max() > 1e-3  # the folder's base model is not the reference

    trainer = _trainer(chain["root"], max_steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert (logprobs(module.policy) - policy).abs().max() > 1e-4  # the fresh adapter trained
    assert torch.equal(logprobs(module.reference), reference)  # the reference did not move


def test_grpo_with_a_lora_sft_checkpoint_has_zero_kl_at_the_first_minibatch(chain):
    """GRPO's reference is the SFT model with no second copy: KL exactly 0 and ratio 1 at the first minibatch, and
    the reference's log-probs unchanged by an iteration that moved the policy."""
    sft_model = _lora_sft_model(chain)
    module = GRPOModule(
        policy_from=chain["llama_sft"],
        tokenizer_path=str(chain["llama"]),
        grpo=GRPOArgs(iterations=1, group_size=4, minibatch_size=8, kl_coef=0.1),
        rewards=RewardArgs(  # replies without EOS keep their own score: the groups carry a signal
            model_weight=0.0,
            functions=["rlhf_lightning.reward_functions:brevity"],
            clip=None,
            missing_eos_score=None,
        ),
        generation=GenerationArgs(max_new_tokens=8),
        sample_every_n=0,
    )
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-2)
    data = _prompts(chain["llama"], batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.configure_model()
    _assert_no_second_copy(module, sft_model)

    module.generator.manual_seed(0)
    rollout, _ = module._rollout(batch)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    module.policy.train()
    rows = torch.arange(len(rollout))
    weights = row_weights(rollout.response_mask, module.grpo.aggregation, 8)
    _, stats = module.loss(rollout, rows, weights)
    assert (
        stats["kl"].item() == 0.0 and stats["ratio_max"].item() == 1.0 and stats["ratio_mean"].item() == 1.0
    )
    P, m = rollout.query_ids.shape[1], rollout.response_mask
    with torch.no_grad():
        sft = response_logprobs_of(sft_model, rollout.sequences, rollout.sequence_mask, P, 1.0)
    torch.testing.assert_close(rollout.ref_logprobs[m], sft[m], atol=1e-5, rtol=1e-5)

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            return response_logprobs_of(model, rollout.sequences, rollout.sequence_mask, P, 1.0)

    reference = logprobs(module.reference)
    trainer = _trainer(chain["root"], max_steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert (logprobs(module.policy)[m] - reference[m]).abs().max() > 1e-5  # the policy moved
    assert torch.equal(logprobs(module.reference), reference)  # the reference did not
