"""The DPO stage on CPU with the tiny preset: reply masks, sequence log-probs, the reference cache, learning on the
shipped HH pairs (held-out accuracy and margin rise over the SFT model), exact resume, and a checkpoint that reads as
a policy (generate/export loader, PPO's policy_from)."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.data.preference import PreferenceDataModule, PreferenceDataset
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.functional.logprobs import logprobs_from_logits
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_checkpoint, load_policy
from rlhf_lightning.stages.dpo import STATS, DPOArgs, DPOModule, pair_response_mask, sequence_logprobs
from rlhf_lightning.stages.ppo_models import load_networks
from rlhf_lightning.stages.sft import SFTModule
from rlhf_lightning.types import PreferenceBatch

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "data" / "hh_rlhf" / "preference_train.jsonl"
HELD_OUT = REPO / "data" / "hh_rlhf" / "preference_test.jsonl"

_trainer = partial(quiet_trainer, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny SFT policy trained for a few steps (with dropout in its stored architecture: DPO switches it off)."""
    root = tmp_path_factory.mktemp("dpo_sft")
    torch.manual_seed(0)
    data = SFTDataModule(tokenizer_path=tiny_tokenizer.source, max_length=128, batch_size=8, val_fraction=0.1)
    module = SFTModule(model=ModelArgs(preset="tiny", dropout=0.1))
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    trainer = _trainer(root, max_steps=12, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = root / "sft.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _data(tokenizer_path: str, val_path: Path = HELD_OUT, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(
        train_path=str(PAIRS),
        val_path=str(val_path),
        tokenizer_path=tokenizer_path,
        max_length=128,
        batch_size=8,
        **kwargs,
    )


def _dpo(sft: str, tokenizer_path: str, lr: float = 1e-3, **kwargs) -> DPOModule:
    module = DPOModule(policy_from=sft, tokenizer_path=tokenizer_path, **kwargs)
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=lr)
    return module


def _pair_batch() -> PreferenceBatch:
    # prompt [1, 2, 3]; chosen reply [4, 5, 9], rejected reply [4, 6] (shares its first reply token 4); pad 0
    ids = torch.tensor([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 6, 0]])
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    return PreferenceBatch(input_ids=ids, attention_mask=mask, margin=torch.zeros(1))


def test_pair_response_mask_starts_where_chosen_and_rejected_differ() -> None:
    expected = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(pair_response_mask(_pair_batch()), expected)


def test_sequence_logprobs_equal_the_masked_sum_over_full_logits(sft_checkpoint, tiny_tokenizer) -> None:
    module = _dpo(sft_checkpoint, tiny_tokenizer.source)
    module.configure_model()
    batch = _pair_batch()
    response = pair_response_mask(batch)
    fast = sequence_logprobs(module.policy, batch.input_ids, batch.attention_mask, response)
    logits = module.policy(batch.input_ids, attention_mask=batch.attention_mask)
    naive = (logprobs_from_logits(logits[:, :-1], batch.input_ids[:, 1:]) * response[:, 1:]).sum(dim=1)
    torch.testing.assert_close(fast, naive)
    # the shared reply token counts as prompt: it has the same log-prob in both rows, so the gap is DPO's
    whole = batch.attention_mask & (torch.arange(6) >= 3)
    full = sequence_logprobs(module.policy, batch.input_ids, batch.attention_mask, whole)
    torch.testing.assert_close(full[0] - full[1], fast[0] - fast[1])


def test_reference_logprobs_are_cached_once_per_pair(sft_checkpoint, tiny_tokenizer) -> None:
    module = _dpo(sft_checkpoint, tiny_tokenizer.source)
    module.configure_model()
    data = _data(tiny_tokenizer.source)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    calls = []
    trunk = module.reference.hidden_states
    module.reference.hidden_states = lambda *a, **k: (
        calls.append(1) or trunk(*a, **k)
    )  # counts reference passes
    live = module.reference_logprobs(batch, pair_response_mask(batch))
    assert calls == [1] and len(module._ref_cache) == len(batch)
    calls.clear()
    again = module.reference_logprobs(batch, pair_response_mask(batch))
    assert calls == []  # served from the cache
    torch.testing.assert_close(again, live)
    module.cache_ref_logprobs = False
    torch.testing.assert_close(module.reference_logprobs(batch, pair_response_mask(batch)), live)
    assert calls  # recomputed


def test_validation_logs_the_means_over_pairs_of_uneven_batches(
    sft_checkpoint, tiny_tokenizer, tmp_path
) -> None:
    """Batches of 2 and 1 pairs: ``val/*`` are the means over the 3 pairs (as one batch of 3), not over batches."""
    module = _dpo(sft_checkpoint, tiny_tokenizer.source)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off its reference, so the pairs' statistics differ
        for param in module.policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    data = _data(tiny_tokenizer.source)
    data.setup("validate")
    pairs = PreferenceDataset(data.val_dataset.items[:3])
    uneven = DataLoader(pairs, batch_size=2, collate_fn=data._collate())
    logged = _trainer(tmp_path).validate(module, dataloaders=uneven, verbose=False)[0]
    with torch.no_grad():
        _, whole = module.loss(next(iter(DataLoader(pairs, batch_size=3, collate_fn=data._collate()))))
    assert [len(batch) for batch in uneven] == [2, 1]
    for key in STATS:
        assert logged[f"val/{key}"] == pytest.approx(float(whole[key]), abs=1e-5), key
    assert 0 < logged["val/accuracy"] < 1  # the pairs differ (else any weighting would pass)


def test_dpo_raises_held_out_accuracy_and_margin_over_the_sft_model(
    sft_checkpoint, tiny_tokenizer, tmp_path
) -> None:
    torch.manual_seed(0)
    module = _dpo(sft_checkpoint, tiny_tokenizer.source)
    held_out, train_pairs = _data(tiny_tokenizer.source), _data(tiny_tokenizer.source, val_path=PAIRS)
    evaluate = _trainer(tmp_path, limit_val_batches=30)
    before = evaluate.validate(module, datamodule=held_out, verbose=False)[0]
    # the SFT model is its own reference: every implicit reward is 0 exactly (dropout off), the loss is ln 2
    assert before["val/margin"] == 0.0 and before["val/accuracy"] == 0.0
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    _trainer(tmp_path, max_steps=40, limit_val_batches=0).fit(module, datamodule=held_out)
    after = evaluate.validate(module, datamodule=held_out, verbose=False)[0]
    seen = evaluate.validate(module, datamodule=train_pairs, verbose=False)[0]
    assert after["val/margin"] > 0.02 and after["val/accuracy"] > 0.5, after  # held-out pairs
    assert after["val/reward_chosen"] > after["val/reward_rejected"]
    assert seen["val/accuracy"] > 0.6 and seen["val/loss"] < math.log(2), seen  # the pairs it trained on


def _policy_state(module: DPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_resume_from_an_end_of_epoch_checkpoint_matches_a_straight_run(
    sft_checkpoint, tiny_tokenizer, tmp_path
) -> None:
    args = dict(dpo=DPOArgs(loss="ipo", beta=0.5))

    def fit(module: DPOModule, folder: Path, ckpt_path: Path | None = None) -> None:
        every_epoch = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)
        trainer = _trainer(
            folder,
            max_epochs=2,
            limit_train_batches=3,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[every_epoch],
        )
        trainer.fit(module, datamodule=_data(tiny_tokenizer.source), ckpt_path=ckpt_path)

    torch.manual_seed(0)
    straight = _dpo(sft_checkpoint, tiny_tokenizer.source, **args)
    fit(straight, tmp_path / "straight")
    first_epoch = tmp_path / "straight" / "epoch=0.ckpt"
    assert not any(k.startswith("reference.") for k in load_checkpoint(first_epoch)["state_dict"])
    assert any(  # training moved the policy away from its reference
        not torch.equal(v, straight.reference.state_dict()[k])
        for k, v in straight.policy.state_dict().items()
    )
    torch.manual_seed(1)  # resume must not depend on the global seed
    resumed = _dpo(sft_checkpoint, tiny_tokenizer.source, **args)
    fit(resumed, tmp_path / "resumed", ckpt_path=first_epoch)
    expected, got = _policy_state(straight), _policy_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_checkpoint_reads_as_a_policy_for_generate_export_and_ppo(
    sft_checkpoint, tiny_tokenizer, tmp_path
) -> None:
    module = _dpo(sft_checkpoint, tiny_tokenizer.source)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(tiny_tokenizer.source))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    payload = load_checkpoint(path)[PAYLOAD_KEY]
    assert payload["stage"] == "dpo" and payload["backbone_prefix"] == "policy."
    policy, tokenizer = load_policy(path)  # what generate and export load
    ids = torch.tensor([tokenizer.render_prompt([{"role": "user", "content": "Hi"}])])
    torch.testing.assert_close(policy(ids), module.policy.eval()(ids))
    nets = load_networks(str(path), None, str(path), True, tokenizer)  # PPO's policy_from
    torch.testing.assert_close(nets.policy(ids), nets.reference(ids))
    torch.testing.assert_close(nets.policy(ids), policy(ids))


def test_dpo_args_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match=r"dpo\.loss"):
        DPOArgs(loss="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOArgs(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        DPOArgs(beta=0)
    assert DPOArgs(label_smoothing=0.1).loss_fn().keywords == {"beta": 0.1, "label_smoothing": 0.1}


def test_pipeline_with_algorithm_dpo_runs_sft_then_dpo(tmp_path) -> None:
    from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline

    config = RLHFConfig.from_yaml(REPO / "configs" / "pipeline_tiny.yaml")
    config.save_dir, config.tokenizer_path, config.logger = str(tmp_path / "run"), None, "csv"
    config.algorithm, config.sft_epochs = "dpo", 1
    summary = RLHFPipeline(config).run()
    assert list(summary["stages"]) == ["sft", "dpo"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["stages"].keys() == {"sft", "dpo"} and not (tmp_path / "run" / "reward").exists()
    assert {"val/loss", "val/accuracy", "val/margin"} <= on_disk["stages"]["dpo"].keys()
    done = json.loads((tmp_path / "run" / "dpo" / "done.json").read_text())
    assert load_checkpoint(done["checkpoint"])[PAYLOAD_KEY]["stage"] == "dpo"
    with pytest.raises(ValueError, match="algorithm"):
        RLHFConfig(algorithm="reinforce")
