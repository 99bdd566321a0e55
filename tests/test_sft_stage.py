"""SFT end to end on CPU through the CLI: fit a few steps of configs/sft_tiny.yaml, resume, validate, reload.

One module-scoped run (1 epoch of 5 steps) then a resume to 2 epochs are shared by the tests below; all outputs go to
a temporary folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_lightning.cli import main, run_stage_cli
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_backbone, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "sft_tiny.yaml")
SFT_DATA = REPO / "data" / "hh_rlhf" / "sft_train.jsonl"


def write_override(folder: Path, train_path: Path = SFT_DATA, **data_args) -> str:
    """A second --config that sends every output of configs/sft_tiny.yaml into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    override = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder), "name": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(folder / "checkpoints"),
                        "monitor": "val/loss",
                        "mode": "min",
                        "save_top_k": 1,
                        "save_last": True,
                        "filename": "best-{epoch}-{step}",
                        "auto_insert_metric_name": False,
                    },
                }
            ],
        },
        "data": {
            "init_args": {
                "train_path": str(train_path),
                "tokenizer_path": str(folder.parent / "tokenizer.json"),
                **data_args,
            }
        },
    }
    path = folder / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fit 1 epoch (5 steps), keep a copy of its last.ckpt, then resume it to 2 epochs (10 steps)."""
    root = tmp_path_factory.mktemp("sft")
    out = root / "run"
    override = write_override(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # nothing may land in the repository
        main(["fit", "--config", TINY, "--config", override, "--trainer.max_epochs", "1"])
        first = out / "checkpoints" / "last.ckpt"
        first_copy = root / "first_last.ckpt"
        first_copy.write_bytes(first.read_bytes())
        main(["fit", "--config", TINY, "--config", override, "--ckpt_path", str(first)])
    return {"root": root, "out": out, "override": override, "first": first_copy}


def test_fit_writes_checkpoint_config_and_metrics(run: dict) -> None:
    out = run["out"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10  # 5 steps, then 5 more after the resume
    payload = ckpt[PAYLOAD_KEY]
    assert payload["stage"] == "sft"
    assert payload["model_spec"]["config"]["n_layer"] == 2  # the tiny preset
    assert "<|assistant|>" in payload["tokenizer_json"]
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    config = yaml.safe_load((out / "version_0" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true"  # sft_tiny.yaml keeps the tiny smoke run in fp32
    assert config["model"]["init_args"]["model"]["preset"] == "tiny"


def test_parameters_change_and_loss_falls(run: dict) -> None:
    before = _state(run["first"])
    after = _state(run["out"] / "checkpoints" / "last.ckpt")
    params = [k for k in after if k.startswith("model.")]
    assert params
    assert all(not torch.equal(before[k], after[k]) for k in params)
    rows = list(csv.DictReader((run["out"] / "version_0" / "metrics.csv").open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 5 and val
    assert train[-1] < train[0]


def test_resume_continues_from_the_saved_step(run: dict) -> None:
    first = torch.load(run["first"], map_location="cpu", weights_only=False)
    assert first["global_step"] == 5
    rows = list(csv.DictReader((run["out"] / "version_1" / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps and min(steps) >= 5  # the resumed run logs steps 5..9, not 0..4
    sched = torch.load(run["out"] / "checkpoints" / "last.ckpt", weights_only=False)["lr_schedulers"][0]
    assert sched["last_epoch"] == 10 and sched["total_steps"] == 5  # the original schedule, continued


def test_fresh_fit_refuses_a_folder_with_checkpoints(run: dict, capsys: pytest.CaptureFixture) -> None:
    last = run["out"] / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--config", run["override"]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--ckpt_path" in err and "Traceback" not in err
    assert last.read_bytes() == before
    assert not (run["out"] / "version_2").exists()  # stopped before the run started


def test_load_from_checkpoint_without_a_trainer(run: dict) -> None:
    from rlhf_lightning.stages.sft import SFTModule

    path = run["out"] / "checkpoints" / "last.ckpt"
    module = SFTModule.load_from_checkpoint(path, map_location="cpu")
    assert module.tokenizer is not None and module._trainer is None
    backbone, tokenizer, _ = load_backbone(path)
    ids = torch.tensor([tokenizer.render_prompt([{"role": "user", "content": "Hi there"}])])
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(ids), backbone.eval()(ids))


def test_validate_a_checkpoint(run: dict) -> None:
    best = resolve_checkpoint(run["out"] / "checkpoints")
    assert best.name.startswith("best-")
    cli = run_stage_cli(["validate", "--config", TINY, "--config", run["override"], "--ckpt_path", str(best)])
    loss = float(cli.trainer.callback_metrics["val/loss"])
    assert 0 < loss < 7


def test_generate_from_the_run_folder(run: dict, capsys: pytest.CaptureFixture) -> None:
    main(["generate", "--ckpt", str(run["out"]), "--prompt", "How do I bake bread?", "--max_new_tokens", "8"])
    text = capsys.readouterr().out
    assert "### User\nHow do I bake bread?" in text and "### Assistant" in text


def test_bad_row_fails_before_training_with_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture, tiny_tokenizer
) -> None:
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    data.write_text("\n".join(json.dumps(r) for r in [good, bad, good]) + "\n")
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    override = write_override(tmp_path / "run", train_path=data)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--config", override])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl" in err and "line 2" in err and "role" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_longer_than_the_model_fails_before_training(tmp_path: Path, capsys, tiny_tokenizer) -> None:
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    override = write_override(tmp_path / "run", max_length=512)  # the tiny preset takes 256 tokens
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--config", override])
    assert exc.value.code == 2
    assert "max_seq_len=256" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
