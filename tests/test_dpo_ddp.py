"""DPO on 2 data-parallel ranks (gloo, CPU, ``Trainer(strategy="ddp", devices=2)``): one process with batch 2b.

The ranks train on ``PreferenceDataModule``'s own shards (the batch sampler gives rank r the r-th slice of each global
batch of 2b pairs, padding a short last batch with its own rows). One process is given, step by step, the union of the
two ranks' batches (5 pairs in global batches of 4: each epoch's last step holds its 1 pair on both ranks, padded, so
the single process sees that pair twice, as the two ranks' mean does; uneven pair counts per rank are covered by
``test_ddp.py``'s weighted-means test) and must end with the same weights
and log the same ``train/*`` and ``val/*`` values as rank 0. Each rank's reference cache holds exactly the pairs it
saw, with their reference log-probs, also after a mid-epoch resume, which ends with the straight run's weights.
"""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from test_ddp import run_on_two_ranks
from test_dpo_stage import sft_checkpoint  # noqa: F401 (module-scoped fixture)
from torch.utils.data import DataLoader

from rlhf_lightning.data.formats import load_rows, parse_preference
from rlhf_lightning.data.preference import PreferenceDataModule, PreferenceDataset, encode_pair
from rlhf_lightning.data.sampling import LengthBucketBatchSampler
from rlhf_lightning.stages.dpo import DPOModule, pair_keys, pair_response_mask, sequence_logprobs

REPO = Path(__file__).resolve().parents[1]
PAIRS, B, MAX_LENGTH, STEPS = 5, 2, 128, 4  # 3 batches padded to 4: 2 steps per epoch on each of 2 ranks
STATS = ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin")


def _write_pairs(source: Path, target: Path, tok) -> None:
    """The first ``PAIRS`` rows of ``source`` that fit ``MAX_LENGTH`` untruncated (so no pair is dropped)."""
    lines = source.read_text().splitlines()
    kept = [
        line
        for line, pair in zip(lines[:40], load_rows(source, parse_preference).rows)
        if encode_pair(tok, pair, MAX_LENGTH)[2] == "ok"
    ][:PAIRS]
    assert len(kept) == PAIRS
    target.write_text("\n".join(kept) + "\n")


def _data(folder: Path, tokenizer_path: str) -> PreferenceDataModule:
    return PreferenceDataModule(
        train_path=str(folder / "train.jsonl"),
        val_path=str(folder / "val.jsonl"),
        tokenizer_path=tokenizer_path,
        max_length=MAX_LENGTH,
        batch_size=B,
    )


def _module(sft: str, tokenizer_path: str) -> DPOModule:
    module = DPOModule(policy_from=sft, tokenizer_path=tokenizer_path)
    module.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)
    module.scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return module


def _trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_steps=STEPS,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(root, name="", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _rank_batches(data: PreferenceDataModule, epochs: range) -> list:
    """The ``PreferenceBatch`` es this rank's train loader yields in ``epochs``, in order."""
    loader = data.train_dataloader()
    out = []
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def _cache_check(module: DPOModule, batches: list) -> dict[str, torch.Tensor]:
    """Does the reference cache hold exactly ``batches``' pairs, each with its reference log-probs computed now?"""
    expected, error = set(), 0.0
    for batch in batches:
        keys = pair_keys(batch)
        expected.update(keys)
        with torch.no_grad():
            ref = sequence_logprobs(
                module.reference, batch.input_ids, batch.attention_mask, pair_response_mask(batch)
            )
        cached = torch.tensor([module._ref_cache[k] for k in keys if k in module._ref_cache])
        if len(cached) < len(keys):
            return {"keys_match": torch.tensor(False), "max_error": torch.tensor(float("inf"))}
        error = max(error, float((cached.T.reshape(-1) - ref).abs().max()))
    keys = sorted(module._ref_cache)
    return {
        "keys_match": torch.tensor(set(keys) == expected),
        "max_error": torch.tensor(error),
        "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8),
    }


def _on_rank(rank: int, sft: str, tokenizer_path: str, folder: str) -> dict[str, torch.Tensor]:
    """Straight run, two validations and a resumed run on this rank (inside ``run_on_two_ranks``' process group)."""
    root = Path(folder)
    torch.set_num_threads(1)
    # the process group exists: Lightning's DDP strategy joins it (LOCAL_RANK makes it launch nothing)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", RANK=str(rank))
    rank_zero_only.rank = rank
    ddp = dict(strategy="ddp", devices=2, use_distributed_sampler=False)
    out: dict[str, torch.Tensor] = {}

    straight, data = _module(sft, tokenizer_path), _data(root, tokenizer_path)
    every_step = ModelCheckpoint(root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(root / "straight", enable_checkpointing=True, callbacks=[every_step], **ddp)
    trainer.fit(straight, datamodule=data)
    out.update({f"straight:{k}": v.detach().clone() for k, v in straight.policy.state_dict().items()})
    val_batches = list(data.val_dataloader())
    out.update(
        {
            f"cache:{k}": v
            for k, v in _cache_check(straight, _rank_batches(data, range(2)) + val_batches).items()
        }
    )

    # validation on this rank's own half of the pairs (3 and 2): rank 0 must still report the whole set's means
    full = trainer.validate(straight, datamodule=data, verbose=False)[0]
    items = data.val_dataset.sorted_by_length().items
    shard = DataLoader(PreferenceDataset(items[rank::2]), batch_size=B, collate_fn=data._collate())
    sharded = trainer.validate(straight, dataloaders=shard, verbose=False)[0]
    with torch.no_grad():  # this rank's own mean loss over its half, for the test's "halves differ" check
        sums = [(straight.loss(batch)[0] * len(batch), len(batch)) for batch in shard]
    out["val:own_loss"] = sum(total for total, _ in sums) / sum(n for _, n in sums)
    out["val:full"] = torch.tensor([full[f"val/{k}"] for k in STATS])
    out["val:sharded"] = torch.tensor([sharded[f"val/{k}"] for k in STATS])
    torch.distributed.barrier()

    # resume from step 1 (mid-epoch 0): the same weights as the straight run; the cache refills with what it sees
    torch.manual_seed(1 + rank)  # resume must not depend on the global seed
    resumed, data = _module(sft, tokenizer_path), _data(root, tokenizer_path)
    trainer = _trainer(root / f"resumed{rank}", logger=False, **ddp)
    trainer.fit(resumed, datamodule=data, ckpt_path=root / "ckpt" / "step=1.ckpt")
    out.update({f"resumed:{k}": v.detach().clone() for k, v in resumed.policy.state_dict().items()})
    seen = _rank_batches(data, range(2))[1:] + list(data.val_dataloader())
    out.update({f"resumed_cache:{k}": v for k, v in _cache_check(resumed, seen).items()})
    return out


def _one_process(root: Path, sft: str, tokenizer_path: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """1 process, each step on the union of the 2 ranks' batches of that step (rank 0's pairs first)."""
    data = _data(root, tokenizer_path)
    data.setup("fit")
    lengths = data.train_dataset.lengths
    ranks = [LengthBucketBatchSampler(lengths, B, seed=data.seed, num_replicas=2, rank=r) for r in range(2)]
    steps = [a + b for e in range(2) for a, b in zip(*(s.epoch_batches(e) for s in ranks))]
    # each epoch: one full global batch of 4 pairs and a short one of 1 pair, padded to one per rank
    assert len(steps) == STEPS and sorted({len(s) for s in steps}) == [2, 4]
    assert all(len(set(s)) == 1 for s in steps if len(s) == 2)
    train = DataLoader(data.train_dataset, batch_sampler=steps, collate_fn=data._collate())
    torch.manual_seed(0)
    module = _module(sft, tokenizer_path)
    _trainer(root / "single", devices=1).fit(module, train, data.val_dataloader())
    weights = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    return weights, _rows(root / "single")


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "version_0" / "metrics.csv").open()))


def _logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_dpo_on_two_ranks_trains_logs_caches_and_resumes_as_one_process_with_their_pairs(
    tmp_path,
    sft_checkpoint,  # noqa: F811
    tiny_tokenizer,
):
    tok = tiny_tokenizer.source
    _write_pairs(REPO / "data/hh_rlhf/preference_train.jsonl", tmp_path / "train.jsonl", tiny_tokenizer)
    _write_pairs(REPO / "data/hh_rlhf/preference_test.jsonl", tmp_path / "val.jsonl", tiny_tokenizer)
    ranks = run_on_two_ranks(
        partial(_on_rank, sft=sft_checkpoint, tokenizer_path=tok, folder=str(tmp_path)), tmp_path
    )
    weights, single = _one_process(tmp_path, sft_checkpoint, tok)
    ddp = _rows(tmp_path / "straight")  # what rank 0 logged

    # (c) the step is the mean over both ranks' pairs: the weights of one process stepping on their union
    for name, value in weights.items():
        for rank in ranks:
            torch.testing.assert_close(rank[f"straight:{name}"], value, atol=1e-5, rtol=1e-4, msg=name)
    # rank 0 logs each step's global means, as the one process does
    for key in STATS:
        assert _logged(ddp, f"train/{key}") == pytest.approx(
            _logged(single, f"train/{key}"), rel=1e-5, abs=1e-5
        ), key
    assert len(_logged(ddp, "train/loss")) == STEPS
    # (b) validation: the epoch means over every pair, whether each rank sees every pair or its own half (3 and 2)
    for rank in ranks:
        torch.testing.assert_close(rank["val:sharded"], rank["val:full"], atol=1e-6, rtol=1e-6)
    for key in STATS:  # rows: end of epoch 0, end of epoch 1 (the fit's last), then the two validate calls
        fit_end = _logged(ddp, f"val/{key}")[1]
        assert fit_end == pytest.approx(_logged(single, f"val/{key}")[-1], rel=1e-4, abs=1e-5), key
    own = [float(r["val:own_loss"]) for r in ranks]
    assert own[0] != pytest.approx(own[1], abs=1e-4)  # the halves differ: a rank-local value would not pass
    # (a) each rank caches the pairs it saw (its own shard, the val pairs) with their reference log-probs
    for rank in ranks:
        assert bool(rank["cache:keys_match"]) and float(rank["cache:max_error"]) < 1e-4
    assert not torch.equal(ranks[0]["cache:keys"], ranks[1]["cache:keys"])
    # (d) a resume from mid-epoch 0 ends with the straight run's weights, exactly; the cache refilled correctly
    for rank in ranks:
        for name in weights:
            assert torch.equal(rank[f"resumed:{name}"], rank[f"straight:{name}"]), name
        assert bool(rank["resumed_cache:keys_match"]) and float(rank["resumed_cache:max_error"]) < 1e-4
