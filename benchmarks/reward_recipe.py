"""Reward-model recipe on a real pretrained model: ours against TRL's ``RewardTrainer`` defaults, by held-out accuracy.

Not run by CI (tens of minutes of CPU, a converted model folder and the optional ``trl`` benchmark extra). Both sides
start from the same Hugging Face folder (e.g. SmolLM2-135M-Instruct made by ``../shared/tools/smollm2_to_hf.py``),
train one epoch on ``data/hh_rlhf/preference_train.jsonl`` (700 pairs, batch 8 pairs) and are scored on all 200
pairs of ``data/hh_rlhf/preference_test.jsonl``:

* **TRL**: ``RewardConfig`` defaults (full fine-tuning at lr 1e-4, linear decay, no warm-up, bf16, gradient
  checkpointing, ``max_length`` 1024 with longer pairs dropped), except ``num_train_epochs=1`` (its default is 3: a
  CPU budget, and one epoch is what the reward-model literature recommends), ``use_cpu`` and no gradient checkpointing
  (a CPU-time budget; recomputation does not change the result). Accuracy is TRL's own
  ``trainer.evaluate`` (``eval_accuracy``: chosen scored strictly above rejected).
* **ours** (``--lr``, default 1e-5): full fine-tuning with ``RewardModule`` at the rate InstructGPT and most reward-model
  reports use for pretrained models (Ouyang et al. 2022: 9e-6; Touvron et al. 2023: 1e-5 for the large models),
  10 % linear warm-up then cosine decay to 10 %, bf16 autocast, dropout off, score read at the reply's EOS token,
  prompts left-truncated at ``--max-length`` with the replies kept whole. Accuracy is ``val/accuracy`` over the same
  200 pairs (a tie counts as wrong).

Prints one JSON object per side and a final summary (accuracies, the difference in points, wall times)::

    python benchmarks/reward_recipe.py --model /work/models/smollm2 [--only ours|trl] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "hh_rlhf"


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ours(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Train and validate ``RewardModule`` with our recipe; held-out accuracy and wall time."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.optim import WarmupCosineLR
    from rlhf_lightning.stages.reward import RewardModule

    seed_everything(args.seed, verbose=False)
    data = PreferenceDataModule(
        train_path=str(DATA / "preference_train.jsonl"),
        val_path=str(DATA / "preference_test.jsonl"),
        tokenizer_path=args.model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    module = RewardModule(
        init_from=args.init_from,
        model=ModelArgs(hf_path=args.model, dropout=0.0),
        tokenizer_path=args.model,
        optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0),
        scheduler=functools.partial(WarmupCosineLR, warmup_steps=0.1, min_lr_ratio=0.1),
        worst_pairs=0,
    )
    trainer = Trainer(
        accelerator="cpu",
        precision=args.precision,
        max_epochs=1,
        limit_train_batches=args.limit_train_batches,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    return {
        "side": "ours",
        "lr": args.lr,
        "accuracy": float(metrics["val/accuracy"]),
        "val_loss": float(metrics["val/loss"]),
        "train_s": round(train_s, 1),
        "steps": trainer.global_step,
    }


def trl(args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Train TRL's ``RewardTrainer`` at its defaults (one epoch); its own held-out accuracy and wall time."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    keys = ("prompt", "chosen", "rejected")
    train = Dataset.from_list([{k: r[k] for k in keys} for r in _rows(DATA / "preference_train.jsonl")])
    test = Dataset.from_list([{k: r[k] for k in keys} for r in _rows(DATA / "preference_test.jsonl")])
    config = RewardConfig(
        output_dir=str(Path(root) / "trl_reward"),
        use_cpu=True,
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        gradient_checkpointing=False,  # on by default: recomputation changes speed and memory, not the result
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    metrics = trainer.evaluate(test)
    return {
        "side": "trl",
        "lr": config.learning_rate,
        "accuracy": float(metrics["eval_accuracy"]),
        "val_loss": float(metrics["eval_loss"]),
        "train_s": round(train_s, 1),
        "steps": trainer.state.global_step,
        "eval_pairs": len(trainer._prepare_dataset(test, tokenizer, config, "eval")),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--only", choices=["ours", "trl"], default=None)
    parser.add_argument("--lr", type=float, default=1e-5, help="our learning rate (full fine-tuning)")
    parser.add_argument(
        "--init-from", default=None, help="ours: start from this SFT checkpoint instead of --model"
    )
    parser.add_argument(
        "--max-length", type=int, default=384, help="ours: tokens per sequence (prompts cut left)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step, both sides")
    parser.add_argument("--precision", default="bf16-mixed", help="ours: Lightning precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="ours: a smoke run's budget")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for side, run in (("ours", ours), ("trl", trl)):
            if args.only in (None, side):
                results[side] = run(args, root)
                print(json.dumps(results[side]), flush=True)
    if len(results) == 2:
        gap = 100 * (results["ours"]["accuracy"] - results["trl"]["accuracy"])
        speed = results["trl"]["train_s"] / results["ours"]["train_s"]
        print(
            json.dumps({"accuracy_points_ours_minus_trl": round(gap, 1), "train_time_trl_over_ours": speed})
        )


if __name__ == "__main__":
    main()
