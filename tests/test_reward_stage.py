"""RewardModule: Bradley-Terry wiring, scoring at the last real token, a separable toy fit, SFT init, score
statistics, the ``test`` command and bad data reported before training. Tiny model, CPU, temp folders."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import quiet_trainer  # tests/ is on sys.path under pytest

from rlhf_lightning.data.formats import DataFormatError
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, load_checkpoint
from rlhf_lightning.stages.reward import RewardModule, load_reward_model
from rlhf_lightning.stages.sft import SFTModule
from rlhf_lightning.tokenization import train_tokenizer
from rlhf_lightning.types import PreferenceBatch

TINY = ModelArgs(preset="tiny", dropout=0.0)
TOPICS = ["the weather", "my garden", "a new book", "the train", "dinner", "music", "the ocean", "football"]


_trainer = partial(quiet_trainer, num_sanity_val_steps=0)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_pairs(n: int, seed: int) -> list[dict]:
    """Trivially separable: chosen replies say 'wonderful', rejected ones 'terrible'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        filler = " ".join(
            rng.choice(["really", "quite", "so", "very", "truly"]) for _ in range(rng.randint(0, 4))
        )
        rows.append(
            {
                "prompt": f"What do you think about {topic}? ({i})",
                "chosen": f"I think it is {filler} wonderful.",
                "rejected": f"I think it is {filler} terrible.",
            }
        )
    return rows


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toy")
    return _write_jsonl(root / "train.jsonl", _toy_pairs(64, 0)), _write_jsonl(
        root / "val.jsonl", _toy_pairs(16, 1)
    )


def _datamodule(toy_files: tuple[Path, Path], tok_path: Path, **kwargs) -> PreferenceDataModule:
    train, val = toy_files
    args = dict(
        train_path=str(train), val_path=str(val), tokenizer_path=str(tok_path), batch_size=8, max_length=64
    )
    return PreferenceDataModule(**{**args, **kwargs})


def _module(tok_path: Path, **kwargs) -> RewardModule:
    module = RewardModule(model=TINY, tokenizer_path=str(tok_path), **kwargs)
    module.configure_model()
    return module


def _sft_checkpoint(path: Path, tok_path: Path) -> SFTModule:
    """A minimal SFT stage checkpoint written through the module's own save hook."""
    torch.manual_seed(0)
    sft = SFTModule(model=TINY, tokenizer_path=str(tok_path))
    sft.configure_model()
    checkpoint = {"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}
    sft.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return sft


# ------------------------------------------------------------------------------------------------ loss and scores


def test_loss_is_bradley_terry_on_one_stacked_forward(tok_path: Path) -> None:
    torch.manual_seed(0)
    module = _module(tok_path).eval()
    b, t = 3, 9
    ids = torch.randint(6, 200, (2 * b, t))
    lengths = torch.tensor([9, 5, 7, 8, 9, 4])
    mask = torch.arange(t)[None] < lengths[:, None]
    margin = torch.tensor([0.0, 0.5, -0.25])
    batch = PreferenceBatch(input_ids=ids, attention_mask=mask, margin=margin)

    calls = []
    forward = module.reward_model.backbone.hidden_states

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.reward_model.backbone.hidden_states = counted
    with torch.no_grad():
        loss, stats, scores = module._pair_step(batch)
    del module.reward_model.backbone.hidden_states
    assert len(calls) == 1  # chosen and rejected in one forward

    with torch.no_grad():  # each row alone, unpadded: rows [0, B) chosen, [B, 2B) rejected
        alone = torch.stack(
            [module(ids[i : i + 1, : lengths[i]], mask[i : i + 1, : lengths[i]])[0] for i in range(2 * b)]
        )
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    r_c, r_r = alone[:b], alone[b:]
    expected = -torch.log(torch.sigmoid(r_c - r_r - margin)).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["accuracy"], (r_c > r_r).float().mean())


def test_loss_gradient_pushes_chosen_up(tok_path: Path) -> None:
    """One SGD step on the module's own loss raises every pair's chosen-minus-rejected score."""
    torch.manual_seed(0)
    module = _module(tok_path).eval()
    ids = torch.randint(6, 200, (4, 6))
    batch = PreferenceBatch(
        input_ids=ids, attention_mask=torch.ones(4, 6, dtype=torch.bool), margin=torch.zeros(2)
    )
    with torch.no_grad():
        before = module(ids, batch.attention_mask)
    loss, _, _ = module._pair_step(batch)
    loss.backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        after = module(ids, batch.attention_mask)
    assert torch.all((after[:2] - after[2:]) > (before[:2] - before[2:]))


def test_score_read_at_last_real_token_for_right_and_left_padding(tok_path: Path) -> None:
    torch.manual_seed(1)
    module = _module(tok_path).eval()
    seqs = [torch.randint(6, 200, (n,)) for n in (3, 7, 5)]
    t = 10
    with torch.no_grad():
        alone = torch.stack([module(s[None], torch.ones(1, len(s), dtype=torch.bool))[0] for s in seqs])
        for left in (False, True):
            for pad_fill in (0, 123):  # padding content must not matter
                ids = torch.full((3, t), pad_fill)
                mask = torch.zeros(3, t, dtype=torch.bool)
                for i, s in enumerate(seqs):
                    cols = slice(t - len(s), t) if left else slice(0, len(s))
                    ids[i, cols], mask[i, cols] = s, True
                torch.testing.assert_close(module(ids, mask), alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ training


def test_separable_toy_fit_reaches_full_accuracy_and_records_score_stats(
    tmp_path: Path, toy_files: tuple[Path, Path], tok_path: Path
) -> None:
    torch.manual_seed(0)
    dm = _datamodule(toy_files, tok_path)
    module = RewardModule(
        model=TINY,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", mode="min", save_last=True)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])  # 16 steps
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 16
    assert float(trainer.callback_metrics["val/accuracy"]) >= 0.99
    assert float(trainer.callback_metrics["val/loss"]) < 0.3

    # score statistics = mean/std of every validation score (chosen and rejected) of the final weights
    module.eval()
    with torch.no_grad():
        scores = torch.cat([module(b.input_ids, b.attention_mask) for b in dm.val_dataloader()])
    assert scores.numel() == 2 * 16
    torch.testing.assert_close(module.reward_model.score_mean, scores.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.reward_model.score_std, scores.std(), atol=1e-5, rtol=1e-5)

    # ... and in the checkpoint the callback kept last (payload and buffers)
    saved = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    payload = saved[PAYLOAD_KEY]
    assert payload["stage"] == "reward"
    assert payload["score_mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert payload["score_std"] == pytest.approx(float(scores.std()), abs=1e-5)
    assert float(saved["state_dict"]["reward_model.score_mean"]) == pytest.approx(payload["score_mean"])
    model, tokenizer = load_reward_model(str(tmp_path / "ckpt"))
    assert float(model.score_std) == pytest.approx(payload["score_std"])
    assert tokenizer is not None and tokenizer.vocab_size == dm.tokenizer.vocab_size
    # normalised validation scores are ~N(0, 1)
    z = model.normalize(scores)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4) and float(z.std()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("as_folder", [False, True])
def test_init_from_sft_checkpoint_file_or_folder(
    tmp_path: Path, toy_files: tuple[Path, Path], tok_path: Path, as_folder: bool
) -> None:
    file = tmp_path / "sft" / "version_0" / "checkpoints" / "last.ckpt"
    sft = _sft_checkpoint(file, tok_path)
    module = RewardModule(init_from=str(tmp_path / "sft" if as_folder else file))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, datamodule=_datamodule(toy_files, tok_path))
    before = sft.model.state_dict()
    emb = next(name for name, value in before.items() if value.ndim == 2)
    # a fresh module built from the same checkpoint holds exactly the SFT backbone and a new head
    fresh = RewardModule(init_from=str(file))
    fresh.configure_model()
    for name, value in before.items():
        torch.testing.assert_close(fresh.reward_model.backbone.state_dict()[name], value)
    assert module.trainer.global_step == 2
    assert not torch.equal(
        module.reward_model.backbone.state_dict()[emb], before[emb]
    )  # and the fit trained it
    assert float(fresh.reward_model.score_mean) == 0.0 and float(fresh.reward_model.score_std) == 1.0


def test_tokenizer_mismatch_between_data_and_checkpoint_errors(
    tmp_path: Path, toy_files: tuple[Path, Path], tok_path: Path
) -> None:
    file = tmp_path / "sft.ckpt"
    _sft_checkpoint(file, tok_path)
    other = train_tokenizer([json.dumps(r) for r in _toy_pairs(40, 3)], vocab_size=300)
    other.save(tmp_path / "other.json")
    module = RewardModule(init_from=str(file))
    dm = _datamodule(toy_files, tmp_path / "other.json")
    with pytest.raises(ValueError, match="differs from the one stored"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)


# ------------------------------------------------------------------------------------------------ data errors


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "rejected"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "No."}, "chosen"),
        ({"prompt": "Hi?", "chosen": "Yes."}, "rejected"),
    ],
    ids=["identical", "empty_reply", "missing_field"],
)
def test_bad_preference_rows_reported_before_training(
    tmp_path: Path, tok_path: Path, bad: dict, field: str
) -> None:
    rows = _toy_pairs(4, 0)
    rows.insert(2, bad)
    train = _write_jsonl(tmp_path / "bad.jsonl", rows)
    val = _write_jsonl(tmp_path / "val.jsonl", _toy_pairs(2, 1))
    module = RewardModule(model=TINY)
    with pytest.raises(DataFormatError) as info:
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=_datamodule((train, val), tok_path))
    err = info.value
    assert (Path(err.path), err.line, err.field) == (train, 3, field)
    assert f"line 3, field '{field}'" in str(err)
    assert module.reward_model is None  # stopped before any weights were built, let alone trained


# ------------------------------------------------------------------------------------------------ CLI and configs


def test_cli_fit_then_test_reports_accuracy(
    tmp_path: Path, toy_files: tuple[Path, Path], tok_path: Path, repo_root: Path, monkeypatch
) -> None:
    """``rlhf-lightning fit`` then ``test --ckpt_path ... --data.test_path <file>`` with configs/reward_tiny.yaml."""
    from rlhf_lightning.cli import run_stage_cli

    monkeypatch.chdir(repo_root)
    train, val = toy_files
    data = [
        "--data.train_path",
        str(train),
        "--data.val_path",
        str(val),
        "--data.tokenizer_path",
        str(tok_path),
    ]
    common = ["--config", "configs/reward_tiny.yaml", *data, "--trainer.enable_progress_bar", "false"]
    common += ["--model.init_args.init_from", "null"]  # random weights: no SFT run needed
    run_stage_cli(
        [
            "fit",
            *common,
            *("--trainer.max_steps", "4", "--trainer.val_check_interval", "4"),
            *("--trainer.logger.init_args.save_dir", str(tmp_path / "run")),
        ]
    )
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    cli = run_stage_cli(
        [
            "test",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--data.test_path",
            str(train),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",  # where LightningCLI saves config.yaml (not the repo root)
            str(tmp_path / "test"),
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert "test/loss" in metrics

    # test/accuracy is the checkpoint's accuracy on the test file: recompute it outside Lightning
    model, _ = load_reward_model(str(ckpt))
    dm = _datamodule(toy_files, tok_path)
    dm.setup("fit")
    with torch.no_grad():
        wins = []
        for batch in dm.train_dataloader():
            chosen, rejected = model(batch.input_ids, batch.attention_mask).chunk(2)
            wins.append(chosen > rejected)
    assert float(metrics["test/accuracy"]) == pytest.approx(float(torch.cat(wins).float().mean()))


@pytest.mark.parametrize("name", ["reward.yaml", "reward_tiny.yaml"])
def test_shipped_reward_configs_parse(repo_root: Path, monkeypatch, capsys, name: str) -> None:
    from rlhf_lightning.cli import run_stage_cli

    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as info:
        run_stage_cli(["fit", "--config", f"configs/{name}", "--print_config"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    assert "rlhf_lightning.stages.reward.RewardModule" in text
    assert "rlhf_lightning.data.preference.PreferenceDataModule" in text
    assert "monitor: val/loss" in text
