"""Log a table of samples with whichever loggers the Trainer has.

- W&B (any ``WandbLogger``): a ``wandb.Table`` under ``key`` (one table per logging step);
- TensorBoard: a Markdown table as text under ``key`` (the TEXT tab), at the global step;
- CSV and any other logger: rows appended to ``<log_dir>/<key with / as _>.csv`` (a ``step`` column first), so users
  without W&B still see what the model writes.

Nothing is logged when the module has no Trainer or logger, and only rank zero logs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def table_csv_path(log_dir: str | Path, key: str) -> Path:
    """The CSV file that rows logged under ``key`` go to in ``log_dir``."""
    return Path(log_dir) / f"{key.replace('/', '_')}.csv"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """``rows`` as a Markdown table (pipes and newlines in cells escaped), for TensorBoard's text plugin."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_table(module: Any, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log ``rows`` (lists matching ``columns``) under ``key`` to every logger of ``module``'s Trainer, from rank zero."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.is_global_zero or not trainer.loggers:
        return
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
        else:
            log_dir = getattr(logger, "log_dir", None) or trainer.default_root_dir
            path = table_csv_path(log_dir, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["step", *columns])
                writer.writerows([step, *row] for row in rows)
