"""Throughput and peak memory of rlhf-lightning's stages vs Hugging Face TRL's trainers on the same model and data (CPU).

Prints one JSON object; ``rows`` holds one entry per comparison with both figures, ``ratio_ours_over_trl`` (> 1:
ours is faster, for every row: rates give ours / TRL, times TRL / ours), each side's ``peak_rss_mb`` and
``ratio_rss_ours_over_trl`` (< 1: ours uses less memory). Each side runs ``--rounds`` times (default 3), alternating
which side goes first; the figures shown are each side's best round (the least disturbed by other load on a shared
machine), with the median and every round's value next to them (``ratio_ours_over_trl_median``,
``ratio_per_round``); ``peak_rss_mb`` is the largest of the rounds. On a shared CPU the spread between rounds can
be large; read the ratio only when the per-round ratios agree. ``--markdown`` also prints the README table (row,
model, ours, TRL, ratio, peak RSS, date); ``--from-json FILE`` re-renders a saved run (``--output FILE``).

**One process per side.** The script re-invokes itself for each side of each row and round (``--worker ROW SIDE
--job FILE``: the job file carries the arguments, the model folder and the run folder; the worker writes its
summary back), so neither side's allocations, caches or imports reach the other, and the peak resident set of each
(``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the worker) is that side's alone. The checkpoints our DPO, GRPO,
RLOO and PPO start from are written by a ``prepare`` worker first, outside every measured process.

Rows (``--only``; "both": also on ``--model``):

* ``sft`` (both): non-padding tokens per second of ``SFTModule`` (Lightning ``Trainer``, ``SFTDataModule``) vs TRL's
  ``SFTTrainer`` with ``assistant_only_loss=True``. TRL runs at its best documented setting by default
  (``--trl-sft-mode packing``): ``packing=True, packing_strategy="bfd"`` (best-fit-decreasing packing into
  ``max_length`` rows), which switches on ``padding_free``: each batch is one flattened row with ``position_ids``
  restarting per conversation and no ``attention_mask``. TRL 1.16 neither requires nor checks for flash attention
  there; with SDPA on CPU (this machine), transformers 5 rebuilds a block-diagonal causal mask from the
  ``position_ids`` (``masking_utils.find_packed_sequence_indices``), so the conversations do not attend to each
  other (correct loss) but SDPA computes the masked attention over the whole flattened row (``batch x max_length``
  positions), not per conversation as flash attention's varlen kernel would. ``group_by_length`` (transformers'
  ``LengthGroupedSampler``) and ``random`` (padded random batches) are the other modes. Ours packs when
  ``--ours-packing`` (default: whenever ``SFTDataModule`` takes ``packing``, detected with ``inspect.signature``);
  else it buckets by length. A packed step holds more tokens than a padded one, so the step counts mean different
  amounts of work; the rate counts only non-padding tokens;
* ``reward`` (both): preference pairs per second of ``RewardModule`` (``PreferenceDataModule``, packing as SFT's;
  its default ``share_prompt``: each padded pair is one row whose prompt runs once, recorded as ``share_prompt``)
  vs TRL's ``RewardTrainer``;
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
  whose templated form fits ``--max-prompt-length`` tokens are used, by both sides (the PPO and generation rows read
  the same prompts file). The random model rarely emits EOS, so replies run to the limit on both sides;
* ``ppo``: seconds per iteration of ``PPOModule`` (GAE PPO with a critic) vs TRL 1.12's ``PPOTrainer``
  (``trl.experimental.ppo``; TRL removed it after 1.12.0). TRL 1.12 is installed apart, ``pip install --no-deps
  --target /work/trl112 trl==1.12.0``, and only that row's TRL worker puts ``--trl112-path`` (default
  ``$RLHF_TRL112_PATH``) first on ``sys.path``. Equal on both sides: policy and reference = the folder's weights
  (ours through an SFT checkpoint), reward model and critic = the folder's backbone + a scalar head (ours through a
  reward-stage checkpoint, which also initialises the critic; TRL ``AutoModelForSequenceClassification``; the heads'
  random values differ), ``--ppo-batch`` prompts per iteration, ``--ppo-epochs`` epochs of ``--ppo-batch /
  --ppo-minibatch`` minibatches (TRL ``num_mini_batches``, ``gradient_accumulation_steps=1``: one forward and one
  optimizer step per minibatch), replies of up to ``--max-new-tokens`` (``response_length``) at temperature 1 with no
  top-k/top-p, stopping at EOS (``stop_token="eos"``), fixed k1 KL in the reward with ``--ppo-kl-coef``, GAE
  gamma 1 / lambda 0.95, clip 0.2, value clip 0.2, value weight 0.1, advantages whitened and rewards not, the raw
  reward-model score (ours ``normalize=False, clip=None``), no gradient clipping (TRL's PPO loop has none), no
  sample generations. Differences: ours has two AdamW optimizers (policy, critic), TRL one over both; ours splits
  each minibatch into micro-batches of rows of similar length, about ``--ppo-micro-batch-tokens`` padded tokens each
  (``PPOArgs.micro_batch_tokens``; the same gradient as one forward, tested; 0 turns it off); a reply
  without EOS scores -1 in ours (``missing_eos_score``), its score minus 1 in TRL (``missing_eos_penalty=1``);
* ``generation`` (both): new tokens per second of our sampler (``models.generation.generate`` on
  ``HFCausalLM.from_pretrained(folder)``) vs transformers' ``model.generate`` on the first ``--gen-batch`` prompts
  (left-padded), sampling at temperature 1 with top-k and top-p off, exactly ``--gen-new-tokens`` per row (ours with
  no EOS id, HF with ``min_new_tokens`` = ``max_new_tokens``; checked on the output's shape), one untimed call then
  the best of ``--gen-repeats``. When ``GenerationArgs`` has a fast-decode switch (a bool field named
  ``compile``, ``static_cache``, ``fast_decode`` or ``cuda_graphs``: ``fast_decode_field`` in the JSON), the row
  also runs ``ours_fast`` in its own process and the ratio uses it (``ratio_uses``; the plain one is
  ``ratio_plain_ours_over_trl``). Here the "TRL" column is ``model.generate`` (what TRL's GRPO/RLOO/PPO sample with);
* ``mfu``: model FLOP/s of our SFT of the built-in ``small`` preset (our BPE tokenizer, no packing) against the
  fp32 ``torch.mm`` peak measured in the same process; FLOPs ``6 * N_matmul * tokens + 12 * layers * d_model *
  sum(length^2)`` (see :func:`ours_mfu`). Ours only: no ratio.

``--model PATH`` (any local HF folder, e.g. SmolLM2-135M-Instruct) runs the "both" rows on it too (``sft:NAME``...,
its own ``--model-steps`` / ``--model-warmup`` / ``--model-rounds``, default the tiny rows'; ``--model-only`` skips
the tiny rows). Its own chat template is used, with ``{% generation %}`` markers added when it has
none (TRL's ``assistant_only_loss`` needs them): TRL's ``get_training_chat_template`` for the templates it knows,
else SmolLM2's ChatML is patched (:data:`CHATML_TURN_MARKED`); the marked template goes into a copy of the folder
(weights symlinked) that both sides read.

Run ``pip install -c requirements/cpu.txt -e '.[bench]'`` first (TRL is an optional benchmark dependency, never a
dependency of the package or its tests), then::

    python benchmarks/vs_trl.py --trl112-path /work/trl112 [--model /work/models/smollm2] [--markdown --output F]
        [--steps 20 --warmup 3 --rounds 3 --batch-size 8 --max-length 512] [--only sft reward dpo grpo rloo ppo
        generation mfu] [--prompts 4 --group-size 4 --max-new-tokens 32 --iterations 4] [--ppo-batch 16
        --ppo-minibatch 8 --ppo-epochs 4] [--gen-batch 8 --gen-new-tokens 64] [--trl-sft-mode packing]

What is equal between the two sides:

* the model: one random Llama (``--hidden`` 256, ``--layers`` 4, ``--heads`` 4, float32, SDPA attention, no
  dropout) saved with a BPE tokenizer (trained on the SFT data) and a chat template in a temporary folder; both
  sides load that folder (ours through ``ModelArgs(hf_path=...)``, TRL through ``AutoModelFor*``); the same for
  the marked copy of ``--model``;
* the data (``data/hh_rlhf/sft_train.jsonl`` and ``preference_train.jsonl``), rendered with the folder's chat
  template; the template marks assistant content with ``{% generation %}`` so TRL's assistant mask and ours cover
  the same tokens (the reply and its closing EOS);
* batch size, ``max_length``, step counts and warm-up, the same torch thread count (one process per side, run one
  after the other), no gradient checkpointing, float32 by default (TRL would default to bf16 autocast and gradient
  checkpointing; both are switched off) or bf16 autocast over float32 weights on both sides with ``--precision
  bf16`` (ours ``bf16-mixed``, our default on CPUs with avx512_bf16/amx_bf16; TRL ``bf16=True``), plain ``torch.optim.AdamW`` (foreach, not fused; TRL's default is the fused one) with the same
  learning rate and no weight decay, gradient-norm clipping at 1.0, no data-loader workers, no checkpointing,
  no progress bar, no external logger;
* long sequences: SFT keeps the start (``truncation="right"`` for ours, TRL's only mode ``keep_start``); the reward
  stage drops pairs longer than ``max_length`` (``truncation="drop"`` for ours, which is what TRL does);
* the timer: wall time from the end of the last warm-up optimizer step to the end of the last timed one (a Lightning
  callback's ``on_train_batch_end``, a TRL ``TrainerCallback``'s ``on_step_end``), so data loading, forward,
  backward, clipping, optimizer, scheduler and each framework's own per-step bookkeeping and logging all count.
  Tokens are the non-padding tokens (``attention_mask.sum()``) of the timed steps' batches; for TRL they are counted
  by a wrapper around its data collator (a padding-free batch has no padding: all its positions count).

What differs (each framework's defaults, kept because they are what a user gets):

* batching: without packing ours buckets examples of similar length (``bucket_by_length=True``); TRL's SFT packs
  (``--trl-sft-mode``, above) and its reward trainer samples randomly and pads each batch to its longest row (its
  pair rows have no ``input_ids`` for a length sampler to measure). Each side's padding fraction is reported;
  throughput counts only non-padding tokens, so padding costs time, not credit;
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
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
        self.squared_lengths: list[
            int
        ] = []  # sum over rows of (non-padding length)^2: the attention FLOP term

    def record_batch(self, attention_mask: Any, rows: int) -> None:
        self.tokens.append(int(attention_mask.sum()))
        self.positions.append(int(attention_mask.numel()))
        self.rows.append(rows)
        self.squared_lengths.append(int((attention_mask.long().sum(-1) ** 2).sum()))

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
        import torch

        batch = self.inner(examples)
        if "attention_mask" in batch:
            self.window.record_batch(batch["attention_mask"], len(examples))
        else:  # padding-free (TRL's BFD packing): one flattened row, no padding; sequences start at position 0
            positions = batch["position_ids"]
            self.window.record_batch(torch.ones_like(positions), int((positions == 0).sum()))
        return batch


# ----------------------------------------------------------------------------------------------------- our side


def _lightning_trainer(args: argparse.Namespace, root: str, window: _Window):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
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


def _ours_packing(args: argparse.Namespace, datamodule_cls: type) -> dict[str, Any]:
    """``packing=True`` for our data module when ``--ours-packing`` asks for it (default: whenever the data module
    accepts a ``packing`` argument; detected, so the script runs on versions before and after it exists)."""
    supported = "packing" in inspect.signature(datamodule_cls).parameters
    if args.ours_packing is None:
        return {"packing": True} if supported else {}
    if args.ours_packing and not supported:
        sys.exit(f"--ours-packing: {datamodule_cls.__name__} takes no packing argument in this version")
    return {"packing": bool(args.ours_packing)} if supported else {}


def _sft_data(args: argparse.Namespace, tokenizer_path: str, packing: bool = True):
    from rlhf_lightning.data.sft import SFTDataModule

    return SFTDataModule(
        train_path=str(DATA / "sft_train.jsonl"),
        val_fraction=0.0,
        tokenizer_path=tokenizer_path,
        max_length=args.max_length,
        truncation="right",
        batch_size=args.batch_size,
        seed=args.seed,
        **(_ours_packing(args, SFTDataModule) if packing else {}),
    )


def ours_sft(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.sft import SFTModule

    data = _sft_data(args, str(folder))
    module = SFTModule(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    return {**window.summary("sequences"), "packing": getattr(data, "packing", False)}


def _preference_data(args: argparse.Namespace, folder: Path, packing: bool = True):
    """The shipped training pairs, as the reward and DPO rows both read them (too-long pairs dropped); DPO passes
    ``packing=False`` (it refuses packed batches)."""
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
        **(_ours_packing(args, PreferenceDataModule) if packing else {}),
    )


def ours_reward(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.reward import RewardModule

    data = _preference_data(args, folder)
    module = RewardModule(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    # len(PreferenceBatch) is its pair count (2x rows: chosen, rejected)
    return {**window.summary("pairs"), "share_prompt": getattr(module, "share_prompt", False)}


def _stage_checkpoint(folder: Path, root: str, stage: str = "sft") -> str:
    """A checkpoint of the folder's weights through our stage's own API: ``sft`` (what DPO, GRPO and PPO start
    from: ``policy_from``) or ``reward`` (the folder's backbone + a fresh scalar head: PPO's ``reward_from``, which
    also initialises its critic). Written once per run folder and reused."""
    import torch

    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.reward import RewardModule
    from rlhf_lightning.stages.sft import SFTModule

    path = Path(root) / f"{folder.name}_{stage}.ckpt"
    if not path.exists():
        cls = SFTModule if stage == "sft" else RewardModule
        module = cls(model=ModelArgs(hf_path=str(folder), dropout=0.0), tokenizer_path=str(folder))
        module.configure_model()
        checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
        module.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, path)
    return str(path)


def ours_dpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    from rlhf_lightning.stages.dpo import DPOArgs, DPOModule

    data = _preference_data(args, folder, packing=False)
    module = DPOModule(
        policy_from=_stage_checkpoint(folder, root),
        dpo=DPOArgs(loss="sigmoid", beta=args.beta),
        cache_ref_logprobs=True,
        tokenizer_path=str(folder),
    )
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    return window.summary("pairs")


def _ours_online(baseline: str, args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:

    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.grpo import GRPOArgs, GRPOModule
    from rlhf_lightning.stages.rewards import RewardArgs

    replies = args.prompts * args.group_size
    module = GRPOModule(
        policy_from=_stage_checkpoint(folder, root),
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
    return _fit_online(module, args, folder, root, prompts_per_iteration=args.prompts)


def _fit_online(module: Any, args: argparse.Namespace, folder: Path, root: str, prompts_per_iteration: int):
    """Fit an online stage on the prompts file for ``rl_warmup + iterations`` iterations; seconds per timed one."""
    from lightning.pytorch import Trainer

    from rlhf_lightning.data.prompts import PromptDataModule

    data = PromptDataModule(
        train_path=str(Path(root) / "prompts.jsonl"),
        val_fraction=0.0,
        tokenizer_path=str(folder),
        max_prompt_length=args.max_prompt_length,
        batch_size=prompts_per_iteration,
        seed=args.seed,
    )
    window = _Window(args.rl_warmup)
    Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.rl_warmup + args.iterations,
        max_epochs=-1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
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


def ours_ppo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    """GAE PPO (``PPOModule``): policy and reference from the SFT checkpoint of the folder, reward model and critic
    from its reward checkpoint (the folder's backbone + a scalar head), the settings TRL's side gets."""
    from rlhf_lightning.models.generation import GenerationArgs
    from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
    from rlhf_lightning.stages.rewards import RewardArgs

    module = PPOModule(
        policy_from=_stage_checkpoint(folder, root, "sft"),
        reward_from=_stage_checkpoint(folder, root, "reward"),
        tokenizer_path=str(folder),
        ppo=PPOArgs(
            iterations=args.rl_warmup + args.iterations,
            epochs=args.ppo_epochs,
            minibatch_size=args.ppo_minibatch,
            kl_beta=args.ppo_kl_coef,  # fixed (kl_target None), k1 in the reward: TRL's kl_estimator="k1"
            max_grad_norm=None,  # TRL's PPO loop never clips gradients
            whiten_advantages=True,  # TRL whitens advantages (and not rewards: whiten_rewards=False)
            # ours only: rows of similar length grouped into micro-batches of about this many padded tokens
            # (the gradient is the unsplit minibatch's; 0 = one forward per minibatch, as TRL)
            micro_batch_tokens=args.ppo_micro_batch_tokens or None,
        ),
        # raw reward-model score, as TRL: no calibration, no clipping; a reply without EOS scores -1 (TRL:
        # missing_eos_penalty=1 subtracts 1; the same cost)
        rewards=RewardArgs(normalize=False, clip=None, missing_eos_score=-1.0),
        generation=GenerationArgs(max_new_tokens=args.max_new_tokens),
        sample_every_n=0,
        seed=args.seed,
    )
    module.policy_optimizer_factory = _adamw(args)
    module.value_optimizer_factory = _adamw(args)
    return _fit_online(module, args, folder, root, prompts_per_iteration=args.ppo_batch)


def ours_grpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_online("grpo", args, folder, root)


def ours_rloo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_online("rloo", args, folder, root)


# ----------------------------------------------------------------------------------------------------- TRL side


def _trl_common(args: argparse.Namespace, out: str, group_by_length: bool = False) -> dict[str, Any]:
    return dict(
        output_dir=out,
        use_cpu=True,
        bf16=args.precision == "bf16",  # autocast, as ours (--precision)
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
    mode = args.trl_sft_mode
    config = SFTConfig(
        **_trl_common(args, str(Path(root) / "trl_sft"), mode == "group_by_length"),
        assistant_only_loss=True,
        # packing: TRL's best-fit-decreasing packing into max_length rows; it switches on padding_free (one
        # flattened row per batch, position_ids restart per conversation, no attention_mask)
        packing=mode == "packing",
        packing_strategy="bfd",
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
    return {**window.summary("sequences"), "mode": mode, "padding_free": bool(trainer.padding_free)}


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


def _trl112_path(args: argparse.Namespace) -> str:
    path = args.trl112_path or os.environ.get("RLHF_TRL112_PATH")
    if not path or not (Path(path) / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
        sys.exit(
            f"the ppo row needs TRL 1.12.0 (the last release with PPOTrainer) in its own folder, not found at "
            f"{path!r}. Install it with: pip install --no-deps --target /work/trl112 trl==1.12.0 and pass "
            "--trl112-path /work/trl112 (or set RLHF_TRL112_PATH)"
        )
    return path


def trl_ppo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    """TRL 1.12's ``PPOTrainer`` (``trl.experimental.ppo``; removed after 1.12), imported from ``--trl112-path``
    (put first on ``sys.path`` by the worker before anything imports trl)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # its DataCollatorWithPadding batches the queries for generate
    rows = _rows(Path(root) / "prompts.jsonl")
    dataset = Dataset.from_list([{"input_ids": _prompt_ids(tokenizer, r["prompt"])} for r in rows])

    def load(cls: Any, **kwargs: Any) -> Any:
        return cls.from_pretrained(folder, dtype=torch.float32, **kwargs)

    common = _trl_common(args, str(Path(root) / "trl_ppo"))
    for key in ("max_length", "train_sampling_strategy", "max_steps"):
        common.pop(key, None)
    common.update(
        # one rollout batch of ppo_batch prompts per iteration, num_mini_batches minibatches each one forward and
        # one optimizer step (gradient_accumulation_steps=1: a micro-batch is the whole minibatch)
        per_device_train_batch_size=args.ppo_batch,
        num_mini_batches=args.ppo_batch // args.ppo_minibatch,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.ppo_batch * (args.rl_warmup + args.iterations),
        local_rollout_forward_batch_size=args.ppo_batch,
        response_length=args.max_new_tokens,
        temperature=1.0,
        stop_token="eos",  # stop and truncate at EOS, as ours
        missing_eos_penalty=1.0,
        kl_coef=args.ppo_kl_coef,
        kl_estimator="k1",
        whiten_rewards=False,
        num_sample_generations=0,
        logging_steps=10,
    )
    config = PPOConfig(**common)
    window = _Window(args.rl_warmup)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=load(AutoModelForCausalLM),
        ref_model=load(AutoModelForCausalLM),
        reward_model=load(AutoModelForSequenceClassification, num_labels=1),
        value_model=load(AutoModelForSequenceClassification, num_labels=1),
        train_dataset=dataset,
        callbacks=[_trl_timer(window)],
    )
    trainer.train()
    import trl

    return {**window.iteration_summary(), "trl_version": trl.__version__}


def trl_grpo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _trl_online("grpo", args, folder, root)


def trl_rloo(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _trl_online("rloo", args, folder, root)


# ------------------------------------------------------------------------------------------------- generation

FAST_DECODE_FIELDS = ("compile", "static_cache", "fast_decode", "cuda_graphs")


def fast_decode_field(choice: str = "auto") -> str | None:
    """The name of our sampler's fast-decode switch (a bool field of ``GenerationArgs``), if this version has one:
    ``--gen-fast auto`` takes the first of ``FAST_DECODE_FIELDS`` it has, ``none`` none, a field name that field."""
    from rlhf_lightning.models.generation import GenerationArgs

    names = {f.name for f in dataclasses.fields(GenerationArgs)}
    if choice == "none":
        return None
    if choice != "auto":
        if choice not in names:
            raise SystemExit(f"--gen-fast {choice}: GenerationArgs has no such field in this version")
        return choice
    return next((name for name in FAST_DECODE_FIELDS if name in names), None)


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat-templated prompt with the generation prompt, as token ids (transformers 5 returns a BatchEncoding
    from ``apply_chat_template(tokenize=True)``, whose ``len`` is its number of keys: take ``input_ids``)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _generation_batch(args: argparse.Namespace, folder: Path, root: str) -> tuple[Any, Any, int]:
    """The first ``--gen-batch`` prompts of the prompts file, left-padded (ids, bool mask) and the pad id."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [
        _prompt_ids(tokenizer, r["prompt"]) for r in _rows(Path(root) / "prompts.jsonl")[: args.gen_batch]
    ]
    width = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, row in enumerate(prompts):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = True
    return ids, mask, pad


def _time_generation(args: argparse.Namespace, fn: Callable[[], Any], rows: int) -> dict[str, Any]:
    """One untimed call, then the best of ``--gen-repeats``; new tokens/s = rows x max_new_tokens / seconds (every
    row generates exactly ``--gen-new-tokens``: no EOS stops it on either side, checked on the output's shape)."""
    out = fn()  # warm-up (and compilation, for a compiled decode)
    assert out.shape == (rows, args.gen_new_tokens), out.shape
    times = []
    for _ in range(args.gen_repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "seconds": round(best, 4),
        "all_seconds": [round(t, 4) for t in times],
        "new_tokens": rows * args.gen_new_tokens,
        "new_tokens_per_sec": round(rows * args.gen_new_tokens / best, 1),
        "batch": rows,
        "prompt_width": None,
    }


def _ours_generation(args: argparse.Namespace, folder: Path, root: str, fast: bool) -> dict[str, Any]:
    import torch

    from rlhf_lightning.models.generation import GenerationArgs, generate
    from rlhf_lightning.models.hf import HFCausalLM

    ids, mask, pad = _generation_batch(args, folder, root)
    model = HFCausalLM.from_pretrained(folder).eval()
    extra = {}
    if fast:
        field = fast_decode_field(args.gen_fast)
        if field is None:
            raise RuntimeError("GenerationArgs has no fast-decode switch in this version")
        extra[field] = True
    gen = GenerationArgs(max_new_tokens=args.gen_new_tokens, temperature=1.0, top_k=0, top_p=1.0, **extra)
    generator = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def run() -> Any:  # eos_token_id=-1: no token ends a row, every row runs to max_new_tokens
        return generate(
            model, ids, mask, gen, eos_token_id=-1, pad_token_id=pad, generator=generator
        ).response_ids

    return {**_time_generation(args, run, len(ids)), "prompt_width": ids.shape[1], "fast": extra or None}


def ours_generation(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_generation(args, folder, root, fast=False)


def ours_generation_fast(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    return _ours_generation(args, folder, root, fast=True)


def hf_generation(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    """transformers' ``model.generate``: sampling at temperature 1, top-k and top-p off, ``min_new_tokens`` =
    ``max_new_tokens`` (no early stop), its default dynamic KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, mask, pad = _generation_batch(args, folder, root)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def run() -> Any:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            max_new_tokens=args.gen_new_tokens,
            min_new_tokens=args.gen_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
        )
        return out[:, ids.shape[1] :]

    return {**_time_generation(args, run, len(ids)), "prompt_width": ids.shape[1]}


# ------------------------------------------------------------------------------------------------------- MFU


def _matmul_peak(seconds: float = 3.0, n: int = 2048, dtype: str = "float32") -> dict[str, Any]:
    """Matmul FLOP/s of this process's threads in ``dtype`` (float32 or bfloat16): ``torch.mm`` of two n x n
    matrices (2 n^3 FLOPs) in a loop for about ``seconds`` after one warm-up product; the best of 5 equal slices."""
    import torch

    kind = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    out = torch.empty(n, n, dtype=kind)
    torch.mm(a, b, out=out)
    start = time.perf_counter()
    reps = 1
    while time.perf_counter() - start < seconds / 5 and reps < 1000:
        torch.mm(a, b, out=out)
        reps += 1
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "reps": reps, "flops_per_sec": 2 * n**3 * reps / best}


def ours_mfu(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    """SFT of the built-in ``small`` preset (our BPE tokenizer trained on the SFT data, vocab ``--vocab-size``; no
    packing, so the FLOP count is that of the padded batches' real rows) and its model FLOP utilisation against the
    fp32 matmul peak measured in this process.

    Model FLOPs per step (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): ``6 * N * tokens`` with N the
    parameters of the matmuls (every ``nn.Linear``, the tied LM head included; the embedding lookup and the norms
    are not matmuls) and tokens the non-padding tokens, plus the attention score and value products
    ``12 * layers * d_model * sum_rows(length^2)`` (forward + backward, the full square as PaLM counts it, no causal
    halving). Padding, the loss and the optimizer are not counted: MFU is useful FLOPs / peak.
    """
    import torch

    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.sft import SFTModule
    from rlhf_lightning.tokenization import load_or_train_tokenizer

    tokenizer = load_or_train_tokenizer(
        Path(root) / "tokenizer.json", [DATA / "sft_train.jsonl"], vocab_size=args.vocab_size
    )
    data = _sft_data(args, tokenizer.source, packing=False)
    module = SFTModule(model=ModelArgs(preset="small", dropout=0.0), tokenizer_path=tokenizer.source)
    module.optimizer_factory = _adamw(args)
    window = _Window(args.warmup)
    _lightning_trainer(args, root, window).fit(module, datamodule=data)
    summary = window.summary("sequences")
    config = module.model.config
    linear = sum(m.weight.numel() for m in module.model.modules() if isinstance(m, torch.nn.Linear))
    timed = slice(args.warmup, len(window.ends))
    tokens, squares = sum(window.tokens[timed]), sum(window.squared_lengths[timed])
    flops = 6 * linear * tokens + 12 * config.n_layer * config.n_embd * squares
    achieved = flops / summary["seconds"]
    peak = _matmul_peak()
    # under --precision bf16 the matmuls run in bf16: also measure that peak, or the fp32 MFU overstates the use
    bf16 = _matmul_peak(dtype="bfloat16") if args.precision == "bf16" else None
    return {
        **summary,
        "preset": "small",
        "precision": args.precision,
        "matmul_parameters": linear,
        "model_flops": flops,
        "model_flops_per_sec": round(achieved),
        "matmul_peak_flops_per_sec": round(peak["flops_per_sec"]),
        "matmul_peak": {k: peak[k] for k in ("n", "reps")},
        "mfu": round(achieved / peak["flops_per_sec"], 4),
        **(
            {
                "bf16_matmul_peak_flops_per_sec": round(bf16["flops_per_sec"]),
                "mfu_vs_bf16_peak": round(achieved / bf16["flops_per_sec"], 4),
            }
            if bf16
            else {}
        ),
        "formula": "6 * N_matmul * tokens + 12 * layers * d_model * sum(length^2)",
    }


# --------------------------------------------------------------------------------------------------------- main


class Row(NamedTuple):
    """One comparison: our side, the other side (None: ours only), the metric, whether higher is better (times give
    the ratio other / ours, so > 1 always means ours is faster), whether it also runs on ``--model``, and what the
    other side is."""

    ours: Callable[..., dict[str, Any]]
    trl: Callable[..., dict[str, Any]] | None
    metric: str
    higher: bool
    both: bool = False
    baseline: str = ""


ROWS = {
    "sft": Row(ours_sft, trl_sft, "tokens_per_sec", True, True, "TRL SFTTrainer"),
    "reward": Row(ours_reward, trl_reward, "pairs_per_sec", True, True, "TRL RewardTrainer"),
    "dpo": Row(ours_dpo, trl_dpo, "pairs_per_sec", True, False, "TRL DPOTrainer"),
    "grpo": Row(ours_grpo, trl_grpo, "sec_per_iteration", False, False, "TRL GRPOTrainer"),
    "rloo": Row(ours_rloo, trl_rloo, "sec_per_iteration", False, False, "TRL RLOOTrainer"),
    "ppo": Row(ours_ppo, trl_ppo, "sec_per_iteration", False, False, "TRL 1.12 PPOTrainer"),
    "generation": Row(
        ours_generation, hf_generation, "new_tokens_per_sec", True, True, "transformers model.generate"
    ),
    "mfu": Row(ours_mfu, None, "mfu", True, False, "fp32 torch.mm peak of the same process"),
}
NEEDS_PROMPTS = {"grpo", "rloo", "ppo", "generation"}
NEEDS_CHECKPOINTS = {"dpo", "grpo", "rloo", "ppo"}
NEEDS_TRL112 = {("ppo", "trl")}


def _prepare(args: argparse.Namespace, folder: Path, root: str) -> dict[str, Any]:
    """The SFT and reward checkpoints of the folder (in their own process, so no row's peak RSS includes them)."""
    return {
        "sft": _stage_checkpoint(folder, root, "sft"),
        "reward": _stage_checkpoint(folder, root, "reward"),
    }


def _side_fn(row: str, side: str) -> Callable[..., dict[str, Any]]:
    if row == "prepare":
        return _prepare
    if side == "ours_fast":
        return ours_generation_fast
    fn = ROWS[row].ours if side == "ours" else ROWS[row].trl
    if fn is None:
        raise ValueError(f"row {row} has no side {side}")
    return fn


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "trl", "datasets", "rlhf_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()


def run_worker(row: str, side: str, job_path: str) -> None:
    """One side of one row in this (fresh) process; writes its summary and peak RSS to the job's ``out`` file."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    args = argparse.Namespace(**job["args"])
    if (row, side) in NEEDS_TRL112:  # before anything imports trl: TRL 1.12 shadows the installed one here
        sys.path.insert(0, _trl112_path(args))
    _quiet()
    import torch

    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its log dicts; the parent's stdout is the JSON
        out = _side_fn(row, side)(args, Path(job["folder"]), job["root"])
    # ru_maxrss: the process's peak resident set, in KiB on Linux (bytes on macOS)
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)
    Path(job["out"]).write_text(json.dumps(out), encoding="utf-8")


def run_side(row: str, side: str, args: argparse.Namespace, folder: Path, root: Path) -> dict[str, Any]:
    """Run one side of one row in a fresh subprocess of this script (``--worker ROW SIDE --job FILE``)."""
    jobs = root / "jobs"
    jobs.mkdir(exist_ok=True)
    n = len(list(jobs.glob("*.json")))
    job = jobs / f"{n:03d}_{row}_{side}.json"
    out = jobs / f"{n:03d}_{row}_{side}.out"
    job.write_text(
        json.dumps({"args": vars(args), "folder": str(folder), "root": str(root), "out": str(out)}),
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row, side, "--job", str(job)]
    done = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{row}/{side} failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads(out.read_text(encoding="utf-8"))


def _ratio(ours: float, theirs: float, higher: bool) -> float:
    return round(ours / theirs if higher else theirs / ours, 3)


def compare(name: str, args: argparse.Namespace, folder: Path, root: Path) -> dict[str, Any]:
    """``--rounds`` runs of each side (alternating which goes first), each in its own process; best, median and
    every round per side, and the ratios (> 1: ours faster) from the best and the median figures."""
    row = ROWS[name]
    sides = ["ours"]
    if name == "generation" and fast_decode_field(args.gen_fast) is not None:
        sides.append("ours_fast")
    if row.trl is not None:
        sides.append("trl")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(args.rounds if row.trl is not None else 1):
        for side in sides if r % 2 == 0 else sides[::-1]:
            runs[side].append(run_side(name, side, args, folder, root))
    key = row.metric
    pick = max if row.higher else min
    result: dict[str, Any] = {"metric": key, "baseline": row.baseline, "model": folder.name}
    for side, rs in runs.items():
        best = pick(rs, key=lambda x: x[key])
        result[side] = {
            **best,
            f"median_{key}": statistics.median(x[key] for x in rs),
            f"all_{key}": [x[key] for x in rs],
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
        }
    if row.trl is not None:
        primary = "ours_fast" if "ours_fast" in runs else "ours"
        ours, trl = result[primary], result["trl"]
        result["ratio_uses"] = primary
        result["ratio_ours_over_trl"] = _ratio(ours[key], trl[key], row.higher)
        result["ratio_ours_over_trl_median"] = _ratio(ours[f"median_{key}"], trl[f"median_{key}"], row.higher)
        result["ratio_per_round"] = [
            _ratio(o[key], t[key], row.higher) for o, t in zip(runs[primary], runs["trl"])
        ]
        result["ratio_rss_ours_over_trl"] = round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3)
        if primary != "ours":
            result["ratio_plain_ours_over_trl"] = _ratio(result["ours"][key], trl[key], row.higher)
    return result


# ------------------------------------------------------------------------------------------- model folders

# SmolLM2's ChatML turn, as its template writes it, and the same text with the assistant's reply and its closing
# <|im_end|> (the tokenizer's EOS) between {% generation %} markers for TRL's assistant mask. Our mask (from
# prefix renders, tokenization_hf) covers the reply, <|im_end|> and the "\n" the template writes after it in
# non-final turns; TRL's covers the reply and <|im_end|>: one token per earlier assistant turn apart.
CHATML_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_TURN_MARKED = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + CHATML_TURN + "{% endif %}"
)


def marked_template(tokenizer: Any, use_trl: bool = True) -> str | None:
    """A chat template with ``{% generation %}`` markers rendering like the tokenizer's own (None: it has them).

    TRL 1.16's ``get_training_chat_template`` patches the templates it knows (Qwen, Llama 3, Gemma, ...); SmolLM2's
    ChatML is not one of them (it raises), so a ChatML template is patched here with :data:`CHATML_TURN_MARKED`.
    """
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        return None
    if use_trl:  # the tests pass False: the test suite never imports trl
        with contextlib.suppress(Exception):
            from trl.chat_template_utils import get_training_chat_template

            return get_training_chat_template(tokenizer)
    if CHATML_TURN not in template:
        sys.exit(
            f"{tokenizer.name_or_path}: its chat template has no {{% generation %}} markers (TRL's assistant_only_loss "
            "needs them) and is neither one TRL can patch nor SmolLM2's ChatML; write a marked copy of the folder"
        )
    return template.replace(CHATML_TURN, CHATML_TURN_MARKED)


def prepare_model_folder(source: Path, target: Path) -> Path:
    """``source`` with a chat template that has generation markers (:func:`marked_template`), both sides read this
    copy: weights and configs are symlinked, the tokenizer is saved again with the marked template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    marked = marked_template(tokenizer)
    if marked is None:
        return source
    target.mkdir(parents=True)
    tokenizer.chat_template = marked
    tokenizer.save_pretrained(target)
    for item in source.iterdir():
        if not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    return target


# -------------------------------------------------------------------------------------------------- report

UNITS = {
    "tokens_per_sec": "tok/s",
    "pairs_per_sec": "pairs/s",
    "sec_per_iteration": "s/it",
    "new_tokens_per_sec": "tok/s",
}


def _figure(side: dict[str, Any], metric: str) -> str:
    value = side[
        metric
    ]  # three significant figures below 1000, whole numbers with thousands separators above
    return f"{value:.3g} {UNITS[metric]}" if value < 1000 else f"{value:,.0f} {UNITS[metric]}"


def markdown(result: dict[str, Any]) -> str:
    """The README table of a run (``--markdown``; ``--from-json FILE`` re-renders a saved run)."""
    date = result.get("date", "")
    lines = [
        "| row | model | ours | TRL | ratio (> 1: ours faster) | peak RSS MB ours / TRL | date |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result.get("rows", {}).items():
        metric = row["metric"]
        if metric == "mfu":
            ours = row["ours"]
            lines.append(
                f"| {name} | {row['model']} | {ours['model_flops_per_sec'] / 1e9:.1f} GFLOP/s (MFU {ours['mfu']:.1%}) "
                f"| peak {ours['matmul_peak_flops_per_sec'] / 1e9:.1f} GFLOP/s (fp32 mm)"
                + (
                    f"; bf16 mm {ours['bf16_matmul_peak_flops_per_sec'] / 1e9:.1f} GFLOP/s "
                    f"(MFU {ours['mfu_vs_bf16_peak']:.1%})"
                    if "bf16_matmul_peak_flops_per_sec" in ours
                    else ""
                )
                + " | - "
                f"| {ours['peak_rss_mb']:.0f} / - | {date} |"
            )
            continue
        ours = _figure(row["ours"], metric)
        if "ours_fast" in row:
            ours = f"{ours}; fast {_figure(row['ours_fast'], metric)}"
        rss = f"{row[row['ratio_uses']]['peak_rss_mb']:.0f} / {row['trl']['peak_rss_mb']:.0f}"
        lines.append(
            f"| {name} | {row['model']} | {ours} | {_figure(row['trl'], metric)} ({row['baseline']}) "
            f"| {row['ratio_ours_over_trl']:.2f}x | {rss} | {date} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- main


def write_prompts(folder: Path, path: Path, max_prompt_length: int) -> int:
    """The HH prompts whose chat-templated form fits ``max_prompt_length`` tokens, as a JSONL file both sides read
    (TRL 1.x has no prompt truncation; ours would left-truncate: equal inputs need the long ones left out)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    kept = [
        r
        for r in _rows(DATA / "prompts_train.jsonl")
        if len(_prompt_ids(tokenizer, r["prompt"])) <= max_prompt_length
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
    parser.add_argument(
        "--precision",
        choices=["32", "bf16"],
        default="32",
        help="training rows on both sides: float32, or bf16 autocast over float32 weights (ours bf16-mixed, TRL "
        "bf16=True); generation stays float32",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating which goes first")
    parser.add_argument("--only", choices=list(ROWS), nargs="+", default=None, help="run these comparisons")
    parser.add_argument(
        "--model", default=None, help="a local HF folder: the sft, reward and generation rows also run on it"
    )
    parser.add_argument(
        "--model-steps", type=int, default=None, help="timed steps of the --model rows (default --steps)"
    )
    parser.add_argument(
        "--model-warmup", type=int, default=None, help="warm-up steps of the --model rows (default --warmup)"
    )
    parser.add_argument(
        "--model-rounds", type=int, default=None, help="rounds of the --model rows (default --rounds)"
    )
    parser.add_argument(
        "--model-only", action="store_true", help="run only the --model rows (not the tiny folder's)"
    )
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (sigmoid loss)")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO/RLOO: prompts per iteration")
    parser.add_argument(
        "--group-size", type=int, default=4, help="GRPO/RLOO: replies per prompt (num_generations)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="GRPO/RLOO/PPO: max_completion_length / response_length",
    )
    parser.add_argument(
        "--max-prompt-length", type=int, default=192, help="GRPO/RLOO/PPO: longer prompts are left out"
    )
    parser.add_argument("--iterations", type=int, default=4, help="GRPO/RLOO/PPO: timed iterations per side")
    parser.add_argument(
        "--rl-warmup", type=int, default=1, help="GRPO/RLOO/PPO: untimed iterations first (>= 1)"
    )
    parser.add_argument("--kl-coef", type=float, default=0.04, help="GRPO: KL loss weight (TRL beta)")
    parser.add_argument(
        "--rloo-kl-coef", type=float, default=0.05, help="RLOO: KL-in-reward weight (TRL beta)"
    )
    parser.add_argument("--ppo-batch", type=int, default=16, help="PPO: prompts per iteration")
    parser.add_argument("--ppo-minibatch", type=int, default=8, help="PPO: rows per optimizer step")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="PPO: epochs per rollout batch")
    parser.add_argument(
        "--ppo-micro-batch-tokens",
        type=int,
        default=1024,
        help="PPO, ours: padded tokens per micro-batch (PPOArgs.micro_batch_tokens; 0: one forward per minibatch)",
    )
    parser.add_argument("--ppo-kl-coef", type=float, default=0.05, help="PPO: fixed KL-in-reward coefficient")
    parser.add_argument(
        "--trl112-path",
        default=None,
        help="PPO: folder holding TRL 1.12.0 (pip install --no-deps --target DIR trl==1.12.0); "
        "default $RLHF_TRL112_PATH",
    )
    parser.add_argument("--gen-batch", type=int, default=8, help="generation: prompts per batch")
    parser.add_argument("--gen-new-tokens", type=int, default=64, help="generation: new tokens per row")
    parser.add_argument("--gen-repeats", type=int, default=3, help="generation: timed calls (best kept)")
    parser.add_argument(
        "--gen-fast",
        choices=["auto", "none", *FAST_DECODE_FIELDS],
        default="auto",
        help="generation: our fast-decode switch (auto: the first GenerationArgs has; compile implies static_cache)",
    )
    parser.add_argument(
        "--trl-sft-mode",
        choices=["packing", "group_by_length", "random"],
        default="packing",
        help="TRL's SFT batching: BFD packing (padding-free), LengthGroupedSampler, or random padded batches",
    )
    parser.add_argument(
        "--ours-packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our SFT/preference data modules pack (default: on when they accept packing=True)",
    )
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print the README table after the JSON")
    parser.add_argument("--from-json", default=None, help="print the README table of a saved run and exit")
    parser.add_argument("--worker", nargs=2, metavar=("ROW", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "lightning", "transformers", "trl", "datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker, args.job)
        return
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text(encoding="utf-8"))))
        return
    if args.rl_warmup < 1:
        parser.error("--rl-warmup must be >= 1 (the window starts at the end of the last warm-up iteration)")
    if args.warmup < 1 or (args.model_warmup is not None and args.model_warmup < 1):
        parser.error("--warmup must be >= 1 (the window starts at the end of the last warm-up step)")
    if args.model_only and not args.model:
        parser.error("--model-only needs --model")
    if args.ppo_batch % args.ppo_minibatch:
        parser.error("--ppo-batch must be a multiple of --ppo-minibatch (TRL's num_mini_batches)")
    names = list(args.only or ROWS)
    if any(ROWS[n].trl is not None for n in names):
        _require_trl()
    if "ppo" in names:
        _trl112_path(args)  # fail before any row runs
    _quiet()
    import torch

    from rlhf_lightning.data.preference import PreferenceDataModule
    from rlhf_lightning.data.sft import SFTDataModule

    versions = _versions()
    if "ppo" in names:
        dist = next(Path(_trl112_path(args)).glob("trl-*.dist-info"), None)
        versions["trl_ppo"] = dist.name.removeprefix("trl-").removesuffix(".dist-info") if dist else "1.12?"
    result: dict[str, Any] = {
        "benchmark": "vs_trl",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "heads": args.heads},
        "extra_model": args.model,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "model_timed_steps": args.model_steps or args.steps,
        "model_warmup_steps": args.model_warmup or args.warmup,
        "model_rounds": args.model_rounds or args.rounds,
        "rounds": args.rounds,
        "precision": args.precision,
        "process_per_side": True,
        "trl_sft_mode": args.trl_sft_mode,
        "ours_packing": {
            "sft": bool(_ours_packing(args, SFTDataModule).get("packing")),
            "preference": bool(_ours_packing(args, PreferenceDataModule).get("packing")),
        },
        "fast_decode_field": fast_decode_field(args.gen_fast),
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
        "ppo": {
            "batch": args.ppo_batch,
            "micro_batch_tokens_ours": args.ppo_micro_batch_tokens or None,
            "minibatch": args.ppo_minibatch,
            "epochs": args.ppo_epochs,
            "kl_coef": args.ppo_kl_coef,
        },
        "generation": {
            "batch": args.gen_batch,
            "new_tokens": args.gen_new_tokens,
            "repeats": args.gen_repeats,
        },
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tiny_root = Path(tmp) / "tiny"
        tiny_root.mkdir()
        folder = make_llama_folder(tiny_root / "llama", args)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        result["model"]["vocab"] = config.vocab_size
        targets = [] if args.model_only else [(folder, tiny_root, args, "")]
        if args.model:
            model_root = Path(tmp) / "model"
            model_root.mkdir()
            model_folder = prepare_model_folder(
                Path(args.model).resolve(), model_root / Path(args.model).name
            )
            model_args = argparse.Namespace(
                **{
                    **vars(args),
                    "steps": args.model_steps or args.steps,
                    "warmup": args.model_warmup or args.warmup,
                    "rounds": args.model_rounds or args.rounds,
                }
            )
            targets.append((model_folder, model_root, model_args, f":{Path(args.model).name}"))
        for target, root, target_args, suffix in targets:
            rows = [n for n in names if not suffix or ROWS[n].both]
            if NEEDS_PROMPTS & set(rows):
                result.setdefault("prompts_kept", {})[target.name] = write_prompts(
                    target, root / "prompts.jsonl", args.max_prompt_length
                )
            if NEEDS_CHECKPOINTS & set(rows):
                run_side("prepare", "ours", target_args, target, root)
            for name in rows:
                print(f"vs_trl: {name}{suffix} ...", file=sys.stderr, flush=True)
                result["rows"][name + suffix] = compare(name, target_args, target, root)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    if args.markdown:
        print()
        print(markdown(result))


if __name__ == "__main__":
    main()
