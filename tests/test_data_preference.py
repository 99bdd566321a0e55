"""PreferenceDataModule: chosen/rejected stacking, margins, prompt-side truncation, test/predict loaders, errors."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf_lightning.data.collate import ScoringBatch
from rlhf_lightning.data.formats import DataFormatError, load_rows, parse_preference
from rlhf_lightning.data.preference import PreferenceDataModule, create_preference_dataloader
from rlhf_lightning.types import PreferenceBatch

TRAIN = "data/hh_rlhf/preference_train.jsonl"
TEST = "data/hh_rlhf/preference_test.jsonl"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture
def make_dm(repo_root, tiny_tokenizer):
    def make(**kwargs) -> PreferenceDataModule:
        kwargs.setdefault("train_path", str(repo_root / TRAIN))
        kwargs.setdefault("val_path", str(repo_root / TEST))
        kwargs.setdefault("tokenizer_path", tiny_tokenizer.source)
        return PreferenceDataModule(**kwargs)

    return make


def write_jsonl(path, rows):
    path.write_text(
        "\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n", encoding="utf-8"
    )
    return path


def test_chosen_rows_first_then_rejected_with_margins(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "It is five, of course.", "margin": 0.5},
        {
            "prompt": [msg("user", "Hi")],
            "chosen": [msg("assistant", "Hello!")],
            "rejected": "Go away",
            "margin": 2,
        },
        {
            "chosen": "\n\nHuman: Name a color\n\nAssistant: Blue",
            "rejected": "\n\nHuman: Name a color\n\nAssistant: No",
        },
    ]
    loader = create_preference_dataloader(write_jsonl(tmp_path / "p.jsonl", rows), tok, batch_size=3)
    (batch,) = list(loader)
    assert isinstance(batch, PreferenceBatch) and len(batch) == 3
    assert batch.input_ids.shape[0] == 6
    assert batch.margin.tolist() == [0.5, 2.0, 0.0]
    pairs = load_rows(tmp_path / "p.jsonl", parse_preference).rows
    for i, pair in enumerate(pairs):
        for row, reply in ((i, pair.chosen), (3 + i, pair.rejected)):
            n = int(batch.attention_mask[row].sum())
            assert batch.attention_mask[row, :n].all()  # right padding: the score is read at index n - 1
            assert batch.input_ids[row, :n].tolist() == tok.render(pair.prompt + reply)[0]
            assert batch.input_ids[row, n - 1].item() == tok.eos_id


def test_datamodule_batches_are_real_pairs(make_dm):
    dm = make_dm(max_length=4096, batch_size=8)
    dm.setup("fit")
    assert dm.stats["rows"] == 900 and dm.stats["truncated"] == dm.stats["dropped"] == 0
    known = {(tuple(c), tuple(r)) for c, r, _ in dm.train_dataset.items}
    seen = 0
    for batch in dm.train_dataloader():
        b = len(batch)
        lens = batch.attention_mask.sum(1).tolist()
        for i in range(b):
            chosen = tuple(batch.input_ids[i, : lens[i]].tolist())
            rejected = tuple(batch.input_ids[b + i, : lens[b + i]].tolist())
            assert (chosen, rejected) in known
        seen += b
    assert seen == 700
    val_lens = [
        max(x) for batch in dm.val_dataloader() for x in batch.attention_mask.sum(1).view(2, -1).T.tolist()
    ]
    assert val_lens == sorted(val_lens, reverse=True) and len(val_lens) == 200


def test_hh_transcripts_encode_like_the_derived_rows(make_dm, repo_root):
    raw = make_dm(
        train_path=str(repo_root / "data/hh_rlhf/raw_sample.jsonl"), val_path=None, val_fraction=0.0
    )
    derived = make_dm(val_path=None, val_fraction=0.0)
    raw.setup("fit")
    derived.setup("fit")
    assert raw.train_dataset.items == derived.train_dataset.items[:200]


def test_left_truncation_keeps_replies_whole(make_dm, repo_root, tiny_tokenizer, caplog):
    tok, max_length = tiny_tokenizer, 128
    pairs = load_rows(repo_root / TRAIN, parse_preference).rows
    # a reply = what it adds after the generation prompt (which ends in the assistant header): drop BOS + header
    replies = [(tok.render(p.chosen)[0][2:], tok.render(p.rejected)[0][2:]) for p in pairs]
    prompts = [tok.render_prompt(p.prompt) for p in pairs]
    too_long = [len(pr) + max(len(c), len(r)) > max_length for pr, (c, r) in zip(prompts, replies)]
    smallest_prompt = len(
        tok.render_prompt([{"role": "user", "content": "?"}])
    )  # header, one token, EOS, header
    no_room = [smallest_prompt + max(len(c), len(r)) > max_length for c, r in replies]
    dm = make_dm(max_length=max_length, val_path=None, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.preference"):
        dm.setup("fit")
    assert dm.stats["dropped"] == sum(no_room) > 0
    assert dm.stats["truncated"] == sum(t and not d for t, d in zip(too_long, no_room)) > 0
    assert f"{dm.stats['dropped']} dropped" in caplog.text
    kept = [i for i, d in enumerate(no_room) if not d]
    assert len(dm.train_dataset) == len(kept)
    for i, (chosen, rejected, _) in zip(kept, dm.train_dataset.items):
        c, r = replies[i]
        assert max(len(chosen), len(rejected)) <= max_length
        assert chosen[-len(c) :] == c and rejected[-len(r) :] == r  # replies whole, to their final <|eos|>
        prompt_c, prompt_r = chosen[: -len(c)], rejected[: -len(r)]
        assert prompt_c == prompt_r and prompt_c[0] == tok.bos_id  # one shared (cut) prompt
        assert prompt_c[1] in tok.role_ids.values()  # whole turns kept, the first one maybe shortened
        question = prompt_c[::-1].index(tok.role_ids["user"])  # tokens after the last user header
        assert prompt_c[-question:] == prompts[i][-question:]  # the end of the latest question is kept


@pytest.mark.parametrize("policy", ["right", "drop"])
def test_other_truncation_policies(make_dm, policy):
    dm = make_dm(max_length=128, truncation=policy, val_path=None, val_fraction=0.0)
    dm.setup("fit")
    full = make_dm(max_length=4096, val_path=None, val_fraction=0.0)
    full.setup("fit")
    too_long = sum(max(len(c), len(r)) > 128 for c, r, _ in full.train_dataset.items)
    assert max(dm.train_dataset.lengths) <= 128
    if policy == "drop":
        assert dm.stats["dropped"] == too_long and dm.stats["truncated"] == 0
    else:
        assert dm.stats["truncated"] + dm.stats["dropped"] == too_long and dm.stats["truncated"] > 0


def test_val_split_and_test_loader(make_dm, repo_root):
    a = make_dm(val_path=None, val_fraction=0.2, seed=3, max_length=4096)
    b = make_dm(val_path=None, val_fraction=0.2, seed=3, max_length=4096)
    a.setup("fit")
    b.setup("fit")
    assert a.val_dataset.items == b.val_dataset.items and len(a.val_dataset) == 140
    dm = make_dm(max_length=4096)
    dm.setup("test")
    assert sum(len(batch) for batch in dm.test_dataloader()) == 200  # falls back to the validation file
    dm = make_dm(max_length=4096, test_path=str(repo_root / "data/hh_rlhf/raw_sample.jsonl"))
    dm.setup("test")
    assert dm.stats["test_pairs"] == 200


def test_predict_scores_conversations_in_file_order(make_dm, repo_root, tiny_tokenizer):
    dm = make_dm(predict_path=str(repo_root / "data/gsm8k/sft_train.jsonl"), max_length=4096, batch_size=16)
    dm.setup("predict")
    index = []
    for batch in dm.predict_dataloader():
        assert isinstance(batch, ScoringBatch)
        last = batch.attention_mask.sum(1) - 1
        assert (batch.input_ids[range(len(batch)), last] == tiny_tokenizer.eos_id).all()
        assert batch.rows[0]["messages"][-1]["role"] == "assistant"
        index += batch.index.tolist()
    assert index == list(range(600))
    with pytest.raises(ValueError, match="predict_path"):
        make_dm().predict_dataloader()


def test_errors_name_file_line_field_and_skips_count(tmp_path, tiny_tokenizer, caplog):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(
        tmp_path / "bad.jsonl", [good, good, {"prompt": "q", "chosen": "same", "rejected": "same"}, good]
    )
    dm = PreferenceDataModule(str(path), val_path=None, tokenizer_path=str(tmp_path / "never.json"))
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3, field 'rejected'"):
        dm.validate_inputs()
    assert not (tmp_path / "never.json").exists()
    dm = PreferenceDataModule(str(path), val_path=None, tokenizer_path=tiny_tokenizer.source)
    with pytest.raises(DataFormatError, match="line 3"):
        dm.setup("fit")
    dm = PreferenceDataModule(
        str(path), val_path=None, val_fraction=0.0, tokenizer_path=tiny_tokenizer.source, skip_bad_rows=True
    )
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.sft"):
        dm.setup("fit")
    assert dm.stats["skipped"] == 1 and dm.stats["train_pairs"] == 3
    assert "skipped 1 bad row(s)" in caplog.text


class _ChatMLTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer with a ChatML template: no BOS, a default system
    prompt, and a header per turn (the kind of template the old reply-alone rendering got wrong)."""

    source = "chatml-stub"
    eos_id = 1

    def _ids(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def _block(self, m: dict) -> str:
        return f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"

    def render(self, messages):
        text = self._block({"role": "system", "content": "You are helpful."}) + "".join(
            map(self._block, messages)
        )
        return self._ids(text), [False] * len(text)

    def render_prompt(self, messages):
        return self.render(messages)[0] + self._ids("<|im_start|>assistant\n")


def test_encode_pair_is_exact_for_templates_without_bos():
    from rlhf_lightning.data.formats import PreferencePair
    from rlhf_lightning.data.preference import encode_pair

    tok = _ChatMLTokenizer()
    prompt = [{"role": "user", "content": "hi"}]
    pair = PreferencePair(
        prompt, [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]
    )
    chosen, rejected, status = encode_pair(tok, pair, max_length=1000)
    assert status == "ok"
    # each sequence is exactly the template's rendering of the whole conversation: no dropped or doubled tokens
    assert chosen == tok.render([*prompt, *pair.chosen])[0]
    assert rejected == tok.render([*prompt, *pair.rejected])[0]
