"""SFTDataModule on the shipped HH data: assistant-only loss masks, truncation, split, located errors, skips."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from rlhf_lightning.data.formats import DataFormatError, load_rows, parse_conversation
from rlhf_lightning.data.sft import SFTDataModule, left_truncate, split_rows
from rlhf_lightning.types import SFTBatch

SFT = "data/hh_rlhf/sft_train.jsonl"


@pytest.fixture
def make_dm(repo_root, tiny_tokenizer):
    def make(**kwargs) -> SFTDataModule:
        kwargs.setdefault("train_path", str(repo_root / SFT))
        kwargs.setdefault("tokenizer_path", tiny_tokenizer.source)
        return SFTDataModule(**kwargs)

    return make


def full_renders(repo_root, tok) -> list[list[int]]:
    rows = load_rows(repo_root / SFT, parse_conversation).rows
    return [tok.render(c.messages)[0] for c in rows]


def expected_assistant_mask(ids: list[int], tok) -> list[bool]:
    """Independent reference: a token counts iff the latest role token before it is <|assistant|>."""
    specials = {tok.bos_id, *tok.role_ids.values()}
    role, out = None, []
    for t in ids:
        if t in specials:
            role = t if t != tok.bos_id else None
            out.append(False)
        else:
            out.append(role == tok.role_ids["assistant"])
    return out


def test_loss_mask_only_on_assistant_tokens_of_multi_turn_rows(make_dm):
    dm = make_dm(max_length=4096, val_fraction=0.0, batch_size=16)
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.stats["truncated"] == 0 and dm.stats["train_examples"] == 300
    seen = multi_turn = 0
    for batch in dm.train_dataloader():
        assert isinstance(batch, SFTBatch)
        for ids, att, loss in zip(batch.input_ids, batch.attention_mask, batch.loss_mask):
            n = int(att.sum())
            assert att[:n].all() and not att[n:].any()  # right padding
            assert not loss[n:].any()  # nothing to learn on padding
            real = ids[:n].tolist()
            assert loss[:n].tolist() == expected_assistant_mask(real, tok)
            multi_turn += real.count(tok.role_ids["assistant"]) > 1
            # the assistant tokens decode to exactly the assistant turns, each closed by <|eos|>
            seen += 1
    assert seen == 300 and multi_turn > 100


def test_assistant_text_under_the_mask(make_dm):
    dm = make_dm(max_length=4096, val_fraction=0.0)
    dm.setup()
    tok = dm.tokenizer
    conv = load_rows(dm.train_path, parse_conversation).rows[0]
    ids, mask = dm.train_dataset[0]
    kept = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])
    assert kept == "".join(m["content"] for m in conv.messages if m["role"] == "assistant")
    assert sum(1 for t, m in zip(ids, mask) if m and t == tok.eos_id) == sum(
        m["role"] == "assistant" for m in conv.messages
    )


@pytest.mark.parametrize("policy", ["left", "right", "drop"])
def test_truncation_counts_and_policies(make_dm, repo_root, tiny_tokenizer, policy, caplog):
    max_length = 96
    renders = full_renders(repo_root, tiny_tokenizer)
    too_long = sum(len(r) > max_length for r in renders)
    assert 0 < too_long < 300
    dm = make_dm(max_length=max_length, truncation=policy, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.sft"):
        dm.setup()
    s = dm.stats
    assert s["rows"] == 300 and s["skipped"] == 0
    lengths = dm.train_dataset.lengths
    assert max(lengths) <= max_length
    if policy == "left":
        assert s["truncated"] == too_long and s["dropped"] == 0 and s["train_examples"] == 300
        tok = dm.tokenizer
        roles = set(tok.role_ids.values())
        for full, (ids, mask) in zip(renders, dm.train_dataset):
            assert ids[0] == tok.bos_id and ids[1] in roles  # kept turns start at a header, never mid-turn
            last = len(ids) - max(i for i, t in enumerate(ids) if t in roles)
            assert (
                ids[-last] == tok.role_ids["assistant"]
            )  # the final assistant turn survives (its end, when it
            assert ids[1 - last :] == full[1 - last :]  # alone is too long)
            assert mask[-1] and ids[-1] == tok.eos_id
    elif policy == "right":
        no_reply_left = sum(
            not any(tiny_tokenizer.render(c.messages)[1][:max_length])
            for c in load_rows(repo_root / SFT, parse_conversation).rows
        )
        assert s["truncated"] == too_long and s["dropped"] == no_reply_left
        assert s["train_examples"] == 300 - no_reply_left
        assert all(any(m) for _, m in dm.train_dataset)
    else:
        assert s["dropped"] == too_long and s["truncated"] == 0 and s["train_examples"] == 300 - too_long
    assert f"{s['truncated']} of 300" in caplog.text and f"{s['dropped']} dropped" in caplog.text


def test_right_truncation_drops_examples_without_assistant_tokens(tmp_path, tiny_tokenizer):
    path = tmp_path / "long_prompt.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    dm = SFTDataModule(str(path), tokenizer_path=tiny_tokenizer.source, max_length=32, truncation="right")
    dm.val_fraction = 0.0
    dm.setup()
    assert dm.stats["truncated"] == 1 and dm.stats["dropped"] == 1 and len(dm.train_dataset) == 1
    left = SFTDataModule(str(path), tokenizer_path=tiny_tokenizer.source, max_length=32, val_fraction=0.0)
    left.setup()
    assert left.stats["dropped"] == 0 and len(left.train_dataset) == 2
    ids, mask = left.train_dataset[0]
    # no user-turn restart fits: the tail of the user turn is kept as context before the reply
    assert len(ids) == 32 and ids[0] == tiny_tokenizer.bos_id
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "ok"
    assert tiny_tokenizer.decode(ids).endswith("word ok")


def test_left_truncate_drops_whole_turns_first(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [
        {"role": "user", "content": "first question " * 5},
        {"role": "assistant", "content": "first answer " * 5},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
    ]
    want, want_mask = tok.render(msgs[2:])
    kept, out, out_mask = left_truncate(tok, msgs, len(want) + 3)
    assert (
        kept == msgs[2:] and out == want and out_mask == want_mask
    )  # restarts at the user turn, not mid-turn


def test_val_split_is_deterministic_by_seed(make_dm):
    def val_ids(seed):
        dm = make_dm(seed=seed, max_length=4096)
        dm.setup()
        return dm, sorted(map(tuple, dm.val_dataset.ids))

    a, va = val_ids(0)
    _, vb = val_ids(0)
    _, vc = val_ids(1)
    assert va == vb and va != vc
    assert len(va) == 30 and len(a.train_dataset) == 270
    assert not set(va) & set(map(tuple, a.train_dataset.ids))
    rows = list(range(10))
    tr, va2 = split_rows(rows, 0.3, seed=5)
    assert sorted(tr + va2) == rows and len(va2) == 3 and tr == sorted(tr)


def test_val_dataloader_sorted_and_covers_val(make_dm):
    dm = make_dm(max_length=256, batch_size=4)
    dm.setup()
    lens = [int(n) for b in dm.val_dataloader() for n in b.attention_mask.sum(1)]
    assert lens == sorted(lens, reverse=True) and len(lens) == len(dm.val_dataset)
    train_rows = sum(len(b) for b in dm.train_dataloader())
    assert train_rows == len(dm.train_dataset)


def test_train_batches_have_less_padding_when_bucketed(make_dm):
    def pad_fraction(bucket):
        dm = make_dm(max_length=512, batch_size=8, bucket_by_length=bucket, val_fraction=0.0)
        dm.setup()
        batches = list(dm.train_dataloader())
        return 1 - sum(int(b.attention_mask.sum()) for b in batches) / sum(
            b.input_ids.numel() for b in batches
        )

    bucketed, random = pad_fraction(True), pad_fraction(False)
    assert bucketed < random / 4


def write_bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}),
        json.dumps(good),
        json.dumps({"text": "no messages"}),
        json.dumps(good),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_raise_in_setup_naming_file_line_field(tmp_path, tiny_tokenizer):
    path = write_bad_file(tmp_path)
    never_written = tmp_path / "tok.json"
    dm = SFTDataModule(str(path), tokenizer_path=str(never_written))
    with pytest.raises(DataFormatError) as err:
        dm.validate_inputs()
    assert err.value.line == 3 and err.value.field == "messages[1].role"
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    assert not never_written.exists()  # validation needs no tokenizer
    dm = SFTDataModule(str(path), tokenizer_path=tiny_tokenizer.source)
    with pytest.raises(DataFormatError, match=r"line 3, field 'messages\[1\]\.role'"):
        dm.setup("fit")


def test_skip_bad_rows_counts(tmp_path, tiny_tokenizer, caplog):
    path = write_bad_file(tmp_path)
    dm = SFTDataModule(str(path), tokenizer_path=tiny_tokenizer.source, skip_bad_rows=True, val_fraction=0.0)
    assert dm.validate_inputs() == {"train_rows": 4, "val_rows": 0, "skipped": 2}
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.sft"):
        dm.setup()
    assert dm.stats["skipped"] == 2 and dm.stats["rows"] == 4 and len(dm.train_dataset) == 4
    assert "skipped 2 bad row(s)" in caplog.text and "line 3" in caplog.text


def test_val_path_is_validated_too(tmp_path, repo_root, tiny_tokenizer):
    bad = write_bad_file(tmp_path)
    dm = SFTDataModule(str(repo_root / SFT), val_path=str(bad), tokenizer_path=tiny_tokenizer.source)
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3"):  # the val file, not the train file
        dm.setup()


def test_tokenizer_is_trained_on_first_use_and_reused(tmp_path, repo_root):
    path = tmp_path / "runs" / "tokenizer.json"
    dm = SFTDataModule(
        str(repo_root / "data/gsm8k/sft_train.jsonl"), tokenizer_path=str(path), tokenizer_vocab_size=300
    )
    assert not path.exists()  # construction is cheap
    dm.prepare_data()
    assert path.exists() and dm.tokenizer.vocab_size <= 300
    again = SFTDataModule(tokenizer_path=str(path))
    assert again.tokenizer.encode("hello world") == dm.tokenizer.encode("hello world")


def test_pad_to_multiple_of(make_dm):
    dm = make_dm(max_length=256, pad_to_multiple_of=16)
    dm.setup()
    for b in dm.train_dataloader():
        assert b.input_ids.shape[1] % 16 == 0
        assert torch.equal(b.attention_mask.sum(1) > 0, torch.ones(len(b), dtype=torch.bool))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="truncation"):
        SFTDataModule(truncation="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        SFTDataModule(val_fraction=1.0)


class RecordingModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: SFTBatch, batch_idx: int):
        self.seen.append((self.current_epoch, batch.attention_mask.sum(1).tolist()))
        return (self.w * batch.loss_mask.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_reshuffles_bucketed_batches_every_epoch(make_dm):
    dm = make_dm(max_length=128, batch_size=32, val_fraction=0.0)
    module = RecordingModule()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    epochs = [[lens for e, lens in module.seen if e == epoch] for epoch in (0, 1)]
    assert [sum(map(len, batches)) for batches in epochs] == [300, 300]
    assert epochs[0] != epochs[1]  # Lightning's set_epoch reaches the bucketing sampler
