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


def test_vs_trl_parser_takes_every_row() -> None:
    vs_trl = _vs_trl()
    args = vs_trl.build_parser().parse_args(["--only", "dpo", "grpo", "rloo", "ppo", "--group-size", "2"])
    assert args.only == ["dpo", "grpo", "rloo", "ppo"] and args.group_size == 2
    assert args.trl_sft_mode == "packing" and args.ours_packing is None  # None: pack when the data module can
    assert set(vs_trl.ROWS) == {"sft", "reward", "dpo", "grpo", "rloo", "ppo", "generation", "mfu"}
    # times (RL rows) are lower-is-better, so their ratio is TRL / ours: > 1 still means ours is faster
    assert [name for name, row in vs_trl.ROWS.items() if not row.higher] == ["grpo", "rloo", "ppo"]
    assert [name for name, row in vs_trl.ROWS.items() if row.both] == ["sft", "reward", "generation"]
    with pytest.raises(SystemExit):
        vs_trl.build_parser().parse_args(["--only", "kto"])
    with pytest.raises(SystemExit):
        vs_trl.build_parser().parse_args(["--trl-sft-mode", "wrapped"])


def test_vs_trl_ours_packing_follows_the_data_module_signature() -> None:
    vs_trl = _vs_trl()

    class Packs:
        def __init__(self, packing: bool = False) -> None: ...

    class DoesNot:
        def __init__(self, batch_size: int = 8) -> None: ...

    auto, on, off = (
        vs_trl.build_parser().parse_args(a) for a in ([], ["--ours-packing"], ["--no-ours-packing"])
    )
    assert (
        vs_trl._ours_packing(auto, Packs) == {"packing": True} and vs_trl._ours_packing(auto, DoesNot) == {}
    )
    assert vs_trl._ours_packing(off, Packs) == {"packing": False} and vs_trl._ours_packing(off, DoesNot) == {}
    assert vs_trl._ours_packing(on, Packs) == {"packing": True}
    with pytest.raises(SystemExit):
        vs_trl._ours_packing(on, DoesNot)


def test_vs_trl_ppo_row_without_trl_1_12_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    vs_trl = _vs_trl()
    monkeypatch.delenv("RLHF_TRL112_PATH", raising=False)
    args = vs_trl.build_parser().parse_args(["--trl112-path", str(tmp_path)])
    with pytest.raises(SystemExit, match="pip install --no-deps --target"):
        vs_trl._trl112_path(args)
    (tmp_path / "trl" / "experimental" / "ppo").mkdir(parents=True)
    (tmp_path / "trl" / "experimental" / "ppo" / "ppo_trainer.py").write_text("")
    assert vs_trl._trl112_path(args) == str(tmp_path)


def test_vs_trl_marked_chatml_renders_like_the_original_and_masks_the_reply_and_its_end(tmp_path) -> None:
    """The ChatML patch for TRL's assistant_only_loss (SmolLM2's template has no generation markers): the same text,
    and the assistant mask covers each reply and its closing ``<|im_end|>``, never a header or a user turn."""
    pytest.importorskip("transformers")
    from hf_folders import make_llama_folder
    from transformers import AutoTokenizer

    vs_trl = _vs_trl()
    smollm2 = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
        + vs_trl.CHATML_TURN
        + "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer = AutoTokenizer.from_pretrained(make_llama_folder(tmp_path / "llama"))
    tokenizer.chat_template = smollm2
    marked = vs_trl.marked_template(tokenizer, use_trl=False)
    assert marked is not None and "{% generation %}" in marked
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=marked) == plain
    out = tokenizer.apply_chat_template(
        messages, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked).replace(" ", "") == "hellothere<|im_end|>bye<|im_end|>"
    tokenizer.chat_template = marked
    assert (
        vs_trl.marked_template(tokenizer, use_trl=False) is None
    )  # already marked: the folder is used as it is


def test_vs_trl_markdown_renders_a_saved_run(tmp_path, capsys) -> None:
    import json

    vs_trl = _vs_trl()
    side = {"tokens_per_sec": 2000.0, "peak_rss_mb": 800.0}
    run = {
        "date": "2026-12-03",
        "rows": {
            "sft": {
                "metric": "tokens_per_sec",
                "baseline": "TRL SFTTrainer",
                "model": "llama",
                "ours": side,
                "trl": {"tokens_per_sec": 1000.0, "peak_rss_mb": 1000.0},
                "ratio_uses": "ours",
                "ratio_ours_over_trl": 2.0,
            },
            "ppo": {
                "metric": "sec_per_iteration",
                "baseline": "TRL 1.12 PPOTrainer",
                "model": "llama",
                "ours": {"sec_per_iteration": 1.5, "peak_rss_mb": 900.0},
                "trl": {"sec_per_iteration": 3.0, "peak_rss_mb": 950.0},
                "ratio_uses": "ours",
                "ratio_ours_over_trl": 2.0,
            },
            "mfu": {
                "metric": "mfu",
                "model": "llama",
                "ours": {
                    "model_flops_per_sec": 2e10,
                    "matmul_peak_flops_per_sec": 8e10,
                    "mfu": 0.25,
                    "peak_rss_mb": 700.0,
                },
            },
        },
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    vs_trl.main(["--from-json", str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| row | model | ours | TRL |") and len(lines) == 5
    assert lines[2] == (
        "| sft | llama | 2,000 tok/s | 1,000 tok/s (TRL SFTTrainer) | 2.00x | 800 / 1000 | 2026-12-03 |"
    )
    assert "| ppo | llama | 1.5 s/it | 3 s/it" in lines[3]
    assert "20.0 GFLOP/s (MFU 25.0%)" in lines[4] and "peak 80.0 GFLOP/s" in lines[4]


def test_vs_trl_generation_row_runs_each_side_in_its_own_process(tmp_path) -> None:
    """The generation row needs no TRL: both sides (ours and ``model.generate``) run as ``--worker`` subprocesses
    on a tiny folder, each reporting exactly batch x new tokens generated and its own peak RSS; the ratio and the
    RSS ratio come out in the row."""
    pytest.importorskip("transformers")
    from hf_folders import make_llama_folder

    vs_trl = _vs_trl()
    # static_cache, not compile: the same fixed-shape decode path without compiling in the fast tier (minutes)
    fast = "static_cache" if "static_cache" in vs_trl.FAST_DECODE_FIELDS else "auto"
    folder = make_llama_folder(tmp_path / "llama")
    assert vs_trl.write_prompts(folder, tmp_path / "prompts.jsonl", 64) > 2
    args = vs_trl.build_parser().parse_args(
        [
            "--rounds",
            "1",
            "--gen-batch",
            "2",
            "--gen-new-tokens",
            "3",
            "--gen-repeats",
            "1",
            "--gen-fast",
            fast,
        ]
    )
    row = vs_trl.compare("generation", args, folder, tmp_path)
    sides = ["ours", "trl"] + (["ours_fast"] if vs_trl.fast_decode_field(fast) else [])
    for side in sides:
        assert row[side]["new_tokens"] == 6 and row[side]["new_tokens_per_sec"] > 0
        assert row[side]["peak_rss_mb"] > 50
    assert row["ratio_ours_over_trl"] > 0 and row["ratio_rss_ours_over_trl"] > 0
    assert row["ratio_uses"] == ("ours_fast" if vs_trl.fast_decode_field(fast) else "ours")
    if fast != "auto":
        assert row["ours_fast"]["fast"] == {fast: True}


def test_vs_trl_matmul_peak_counts_two_n_cubed_flops_per_product() -> None:
    peak = _vs_trl()._matmul_peak(seconds=0.05, n=64)
    assert peak["n"] == 64 and peak["reps"] >= 1 and peak["flops_per_sec"] > 0
    bf16 = _vs_trl()._matmul_peak(seconds=0.05, n=64, dtype="bfloat16")  # the --precision bf16 MFU's peak
    assert bf16["flops_per_sec"] > 0


def test_vs_trl_markdown_mfu_row_names_the_bf16_peak_under_bf16(tmp_path, capsys) -> None:
    """Under ``--precision bf16`` the MFU row shows the bf16 matmul peak and the MFU against it beside the fp32 one
    (bf16 autocast can exceed the fp32 peak, so the fp32 MFU alone overstates the use of the machine)."""
    import json

    vs_trl = _vs_trl()
    ours = {"model_flops_per_sec": 2e11, "mfu": 1.1, "matmul_peak_flops_per_sec": 1.8e11, "peak_rss_mb": 900,
            "bf16_matmul_peak_flops_per_sec": 8e11, "mfu_vs_bf16_peak": 0.25}  # fmt: skip
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"date": "2026-12-03", "rows": {"mfu": {"metric": "mfu", "model": "small",
                                                                        "ours": ours}}}))  # fmt: skip
    vs_trl.main(["--from-json", str(saved)])
    table = capsys.readouterr().out
    assert "peak 180.0 GFLOP/s (fp32 mm); bf16 mm 800.0 GFLOP/s (MFU 25.0%)" in table


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


def test_hf_generation_benchmark_times_each_decode_mode_against_model_generate() -> None:
    """``benchmarks/hf_generation.py`` (README: fast decoding) on a tiny random Llama: one JSON object with our
    default and static-cache loops each over ``model.generate``, and the greedy tokens identical to it."""
    import json
    import subprocess
    import sys

    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hf_generation.py"), "--hidden", "32", "--layers", "2",
         "--vocab-size", "128", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
         "--no-baseline", "--modes", "default", "static_cache", "--threads", "1"],
        capture_output=True, text=True, check=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    result = json.loads(out.stdout[out.stdout.index("{") :])
    for mode in ("default", "static_cache"):
        assert result[f"{mode}_greedy_match"] is True
        assert result[f"{mode}_over_hf"] > 0
