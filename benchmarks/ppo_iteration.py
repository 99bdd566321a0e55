"""Seconds per PPO iteration, split into generation, scoring and training, and generated tokens per second.

Runs the real ``PPOModule`` under a Lightning ``Trainer`` on the shipped HH prompts, with random-init checkpoints
(SFT policy and reward model of the chosen preset) written to a temporary folder, so it depends on nothing under
``runs/``. Phases as the stage logs them: ``generation`` (KV-cache sampling), ``scoring`` (policy, reference, critic
and reward-model forwards plus GAE), ``training`` (the PPO epochs over minibatches). A random-init policy rarely
emits EOS, so nearly every response runs to ``--new-tokens``: the upper bound of an iteration's cost. Prints one JSON
object; the first ``--warmup`` iterations are left out of the means.

``--llama`` uses the tiny random Llama folder of ``benchmarks/vs_trl.py``'s ``ppo`` row instead of a built-in preset
(``--hidden``/``--layers``/``--heads``, the BPE vocabulary of ``--vocab``) with that row's settings (raw reward-model
score, missing-EOS score -1, no gradient clipping). ``--profile`` runs the measured iterations under
``torch.profiler`` and adds ``profile_ms_per_iteration``: the milliseconds per iteration inside each phase label the
stage sets (``rollout/*``: generation, each no-grad forward, scoring; ``ppo/*``: the minibatch forwards, backwards
and optimizer steps), each label's total including what it calls.

    python benchmarks/ppo_iteration.py [--preset small --batch 16 --new-tokens 48 --epochs 4 --minibatch 8]
        [--llama] [--profile] [--share-value-trunk] [--micro-batch-tokens N] [--precision bf16-mixed]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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


PHASE_PREFIXES = ("rollout/", "ppo/")  # the record_function labels of stages/rollout.py and stages/ppo.py


class _Timings(Callback):
    def __init__(self, warmup: int = 0, profile: bool = False) -> None:
        self.rows: list[dict[str, float]] = []
        self.warmup, self.profile = warmup, profile
        self.profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.profile and batch_idx == self.warmup:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)

    def phases(self, iterations: int) -> dict[str, float]:
        """Milliseconds per iteration inside each stage label (totals include what each label calls)."""
        if self.profiler is None:
            return {}
        totals = {
            e.key: e.cpu_time_total / 1000 / iterations
            for e in self.profiler.key_averages()
            if e.key.startswith(PHASE_PREFIXES)
        }
        return {key: round(ms, 1) for key, ms in sorted(totals.items(), key=lambda kv: -kv[1])}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        row = {key: float(metrics[key]) for key in KEYS}
        row["wall"] = time.perf_counter() - self._start
        row["cpu"] = time.process_time() - self._cpu  # all threads' CPU seconds: steadier on a busy machine
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
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--llama", action="store_true", help="the tiny random Llama of vs_trl.py's ppo row")
    parser.add_argument("--hidden", type=int, default=256, help="--llama: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="--llama: layers")
    parser.add_argument("--heads", type=int, default=4, help="--llama: attention heads")
    parser.add_argument("--share-value-trunk", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--micro-batch-tokens", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="phase breakdown from torch.profiler")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        tokenizer = load_or_train_tokenizer(
            root / "tokenizer.json", [REPO / "data" / "hh_rlhf" / "sft_train.jsonl"], vocab_size=args.vocab
        )
        tokenizer_path = tokenizer.source
        if args.llama:
            sys.path.insert(0, str(REPO / "benchmarks"))
            import vs_trl

            folder_args = argparse.Namespace(
                vocab_size=args.vocab,
                hidden=args.hidden,
                layers=args.layers,
                heads=args.heads,
                max_length=args.max_prompt_len + args.new_tokens,
                seed=0,
            )
            folder = vs_trl.make_llama_folder(root / "llama", folder_args)
            model, tokenizer_path = ModelArgs(hf_path=str(folder), dropout=0.0), str(folder)
        else:
            model = ModelArgs(preset=args.preset, dropout=0.0)
        sft = SFTModule(model=model, tokenizer_path=tokenizer_path)
        sft.configure_model()
        reward = RewardModule(model=model, tokenizer_path=tokenizer_path)
        reward.configure_model()
        sft_path, reward_path = _save(sft, root / "sft.ckpt"), _save(reward, root / "reward.ckpt")
        setup_s = time.perf_counter() - started

        ppo_args = dict(
            iterations=args.warmup + args.iterations,
            epochs=args.epochs,
            minibatch_size=args.minibatch,
            micro_batch_size=args.micro_batch_size,
        )
        if args.micro_batch_tokens is not None:
            ppo_args["micro_batch_tokens"] = args.micro_batch_tokens
        rewards = RewardArgs()
        if args.llama:  # vs_trl.py's ppo row: raw score, a reply without EOS scores -1, no gradient clipping
            ppo_args["max_grad_norm"] = None
            rewards = RewardArgs(normalize=False, clip=None, missing_eos_score=-1.0)
        module = PPOModule(
            policy_from=sft_path,
            reward_from=reward_path,
            tokenizer_path=tokenizer_path if args.llama else None,
            ppo=PPOArgs(**ppo_args),
            rewards=rewards,
            generation=GenerationArgs(max_new_tokens=args.new_tokens),
            share_value_trunk=args.share_value_trunk,
            sample_every_n=0,
        )
        data = PromptDataModule(
            train_path=str(REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"),
            tokenizer_path=tokenizer_path,
            batch_size=args.batch,
            max_prompt_length=args.max_prompt_len,
        )
        timings = _Timings(args.warmup, args.profile)
        trainer = L.Trainer(
            accelerator=args.accelerator,
            precision=args.precision,
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
        "cpu_seconds_per_iteration": mean("cpu"),
        "setup_seconds": round(setup_s, 2),
        "model": "llama" if args.llama else args.preset,
        "precision": args.precision,
        "share_value_trunk": args.share_value_trunk,
        "micro_batch_tokens": args.micro_batch_tokens,
    }
    if args.profile:
        result["profile_ms_per_iteration"] = timings.phases(len(measured))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
