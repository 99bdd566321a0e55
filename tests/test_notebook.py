"""notebooks/quickstart.ipynb: the committed copy carries its outputs and no clutter; executed from scratch (as
``python scripts/run_notebook.py`` does) it writes the user's data, trains SFT through the DataModule it defines,
then GRPO against a rule, and its headline is an improvement: a win rate above one half, with its whole confidence
interval, a higher rule score and a positive KL; the exported Hugging Face folder loads."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
HEADLINE = "held-out prompts the GRPO reply beats the SFT reply"


def _outputs(notebook) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _check_outputs(notebook) -> str:
    """Assert the outputs a reader sees are clean; returns their text."""
    outputs = _outputs(notebook)
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert not [out for out in outputs if out.get("name") == "stderr"], "stderr clutter in the notebook"
    assert not [out for out in outputs if "text/html" in out.get("data", {})], (
        "HTML (e.g. rich tables) in the output"
    )
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3, "SFT curves, GRPO curves and the evaluation chart"
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    text += "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert HEADLINE in text and "| prompt | SFT | GRPO |" in text and "LlamaForCausalLM" in text
    return text


def test_committed_notebook_has_its_outputs_and_no_clutter() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), (
        "every cell ran (python scripts/run_notebook.py)"
    )
    assert not [cell for cell in code if "execution" in cell.metadata], "no per-cell timestamps: noisy diffs"
    _check_outputs(notebook)
    raw = NOTEBOOK.read_text(encoding="utf-8")
    assert str(REPO) not in raw and "/tmp/" not in raw, "no machine paths in the outputs"


def test_quickstart_notebook_runs_and_shows_an_improvement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("transformers")  # the export cell loads the folder with transformers (the hf extra)
    run_dir = tmp_path / "quickstart"
    monkeypatch.setenv("QUICKSTART_DIR", str(run_dir))  # the kernel inherits the environment
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    execute = runpy.run_path(str(REPO / "scripts" / "run_notebook.py"))["execute"]  # the README's command
    executed = execute(NOTEBOOK, output=tmp_path / "executed.ipynb")
    _check_outputs(nbformat.read(tmp_path / "executed.ipynb", as_version=4))
    assert executed.cells[0].source == nbformat.read(NOTEBOOK, as_version=4).cells[0].source
    # the user's files, through the DataModule class the notebook defines
    assert (run_dir / "data" / "conversations.jsonl").is_file()
    sft_config = yaml.safe_load((run_dir / "run" / "sft" / "config.yaml").read_text(encoding="utf-8"))
    assert sft_config["data"]["class_path"] == "__main__.TipsSFTData"
    assert sft_config["data"]["init_args"]["train_path"] == str(run_dir / "data" / "conversations.jsonl")
    # the headline: the trained policy beats the SFT policy under the rule it was trained on, and moved to do so
    report = json.loads((run_dir / "run" / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))
    assert report["judges"] == ["brevity"] and report["n_prompts"] == 48
    baseline, grpo = report["policies"]
    win = grpo["win_rate"]["brevity"]
    assert win["ci_low"] > 0.5, win
    assert grpo["scores"]["brevity"]["mean"] > baseline["scores"]["brevity"]["mean"]
    assert grpo["kl"]["k1"] > 0 and grpo["kl"]["k3"] > 0
    assert grpo["response_tokens"] < baseline["response_tokens"]
    # the export
    config = json.loads((run_dir / "hf_policy" / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForCausalLM"]
