"""``rlhf-lightning score``: every row scored (raw and normalised by the checkpoint's statistics), input order kept,
batching/padding-invariant scores, checkpoint file or folder, bad rows located by file/line/field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_lightning.cli import main as cli_main
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.scoring import main as score_main
from rlhf_lightning.scoring import score_file
from rlhf_lightning.stages.reward import RewardModule

MEAN, STD = 0.25, 2.0
ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Hi, how can I help?"},
        ]
    },
    {"prompt": "What is the capital of France?", "response": "Paris.", "id": "b"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a long story about a dragon who lived in a cave."},
            {
                "role": "assistant",
                "content": "Once upon a time a dragon slept in a cave for a hundred years.",
            },
        ]
    },
    {"prompt": [{"role": "user", "content": "Thanks"}], "completion": "You're welcome!"},
]


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, RewardModule]:
    """A reward checkpoint written through the module's own save hook, with known score statistics."""
    root = tmp_path_factory.mktemp("reward")
    tiny_tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    module = RewardModule(
        model=ModelArgs(preset="tiny", dropout=0.0), tokenizer_path=str(root / "tokenizer.json")
    )
    module.configure_model()
    module.reward_model.set_score_stats(MEAN, STD)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    file = root / "run" / "version_0" / "checkpoints" / "last.ckpt"
    file.parent.mkdir(parents=True)
    torch.save(checkpoint, file)
    return file, module.eval()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(module: RewardModule, tokenizer, row: dict) -> float:
    from rlhf_lightning.data.formats import parse_conversation

    ids, _ = tokenizer.render(parse_conversation(row).messages)
    with torch.no_grad():
        return float(module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0])


def test_score_command_writes_raw_and_normalised_scores(
    tmp_path: Path, reward_ckpt: tuple[Path, RewardModule], tiny_tokenizer
) -> None:
    file, module = reward_ckpt
    src = _write(tmp_path / "convs.jsonl", ROWS)
    out = tmp_path / "out" / "scored.jsonl"
    cli_main(["score", "--ckpt", str(file), "--input", str(src), "--output", str(out), "--batch_size", "3"])
    scored = _read(out)
    assert len(scored) == len(ROWS)
    for row, got in zip(ROWS, scored):
        assert {
            k: v for k, v in got.items() if k not in ("score", "score_normalized")
        } == row  # order and fields kept
        expected = _expected(module, tiny_tokenizer, row)
        assert got["score"] == pytest.approx(expected, abs=1e-5)
        assert got["score_normalized"] == pytest.approx((expected - MEAN) / STD, abs=1e-5)


def test_scores_do_not_depend_on_batching_and_folder_resolves(
    tmp_path: Path, reward_ckpt: tuple[Path, RewardModule]
) -> None:
    file, _ = reward_ckpt
    src = _write(tmp_path / "convs.jsonl", ROWS)
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    score_file(file, src, one, batch_size=1)
    result = score_file(file.parents[2], src, many, batch_size=16)  # the stage folder: its last.ckpt
    assert result.rows == len(ROWS) and result.truncated == 0
    for a, b in zip(_read(one), _read(many)):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_long_conversations_are_left_truncated_not_refused(
    tmp_path: Path, reward_ckpt: tuple[Path, RewardModule]
) -> None:
    file, _ = reward_ckpt
    long_row = {"prompt": "word " * 400, "response": "Short answer."}
    src = _write(tmp_path / "long.jsonl", [long_row, ROWS[1]])
    result = score_file(file, src, tmp_path / "scored.jsonl", max_length=32)
    assert result.truncated == 1
    assert len(_read(tmp_path / "scored.jsonl")) == 2


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"messages": [{"role": "user", "content": "only a question"}]}, "messages"),
        ({"prompt": "Hi?"}, "response"),
        (
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages",
        ),
    ],
    ids=["no_assistant", "missing_response", "bad_role"],
)
def test_bad_rows_error_with_file_line_and_field(
    tmp_path: Path, reward_ckpt: tuple[Path, RewardModule], bad: dict, field: str
) -> None:
    file, _ = reward_ckpt
    src = _write(tmp_path / "convs.jsonl", [ROWS[0], bad, ROWS[1]])
    out = tmp_path / "scored.jsonl"
    with pytest.raises(SystemExit) as info:
        score_main(["--ckpt", str(file), "--input", str(src), "--output", str(out)])
    message = str(info.value.code)
    assert str(src) in message and "line 2" in message and f"field '{field}" in message
    assert not out.exists()  # nothing half-written


def test_non_reward_checkpoint_is_refused(tmp_path: Path, tiny_tokenizer) -> None:
    from rlhf_lightning.stages.sft import SFTModule

    tiny_tokenizer.save(tmp_path / "tok.json")
    sft = SFTModule(model=ModelArgs(preset="tiny"), tokenizer_path=str(tmp_path / "tok.json"))
    sft.configure_model()
    checkpoint = {"state_dict": sft.state_dict()}
    sft.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "sft.ckpt")
    src = _write(tmp_path / "convs.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="expected a reward-model checkpoint"):
        score_file(tmp_path / "sft.ckpt", src, tmp_path / "out.jsonl")
