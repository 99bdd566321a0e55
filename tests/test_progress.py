"""PPOProgress: phases from the PPO networks' forwards, a status line on a TTY, quiet lines off a TTY."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.callbacks import PPOProgress


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))


def _run(progress: PPOProgress, iterations: int) -> list[str]:
    """Drive the callback through ``iterations`` fake PPO iterations; return the phases seen in each."""
    module = SimpleNamespace(
        policy=_net(), reference=_net(), value_model=_net(), reward_model=_net(), ppo=None
    )
    trainer = SimpleNamespace(max_steps=iterations, is_global_zero=True, global_step=0, callback_metrics={})
    ids = torch.zeros(2, 3, dtype=torch.long)
    progress.on_fit_start(trainer, module)
    seen = []
    for _ in range(iterations):
        progress.on_train_batch_start(trainer, module, None, 0)
        phases = [progress.phase]
        with torch.no_grad():
            module.policy(ids)  # sampling
            phases.append(progress.phase)
            module.reference(ids)  # reference log-probs
            phases.append(progress.phase)
        module.policy(ids).sum().backward()  # update
        phases.append(progress.phase)
        seen.append(",".join(phases))
        trainer.global_step += 1
        trainer.callback_metrics = {
            "time/generated_tokens_per_sec": torch.tensor(123.0),
            "rollout/score_mean": torch.tensor(0.5),
            "rollout/kl": torch.tensor(0.01),
        }
        progress.on_train_batch_end(trainer, module, None, None, 0)
    progress.on_fit_end(trainer, module)
    return seen


def test_phases_follow_the_networks_forwards() -> None:
    seen = _run(PPOProgress(log_every_n=0, stream=io.StringIO()), 2)
    assert seen == ["generation,generation,scoring,update"] * 2


def test_tty_rewrites_one_status_line() -> None:
    stream = _TTY()
    _run(PPOProgress(stream=stream), 3)
    out = stream.getvalue()
    assert out.count("\r") >= 9 and out.endswith("\n") and out.count("\n") == 1
    for text in ("generation", "scoring", "update", "iteration 3/3", "123 tok/s", "score +0.500"):
        assert text in out


@pytest.mark.parametrize(("every", "lines"), [(0, 0), (10, 1), (2, 2)])
def test_non_tty_is_quiet(every: int, lines: int) -> None:
    stream = io.StringIO()
    _run(PPOProgress(log_every_n=every, stream=stream), 4)
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    assert len(out.splitlines()) == lines  # every=10: only the last iteration; every=2: iterations 2 and 4
    if lines:
        assert out.splitlines()[-1].startswith("[ppo] iteration 4/4 | done | 123 tok/s")
