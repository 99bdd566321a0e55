"""KL estimators, KL-penalised rewards (score at the last valid token), and the KL controllers."""

import math

import pytest
import torch

from rlhf_lightning.functional.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
)

LN2 = math.log(2.0)


def test_k1_k2_k3_hand_numbers():
    # token 1: p = 0.5, p_ref = 0.25 -> k1 = ln 2 = 0.6931; k2 = 0.5 (ln 2)^2 = 0.2402
    #          r = p_ref / p = 0.5 -> k3 = (0.5 - 1) - ln 0.5 = -0.5 + 0.6931 = 0.1931
    # token 2: p = 0.25, p_ref = 0.5 -> k1 = -ln 2 (negative); k2 = 0.2402; r = 2 -> k3 = 1 - ln 2 = 0.3069
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([[LN2, -LN2]]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([[0.5 * LN2**2, 0.5 * LN2**2]]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[LN2 - 0.5, 1 - LN2]]))


def test_estimators_nonnegative_and_zero_at_equality():
    torch.manual_seed(0)
    logp = -torch.rand(64, 16) * 8
    ref = -torch.rand(64, 16) * 8
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k2(logp, ref) >= 0).all()
    for fn in (kl_k1, kl_k2, kl_k3):
        assert fn(logp, logp).eq(0).all()
    # tiny differences: k3 ~ d^2 / 2 stays accurate and non-negative (expm1, not exp - 1)
    d = torch.tensor([1e-4, -1e-4, 1e-7])
    torch.testing.assert_close(kl_k3(torch.zeros(3), d), d**2 / 2, rtol=1e-3, atol=1e-12)


def test_k1_k3_are_unbiased_kl_estimates_under_sampling():
    # Sampling from p, E[k1] = E[k3] = KL(p || p_ref)
    torch.manual_seed(1)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, ref = p.log()[tokens], q.log()[tokens]
    assert kl_k1(logp, ref).mean().item() == pytest.approx(exact.item(), abs=0.01)
    assert kl_k3(logp, ref).mean().item() == pytest.approx(exact.item(), abs=0.01)


@pytest.mark.parametrize("lengths", [[4, 1, 2], [1, 1, 1], [4, 4, 4], [3, 2, 0]])
def test_kl_penalized_rewards_score_at_last_valid_token(lengths):
    B, R, beta = 3, 4, 0.5
    lengths = torch.tensor(lengths)
    mask = torch.arange(R) < lengths[:, None]
    scores = torch.tensor([1.0, 2.0, 3.0])
    # k1 = 0.1 on valid tokens -> -beta * k1 = -0.05; padding holds garbage log-probs that must not count
    ref = torch.full((B, R), -2.0)
    logp = torch.where(mask, ref + 0.1, torch.full((B, R), 50.0))
    out = kl_penalized_rewards(scores, logp, ref, mask, beta)
    expected = torch.where(mask, torch.full((B, R), -0.05), torch.zeros(B, R))
    for b, n in enumerate(lengths.tolist()):
        if n > 0:  # score added at index n - 1, the last valid token (the EOS when there is one)
            expected[b, n - 1] += scores[b]
    torch.testing.assert_close(out, expected)
    assert out[~mask].eq(0).all()


def test_kl_penalized_rewards_zero_kl_gives_score_only():
    mask = torch.tensor([[True, True, False]])
    lp = torch.randn(1, 3)
    out = kl_penalized_rewards(torch.tensor([0.7]), lp, lp, mask, beta=0.1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.7, 0.0]]))


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_numbers():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    # kl 9: 9 / 6 - 1 = 0.5 -> clipped to 0.2; beta *= 1 + 0.2 * 256 / 10000 = 1.00512 -> 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    # kl 3: 3 / 6 - 1 = -0.5 -> -0.2; beta *= 1 - 0.00512 = 0.99488 -> 0.100512 * 0.99488 = 0.0999973786
    assert ctl.update(torch.tensor(3.0), 256) == pytest.approx(0.0999973786)
    # inside the clip: target 6, kl 6.6 -> error 0.1; horizon 1000, 100 steps -> beta *= 1.01
    ctl2 = AdaptiveKLController(0.1, 6.0, 1000)
    assert ctl2.update(6.6, 100) == pytest.approx(0.101)
    # on target: unchanged
    assert ctl2.update(6.0, 100) == pytest.approx(0.101)


def test_adaptive_controller_state_roundtrip():
    ctl = AdaptiveKLController(0.2, 4.0, 100)
    ctl.update(10.0, 10)
    restored = AdaptiveKLController(0.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, ctl.target, ctl.horizon)
    assert restored.update(1.0, 5) == ctl.update(1.0, 5)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
