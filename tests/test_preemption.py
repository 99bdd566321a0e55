"""SIGTERM / SIGINT during a stage: a resumable last.ckpt, exit 128 + signal, the stage left unfinished, and a rerun
that resumes (real signals sent to ``rlhf-lightning fit`` and ``pipeline`` subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "data" / "hh_rlhf" / "sft_train.jsonl"


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until ``folder`` holds a file matching ``pattern`` (a training step has run)."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no {pattern} in {folder}"
        time.sleep(0.05)


def _fit_config(tmp_path: Path, tokenizer: str) -> Path:
    """The SFT smoke config, long enough to be interrupted, saving a step checkpoint every step but no last.ckpt
    (so a last.ckpt can only come from the interruption)."""
    config = yaml.safe_load((REPO / "configs" / "sft_tiny.yaml").read_text())
    config["trainer"].update(max_epochs=None, max_steps=10_000, limit_train_batches=None, limit_val_batches=0)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    config["trainer"]["callbacks"][0]["init_args"] = {
        "dirpath": str(tmp_path / "checkpoints"),
        "every_n_train_steps": 1,
        "save_top_k": 1,
        "save_last": False,
        "filename": "step-{step}",
    }
    config["data"]["init_args"].update(train_path=str(SFT_DATA), tokenizer_path=tokenizer)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_lightning.cli", "fit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    "signum, status",
    [
        (signal.SIGTERM, 143),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],  # SIGINT: the same path
)
def test_fit_stops_on_signal_with_a_resumable_checkpoint(tmp_path, tiny_tokenizer, signum, status):
    config = _fit_config(tmp_path, tiny_tokenizer.source)
    proc = _fit("--config", str(config))
    _wait_for("step-*.ckpt", tmp_path / "checkpoints", proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, out
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file(), out
    assert f"stopped by {signal.Signals(signum).name}" in out and "--ckpt_path" in out
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= step < 10_000
    rerun = _fit("--config", str(config), "--ckpt_path", str(last), "--trainer.max_steps", str(step + 2))
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    assert f"Restored all states from the checkpoint at {last}" in out


@pytest.mark.slow  # about a minute: run with -m slow
def test_pipeline_sigterm_leaves_the_stage_unfinished_and_a_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    common = [
        "--config", str(REPO / "configs" / "pipeline_tiny.yaml"), "--save_dir", str(run),
        "--tokenizer_path", str(run / "tokenizer.json"), "--logger", "csv", "--stages", "sft",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def pipeline(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "rlhf_lightning.pipeline", *common, *extra]
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    proc = pipeline("--sft_epochs", "500")  # far longer than the test waits
    _wait_for("*.ckpt", run / "sft" / "checkpoints", proc)  # the first epoch (and its validation) has run
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "[sft] stopped by SIGTERM" in out
    last = run / "sft" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (run / "sft" / "done.json").exists()
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    rerun = pipeline("--sft_epochs", str(epoch + 2))  # the same command, shortened so that it finishes soon
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"sft: resuming from {last}" in out
    assert (run / "sft" / "done.json").is_file()


@pytest.mark.slow  # three 2-process runs: about two minutes
def test_ddp_run_killed_by_sigterm_on_one_rank_saves_and_resumes_to_the_uninterrupted_weights(
    tmp_path, tiny_tokenizer
):
    """SFT on 2 gloo DDP processes; SIGTERM reaches the launching process (rank 0) only. Both ranks stop after the
    same batch, last.ckpt is written and the launcher exits 143 (no rank left waiting on the other); the resumed run
    then ends with the weights of a run never interrupted (same schedule, same batches on each rank)."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    ddp += ["--model.init_args.model.dropout=0.0", "--model.init_args.scheduler.init_args.total_steps=10000"]
    env = {"OMP_NUM_THREADS": "1"}
    config = _fit_config(tmp_path, tiny_tokenizer.source)
    proc = _fit("--config", str(config), *ddp, env=env)
    _wait_for("step-*.ckpt", tmp_path / "checkpoints", proc)
    proc.send_signal(signal.SIGTERM)  # the launcher is rank 0; rank 1, its child, gets no signal
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out
    last = tmp_path / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= step < 10_000
    end = str(step + 3)
    rerun = _fit("--config", str(config), *ddp, "--ckpt_path", str(last), "--trainer.max_steps", end, env=env)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"Restored all states from the checkpoint at {last}" in out
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = _fit(
        "--config",
        str(_fit_config(straight_dir, tiny_tokenizer.source)),
        *ddp,
        "--trainer.max_steps",
        end,
        env=env,
    )
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    (resumed,) = [
        torch.load(p, map_location="cpu", weights_only=False) for p in tmp_path.glob("checkpoints/step-*")
    ]
    (expected,) = [
        torch.load(p, map_location="cpu", weights_only=False) for p in straight_dir.glob("checkpoints/step-*")
    ]
    assert resumed["global_step"] == expected["global_step"] == step + 3
    for name, weight in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, atol=1e-6, rtol=1e-5, msg=name)
