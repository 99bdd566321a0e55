"""SFT with LoRA -> reward model -> PPO with LoRA on a real pretrained chat model (SmolLM2-135M-Instruct).

Slow (about 30-60 minutes on a 2-core CPU: the reward stage is a full epoch) and needs the converted model folder:
set ``RLHF_SMOLLM2_PATH`` to it (README, "A real pretrained model") and run ``scripts/test -m slow -k smollm2``. Skipped otherwise.
The checks live in ``benchmarks/smollm2_pipeline.py`` (also runnable on its own).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("RLHF_SMOLLM2_PATH")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(7200),
    pytest.mark.skipif(
        not MODEL or not (Path(MODEL) / "config.json").is_file(),
        reason="set RLHF_SMOLLM2_PATH to a converted SmolLM2-135M-Instruct folder (see README)",
    ),
]


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "smollm2_pipeline", REPO / "benchmarks" / "smollm2_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_pipeline_kl0_reward_accuracy_and_ppo_gain(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = _benchmark().main(["--model", str(MODEL), "--save-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n  "figures"') :])
    checks, figures = report["checks"], report["figures"]
    assert checks["step0_kl_exactly_0"], figures
    assert checks["step0_ratio_is_1"], figures
    assert checks["reward_beats_untrained"], figures
    assert checks["ppo_score_up"], figures
    assert checks["ppo_kl_at_most_10"], figures
    assert code == 0
