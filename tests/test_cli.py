"""The rlhf-lightning command: usage, precision chooser, generate and tokenizer commands, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from rlhf_lightning.cli import USAGE, main
from rlhf_lightning.stage_cli import checkpoint_dir, choose_precision, cpu_flags

REPO = Path(__file__).resolve().parents[1]


BF16_CPU = frozenset({"fpu", "avx512f", "avx512_bf16"})
AMX_CPU = frozenset({"fpu", "amx_tile", "amx_bf16"})
PLAIN_CPU = frozenset({"fpu", "avx2", "avx512f"})


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16", "flags", "expected"),
    [
        ("cpu", True, True, PLAIN_CPU, "32-true"),  # a CPU without bf16 instructions
        ("cpu", True, True, BF16_CPU, "bf16-mixed"),  # AVX512-BF16
        ("cpu", False, None, AMX_CPU, "bf16-mixed"),  # AMX
        ("auto", False, None, PLAIN_CPU, "32-true"),  # no GPU, plain CPU
        ("auto", False, None, BF16_CPU, "bf16-mixed"),  # no GPU: the CPU decides
        (None, False, None, frozenset(), "32-true"),  # no flags read (not Linux)
        ("auto", True, True, PLAIN_CPU, "bf16-mixed"),
        ("gpu", True, True, PLAIN_CPU, "bf16-mixed"),
        ("cuda", True, True, PLAIN_CPU, "bf16-mixed"),
        ("gpu", True, False, BF16_CPU, "32-true"),  # a GPU without bf16 (e.g. V100): the CPU does not matter
        ("auto", True, False, BF16_CPU, "32-true"),
        ("mps", True, True, BF16_CPU, "32-true"),
    ],
)
def test_choose_precision(accelerator, cuda: bool, bf16: bool | None, flags, expected: str) -> None:
    got = choose_precision(accelerator, cuda_available=cuda, bf16_supported=bf16, flags=flags)
    assert got == expected


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\n"
    )
    assert cpu_flags(info) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert choose_precision("cpu", flags=cpu_flags(info)) == "bf16-mixed"


def test_choose_precision_on_this_machine() -> None:
    flags = cpu_flags()
    cpu = "bf16-mixed" if {"avx512_bf16", "amx_bf16"} & flags else "32-true"
    expected = cpu
    if torch.cuda.is_available():
        expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert choose_precision("auto") == expected
    assert choose_precision("cpu") == cpu


def test_cli_prints_the_chosen_precision_and_keeps_an_explicit_one(capsys) -> None:
    from rlhf_lightning.stage_cli import RLHFLightningCLI

    cli = RLHFLightningCLI.__new__(RLHFLightningCLI)  # only before_instantiate_classes' precision branch
    for given, expected in ((None, choose_precision("cpu")), ("32-true", "32-true")):
        trainer = Namespace(accelerator="cpu", precision=given)
        cli.subcommand, cli.config = None, Namespace(trainer=trainer)
        cli._check_supports = lambda *a: None
        cli.before_instantiate_classes()
        assert trainer.precision == expected
        printed = capsys.readouterr().err
        assert (f"trainer.precision={expected} chosen" in printed) == (given is None)


def test_checkpoint_dir_follows_lightning_layout(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    explicit = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    implicit = ModelCheckpoint(monitor="val/loss")  # another state key: two checkpoint callbacks may coexist
    trainer = Trainer(
        logger=CSVLogger(tmp_path, name="exp"),
        callbacks=[explicit, implicit],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert checkpoint_dir(explicit, trainer) == tmp_path / "ckpts"
    assert checkpoint_dir(implicit, trainer) == tmp_path / "exp" / "version_0" / "checkpoints"


def test_help_prints_usage(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    assert capsys.readouterr().out.strip() == USAGE.strip()
    main([])
    assert "generate" in capsys.readouterr().out


def test_console_script_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_lightning.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "rlhf-lightning fit --config configs/sft.yaml" in result.stdout


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path, tiny_tokenizer) -> Path:
    """A stage checkpoint written by SFTModule's own hook (random tiny weights), no Trainer needed."""
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.stages.sft import SFTModule

    tok_path = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(tok_path)
    module = SFTModule(model=ModelArgs(preset="tiny"), tokenizer_path=str(tok_path))
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict(), "callbacks": {}}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "run" / "last.ckpt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path


def test_generate_prints_a_reply_per_prompt(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--max_new_tokens", "5", "--seed", "1"]
    main(["generate", "--ckpt", str(tiny_checkpoint.parent), "--prompt", "Hi there", "What is 2+2?", *args])
    out = capsys.readouterr().out
    assert out.count("### Assistant") == 2
    assert "### User\nHi there" in out and "### User\nWhat is 2+2?" in out
    main(["generate", "--ckpt", str(tiny_checkpoint), "--prompt", "Hi there", "What is 2+2?", *args])
    assert (
        capsys.readouterr().out == out
    )  # the file and its folder are the same checkpoint; same seed, same text


def test_generate_greedy_is_deterministic(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    for seed in ("1", "2"):
        main(["generate", "--ckpt", str(tiny_checkpoint), "--prompt", "Hello", "--greedy", "true",
              "--max_new_tokens", "6", "--seed", seed])  # fmt: skip
    first, second = capsys.readouterr().out.split("### User")[1:]
    assert first == second


def test_generate_with_a_bad_checkpoint_is_a_clean_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such checkpoint" in err


def test_tokenizer_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rlhf_lightning.tokenization import ChatTokenizer

    data = REPO / "data" / "hh_rlhf" / "sft_train.jsonl"
    output = tmp_path / "tok" / "tokenizer.json"
    main(["tokenizer", "--data", str(data), "--output", str(output), "--vocab_size", "400"])
    assert f"wrote {output}" in capsys.readouterr().out
    tok = ChatTokenizer.from_file(output)
    assert tok.vocab_size <= 400 and tok.pad_id == 0


def test_tokenizer_command_with_a_missing_file_is_a_clean_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "t.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.jsonl" in err


def test_unknown_subcommand_exits_with_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fitt"])
    assert exc.value.code != 0


def test_stage_module_parses_sft_config_without_building_weights(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs" / "sft.yaml"), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "rlhf_lightning.stages.sft.SFTModule" in printed
    assert json.dumps("runs/tokenizer.json").strip('"') in printed
