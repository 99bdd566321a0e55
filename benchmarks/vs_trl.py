"""Training throughput of rlhf-lightning's stages vs Hugging Face TRL's trainers on the same model and data (CPU).

Prints one JSON object with, per comparison, both figures and ``ratio_ours_over_trl`` (> 1: ours is faster).
Each side runs ``--rounds`` times (default 3), alternating which side goes first; the figures shown are each side's
best round (the least disturbed by other load on a shared machine), with the median and every round's value next to
them (``ratio_ours_over_trl_median``, ``ratio_per_round``). On a shared CPU the spread between rounds can be large;
read the ratio only when the per-round ratios agree.

* ``sft``: non-padding tokens per second of ``SFTModule`` (Lightning ``Trainer``, ``SFTDataModule``) vs TRL's
  ``SFTTrainer`` with ``assistant_only_loss=True``;
* ``reward``: preference pairs per second of ``RewardModule`` (``PreferenceDataModule``) vs TRL's ``RewardTrainer``;
* ``dpo``: preference pairs per second of ``DPOModule`` (sigmoid loss, ``--beta``, reference log-probs cached) vs
  TRL's ``DPOTrainer`` (``loss_type=["sigmoid"]``, same beta). Both start from the folder's weights (ours through an
  SFT-stage checkpoint of them). Ours caches each pair's reference log-probs the first time it sees the pair, which
  in the first epoch is inside the step; TRL runs with ``precompute_ref_log_probs=False``, which also computes them
  inside the step (precomputing would move that work out of TRL's timed window only);
* ``grpo`` / ``rloo``: seconds per iteration of ``GRPOModule`` (``baseline: grpo`` / ``rloo``) vs TRL's
  ``GRPOTrainer`` / ``RLOOTrainer``: ``--prompts`` prompts x ``--group-size`` replies (``num_generations``) of up to
  ``--max-new-tokens`` (``max_completion_length``), sampled at temperature 1 with no top-k/top-p, scored by the rule
  ``rlhf_lightning.reward_functions:brevity`` (TRL gets it wrapped in its reward-function signature), one optimizer
  step over all replies per iteration (``steps_per_generation=1``, ``num_iterations=1``; ours ``epochs: 1``,
  ``minibatch_size`` = all replies), KL to the reference as a loss term with weight ``--kl-coef`` for GRPO
  (TRL ``beta``; TRL's ``loss_type="grpo"``, the per-reply mean ours uses) and in the reward with ``--rloo-kl-coef``
  for RLOO (``kl_in_reward``; TRL's RLOO does the same). TRL 1.x has no prompt truncation, so only the HH prompts
  whose templated form fits ``--max-prompt-length`` tokens are used, by both sides. The random model rarely emits
  EOS, so replies run to the limit on both sides. Here the ratio is TRL's seconds / ours (> 1: ours is faster).

PPO is not compared: TRL 1.x ships no PPO trainer (``PPOTrainer`` was removed), and ``PPOModule`` is GAE PPO with a
value model.

Run ``pip install -c requirements/cpu.txt -e '.[bench]'`` first (TRL is an optional benchmark dependency, never a
dependency of the package or its tests), then::

    python benchmarks/vs_trl.py [--steps 20 --warmup 3 --rounds 3 --batch-size 8 --max-length 512]
        [--only sft reward dpo grpo rloo] [--prompts 4 --group-size 4 --max-new-tokens 32 --iterations 4]

What is equal between the two sides:

* the model: one random Llama (``--hidden`` 256, ``--layers`` 4, ``--heads`` 4, float32, SDPA attention, no
  dropout) saved with a BPE tokenizer (trained on the SFT data) and a chat template in a temporary folder; both
  sides load that folder (ours through ``ModelArgs(hf_path=...)``, TRL through ``AutoModelFor*``);
* the data (``data/hh_rlhf/sft_train.jsonl`` and ``preference_train.jsonl``), rendered with the folder's chat
  template; the template marks assistant content with ``{% generation %}`` so TRL's assistant mask and ours cover
  the same tokens (the reply and its closing EOS);
* batch size, ``max_length``, step counts and warm-up, the same torch thread count (one process, runs one after
  the other), no gradient checkpointing, float32 (TRL would default to bf16 autocast and gradient checkpointing; both are
  switched off), plain ``torch.optim.AdamW`` (foreach, not fused; TRL's default is the fused one) with the same
  learning rate and no weight decay, gradient-norm clipping at 1.0, no data-loader workers, no checkpointing,
  no progress bar, no external logger;
* long sequences: SFT keeps the start (``truncation="right"`` for ours, TRL's only mode ``keep_start``); the reward
  stage drops pairs longer than ``max_length`` (``truncation="drop"`` for ours, which is what TRL does);
* the timer: wall time from the end of the last warm-up optimizer step to the end of the last timed one (a Lightning
  callback's ``on_train_batch_end``, a TRL ``TrainerCallback``'s ``on_step_end``), so data loading, forward,
  backward, clipping, optimizer, scheduler and each framework's own per-step bookkeeping and logging all count.
  Tokens are the non-padding tokens (``attention_mask.sum()``) of the timed steps' batches; for TRL they are counted
  by a wrapper around its data collator.

What differs (each framework's defaults, kept because they are what a user gets):

* batching: ours buckets examples of similar length (``bucket_by_length=True``); TRL samples randomly and pads each
  batch to its longest row. ``--trl-group-by-length`` switches TRL's SFT to transformers' ``LengthGroupedSampler`` (the reward
  trainer's pair rows have no ``input_ids`` for it to measure, so it stays random there). Each
  side's padding fraction is reported; throughput counts only non-padding tokens, so padding costs time, not credit;
* the SFT loss: ours computes the full logits and a masked cross-entropy; TRL 1.x computes the log-probabilities with
  its chunked "fused LM head" and also the per-step entropy and token accuracy for its logs;
* per-step metrics: ours logs loss (and accuracy/scores for the reward model) through ``self.log``; TRL gathers its
  own metrics (``.item()`` calls) every step and logs every ``logging_steps`` (10) steps;
* learning-rate schedule: ours warm-up + cosine, TRL linear decay (the same cost per step);
* the reward head: ours reads a scalar head at the last real token of the causal-LM backbone's hidden states; TRL
  uses ``LlamaForSequenceClassification`` (scores every position, gathers the last non-pad one);
* DPO: long pairs are dropped by ours (``truncation="drop"``) and cut to ``max_length`` by TRL's collator (few pairs
  are that long at 512 tokens); TRL also computes per-step entropy and token accuracy for its logs;
* GRPO/RLOO: ours samples with its own KV-cache loop, TRL with ``model.generate``; each side's loss and logging as
  its defaults (TRL gathers completion-length, entropy and clip statistics every step);
* SFT data order and truncation bookkeeping: ours drops conversations left with no assistant token after truncation;
  TRL keeps them. Both sides see different (random) batches, hence the padding fractions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "hh_rlhf"

ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
# the repo's test template (tests/hf_folders.py) with the assistant content marked for TRL's assistant mask
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>' }}{% generation %}{{ m['content'] + eos_token }}"
    "{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _require_trl() -> None:
    missing = [name for name in ("trl", "transformers", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"benchmarks/vs_trl.py needs {', '.join(missing)} (not installed). Install the optional benchmark "
            "dependencies with: pip install -c requirements/cpu.txt -e '.[hf,bench]'"
        )


# ------------------------------------------------------------------------------------------------ model folder


def _texts(limit: int = 300) -> list[str]:
    out = []
    with open(DATA / "sft_train.jsonl", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i >= limit:
                break
            out.extend(m["content"] for m in json.loads(line)["messages"])
    return out


def make_llama_folder(path: Path, args: argparse.Namespace) -> Path:
    """A random Llama with a BPE tokenizer (pad = UNK) and a chat template with generation markers."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_texts(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # what our adapter would pick anyway; TRL needs a pad token set
        additional_special_tokens=ROLES,
    )
    tok.chat_template = TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.max_length, 256),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------------------ timing


class _Window:
    """Wall time from the end of step ``warmup`` to the end of the last step, and what those steps processed."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.ends: list[float] = []
        self.tokens: list[int] = []  # non-padding tokens of each step's batch, in step order
        self.positions: list[int] = []  # all positions (padding included)
        self.rows: list[int] = []

    def record_batch(self, attention_mask: Any, rows: int) -> None:
        self.tokens.append(int(attention_mask.sum()))
        self.positions.append(int(attention_mask.numel()))
        self.rows.append(rows)

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())

    def summary(self, rows_name: str) -> dict[str, Any]:
        steps = len(self.ends) - self.warmup
        if steps < 1:
            raise RuntimeError(f"only {len(self.ends)} steps ran; expected more than warmup={self.warmup}")
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        timed = slice(self.warmup, len(self.ends))
        tokens, positions, rows = sum(self.tokens[timed]), sum(self.positions[timed]), sum(self.rows[timed])
        return {
            "timed_steps": steps,
            "seconds": round(seconds, 3),
            "sec_per_step": round(seconds / steps, 4),
            "tokens_per_sec": round(tokens / seconds, 1),
            f"{rows_name}_per_sec": round(rows / seconds, 2),
            "non_padding_tokens": tokens,
            "padding_fraction": round(1 - tokens / max(positions, 1), 4),
        }

    def iteration_summary(self) -> dict[str, Any]:
        """Seconds per timed iteration (RL rows: one iteration = one optimizer step on each side)."""
        steps = len(self.ends) - self.warmup
        if steps < 1:
            raise RuntimeError(
                f"only {len(self.ends)} iterations ran; expected more than warmup={self.warmup}"
            )
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        return {
            "timed_iterations": steps,
            "seconds": round(seconds, 3),
            "sec_per_iteration": round(seconds / steps, 4),
        }


def _lightning_timer(window: _Window):
    from lightning.pytorch import Callback

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            window.record_batch(batch.attention_mask, len(batch))
            window.step_end()

    return Timer()


def _lightning_step_timer(window: _Window):
    from lightning.pytorch import Callback

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            window.step_end()

    return Timer()


def _trl_timer(window: _Window):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            window.step_end()

    return Timer()


class _CountingCollator:
    """Wraps a TRL collator and records each batch's mask (batches reach the steps in the order they are built)."""

    def __init__(self, inner: Any, window: _Window) -> None:
        self.inner = inner
        self.window = window

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.window.record_batch(batch["attention_mask"], len(examples))
        return batch


# ----------------------------------------------------------------------------------------------------- our side


def _lightning_trainer(args: argparse.Namespace, root: str, window: _Window):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        precision="32-true",
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_lightning_timer(window)],
        default_root_dir=root,
    )


def _adamw(args: argparse.Namespace):
    import torch

    return functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0, foreach=True)


def ours_sft(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.sft import SFTModule

    data = SFTDataModule(
        train_path=str(DATA / "sft_train.jsonl"),
        val_fraction=0.0,
        tokenizer_path=str(folder),
        max_length=args.max_length,
        truncation="right",
        batch_size=args.batch_size,
        seed=args.seed,
    )
    module = SFTModule(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    return window.summary("sequences")


def _preference_data(args: argparse.Namespace, folder: Path):
    """The shipped training pairs, as the reward and DPO rows both read them (too-long pairs dropped)."""
    from rlhf_lightning.data.preference import PreferenceDataModule

    return PreferenceDataModule(
        train_path=str(DATA / "preference_train.jsonl"),
        val_path=None,
        val_fraction=0.0,
        tokenizer_path=str(folder),
        max_length=args.max_length,
        truncation="drop",
        batch_size=args.batch_size,
        seed=args.seed,
    )


def ours_reward(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.reward import RewardModule

    data = _preference_data(args, folder)
    module = RewardModule(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    return window.summary("pairs")  # len(PreferenceBatch) is its pair count (2x rows: chosen, rejected)


def _policy_checkpoint(folder: Path, root: str) -> str:
    """An SFT-stage checkpoint of the folder's weights (what DPO and GRPO start from: ``policy_from``)."""
    import torch

    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.sft import SFTModule

    path = Path(root) / "policy.ckpt"
    if not path.exists():
        sft = SFTModule(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
        sft.configure_model()
        checkpoint = {"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}
        sft.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, path)
    return str(path)


def ours_dpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.stages.dpo import DPOArgs, DPOModule

    data = _preference_data(args, folder)
    module = DPOModule(
        policy_from=_policy_checkpoint(folder, root),
        dpo=DPOArgs(loss="sigmoid", beta=args.beta),
        cache_ref_logprobs=True,
        tokenizer_path=str(folder),
    )
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    return window.summary("pairs")


def _ours_online(baseline: str, args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from lightning.pytorch import Trainer

    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.grpo import GRPOArgs, GRPOModule
    from rlhf_lightning.stages.rewards import RewardArgs

    replies = args.prompts * args.group_size
    module = GRPOModule(
        policy_from=_policy_checkpoint(folder, root),
        tokenizer_path=str(folder),
        grpo=GRPOArgs(
            iterations=args.rl_warmup + args.iterations,
            group_size=args.group_size,
            baseline=baseline,
            epochs=1,
            minibatch_size=replies,  # one optimizer step per iteration, as TRL's steps_per_generation=1
            kl_coef=args.kl_coef if baseline == "grpo" else args.rloo_kl_coef,
            kl_in_reward=baseline == "rloo",
        ),
        rewards=RewardArgs(model_weight=0.0, functions=["rlhf_lightning.reward_functions:brevity"]),
        generation=GenerationArgs(max_new_tokens=args.max_new_tokens),
        sample_every_n=0,
        seed=args.seed,
    )
    module.optimizer_factory = _adamw(args)
    data = PromptDataModule(
        train_path=str(Path(root) / "prompts.jsonl"),
        val_fraction=0.0,
        tokenizer_path=str(folder),
        max_prompt_length=args.max_prompt_length,
        batch_size=args.prompts,
        seed=args.seed,
    )
    window = _Window(args.rl_warmup)
    Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.rl_warmup + args.iterations,
        max_epochs=-1,
        precision="32-true",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_lightning_step_timer(window)],
        default_root_dir=root,
    ).fit(module, datamodule=data)
    return window.iteration_summary()


def ours_grpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_online("grpo", args, folder, root)


def ours_rloo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_online("rloo", args, folder, root)


# ----------------------------------------------------------------------------------------------------- TRL side


def _trl_common(args: argparse.Namespace, out: str, group_by_length: bool = False) -> dict[str, Any]:
    return dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        dataloader_num_workers=0,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        max_length=args.max_length,
    )


def trl_sft(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in _rows(DATA / "sft_train.jsonl")])
    config = SFTConfig(
        **_trl_common(args, str(Path(root) / "trl_sft"), args.trl_group_by_length), assistant_only_loss=True
    )
    window = _Window(args.warmup)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_trl_timer(window)],
    )
    trainer.data_collator = _CountingCollator(trainer.data_collator, window)
    trainer.train()
    return window.summary("sequences")


def trl_reward(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    rows = _rows(DATA / "preference_train.jsonl")
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = RewardConfig(**_trl_common(args, str(Path(root) / "trl_reward")))
    window = _Window(args.warmup)
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_trl_timer(window)],
    )
    trainer.data_collator = _CountingCollator(trainer.data_collator, window)
    trainer.train()
    return window.summary("pairs")


def trl_dpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = _rows(DATA / "preference_train.jsonl")
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    # precompute_ref_log_probs=False: within the first epoch ours computes each pair's reference log-probs once (a
    # cache miss) inside the step, and so does TRL without precomputing; precomputing would move that work out of
    # the timed window for TRL only
    config = DPOConfig(
        **_trl_common(args, str(Path(root) / "trl_dpo")),
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
    )
    window = _Window(args.warmup)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_trl_timer(window)],
    )
    trainer.data_collator = _CountingCollator(trainer.data_collator, window)
    trainer.train()
    return window.summary("pairs")


def _trl_brevity(completions: list[Any], **kwargs: Any) -> list[float]:
    """TRL's reward-function signature around ``rlhf_lightning.reward_functions.brevity`` (the same rule)."""
    from rlhf_lightning.reward_functions import brevity

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [brevity([], text, {}) for text in texts]


def _trl_online(kind: str, args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = Dataset.from_list(_rows(Path(root) / "prompts.jsonl"))
    common = _trl_common(args, str(Path(root) / f"trl_{kind}"))
    common.pop("max_length")
    common.pop("train_sampling_strategy", None)
    common.update(
        per_device_train_batch_size=args.prompts * args.group_size,  # completions per step
        max_steps=args.rl_warmup + args.iterations,
        num_generations=args.group_size,
        steps_per_generation=1,  # one generation batch, one optimizer step: an iteration of ours
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        logging_steps=10,
    )
    if kind == "grpo":
        config = trl.GRPOConfig(**common, beta=args.kl_coef, loss_type="grpo", scale_rewards="group")
        trainer_cls = trl.GRPOTrainer
    else:
        config = trl.RLOOConfig(**common, beta=args.rloo_kl_coef)
        trainer_cls = trl.RLOOTrainer
    window = _Window(args.rl_warmup)
    trainer = trainer_cls(
        model=str(folder),
        reward_funcs=_trl_brevity,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_trl_timer(window)],
    )
    trainer.train()
    return window.iteration_summary()


def trl_grpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _trl_online("grpo", args, folder, root)


def trl_rloo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _trl_online("rloo", args, folder, root)


# --------------------------------------------------------------------------------------------------------- main


# row -> (ours, TRL, metric, higher is better); times (RL rows) give the ratio TRL / ours, so > 1 is still "ours faster"
ROWS = {
    "sft": (ours_sft, trl_sft, "tokens_per_sec", True),
    "reward": (ours_reward, trl_reward, "pairs_per_sec", True),
    "dpo": (ours_dpo, trl_dpo, "pairs_per_sec", True),
    "grpo": (ours_grpo, trl_grpo, "sec_per_iteration", False),
    "rloo": (ours_rloo, trl_rloo, "sec_per_iteration", False),
}


def write_prompts(folder: Path, path: Path, max_prompt_length: int) -> int:
    """The HH prompts whose chat-templated form fits ``max_prompt_length`` tokens, as a JSONL file both sides read
    (TRL 1.x has no prompt truncation; ours would left-truncate: equal inputs need the long ones left out)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kept = [
        r
        for r in _rows(DATA / "prompts_train.jsonl")
        if len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True))
        <= max_prompt_length
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in kept)
    return len(kept)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (>= 1)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="sequences (SFT) or pairs (reward) per step"
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained for the folder")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating which goes first")
    parser.add_argument("--only", choices=list(ROWS), nargs="+", default=None, help="run these comparisons")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss)")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO/RLOO: prompts per iteration")
    parser.add_argument(
        "--group-size", type=int, default=4, help="GRPO/RLOO: replies per prompt (num_generations)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="GRPO/RLOO: max_completion_length")
    parser.add_argument(
        "--max-prompt-length", type=int, default=192, help="GRPO/RLOO: longer prompts are left out"
    )
    parser.add_argument("--iterations", type=int, default=4, help="GRPO/RLOO: timed iterations per side")
    parser.add_argument("--rl-warmup", type=int, default=1, help="GRPO/RLOO: untimed iterations first (>= 1)")
    parser.add_argument("--kl-coef", type=float, default=0.04, help="GRPO: KL loss weight (TRL beta)")
    parser.add_argument(
        "--rloo-kl-coef", type=float, default=0.05, help="RLOO: KL-in-reward weight (TRL beta)"
    )
    parser.add_argument(
        "--trl-group-by-length",
        action="store_true",
        help="TRL's SFT batches by length too (LengthGroupedSampler)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.rl_warmup < 1:
        parser.error("--rl-warmup must be >= 1 (the window starts at the end of the last warm-up iteration)")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the window starts at the end of the last warm-up step)")
    _require_trl()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl", "datasets", "rlhf_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import datasets
    import lightning
    import torch
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    comparisons = {name: ROWS[name] for name in (args.only or ROWS)}
    result: dict[str, Any] = {
        "benchmark": "vs_trl",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "heads": args.heads},
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "trl_sft_sampling": "group_by_length" if args.trl_group_by_length else "random",
        "dpo": {"beta": args.beta, "loss": "sigmoid"},
        "online": {
            "prompts_per_iteration": args.prompts,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "max_prompt_length": args.max_prompt_length,
            "warmup_iterations": args.rl_warmup,
            "timed_iterations": args.iterations,
            "reward": "rlhf_lightning.reward_functions:brevity",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_llama_folder(Path(tmp) / "llama", args)
        counted = transformers.AutoModelForCausalLM.from_pretrained(folder)
        result["model"]["vocab"] = counted.config.vocab_size
        result["model"]["parameters"] = sum(p.numel() for p in counted.parameters())
        del counted
        if {"grpo", "rloo"} & set(comparisons):
            result["online"]["prompts"] = write_prompts(
                folder, Path(tmp) / "prompts.jsonl", args.max_prompt_length
            )
        for name, (ours_fn, trl_fn, key, higher) in comparisons.items():
            runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
            for r in range(args.rounds):  # alternate the order: a noisy neighbour hits both sides alike
                order = [("ours", ours_fn), ("trl", trl_fn)]
                for side, fn in order if r % 2 == 0 else order[::-1]:
                    torch.manual_seed(args.seed)
                    with contextlib.redirect_stdout(
                        sys.stderr
                    ):  # TRL prints its log dicts; stdout is the JSON
                        runs[side].append(fn(args, folder, tmp))
            pick = max if higher else min
            best = {side: pick(rs, key=lambda x: x[key]) for side, rs in runs.items()}
            median = {side: statistics.median(x[key] for x in rs) for side, rs in runs.items()}

            def ratio(ours: float, theirs: float, higher: bool = higher) -> float:
                return round(ours / theirs if higher else theirs / ours, 3)

            result[name] = {
                "metric": key,
                "ours": {
                    **best["ours"],
                    f"median_{key}": median["ours"],
                    f"all_{key}": [x[key] for x in runs["ours"]],
                },
                "trl": {
                    **best["trl"],
                    f"median_{key}": median["trl"],
                    f"all_{key}": [x[key] for x in runs["trl"]],
                },
                "ratio_ours_over_trl": ratio(best["ours"][key], best["trl"][key]),
                "ratio_ours_over_trl_median": ratio(median["ours"], median["trl"]),
                "ratio_per_round": [ratio(o[key], t[key]) for o, t in zip(runs["ours"], runs["trl"])],
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
