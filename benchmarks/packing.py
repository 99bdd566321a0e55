"""Packed (padding-free) against length-bucketed padded batches: SFT tokens/s and reward-model pairs/s.

Prints one JSON object. Both arms read the same examples in the same order (the same DataModule settings and seed;
only ``packing`` differs, which changes the collate function alone), start from the same weights and step with AdamW;
their steps are *interleaved* (padded step, packed step, then packed first, ...) so load from other processes hits both alike. Tokens
are the non-padding tokens (``attention_mask.sum()``) of the timed steps; pairs are ``len(batch)``.

    python benchmarks/packing.py [--model small|llama] [--stage sft reward] [--steps 10 --warmup 2 --batch-size 8]
        [--random-batches]

``--model small`` is the built-in preset with the repository's BPE tokenizer (trained into a temporary folder);
``--model llama`` a random Llama folder built as ``benchmarks/vs_trl.py`` builds it (256 wide, 4 layers, 4096-token
vocabulary, SDPA attention).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "hh_rlhf"


def _tokenizer_path(args: argparse.Namespace, root: Path) -> str:
    if args.model == "llama":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from vs_trl import make_llama_folder

        folder_args = argparse.Namespace(
            vocab_size=4096, hidden=256, layers=4, heads=4, max_length=args.max_length, seed=args.seed
        )
        return str(make_llama_folder(root / "llama", folder_args))
    from rlhf_lightning.tokenization import load_or_train_tokenizer

    path = root / "tokenizer.json"
    load_or_train_tokenizer(path, [DATA / "sft_train.jsonl"], vocab_size=4096)
    return str(path)


def _backbone(args: argparse.Namespace, tokenizer_path: str, vocab_size: int):
    from rlhf_lightning.models.factory import ModelArgs, build_model

    torch.manual_seed(args.seed)
    if args.model == "llama":
        return build_model(ModelArgs(hf_path=tokenizer_path, dropout=0.0), vocab_size)
    return build_model(ModelArgs(preset=args.model, dropout=0.0), vocab_size)


def _batches(stage: str, packing: bool, args: argparse.Namespace, tokenizer_path: str):
    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.data.sft import SFTDataModule

    common = dict(
        tokenizer_path=tokenizer_path,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        packing=packing,
        bucket_by_length=not args.random_batches,
    )
    if stage == "sft":
        dm = SFTDataModule(
            train_path=str(DATA / "sft_train.jsonl"), val_fraction=0.0, truncation="right", **common
        )
    else:
        dm = PreferenceDataModule(
            train_path=str(DATA / "preference_train.jsonl"),
            val_path=None,
            val_fraction=0.0,
            truncation="drop",
            **common,
        )
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == args.warmup + args.steps:
            break
    return batches, dm.tokenizer.vocab_size


def _arm(stage: str, backbone: torch.nn.Module):
    """A module with the stage's loss, and its optimizer."""
    from rlhf_lightning.models.heads import RewardModel
    from rlhf_lightning.stages.reward import RewardModule
    from rlhf_lightning.stages.sft import SFTModule

    if stage == "sft":
        module = SFTModule()
        module.model = copy.deepcopy(backbone)

        def loss(batch):
            return module.loss(batch)[0]

    else:
        module = RewardModule()
        torch.manual_seed(1)
        module.reward_model = RewardModel(copy.deepcopy(backbone))

        def loss(batch):
            return module._pair_step(batch)[0]

    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    return loss, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)


def run_stage(stage: str, args: argparse.Namespace, tokenizer_path: str) -> dict:
    padded, vocab = _batches(stage, False, args, tokenizer_path)
    packed, _ = _batches(stage, True, args, tokenizer_path)
    backbone = _backbone(args, tokenizer_path, vocab)
    arms = {"padded": (_arm(stage, backbone), padded), "packed": (_arm(stage, backbone), packed)}
    seconds = dict.fromkeys(arms, 0.0)
    tokens = dict.fromkeys(arms, 0)
    positions = dict.fromkeys(arms, 0)
    rows = dict.fromkeys(arms, 0)
    step_ratios = []
    for i in range(len(padded)):
        order = list(arms) if i % 2 == 0 else list(arms)[::-1]  # alternate which arm goes first
        times = {}
        for name in order:
            (loss_fn, optimizer), batches = arms[name]
            batch = batches[i]
            started = time.perf_counter()
            loss_fn(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name] = time.perf_counter() - started
            if i >= args.warmup:
                seconds[name] += times[name]
                tokens[name] += int(batch.attention_mask.sum())
                positions[name] += batch.attention_mask.numel()
                rows[name] += len(batch)
        if i >= args.warmup:
            step_ratios.append(times["padded"] / times["packed"])
    unit = "sequences" if stage == "sft" else "pairs"
    out = {
        name: {
            "tokens_per_sec": round(tokens[name] / seconds[name], 1),
            f"{unit}_per_sec": round(rows[name] / seconds[name], 2),
            "padding_fraction": round(1 - tokens[name] / max(positions[name], 1), 4),
            "seconds": round(seconds[name], 2),
        }
        for name in arms
    }
    assert tokens["padded"] == tokens["packed"], "both arms must see the same tokens"
    out["packed_over_padded"] = round(
        seconds["padded"] / seconds["packed"], 3
    )  # speed ratio, > 1 = packed faster
    out["median_step_ratio"] = round(sorted(step_ratios)[len(step_ratios) // 2], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="a built-in preset (small, tiny, ...) or 'llama'")
    parser.add_argument("--stage", nargs="+", default=["sft", "reward"], choices=["sft", "reward"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-batches",
        action="store_true",
        help="both arms without length bucketing (the padded arm pads more)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = _tokenizer_path(args, Path(tmp))
        results = {stage: run_stage(stage, args, tokenizer_path) for stage in args.stage}
    print(
        json.dumps(
            {
                "model": args.model,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "steps": args.steps,
                "bucket_by_length": not args.random_batches,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                **results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
