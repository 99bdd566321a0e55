"""Tests for scalar heads, last-token indexing, reward and value models."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.heads import RewardModel, ScalarHead, ValueModel, last_token_index

V = 50


def test_scalar_head_init_stats() -> None:
    torch.manual_seed(0)
    d = 1024
    head = ScalarHead(d)
    assert head.linear.weight.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.1)
    assert head.linear.bias.item() == 0.0
    assert head(torch.randn(3, 5, d)).shape == (3, 5)


def test_last_token_index_left_right_and_single() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(torch.tensor([[0, 1, 1, 0]])).tolist() == [2]  # left and right padding at once


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=V).eval()


def test_reward_reads_last_real_token_regardless_of_padding(backbone) -> None:
    rm = RewardModel(backbone).eval()
    tokens = torch.randint(2, V, (6,))
    alone = rm(tokens[None], torch.ones(1, 6, dtype=torch.bool))
    assert alone.shape == (1,)
    # Right padding of 3 (garbage content), and of 1 with different garbage.
    for pad, fill in ((3, 7), (1, 42)):
        ids = torch.cat([tokens, torch.full((pad,), fill)])[None]
        mask = torch.cat([torch.ones(6), torch.zeros(pad)]).bool()[None]
        torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=0)
    # Left padding.
    ids = torch.cat([torch.full((4,), 9), tokens])[None]
    mask = torch.cat([torch.zeros(4), torch.ones(6)]).bool()[None]
    torch.testing.assert_close(rm(ids, mask), alone, atol=1e-5, rtol=0)
    # The score is read at the last real token: it equals the head on that token's hidden state.
    h = backbone.hidden_states(tokens[None])[:, -1]
    torch.testing.assert_close(rm.head(h), alone)


def test_reward_normalisation_buffers(backbone) -> None:
    rm = RewardModel(backbone)
    assert {"score_mean", "score_std"} <= set(dict(rm.named_buffers()))
    assert "score_mean" in rm.state_dict()
    rm.set_score_stats(2.0, 4.0)
    restored = RewardModel(backbone)  # the statistics travel with the weights (checkpoint, export)
    restored.load_state_dict(rm.state_dict())
    torch.testing.assert_close(restored.normalize(torch.tensor([2.0, 6.0])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        rm.set_score_stats(0.0, 0.0)


def test_value_model_shapes_and_hidden_size(backbone) -> None:
    vm = ValueModel(backbone)
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    values = vm(ids, mask)
    assert values.shape == (2, 7) and torch.isfinite(values).all()
    assert ValueModel(backbone, hidden_size=64).head.linear.in_features == 64
    with pytest.raises(ValueError):
        RewardModel(torch.nn.Linear(2, 2))


def test_reward_head_bias_is_frozen_at_zero_value_head_bias_trains() -> None:
    from rlhf_lightning.models.gpt import create_model
    from rlhf_lightning.models.heads import RewardModel, ValueModel

    reward = RewardModel(create_model("tiny", vocab_size=64))
    value = ValueModel(create_model("tiny", vocab_size=64))
    assert not reward.head.linear.bias.requires_grad and float(reward.head.linear.bias) == 0.0
    assert value.head.linear.bias.requires_grad
