"""PPO-ptx (``PPOArgs.ptx_coef`` + ``PromptDataModule(ptx_path=...)``): off by default, the loss it adds, its
effect on the SFT loss, exact resume with the ptx stream, and located errors for bad ptx data. Tiny preset on CPU
with a reward function instead of a reward model (no reward checkpoint needed)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.data.formats import DataFormatError
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.functional.losses import sft_loss
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"
SFT_DATA = REPO / "data" / "hh_rlhf" / "sft_train.jsonl"


_trainer = partial(quiet_trainer, num_sanity_val_steps=0, limit_val_batches=0)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_tokenizer) -> str:
    root = tmp_path_factory.mktemp("ptx_sft")
    torch.manual_seed(0)
    data = SFTDataModule(tokenizer_path=tiny_tokenizer.source, max_length=128, batch_size=8, val_fraction=0.1)
    module = SFTModule(model=ModelArgs(preset="tiny"))
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    trainer = _trainer(root, max_steps=12)
    trainer.fit(module, datamodule=data)
    path = root / "sft.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _prompts(tokenizer_path: str, ptx: bool, **overrides) -> PromptDataModule:
    args = dict(train_path=str(PROMPTS), tokenizer_path=tokenizer_path, batch_size=4, max_prompt_length=48)
    if ptx:
        args.update(ptx_path=str(SFT_DATA), ptx_batch_size=5, ptx_max_length=64)
    return PromptDataModule(**{**args, **overrides})


def _ppo(sft: str, tokenizer_path: str, build: bool = False, **ppo) -> PPOModule:
    module = PPOModule(
        policy_from=sft,
        tokenizer_path=tokenizer_path,
        ppo=PPOArgs(**{"epochs": 2, "minibatch_size": 2, "kl_beta": 0.05, **ppo}),
        rewards=RewardArgs(model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"]),
        generation=GenerationArgs(max_new_tokens=12),
        sample_every_n=0,
    )
    module.policy_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    module.value_optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    if build:
        module.configure_model()
    return module


def _fit(tmp_path: Path, module: PPOModule, data: PromptDataModule, steps: int, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = _trainer(tmp_path, max_steps=steps)
    trainer.fit(module, datamodule=data, **kwargs)
    return trainer


def _weights(module: PPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _ptx_batch(tokenizer_path: str):
    data = _prompts(tokenizer_path, ptx=True)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _sft_loss(module: PPOModule, ptx) -> float:
    with torch.no_grad():
        return float(
            sft_loss(module.policy(ptx.input_ids, ptx.attention_mask), ptx.input_ids, ptx.loss_mask)[0]
        )


def test_ptx_is_off_by_default_and_ptx_data_alone_changes_nothing(sft_checkpoint, tiny_tokenizer, tmp_path):
    assert PPOArgs().ptx_coef == 0.0
    assert PromptDataModule().ptx_path is None
    runs = []
    for ptx in (False, True):
        module = _ppo(sft_checkpoint, tiny_tokenizer.source)
        trainer = _fit(tmp_path, module, _prompts(tiny_tokenizer.source, ptx=ptx), steps=2)
        assert "ppo/ptx_loss" not in trainer.callback_metrics
        runs.append(_weights(module))
    _assert_same(*runs)


def test_policy_loss_is_ppo_loss_plus_coef_times_sft_loss(sft_checkpoint, tiny_tokenizer):
    """One minibatch, accumulated over micro-batches of 3 rows: its gradient is that of PPO loss + coef * SFT loss
    on the same batch (with SGD at lr 0 the weights stay put and the gradients stay readable)."""
    coef = 0.7
    batch = _ptx_batch(tiny_tokenizer.source)
    module = _ppo(
        sft_checkpoint,
        tiny_tokenizer.source,
        build=True,
        ptx_coef=coef,
        epochs=1,
        minibatch_size=4,
        micro_batch_size=3,
        max_grad_norm=None,
    )
    module.policy_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.0)
    module.value_optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.0)
    optimizers = module.configure_optimizers()
    module.optimizers = lambda use_pl_optimizer=True: optimizers
    module.manual_backward = lambda loss: loss.backward()
    module.generator.manual_seed(0)
    rollout, _ = module._rollout(batch)
    stats = module._update(rollout, True, module._ptx_batch(batch))
    got = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}

    module.policy.zero_grad(set_to_none=True)
    module.policy.train()
    ppo_loss, _ = module._losses(rollout, torch.arange(len(rollout)), update_policy=True)
    ptx = batch.ptx
    sft, _ = sft_loss(module.policy(ptx.input_ids, ptx.attention_mask), ptx.input_ids, ptx.loss_mask)
    (ppo_loss + coef * sft).backward()
    want = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    torch.testing.assert_close(stats["ptx_loss"], sft.detach())
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)

    module.policy.zero_grad(set_to_none=True)
    ppo_loss, _ = module._losses(rollout, torch.arange(len(rollout)), update_policy=True)
    ppo_loss.backward()  # the SFT term really moves the gradient
    ppo_only = {n: p.grad for n, p in module.policy.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(ppo_only[name], got[name]) for name in got)


def test_ptx_term_lowers_the_sft_loss_on_the_ptx_data(sft_checkpoint, tiny_tokenizer, tmp_path):
    ptx = _ptx_batch(tiny_tokenizer.source).ptx
    losses = {}
    for coef in (0.0, 1.0):
        module = _ppo(sft_checkpoint, tiny_tokenizer.source, ptx_coef=coef)
        trainer = _fit(tmp_path, module, _prompts(tiny_tokenizer.source, ptx=True), steps=3)
        if coef:
            assert torch.isfinite(trainer.callback_metrics["ppo/ptx_loss"])
        module.policy.eval()
        losses[coef] = _sft_loss(module, ptx)
    assert losses[1.0] < losses[0.0] - 0.05, losses


def test_resume_with_ptx_is_exact(sft_checkpoint, tiny_tokenizer, tmp_path):
    def data() -> PromptDataModule:
        return _prompts(tiny_tokenizer.source, ptx=True)

    straight = _ppo(sft_checkpoint, tiny_tokenizer.source, ptx_coef=0.5)
    _fit(tmp_path, straight, data(), steps=2)
    half = _ppo(sft_checkpoint, tiny_tokenizer.source, ptx_coef=0.5)
    trainer = _fit(tmp_path, half, data(), steps=1)
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["PromptDataModule"]["ptx_batch_in_epoch"] == 1
    resumed = _ppo(sft_checkpoint, tiny_tokenizer.source, ptx_coef=0.5)
    _fit(tmp_path, resumed, data(), steps=2, ckpt_path=str(checkpoint))
    _assert_same(_weights(straight), _weights(resumed))


def test_ptx_coef_without_ptx_data_fails_at_the_first_iteration(sft_checkpoint, tiny_tokenizer, tmp_path):
    module = _ppo(sft_checkpoint, tiny_tokenizer.source, ptx_coef=0.1)
    with pytest.raises(ValueError, match="ptx_path"):
        _fit(tmp_path, module, _prompts(tiny_tokenizer.source, ptx=False), steps=1)
    with pytest.raises(ValueError, match="ptx_coef"):
        PPOArgs(ptx_coef=-0.1)


def test_bad_ptx_rows_name_file_line_and_field(tiny_tokenizer, tmp_path):
    bad = tmp_path / "ptx.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    bad.write_text(good + "\n" + '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot"}]}\n')
    for check in ("validate_inputs", "setup"):
        data = _prompts(tiny_tokenizer.source, ptx=True, ptx_path=str(bad))
        with pytest.raises(DataFormatError) as error:
            getattr(data, check)()
        assert str(bad) in str(error.value) and "line 2" in str(error.value), str(error.value)
        assert "field" in str(error.value)
