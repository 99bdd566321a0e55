"""The TRL comparison script's command line (no TRL needed: the script imports it only when it runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vs_trl_parser_takes_the_rl_and_dpo_rows() -> None:
    vs_trl = _vs_trl()
    args = vs_trl.build_parser().parse_args(["--only", "dpo", "grpo", "rloo", "--group-size", "2"])
    assert args.only == ["dpo", "grpo", "rloo"] and args.group_size == 2
    assert set(vs_trl.ROWS) == {"sft", "reward", "dpo", "grpo", "rloo"}
    # times (RL rows) are lower-is-better, so their ratio is TRL / ours: > 1 still means ours is faster
    assert [name for name, row in vs_trl.ROWS.items() if not row[3]] == ["grpo", "rloo"]
    with pytest.raises(SystemExit):
        vs_trl.build_parser().parse_args(["--only", "ppo"])


def test_reward_recipe_trains_and_scores_our_side_on_a_hugging_face_folder(tmp_path, capsys) -> None:
    """``benchmarks/reward_recipe.py --only ours`` on a tiny random Llama folder (a smoke budget): it trains our
    recipe and reports the held-out accuracy on all 200 ``preference_test.jsonl`` pairs (TRL's side needs TRL)."""
    import json

    pytest.importorskip("transformers")
    from hf_folders import make_llama_folder

    spec = importlib.util.spec_from_file_location("reward_recipe", REPO / "benchmarks" / "reward_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    folder = make_llama_folder(tmp_path / "llama")
    argv = ["--model", str(folder), "--only", "ours", "--limit-train-batches", "3", "--max-length", "96"]
    recipe.main([*argv, "--precision", "32-true"])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["side"] == "ours" and line["steps"] == 3 and line["lr"] == 1e-5
    assert 0.0 <= line["accuracy"] <= 1.0 and line["val_loss"] > 0
