"""Reading files never runs code, and disk problems are one-line errors.

A crafted checkpoint (a real malicious pickle whose ``__reduce__`` writes a marker file) is refused by every path that
reads checkpoints, library calls and CLI commands alike, with an error naming the file; a ``trust_remote_code`` stored
in a checkpoint is never honoured; an unwritable checkpoint folder is refused before training; a failed save (full
disk) keeps the previous checkpoint byte-identical and says so in one line.
"""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import pytest
import torch
from test_sft_stage import TINY, write_override

from rlhf_lightning.cli import main
from rlhf_lightning.models.factory import UntrustedCodeError, model_from_spec
from rlhf_lightning.stages.checkpoints import (
    PAYLOAD_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    best_model_path,
    check_writable,
    load_backbone,
    load_checkpoint,
    load_policy,
    resolve_checkpoint,
)


class _Payload:
    """Unpickling this runs ``code`` (what an attacker's checkpoint would do)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _malicious(path: Path, marker: Path) -> Path:
    """A stage-checkpoint-shaped file whose unpickling creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    evil = _Payload(f"open({str(marker)!r}, 'w').write('pwned')")
    callbacks = {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_path": str(path), "x": evil}}
    torch.save({PAYLOAD_KEY: {"stage": "sft", "x": evil}, "state_dict": {}, "callbacks": callbacks}, path)
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(a malicious ``last.ckpt`` inside a run folder, the marker file its unpickling would create)."""
    marker = tmp_path / "MARKER"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "convs.jsonl").write_text('{"prompt": "Hi", "response": "Hello"}\n')  # for `score`
    return _malicious(tmp_path / "run" / "checkpoints" / "last.ckpt", marker), marker


def test_the_payload_really_runs_code_when_unpickled_unsafely(evil) -> None:
    """The fixture is a real attack: a plain ``torch.load(weights_only=False)`` creates the marker."""
    file, marker = evil
    torch.load(file, weights_only=False)
    assert marker.read_text() == "pwned"


def test_every_library_loader_refuses_the_file_without_running_it(evil) -> None:
    from rlhf_lightning.export import export_checkpoint
    from rlhf_lightning.scoring import score_file
    from rlhf_lightning.stages.ppo_models import load_networks
    from rlhf_lightning.stages.reward import load_reward_model

    file, marker = evil
    run = file.parents[1]
    calls = {
        "load_checkpoint(file)": lambda: load_checkpoint(file),
        "load_checkpoint(folder)": lambda: load_checkpoint(run),
        "load_backbone (SFT/reward init_from)": lambda: load_backbone(run),
        "load_policy (generate)": lambda: load_policy(file),
        "load_reward_model": lambda: load_reward_model(str(file)),
        "score_file": lambda: score_file(
            str(run), str(run / "convs.jsonl"), str(run / "out.jsonl"), 2, None, "cpu"
        ),
        "export_checkpoint": lambda: export_checkpoint(str(run), str(run / "hf"), True, False),
        "PPO policy_from/reward_from": lambda: load_networks(str(file), str(file), str(file), False, None),
        "AtomicCheckpointIO.load_checkpoint (--ckpt_path)": lambda: AtomicCheckpointIO().load_checkpoint(
            file
        ),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError) as err:
            call()
        message = str(err.value)
        assert str(file) in message and "refused" in message and "\n" not in message, name
    assert best_model_path(file) is None  # the best-checkpoint lookup reads last.ckpt safely too
    assert resolve_checkpoint(run) == file
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--ckpt", "{run}", "--prompt", "Hi"],
        ["generate", "--ckpt", "{file}", "--prompt", "Hi"],
        ["score", "--ckpt", "{run}", "--input", "{run}/convs.jsonl", "--output", "{run}/scored.jsonl"],
        ["export", "--ckpt", "{file}", "--output", "{run}/hf"],
        ["fit", "--config", TINY, "--config", "{override}", "--ckpt_path", "{file}"],
        ["validate", "--config", TINY, "--config", "{override}", "--ckpt_path", "{file}"],
    ],
    ids=["generate-folder", "generate-file", "score", "export", "fit", "validate"],
)
def test_cli_commands_refuse_the_file_in_one_line(evil, command, tmp_path, monkeypatch, capsys) -> None:
    file, marker = evil
    run = file.parents[1]
    monkeypatch.chdir(tmp_path)
    override = write_override(tmp_path / "other")
    args = [a.format(run=run, file=file, override=override) for a in command]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {file}: cannot read checkpoint: refused"), err
    assert not marker.exists()


def _custom_code_folder(path: Path, marker: Path) -> Path:
    """A Hugging Face folder whose own modelling code (``auto_map``) creates ``marker`` when imported."""
    path.mkdir(parents=True)
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (path / "config.json").write_text(json.dumps({"model_type": "evil_rlhf", "auto_map": auto_map}))
    code = f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import PretrainedConfig\n"
    (path / "configuration_evil.py").write_text(
        code + "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_rlhf'\n"
    )
    (path / "modeling_evil.py").write_text(code)
    return path


def test_trust_remote_code_stored_in_a_checkpoint_is_not_honoured(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    pytest.importorskip("transformers")
    marker = tmp_path / "MARKER"
    folder = _custom_code_folder(tmp_path / "custom", marker)
    spec = {
        "kind": "hf",
        "path": str(folder),
        "config": {"model_type": "evil_rlhf", "hidden_size": 8, "auto_map": {"AutoConfig": "x.Y"}},
        "lora": None,
        "trust_remote_code": True,  # what a crafted (or another user's) checkpoint could record
    }
    with pytest.raises(UntrustedCodeError, match="trust_remote_code"):
        model_from_spec(spec)
    ckpt = tmp_path / "custom.ckpt"
    torch.save(
        {PAYLOAD_KEY: {"stage": "sft", "backbone_prefix": "model.", "model_spec": spec}, "state_dict": {}},
        ckpt,
    )
    with pytest.raises(UntrustedCodeError):
        load_backbone(ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ckpt", str(ckpt), "--prompt", "Hi"])
    assert exc.value.code == 2
    assert "a checkpoint cannot turn it on" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not marker.exists()


def test_an_unwritable_checkpoint_folder_is_refused_before_any_training_step(
    tmp_path, monkeypatch, capsys
) -> None:
    from rlhf_lightning.stages.sft import SFTModule

    steps: list[int] = []
    original = SFTModule.training_step
    monkeypatch.setattr(
        SFTModule, "training_step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k)
    )
    monkeypatch.chdir(tmp_path)
    override = write_override(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").write_text("a regular file where the checkpoint folder should be")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--config", override])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint folder {tmp_path / 'run' / 'checkpoints'} is not writable"), (
        last
    )
    assert "nothing was trained" in last
    assert steps == []


def test_check_writable_reports_a_permission_error_and_creates_nothing(tmp_path, monkeypatch) -> None:
    """Tests run as root, where chmod does not block writes: the refusal is simulated at the probe."""
    target = tmp_path / "new" / "checkpoints"
    check_writable(target)  # a writable parent: fine, and the folder is not created yet
    assert not (tmp_path / "new").exists()

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(CheckpointError, match="is not writable \\(Permission denied") as err:
        check_writable(target)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _full_disk(monkeypatch) -> None:
    """Every torch.save writes a few bytes, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    message = str(err.value)
    assert (
        message
        == f"{target}: cannot write checkpoint (No space left on device); the previous last.ckpt is kept unchanged"
    )
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the partial temp file is gone
    with pytest.raises(CheckpointError, match="no checkpoint file was written"):
        io.save_checkpoint({"step": 1}, tmp_path / "ckpts" / "best.ckpt")


def test_a_full_disk_during_fit_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    override = write_override(tmp_path / "run")
    _full_disk(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--config", override, "--trainer.max_steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "No space left on device" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))
