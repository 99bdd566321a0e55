"""PNG plots of each stage's training curves, read from the ``metrics.csv`` a stage's CSVLogger writes.

- ``sft``: train and validation loss;
- ``reward``: train and validation loss, training (``reward/accuracy``) and validation accuracy;
- ``ppo``: reward-model score, KL to the reference and response length per iteration (held-out ``val/*`` as dots).

The pipeline calls :func:`save_run_plots` after every stage, giving ``<save_dir>/plots/<stage>.png``. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot), so plotting never changes a notebook's or GUI's backend.
Missing metrics are skipped; a stage without any of its metrics gets no plot.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

Series = tuple[list[float], list[float]]

# stage -> panels; a panel is (title, [(metric key, label), ...])
PANELS: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "sft": [("loss", [("train/loss", "train"), ("val/loss", "val")])],
    "reward": [
        ("loss", [("train/loss", "train"), ("val/loss", "val")]),
        ("accuracy", [("reward/accuracy", "train"), ("val/accuracy", "val")]),
    ],
    "ppo": [
        ("reward-model score", [("rollout/score_mean", "rollout"), ("val/score", "held-out")]),
        ("KL to reference", [("rollout/kl", "rollout (k1)"), ("val/kl", "held-out")]),
        ("response length (tokens)", [("rollout/response_len", "rollout"), ("val/response_len", "held-out")]),
    ],
}
X_LABEL = {"sft": "step", "reward": "step", "ppo": "iteration"}


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Every metric column of a Lightning ``metrics.csv`` as ``(steps, values)``, empty cells skipped."""
    series: dict[str, Series] = {}
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(float(step))
                    ys.append(number)
    return series


def plot_stage(stage: str, metrics: dict[str, Series], title: str | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` of ``stage``'s panels (:data:`PANELS`), or None when no metric is there."""
    from matplotlib.figure import Figure

    panels = [(name, [c for c in curves if c[0] in metrics]) for name, curves in PANELS[stage]]
    panels = [(name, curves) for name, curves in panels if curves]
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 3.4), layout="constrained")
    for ax, (name, curves) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key, label in curves:
            xs, ys = metrics[key]
            style = {"marker": "o", "markersize": 4} if key.startswith("val/") or len(xs) < 12 else {}
            ax.plot(xs, ys, label=f"{label} ({key})", **style)
        ax.set_title(name)
        ax.set_xlabel(X_LABEL[stage])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or stage)
    return fig


def save_stage_plot(
    stage: str, metrics_csv: str | Path, out: str | Path, title: str | None = None
) -> Path | None:
    """Plot ``stage``'s curves from ``metrics_csv`` into the PNG ``out``; None when there was nothing to plot."""
    fig = plot_stage(stage, read_metrics(metrics_csv), title)
    if fig is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def stage_metrics_csv(run_dir: str | Path, stage: str) -> Path:
    """Where the pipeline's CSV logger writes ``stage``'s metrics: ``<run_dir>/<stage>/logs/metrics.csv``."""
    return Path(run_dir) / stage / "logs" / "metrics.csv"


def save_run_plots(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/plots/<stage>.png`` for every pipeline stage with metrics; returns the files written."""
    run_dir = Path(run_dir)
    written = []
    for stage in PANELS:
        csv_path = stage_metrics_csv(run_dir, stage)
        if csv_path.is_file():
            out = save_stage_plot(
                stage, csv_path, run_dir / "plots" / f"{stage}.png", f"{run_dir.name}: {stage}"
            )
            if out is not None:
                written.append(out)
    return written
