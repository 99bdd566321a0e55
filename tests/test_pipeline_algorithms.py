"""The pipeline's algorithm choice: ``algorithm: grpo | dr_grpo | rloo`` (the GRPOModule stage after SFT, with a
reward-model stage only when the stage config uses one), the RLHFConfig fields on the GRPO keys, and the tiny
end-to-end GRPO run (summary, before/after metrics, closing evaluation, plots)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.callbacks import PPOProgress
from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_checkpoint
from rlhf_lightning.stages.grpo import GRPOArgs

REPO = Path(__file__).resolve().parents[1]
INPUTS = {"sft": "S.ckpt", "reward": "R.ckpt"}


def test_rloo_maps_the_rlhfconfig_fields_onto_the_grpo_module_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the default stage_configs: configs/rloo.yaml (a reward model with weight 1)
    config = RLHFConfig(
        algorithm="rloo",
        ppo_data_path="c.jsonl",
        ppo_val_path="c_val.jsonl",
        ppo_iterations=7,
        ppo_lr_policy=1e-5,
        ppo_lr_value=2e-5,
        ppo_batch_size=12,
        save_interval=5,
        device="cpu",
        save_dir=str(tmp_path / "run"),
    )
    pipe = RLHFPipeline(config)
    assert pipe.chain == ("sft", "reward", "rloo")
    rloo = pipe.stage_config("rloo", INPUTS)
    args = rloo["model"]["init_args"]
    assert args["policy_from"] == "S.ckpt" and args["reward_from"] == "R.ckpt"
    assert rloo["trainer"]["max_steps"] == 7 and args["grpo"]["iterations"] == 7
    assert args["grpo"]["baseline"] == "rloo" and args["grpo"]["kl_in_reward"] is True  # the YAML's own kept
    assert args["optimizer"]["init_args"] == {"lr": 1e-5, "weight_decay": 0.0}
    assert "policy_optimizer" not in args and "value_optimizer" not in args  # no critic: ppo_lr_value unused
    data = rloo["data"]["init_args"]
    assert (data["train_path"], data["val_path"], data["batch_size"]) == ("c.jsonl", "c_val.jsonl", 12)
    checkpoint = next(c for c in rloo["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["every_n_train_steps"] == 5
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "run" / "rloo" / "checkpoints")
    cli = pipe._cli(rloo)  # the stage CLI parses it into the module (no weights are loaded)
    assert type(cli.model).__name__ == "GRPOModule" and cli.trainer.max_steps == 7
    assert cli.model.grpo.iterations == 7 and cli.model.grpo.baseline == "rloo"
    assert cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 1e-5


def test_grpo_without_reward_model_weight_skips_the_reward_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    verifiable = {
        "sft": "configs/sft.yaml",
        "grpo": "configs/grpo_gsm8k.yaml",
    }  # model_weight: 0, no reward key
    config = RLHFConfig(algorithm="dr_grpo", stage_configs=verifiable, save_dir=str(tmp_path / "run"))
    pipe = RLHFPipeline(config)
    assert pipe.chain == ("sft", "grpo")
    args = pipe.stage_config("grpo", {"sft": "S.ckpt"})["model"]["init_args"]
    assert (
        args["reward_from"] is None and args["policy_from"] == "S.ckpt"
    )  # the YAML's runs/reward is not loaded
    assert args["grpo"]["baseline"] == "dr_grpo"  # the grpo stage config, Dr. GRPO's baseline
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['reward'\]"):
        RLHFPipeline(config, stages=["reward"])
    # the same algorithm with a reward model in the stage config: the reward stage comes back, and is required
    weighted = {"sft": "configs/sft.yaml", "grpo": "configs/grpo.yaml"}
    with pytest.raises(ValueError, match=r"stage_configs lacks \['reward'\]"):
        RLHFPipeline(RLHFConfig(algorithm="grpo", stage_configs=weighted))
    weighted["reward"] = "configs/reward.yaml"
    assert RLHFPipeline(RLHFConfig(algorithm="grpo", stage_configs=weighted)).chain == (
        "sft",
        "reward",
        "grpo",
    )


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
@pytest.mark.parametrize("name", ["pipeline.yaml", "pipeline_tiny.yaml"])
def test_shipped_pipeline_configs_build_the_grpo_stages(name, algorithm, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = RLHFConfig.from_yaml(REPO / "configs" / name)
    config.save_dir, config.algorithm = str(tmp_path / "run"), algorithm
    pipe = RLHFPipeline(config)
    cli = pipe._cli(pipe.stage_config(algorithm, INPUTS))
    assert type(cli.model).__name__ == "GRPOModule" and cli.model.grpo.baseline == algorithm
    assert cli.model.grpo.iterations == cli.trainer.max_steps == config.ppo_iterations


def test_progress_counts_grpo_iterations_without_max_steps():
    progress = PPOProgress(log_every_n=0)
    trainer = SimpleNamespace(max_steps=-1)
    progress.on_fit_start(trainer, SimpleNamespace(grpo=GRPOArgs(iterations=5)))
    assert progress.total == 5


def test_tiny_pipeline_with_algorithm_grpo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = RLHFConfig.from_yaml(REPO / "configs" / "pipeline_tiny.yaml")
    config.save_dir, config.tokenizer_path, config.logger = str(tmp_path / "run"), None, "csv"
    config.algorithm, config.sft_epochs, config.ppo_iterations, config.eval_prompts = "grpo", 1, 2, 6
    run = tmp_path / "run"
    summary = RLHFPipeline(config).run()
    assert list(summary["stages"]) == ["sft", "grpo"] and not (run / "reward").exists()  # a rule reward only
    on_disk = json.loads((run / "summary.json").read_text())
    grpo = on_disk["stages"]["grpo"]
    assert {"before/val/score", "after/val/score", "after/val/kl", "after/val/response_len"} <= grpo.keys()
    done = json.loads((run / "grpo" / "done.json").read_text())
    assert load_checkpoint(done["checkpoint"])[PAYLOAD_KEY]["stage"] == "grpo"
    assert Path(done["checkpoint"]).is_file()
    evaluation = on_disk["evaluation"]
    assert "error" not in evaluation, evaluation
    assert [p["name"] for p in evaluation["policies"]] == ["baseline", "grpo"]
    report = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert report["judges"] == ["brevity"] and report["n_prompts"] == 6  # the stage's reward function judges
    assert (run / "plots" / "grpo.png").stat().st_size > 5000 and (run / "plots" / "sft.png").is_file()
