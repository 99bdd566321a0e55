"""SFT, reward model and PPO on CPU from local Hugging Face folders (tiny random Llama and GPT-2; nothing downloaded).

One module-scoped chain: SFT a GPT-2 (all weights) and a Llama with LoRA, a reward model from the Llama SFT
checkpoint, then PPO with the GPT-2 policy scored by the Llama reward model (different tokenizers) and PPO with the
LoRA Llama policy, whose reference is the same module with its adapter disabled.
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
from rlhf_lightning.models.factory import LoRAArgs, ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.checkpoints import load_backbone
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule, load_reward_model
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.rollout import response_logprobs_of
from rlhf_lightning.stages.sft import SFTModule

pytest.importorskip("transformers")
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


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_stages")
    llama = make_llama_folder(root / "llama")
    gpt2 = make_gpt2_folder(root / "gpt2")
    torch.manual_seed(0)
    gpt2_sft, gpt2_before, gpt2_after = _sft(root, gpt2, None, "gpt2")
    llama_sft, llama_before, llama_after = _sft(root, llama, LoRAArgs(r=4, alpha=8.0), "llama")

    data = PreferenceDataModule(
        train_path=str(DATA / "preference_train.jsonl"),
        val_path=None,
        tokenizer_path=str(llama),
        max_length=96,
        batch_size=4,
    )
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


def test_ppo_with_lora_policy_uses_the_base_model_as_reference(chain):
    module = _ppo(chain["llama_sft"], chain["reward"])
    data = _prompts(chain["llama"], batch_size=4)
    trainer = _trainer(chain["root"], max_steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert not any(isinstance(m, torch.nn.Module) and m is not module.policy for m in [module.reference])
    names = {n for n, _ in module.named_parameters()}
    assert not any(n.startswith("reference.") for n in names)  # no second copy of the policy
    # reference log-probs of a rollout == log-probs under the folder's base model (no adapter)
    from rlhf_lightning.models.hf import HFCausalLM

    base = HFCausalLM.from_pretrained(chain["llama"], vocab_size=module.tokenizer.vocab_size).eval()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.generator.manual_seed(0)
    rollout, _ = module._rollout(batch)
    seq = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], 1)
    P = rollout.query_ids.shape[1]
    with torch.no_grad():
        expected = response_logprobs_of(base, seq, mask, P, 1.0)
    m = rollout.response_mask
    torch.testing.assert_close(rollout.ref_logprobs[m], expected[m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rollout.logprobs[m], rollout.ref_logprobs[m])  # the adapter did learn something
