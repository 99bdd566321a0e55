"""GAE (hand numbers; vectorised vs a per-row loop with ragged masks), group baselines, running moments."""

import pytest
import torch

from rlhf_lightning.functional.advantages import (
    RunningMoments,
    gae,
    group_advantages,
    group_relative_advantages,
    rloo_advantages,
)


def naive_gae_row(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded row, plain Python floats."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row loop: drop masked positions, run textbook GAE, scatter back (0 on padding)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten()
        row = naive_gae_row(rewards[b, idx].tolist(), values[b, idx].tolist(), gamma, lam)
        adv[b, idx] = torch.tensor(row, dtype=rewards.dtype)
    returns = torch.where(mask, adv + values, torch.zeros_like(values))
    return adv, returns


def test_gae_hand_example():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lambda 0.95, value after the last token = 0
    # t=2: delta = 1 + 0 - 0.7 = 0.3;        A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;      A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;      A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]; a 4th padded position with garbage must not matter
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    # gamma = lambda = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo)
    torch.manual_seed(0)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, to_go - v)
    torch.testing.assert_close(ret, to_go)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_vectorised_matches_per_row_loop_with_ragged_masks(gamma, lam):
    torch.manual_seed(1)
    B, R = 16, 12
    rewards, values = torch.randn(B, R), torch.randn(B, R)
    lengths = torch.randint(1, R + 1, (B,))
    lengths[0], lengths[1] = 1, R
    mask = torch.arange(R) < lengths[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert adv[~mask].eq(0).all() and ret[~mask].eq(0).all()
    # padding values and rewards do not matter
    noisy_r = torch.where(mask, rewards, torch.randn(B, R) * 100)
    noisy_v = torch.where(mask, values, torch.randn(B, R) * 100)
    torch.testing.assert_close(gae(noisy_r, noisy_v, mask, gamma, lam)[0], adv)


def test_gae_skips_holes_like_removed_tokens():
    # arbitrary (non-contiguous) masks behave as if the masked positions were deleted from the row
    torch.manual_seed(2)
    rewards, values = torch.randn(8, 10), torch.randn(8, 10)
    mask = torch.rand(8, 10) > 0.4
    adv, ret = gae(rewards, values, mask)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def test_group_relative_advantages_hand_numbers():
    # group 1: [1, 2, 3] mean 2, unbiased std 1 -> [-1, 0, 1]; group 2: all 5 -> 0 (no NaN)
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    out = group_relative_advantages(scores, group_size=3, eps=1e-12)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    out_nostd = group_relative_advantages(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2, normalize_std=False)
    torch.testing.assert_close(out_nostd, torch.tensor([-1.0, 1.0, -5.0, 5.0]))
    with pytest.raises(ValueError):
        group_relative_advantages(scores, group_size=4)


def test_rloo_advantages_hand_numbers():
    # [1, 2, 3]: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5  (= 3/2 * (s - mean))
    out = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0]), 3)
    torch.testing.assert_close(out, torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)


def test_named_baselines_by_hand():
    """grpo divides by the group's std, Dr. GRPO does not (Liu et al. 2025), rloo leaves each sample out."""
    scores = torch.tensor([0.0, 0.0, 0.0, 4.0, 1.0, 1.0, 1.0, 1.0])  # group 1: mean 1, unbiased std 2
    torch.testing.assert_close(
        group_advantages(scores, 4, "grpo"),
        torch.tensor([-0.5, -0.5, -0.5, 1.5, 0, 0, 0, 0]),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        group_advantages(scores, 4, "dr_grpo"), torch.tensor([-1.0, -1, -1, 3, 0, 0, 0, 0])
    )
    # 0 - 4/3 for the zeros, 4 - 0 for the four; a group of equal scores gets 0 under every baseline
    torch.testing.assert_close(
        group_advantages(scores, 4, "rloo"), torch.tensor([-4 / 3, -4 / 3, -4 / 3, 4.0, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="unknown baseline 'ppo'"):
        group_advantages(scores, 4, "ppo")


def test_running_moments_match_full_data_and_roundtrip():
    torch.manual_seed(3)
    moments = RunningMoments()
    seen = []
    for n in (5, 1, 17, 40):
        x = torch.randn(n) * 3 + 2
        batch_mean, batch_std = moments.update(x)
        assert batch_mean == pytest.approx(x.mean().item(), abs=1e-5)
        if n > 1:
            assert batch_std == pytest.approx(x.std().item(), abs=1e-5)
        seen.append(x)
    allx = torch.cat(seen).double()
    assert moments.count == allx.numel()
    assert moments.mean == pytest.approx(allx.mean().item(), abs=1e-9)
    assert moments.var == pytest.approx(allx.var(unbiased=False).item(), abs=1e-9)
    assert moments.std == pytest.approx(allx.std().item(), abs=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_running_moments_masked_update():
    moments = RunningMoments()
    x = torch.tensor([[1.0, 3.0, 1000.0], [5.0, -1000.0, -1000.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # valid 1, 3, 5: mean 3, population var (4 + 0 + 4) / 3 = 8/3
    moments.update(x, mask)
    assert (moments.count, moments.mean) == (3, pytest.approx(3.0))
    assert moments.var == pytest.approx(8 / 3)
