"""The pipeline's bookkeeping: validation data that follows the user's files, 'before' = the SFT policy, rerunning
named stages, the bare --overwrite flag, a tokenizer that follows save_dir and a user's own DataModule. No stage
trains here (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import LightningDataModule

from rlhf_lightning import pipeline as pipeline_module
from rlhf_lightning.pipeline import STAGES, RLHFConfig, RLHFPipeline

REPO = Path(__file__).resolve().parents[1]
HH_PAIRS = REPO / "data" / "hh_rlhf" / "preference_train.jsonl"


def _user_pairs(path: Path, n: int = 40) -> Path:
    rows = [
        {"prompt": f"Which number is larger, {i} or {i + 1}?", "chosen": f"{i + 1}.", "rejected": f"{i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _reward_data_args(config: RLHFConfig) -> dict:
    return RLHFPipeline(config).stage_config("reward", {"sft": "S.ckpt"})["data"]["init_args"]


def test_validation_follows_the_users_data(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    base = RLHFConfig.from_yaml(REPO / "configs" / "pipeline.yaml")
    base.save_dir = str(tmp_path / "run")
    # the shipped data: the stage YAML's own held-out file
    assert _reward_data_args(base)["val_path"] == "data/hh_rlhf/preference_test.jsonl"
    # the user's pairs: a held-out tenth of them, never the shipped HH test file
    pairs = _user_pairs(tmp_path / "pairs.jsonl")
    base.reward_data_path = str(pairs)
    args = _reward_data_args(base)
    assert args["train_path"] == str(pairs) and args["val_path"] is None and args["val_fraction"] == 0.1
    assert str(pairs) in pipeline_module.validation_source(args)
    # the DataModule that stage builds validates on rows of the user's file
    pipe = RLHFPipeline(base)
    cli = pipe._cli(pipe.stage_config("reward", {"sft": "S.ckpt"}))
    counts = cli.datamodule.validate_inputs()
    assert counts["train_rows"] + counts["val_rows"] == 40 and counts["val_rows"] == 4
    # an explicit validation file wins
    base.reward_val_path = str(tmp_path / "val.jsonl")
    assert _reward_data_args(base)["val_path"] == str(tmp_path / "val.jsonl")


def test_every_stage_validates_on_the_users_files(tmp_path):
    config = RLHFConfig(
        sft_data_path="a.jsonl",
        reward_data_path="b.jsonl",
        ppo_data_path="c.jsonl",
        ppo_val_path="c_val.jsonl",
        save_dir=str(tmp_path / "run"),
    )
    pipe = RLHFPipeline(config)
    data = {s: pipe.stage_config(s, {"sft": "S", "reward": "R"})["data"]["init_args"] for s in STAGES}
    assert data["sft"]["val_path"] is None and data["sft"]["val_fraction"] > 0
    assert data["reward"]["val_path"] is None and data["reward"]["val_fraction"] > 0
    assert data["ppo"]["val_path"] == "c_val.jsonl"


def test_tokenizer_follows_save_dir_in_every_shipped_pipeline(tmp_path):
    for path in sorted((REPO / "configs").glob("pipeline*.yaml")):
        config = RLHFConfig.from_yaml(path)
        if config.tokenizer_path is not None:  # a Hugging Face model folder: its own tokenizer
            sft = yaml.safe_load((REPO / config.stage_configs["sft"]).read_text(encoding="utf-8"))
            assert sft["model"]["init_args"]["model"].get("hf_path"), path
            continue
        config.save_dir = str(tmp_path / "elsewhere")
        assert RLHFPipeline(config).tokenizer_path == str(tmp_path / "elsewhere" / "tokenizer.json"), path


class _FakeTrainer:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def validate(self, model, datamodule=None, verbose=False, **kwargs):
        self.calls.append(kwargs)
        return [{"val/score": 0.5}]


def test_before_metrics_are_the_sft_policys_and_measured_once(tmp_path):
    pipe = RLHFPipeline(RLHFConfig(save_dir=str(tmp_path)))
    trainer = _FakeTrainer()
    first = pipe._before_ppo(tmp_path, trainer, model=None, data=None)
    assert first == {"before/val/score": 0.5}
    assert trainer.calls == [{}]  # no ckpt_path: the freshly loaded SFT weights, never a resumed checkpoint
    again = pipe._before_ppo(tmp_path, trainer, model=None, data=None)  # e.g. a resumed run
    assert again == first and len(trainer.calls) == 1


def _finished_run(root: Path) -> None:
    for stage in STAGES:
        (root / stage / "checkpoints").mkdir(parents=True)
        ckpt = root / stage / "checkpoints" / "best.ckpt"
        ckpt.write_text(stage)
        done = {"checkpoint": str(ckpt), "results": {"val/x": 1.0}}
        (root / stage / "done.json").write_text(json.dumps(done))


@pytest.mark.parametrize(
    "stages, rerun", [(None, []), (["ppo"], ["ppo"]), (["reward", "ppo"], ["reward", "ppo"])]
)
def test_named_stages_run_again_and_the_previous_run_is_kept(tmp_path, monkeypatch, capsys, stages, rerun):
    root = tmp_path / "run"
    _finished_run(root)
    ran: list[tuple[str, dict]] = []

    def fake_stage(self, stage, inputs):
        ran.append((stage, dict(inputs)))
        return {"checkpoint": f"new-{stage}.ckpt", "results": {"val/x": 2.0}}

    monkeypatch.setattr(RLHFPipeline, "validate", lambda self: None)
    monkeypatch.setattr(RLHFPipeline, "_run_stage", fake_stage)
    RLHFPipeline(RLHFConfig(save_dir=str(root)), stages=stages).run()
    assert [stage for stage, _ in ran] == rerun
    out = capsys.readouterr().out
    for stage in rerun:
        previous = root / f"{stage}.previous-1"
        assert (previous / "done.json").is_file()  # kept, not deleted
        assert f"previous run kept in {previous}" in out
    if rerun == ["ppo"]:  # a rerun stage reads the finished earlier ones' checkpoints
        assert ran[0][1]["reward"] == str(root / "reward" / "checkpoints" / "best.ckpt")
    if rerun == ["reward", "ppo"]:  # ... and the later one gets the new reward model
        assert ran[1][1]["reward"] == "new-reward.ckpt"


def test_overwrite_is_a_bare_flag(monkeypatch):
    seen = []
    monkeypatch.setattr(RLHFPipeline, "run", lambda self: seen.append((self.overwrite, self.rerun)) or {})
    pipeline_module.main(["--overwrite"])
    pipeline_module.main([])
    pipeline_module.main(["--stages", "ppo"])
    assert seen == [(True, False), (False, False), (False, True)]


class UserSFTData(LightningDataModule):
    """A user's own DataModule: takes the train file and the run's tokenizer."""

    def __init__(self, train_path: str = "", tokenizer_path: str = "", batch_size: int = 2) -> None:
        super().__init__()
        self.train_path, self.tokenizer_path, self.batch_size = train_path, tokenizer_path, batch_size


class UserSFTDataNoTokenizer(LightningDataModule):
    def __init__(self, train_path: str = "") -> None:
        super().__init__()
        self.train_path = train_path


def test_a_users_datamodule_gets_the_train_file_and_the_runs_tokenizer(tmp_path):
    config = RLHFConfig(sft_data_path=str(tmp_path / "mine.jsonl"), save_dir=str(tmp_path / "run"))
    own = {"class_path": f"{__name__}.UserSFTData", "init_args": {"batch_size": 4}}
    pipe = RLHFPipeline(config, datamodules={"sft": own})
    data = pipe.stage_config("sft", {})["data"]
    assert data["class_path"] == own["class_path"]
    assert data["init_args"] == {
        "batch_size": 4,
        "train_path": str(tmp_path / "mine.jsonl"),
        "tokenizer_path": str(tmp_path / "run" / "tokenizer.json"),  # the class takes one: the run's
    }
    cli = pipe._cli(pipe.stage_config("sft", {}), defer_trainer=True)
    assert isinstance(cli.datamodule, UserSFTData) and cli.datamodule.batch_size == 4 and cli.trainer is None
    bare = {"class_path": f"{__name__}.UserSFTDataNoTokenizer"}
    data = RLHFPipeline(config, datamodules={"sft": bare}).stage_config("sft", {})["data"]
    assert data["init_args"] == {"train_path": str(tmp_path / "mine.jsonl")}  # no argument it cannot take


def test_closing_evaluation_judges_with_the_stages_rewards_and_held_out_judges(tmp_path):
    from types import SimpleNamespace

    from rlhf_lightning.models.generation import GenerationArgs

    prompts = tmp_path / "val.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": "Hello"}\n', encoding="utf-8")
    pipe = RLHFPipeline(RLHFConfig(save_dir=str(tmp_path / "run"), ppo_val_path=str(prompts), eval_prompts=1))
    brevity, target = (
        "rlhf_lightning.reward_functions:brevity",
        "rlhf_lightning.reward_functions:contains_target",
    )
    model = SimpleNamespace(
        rewards=SimpleNamespace(functions=[brevity]),
        judge_specs=[brevity, target],  # a judge that is also optimised is judged once
        generation=GenerationArgs(max_new_tokens=7, temperature=0.5),
    )
    settings = pipe._settings_for_evaluation(SimpleNamespace(model=model, datamodule=SimpleNamespace()))
    assert settings["functions"] == [brevity, target]
    assert [p.messages[-1]["content"] for p in settings["prompts"]] == ["Hi"]
    assert (
        settings["generation"] == GenerationArgs(7, temperature=0.5) and settings["max_prompt_length"] == 256
    )
