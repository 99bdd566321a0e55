"""Tests for rlhf_lightning.data.formats: JSONL reading, row parsers, HH transcripts, skip-bad loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from rlhf_lightning.data.formats import (
    MAX_KEPT_ERRORS,
    Conversation,
    DataFormatError,
    PreferencePair,
    PromptRow,
    load_rows,
    parse_conversation,
    parse_hh_transcript,
    parse_preference,
    parse_prompt,
    read_jsonl,
)

U = "user"
A = "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_rows(tmp_path: Path, *rows: Any, name: str = "data.jsonl") -> Path:
    """Write rows (dicts/lists are JSON-encoded, strings written verbatim) one per line."""
    path = tmp_path / name
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


GOOD_CONV = {"messages": [msg(U, "hi"), msg(A, "hello")]}


def assert_located(
    err: DataFormatError, path: Path, line: int | None, field: str | None, *fragments: str
) -> None:
    """The message names the file, the line, the field, the expectation and the given fragments."""
    text = str(err)
    assert text.startswith(str(path)), text
    assert err.path == str(path)
    assert err.line == line and err.field == field, (err.line, err.field, text)
    if line is not None:
        assert f", line {line}" in text
    if field is not None:
        assert f"field '{field}'" in text
    assert "; expected " in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def load_error(path: Path, parser) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        load_rows(path, parser)
    return info.value


# ------------------------------------------------------------------------------------------------ read_jsonl


def test_error_message_format_matches_contract() -> None:
    err = DataFormatError(
        "data/x.jsonl", 7, "messages[2].role", "got 'bot'", "one of 'system', 'user', 'assistant'"
    )
    assert str(err) == (
        "data/x.jsonl, line 7, field 'messages[2].role': got 'bot'; expected one of 'system', 'user', 'assistant'"
    )
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.line == 7 and copy.field == "messages[2].role"


def test_read_jsonl_keeps_file_line_numbers_across_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}\n\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2})]


def test_read_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert_located(info.value, path, None, None, "file not found", "JSON Lines")


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_read_jsonl_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert_located(info.value, path, None, None, "empty")


def test_read_jsonl_names_line_of_first_non_utf8_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "ok"}\n\n{"a": "caf\xe9"}\n{"a": "\xff"}\n')
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert_located(info.value, path, 3, None, "not valid UTF-8", "0xe9", "UTF-8 text")


def test_read_jsonl_bad_json_names_line_and_json_reason(tmp_path: Path) -> None:
    path = write_rows(tmp_path, GOOD_CONV, '{"messages": [', GOOD_CONV)
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert_located(info.value, path, 2, None, "not valid JSON", "Expecting value", "one JSON object per line")


@pytest.mark.parametrize(
    ("line", "described"), [("[1, 2]", "an array"), ('"text"', "'text'"), ("3", "a number")]
)
def test_read_jsonl_rejects_non_object_rows(tmp_path: Path, line: str, described: str) -> None:
    path = write_rows(tmp_path, GOOD_CONV, line)
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert_located(info.value, path, 2, None, f"got {described}", "a JSON object")


# ------------------------------------------------------------------------------------------- conversations


def test_unknown_role_error_reads_exactly_as_documented(tmp_path: Path) -> None:
    path = write_rows(tmp_path, GOOD_CONV, {"messages": [msg(U, "a"), msg(A, "b"), msg("bot", "c")]})
    err = load_error(path, parse_conversation)
    assert str(err) == (
        f"{path}, line 2, field 'messages[2].role': got 'bot'; expected one of 'system', 'user', 'assistant'"
    )


@pytest.mark.parametrize(
    ("row", "field", "fragments"),
    [
        ({"messages": [msg(U, "hi"), msg(A, "")]}, "messages[1].content", ["empty string", "non-empty text"]),
        (
            {"messages": [msg(U, "  \n"), msg(A, "x")]},
            "messages[0].content",
            ["whitespace-only", "non-empty"],
        ),
        (
            {"messages": [msg(U, "hi"), {"role": A, "content": 42}]},
            "messages[1].content",
            ["a number (42)", "a string"],
        ),
        ({"messages": [msg(U, "hi"), {"role": A}]}, "messages[1].content", ["missing", "'content' key"]),
        ({"messages": [msg(U, "hi"), "hello"]}, "messages[1]", ["got 'hello'", "an object"]),
        ({"messages": "hi"}, "messages", ["got 'hi'", "a list of"]),
        ({"messages": []}, "messages", ["empty list", "at least one message"]),
        (
            {"messages": [msg(U, "hi"), msg(U, "anyone?")]},
            "messages",
            ["no assistant turn", "assistant turn"],
        ),
        ({"text": "hi"}, "messages", ["missing", '{"prompt"']),
        ({"prompt": "hi"}, "response", ["missing", "'completion'"]),
        ({"prompt": "hi", "response": "a", "completion": "b"}, "completion", ["both", "only one"]),
        (
            {"prompt": "hi", "response": [msg(U, "x"), msg(A, "y")]},
            "response",
            ["starts with a 'user'", "assistant"],
        ),
        (
            {"prompt": [msg(U, "q"), msg(A, "a")], "response": "b"},
            "prompt",
            ["ends with an 'assistant'", "user turn"],
        ),
        ({"prompt": 5, "response": "b"}, "prompt", ["a number (5)", "a string or a list"]),
        ({"prompt": "hi", "response": "   "}, "response", ["empty string", "non-empty"]),
    ],
)
def test_bad_conversation_rows_are_located(
    tmp_path: Path, row: dict, field: str, fragments: list[str]
) -> None:
    path = write_rows(tmp_path, GOOD_CONV, "", row)  # the bad row is on line 3 (line 2 is blank)
    assert_located(load_error(path, parse_conversation), path, 3, field, *fragments)


def test_conversation_shapes() -> None:
    messages = [msg("system", "be nice"), msg(U, "hi"), msg(A, "hello"), msg(U, "bye"), msg(A, "ciao")]
    assert parse_conversation({"messages": messages, "id": 3}) == Conversation(messages)
    assert parse_conversation({"prompt": "hi", "response": "hello"}) == Conversation(
        [msg(U, "hi"), msg(A, "hello")]
    )
    assert parse_conversation({"prompt": messages[:2], "completion": [msg(A, "yo")]}) == Conversation(
        [*messages[:2], msg(A, "yo")]
    )
    # content is kept as written; extra message keys are dropped
    row = {"messages": [{"role": U, "content": " hi\n", "name": "x"}, msg(A, "ok ")]}
    assert parse_conversation(row).messages == [msg(U, " hi\n"), msg(A, "ok ")]


# ------------------------------------------------------------------------------------------------ preference


def test_explicit_preference_with_messages_and_strings() -> None:
    prompt = [msg(U, "q1"), msg(A, "a1"), msg(U, "q2")]
    row = {"prompt": prompt, "chosen": [msg(A, "good")], "rejected": [msg(A, "bad")]}
    assert parse_preference(row) == PreferencePair(prompt, [msg(A, "good")], [msg(A, "bad")], 0.0)
    row = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}
    pair = parse_preference(row)
    assert pair == PreferencePair([msg(U, "q")], [msg(A, "good")], [msg(A, "bad")], 2.0)
    assert isinstance(pair.margin, float)
    assert parse_preference({**row, "margin": None}).margin == 0.0
    # a reply that repeats the prompt turns in front (full conversation next to a prompt key)
    row = {"prompt": prompt, "chosen": [*prompt, msg(A, "good")], "rejected": [msg(A, "bad")]}
    assert parse_preference(row).chosen == [msg(A, "good")]


def test_implicit_prompt_is_the_shared_prefix_of_whole_messages() -> None:
    shared = [msg("system", "s"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2")]
    row = {
        "chosen": [*shared, msg(A, "good"), msg(U, "thanks"), msg(A, "welcome")],
        "rejected": [*shared, msg(A, "bad")],
        "margin": 0.5,
    }
    pair = parse_preference(row)
    assert pair.prompt == shared
    assert pair.chosen == [msg(A, "good"), msg(U, "thanks"), msg(A, "welcome")]
    assert pair.rejected == [msg(A, "bad")]
    assert pair.margin == 0.5


def test_hh_transcripts_with_and_without_prompt_key() -> None:
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: 4, I think.\n\nHuman: Sure?\n\nAssistant: Yes, 4."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: 4, I think.\n\nHuman: Sure?\n\nAssistant: No, 5."
    prompt = [msg(U, "What is 2+2?"), msg(A, "4, I think."), msg(U, "Sure?")]
    expected = PreferencePair(prompt, [msg(A, "Yes, 4.")], [msg(A, "No, 5.")])
    assert parse_preference({"chosen": chosen, "rejected": rejected}) == expected
    assert parse_preference({"prompt": prompt, "chosen": chosen, "rejected": rejected}) == expected
    # TRL-style: HH prompt string ending in an open "Assistant:" header, plain-text continuations
    hh_prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4, I think.\n\nHuman: Sure?\n\nAssistant:"
    assert parse_preference(
        {"prompt": hh_prompt, "chosen": " Yes, 4.", "rejected": " No, 5."}
    ) == PreferencePair(prompt, [msg(A, " Yes, 4.")], [msg(A, " No, 5.")])


@pytest.mark.parametrize(
    ("row", "field", "fragments"),
    [
        ({"prompt": "q", "rejected": "b"}, "chosen", ["missing", "'chosen' and 'rejected'"]),
        ({"prompt": "q", "chosen": "a"}, "rejected", ["missing"]),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "rejected",
            ["identical to 'chosen'", "different"],
        ),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", ["empty string", "non-empty"]),
        (
            {"prompt": "q", "chosen": [msg(A, "a")], "rejected": [msg(U, "b")]},
            "rejected",
            ["starts with a 'user'"],
        ),
        (
            {"prompt": "q", "chosen": [msg(A, "a"), msg(U, "b")], "rejected": "c"},
            "chosen",
            ["ends with a 'user'"],
        ),
        (
            {"prompt": [msg(U, "q"), msg(A, "a")], "chosen": "x", "rejected": "y"},
            "prompt",
            ["ends with an 'assistant'"],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"},
            "margin",
            ["got '1'", "a finite number"],
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "margin": True},
            "margin",
            ["a boolean", "finite number"],
        ),
        ({"chosen": "a", "rejected": "b"}, "prompt", ["missing", "plain text"]),
        (
            {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "other"), msg(A, "b")]},
            "prompt",
            ["share no opening turns"],
        ),
        (
            {
                "chosen": [msg(U, "q"), msg(A, "a"), msg(U, "x"), msg(A, "y")],
                "rejected": [msg(U, "q"), msg(A, "a")],
            },
            "prompt",
            ["end with an 'assistant' turn", "ends with a user turn"],
        ),
        (
            {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg(A, "a"), msg(A, "more")]},
            "prompt",
            ["end with an 'assistant' turn"],
        ),
        (
            {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "chosen",
            ["no reply after the prompt turns", "at least one assistant turn"],
        ),
        (
            {
                "chosen": "\n\nHuman: q\n\nHuman: again\n\nAssistant: a",
                "rejected": "\n\nHuman: q\n\nAssistant: b",
            },
            "chosen",
            ["turns do not alternate", "alternating, non-empty Human/Assistant"],
        ),
    ],
)
def test_bad_preference_rows_are_located(tmp_path: Path, row: dict, field: str, fragments: list[str]) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_rows(tmp_path, good, good, row)
    assert_located(load_error(path, parse_preference), path, 3, field, *fragments)


def test_hh_raw_sample_parses_to_preference_train_row_by_row(repo_root: Path) -> None:
    folder = repo_root / "data" / "hh_rlhf"
    raw = read_jsonl(folder / "raw_sample.jsonl")
    expected = read_jsonl(folder / "preference_train.jsonl")
    assert len(raw) == 200
    for (line, row), (_, want) in zip(raw, expected):
        pair = parse_preference(row, path="raw_sample.jsonl", line=line)
        assert (pair.prompt, pair.chosen, pair.rejected) == (
            want["prompt"],
            want["chosen"],
            want["rejected"],
        ), line
        assert pair.margin == 0.0


def test_hh_raw_sample_matches_shared_copy(shared_data_dir: Path) -> None:
    raw = load_rows(shared_data_dir / "hh_rlhf" / "raw_sample.jsonl", parse_preference).rows
    want = load_rows(shared_data_dir / "hh_rlhf" / "preference_train.jsonl", parse_preference).rows[:200]
    assert raw == want


def test_hh_edge_cases_are_rejected_for_their_documented_reason(repo_root: Path) -> None:
    path = repo_root / "data" / "hh_rlhf" / "raw_edge_cases.jsonl"
    rows = read_jsonl(path)
    assert len(rows) == 12
    categories = set()
    for line, row in rows:
        why = row["why_rejected"]
        categories.add(why)
        with pytest.raises(DataFormatError) as info:
            parse_preference(row, path=path, line=line)
        err = info.value
        assert err.line == line and str(path) in str(err)
        if why == "empty final assistant turn":
            assert err.field == "chosen" and "empty final assistant turn" in err.message, str(err)
        else:
            side, reason = why.split(": ", 1)
            assert reason == "turns do not alternate user/assistant"
            assert err.field == side and err.message.startswith(reason), str(err)
    assert len(categories) == 3
    with pytest.raises(DataFormatError, match="all 12 rows are bad"):
        load_rows(path, parse_preference, skip_bad=True)


def test_parse_hh_transcript() -> None:
    assert parse_hh_transcript("\n\nHuman:  hi \n\nAssistant: hello\n\n  there ") == [
        msg(U, "hi"),
        msg(A, "hello\n\n  there"),
    ]
    assert parse_hh_transcript("Human: hi\n\nAssistant: yo") == [msg(U, "hi"), msg(A, "yo")]
    # an inline "Human:" without the blank line before it is text, not a turn
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b  Human: c") == [
        msg(U, "a"),
        msg(A, "b  Human: c"),
    ]
    with pytest.raises(ValueError, match="empty final assistant turn"):
        parse_hh_transcript("\n\nHuman: hi\n\nAssistant: ")
    with pytest.raises(ValueError, match="turns 2 and 3 are both 'assistant'"):
        parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c")
    with pytest.raises(ValueError, match="empty user turn 1"):
        parse_hh_transcript("\n\nHuman:\n\nAssistant: b")
    with pytest.raises(ValueError, match="text before the first"):
        parse_hh_transcript("preamble\n\nHuman: a\n\nAssistant: b")
    with pytest.raises(ValueError, match=r"no .* turn markers"):
        parse_hh_transcript("just text")


# --------------------------------------------------------------------------------------------------- prompts


def test_prompt_rows_keep_extra_fields() -> None:
    row = {"prompt": [msg(U, "What is 6*7?")], "answer": "42", "id": 9}
    assert parse_prompt(row) == PromptRow([msg(U, "What is 6*7?")], {"answer": "42", "id": 9})
    assert parse_prompt({"prompt": "hi"}) == PromptRow([msg(U, "hi")], {})
    assert parse_prompt({"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"}).messages == [
        msg(U, "a"),
        msg(A, "b"),
        msg(U, "c"),
    ]


@pytest.mark.parametrize(
    ("row", "field", "fragments"),
    [
        ({"question": "hi"}, "prompt", ["missing"]),
        (
            {"prompt": [msg(U, "q"), msg(A, "a")]},
            "prompt",
            ["ends with an 'assistant' turn", "ends with a user turn"],
        ),
        ({"prompt": [msg("robot", "q")]}, "prompt[0].role", ["got 'robot'", "one of 'system'"]),
        ({"prompt": None}, "prompt", ["got null", "a string or a list"]),
    ],
)
def test_bad_prompt_rows_are_located(tmp_path: Path, row: dict, field: str, fragments: list[str]) -> None:
    path = write_rows(tmp_path, {"prompt": "ok"}, row)
    assert_located(load_error(path, parse_prompt), path, 2, field, *fragments)


# ------------------------------------------------------------------------------------------------- load_rows


def test_load_rows_skip_bad_counts_and_keeps_first_errors(tmp_path: Path) -> None:
    bad = {"messages": [msg(U, "no reply")]}
    path = write_rows(tmp_path, GOOD_CONV, bad, GOOD_CONV, bad, "", GOOD_CONV, {"messages": 1})
    with pytest.raises(DataFormatError) as info:
        load_rows(path, parse_conversation)
    assert info.value.line == 2
    loaded = load_rows(path, parse_conversation, skip_bad=True)
    assert len(loaded.rows) == 3 and loaded.skipped == 3
    assert [e.line for e in loaded.first_errors] == [2, 4, 7]
    assert all(isinstance(r, Conversation) for r in loaded.rows)


def test_load_rows_keeps_only_the_first_few_errors(tmp_path: Path) -> None:
    path = write_rows(tmp_path, GOOD_CONV, *[{"messages": []}] * (MAX_KEPT_ERRORS + 3))
    loaded = load_rows(path, parse_conversation, skip_bad=True)
    assert loaded.skipped == MAX_KEPT_ERRORS + 3
    assert [e.line for e in loaded.first_errors] == list(range(2, MAX_KEPT_ERRORS + 2))


def test_load_rows_skip_bad_still_raises_on_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="file not found"):
        load_rows(tmp_path / "missing.jsonl", parse_conversation, skip_bad=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="empty"):
        load_rows(tmp_path / "empty.jsonl", parse_conversation, skip_bad=True)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"messages": "\xc3("}\n')
    with pytest.raises(DataFormatError, match="UTF-8"):
        load_rows(tmp_path / "bytes.jsonl", parse_conversation, skip_bad=True)
    path = write_rows(tmp_path, {"messages": []}, {"messages": [msg(U, "x")]}, name="allbad.jsonl")
    with pytest.raises(DataFormatError) as info:
        load_rows(path, parse_conversation, skip_bad=True)
    assert_located(info.value, path, 1, "messages", "all 2 rows are bad", "empty list")


@pytest.mark.parametrize(
    ("relative", "parser", "count"),
    [
        ("hh_rlhf/sft_train.jsonl", parse_conversation, 300),
        ("hh_rlhf/preference_train.jsonl", parse_preference, 700),
        ("hh_rlhf/preference_test.jsonl", parse_preference, 200),
        ("hh_rlhf/prompts_train.jsonl", parse_prompt, 262),
        ("gsm8k/sft_train.jsonl", parse_conversation, None),
        ("gsm8k/prompts_train.jsonl", parse_prompt, None),
    ],
)
def test_shipped_files_parse_cleanly(repo_root: Path, relative: str, parser, count: int | None) -> None:
    loaded = load_rows(repo_root / "data" / relative, parser)
    assert loaded.skipped == 0
    if count is not None:
        assert len(loaded.rows) == count
    if parser is parse_prompt and relative.startswith("gsm8k"):
        assert all(set(r.extra) == {"answer"} for r in loaded.rows)
