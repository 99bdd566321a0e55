"""Seconds per PPO iteration, split into generation, scoring and training, and generated tokens per second.

Runs the real ``PPOModule`` under a Lightning ``Trainer`` on the shipped HH prompts, with random-init checkpoints
(SFT policy and reward model of the chosen preset) written to a temporary folder, so it depends on nothing under
``runs/``. Phases as the stage logs them: ``generation`` (KV-cache sampling), ``scoring`` (policy, reference, critic
and reward-model forwards plus GAE), ``training`` (the PPO epochs over minibatches). A random-init policy rarely
emits EOS, so nearly every response runs to ``--new-tokens``: the upper bound of an iteration's cost. Prints one JSON
object; the first ``--warmup`` iterations are left out of the means.

    python benchmarks/ppo_iteration.py [--preset small --batch 16 --new-tokens 48 --epochs 4 --minibatch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.sft import SFTModule
from rlhf_lightning.tokenization import load_or_train_tokenizer

REPO = Path(__file__).resolve().parents[1]
KEYS = ("time/generation", "time/scoring", "time/training", "time/iteration", "time/generated_tokens_per_sec")


class _Timings(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        row = {key: float(metrics[key]) for key in KEYS}
        row["wall"] = time.perf_counter() - self._start
        row["response_len"] = float(metrics["rollout/response_len"])
        row["tokens"] = row["response_len"] * len(batch)
        self.rows.append(row)


def _save(module, path: Path) -> str:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16, help="prompts per PPO iteration")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--max-prompt-len", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=1, help="iterations run first and left out")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        tokenizer = load_or_train_tokenizer(
            root / "tokenizer.json", [REPO / "data" / "hh_rlhf" / "sft_train.jsonl"], vocab_size=args.vocab
        )
        model = ModelArgs(preset=args.preset, dropout=0.0)
        sft = SFTModule(model=model, tokenizer_path=tokenizer.source)
        sft.configure_model()
        reward = RewardModule(model=model, tokenizer_path=tokenizer.source)
        reward.configure_model()
        sft_path, reward_path = _save(sft, root / "sft.ckpt"), _save(reward, root / "reward.ckpt")
        setup_s = time.perf_counter() - started

        module = PPOModule(
            policy_from=sft_path,
            reward_from=reward_path,
            ppo=PPOArgs(
                iterations=args.warmup + args.iterations, epochs=args.epochs, minibatch_size=args.minibatch
            ),
            rewards=RewardArgs(),
            generation=GenerationArgs(max_new_tokens=args.new_tokens),
            sample_every_n=0,
        )
        data = PromptDataModule(
            train_path=str(REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"),
            tokenizer_path=tokenizer.source,
            batch_size=args.batch,
            max_prompt_length=args.max_prompt_len,
        )
        timings = _Timings()
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=args.warmup + args.iterations,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timings],
            default_root_dir=root,
        )
        trainer.fit(module, datamodule=data)

    measured = timings.rows[args.warmup :]

    def mean(key: str) -> float:
        return round(statistics.fmean(row[key] for row in measured), 4)

    iteration = mean("time/iteration")
    result = {
        "benchmark": "ppo_iteration",
        "device": args.accelerator,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": args.preset,
        "parameters_per_network": sum(p.numel() for p in module.policy.parameters()),
        "batch_prompts": args.batch,
        "max_new_tokens": args.new_tokens,
        "epochs": args.epochs,
        "minibatch_size": args.minibatch,
        "iterations_measured": len(measured),
        "mean_response_len": mean("response_len"),
        "seconds_per_iteration": iteration,
        "seconds_generation": mean("time/generation"),
        "seconds_scoring": mean("time/scoring"),
        "seconds_training": mean("time/training"),
        "share_generation": round(mean("time/generation") / iteration, 3),
        "share_scoring": round(mean("time/scoring") / iteration, 3),
        "share_training": round(mean("time/training") / iteration, 3),
        # total generated tokens / total generation seconds (a mean of per-iteration ratios would overweight
        # a fast iteration)
        "generated_tokens_per_sec": round(
            sum(row["tokens"] for row in measured) / sum(row["time/generation"] for row in measured), 1
        ),
        "per_iteration": [
            {k: round(row[k], 3) for k in ("time/generation", "time/scoring", "time/training", "tokens")}
            for row in measured
        ],
        "wall_seconds_per_iteration": mean("wall"),
        "setup_seconds": round(setup_s, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
