"""Plots: PNGs of each stage's curves from Lightning metrics.csv files, readable as images."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from rlhf_lightning.plots import PANELS, read_metrics, save_run_plots, stage_metrics_csv


def _write_metrics(path: Path, keys: list[str], steps: int) -> None:
    """A metrics.csv shaped like Lightning's: train rows and sparse validation rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", *keys])
        for step in range(steps):
            writer.writerow(
                [0, step, *[("" if k.startswith("val/") and step % 3 else 1.0 / (step + 1)) for k in keys]]
            )


def test_read_metrics_skips_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    _write_metrics(path, ["train/loss", "val/loss"], 6)
    metrics = read_metrics(path)
    assert metrics["train/loss"][0] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert metrics["val/loss"][0] == [0.0, 3.0]


def test_save_run_plots_writes_readable_pngs(tmp_path: Path) -> None:
    image = pytest.importorskip("matplotlib.image")
    for stage, panels in PANELS.items():
        keys = [key for _, curves in panels for key, _ in curves]
        _write_metrics(stage_metrics_csv(tmp_path, stage), keys, 10)
    written = save_run_plots(tmp_path)
    assert [p.name for p in written] == [
        "sft.png",
        "reward.png",
        "ppo.png",
        "dpo.png",
        "grpo.png",
        "rloo.png",
    ]
    for png in written:
        assert png.parent == tmp_path / "plots" and png.stat().st_size > 5000
        pixels = image.imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.std() > 0.01  # not a blank canvas


def test_stage_without_its_metrics_gets_no_plot(tmp_path: Path) -> None:
    _write_metrics(stage_metrics_csv(tmp_path, "ppo"), ["something/else"], 3)
    assert save_run_plots(tmp_path) == []


@pytest.mark.parametrize(
    "stage, keys, titles, x_label",
    [
        (
            "dpo",
            ["train/loss", "val/loss", "train/accuracy", "train/margin", "val/reward_chosen"],
            ["loss", "pair accuracy", "margin (chosen - rejected)", "implicit rewards"],
            "step",
        ),
        (
            "grpo",
            ["rollout/score_mean", "val/score", "rollout/kl", "rollout/response_len", "grpo/clipfrac"],
            ["score", "KL to reference", "response length (tokens)", "clip fraction"],
            "iteration",
        ),
    ],
)
def test_dpo_and_grpo_panels(
    tmp_path: Path, stage: str, keys: list[str], titles: list[str], x_label: str
) -> None:
    pytest.importorskip("matplotlib")
    from rlhf_lightning.plots import plot_stage

    _write_metrics(tmp_path / "metrics.csv", keys, 6)
    fig = plot_stage(stage, read_metrics(tmp_path / "metrics.csv"))
    assert [ax.get_title() for ax in fig.axes] == titles
    assert {ax.get_xlabel() for ax in fig.axes} == {x_label}


def test_smooth_is_a_trailing_mean() -> None:
    from rlhf_lightning.plots import smooth

    assert smooth([0.0, 1.0, 0.0, 1.0, 1.0], 2) == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert smooth([4.0, 2.0], 5) == [4.0, 3.0]
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_reward_accuracy_is_smoothed_and_validation_points_kept(tmp_path: Path) -> None:
    """Per-batch training accuracy (steps of 1/8) is drawn faint under its moving average; every val point is a dot."""
    pytest.importorskip("matplotlib")
    from rlhf_lightning.plots import plot_stage

    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "reward/accuracy", "val/accuracy"])
        for step in range(20):
            writer.writerow([0, step, step % 2, ""])  # alternating 0/1: smoothed, it hovers near 0.5
            if step % 5 == 4:
                writer.writerow([0, step, "", 0.5 + step / 100])
    fig = plot_stage("reward", read_metrics(path))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    raw = lines["train (reward/accuracy), per batch"]
    smoothed = lines["train, mean of 4"]
    assert raw.get_alpha() == 0.3 and smoothed.get_color() == raw.get_color()
    assert list(smoothed.get_ydata())[3:] == [0.5] * 17
    assert list(lines["val (val/accuracy)"].get_xdata()) == [4.0, 9.0, 14.0, 19.0]


def test_iteration_axes_have_integer_ticks(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rlhf_lightning.plots import plot_stage

    _write_metrics(tmp_path / "metrics.csv", ["rollout/score_mean", "rollout/kl"], 3)  # iterations 0, 1, 2
    fig = plot_stage("ppo", read_metrics(tmp_path / "metrics.csv"))
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_reward_config_validates_more_than_twice(repo_root: Path) -> None:
    import yaml

    interval = yaml.safe_load((repo_root / "configs" / "reward.yaml").read_text())["trainer"][
        "val_check_interval"
    ]
    assert isinstance(interval, float) and 1 / interval > 2


@pytest.mark.parametrize("stage, score_panel", [("ppo", "reward-model score"), ("grpo", "score")])
def test_held_out_judges_get_a_panel_beside_the_score(tmp_path: Path, stage: str, score_panel: str) -> None:
    pytest.importorskip("matplotlib")
    from rlhf_lightning.plots import JUDGES_PANEL, plot_stage

    keys = ["rollout/score_mean", "val/score", "val/judge/brevity", "val/judge/contains_target", "rollout/kl"]
    _write_metrics(tmp_path / "metrics.csv", keys, 6)
    fig = plot_stage(stage, read_metrics(tmp_path / "metrics.csv"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == [score_panel, JUDGES_PANEL, "KL to reference"]
    judges = fig.axes[1]
    assert [line.get_label() for line in judges.get_lines()] == [
        "brevity (val/judge/brevity)",
        "contains_target (val/judge/contains_target)",
    ]
    _write_metrics(tmp_path / "plain.csv", ["rollout/score_mean", "val/score", "rollout/kl"], 6)
    assert JUDGES_PANEL not in [
        ax.get_title() for ax in plot_stage(stage, read_metrics(tmp_path / "plain.csv")).axes
    ]


def test_evaluation_chart_names_the_baseline_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    from rlhf_lightning.plots import plot_evaluation

    def report(baseline: str) -> dict:
        score = {"mean": 0.5, "std": 0.1}
        win = {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7}
        policies = [
            {
                "name": "baseline",
                "is_baseline": True,
                "scores": {"j": score},
                "kl": None,
                "response_tokens": 9.0,
            },
            {
                "name": "ppo",
                "scores": {"j": score},
                "win_rate": {"j": win},
                "kl": None,
                "response_tokens": 7.0,
            },
        ]
        return {"n_prompts": 4, "baseline": baseline, "judges": ["j"], "policies": policies}

    monkeypatch.chdir(tmp_path)
    inside = plot_evaluation(report(str(tmp_path / "run" / "sft" / "best.ckpt")))
    assert inside.get_suptitle() == "evaluation on 4 prompts (baseline run/sft/best.ckpt)"
    assert "/elsewhere/sft.ckpt" in plot_evaluation(report("/elsewhere/sft.ckpt")).get_suptitle()
