"""WarmupCosineLR against hand-worked numbers, and bind_total_steps."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.optim import WarmupCosineLR, bind_total_steps


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler: WarmupCosineLR, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_hand_numbers() -> None:
    # warmup 2 of 10 steps, floor 10%: warm-up (s+1)/3, then 0.1 + 0.9 * (1 + cos(pi * (s-2)/8)) / 2
    sched = WarmupCosineLR(_optimizer(1.0), warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    lrs = _lrs(sched, 11)
    expected = [
        1 / 3,
        2 / 3,
        1.0,  # peak right after warm-up
        0.1 + 0.45 * (1 + math.cos(math.pi / 8)),  # 0.965755
        0.1 + 0.45 * (1 + math.cos(math.pi / 4)),  # 0.868198
        0.1 + 0.45 * (1 + math.cos(3 * math.pi / 8)),  # 0.722215
        0.55,  # half way through the decay
        0.1 + 0.45 * (1 + math.cos(5 * math.pi / 8)),
        0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)),
        0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)),
        0.1,  # the floor at the end
    ]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert lrs[4] == pytest.approx(0.868198, abs=1e-6)
    assert _lrs(sched, 3) == pytest.approx([0.1] * 3)  # stays at the floor past the end


def test_fractional_warmup_and_scaling_by_peak() -> None:
    # 0.25 of 8 steps = 2 warm-up steps; the peak lr scales every factor
    sched = WarmupCosineLR(_optimizer(0.5), warmup_steps=0.25, total_steps=8, min_lr_ratio=0.0)
    lrs = _lrs(sched, 9)
    assert lrs[:3] == pytest.approx([0.5 / 3, 1.0 / 3, 0.5])
    assert lrs[5] == pytest.approx(0.25)  # progress 3/6 = 0.5 -> half of the peak
    assert lrs[8] == pytest.approx(0.0, abs=1e-12)


def test_bind_total_steps_fills_in_the_length_and_the_first_rate() -> None:
    opt = _optimizer(1.0)
    sched = WarmupCosineLR(opt, warmup_steps=0.1, min_lr_ratio=0.1)
    bind_total_steps(sched, 20)
    assert sched.total_steps == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)  # warmup = 2 steps: (0 + 1) / (2 + 1)
    assert sched.get_last_lr() == pytest.approx([1 / 3])
    bind_total_steps(sched, 999)  # an explicit or already bound length is kept
    assert sched.total_steps == 20


def test_bind_total_steps_rejects_an_endless_run() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        bind_total_steps(WarmupCosineLR(_optimizer()), float("inf"))


def test_bind_total_steps_ignores_other_schedulers() -> None:
    opt = _optimizer()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    bind_total_steps(sched, 10)  # no error, nothing changed
    assert opt.param_groups[0]["lr"] == 1.0


def test_state_dict_round_trip_keeps_the_schedule() -> None:
    sched = WarmupCosineLR(_optimizer(), warmup_steps=2, total_steps=10)
    _lrs(sched, 4)
    other = WarmupCosineLR(_optimizer(), warmup_steps=0.5)
    other.optimizer.load_state_dict(sched.optimizer.state_dict())  # as Lightning restores both on resume
    other.load_state_dict(sched.state_dict())
    assert other.total_steps == 10 and other.warmup_steps == 2
    assert _lrs(other, 3) == pytest.approx(_lrs(sched, 3))


@pytest.mark.parametrize(
    "kwargs", [{"warmup_steps": -1}, {"min_lr_ratio": 1.5}, {"min_lr_ratio": -0.1}, {"total_steps": 0}]
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WarmupCosineLR(_optimizer(), **kwargs)
