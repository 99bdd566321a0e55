"""SFT with LoRA -> reward model -> PPO with LoRA on a real pretrained chat model (SmolLM2-135M-Instruct), checked.

Not run by CI (minutes of CPU and a converted model folder). Runs ``configs/pipeline_smollm2.yaml`` through
:class:`rlhf_lightning.pipeline.RLHFPipeline` and checks, from the run's own records:

* step-0 KL is exactly 0: PPO's first iteration logs ``rollout/kl == 0`` (the reference is the merged SFT model, the
  policy a fresh zero adapter on it), and the first policy minibatch sees ``ratio == 1`` (recorded from
  ``ppo_policy_loss``'s stats on its first call);
* the reward model beats the untrained one on ``data/hh_rlhf/preference_test.jsonl``: the untrained reward model
  (the SFT model + a fresh head) is validated once between the SFT and reward stages;
* PPO raises the held-out reward-model score (``after/val/score > before/val/score``) at ``after/val/kl <= 10`` nats.

Prints one JSON object (figures, per-stage wall times, checks) and exits 1 when a check fails. A rerun on the same
``--save-dir`` resumes: finished stages and the untrained accuracy (``untrained_reward.json``) are kept.

    python benchmarks/smollm2_pipeline.py [--model /work/models/smollm2] [--save-dir runs/bench_smollm2]

The model folder: ``RLHF_SMOLLM2_PATH`` or ``--model`` (see README, "A real pretrained model").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pipeline_smollm2.yaml"
MAX_KL = 10.0  # nats per sequence


def pipeline_for(model: str, save_dir: str, stages: list[str] | None = None):
    """The shipped SmolLM2 pipeline pointed at ``model`` (tokenizer and backbone) and ``save_dir``."""
    import yaml

    from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline

    config = RLHFConfig.from_yaml(CONFIG)
    config.tokenizer_path, config.save_dir = model, save_dir
    sft = yaml.safe_load((ROOT / config.stage_configs["sft"]).read_text(encoding="utf-8"))
    sft["model"]["init_args"]["model"]["hf_path"] = model
    config.stage_configs = {**config.stage_configs, "sft": sft}
    return RLHFPipeline(config, stages=stages)


def untrained_reward_accuracy(pipeline, sft_checkpoint: str) -> dict[str, float]:
    """``val/accuracy`` and ``val/loss`` of the SFT model + a fresh head on the reward stage's validation pairs."""
    config = pipeline.stage_config("reward", {"sft": sft_checkpoint})
    config["trainer"]["logger"] = False
    config["trainer"]["callbacks"] = []
    cli = pipeline._cli(config)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items() if k in ("val/accuracy", "val/loss")}


def first_ppo_row(save_dir: str) -> dict[str, str]:
    """The first PPO iteration's row of ``ppo/logs/metrics.csv`` (the row that holds ``rollout/kl``)."""
    with open(Path(save_dir) / "ppo" / "logs" / "metrics.csv", newline="", encoding="utf-8") as f:
        return next(row for row in csv.DictReader(f) if row.get("rollout/kl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("RLHF_SMOLLM2_PATH", "/work/models/smollm2"))
    parser.add_argument("--save-dir", default="runs/bench_smollm2")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"{args.model}: no converted model folder (config.json); see README 'A real pretrained model'")
        return 2

    import rlhf_lightning.stages.ppo as ppo_stage

    first_policy_stats: dict[str, float] = {}
    real_loss = ppo_stage.ppo_policy_loss

    def recording_loss(*a: Any, **k: Any):
        loss, stats = real_loss(*a, **k)
        if not first_policy_stats:
            first_policy_stats.update({key: float(v) for key, v in stats.items()})
        return loss, stats

    walls: dict[str, float] = {}
    started = time.perf_counter()
    root = Path(args.save_dir)
    t = time.perf_counter()
    if not (
        root / "sft" / "done.json"
    ).is_file():  # a rerun on the same folder resumes: finished stages are kept
        pipeline_for(args.model, args.save_dir, ["sft"]).run()
    walls["sft_s"] = round(time.perf_counter() - t, 1)
    done = json.loads((root / "sft" / "done.json").read_text(encoding="utf-8"))
    stored = root / "untrained_reward.json"
    t = time.perf_counter()
    if stored.is_file():
        untrained = json.loads(stored.read_text(encoding="utf-8"))
    else:
        untrained = untrained_reward_accuracy(pipeline_for(args.model, args.save_dir), done["checkpoint"])
        stored.write_text(json.dumps(untrained), encoding="utf-8")
    walls["untrained_reward_eval_s"] = round(time.perf_counter() - t, 1)
    print(f"[bench] untrained reward model: {untrained}", flush=True)
    with mock.patch.object(ppo_stage, "ppo_policy_loss", recording_loss):
        summary = pipeline_for(args.model, args.save_dir).run()
    stages = summary["stages"]
    walls["sft_s"] = stages["sft"]["wall_time_s"]
    walls["reward_s"] = stages["reward"]["wall_time_s"]
    walls["ppo_s"] = stages["ppo"]["wall_time_s"]
    walls["total_s"] = round(time.perf_counter() - started, 1)
    row = first_ppo_row(args.save_dir)
    reward = stages["reward"]
    ppo = stages["ppo"]
    figures = {
        "untrained_reward_accuracy": untrained.get("val/accuracy"),
        "reward_accuracy": reward.get("val/accuracy"),
        "reward_best_val_loss": reward.get("best/val/loss"),
        "sft_val_loss": stages["sft"].get("val/loss"),
        "ppo_step0_kl": float(row["rollout/kl"]),
        "ppo_first_minibatch_ratio_mean": first_policy_stats.get("ratio_mean"),
        "ppo_first_minibatch_ratio_max": first_policy_stats.get("ratio_max"),
        "ppo_score_before": ppo.get("before/val/score"),
        "ppo_score_after": ppo.get("after/val/score"),
        "ppo_kl_after": ppo.get("after/val/kl"),
    }
    checks = {
        "step0_kl_exactly_0": figures["ppo_step0_kl"] == 0.0,
        "step0_ratio_is_1": figures["ppo_first_minibatch_ratio_max"] == 1.0
        and figures["ppo_first_minibatch_ratio_mean"] == 1.0,
        "reward_beats_untrained": (figures["reward_accuracy"] or 0)
        > (figures["untrained_reward_accuracy"] or 1),
        "ppo_score_up": (figures["ppo_score_after"] or 0) > (figures["ppo_score_before"] or 0),
        "ppo_kl_at_most_10": figures["ppo_kl_after"] is not None and figures["ppo_kl_after"] <= MAX_KL,
    }
    print(json.dumps({"figures": figures, "wall_times": walls, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
