"""PNG plots of each stage's training curves, read from the ``metrics.csv`` a stage's CSVLogger writes.

- ``sft``: train and validation loss;
- ``reward``: train and validation loss, training (``reward/accuracy``, per batch, with a smoothed line over it) and
  validation accuracy;
- ``ppo``: reward-model score, KL to the reference and response length per iteration (held-out ``val/*`` as dots);
- ``grpo`` and ``rloo``: score, KL to the reference, response length and clip fraction per iteration;
- ``ppo``, ``grpo``, ``rloo`` with held-out judges (``val/judge/<name>``): a panel of them next to the score;
- ``dpo``: train and validation loss, pair accuracy, margin and the implicit rewards of chosen and rejected replies.

``save_evaluation_plot`` draws an ``rlhf-lightning evaluate`` report (win rate with its interval, judge scores, KL,
reply length per policy) into ``evaluation.png``.

The pipeline calls :func:`save_run_plots` after every stage, giving ``<save_dir>/plots/<stage>.png``. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot), so plotting never changes a notebook's or GUI's backend.
Missing metrics are skipped; a stage without any of its metrics gets no plot. Per-batch accuracies (:data:`SMOOTHED`)
are drawn faint with a trailing moving average (:func:`smooth`) on top: a batch of 8 pairs moves accuracy in steps of
1/8, which hides the trend. Iteration axes (PPO, GRPO, RLOO) get integer ticks only.
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
    "dpo": [
        ("loss", [("train/loss", "train"), ("val/loss", "val")]),
        ("pair accuracy", [("train/accuracy", "train"), ("val/accuracy", "val")]),
        ("margin (chosen - rejected)", [("train/margin", "train"), ("val/margin", "val")]),
        (
            "implicit rewards",
            [
                ("train/reward_chosen", "chosen"),
                ("train/reward_rejected", "rejected"),
                ("val/reward_chosen", "chosen, val"),
                ("val/reward_rejected", "rejected, val"),
            ],
        ),
    ],
}
# GRPO and RLOO (stages/grpo.py): the same rollout curves as PPO, the score being any mix of reward model and rules
PANELS["grpo"] = PANELS["rloo"] = [
    ("score", [("rollout/score_mean", "rollout"), ("val/score", "held-out")]),
    *PANELS["ppo"][1:],
    ("clip fraction", [("grpo/clipfrac", "update")]),
]
# PPO's and GRPO's held-out judges (``val/judge/<name>``): a panel of their own beside the score panel, so a score
# that rises while a judge falls (over-optimisation) shows at a glance
JUDGE_PREFIX = "val/judge/"
JUDGES_PANEL = "held-out judges (not optimised)"
# per-batch accuracies: drawn faint, with a smoothed line on top
SMOOTHED: frozenset[str] = frozenset({"reward/accuracy", "train/accuracy"})
SMOOTH_WINDOW_FRACTION = 0.2  # the moving-average window: a fifth of the logged points, at least 3
X_LABEL = {
    "sft": "step",
    "reward": "step",
    "ppo": "iteration",
    "dpo": "step",
    "grpo": "iteration",
    "rloo": "iteration",
}


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


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``."""
    if window < 1:
        raise ValueError(f"window={window}; expected >= 1")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_stage(stage: str, metrics: dict[str, Series], title: str | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` of ``stage``'s panels (:data:`PANELS`), or None when no metric is there."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(name, [c for c in curves if c[0] in metrics]) for name, curves in PANELS[stage]]
    judges = [
        (key, key.removeprefix(JUDGE_PREFIX)) for key in sorted(metrics) if key.startswith(JUDGE_PREFIX)
    ]
    if judges:  # held-out judges (PPO/GRPO ``judges``), right after the optimised score they keep an eye on
        panels.insert(1, (JUDGES_PANEL, judges))
    panels = [(name, curves) for name, curves in panels if curves]
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 3.4), layout="constrained")
    for ax, (name, curves) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key, label in curves:
            xs, ys = metrics[key]
            style = {"marker": "o", "markersize": 4} if key.startswith("val/") or len(xs) < 12 else {}
            if key in SMOOTHED and len(ys) > 2:
                window = min(len(ys), max(3, round(len(ys) * SMOOTH_WINDOW_FRACTION)))
                (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8, label=f"{label} ({key}), per batch")
                ax.plot(xs, smooth(ys, window), color=raw.get_color(), label=f"{label}, mean of {window}")
            else:
                ax.plot(xs, ys, label=f"{label} ({key})", **style)
        ax.set_title(name)
        ax.set_xlabel(X_LABEL[stage])
        if X_LABEL[stage] == "iteration":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or stage)
    return fig


def save_stage_plot(
    stage: str, metrics_csv: str | Path, out: str | Path, title: str | None = None
) -> Path | None:
    """Plot ``stage``'s curves from ``metrics_csv`` into the PNG ``out``; None when there was nothing to plot."""
    return _save(plot_stage(stage, read_metrics(metrics_csv), title), out)


def _save(fig: Any, out: str | Path) -> Path | None:
    """Write ``fig`` as the PNG ``out`` (folders created); None when there is no figure."""
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


def plot_evaluation(report: dict[str, Any]) -> Any:
    """A ``matplotlib.figure.Figure`` of an ``rlhf-lightning evaluate`` report (``evaluation.evaluate``): win rate
    against the baseline per judge with its confidence interval (0.5 = no better), each judge's mean score ± std, KL
    to the reference (k1) and reply length, one bar per policy. None when the report holds no policy."""
    from matplotlib.figure import Figure

    entries = report.get("policies", [])
    if not entries:
        return None
    names = [e["name"] for e in entries]
    judges = report.get("judges", [])
    fig = Figure(figsize=(4.2 * 4 + 0.6, 3.6), layout="constrained")
    win_ax, score_ax, kl_ax, len_ax = fig.subplots(1, 4)
    width = 0.8 / max(1, len(judges))
    challengers = [e for e in entries if not e.get("is_baseline")]
    for j, judge in enumerate(judges):
        wins = [e["win_rate"][judge] for e in challengers]
        xs = [i + j * width for i in range(len(challengers))]
        rates = [w["win_rate"] for w in wins]
        errors = [
            [r - w["ci_low"] for r, w in zip(rates, wins)],
            [w["ci_high"] - r for r, w in zip(rates, wins)],
        ]
        win_ax.bar(xs, rates, width, yerr=errors, capsize=3, label=judge)
        scores = [e["scores"][judge] for e in entries]
        xs = [i + j * width for i in range(len(entries))]
        score_ax.bar(
            xs, [s["mean"] for s in scores], width, yerr=[s["std"] for s in scores], capsize=3, label=judge
        )
    win_ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    win_ax.set_ylim(0, 1)
    level = report.get("bootstrap", {}).get("confidence", 0.95)
    panels = [
        (win_ax, f"win rate vs baseline ({level:.0%} CI)", [e["name"] for e in challengers], len(judges)),
        (score_ax, "judge score (mean ± std)", names, len(judges)),
        (kl_ax, "KL to reference (k1, nats/reply)", names, 1),
        (len_ax, "reply length (tokens)", names, 1),
    ]
    kl_ax.bar(range(len(entries)), [(e["kl"] or {}).get("k1", float("nan")) for e in entries], 0.6)
    len_ax.bar(range(len(entries)), [e["response_tokens"] for e in entries], 0.6)
    for ax, title, labels, groups in panels:
        offset = width * (groups - 1) / 2 if groups > 1 else 0.0
        ax.set_xticks([i + offset for i in range(len(labels))], labels, rotation=20, fontsize="small")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        if groups > 1:
            ax.legend(fontsize="small")
    baseline = _shown_path(str(report.get("baseline", "?")))
    fig.suptitle(f"evaluation on {report.get('n_prompts', '?')} prompts (baseline {baseline})")
    return fig


def _shown_path(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it (a shorter title, free of machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:  # elsewhere: shown as it is
        return path


def save_evaluation_plot(report: dict[str, Any], out: str | Path) -> Path | None:
    """Plot an evaluation report (:func:`plot_evaluation`) into the PNG ``out``; None when there was nothing to plot."""
    return _save(plot_evaluation(report), out)
