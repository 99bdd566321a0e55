"""NonFiniteGuard and check_finite: a non-finite loss, gradient, score, advantage, metric or weight stops the stage
with a located message, and never reaches a checkpoint (unit runs on a toy module, then SFT, PPO and the pipeline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.cli import main
from rlhf_lightning.guards import NonFiniteError, NonFiniteGuard, check_finite
from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "data" / "hh_rlhf" / "sft_train.jsonl"


def nan_reward(prompt, response, row) -> float:
    """A broken reward function (used by the PPO test as ``test_guards:nan_reward``)."""
    return math.nan


class Toy(L.LightningModule):
    """A linear regression whose training loss is NaN at the steps in ``bad_steps`` and whose val/loss can be NaN."""

    def __init__(self, bad_steps=(), nan_val: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_steps, self.nan_val = set(bad_steps), nan_val

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * math.nan if self.global_step in self.bad_steps else loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", math.nan if self.nan_val else self.layer(batch[0]).pow(2).mean().item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)

    val_dataloader = train_dataloader


def _fit(tmp_path: Path, module: Toy, guard: NonFiniteGuard | None = None, **kwargs) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=1, save_last=True)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[guard or NonFiniteGuard(), checkpoint],
        enable_checkpointing=True,
        **kwargs,
    )
    trainer.fit(module)
    return trainer


def _checkpoints_finite(folder: Path) -> bool:
    return all(
        all(torch.isfinite(t).all() for t in torch.load(p, weights_only=False)["state_dict"].values())
        for p in folder.glob("*.ckpt")
    )


def test_check_finite_names_stage_step_and_quantity():
    check_finite("ppo", 3, score=torch.ones(4), count=torch.tensor([1, 2]), nothing=None)
    with pytest.raises(
        NonFiniteError, match=r"ppo: non-finite advantage at step 3 \(2 of 4 value\(s\), e\.g\. nan"
    ):
        check_finite("ppo", 3, score=torch.ones(4), advantage=torch.tensor([0.0, math.nan, math.inf, 1.0]))


def test_nan_loss_stops_before_the_step_and_writes_no_checkpoint(tmp_path):
    module = Toy(bad_steps={2})
    with pytest.raises(NonFiniteError, match="toy: non-finite loss at step 2"):
        _fit(tmp_path, module, val_check_interval=1)
    assert all(
        torch.isfinite(p).all() for p in module.parameters()
    )  # the bad step never reached the optimizer
    assert _checkpoints_finite(tmp_path / "ckpt")


def test_nan_val_metric_never_becomes_best(tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite val/loss at step 2"):
        _fit(tmp_path, Toy(nan_val=True), val_check_interval=2, num_sanity_val_steps=0)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # without the guard Lightning keeps it as best (inf)


def test_max_bad_steps_skips_then_stops(tmp_path, capsys):
    module = Toy(bad_steps={1, 3})
    trainer = _fit(tmp_path, module, guard=NonFiniteGuard(max_bad_steps=2), limit_val_batches=0)
    assert trainer.global_step == 6 and all(torch.isfinite(p).all() for p in module.parameters())
    assert "step skipped (2 of max_bad_steps=2)" in capsys.readouterr().err
    with pytest.raises(NonFiniteError, match="non-finite loss at step 4"):
        _fit(
            tmp_path / "again",
            Toy(bad_steps={1, 3, 4}),
            guard=NonFiniteGuard(max_bad_steps=2),
            limit_val_batches=0,
        )


def test_checkpoint_with_non_finite_weights_is_not_written(tmp_path):
    module = Toy()
    trainer = _fit(tmp_path, module, limit_val_batches=0)
    with torch.no_grad():
        module.layer.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"weight layer\.weight"):
        trainer.save_checkpoint(tmp_path / "broken.ckpt")
    assert not (tmp_path / "broken.ckpt").exists()


def _sft_config(tmp_path: Path, tokenizer: str, lr: float) -> dict:
    config = yaml.safe_load((REPO / "configs" / "sft_tiny.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config["data"]["init_args"].update(train_path=str(SFT_DATA), tokenizer_path=tokenizer)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = lr
    return config


def test_sft_with_a_huge_learning_rate_stops_with_a_one_line_error(tmp_path, tiny_tokenizer, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(_sft_config(tmp_path, tiny_tokenizer.source, lr=1e6)))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "error: sft: non-finite gradient_norm at step" in capsys.readouterr().err
    assert _checkpoints_finite(tmp_path / "checkpoints")  # in practice none: NaN from the first steps


def test_ppo_with_a_nan_reward_function_stops(tmp_path, tiny_tokenizer):
    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
    from rlhf_lightning.stages.rewards import RewardArgs
    from rlhf_lightning.stages.sft import SFTModule

    sft = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    sft.fit(
        SFTModule(model=ModelArgs(preset="tiny")),
        SFTDataModule(tokenizer_path=tiny_tokenizer.source, max_length=128),
    )
    sft.save_checkpoint(tmp_path / "sft.ckpt")
    ppo = PPOModule(
        policy_from=str(tmp_path / "sft.ckpt"),
        tokenizer_path=tiny_tokenizer.source,
        ppo=PPOArgs(iterations=2, epochs=1, minibatch_size=4),
        rewards=RewardArgs(model_weight=0.0, functions=["test_guards:nan_reward"]),
        generation=GenerationArgs(max_new_tokens=8),
        sample_every_n=0,
    )
    prompts = PromptDataModule(
        train_path=str(REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"),
        tokenizer_path=tiny_tokenizer.source,
        batch_size=4,
        max_prompt_length=32,
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[NonFiniteGuard()])
    with pytest.raises(NonFiniteError, match="ppo: non-finite raw_score at step 0"):
        trainer.fit(ppo, datamodule=prompts)
    assert trainer.global_step == 0


def test_pipeline_stops_at_a_nan_stage_and_leaves_it_unfinished(tmp_path, tiny_tokenizer):
    sft = _sft_config(tmp_path, tiny_tokenizer.source, lr=1e6)
    config = RLHFConfig(
        tokenizer_path=tiny_tokenizer.source,
        sft_data_path=str(SFT_DATA),
        device="cpu",
        logger="csv",
        save_dir=str(tmp_path / "run"),
        stage_configs={"sft": sft, "reward": "configs/reward_tiny.yaml", "ppo": "configs/ppo_tiny.yaml"},
    )
    with pytest.raises(NonFiniteError, match="sft: non-finite"):
        RLHFPipeline(config, stages=["sft"]).run()
    run = tmp_path / "run"
    assert not (run / "sft" / "done.json").exists()
    summary = run / "summary.json"
    assert not summary.exists() or "sft" not in json.loads(summary.read_text())["stages"]
    assert _checkpoints_finite(run / "sft" / "checkpoints")
