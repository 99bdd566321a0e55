"""Data sources besides JSON Lines: Parquet, Arrow, JSON arrays and saved ``datasets`` folders (``read_rows``).

Rows use the common schemas: TRL's conversational ``messages`` / ``prompt``+``chosen``+``rejected``, and
UltraFeedback-binarized rows (``prompt`` a string, ``chosen``/``rejected`` whole conversations that repeat it).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from rlhf_lightning.data.formats import DataFormatError, load_rows, parse_preference, parse_prompt, read_rows
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SFT_ROWS = [
    {"messages": [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]} for i in range(1, 5)
]
TRL_PREFERENCE_ROWS = [
    {
        "prompt": [msg("user", f"question {i}")],
        "chosen": [msg("assistant", f"good {i}")],
        "rejected": [msg("assistant", f"bad {i}")],
    }
    for i in range(1, 5)
]
ULTRAFEEDBACK_ROWS = [
    {
        "prompt": f"question {i}",
        "prompt_id": f"id{i}",
        "chosen": [msg("user", f"question {i}"), msg("assistant", f"good {i}")],
        "rejected": [msg("user", f"question {i}"), msg("assistant", f"bad {i}")],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    for i in range(1, 5)
]
PROMPT_ROWS = [{"prompt": f"question {i}", "answer": str(i)} for i in range(1, 5)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_sft_module_reads_parquet_and_saved_dataset(tmp_path):
    for source in (
        write_parquet(tmp_path / "sft.parquet", SFT_ROWS),
        save_dataset(tmp_path / "sft_saved", SFT_ROWS),
    ):
        dm = SFTDataModule(str(source), val_fraction=0.25, tokenizer_path=str(tmp_path / "never.json"))
        assert dm.validate_inputs() == {"train_rows": 3, "val_rows": 1, "skipped": 0}, source


def test_preference_module_reads_trl_and_ultrafeedback_rows(tmp_path, tiny_tokenizer):
    trl = write_parquet(tmp_path / "trl.parquet", TRL_PREFERENCE_ROWS)
    ultra = save_dataset(tmp_path / "ultrafeedback", ULTRAFEEDBACK_ROWS)
    dm = PreferenceDataModule(str(trl), val_path=str(ultra), tokenizer_path=tiny_tokenizer.source)
    assert dm.validate_inputs()["train_rows"] == 4
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 4
    # UltraFeedback: the prompt string repeated at the front of chosen/rejected is removed from the replies
    pairs = load_rows(ultra, parse_preference).rows
    assert pairs[0].prompt == [msg("user", "question 1")]
    assert pairs[0].chosen == [msg("assistant", "good 1")]
    assert pairs[0].rejected == [msg("assistant", "bad 1")]


def test_prompt_module_reads_arrow_and_json_array_and_keeps_extra_fields(tmp_path):
    arrow = tmp_path / "prompts.arrow"
    table = pa.Table.from_pylist(PROMPT_ROWS)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    array = tmp_path / "prompts.json"
    array.write_text(json.dumps(PROMPT_ROWS, indent=2), encoding="utf-8")
    for source in (arrow, array):
        dm = PromptDataModule(str(source), val_fraction=0.0, tokenizer_path=str(tmp_path / "never.json"))
        assert dm.validate_inputs()["train_rows"] == 4, source
        assert read_rows(source)[1] == (2, {"prompt": "question 2", "answer": "2"})


def test_json_file_of_json_lines_still_counts_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps(r) for r in PROMPT_ROWS[:2]) + "\n\n{bad\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"rows\.json, line 4: not valid JSON"):
        read_rows(path)


def test_bad_row_in_parquet_is_located_by_row_and_field(tmp_path):
    rows = [dict(r) for r in TRL_PREFERENCE_ROWS]
    rows[2] = {**rows[2], "chosen": [msg("user", "not a reply")]}
    path = write_parquet(tmp_path / "bad.parquet", rows)
    dm = PreferenceDataModule(str(path), val_path=None, tokenizer_path=str(tmp_path / "never.json"))
    with pytest.raises(DataFormatError) as info:
        dm.validate_inputs()
    err = info.value
    assert (err.line, err.field, err.unit) == (3, "chosen", "row")
    assert str(err).startswith(f"{path}, row 3, field 'chosen': the reply starts with a 'user' turn")
    # the unit survives pickling (DataLoader workers) and the all-rows-bad summary
    assert "row 3" in str(pickle.loads(pickle.dumps(err)))


def test_null_cells_count_as_missing_fields(tmp_path):
    """Tables give every row every column: a row without ``margin`` reads as no margin, not ``null``."""
    rows = [{**TRL_PREFERENCE_ROWS[0], "margin": 1.5}, TRL_PREFERENCE_ROWS[1]]
    pairs = load_rows(write_parquet(tmp_path / "m.parquet", rows), parse_preference).rows
    assert [p.margin for p in pairs] == [1.5, 0.0]
    no_prompt = [{"prompt": "q"}, {"other": 1}]
    with pytest.raises(DataFormatError, match=r"row 2, field 'prompt': missing"):
        load_rows(write_parquet(tmp_path / "p.parquet", no_prompt), parse_prompt)


def test_file_level_errors_for_tables_and_folders(tmp_path):
    with pytest.raises(DataFormatError, match=r"missing\.parquet: file not found"):
        read_rows(tmp_path / "missing.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataFormatError, match=r"plain: a folder without dataset_info\.json"):
        read_rows(tmp_path / "plain")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.parquet: cannot read it"):
        read_rows(broken)
    (tmp_path / "empty.json").write_text(" [ ]\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"empty\.json: the JSON array is empty"):
        read_rows(tmp_path / "empty.json")
    (tmp_path / "odd.json").write_text('[{"prompt": "q"}, 3]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"odd\.json, row 2: got a number"):
        read_rows(tmp_path / "odd.json")
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataFormatError, match=r"empty\.parquet: the table has no rows"):
        read_rows(empty)


def test_dataset_dict_folder_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_ROWS)}).save_to_disk(str(folder))
    with pytest.raises(
        DataFormatError, match=r"a DatasetDict with splits 'train'; expected the folder of one split"
    ):
        read_rows(folder)
    assert len(read_rows(folder / "train")) == 4


def test_arrow_file_format_and_score_input(tmp_path):
    """Arrow IPC *file* format (Feather v2) reads too, and ``score`` reads conversations from any source."""
    from rlhf_lightning.scoring import read_conversations

    path = tmp_path / "convs.arrow"
    table = pa.Table.from_pylist(SFT_ROWS)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    conversations = read_conversations(path)
    assert len(conversations) == 4
    assert conversations[0] == (SFT_ROWS[0], SFT_ROWS[0]["messages"])
