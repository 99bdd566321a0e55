"""Reward-model training throughput (preference pairs per second) on the "small" preset, CPU by default.

Prints one JSON object. Runs the real stage (``RewardModule`` + ``PreferenceDataModule`` on the shipped HH pairs,
length-bucketed batches, one forward for chosen and rejected) through a Lightning ``Trainer`` and times the optimizer
steps after ``--warmup`` steps with a callback, so data loading, forward, backward and the optimizer all count; the
first steps (allocator warm-up, lazy initialisation) do not. Weights are random (the throughput does not depend on
them), so no SFT run is needed. A tokenizer is trained into a temporary folder unless ``--tokenizer`` names one.

    python benchmarks/reward_throughput.py [--steps 20 --warmup 3 --batch-size 8 --max-length 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.stages.reward import RewardModule

REPO = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Wall time, pairs and real tokens of every training step after the first ``warmup`` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds = 0.0
        self.pairs = 0
        self.tokens = 0
        self.padded = 0
        self.steps = 0
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = time.perf_counter() - self._start
        if batch_idx < self.warmup:
            return
        self.seconds += elapsed
        self.pairs += len(batch)
        self.tokens += int(batch.attention_mask.sum())
        self.padded += batch.attention_mask.numel()
        self.steps += 1


def main() -> None:
    """Parse the options, run the timed training steps and print the figures as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch (2x sequences)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json to use (default: train one, vocab 4096)"
    )
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or str(Path(tmp) / "tokenizer.json")
        data = PreferenceDataModule(
            train_path=str(REPO / "data/hh_rlhf/preference_train.jsonl"),
            val_path=None,
            val_fraction=0.0,
            tokenizer_path=tokenizer,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        module = RewardModule(model=ModelArgs(preset=args.preset))
        timer = StepTimer(args.warmup)
        trainer = Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=args.warmup + args.steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=data)
        n_params = sum(p.numel() for p in module.reward_model.parameters())
    print(
        json.dumps(
            {
                "benchmark": "reward_throughput",
                "preset": args.preset,
                "parameters": n_params,
                "device": args.accelerator,
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "batch_pairs": args.batch_size,
                "max_length": args.max_length,
                "timed_steps": timer.steps,
                "seconds": round(timer.seconds, 3),
                "pairs_per_sec": round(timer.pairs / max(timer.seconds, 1e-9), 2),
                "tokens_per_sec": round(timer.tokens / max(timer.seconds, 1e-9), 1),
                "padding_fraction": round(1 - timer.tokens / max(timer.padded, 1), 3),
                "sec_per_step": round(timer.seconds / max(timer.steps, 1), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
