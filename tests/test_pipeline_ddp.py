"""The whole pipeline on 2 CPU processes (gloo) through ``rlhf-lightning pipeline --devices 2 --strategy ddp``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pipeline_tiny.yaml"


def _numbers(results: dict) -> dict[str, float]:
    return {k: float(v) for k, v in results.items() if isinstance(v, int | float)}


def _pipeline(run: Path, *extra: str) -> str:
    """``rlhf-lightning pipeline`` on pipeline_tiny.yaml, shortened, on 2 gloo processes; its output."""
    cmd = [
        sys.executable,
        "-m",
        "rlhf_lightning.cli",
        "pipeline",
        "--config",
        str(TINY),
        "--save_dir",
        str(run),
    ]
    cmd += [
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--device",
        "cpu",
        "--sft_epochs",
        "1",
        "--ppo_iterations",
        "2",
    ]
    cmd += ["--logger", "csv", "--eval_prompts", "8", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_tiny_pipeline_runs_on_two_cpu_ranks(tmp_path):
    """pipeline_tiny.yaml unchanged but for its length (1 SFT epoch, 2 PPO iterations) and ``--devices 2 --strategy
    ddp --device cpu``: the launcher's second rank joins every stage (one launch, one process group), rank 0 alone
    writes the bookkeeping, every stage runs once and hands its checkpoint on, and the summary holds finite metrics
    for every stage and the closing evaluation."""
    run = tmp_path / "run"
    # --overwrite: rank 1, started once rank 0 has begun SFT, must not delete the run folder again
    out = _pipeline(run, "--overwrite")

    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "reward", "ppo"]
    for stage, results in summary["stages"].items():
        numbers = _numbers(results)
        assert numbers and all(math.isfinite(v) for v in numbers.values()), (stage, results)
    sft, reward, ppo = (summary["stages"][s] for s in ("sft", "reward", "ppo"))
    assert 0 < sft["val/loss"] < 10 and 0 <= reward["val/accuracy"] <= 1
    assert {"before/val/score", "after/val/score", "after/val/kl"} <= ppo.keys()
    assert [p["name"] for p in summary["evaluation"]["policies"]] == ["baseline", "ppo"]

    handed = {}
    for stage in ("sft", "reward", "ppo"):
        checkpoint = json.loads((run / stage / "done.json").read_text())["checkpoint"]
        assert Path(checkpoint).is_file() and Path(checkpoint).is_relative_to(run / stage / "checkpoints"), (
            checkpoint
        )
        handed[stage] = checkpoint
    # the next stages were given exactly those checkpoints (the same on both ranks: one config.yaml, rank 0's)
    reward_args = yaml.safe_load((run / "reward" / "config.yaml").read_text())["model"]["init_args"]
    ppo_args = yaml.safe_load((run / "ppo" / "config.yaml").read_text())["model"]["init_args"]
    assert reward_args["init_from"] == handed["sft"]
    assert (ppo_args["policy_from"], ppo_args["reward_from"]) == (handed["sft"], handed["reward"])
    assert torch.load(handed["ppo"], map_location="cpu", weights_only=False)["global_step"] == 2

    # each stage ran once, on both ranks of one process group, and rank 0 alone reported it
    for stage in ("sft", "reward", "ppo"):
        assert out.count(f"[pipeline] {stage}: starting") == 1, out[-4000:]
        assert len(list((run / stage / "logs").glob("**/metrics.csv"))) == 1
    assert (
        out.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 1
    )  # one launch for all stages
    assert out.count("[rank: 1] Seed set to 0") == 3  # rank 1 built every stage
    assert not list(run.glob("*.previous-*"))
    assert (run / "tokenizer.json").is_file() and (run / "sft" / "config.yaml").is_file()

    # PPO again as asked: SFT and reward skipped on both ranks, the old PPO folder moved aside once, by rank 0
    again = _pipeline(run, "--stages", "ppo")
    assert "[pipeline] ppo: starting" in again and "[pipeline] sft: starting" not in again
    assert [p.name for p in run.glob("*.previous-*")] == ["ppo.previous-1"]
    assert again.count("running it again as asked") == 1
    rerun = json.loads((run / "summary.json").read_text())
    assert rerun["stages"]["sft"] == summary["stages"]["sft"]
    assert json.loads((run / "ppo" / "done.json").read_text())["checkpoint"].startswith(str(run / "ppo"))
