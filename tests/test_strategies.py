"""The strategy fragments under configs/strategies/ combine with a stage config through the CLI.

Each fragment is a second ``--config`` after a stage config: its ``trainer`` keys override the stage's, everything
else stays. A fragment's strategy must be one Lightning knows (a registered name or an importable Strategy class with
valid arguments), so a typo fails here rather than at the start of a multi-GPU job. The fragments are parsed, not
run, except ``fsdp2.yaml``: the slow test runs SFT, the reward model and PPO under it on 2 CPU processes (gloo).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import main
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))
STAGE = REPO / "configs" / "sft_tiny.yaml"


def test_the_documented_fragments_ship() -> None:
    names = {p.stem for p in STRATEGIES}
    assert {
        "ddp_cpu",
        "ddp_gpus",
        "multinode",
        "fsdp",
        "fsdp2",
        "deepspeed_zero2",
        "deepspeed_zero3",
    } <= names


@pytest.mark.parametrize("path", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_fragment_overrides_only_the_trainer_of_a_stage_config(
    path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    fragment = yaml.safe_load(path.read_text())
    assert set(fragment) == {"trainer"}, f"{path.name}: a strategy fragment sets trainer keys only"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(STAGE), "--config", str(path), "--print_config"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    printed = yaml.safe_load(out)
    stage = yaml.safe_load(STAGE.read_text())
    for key, value in fragment["trainer"].items():
        got = printed["trainer"][key]
        if isinstance(value, dict):  # a Strategy class: its arguments pass through as written
            assert got["class_path"] == value["class_path"]
            assert {k: got["init_args"][k] for k in value["init_args"]} == value["init_args"]
        else:
            assert got == value, f"trainer.{key}"
    # the stage's own settings survive the merge
    assert printed["model"]["class_path"] == stage["model"]["class_path"]
    assert printed["trainer"]["max_epochs"] == stage["trainer"]["max_epochs"]
    assert printed["trainer"]["use_distributed_sampler"] is False  # the CLI default the DataModules rely on
    strategy = fragment["trainer"]["strategy"]
    if isinstance(strategy, str):
        assert strategy in StrategyRegistry, f"{path.name}: unknown strategy {strategy!r}"


def test_fsdp_fragment_builds_lightnings_fsdp_strategy() -> None:
    """The FSDP fragment's class and arguments construct (no process group needed): full sharding, and a full
    (unsharded) state dict so the checkpoint is one file the other commands load."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp import ShardingStrategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    trainer = yaml.safe_load((REPO / "configs/strategies/fsdp.yaml").read_text())["trainer"]
    cfg = parser.parse_object({"strategy": trainer["strategy"]})
    strategy = parser.instantiate_classes(cfg).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_fragments_name_lightnings_zero_stage(name: str, stage: int) -> None:
    """The name resolves to Lightning's DeepSpeedStrategy at that ZeRO stage (DeepSpeed itself is not installed here,
    so the strategy is not built)."""
    from lightning.pytorch.strategies import StrategyRegistry

    trainer = yaml.safe_load((REPO / f"configs/strategies/{name}.yaml").read_text())["trainer"]
    entry = StrategyRegistry[trainer["strategy"]]
    assert entry["strategy"].__name__ == "DeepSpeedStrategy" and entry["init_params"]["stage"] == stage


def test_sft_refuses_deepspeed_before_training() -> None:
    """ZeRO leaves param.grad empty, so SFT could not turn its token sums into the token mean: it stops in setup."""
    from types import SimpleNamespace

    from rlhf_lightning.stages.checkpoints import SetupError

    class DeepSpeedStrategy:  # what Lightning's class is called; DeepSpeed itself is not installed here
        pass

    module = SFTModule()
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy())
    with pytest.raises(SetupError, match="DeepSpeed"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=object())
    module.setup("fit")  # any other strategy: nothing to refuse


def test_trainer_flags_on_the_command_line_override_a_fragment(capsys: pytest.CaptureFixture) -> None:
    ddp = REPO / "configs" / "strategies" / "multinode.yaml"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(STAGE),
                "--config",
                str(ddp),
                "--trainer.num_nodes",
                "4",
                "--print_config",
            ]
        )
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert yaml.safe_load(out)["trainer"]["num_nodes"] == 4


# ----------------------------------------------------------------------------------------------- FSDP on CPU processes
def test_fsdp2_fragment_builds_a_data_parallel_only_model_parallel_strategy() -> None:
    """FSDP2Strategy: tensor_parallel_size 1, data-parallel over every process (set once the processes exist), one
    full checkpoint file."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlhf_lightning.strategies import FSDP2Strategy

    trainer = yaml.safe_load((REPO / "configs/strategies/fsdp2.yaml").read_text())["trainer"]
    assert trainer["strategy"]["class_path"] == "rlhf_lightning.strategies.FSDP2Strategy"
    strategy = FSDP2Strategy(**trainer["strategy"]["init_args"])
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint is False


@pytest.mark.parametrize("stage", ["dpo.DPOModule", "grpo.GRPOModule"])
def test_stages_that_do_not_shard_refuse_fsdp2_before_loading_anything(stage: str) -> None:
    """DPO and GRPO/RLOO keep whole networks: under FSDP2 (a device mesh) each rank would train its own copy."""
    import importlib

    module_name, class_name = stage.split(".")
    cls = getattr(importlib.import_module(f"rlhf_lightning.stages.{module_name}"), class_name)
    module = cls("no/such/checkpoint")
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(RuntimeError, match="unsynchronised copies; run it with DDP"):
        module.configure_model()


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "rlhf_lightning.cli", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


FSDP2_CPU = [
    "--config",
    str(REPO / "configs/strategies/fsdp2.yaml"),
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
]


def _state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_sft_reward_and_ppo_fit_checkpoint_and_resume_under_fsdp2_on_two_cpu_processes(tmp_path) -> None:
    """The shipped stages under configs/strategies/fsdp2.yaml, no subclass: SFT shards in its own configure_model
    (2 ranks x 4 rows step as 1 process x 8), writes one full checkpoint file, resumes from it, and ``generate`` loads
    it; the reward model starts from that checkpoint, fits, and resumes the same way; PPO starts from both, generates
    from its sharded policy, checkpoints, resumes, and ``generate`` loads its checkpoint."""
    import torch

    (tmp_path / "data").symlink_to(REPO / "data")
    tokenizer = f"--data.init_args.tokenizer_path={tmp_path / 'tokenizer.json'}"  # one for every run
    sft = [
        "--config",
        str(STAGE),
        tokenizer,
        "--model.init_args.model.dropout=0.0",
        "--trainer.limit_val_batches=1",
    ]
    sft += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3"]
    single = tmp_path / "single"
    single.mkdir()
    (single / "data").symlink_to(REPO / "data")
    _cli(single, "fit", *sft, "--data.init_args.batch_size=8")  # the reference: one process, batch 8
    _cli(tmp_path, "fit", *sft, *FSDP2_CPU, "--data.init_args.batch_size=4")
    folder = tmp_path / "runs/tiny/sft/checkpoints"
    sharded = _state(folder / "last.ckpt")
    one = _state(single / "runs/tiny/sft/checkpoints/last.ckpt")["state_dict"]
    assert sharded["global_step"] == 3 and sharded["state_dict"].keys() == one.keys()
    for name, weight in one.items():  # whole tensors gathered from both ranks, equal to the 1-process run's
        torch.testing.assert_close(sharded["state_dict"][name], weight, atol=5e-5, rtol=1e-4, msg=name)
    resumed = _cli(
        tmp_path, "fit", *sft, *FSDP2_CPU, "--data.init_args.batch_size=4", "--trainer.max_epochs=2",
        "--ckpt_path", str(folder / "last.ckpt"),
    )  # fmt: skip
    assert "Restored all states" in resumed.stdout + resumed.stderr
    again = _state(folder / "last.ckpt")
    assert again["global_step"] == 6
    assert not torch.equal(again["state_dict"]["model.wte.weight"], sharded["state_dict"]["model.wte.weight"])
    replies = _cli(
        tmp_path, "generate", "--ckpt", str(folder / "last.ckpt"), "--prompt", "Hi", "--max_new_tokens", "8"
    )
    assert replies.stdout.strip()

    reward = [
        "--config",
        str(REPO / "configs/reward_tiny.yaml"),
        *FSDP2_CPU,
        tokenizer,
        "--trainer.limit_val_batches=2",
    ]
    reward += ["--model.init_args.model.dropout=0.0", "--trainer.val_check_interval=3"]
    _cli(tmp_path, "fit", *reward, "--trainer.max_steps=3")  # init_from: the SFT folder written above
    (last,) = (tmp_path / "runs/tiny/reward").glob("**/checkpoints/last.ckpt")
    first = _state(last)
    assert (
        first["global_step"] == 3 and first["rlhf_lightning"]["score_std"] != 1.0
    )  # validation measured scores
    resumed = _cli(tmp_path, "fit", *reward, "--trainer.max_steps=4", "--ckpt_path", str(last))
    assert "Restored all states" in resumed.stdout + resumed.stderr
    (last,) = (tmp_path / "runs/tiny/reward").glob("version_1/checkpoints/last.ckpt")
    assert _state(last)["global_step"] == 4

    # PPO from those two: policy and critic sharded (generation steps until every rank's rows are done), resumed
    ppo = ["--config", str(REPO / "configs/ppo_tiny.yaml"), *FSDP2_CPU, tokenizer]
    ppo += [
        "--model.init_args.ppo.critic_warmup_iterations=1",
        "--model.init_args.rewards.calibration_samples=8",
    ]
    _cli(tmp_path, "fit", *ppo, "--trainer.max_steps=3")
    ckpt = tmp_path / "runs/tiny/ppo/checkpoints/iter-step=3.ckpt"
    saved = _state(ckpt)
    assert saved["global_step"] == 3 and len(saved["rlhf_lightning"]["generator_states"]) == 2
    assert not any(
        k.startswith(("reference.", "reward_model.")) for k in saved["state_dict"]
    )  # frozen: rebuilt
    resumed = _cli(tmp_path, "fit", *ppo, "--trainer.max_steps=4", "--ckpt_path", str(ckpt))
    out = resumed.stdout + resumed.stderr
    assert "Restored all states" in out and "reward normalisation" not in out  # restored, not re-measured
    rows = list(csv.DictReader(sorted((tmp_path / "runs/tiny/ppo").glob("version_*/metrics.csv"))[-1].open()))
    assert [int(r["step"]) for r in rows if r.get("rollout/score_mean")][-1] == 3  # the 4th iteration logged
    replies = _cli(tmp_path, "generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--max_new_tokens", "8")
    assert replies.stdout.strip()
