"""Parse data rows into conversations, preference pairs and prompts, with errors that say where and why.

Rows come from JSON Lines, ``.json`` (an array or JSON Lines), Parquet/Arrow files or saved ``datasets`` folders
(:func:`read_rows`; tables through pyarrow/``datasets``, imported only when such a source is read). Every error is a
:class:`DataFormatError` whose message names the file, the 1-based line (or row, for tables and JSON arrays), the field
(a JSON path such as ``messages[2].role``), what was found and what was expected, so a user can fix the data without
reading this code.

Row shapes read here:

* conversations: ``{"messages": [msgs]}`` or ``{"prompt": str | [msgs], "response" | "completion": str | [msgs]}``;
* preference pairs: an explicit ``prompt`` with ``chosen``/``rejected`` replies (TRL's conversational format; also
  UltraFeedback-binarized rows, whose ``chosen``/``rejected`` conversations repeat the ``prompt`` string); an
  implicit prompt (``chosen`` and ``rejected`` are whole conversations that share their opening turns, as in TRL's
  implicit-prompt preference format); Anthropic HH-RLHF transcript strings (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, Bai et al. 2022,
  github.com/anthropics/hh-rlhf) with or without a ``prompt`` key; an optional numeric ``margin``;
* prompts: ``{"prompt": str | [msgs], **extra}``; the extra keys (for example GSM8K's ``answer``) are kept.

Choices:

* A message is ``{"role": "system" | "user" | "assistant", "content": str}``; other keys of a message are dropped.
  Message content is kept as written (not stripped); only whitespace-only content is an error. HH transcript turns
  are stripped, which is how the shipped ``preference_*.jsonl`` files were derived from the raw transcripts.
* HH transcripts are split on ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"`` only; a ``"Human:"`` inside a turn without
  the blank line before it stays text (so such a transcript fails the alternation check, as the dataset intends).
* A reply (``chosen``/``rejected``/``response`` given as messages) that repeats the prompt turns in front is accepted:
  the repeated prompt is removed. So full HH transcripts work next to a ``prompt`` key.
* Replies must start and end with an assistant turn; prompts must end with a user turn.
* ``margin: null`` counts as no margin (0.0); booleans, strings and non-finite numbers are errors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from rlhf_lightning.types import Message

ROLES: tuple[str, ...] = ("system", "user", "assistant")
MAX_KEPT_ERRORS = 5  # how many errors LoadedRows keeps when rows are skipped
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

T = TypeVar("T")
PathLike = str | Path


class DataFormatError(ValueError):
    """A data file or row that cannot be read, located precisely.

    ``str()`` reads ``"<path>, line <n>, field '<field>': <message>; expected <expected>"``; the line and field parts
    are left out for errors about the whole file, the ``expected`` part when there is nothing to expect. ``unit`` is
    ``"line"`` for text files (JSON Lines) and ``"row"`` for tables and JSON arrays (``line`` then holds the 1-based
    row number).
    """

    def __init__(
        self,
        path: PathLike,
        line: int | None,
        field: str | None,
        message: str,
        expected: str | None = None,
        unit: str = "line",
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        self.expected = expected
        self.unit = unit
        super().__init__(self._render())

    def _render(self) -> str:
        where = [self.path]
        if self.line is not None:
            where.append(f"{self.unit} {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        text = f"{', '.join(where)}: {self.message}"
        return f"{text}; expected {self.expected}" if self.expected else text

    def __reduce__(self):  # keep the error picklable (DataLoader workers send exceptions across processes)
        return (type(self), (self.path, self.line, self.field, self.message, self.expected, self.unit))

    def in_unit(self, unit: str) -> DataFormatError:
        """The same error counted in ``unit`` (``"row"`` for rows of a table)."""
        if unit == self.unit:
            return self
        return DataFormatError(self.path, self.line, self.field, self.message, self.expected, unit)


@dataclass(frozen=True)
class Conversation:
    """A conversation to imitate: the assistant turns are the targets."""

    messages: list[Message]


@dataclass(frozen=True)
class PreferencePair:
    """Two replies to one prompt, ``chosen`` preferred over ``rejected`` by at least ``margin``."""

    prompt: list[Message]  # ends with a user turn
    chosen: list[Message]  # starts and ends with an assistant turn
    rejected: list[Message]  # starts and ends with an assistant turn
    margin: float = 0.0


@dataclass(frozen=True)
class PromptRow:
    """A prompt to generate from, with the row's other fields (for reward functions, e.g. ``answer``)."""

    messages: list[Message]  # ends with a user turn
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedRows(Generic[T]):
    """The parsed rows of one file, and what was skipped."""

    rows: list[T]
    skipped: int = 0  # rows that failed to parse (only with skip_bad=True)
    first_errors: list[DataFormatError] = field(default_factory=list)  # the first MAX_KEPT_ERRORS of them


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _got(value: Any, limit: int = 60) -> str:
    """A short description of a JSON value for error messages: ``got 'bot'``, ``got a number (3)``."""
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit] + "..."
        return f"got {text!r}"
    if value is None:
        return "got null"
    preview = json.dumps(value, ensure_ascii=False)
    if len(preview) > limit:
        preview = preview[:limit] + "..."
    return f"got {_json_type(value)} ({preview})"


def _turn(role: str) -> str:
    """``"a 'user' turn"`` / ``"an 'assistant' turn"``."""
    return f"{'an' if role == 'assistant' else 'a'} {role!r} turn"


def _has_hh_markers(text: str) -> bool:
    return text.startswith(("Human:", "Assistant:")) or _HH_MARKER.search(text) is not None


def _split_hh(text: str) -> list[tuple[str, str]]:
    """Split an HH transcript into ``(role, stripped content)`` turns; raise ValueError on text before turn 1."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_MARKER.split(text)
    if len(parts) == 1:
        raise ValueError("no '\\n\\nHuman:' or '\\n\\nAssistant:' turn markers")
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' or 'Assistant:' marker: {parts[0].strip()[:40]!r}")
    return [(_HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _check_hh_turns(turns: list[tuple[str, str]]) -> list[Message]:
    for i in range(1, len(turns)):
        if turns[i][0] == turns[i - 1][0]:
            raise ValueError(
                f"turns do not alternate user/assistant: turns {i} and {i + 1} are both {turns[i][0]!r}"
            )
    for i, (role, content) in enumerate(turns):
        if not content:
            if i == len(turns) - 1 and role == "assistant":
                raise ValueError("empty final assistant turn")
            raise ValueError(f"empty {role} turn {i + 1}")
    return [{"role": role, "content": content} for role, content in turns]


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an Anthropic HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into messages.

    Turns are split on ``"\\n\\nHuman:"``/``"\\n\\nAssistant:"`` and stripped. Raises ``ValueError`` with a reason when
    there are no turns, text precedes the first turn, two consecutive turns have the same role ("turns do not
    alternate user/assistant") or a turn is empty ("empty final assistant turn" for the last one).
    """
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string, {_got(text)}")
    return _check_hh_turns(_split_hh(text))


def _hh_prompt(text: str) -> list[Message]:
    """An HH-style prompt string: like a transcript, but a trailing empty ``Assistant:`` header is allowed."""
    turns = _split_hh(text)
    if turns and turns[-1] == ("assistant", ""):
        turns = turns[:-1]
    if not turns:
        raise ValueError("no turns before the final 'Assistant:' header")
    return _check_hh_turns(turns)


def parse_messages(
    value: Any, *, path: PathLike = "<row>", line: int | None = None, field: str
) -> list[Message]:
    """Validate a list of ``{"role", "content"}`` messages and return clean copies (other keys dropped)."""
    if not isinstance(value, list):
        raise DataFormatError(
            path, line, field, _got(value), 'a list of {"role": ..., "content": ...} messages'
        )
    if not value:
        raise DataFormatError(path, line, field, "got an empty list", "at least one message")
    messages: list[Message] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise DataFormatError(path, line, where, _got(item), 'an object {"role": ..., "content": ...}')
        for key in ("role", "content"):
            if key not in item:
                raise DataFormatError(
                    path, line, f"{where}.{key}", "missing", f"a '{key}' key in every message"
                )
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise DataFormatError(
                path, line, f"{where}.role", _got(role), "one of " + ", ".join(map(repr, ROLES))
            )
        if not isinstance(content, str):
            raise DataFormatError(path, line, f"{where}.content", _got(content), "a string")
        if not content.strip():
            raise DataFormatError(
                path,
                line,
                f"{where}.content",
                f"got {'an empty' if not content else 'a whitespace-only'} string",
                "non-empty text",
            )
        messages.append({"role": role, "content": content})
    return messages


def _parse_turns(
    value: Any, *, path: PathLike, line: int | None, field: str, string_role: str
) -> list[Message]:
    """A prompt or reply value: messages, an HH transcript string, or plain text (one ``string_role`` message)."""
    if isinstance(value, str):
        if _has_hh_markers(value):
            try:
                return _hh_prompt(value) if string_role == "user" else parse_hh_transcript(value)
            except ValueError as err:
                raise DataFormatError(
                    path,
                    line,
                    field,
                    str(err),
                    "an HH transcript of alternating, non-empty Human/Assistant turns",
                ) from None
        if not value.strip():
            raise DataFormatError(path, line, field, "got an empty string", "non-empty text")
        return [{"role": string_role, "content": value}]
    if isinstance(value, list):
        return parse_messages(value, path=path, line=line, field=field)
    raise DataFormatError(path, line, field, _got(value), "a string or a list of messages")


def _require_dict(row: Any, path: PathLike, line: int | None) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataFormatError(path, line, None, _got(row), "a JSON object")
    return row


def _check_prompt_end(prompt: list[Message], *, path: PathLike, line: int | None, field: str) -> None:
    if prompt[-1]["role"] != "user":
        raise DataFormatError(
            path,
            line,
            field,
            f"the prompt ends with {_turn(prompt[-1]['role'])}",
            "a prompt that ends with a user turn",
        )


def _strip_prompt(reply: list[Message], prompt: list[Message]) -> list[Message]:
    """Drop a copy of the prompt turns in front of a reply (full transcripts next to a prompt key)."""
    if len(reply) > len(prompt) and reply[: len(prompt)] == prompt:
        return reply[len(prompt) :]
    return reply


def _check_reply(reply: list[Message], *, path: PathLike, line: int | None, field: str) -> None:
    if not reply:
        raise DataFormatError(
            path, line, field, "no reply after the prompt turns", "at least one assistant turn"
        )
    for position, index in (("starts", 0), ("ends", -1)):
        if reply[index]["role"] != "assistant":
            raise DataFormatError(
                path,
                line,
                field,
                f"the reply {position} with {_turn(reply[index]['role'])}",
                f"a reply that {position} with an assistant turn",
            )


# ----------------------------------------------------------------------------------------------------------------
# row parsers


def parse_conversation(row: Any, *, path: PathLike = "<row>", line: int | None = None) -> Conversation:
    """``{"messages": [...]}`` or ``{"prompt": str|[msgs], "response"|"completion": str|[msgs]}`` -> Conversation.

    ``messages`` wins over ``prompt`` when both are present. The conversation needs at least one assistant turn.
    """
    row = _require_dict(row, path, line)
    if "messages" in row:
        messages = parse_messages(row["messages"], path=path, line=line, field="messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(
                path, line, "messages", "no assistant turn", "at least one assistant turn to learn from"
            )
        return Conversation(messages)
    if "prompt" not in row:
        raise DataFormatError(
            path, line, "messages", "missing", '{"messages": [...]} or {"prompt": ..., "response": ...}'
        )
    reply_keys = [k for k in ("response", "completion") if k in row]
    if not reply_keys:
        raise DataFormatError(
            path, line, "response", "missing", "a 'response' (or 'completion') next to 'prompt'"
        )
    if len(reply_keys) == 2:
        raise DataFormatError(
            path, line, "completion", "both 'response' and 'completion' given", "only one of them"
        )
    key = reply_keys[0]
    prompt = _parse_turns(row["prompt"], path=path, line=line, field="prompt", string_role="user")
    reply = _parse_turns(row[key], path=path, line=line, field=key, string_role="assistant")
    reply = _strip_prompt(reply, prompt)
    _check_prompt_end(prompt, path=path, line=line, field="prompt")
    _check_reply(reply, path=path, line=line, field=key)
    return Conversation(prompt + reply)


def _parse_margin(row: dict[str, Any], path: PathLike, line: int | None) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataFormatError(path, line, "margin", _got(value), "a finite number")
    return float(value)


def parse_preference(row: Any, *, path: PathLike = "<row>", line: int | None = None) -> PreferencePair:
    """Parse a preference row (explicit prompt, implicit prompt or HH transcripts) into a PreferencePair.

    Explicit: ``{"prompt": str|[msgs], "chosen": str|[msgs], "rejected": str|[msgs]}``; a string reply is one
    assistant turn (or an HH transcript when it carries ``Human:``/``Assistant:`` markers). Implicit (no ``prompt``):
    ``chosen`` and ``rejected`` are whole conversations (messages or HH transcripts) and the prompt is their longest
    common prefix of whole messages, which must end with a user turn. Optional ``margin`` (number, default 0).
    """
    row = _require_dict(row, path, line)
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataFormatError(
                path, line, key, "missing", "'chosen' and 'rejected' replies in every preference row"
            )
    margin = _parse_margin(row, path, line)

    if "prompt" in row:
        prompt = _parse_turns(row["prompt"], path=path, line=line, field="prompt", string_role="user")
        _check_prompt_end(prompt, path=path, line=line, field="prompt")
        replies = {
            key: _strip_prompt(
                _parse_turns(row[key], path=path, line=line, field=key, string_role="assistant"), prompt
            )
            for key in ("chosen", "rejected")
        }
    else:
        full = {}
        for key in ("chosen", "rejected"):
            value = row[key]
            if isinstance(value, str) and not _has_hh_markers(value):
                raise DataFormatError(
                    path,
                    line,
                    "prompt",
                    f"missing, and '{key}' is plain text",
                    "a 'prompt' field, or whole conversations (messages or HH transcripts) in 'chosen' and 'rejected'",
                )
            full[key] = _parse_turns(value, path=path, line=line, field=key, string_role="assistant")
        chosen, rejected = full["chosen"], full["rejected"]
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataFormatError(
                path,
                line,
                "prompt",
                "missing, and 'chosen' and 'rejected' share no opening turns",
                "a 'prompt' field, or conversations that start with the same prompt turns",
            )
        prompt = chosen[:shared]
        if prompt[-1]["role"] != "user":
            raise DataFormatError(
                path,
                line,
                "prompt",
                f"the turns shared by 'chosen' and 'rejected' end with {_turn(prompt[-1]['role'])}",
                "a shared prompt that ends with a user turn",
            )
        replies = {"chosen": chosen[shared:], "rejected": rejected[shared:]}

    for key in ("chosen", "rejected"):
        _check_reply(replies[key], path=path, line=line, field=key)
    if replies["chosen"] == replies["rejected"]:
        raise DataFormatError(path, line, "rejected", "identical to 'chosen'", "two different replies")
    return PreferencePair(prompt, replies["chosen"], replies["rejected"], margin)


def parse_prompt(row: Any, *, path: PathLike = "<row>", line: int | None = None) -> PromptRow:
    """``{"prompt": str|[msgs], **extra}`` -> PromptRow(messages, extra); the prompt must end with a user turn."""
    row = _require_dict(row, path, line)
    if "prompt" not in row:
        raise DataFormatError(path, line, "prompt", "missing", '{"prompt": "..." or [messages], ...}')
    messages = _parse_turns(row["prompt"], path=path, line=line, field="prompt", string_role="user")
    _check_prompt_end(messages, path=path, line=line, field="prompt")
    return PromptRow(messages, {k: v for k, v in row.items() if k != "prompt"})


# ----------------------------------------------------------------------------------------------------------------
# files


def read_jsonl(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON Lines file into ``(line number, object)`` pairs; line numbers are 1-based, blank lines skipped.

    Raises DataFormatError for a missing file, a file with no non-blank line, bytes that are not UTF-8 (naming the
    line of the first bad byte), a line that is not JSON, and a line that is not a JSON object. A leading UTF-8 BOM
    and Windows line endings are accepted.
    """
    file = Path(path)
    expected_file = "a JSON Lines file (one JSON object per line)"
    if not file.exists():
        raise DataFormatError(path, None, None, "file not found", expected_file)
    if not file.is_file():
        raise DataFormatError(path, None, None, "not a regular file", expected_file)
    data = file.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(
                path,
                number,
                None,
                f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)",
                "UTF-8 text",
            ) from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path,
                number,
                None,
                f"not valid JSON ({err.msg} at column {err.colno})",
                "one JSON object per line",
            ) from None
        if not isinstance(value, dict):
            raise DataFormatError(path, number, None, _got(value), "a JSON object per line")
        rows.append((number, value))
    if not rows:
        raise DataFormatError(path, None, None, "the file is empty (no non-blank lines)", expected_file)
    return rows


TABLE_SUFFIXES: tuple[str, ...] = (".parquet", ".arrow")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # a Dataset / a DatasetDict
_EXPECTED_SOURCE = (
    "a .jsonl file, a .json file (an array of objects or JSON Lines), a .parquet or .arrow file, "
    "or a folder written by datasets' Dataset.save_to_disk"
)
_INSTALL_HF = "pip install 'rlhf-lightning[hf]' (it brings the datasets library and pyarrow)"


def _read_json(path: PathLike) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """A ``.json`` file: a JSON array of objects (numbered by row) or else JSON Lines (numbered by line)."""
    data = Path(path).read_bytes()
    if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return read_jsonl(path), "line"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(path, line, None, "not valid UTF-8", "UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            path,
            err.lineno,
            None,
            f"not valid JSON ({err.msg} at column {err.colno})",
            "a JSON array of objects",
        ) from None
    rows = []
    for number, row in enumerate(value, start=1):
        if not isinstance(row, dict):
            raise DataFormatError(path, number, None, _got(row), "a JSON object per row", unit="row")
        rows.append((number, row))
    if not rows:
        raise DataFormatError(path, None, None, "the JSON array is empty", "a JSON array of objects")
    return rows, "row"


def _table_rows(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """A Parquet/Arrow file or a saved ``datasets`` folder as ``(row number, row)``; null cells count as missing.

    Read locally with pyarrow (Parquet; Arrow IPC stream or file format) and ``datasets.load_from_disk`` (folders),
    both imported only here so the core works without them.
    """
    file = Path(path)
    try:
        if file.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(file))
            if isinstance(loaded, datasets.DatasetDict):
                splits = ", ".join(map(repr, loaded))
                raise DataFormatError(
                    path,
                    None,
                    None,
                    f"a DatasetDict with splits {splits}",
                    f"the folder of one split, e.g. {file / next(iter(loaded), 'train')}",
                )
            table_rows = loaded.to_list()
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if file.suffix.lower() == ".parquet":
                table = pq.read_table(file)
            else:
                with pa.memory_map(str(file)) as source:
                    try:
                        table = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        source.seek(0)
                        table = pa.ipc.open_file(source).read_all()
            table_rows = table.to_pylist()
    except ImportError as err:
        raise DataFormatError(path, None, None, f"cannot read it: {err}", _INSTALL_HF) from None
    except DataFormatError:
        raise
    except Exception as err:  # pyarrow/datasets errors on a damaged or foreign file
        raise DataFormatError(
            path, None, None, f"cannot read it ({type(err).__name__}: {err})", _EXPECTED_SOURCE
        ) from None
    if not table_rows:
        raise DataFormatError(path, None, None, "the table has no rows", _EXPECTED_SOURCE)
    return [
        (number, {k: v for k, v in row.items() if v is not None})
        for number, row in enumerate(table_rows, start=1)
    ]


def _read_any(path: PathLike) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """``read_rows`` and the unit its numbers count (``"line"`` or ``"row"``)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if file.is_dir():
        if not any((file / name).is_file() for name in _SAVED_DATASET_FILES):
            raise DataFormatError(
                path, None, None, "a folder without dataset_info.json or state.json", _EXPECTED_SOURCE
            )
        return _table_rows(path), "row"
    if suffix in TABLE_SUFFIXES:
        if not file.is_file():
            raise DataFormatError(path, None, None, "file not found", _EXPECTED_SOURCE)
        return _table_rows(path), "row"
    if suffix == ".json" and file.is_file():
        return _read_json(path)
    return read_jsonl(path), "line"


def read_rows(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """Read any supported data source into ``(number, row)`` pairs, dispatching on the extension or folder.

    ``.jsonl`` (and any other extension): :func:`read_jsonl`, numbered by line. ``.json``: a JSON array of objects
    (numbered by row, 1-based) or JSON Lines. ``.parquet``/``.arrow`` files and folders written by ``datasets``'
    ``Dataset.save_to_disk`` (with ``dataset_info.json``/``state.json``): numbered by row, 1-based; a null cell counts
    as a missing field (tables give every row every column). Nothing is fetched; tables need the ``hf`` extra
    (pyarrow, datasets), imported only when such a source is read. File-level problems raise DataFormatError.
    """
    return _read_any(path)[0]


def load_rows(path: PathLike, parser: Callable[..., T], *, skip_bad: bool = False) -> LoadedRows[T]:
    """Read ``path`` (any source :func:`read_rows` reads) and parse every row with ``parser(row, path=..., line=...)``.

    Errors in rows of a table or JSON array say ``row <n>`` instead of ``line <n>``.

    With ``skip_bad=False`` the first bad row raises its DataFormatError. With ``skip_bad=True`` bad rows are
    skipped and counted (the first few errors kept), but file-level errors still raise, and so does a file in which
    every row is bad (naming the first error), since that is almost always the wrong parser or file.
    """
    rows: list[T] = []
    skipped = 0
    errors: list[DataFormatError] = []
    source_rows, unit = _read_any(path)
    for number, row in source_rows:
        try:
            rows.append(parser(row, path=path, line=number))
        except DataFormatError as error:
            err = error.in_unit(unit)
            if not skip_bad:
                if err is not error:
                    raise err from None
                raise
            skipped += 1
            if len(errors) < MAX_KEPT_ERRORS:
                errors.append(err)
    if not rows:
        first = errors[0]
        raise DataFormatError(
            first.path,
            first.line,
            first.field,
            f"all {skipped} rows are bad; the first: {first.message}",
            first.expected,
            first.unit,
        )
    return LoadedRows(rows, skipped, errors)
