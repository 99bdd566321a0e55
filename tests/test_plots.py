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
