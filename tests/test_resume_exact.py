"""Exact resume from a mid-epoch checkpoint: N steps straight == (checkpoint at step k, fresh Trainer, resume to N).

The SFT and reward stages train on length-bucketed batches whose order depends on the epoch; a resume has to
continue with the batch after the checkpoint's (not replay the epoch's first ones). A straight run (validating every
5 steps) saves checkpoints every 2 train steps and after each validation, as configs/reward.yaml does; fresh Trainers
resume from a step in epoch 0, at the epoch boundary and in epoch 1, and must end with identical weights, having
trained on exactly the batches the straight run used after that step. Tiny model without dropout, CPU.

Not covered: a reward checkpoint saved on the last train batch of an epoch, before that epoch's validation (the
resumed run skips that validation: Lightning fast-forwards it, so the score statistics it sets differ).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_reward_stage import _toy_pairs  # tests/ is on sys.path under pytest
from trainers import quiet_trainer

from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.sft import SFTModule

TINY = ModelArgs(preset="tiny", dropout=0.0)
BATCHES_PER_EPOCH = 10  # 40 rows, batch_size 4
MAX_STEPS = 14  # one epoch and a part of the next


class BatchLog(L.Callback):
    """Records (epoch, batch_idx, per-row token sums) of every training batch: which data each step used."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch.chosen_ids if hasattr(batch, "chosen_ids") else batch.input_ids
        self.seen.append((trainer.current_epoch, batch_idx, tuple(ids.sum(-1).tolist())))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(root: Path, tok_path: Path) -> tuple[SFTModule, SFTDataModule]:
    rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in _toy_pairs(40, 0)]
    train = _write_jsonl(root / "sft.jsonl", rows)
    dm = SFTDataModule(
        train_path=str(train), tokenizer_path=str(tok_path), val_fraction=0.0, batch_size=4, max_length=64
    )
    return SFTModule(model=TINY, tokenizer_path=str(tok_path)), dm


def _reward(root: Path, tok_path: Path) -> tuple[RewardModule, PreferenceDataModule]:
    train = _write_jsonl(root / "train.jsonl", _toy_pairs(40, 0))
    val = _write_jsonl(root / "val.jsonl", _toy_pairs(8, 1))
    dm = PreferenceDataModule(
        train_path=str(train), val_path=str(val), tokenizer_path=str(tok_path), batch_size=4, max_length=64
    )
    return RewardModule(model=TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)), dm


STAGES = {"sft": _sft, "reward": _reward}


def _fit(root: Path, stage: str, tok_path: Path, ckpt_path: Path | None = None):
    """Fit ``stage`` to MAX_STEPS from ``ckpt_path``, or from scratch saving checkpoints every 2 steps (under
    ``root/train_batch_end``) and after each validation (``root/validation_end``); return (final weights, batch
    log, warning messages)."""
    torch.manual_seed(0)
    module, dm = STAGES[stage](root, tok_path)
    log = BatchLog()
    callbacks: list[L.Callback] = [log]
    if ckpt_path is None:
        for folder, every in (("train_batch_end", 2), ("validation_end", None)):
            callbacks.append(
                ModelCheckpoint(root / folder, filename="{step}", save_top_k=-1, every_n_train_steps=every)
            )
    trainer = quiet_trainer(
        root,
        max_steps=MAX_STEPS,
        val_check_interval=5,
        num_sanity_val_steps=0,
        enable_checkpointing=ckpt_path is None,
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == MAX_STEPS
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return weights, log.seen, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tok_path: Path):
    """``straight(stage)``: one uninterrupted MAX_STEPS run of ``stage`` that saves checkpoints (cached)."""
    runs: dict[str, dict] = {}

    def get(stage: str) -> dict:
        if stage not in runs:
            root = tmp_path_factory.mktemp(stage)
            weights, seen, _ = _fit(root, stage, tok_path)
            runs[stage] = {"root": root, "weights": weights, "seen": seen}
        return runs[stage]

    return get


@pytest.mark.parametrize(
    "stage, cadence, step",
    [
        ("sft", "train_batch_end", 4),  # mid epoch 0
        ("sft", "train_batch_end", BATCHES_PER_EPOCH),  # the epoch's last batch
        ("sft", "train_batch_end", 12),  # mid epoch 1
        ("reward", "train_batch_end", 4),
        ("reward", "train_batch_end", 12),
        ("reward", "validation_end", 5),  # configs/reward.yaml: validate (and save) mid-epoch
    ],
)
def test_resume_from_a_checkpoint_is_bit_identical(
    straight, stage: str, cadence: str, step: int, tok_path: Path, tmp_path: Path
) -> None:
    run = straight(stage)
    ckpt = run["root"] / cadence / f"step={step}.ckpt"
    assert ckpt.is_file()
    weights, seen, caught = _fit(tmp_path, stage, tok_path, ckpt_path=ckpt)
    # the resumed run trains on exactly the batches the straight run used after `step`, at the same loop positions
    assert seen == run["seen"][step:]
    assert not [w for w in caught if "not resumable" in w]
    assert weights.keys() == run["weights"].keys()
    differ = [k for k, v in weights.items() if not torch.equal(v, run["weights"][k])]
    assert not differ, f"weights differ after resuming from step {step}: {differ[:5]}"
