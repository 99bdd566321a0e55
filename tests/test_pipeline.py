"""The pipeline: RLHFConfig mapping, early validation, the tiny end-to-end run, interruption and resume."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lightning.pipeline import STAGES, RLHFConfig, RLHFPipeline, format_summary

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pipeline_tiny.yaml"


def _tiny_config(save_dir: Path, **overrides) -> RLHFConfig:
    config = RLHFConfig.from_yaml(TINY)
    config.save_dir = str(save_dir)
    config.tokenizer_path = None  # the run folder's own tokenizer.json
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_rlhfconfig_maps_onto_stage_configs(tmp_path):
    config = RLHFConfig(
        tokenizer_path=str(tmp_path / "tok.json"),
        sft_data_path="a.jsonl",
        reward_data_path="b.jsonl",
        ppo_data_path="c.jsonl",
        sft_epochs=3,
        reward_epochs=2,
        ppo_iterations=7,
        ppo_lr_policy=1e-5,
        ppo_lr_value=2e-5,
        ppo_batch_size=12,
        device="cpu",
        save_dir=str(tmp_path / "run"),
        save_interval=5,
    )
    pipe = RLHFPipeline(config)
    inputs = {"sft": "S.ckpt", "reward": "R.ckpt"}
    sft, reward, ppo = (pipe.stage_config(stage, inputs) for stage in STAGES)
    assert sft["data"]["init_args"]["train_path"] == "a.jsonl"
    assert sft["trainer"]["max_epochs"] == 3 and sft["trainer"]["accelerator"] == "cpu"
    assert all(
        c["data"]["init_args"]["tokenizer_path"] == str(tmp_path / "tok.json") for c in (sft, reward, ppo)
    )
    assert reward["data"]["init_args"]["train_path"] == "b.jsonl" and reward["trainer"]["max_epochs"] == 2
    assert reward["model"]["init_args"]["init_from"] == "S.ckpt"
    ppo_args = ppo["model"]["init_args"]
    assert ppo_args["policy_from"] == "S.ckpt" and ppo_args["reward_from"] == "R.ckpt"
    assert ppo["trainer"]["max_steps"] == 7 and ppo_args["ppo"]["iterations"] == 7
    assert ppo_args["policy_optimizer"]["init_args"]["lr"] == 1e-5
    assert ppo_args["value_optimizer"]["init_args"]["lr"] == 2e-5
    assert (
        ppo["data"]["init_args"]["batch_size"] == 12 and ppo["data"]["init_args"]["train_path"] == "c.jsonl"
    )
    checkpoint = next(c for c in ppo["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["every_n_train_steps"] == 5
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "run" / "ppo" / "checkpoints")


def test_rlhfconfig_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="device"):
        RLHFConfig(device="tpu")
    with pytest.raises(ValueError, match="ppo_iterations"):
        RLHFConfig(ppo_iterations=0)
    bad = tmp_path / "p.yaml"
    bad.write_text("sft_epoch: 3\n")
    with pytest.raises(ValueError, match="sft_epoch"):
        RLHFConfig.from_yaml(bad)


def test_bad_ppo_data_path_fails_before_sft_trains(tmp_path):
    config = _tiny_config(tmp_path / "run", ppo_data_path=str(tmp_path / "missing_prompts.jsonl"))
    started = time.perf_counter()
    with pytest.raises(Exception, match=r"missing_prompts\.jsonl"):
        RLHFPipeline(config).run()
    assert time.perf_counter() - started < 60
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # nothing trained


def test_bad_reward_row_fails_before_sft_trains(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "same", "rejected": "same"}\n')
    config = _tiny_config(tmp_path / "run", reward_data_path=str(bad))
    with pytest.raises(Exception, match=r"pairs\.jsonl.*line 1"):
        RLHFPipeline(config).run()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def _run_cli(save_dir: Path, *extra: str, **kwargs) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.pipeline",
        "--config",
        str(TINY),
        "--save_dir",
        str(save_dir),
        "--tokenizer_path",
        str(save_dir / "tokenizer.json"),
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def test_pipeline_end_to_end_then_rerun_skips(tmp_path):
    run = tmp_path / "run"
    summary = RLHFPipeline(_tiny_config(run)).run()
    for stage in STAGES:
        done = json.loads((run / stage / "done.json").read_text())
        assert Path(done["checkpoint"]).is_file()
        assert (run / stage / "config.yaml").is_file()
    assert (run / "tokenizer.json").is_file()
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["stages"].keys() == {"sft", "reward", "ppo"}
    assert "val/loss" in summary["stages"]["sft"] and "val/accuracy" in summary["stages"]["reward"]
    assert {"before/val/score", "after/val/score", "after/val/kl"} <= summary["stages"]["ppo"].keys()
    assert "after/val/score" in format_summary(summary)
    assert [p["name"] for p in on_disk["evaluation"]["policies"]] == [
        "baseline",
        "ppo",
    ]  # SFT vs PPO, held out
    stamp = (run / "ppo" / "done.json").stat().st_mtime
    evaluated = (run / "evaluation" / "evaluation.json").stat().st_mtime
    RLHFPipeline(_tiny_config(run)).run()  # a finished run is skipped, not retrained or overwritten
    assert (run / "ppo" / "done.json").stat().st_mtime == stamp
    assert (run / "evaluation" / "evaluation.json").stat().st_mtime == evaluated  # nor evaluated again


@pytest.mark.slow  # kills a subprocess at a moment that depends on the machine's speed: run it by hand
def test_killed_during_reward_stage_resumes(tmp_path):
    run = tmp_path / "run"
    proc = _run_cli(run, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((run / "reward" / "checkpoints").glob("*.ckpt")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "sft" / "done.json").is_file() and not (run / "reward" / "done.json").exists()
    sft_done = (run / "sft" / "done.json").stat().st_mtime
    rerun = _run_cli(run)
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out
    assert "sft: finished earlier, skipped" in out
    assert "reward: resuming from" in out
    assert (run / "sft" / "done.json").stat().st_mtime == sft_done
    assert all((run / stage / "done.json").is_file() for stage in STAGES)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("pipeline*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_config_builds_its_three_stage_configs(path, tmp_path, monkeypatch):
    """Each shipped pipeline YAML maps onto stage configs that the stage CLI parses and instantiates (no weights)."""
    monkeypatch.chdir(REPO)
    config = RLHFConfig.from_yaml(path)
    config.save_dir = str(tmp_path / "run")
    pipe = RLHFPipeline(config)
    for stage in STAGES:
        stage_config = pipe.stage_config(stage, {"sft": "<sft checkpoint>", "reward": "<reward checkpoint>"})
        cli = pipe._cli(stage_config)
        assert (
            type(cli.model).__name__
            == {"sft": "SFTModule", "reward": "RewardModule", "ppo": "PPOModule"}[stage]
        )
        assert cli.trainer.max_epochs is not None or cli.trainer.max_steps > 0


def test_each_stage_is_set_up_once(tmp_path, monkeypatch):
    """Validation builds no Trainer and sets no seed; the first stage runs on the build its validation made, later
    stages (whose configs name an earlier checkpoint) build once more (their LightningModule objects only: networks
    are built in configure_model), and the closing evaluation reuses the final stage's settings: one Trainer, one
    seed and one network build per stage."""
    import lightning.pytorch.cli as lightning_cli
    from lightning.pytorch import Trainer

    from rlhf_lightning.stages.grpo import GRPOModule
    from rlhf_lightning.stages.sft import SFTModule

    trainers: list[str] = []
    modules: list[str] = []
    seeds: list[int] = []
    trainer_init = Trainer.__init__

    @functools.wraps(trainer_init)  # the CLI reads the signature
    def count_trainer(self, *args, **kwargs):
        trainers.append(Path(kwargs["default_root_dir"]).name)
        trainer_init(self, *args, **kwargs)

    def spy(cls, method: str, calls: list[str]):
        original = getattr(cls, method)

        @functools.wraps(original)  # the CLI reads __init__'s signature
        def counted(self, *args, **kwargs):
            calls.append(cls.__name__)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    monkeypatch.setattr(Trainer, "__init__", count_trainer)
    seed = lightning_cli.seed_everything
    monkeypatch.setattr(
        lightning_cli, "seed_everything", lambda *a, **k: seeds.append(seed(*a, **k)) or seeds[-1]
    )
    for cls in (SFTModule, GRPOModule):
        spy(cls, "__init__", modules)
    monkeypatch.chdir(REPO)
    config = _tiny_config(tmp_path / "run", algorithm="grpo", sft_epochs=1, ppo_iterations=2, eval_prompts=4)
    config.logger = "csv"
    summary = RLHFPipeline(config).run()
    assert list(summary["stages"]) == ["sft", "grpo"] and "error" not in summary["evaluation"]
    assert trainers == ["sft", "grpo"]  # none for validation, none for the evaluation
    assert len(seeds) == 2  # one "Seed set to ..." per stage
    # SFT: the validated build runs; GRPO: checked with a placeholder checkpoint, then built with the real one
    assert modules == ["SFTModule", "GRPOModule", "GRPOModule"]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo"])
def test_devices_strategy_and_num_nodes_reach_every_stage_trainer(algorithm, tmp_path, monkeypatch):
    """RLHFConfig.devices/strategy/num_nodes are written into every stage's trainer config (and parse there); None
    keeps the stage YAML's own values."""
    monkeypatch.chdir(REPO)
    inputs = {"sft": "<sft checkpoint>", "reward": "<reward checkpoint>"}
    config = _tiny_config(tmp_path / "run", algorithm=algorithm, devices=2, strategy="ddp", num_nodes=3)
    pipe = RLHFPipeline(config)
    for stage in pipe.chain:
        trainer = pipe.stage_config(stage, inputs)["trainer"]
        assert (trainer["devices"], trainer["strategy"], trainer["num_nodes"]) == (2, "ddp", 3), stage
        assert trainer["accelerator"] == "cpu"
    kept = RLHFPipeline(_tiny_config(tmp_path / "kept", algorithm=algorithm))
    for stage in kept.chain:
        source, trainer = kept._source(stage).get("trainer", {}), kept.stage_config(stage, inputs)["trainer"]
        assert all(trainer.get(k) == source.get(k) for k in ("devices", "strategy", "num_nodes")), stage
    with pytest.raises(ValueError, match="num_nodes"):
        RLHFConfig(num_nodes=0)


def test_pipeline_cli_takes_devices_strategy_and_num_nodes(tmp_path, monkeypatch):
    """``rlhf-lightning pipeline --devices 2 --strategy ddp --num_nodes 1`` reaches RLHFConfig."""
    import rlhf_lightning.pipeline as pipeline

    seen: list[RLHFConfig] = []
    monkeypatch.setattr(pipeline.RLHFPipeline, "run", lambda self: seen.append(self.config) or {})
    pipeline.main(["--config", str(TINY), "--devices", "2", "--strategy", "ddp", "--num_nodes", "1"])
    assert (seen[0].devices, seen[0].strategy, seen[0].num_nodes) == (2, "ddp", 1)


@pytest.mark.parametrize(
    ("env", "main"),
    [
        ({}, True),
        (
            {"LOCAL_RANK": "0", "NODE_RANK": "0"},
            True,
        ),  # the launching process once Lightning started the others
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # a rank the DDP launcher started
        ({"NODE_RANK": "1"}, False),  # the first process of a second node
        ({"RANK": "3"}, False),
        ({"SLURM_PROCID": "2"}, False),
    ],
)
def test_is_main_process_before_the_process_group_exists(env, main, monkeypatch):
    """Before the first Trainer joins a process group, the rank variables decide who writes the run folder; agree()
    is then the identity (nothing to broadcast to)."""
    from rlhf_lightning.pipeline import agree, is_main_process

    for key in ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_main_process() is main
    assert agree({"checkpoint": "a.ckpt"}) == {"checkpoint": "a.ckpt"}
