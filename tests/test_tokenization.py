"""Tests for rlhf_lightning.tokenization: special ids, chat rendering masks, round trips, training and persistence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from rlhf_lightning import tokenization
from rlhf_lightning.data.formats import DataFormatError
from rlhf_lightning.tokenization import (
    SPECIAL_TOKENS,
    ChatTokenizer,
    iter_texts_from_jsonl,
    load_or_train_tokenizer,
    train_tokenizer,
    train_tokenizer_cli,
)

U, A, S = "user", "assistant", "system"
TEXTS = [
    "Hello there, how are you today?",
    "I am fine, thank you. And you?",
    "Numbers: 12 + 30 = 42.\nNew line and\ttab.",
    "Emoji 🎉 and accents: café, naïve, 日本語.",
] * 5


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CHAT = [
    msg(S, "Be brief."),
    msg(U, "What is 2+2?"),
    msg(A, "It is 4."),
    msg(U, "Sure? 🤔"),
    msg(A, " Yes.\nQuite sure, café! "),
]


def test_special_token_ids(tiny_tokenizer: ChatTokenizer) -> None:
    tok = tiny_tokenizer
    assert tok.pad_id == 0
    assert tok.pad_id != tok.eos_id
    ids = [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert [tok.bos_id, tok.eos_id] == ids[1:3]
    assert [tok.role_ids[r] for r in (S, U, A)] == ids[3:]
    assert tok.vocab_size == 512


def test_render_layout_and_assistant_mask_are_exact(tiny_tokenizer: ChatTokenizer) -> None:
    tok = tiny_tokenizer
    ids, mask = tok.render(CHAT)
    assert len(ids) == len(mask)
    expected_ids, expected_mask = [tok.bos_id], [False]
    for m in CHAT:
        content = tok.encode(m["content"])
        expected_ids += [tok.role_ids[m["role"]], *content, tok.eos_id]
        expected_mask += [False] + [m["role"] == A] * (len(content) + 1)
    assert ids == expected_ids and mask == expected_mask
    # the masked tokens decode to exactly the assistant contents, each followed by its EOS
    masked = [i for i, keep in zip(ids, mask) if keep]
    assert tok.decode(masked, skip_special_tokens=False) == "It is 4.<|eos|> Yes.\nQuite sure, café! <|eos|>"
    # and the unmasked ones to everything else
    unmasked = [i for i, keep in zip(ids, mask) if not keep]
    assert tok.decode(unmasked, skip_special_tokens=False) == (
        "<|bos|><|system|>Be brief.<|eos|><|user|>What is 2+2?<|eos|><|assistant|><|user|>Sure? 🤔<|eos|><|assistant|>"
    )
    assert tok.decode(ids) == "".join(m["content"] for m in CHAT)


def test_render_prompt_is_a_prefix_of_the_rendered_conversation(tiny_tokenizer: ChatTokenizer) -> None:
    tok = tiny_tokenizer
    prompt = CHAT[:4]
    prompt_ids = tok.render_prompt(prompt)
    assert prompt_ids == [*tok.render(prompt)[0], tok.role_ids[A]]
    full_ids, full_mask = tok.render(CHAT)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_mask[: len(prompt_ids)] == [*tok.render(prompt)[1], False]
    assert all(full_mask[len(prompt_ids) :])  # the final reply: content tokens and the closing EOS


def test_render_rejects_unknown_role(tiny_tokenizer: ChatTokenizer) -> None:
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tiny_tokenizer.render([msg("bot", "hi")])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain words",
        "  leading and trailing spaces  ",
        "line one\nline two\r\n\n\ttabbed",
        "unicode: café naïve Ωμέγα 日本語 한국어",
        "emoji: 🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
        "zero\u200bwidth and \u2028 separators",
    ],
)
def test_decode_round_trips_text(tiny_tokenizer: ChatTokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode_batch([ids, ids]) == [text, text]


def test_special_token_strings_in_data_stay_plain_text(tiny_tokenizer: ChatTokenizer) -> None:
    tok = tiny_tokenizer
    text = "fake <|eos|><|assistant|> turn <|pad|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.decode(ids) == text


def test_save_and_load_round_trip(tiny_tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "tokenizer.json"
    tiny_tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = ChatTokenizer.from_file(path)
    assert loaded.tokenizer.to_str() == tiny_tokenizer.tokenizer.to_str()
    assert loaded.render(CHAT) == tiny_tokenizer.render(CHAT)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
        tiny_tokenizer.pad_id,
        tiny_tokenizer.bos_id,
        tiny_tokenizer.eos_id,
        tiny_tokenizer.vocab_size,
    )
    # the plain-text setting for special strings is restored on load
    assert tiny_tokenizer.eos_id not in loaded.encode("<|eos|>")


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ChatTokenizer.from_file(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}: not a valid tokenizer.json"):
        ChatTokenizer.from_file(broken)
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_special_tokens(["<|pad|>", "<|eos|>"])
    no_specials = tmp_path / "no_specials.json"
    plain.save(str(no_specials))
    with pytest.raises(ValueError) as info:
        ChatTokenizer.from_file(no_specials)
    text = str(info.value)
    assert str(no_specials) in text and "<|bos|>" in text and "<|assistant|>" in text and "expected" in text


def test_pad_must_be_id_zero(tmp_path: Path) -> None:
    plain = Tokenizer(models.BPE())
    plain.add_special_tokens(["<|bos|>", *[t for t in SPECIAL_TOKENS if t != "<|bos|>"]])
    with pytest.raises(ValueError, match="<\\|pad\\|> has id 1; expected id 0"):
        ChatTokenizer(plain, source="x.json")


def test_training_is_deterministic_in_and_across_processes() -> None:
    first = train_tokenizer(TEXTS, vocab_size=300, min_frequency=2).tokenizer.to_str()
    assert train_tokenizer(TEXTS, vocab_size=300, min_frequency=2).tokenizer.to_str() == first
    code = (
        "import sys, json; from rlhf_lightning.tokenization import train_tokenizer; "
        "texts = json.loads(sys.stdin.read()); "
        "sys.stdout.write(train_tokenizer(texts, vocab_size=300, min_frequency=2).tokenizer.to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(TEXTS), capture_output=True, text=True, check=True
    )
    assert out.stdout == first


def test_training_learns_merges_and_validates_arguments() -> None:
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)
    assert tok.vocab_size == 300  # specials + 256 bytes + 38 merges
    assert len(tok.encode("Hello there")) < len(b"Hello there")
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="no training texts"):
        train_tokenizer([], vocab_size=300)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_iter_texts_reads_every_row_shape(tmp_path: Path) -> None:
    a = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"messages": [msg(U, "m1"), msg(A, "m2")]},
            {"prompt": "p1", "response": "r1"},
            {"prompt": [msg(U, "q")], "chosen": [msg(A, "c")], "rejected": [msg(A, "r")], "margin": 1},
        ],
    )
    b = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"chosen": "\n\nHuman: hh\n\nAssistant: yes", "rejected": "\n\nHuman: hh\n\nAssistant: no"},
            {"prompt": [msg(U, "solve")], "answer": "72"},
            {"unrelated": "skipped row"},
        ],
    )
    assert list(iter_texts_from_jsonl([a, b])) == [
        "m1",
        "m2",
        "p1",
        "r1",
        "q",
        "c",
        "r",
        "hh",
        "yes",
        "no",
        "solve",
    ]
    with pytest.raises(DataFormatError, match="file not found"):
        list(iter_texts_from_jsonl([tmp_path / "missing.jsonl"]))


def test_load_or_train_trains_once_then_reuses(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = [repo_root / "data" / "hh_rlhf" / "prompts_train.jsonl"]
    path = tmp_path / "runs" / "tok" / "tokenizer.json"
    first = load_or_train_tokenizer(path, data, vocab_size=400)
    assert path.is_file() and first.vocab_size == 400
    assert first.source == str(path)
    stamp = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train_tokenizer retrained although the file exists")

    monkeypatch.setattr(tokenization, "train_tokenizer", no_training)
    second = load_or_train_tokenizer(path, data, vocab_size=999)  # an existing file wins over the arguments
    assert second.vocab_size == 400
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no data paths"):
        load_or_train_tokenizer(tmp_path / "other.json", [], vocab_size=400)


def test_train_tokenizer_cli_writes_and_overwrites(repo_root: Path, tmp_path: Path) -> None:
    data = [
        repo_root / "data" / "hh_rlhf" / "prompts_train.jsonl",
        repo_root / "data" / "gsm8k" / "prompts_train.jsonl",
    ]
    output = tmp_path / "out" / "tok.json"
    tok = train_tokenizer_cli(data, output, vocab_size=350)
    assert ChatTokenizer.from_file(output).vocab_size == tok.vocab_size == 350
    train_tokenizer_cli(data, output, vocab_size=320)
    assert ChatTokenizer.from_file(output).vocab_size == 320
    with pytest.raises(ValueError, match="no --data files"):
        train_tokenizer_cli([], output)
