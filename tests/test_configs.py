"""Every YAML under configs/ parses with the CLI (``--print_config``); SFT configs comment their non-defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STAGE_KEYS = {"trainer", "model", "data"}


def test_configs_exist() -> None:
    assert REPO / "configs" / "sft.yaml" in CONFIGS
    assert REPO / "configs" / "sft_tiny.yaml" in CONFIGS
    for name in (
        "grpo",
        "grpo_tiny",
        "rloo",
        "rloo_tiny",
        "grpo_gsm8k",
    ):  # the critic-free stage (stages/grpo.py)
        assert REPO / "configs" / f"{name}.yaml" in CONFIGS
    assert {REPO / "configs" / "dpo.yaml", REPO / "configs" / "dpo_tiny.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_the_cli(path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict), f"{path.name}: expected a mapping at the top level"
    if not STAGE_KEYS & raw.keys():
        pytest.skip(f"{path.name} is not a stage (LightningCLI) config; its own command's tests parse it")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    assert printed["data"]["class_path"] == raw["data"]["class_path"]


@pytest.mark.parametrize("name", ["sft.yaml", "sft_tiny.yaml"])
def test_sft_configs_comment_values_that_differ_from_code_defaults(name: str) -> None:
    """Each leaf under the model's / data's init_args that differs from the class default carries a ``#`` why."""
    import inspect

    from rlhf_lightning.data.sft import SFTDataModule

    lines = (REPO / "configs" / name).read_text().splitlines()
    raw = yaml.safe_load("\n".join(lines))
    defaults = {k: p.default for k, p in inspect.signature(SFTDataModule).parameters.items()}
    for key, value in raw["data"]["init_args"].items():
        if key in defaults and value != defaults[key]:
            line = next(x for x in lines if x.strip().startswith(f"{key}:"))
            assert "#" in line, f"{name}: data.{key}={value!r} differs from the default {defaults[key]!r}"
    preset = raw["model"]["init_args"]["model"]["preset"]
    if preset != "small":
        line = next(x for x in lines if x.strip().startswith("preset:"))
        assert "#" in line


PIPELINES = sorted((REPO / "configs").glob("pipeline*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_config_loads_and_names_shipped_stage_configs(path: Path) -> None:
    """Every pipeline YAML is a valid RLHFConfig whose stage YAMLs exist (the stage YAMLs parse in the test above;
    a pipeline's own run, which needs its model folder, is tested elsewhere or by the slow tier)."""
    from rlhf_lightning.pipeline import RLHFConfig

    config = RLHFConfig.from_yaml(path)
    for stage, source in config.stage_configs.items():
        if not isinstance(source, dict):
            assert (REPO / source).is_file(), f"{path.name}: stage_configs.{stage}={source} not found"
