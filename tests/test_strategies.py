"""The strategy fragments under configs/strategies/ combine with a stage config through the CLI (parsed, not run).

Each fragment is a second ``--config`` after a stage config: its ``trainer`` keys override the stage's, everything
else stays. A fragment's strategy must be one Lightning knows (a registered name or an importable Strategy class with
valid arguments), so a typo fails here rather than at the start of a multi-GPU job.
"""

from __future__ import annotations

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
    assert {"ddp_cpu", "ddp_gpus", "multinode", "fsdp", "deepspeed_zero2"} <= names


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
class FSDP2SFTModule(SFTModule):
    """SFT with its network sharded by FSDP2 (``fully_shard``) for Lightning's ModelParallelStrategy: each block, then
    the whole network (embeddings, final norm, LM head). The SFT loss calls ``hidden_states`` and ``lm_head`` rather
    than ``forward``, so ``hidden_states`` is registered as a forward method (it gathers the root's parameters)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        register_fsdp_forward_method(self.model, "hidden_states")


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


@pytest.mark.slow
def test_fsdp2_sft_on_two_cpu_processes_writes_a_checkpoint_generate_loads(tmp_path: Path) -> None:
    """Lightning's FSDPStrategy refuses CPU (and torch's FSDP1 needs an accelerator), but FSDP2 through
    ModelParallelStrategy runs on gloo: sft_tiny.yaml on 2 CPU processes, one full (unsharded) checkpoint file."""
    import torch

    (tmp_path / "data").symlink_to(REPO / "data")
    _cli(
        tmp_path,
        "fit",
        "--config",
        str(STAGE),
        "--model",
        "test_strategies.FSDP2SFTModule",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2",
        "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.strategy.save_distributed_checkpoint=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
    )
    ckpt = tmp_path / "runs/tiny/sft/checkpoints/last.ckpt"
    assert ckpt.is_file()  # one file, not a folder of shards
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    embedding = next(v for k, v in state.items() if k.endswith("wte.weight"))
    assert embedding.shape == (
        512,
        64,
    )  # the whole table (tiny preset, vocabulary 512), gathered from both ranks
    replies = _cli(tmp_path, "generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--max_new_tokens", "8")
    assert replies.stdout.strip()
