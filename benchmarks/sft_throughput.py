"""SFT training throughput with length bucketing vs random batching, on the "small" preset (CPU by default).

Prints one JSON object. Both arms use the same data, tokenizer, seed, initial weights and batch size; only the
DataModule's ``bucket_by_length`` differs. The two arms run one epoch of optimisation steps (forward, backward,
AdamW) *interleaved* step by step, so load from other processes on a shared machine hits both alike. Throughput counts
non-padding tokens (``attention_mask.sum()``) per second of step time; the padding fraction is the share of padded
positions among all positions of the epoch's batches.

    python benchmarks/sft_throughput.py [--steps 0 (= full epoch) --batch-size 8 --max-length 512 --warmup 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.functional.losses import sft_loss
from rlhf_lightning.models.factory import ModelArgs, build_model
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]


def _batches(bucket: bool, args: argparse.Namespace, tokenizer_path: str) -> list:
    dm = SFTDataModule(
        train_path=args.data,
        tokenizer_path=tokenizer_path,
        max_length=args.max_length,
        batch_size=args.batch_size,
        bucket_by_length=bucket,
        seed=args.seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.train_dataloader())


def _padding_fraction(batches: list) -> float:
    real = sum(int(b.attention_mask.sum()) for b in batches)
    total = sum(b.attention_mask.numel() for b in batches)
    return 1.0 - real / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "hh_rlhf" / "sft_train.jsonl"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per arm (0 = a full epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per arm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = str(Path(tmp) / "tokenizer.json")
        bucketed = _batches(True, args, tokenizer_path)
        # (batches, loss path): "selected" = the stage's loss (LM head only where an assistant token is predicted),
        # "full" = logits for every position, then the masked loss (the textbook way, kept to measure the gain)
        arms = {
            "bucketed": (bucketed, "selected"),
            "bucketed_full_logits": (bucketed, "full"),
            "random": (_batches(False, args, tokenizer_path), "selected"),
        }
        from rlhf_lightning.tokenization import ChatTokenizer

        vocab = ChatTokenizer.from_file(tokenizer_path).vocab_size

    stage = SFTModule()  # only its loss() is used, on each arm's model
    models, optims, stats = {}, {}, {}
    for name in arms:
        torch.manual_seed(args.seed)
        models[name] = build_model(ModelArgs(preset=args.preset, dropout=0.0), vocab).train()
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
        stats[name] = {"seconds": 0.0, "tokens": 0, "steps": 0}

    n = min(len(b) for b, _ in arms.values())
    n = min(n, args.warmup + args.steps) if args.steps else n
    for step in range(n):
        for name, (batches, path) in arms.items():  # interleaved: every arm sees the same machine load
            batch = batches[step]
            start = time.perf_counter()
            if path == "selected":
                stage.model = models[name]
                loss, _ = stage.loss(batch)
            else:
                logits = models[name](batch.input_ids, attention_mask=batch.attention_mask)
                loss, _ = sft_loss(logits, batch.input_ids, batch.loss_mask)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                stats[name]["seconds"] += elapsed
                stats[name]["tokens"] += int(batch.attention_mask.sum())
                stats[name]["steps"] += 1

    result = {
        "benchmark": "sft_throughput",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "batches_per_epoch": {k: len(v) for k, (v, _) in arms.items()},
        "warmup_steps": args.warmup,
    }
    for name, (batches, path) in arms.items():
        s = stats[name]
        timed = batches[args.warmup : args.warmup + s["steps"]]
        result[name] = {
            "loss_path": path,
            "tokens_per_sec": round(s["tokens"] / s["seconds"], 1),
            "non_padding_tokens": s["tokens"],
            "seconds": round(s["seconds"], 2),
            "timed_steps": s["steps"],
            "padding_fraction_epoch": round(_padding_fraction(batches), 4),
            "padding_fraction_timed": round(_padding_fraction(timed), 4),
        }
    result["speedup_bucketed_over_random"] = round(
        result["bucketed"]["tokens_per_sec"] / result["random"]["tokens_per_sec"], 2
    )
    result["speedup_selected_over_full_logits"] = round(
        result["bucketed"]["tokens_per_sec"] / result["bucketed_full_logits"]["tokens_per_sec"], 2
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
