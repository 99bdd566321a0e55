"""The user's own ``trust_remote_code`` flag reaches every place that rebuilds a stored backbone (a stored value
never does: ``test_safe_loading.py``). A spy replaces ``model_from_spec`` and stops at the first call."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY


class _Seen(Exception):
    def __init__(self, trust: bool) -> None:
        super().__init__(trust)
        self.trust = trust


def _spy(spec, *, trust_remote_code=False):
    raise _Seen(trust_remote_code)


@pytest.fixture()
def checkpoint(tmp_path):
    """A checkpoint whose stored spec says trust_remote_code=True (which must not count)."""
    spec = {"kind": "hf", "path": "x", "config": {}, "lora": None, "trust_remote_code": True}
    payload = {
        "stage": "reward",
        "backbone_prefix": "reward_model.backbone.",
        "reward_prefix": "reward_model.",
        "model_spec": spec,
    }
    path = tmp_path / "stored.ckpt"
    torch.save({PAYLOAD_KEY: payload, "state_dict": {"reward_model.backbone.w": torch.zeros(1)}}, path)
    return str(path)


@pytest.mark.parametrize("user_flag", [False, True])
def test_every_loader_passes_the_users_flag(checkpoint, monkeypatch, tmp_path, user_flag):
    import rlhf_lightning.export as export
    import rlhf_lightning.stages.checkpoints as checkpoints
    import rlhf_lightning.stages.ppo_models as ppo_models
    import rlhf_lightning.stages.reward as reward
    import rlhf_lightning.stages.sft as sft
    from rlhf_lightning.models import factory
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.scoring import score_file

    for module in (factory, ppo_models, reward, sft, export):
        monkeypatch.setattr(module, "model_from_spec", _spy, raising=False)
    monkeypatch.setattr(checkpoints, "tokenizer_from_payload", lambda payload: None, raising=False)
    seen = []

    def run(fn) -> None:
        with pytest.raises(_Seen) as exc:
            fn()
        seen.append(exc.value.trust)

    run(
        lambda: ppo_models.load_networks(
            checkpoint, None, checkpoint, False, None, trust_remote_code=user_flag
        )
    )
    run(lambda: export.export_checkpoint(checkpoint, tmp_path / "out", trust_remote_code=user_flag))
    run(lambda: reward.load_reward_model(checkpoint, trust_remote_code=user_flag))
    convs = tmp_path / "convs.jsonl"
    convs.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    run(lambda: score_file(checkpoint, convs, tmp_path / "o.jsonl", trust_remote_code=user_flag))
    args = ModelArgs(hf_path="x", trust_remote_code=user_flag)
    module = reward.RewardModule(model=args)
    run(lambda: module.on_load_checkpoint({PAYLOAD_KEY: torch.load(checkpoint)[PAYLOAD_KEY]}))
    policy = sft.SFTModule(model=args)
    run(lambda: policy.on_load_checkpoint({PAYLOAD_KEY: torch.load(checkpoint)[PAYLOAD_KEY]}))
    assert seen == [user_flag] * 6
