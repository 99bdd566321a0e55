"""``benchmarks/ppo_iteration.py`` end to end on the tiny preset: the JSON has the phase split and, with
``--profile``, the milliseconds inside each rollout and update label of the stage (so a profile of an iteration stays
one command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ppo_iteration_benchmark_profiles_the_phases_of_an_iteration() -> None:
    args = "--preset tiny --vocab 512 --batch 4 --new-tokens 4 --epochs 1 --minibatch 2 --max-prompt-len 32"
    args += " --iterations 1 --warmup 1 --profile --micro-batch-tokens 40 --share-value-trunk"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ppo_iteration.py"), *args.split()],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    ).stdout
    result = json.loads(out[out.index("{") :])
    assert result["iterations_measured"] == 1 and result["micro_batch_tokens"] == 40
    assert result["share_value_trunk"] is True and result["cpu_seconds_per_iteration"] > 0
    phases = result["profile_ms_per_iteration"]
    for label in ("rollout/generate", "rollout/policy_forward", "rollout/reference_forward", "rollout/score"):
        assert label in phases, phases
    for label in ("ppo/forward", "ppo/backward", "ppo/optimizer_step"):
        assert label in phases, phases
    assert (
        "rollout/value_forward" not in phases
    )  # the shared value head took its values from the policy's forward
