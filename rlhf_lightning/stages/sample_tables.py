"""Log a table of samples with whichever logger the Trainer has.

W&B gets a ``wandb.Table``; other loggers get a CSV file ``<log_dir>/<key>.csv`` (rows appended), so users without
W&B still see what the model writes. Nothing is logged when the module has no Trainer or logger.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def log_table(module: Any, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log ``rows`` under ``key`` from rank zero."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.is_global_zero or not trainer.loggers:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
            continue
        log_dir = getattr(logger, "log_dir", None) or trainer.default_root_dir
        path = Path(log_dir) / f"{key.replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(columns)
            writer.writerows(rows)
