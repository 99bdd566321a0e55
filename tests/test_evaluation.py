"""``rlhf-lightning evaluate`` and the pipeline's closing evaluation: win rate and its bootstrap interval (pure
statistics against hand-worked numbers and a coverage simulation), a policy against itself (win rate exactly 1/2,
KL 0), a policy trained towards short replies beating its SFT start under the brevity rule, the report files, located
errors for a bad prompts file, and a failing evaluation that leaves the pipeline's checkpoints alone.

Tiny preset on CPU: one SFT checkpoint trained for a few steps, a "brief" policy fine-tuned from it on one-word
replies (what a brevity reward pushes towards, in a dozen steps), and a reward model on the SFT backbone.
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.cli import main as cli_main
from rlhf_lightning.data.formats import PromptRow
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.evaluation import (
    EvalArgs,
    bootstrap_ci,
    evaluate,
    format_table,
    pairwise_outcomes,
    read_prompts,
    win_rate,
    write_evaluation,
)
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline
from rlhf_lightning.reward_functions import gsm8k_correct
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "hh_rlhf" / "prompts_train.jsonl"
PREFERENCES = REPO / "data" / "hh_rlhf" / "preference_test.jsonl"
BREVITY = "rlhf_lightning.reward_functions:brevity"
ARGS = EvalArgs(
    generation=GenerationArgs(max_new_tokens=16, temperature=1.0), batch_size=8, max_prompt_length=64
)

_trainer = partial(quiet_trainer, num_sanity_val_steps=0, limit_val_batches=0)


# -- pure statistics ---------------------------------------------------------------------------------------------------
def test_win_rate_counts_ties_half() -> None:
    outcomes = pairwise_outcomes([3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 5.0, 0.0])
    assert outcomes.tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate([3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 5.0, 0.0]) == pytest.approx(2.5 / 4)
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    with pytest.raises(ValueError, match="two"):
        pairwise_outcomes([1.0, 2.0], [1.0])


def test_bootstrap_ci_is_seeded_brackets_the_mean_and_is_degenerate_on_constants() -> None:
    values = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5]
    low, high = bootstrap_ci(values, resamples=500, seed=3)
    assert (low, high) == bootstrap_ci(values, resamples=500, seed=3)
    assert low < np.mean(values) < high and low >= 0.0 and high <= 1.0
    narrow = bootstrap_ci(values, resamples=500, confidence=0.5, seed=3)
    assert low <= narrow[0] <= narrow[1] <= high
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)


@pytest.mark.parametrize("p", [0.5, 0.7])
def test_bootstrap_ci_covers_the_true_win_rate_about_95_percent_of_the_time(p: float) -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        samples = (rng.random(100) < p).astype(float)  # 100 prompts won (1) or lost (0) with probability p
        low, high = bootstrap_ci(samples, resamples=1000, confidence=0.95, seed=rep)
        covered += low <= p <= high
    assert 0.9 <= covered / 200 <= 0.99


def _report(win: tuple[float, float, float], kl: tuple[float, float]) -> dict:
    score = {"mean": 0.0, "std": 1.0}
    policy = {
        "name": "ppo",
        "scores": {"reward_model": score},
        "win_rate": {"reward_model": dict(zip(("win_rate", "ci_low", "ci_high"), win))},
        "kl": dict(zip(("k1", "k3"), kl)),
        "response_tokens": 20.0,
        "eos_rate": 0.5,
    }
    baseline = {
        **policy,
        "name": "baseline",
        "is_baseline": True,
        "win_rate": {},
        "kl": {"k1": 0.0, "k3": 0.0},
    }
    return {
        "judges": ["reward_model"],
        "bootstrap": {"confidence": 0.95},
        "n_with_answer": 0,
        "n_prompts": 26,
        "baseline": "sft.ckpt",
        "reference": "sft.ckpt",
        "policies": [baseline, policy],
    }


def test_table_says_in_words_when_a_result_is_no_difference_or_a_negative_kl_is_noise() -> None:
    """The tiny PPO run's reading: win rate 0.462 [0.269, 0.654] and KL k1 -0.182 (k3 0.020) get a word why."""
    table = format_table(_report((0.462, 0.269, 0.654), (-0.182, 0.020)))
    assert "ppo: no measurable difference from the baseline under reward_model" in table
    assert "[0.269, 0.654] contains 0.5" in table
    assert "ppo: KL k1 -0.182 < 0 is sampling noise" in table and "k3, never negative, is 0.020" in table
    clear = format_table(_report((0.885, 0.812, 0.958), (5.163, 4.197)))
    assert "no measurable difference" not in clear and "sampling noise" not in clear


# -- checkpoints ---------------------------------------------------------------------------------------------------------
def _fit_sft(root: Path, tokenizer_path: str, steps: int, **kwargs) -> str:
    torch.manual_seed(0)
    data = SFTDataModule(tokenizer_path=tokenizer_path, max_length=96, batch_size=8, **kwargs)
    module = SFTModule(model=ModelArgs(preset="tiny", dropout=0.0), init_from=kwargs.pop("init_from", None))
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    trainer = _trainer(root, max_steps=steps)
    trainer.fit(module, datamodule=data)
    path = root / "policy.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_tokenizer) -> str:
    return _fit_sft(tmp_path_factory.mktemp("eval_sft"), tiny_tokenizer.source, steps=10, val_fraction=0.1)


@pytest.fixture(scope="module")
def brief_checkpoint(tmp_path_factory, tiny_tokenizer, sft_checkpoint) -> str:
    """The SFT policy fine-tuned on one-word replies to the shipped prompts: it stops much sooner."""
    root = tmp_path_factory.mktemp("eval_brief")
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:64]]
    data = root / "brief.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": "Sure."}) + "\n" for r in rows))
    torch.manual_seed(0)
    module = SFTModule(model=ModelArgs(preset="tiny", dropout=0.0), init_from=sft_checkpoint)
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3)
    loader = SFTDataModule(
        train_path=str(data),
        tokenizer_path=tiny_tokenizer.source,
        max_length=96,
        batch_size=8,
        val_fraction=0.0,
    )
    trainer = _trainer(root, max_steps=40)  # 5 epochs of the 64 one-word replies: it reliably stops sooner
    trainer.fit(module, datamodule=loader)
    path = root / "brief.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory, tiny_tokenizer, sft_checkpoint) -> str:
    torch.manual_seed(1)
    module = RewardModule(init_from=sft_checkpoint, tokenizer_path=tiny_tokenizer.source)
    module.configure_model()
    module.reward_model.set_score_stats(0.25, 2.0)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("eval_reward") / "reward.ckpt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def prompts() -> list[PromptRow]:
    return read_prompts(PROMPTS, limit=24)


# -- evaluate() ----------------------------------------------------------------------------------------------------------
def test_policy_against_itself_wins_half_with_zero_kl(sft_checkpoint, reward_checkpoint, prompts) -> None:
    answered = [PromptRow(p.messages, {"answer": "4"}) if i < 4 else p for i, p in enumerate(prompts)]
    result = evaluate(
        [sft_checkpoint],
        sft_checkpoint,
        answered,
        reward_model=reward_checkpoint,
        functions=[BREVITY],
        args=ARGS,
        names=["same"],
    )
    report = result.report
    base, same = report["policies"]
    assert base["is_baseline"] and report["judges"] == ["reward_model", "brevity"]
    for judge in ("reward_model", "brevity"):
        win = same["win_rate"][judge]
        assert (
            win["win_rate"] == 0.5 and win["ties"] == len(prompts) and win["ci_low"] == win["ci_high"] == 0.5
        )
        assert same["scores"][judge] == base["scores"][judge]
    assert same["kl"] == {"k1": 0.0, "k3": 0.0} and base["kl"] == {"k1": 0.0, "k3": 0.0}
    assert 1 <= same["response_tokens"] <= 16 and 0.0 <= same["eos_rate"] <= 1.0
    assert [s["same"] for s in result.samples] == [s["baseline"] for s in result.samples]
    expected = np.mean(
        [gsm8k_correct(p.messages, s["same"], p.extra) for p, s in zip(answered[:4], result.samples)]
    )
    assert report["n_with_answer"] == 4 and same["gsm8k_accuracy"] == expected


def test_policy_trained_towards_brevity_beats_its_sft_start_under_that_rule(
    sft_checkpoint, brief_checkpoint, reward_checkpoint, prompts, tmp_path
) -> None:
    result = evaluate(
        [brief_checkpoint],
        sft_checkpoint,
        prompts,
        reward_model=reward_checkpoint,
        functions=[BREVITY],
        args=ARGS,
    )
    base, brief = result.report["policies"]
    assert brief["name"] == "eval_brief0/brief"
    win = brief["win_rate"]["brevity"]
    assert win["win_rate"] > 0.5 and win["ci_low"] > 0.5, win
    assert brief["response_tokens"] < base["response_tokens"] and brief["eos_rate"] > base["eos_rate"]
    assert brief["kl"]["k1"] != 0.0 and brief["kl"]["k3"] > 0.0
    assert brief["scores"]["brevity"]["mean"] > base["scores"]["brevity"]["mean"]

    paths = write_evaluation(result, tmp_path / "out", sample_rows=3)
    assert {p.name for p in paths.values()} == {
        "evaluation.json",
        "evaluation.md",
        "evaluation.png",
        "samples.csv",
        "samples.md",
    }
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(result.report))
    table = paths["md"].read_text()
    assert table.strip() == format_table(result.report).strip()
    assert f"{win['win_rate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}]" in table
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(prompts) and float(rows[0]["eval_brief0/brief/brevity"]) == pytest.approx(
        result.samples[0]["eval_brief0/brief/brevity"]
    )
    assert len(paths["samples_md"].read_text().strip().splitlines()) == 2 + 3
    assert paths["png"].stat().st_size > 1000


# -- the command -------------------------------------------------------------------------------------------------------
def test_evaluate_command_writes_the_report_with_pairwise_accuracy(
    sft_checkpoint, reward_checkpoint, tmp_path, capsys
) -> None:
    out, pairs = tmp_path / "eval", tmp_path / "pairs.jsonl"
    pairs.write_text("".join(PREFERENCES.read_text().splitlines(keepends=True)[:12]))
    policy = ["--policies", sft_checkpoint, "--baseline", sft_checkpoint, "--prompts", str(PROMPTS)]
    sampling = ["--num_prompts", "6", "--max_new_tokens", "6", "--greedy", "true", "--resamples", "50"]
    judge = ["--reward_model", reward_checkpoint, "--preferences", str(pairs), "--output_dir", str(out)]
    cli_main(["evaluate", *policy, *sampling, *judge])
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_prompts"] == 6 and report["generation"]["do_sample"] is False
    pairwise = report["reward_model_pairwise_accuracy"]
    assert pairwise["pairs"] == 12 and 0.0 <= pairwise["accuracy"] <= 1.0
    assert "| policy |" in printed and "Reward model pairwise accuracy" in printed
    assert (out / "evaluation.png").is_file() and (out / "samples.csv").is_file()


@pytest.mark.parametrize(
    "content, located",
    [
        (
            '{"prompt": "Hi"}\n{"prompt": [{"role": "assistant", "content": "x"}]}\n',
            ", line 2, field 'prompt'",
        ),
        ('{"prompt": "Hi"}\n{"question": "no prompt"}\n', ", line 2, field 'prompt': missing"),
        ('{"prompt": "Hi"}\nnot json\n', ", line 2: not valid JSON"),
    ],
)
def test_bad_prompts_file_gives_one_located_line(tmp_path, capsys, content: str, located: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:  # fails before any checkpoint is read
        cli_main(["evaluate", "--policies", "nowhere", "--baseline", "nowhere", "--prompts", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}{located}") and "\n" not in err


def test_evaluate_command_without_a_judge_says_so(sft_checkpoint, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(
            [
                "evaluate",
                "--policies",
                sft_checkpoint,
                "--baseline",
                sft_checkpoint,
                "--prompts",
                str(PROMPTS),
            ]
        )
    assert "error: no judge" in capsys.readouterr().err


# -- the pipeline's closing evaluation ---------------------------------------------------------------------------------
def _pipeline(tmp_path: Path, **overrides) -> RLHFPipeline:
    config = RLHFConfig.from_yaml(REPO / "configs" / "pipeline_tiny.yaml")
    config.save_dir, config.logger, config.eval_prompts = str(tmp_path / "run"), "csv", 6
    for key, value in overrides.items():
        setattr(config, key, value)
    return RLHFPipeline(config)


def test_pipeline_evaluates_sft_against_ppo_on_held_out_prompts(
    sft_checkpoint, brief_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path
) -> None:
    pipe = _pipeline(tmp_path, tokenizer_path=tiny_tokenizer.source)
    entry = pipe._evaluate({"sft": sft_checkpoint, "reward": reward_checkpoint, "ppo": brief_checkpoint})
    assert "error" not in entry, entry
    folder = tmp_path / "run" / "evaluation"
    report = json.loads((folder / "evaluation.json").read_text())
    assert report["n_prompts"] == 6 and report["judges"] == [
        "reward_model"
    ]  # the PPO DataModule's val prompts
    assert report["generation"]["max_new_tokens"] == 24  # the PPO stage's sampling settings
    assert [p["name"] for p in entry["policies"]] == ["baseline", "ppo"] and entry["table"].startswith(
        "| policy |"
    )
    assert {"evaluation.md", "evaluation.png", "samples.csv"} <= {p.name for p in folder.iterdir()}


def test_a_failing_evaluation_is_reported_and_keeps_the_checkpoints(
    sft_checkpoint, reward_checkpoint, tiny_tokenizer, tmp_path, capsys
) -> None:
    pipe = _pipeline(
        tmp_path, tokenizer_path=tiny_tokenizer.source, ppo_val_path=str(tmp_path / "missing.jsonl")
    )
    entry = pipe._evaluate({"sft": sft_checkpoint, "reward": reward_checkpoint, "ppo": sft_checkpoint})
    assert "missing.jsonl" in entry["error"] and Path(sft_checkpoint).is_file()
    assert "evaluation failed" in capsys.readouterr().out


def test_long_prompts_keep_their_end_by_whole_rendered_turns(tiny_tokenizer) -> None:
    """A prompt longer than max_prompt_length is cut like the PPO DataModule cuts it (whole turns from the left)."""
    from rlhf_lightning.data.formats import PromptRow
    from rlhf_lightning.evaluation import _render

    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question {i} " * 6},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    row = PromptRow(messages=[*turns, {"role": "user", "content": "the last question"}])
    full = tiny_tokenizer.render_prompt(row.messages)
    limit = len(full) // 2
    (ids,) = _render(tiny_tokenizer, [row], limit)
    assert len(ids) <= limit
    kept = [row.messages[i:] for i in range(len(row.messages))]
    # exactly the rendering of the latest turns (which end with the last question), never a cut token sequence
    assert any(ids == tiny_tokenizer.render_prompt(m) for m in kept[1:])
