"""A newcomer's run: progress lines in log files, a quiet start-up, CLI conventions and readable output files.

One module-scoped ``rlhf-lightning fit --config configs/sft_tiny.yaml`` (one epoch, progress bar on, run in a
temporary working folder so the config's relative paths land there) is shared by the tests that read its output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.callbacks import StageProgress
from rlhf_lightning.cli import main, run_stage_cli
from rlhf_lightning.stage_cli import STAGES, RLHFLightningCLI

REPO = Path(__file__).resolve().parents[1]
SFT_TINY = str(REPO / "configs" / "sft_tiny.yaml")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The shipped tiny SFT config run through the CLI in a fresh folder: its stderr, log records and warnings."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "data").symlink_to(REPO / "data")
    records = _Records()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records)
    stderr = io.StringIO()
    try:
        with (
            pytest.MonkeyPatch.context() as patch,
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stderr(stderr),
        ):
            warnings.simplefilter("always")
            patch.chdir(folder)
            cli = run_stage_cli(
                [
                    "fit",
                    "--config",
                    SFT_TINY,
                    "--trainer.max_epochs",
                    "1",
                    "--trainer.enable_progress_bar",
                    "true",
                ]
            )
    finally:
        lightning_logger.removeHandler(records)
    return SimpleNamespace(
        cli=cli,
        folder=folder,
        stderr=stderr.getvalue(),
        messages=records.messages,
        warnings=[str(w.message) for w in caught],
    )


# -- 5. progress in log files --------------------------------------------------------------------------------------------
def test_stage_progress_prints_lines_off_a_tty(tiny_fit: SimpleNamespace) -> None:
    lines = [line for line in tiny_fit.stderr.splitlines() if line.startswith("[sft] step")]
    assert [line.split(" | ")[0] for line in lines] == ["[sft] step 5/5"]  # log_every_n: 5 in sft_tiny.yaml
    assert " | loss " in lines[0] and " steps/s" in lines[0]


def test_stage_progress_every_n_steps_with_eta() -> None:
    stream = io.StringIO()
    progress = StageProgress(log_every_n=2, stream=stream)
    trainer = SimpleNamespace(
        estimated_stepping_batches=5,
        global_step=0,
        is_global_zero=True,
        callback_metrics={},
        progress_bar_callback=None,
    )
    module = type("RewardModule", (), {})()
    progress.on_train_start(trainer, module)
    for step in range(1, 6):
        trainer.global_step = step
        trainer.callback_metrics = {"train/loss": torch.tensor(1.0 / step)}
        progress.on_train_batch_end(trainer, module, None, None, step - 1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "[reward] step 2/5",
        "[reward] step 4/5",
        "[reward] step 5/5",
    ]
    assert "loss 0.5" in lines[0] and "ETA " in lines[0] and "ETA" not in lines[-1]


def test_stage_progress_is_silent_on_a_tty_with_a_progress_bar() -> None:
    stream = io.StringIO()
    progress = StageProgress(log_every_n=1, interactive=True, stream=stream)
    trainer = SimpleNamespace(
        estimated_stepping_batches=3,
        global_step=1,
        is_global_zero=True,
        callback_metrics={},
        progress_bar_callback=object(),
    )
    progress.on_train_start(trainer, object())
    trainer.global_step = 2
    progress.on_train_batch_end(trainer, object(), None, None, 0)
    assert stream.getvalue() == ""


# -- 6. start-up noise ---------------------------------------------------------------------------------------------------
def test_startup_noise_is_kept_off_the_console(tiny_fit: SimpleNamespace) -> None:
    said = "\n".join(tiny_fit.messages) + tiny_fit.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "to estimate number of stepping batches"):
        assert noise not in said
    assert not [w for w in tiny_fit.warnings if "LeafSpec" in w]
    assert any("Trainer.fit" in m for m in tiny_fit.messages)  # other Lightning lines still come through


def test_progress_bar_has_no_v_num(tiny_fit: SimpleNamespace) -> None:
    trainer = tiny_fit.cli.trainer
    assert trainer.progress_bar_callback is not None and trainer.loggers
    assert "v_num" not in trainer.progress_bar_callback.get_metrics(trainer, tiny_fit.cli.model)
    assert "v_num" not in tiny_fit.stderr


# -- 8. CLI conventions --------------------------------------------------------------------------------------------------
def test_test_subcommand_without_a_test_split_refuses_in_one_line(
    tiny_fit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tiny_fit.folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", SFT_TINY])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("error: `test` is not supported by SFTModule with SFTDataModule")
    assert "stages that support it: RewardModule with PreferenceDataModule" in err


def test_fit_help_lists_the_stage_and_datamodule_classes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help formatter wraps lines
    assert exit_info.value.code == 0
    for model, data in STAGES.values():
        assert model in out and data in out
    assert "GRPOModule" in out and "DPOModule" in out


def test_refused_fresh_fit_is_refused_before_building_anything(
    tiny_fit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def built(self) -> None:
        raise AssertionError("the model and data were built before the checkpoint folder was checked")

    monkeypatch.chdir(tiny_fit.folder)
    monkeypatch.setattr(RLHFLightningCLI, "instantiate_classes", built)
    with pytest.raises(SystemExit):
        main(["fit", "--config", SFT_TINY])
    err = capsys.readouterr().err
    assert "error: checkpoint folder runs/tiny/sft/checkpoints already holds" in err


def test_fit_from_a_finished_checkpoint_says_nothing_was_trained(
    tiny_fit: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tiny_fit.folder)
    last = "runs/tiny/sft/checkpoints/last.ckpt"
    main(["fit", "--config", SFT_TINY, "--trainer.max_epochs", "1", "--ckpt_path", last])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nothing to train")]
    assert lines == [
        f"nothing to train: {last} (step 5, epoch 0) already reached trainer.max_steps=-1 / max_epochs=1; "
        "raise them to train further"
    ]


# -- 10. files the suite writes are readable by group and others -----------------------------------------------------------
def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_tokenizer_file_is_readable_by_all(tmp_path: Path, tiny_tokenizer) -> None:
    tiny_tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    assert _mode(tmp_path / "tok" / "tokenizer.json") == 0o644


def test_scored_jsonl_is_readable_by_all(tmp_path: Path) -> None:
    from rlhf_lightning.scoring import _atomic_write_jsonl

    _atomic_write_jsonl(tmp_path / "scored.jsonl", [{"score": 1.0}])
    assert _mode(tmp_path / "scored.jsonl") == 0o644


def test_export_folder_is_readable_by_all(tmp_path: Path, tiny_tokenizer) -> None:
    pytest.importorskip("transformers")
    from rlhf_lightning.export import export_checkpoint
    from rlhf_lightning.models.factory import model_spec
    from rlhf_lightning.models.gpt import create_model
    from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY
    from rlhf_lightning.stages.tokenizer_link import tokenizer_payload

    gpt = create_model("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layer=1)
    payload = {"stage": "sft", "backbone_prefix": "model.", "model_spec": model_spec(gpt)}
    state = {"model." + k: v for k, v in gpt.state_dict().items()}
    ckpt = tmp_path / "sft.ckpt"
    torch.save({"state_dict": state, PAYLOAD_KEY: {**payload, **tokenizer_payload(tiny_tokenizer)}}, ckpt)
    export_checkpoint(ckpt, tmp_path / "hf")
    paths = [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]
    assert any(p.is_file() for p in paths)
    assert {str(p.relative_to(tmp_path)): _mode(p) for p in paths} == {
        str(p.relative_to(tmp_path)): 0o755 if p.is_dir() else 0o644 for p in paths
    }
