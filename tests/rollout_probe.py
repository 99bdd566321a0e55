"""A callback for subprocess runs (``--config`` with ``class_path: rollout_probe.RolloutProbe``, tests/ on PYTHONPATH):
each rank saves what its GRPO iteration sampled, so a test can check where every group lived and what each rank drew.

Writes ``$ROLLOUT_PROBE_DIR/rank<r>_step<s>.pt`` (the step counted after the iteration, so the first is 1): the prompt
rows this rank loaded (``index``, ``input_ids``, ``attention_mask``) and the rollout's query/response tokens and scores
(``GRPOModule.training_step`` returns ``{"rollout": ...}``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Callback


class RolloutProbe(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = outputs["rollout"]
        record = {
            "index": batch.index,
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "query_ids": rollout.query_ids,
            "query_mask": rollout.query_mask,
            "response_ids": rollout.response_ids,
            "response_mask": rollout.response_mask,
            "scores": rollout.scores,
        }
        folder = Path(os.environ["ROLLOUT_PROBE_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {k: v.detach().cpu() for k, v in record.items()},
            folder / f"rank{trainer.global_rank}_step{trainer.global_step}.pt",
        )
