"""PromptDataModule: left padding, rows with extra fields, truncation keeps the end, resumable stream."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from rlhf_lightning.data.formats import DataFormatError
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.types import PromptBatch

GSM = "data/gsm8k/prompts_train.jsonl"
HH = "data/hh_rlhf/prompts_train.jsonl"


@pytest.fixture
def make_dm(repo_root, tiny_tokenizer):
    def make(**kwargs) -> PromptDataModule:
        kwargs.setdefault("train_path", str(repo_root / GSM))
        kwargs.setdefault("tokenizer_path", tiny_tokenizer.source)
        return PromptDataModule(**kwargs)

    return make


def file_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_left_padded_prompts_end_in_assistant_header_and_keep_rows(make_dm, repo_root, tiny_tokenizer):
    tok = tiny_tokenizer
    dm = make_dm(batch_size=8, val_fraction=0.0, max_prompt_length=512)
    dm.setup("fit")
    assert dm.stats["truncated"] == 0 and dm.stats["train_prompts"] == 200
    source = file_rows(repo_root / GSM)
    stream = iter(dm.train_dataloader())
    for _ in range(3):
        batch = next(stream)
        assert isinstance(batch, PromptBatch) and batch.input_ids.shape[0] == 8
        assert batch.attention_mask[:, -1].all()  # left padding: every prompt ends in the last column
        assert (batch.input_ids[:, -1] == tok.role_ids["assistant"]).all()
        for ids, mask, i, row in zip(batch.input_ids, batch.attention_mask, batch.index.tolist(), batch.rows):
            n = int(mask.sum())
            assert not mask[: len(mask) - n].any() and mask[len(mask) - n :].all()
            assert (ids[: len(mask) - n] == tok.pad_id).all()
            assert row["answer"] == source[i]["answer"]  # extra fields travel with the prompt
            assert row["prompt"] == source[i]["prompt"]
            assert ids[len(mask) - n :].tolist() == tok.render_prompt(source[i]["prompt"])


def test_truncation_keeps_the_end_of_long_prompts(make_dm, repo_root, tiny_tokenizer, caplog):
    tok = tiny_tokenizer
    full = [tok.render_prompt(r["prompt"]) for r in file_rows(repo_root / HH)]
    limit = 64
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.prompts"):
        dm = make_dm(train_path=str(repo_root / HH), max_prompt_length=limit, val_fraction=0.0)
        dm.setup()
    assert dm.stats["truncated"] == sum(len(f) > limit for f in full) > 0
    assert f"{dm.stats['truncated']} of 262" in caplog.text
    for ids, f in zip(dm.train_dataset.ids, full):
        assert len(ids) <= limit and ids[0] == tok.bos_id and ids[-1] == tok.role_ids["assistant"]
        assert (
            ids[1] in tok.role_ids.values()
        )  # whole turns kept (the first one maybe shortened), never a bare tail
        question = ids[::-1].index(tok.role_ids["user"])  # tokens after the last user header
        assert ids[-question:] == f[-question:]  # the end of the latest question survives


def test_every_prompt_once_per_epoch_then_next_permutation(make_dm):
    dm = make_dm(batch_size=16, val_fraction=0.0)
    dm.setup()
    per_epoch = dm.batches_per_epoch
    assert per_epoch == 200 // 16
    stream = iter(dm.train_dataloader())
    epoch0 = [next(stream).index.tolist() for _ in range(per_epoch)]
    epoch1 = [next(stream).index.tolist() for _ in range(per_epoch)]
    flat0 = [i for b in epoch0 for i in b]
    assert len(set(flat0)) == len(flat0) == per_epoch * 16
    assert epoch0 != epoch1
    unshuffled = make_dm(batch_size=16, val_fraction=0.0, shuffle=False)
    unshuffled.setup()
    first = next(iter(unshuffled.train_dataloader()))
    assert sorted(first.index.tolist()) == list(range(16))


def test_state_dict_round_trip_resumes_at_next_batch(make_dm):
    dm = make_dm(batch_size=32, val_fraction=0.0)
    dm.setup()
    stream = iter(dm.train_dataloader())
    seen = [next(stream).index.tolist() for _ in range(10)]  # 6 batches per epoch: crosses an epoch boundary
    dm.mark_consumed(7)
    state = dm.state_dict()
    assert state["batches_consumed"] == 7 and state["epoch"] == 1 and state["batch_in_epoch"] == 1
    fresh = make_dm(batch_size=32, val_fraction=0.0)
    fresh.setup()
    fresh.load_state_dict(state)
    resumed = iter(fresh.train_dataloader())
    assert [next(resumed).index.tolist() for _ in range(3)] == seen[7:10]


class RecordingModule(LightningModule):
    """Records the prompt indices of every training batch; one tiny parameter so there is something to train."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: PromptBatch, batch_idx: int):
        self.seen.append(batch.index.tolist())
        return (self.w * batch.attention_mask.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, steps, ckpt_path=None):
    module = RecordingModule()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, module.seen


def test_trainer_checkpoint_resume_continues_the_stream(make_dm, tmp_path):
    kwargs = {"batch_size": 64, "val_fraction": 0.1}  # 180 train prompts: 2 batches per epoch
    _, straight = fit(make_dm(**kwargs), 7)
    trainer, first = fit(make_dm(**kwargs), 3)
    assert first == straight[:3]
    ckpt = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=False)["PromptDataModule"]
    assert stored["batches_consumed"] == 3 and stored["epoch"] == 1 and stored["batch_in_epoch"] == 1
    _, rest = fit(make_dm(**kwargs), 7, ckpt_path=str(ckpt))
    assert rest == straight[3:7]


def test_val_prompts_are_finite_in_file_order(make_dm, repo_root):
    dm = make_dm(batch_size=8, val_path=str(repo_root / HH))
    dm.setup()
    index = [i for b in dm.val_dataloader() for i in b.index.tolist()]
    assert index == list(range(262)) and dm.stats["train_prompts"] == 200
    split = make_dm(val_fraction=0.25, seed=1)
    split.setup()
    again = make_dm(val_fraction=0.25, seed=1)
    again.setup()
    assert len(split.val_dataset) == 50 and split.val_dataset.rows == again.val_dataset.rows


def test_errors_and_skips(tmp_path, tiny_tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "q1"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n", encoding="utf-8")
    dm = PromptDataModule(str(path), tokenizer_path=tiny_tokenizer.source, batch_size=2)
    with pytest.raises(DataFormatError, match=r"prompts\.jsonl, line 2, field 'prompt'"):
        dm.setup()
    dm = PromptDataModule(str(path), tokenizer_path=tiny_tokenizer.source, batch_size=3, skip_bad_rows=True)
    assert dm.validate_inputs()["skipped"] == 3
    dm.setup()
    assert dm.stats["skipped"] == 3 and dm.stats["rows"] == 3
    with pytest.raises(ValueError, match="cannot fill one batch"):
        dm.train_dataloader()  # 2 train prompts after the split (1 held out): fewer than batch_size
