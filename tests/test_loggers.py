"""Loggers: W&B mode decision, pipeline logger lists and grouping, and real tiny stage runs that log metrics and
sample tables to an offline W&B run, CSV files and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import run_stage_cli
from rlhf_lightning.loggers import finish_wandb, stage_loggers, wandb_mode
from rlhf_lightning.pipeline import RLHFConfig, RLHFPipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _never(host: str) -> bool:
    raise AssertionError("the network must not be probed without an API key")


@pytest.mark.parametrize(
    ("env", "reachable", "expected"),
    [
        ({}, _never, "offline"),  # no key: offline, no network probe
        (
            {"WANDB_MODE": "online"},
            _never,
            "offline",
        ),  # online asked but no key: offline, never a login prompt
        ({"WANDB_API_KEY": "k"}, lambda host: False, "offline"),  # key but no network
        ({"WANDB_API_KEY": "k"}, lambda host: True, "online"),
        ({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, _never, "offline"),
        ({"WANDB_MODE": "disabled"}, _never, "disabled"),
        ({"WANDB_DISABLED": "true", "WANDB_API_KEY": "k"}, _never, "disabled"),
    ],
)
def test_wandb_mode(env, reachable, expected, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode(env, reachable) == expected


def test_stage_loggers_keep_a_csv_record_first(tmp_path: Path) -> None:
    for backend, second in (
        ("wandb", "RLHFWandbLogger"),
        ("tensorboard", "TensorBoardLogger"),
        ("csv", None),
    ):
        loggers = stage_loggers(backend, tmp_path / "sft", "sft", "run1")
        assert loggers[0]["class_path"].endswith("CSVLogger")
        assert loggers[0]["init_args"] == {"save_dir": str(tmp_path / "sft"), "name": "logs", "version": ""}
        assert (loggers[1]["class_path"].rsplit(".", 1)[1] if second else None) == second
    with pytest.raises(ValueError, match="logger"):
        RLHFConfig(logger="mlflow")


def test_pipeline_groups_its_stages_in_one_wandb_group(tmp_path: Path) -> None:
    pipeline = RLHFPipeline(RLHFConfig.from_yaml(REPO / "configs" / "pipeline_tiny.yaml"))
    pipeline.root = tmp_path / "my_run"
    for stage in ("sft", "reward", "ppo"):
        loggers = pipeline.stage_config(stage, {"sft": "a.ckpt", "reward": "b.ckpt"})["trainer"]["logger"]
        wandb = loggers[1]["init_args"]
        assert wandb["group"] == "my_run" and wandb["job_type"] == stage
        assert wandb["save_dir"] == str(tmp_path / "my_run" / stage)


def _fit(tmp_path: Path, base: str, override: dict) -> object:
    """``rlhf-lightning fit`` with ``configs/<base>`` and a YAML of overrides."""
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override), encoding="utf-8")
    return run_stage_cli(["fit", "--config", str(REPO / "configs" / base), "--config", str(extra)])


def test_sft_stage_logs_to_offline_wandb_and_csv(tmp_path: Path, offline_wandb, tiny_tokenizer) -> None:
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(tok)
    run = tmp_path / "sft"
    override = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 4,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(run), "name": ""},
                },
                {
                    "class_path": "rlhf_lightning.loggers.RLHFWandbLogger",
                    "init_args": {"save_dir": str(run), "name": "sft"},
                },
            ],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt")},
                },
                {
                    "class_path": "rlhf_lightning.callbacks.SFTSamples",
                    "init_args": {"every_n_steps": 2, "num_prompts": 2, "max_new_tokens": 8},
                },
            ],
        },
        "data": {"init_args": {"tokenizer_path": str(tok)}},
    }
    cli = _fit(tmp_path, "sft_tiny.yaml", override)
    try:
        wandb_logger = cli.trainer.loggers[1]
        assert wandb_logger.mode == "offline"
        hparams = dict(wandb_logger.experiment.config)
    finally:
        finish_wandb(cli.trainer.loggers)
    assert "model" in hparams  # the module's hyper-parameters reached W&B
    assert "rlhf_lightning.stages.sft.SFTModule" in hparams["config"]  # and the whole resolved CLI config
    (offline,) = (run / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads later
    assert run_file.stat().st_size > 0
    tables = list((offline / "files" / "media" / "table" / "samples").glob("sft_*.table.json"))
    assert len(tables) >= 2  # steps 2 and 4 (and the end, at step 4 already)
    metrics = (run / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    with (run / "version_0" / "samples_sft.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"step", "prompt", "reference", "sample"}
    assert {r["step"] for r in rows} == {"2", "4"}
    assert all("<|assistant|>" in r["prompt"] for r in rows)


def test_reward_worst_pairs_table_csv_and_tensorboard(tmp_path: Path, tiny_tokenizer) -> None:
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(tok)
    run = tmp_path / "reward"
    override = {
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 4,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(run), "name": ""},
                },
                {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": str(run), "name": "tb"},
                },
            ],
        },
        "model": {"init_args": {"worst_pairs": 3, "init_from": None}},  # random weights: no SFT run needed
        "data": {"init_args": {"tokenizer_path": str(tok)}},
    }
    _fit(tmp_path, "reward_tiny.yaml", override)
    with (run / "version_0" / "samples_reward_worst_pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    gaps = [float(r["gap"]) for r in rows]
    assert gaps == sorted(gaps, reverse=True)
    assert all(abs(float(r["r_rejected"]) - float(r["r_chosen"]) - float(r["gap"])) < 1e-4 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tb" / "version_0").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "samples/reward_worst_pairs/text_summary" in accumulator.Tags()["tensors"]
    assert "val/loss" in accumulator.Tags()["scalars"]
