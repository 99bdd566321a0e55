"""Losses against hand-worked numbers: SFT, pairwise (Bradley-Terry), PPO policy and value, entropy, DPO."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_lightning.functional.losses import (
    dpo_loss,
    entropy_loss,
    ipo_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)


def _detached(stats):
    return all(not v.requires_grad for v in stats.values())


# ---------------------------------------------------------------- SFT


def test_sft_loss_matches_cross_entropy_on_counted_targets():
    torch.manual_seed(0)
    B, T, V = 3, 6, 10
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    loss_mask = torch.tensor(
        [
            [False, False, True, True, False, False],  # assistant tokens at 2, 3
            [False, True, True, True, True, True],
            [False, False, False, False, False, True],
        ]
    )
    loss, stats = sft_loss(logits, ids, loss_mask)
    targets = torch.where(loss_mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert stats["tokens"].item() == 2 + 5 + 1
    assert _detached(stats) and loss.requires_grad


def test_sft_loss_ignores_non_assistant_and_padding_targets():
    torch.manual_seed(1)
    B, T, V = 2, 7, 12
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, _ = sft_loss(logits, ids, loss_mask)
    changed = torch.where(loss_mask, ids, torch.randint(0, V, (B, T)))  # rewrite every non-counted target
    changed_logits = logits.clone()
    changed_logits[:, :-1][~loss_mask[:, 1:]] = (
        1e4  # logits predicting non-counted targets are irrelevant too
    )
    torch.testing.assert_close(sft_loss(changed_logits, changed, loss_mask)[0], loss)


def test_sft_loss_hand_number_uniform_logits():
    # uniform logits over V = 4 -> every token has p = 1/4 -> loss = ln 4
    loss, stats = sft_loss(
        torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, True]])
    )
    assert loss.item() == pytest.approx(math.log(4), abs=1e-6)
    assert stats["tokens"].item() == 2


# ---------------------------------------------------------------- pairwise


def test_pairwise_loss_hand_numbers_and_gradient_sign():
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    # row 0: -log sigmoid(1) = log(1 + e^-1) = 0.31326; row 1: -log sigmoid(-1) = log(1 + e) = 1.31326
    loss, stats = pairwise_loss(chosen, rejected)
    assert loss.item() == pytest.approx((math.log(1 + math.e**-1) + math.log(1 + math.e)) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["chosen_mean"].item() == 0.5 and stats["rejected_mean"].item() == 0.5
    assert stats["margin_mean"].item() == 0.0  # mean of chosen - rejected: (1 + -1) / 2
    loss.backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(c - r)) < 0: raising the chosen score lowers the loss
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert chosen.grad[0].item() == pytest.approx(
        -(1 - torch.sigmoid(torch.tensor(1.0)).item()) / 2, abs=1e-6
    )
    assert _detached(stats)


def test_pairwise_loss_single_pair_and_margin():
    # c = 1, r = 0, m = 0 -> log(1 + e^-1); with m = 0.5 -> log(1 + e^-0.5) = 0.47408
    one = torch.tensor([1.0])
    zero = torch.tensor([0.0])
    assert pairwise_loss(one, zero)[0].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    loss_m, stats = pairwise_loss(one, zero, torch.tensor([0.5]))
    assert loss_m.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-6)
    assert stats["accuracy"].item() == 1.0


# ---------------------------------------------------------------- PPO policy


def test_policy_loss_ratio_one():
    torch.manual_seed(2)
    logp = torch.randn(4, 6)
    adv = torch.randn(4, 6)
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 4])[:, None]
    loss, stats = ppo_policy_loss(logp.clone().requires_grad_(), logp, adv, mask)
    # ratio exactly 1 -> surrogate = -A on every valid token
    assert loss.item() == pytest.approx(-adv[mask].mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["policy_loss"].item() == loss.item() and _detached(stats)


def test_policy_loss_clipping_hand_numbers():
    # eps = 0.2, ratios via logp - old = ln(ratio); a 5th padded token with a wild ratio must not count
    #  a: A=+1, r=1.5: unclipped -1.5, clipped -1.2 -> max -1.2 (clipped, no gradient)
    #  b: A=+1, r=0.5: unclipped -0.5, clipped -0.8 -> max -0.5 (unclipped)
    #  c: A=-1, r=1.5: unclipped +1.5, clipped +1.2 -> max +1.5 (unclipped)
    #  d: A=-1, r=0.5: unclipped +0.5, clipped +0.8 -> max +0.8 (clipped, no gradient)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clipfrac = 2/4; ratio mean (1.5+0.5+1.5+0.5)/4 = 1, max 1.5
    # approx_kl (k3 = (r - 1) - ln r): r=1.5 -> 0.5 - 0.405465 = 0.094535; r=0.5 -> -0.5 + 0.693147 = 0.193147
    #           mean = (2 * 0.094535 + 2 * 0.193147) / 4 = 0.143841
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 100.0]])
    old = torch.full((1, 5), -1.0)
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 50.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["approx_kl"].item() == pytest.approx(0.143841, abs=1e-5)
    loss.backward()
    # d/dlogp of -A * r = -A * r (r = exp(logp - old)), / 4 tokens: b -> -0.5/4, c -> +1.5/4; a, d clipped -> 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0, 0.0]]))


# ---------------------------------------------------------------- PPO value


def test_value_loss_clipping_hand_numbers():
    # eps_v = 0.2
    #  1: V=1.0, V_old=0.5, R=1.0: clip(V) = 0.7; (V-R)^2 = 0, (0.7-1)^2 = 0.09 -> 0.09 (clipped)
    #  2: V=0.6, V_old=0.5, R=2.0: inside the clip; both 1.4^2 = 1.96 -> 1.96 (not clipped)
    #  3: V=0.0, V_old=0.5, R=-1.0: clip(V) = 0.3; 1^2 = 1, 1.3^2 = 1.69 -> 1.69 (clipped)
    # loss = 0.5 * (0.09 + 1.96 + 1.69) / 3 = 0.5 * 3.74 / 3 = 0.623333; clipfrac = 2/3
    # explained variance: Var(R = [1, 2, -1]) = 42/27 (population); residual R - V = [0, 1.4, -1]:
    #   mean 0.13333, Var = (0.017778 + 1.604444 + 1.284444) / 3 = 0.968889 -> EV = 1 - 0.968889 / 1.555556 = 0.377143
    values = torch.tensor([[1.0, 0.6, 0.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, -7.0]])
    returns = torch.tensor([[1.0, 2.0, -1.0, 30.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_eps_v=0.2)
    assert loss.item() == pytest.approx(0.623333, abs=1e-5)
    assert stats["value_clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["explained_variance"].item() == pytest.approx(0.377143, abs=1e-5)
    loss.backward()
    # gradient only through the unclipped branch of token 2: 0.5 * 2 * (0.6 - 2.0) / 3 = -0.466667
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.4 / 3, 0.0, 0.0]]))
    assert _detached(stats)


def test_value_loss_perfect_values():
    returns = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, stats = ppo_value_loss(returns.clone(), returns, returns, mask)
    assert loss.item() == 0.0 and stats["value_clipfrac"].item() == 0.0
    assert stats["explained_variance"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- entropy and DPO


def test_entropy_loss_uniform_and_masked():
    # valid positions: uniform over V = 8 -> H = ln 8; padded position: a peaked distribution that must not count
    logits = torch.zeros(1, 3, 8)
    logits[0, 2, 0] = 100.0
    mask = torch.tensor([[True, True, False]])
    loss, stats = entropy_loss(logits, mask)
    assert stats["entropy"].item() == pytest.approx(math.log(8), abs=1e-6)
    assert loss.item() == pytest.approx(-math.log(8), abs=1e-6)


def test_dpo_loss_hand_numbers():
    # beta 0.1; chosen: policy -1, ref -2 -> implicit reward 0.1 * 1 = 0.1
    #           rejected: policy -3, ref -2 -> 0.1 * -1 = -0.1; margin 0.2 -> loss = log(1 + e^-0.2) = 0.598139
    pc = torch.tensor([-1.0], requires_grad=True)
    loss, stats = dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert stats["reward_chosen"].item() == pytest.approx(0.1)
    assert stats["reward_rejected"].item() == pytest.approx(-0.1)
    assert stats["margin"].item() == pytest.approx(0.2)
    assert stats["accuracy"].item() == 1.0
    loss.backward()
    assert pc.grad.item() < 0  # raising the chosen log-prob lowers the loss
    # policy == reference -> margin 0 -> loss ln 2
    x = torch.randn(4)
    assert dpo_loss(x, x + 1, x, x + 1)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_conservative_dpo_label_smoothing_hand_numbers():
    # same pair as above (beta * h = 0.2), label smoothing 0.1:
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139
    pc = torch.tensor([-1.0], requires_grad=True)
    args = (torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, stats = dpo_loss(pc, *args, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.618139, abs=1e-6)
    assert stats["margin"].item() == pytest.approx(0.2) and stats["accuracy"].item() == 1.0
    loss.backward()
    # d/dpc = 0.1 * (-(0.9) * sigmoid(-0.2) + 0.1 * sigmoid(0.2)) = 0.1 * (-0.9 * 0.450166 + 0.1 * 0.549834)
    assert pc.grad.item() == pytest.approx(0.1 * (-0.9 * 0.450166 + 0.1 * 0.549834), abs=1e-6)
    # smoothing 0 is plain DPO; smoothing 0.5 or more is refused in one line
    assert dpo_loss(pc, *args, beta=0.1, label_smoothing=0.0)[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.2))
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, *args, label_smoothing=0.5)


def test_ipo_loss_hand_numbers():
    # beta 0.5 -> target gap 1 / (2 * 0.5) = 1.
    # pair 1: chosen -1 vs ref -2 (+1), rejected -3 vs ref -2 (-1): h = 2 -> (2 - 1)^2 = 1
    # pair 2: chosen -1.5 vs ref -2 (+0.5), rejected -2 vs ref -2 (0): h = 0.5 -> (0.5 - 1)^2 = 0.25; mean 0.625
    pc = torch.tensor([-1.0, -1.5], requires_grad=True)
    pr, rc, rr = torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss, stats = ipo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.625)
    # implicit rewards 0.5 * (policy - ref): chosen (0.5, 0.25) -> 0.375; rejected (-0.5, 0) -> -0.25
    assert stats["reward_chosen"].item() == pytest.approx(0.375)
    assert stats["reward_rejected"].item() == pytest.approx(-0.25)
    assert stats["margin"].item() == pytest.approx(0.625) and stats["accuracy"].item() == 1.0
    loss.backward()
    # d/dpc_i = 2 * (h_i - 1) / B: pair 1 overshoots the target (+1: lower the chosen), pair 2 falls short (-0.5)
    assert pc.grad.tolist() == pytest.approx([1.0, -0.5])
    assert _detached(stats)


def test_preference_losses_reject_mismatched_shapes_and_bad_beta():
    x = torch.zeros(3)
    for fn in (dpo_loss, ipo_loss):
        with pytest.raises(ValueError, match=r"\(B,\)"):
            fn(x, x, x, torch.zeros(2))
        with pytest.raises(ValueError, match="beta"):
            fn(x, x, x, x, beta=0.0)


# ---------------------------------------------------------------- package surface


def test_package_reexports_and_stays_pure():
    code = (
        "import sys, rlhf_lightning.functional as f\n"
        "names = ['masked_whiten', 'logprobs_from_logits', 'kl_k3', 'AdaptiveKLController', 'gae',\n"
        "         'sft_loss', 'pairwise_loss', 'ppo_policy_loss', 'ppo_value_loss', 'dpo_loss', 'entropy_loss']\n"
        "assert all(hasattr(f, n) for n in names) and all(hasattr(f, n) for n in f.__all__)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'transformers', 'pytorch_lightning')\n"
        "       or m.startswith(('rlhf_lightning.data', 'rlhf_lightning.models', 'rlhf_lightning.stages'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_nll_loss_on_selected_positions_equals_sft_loss() -> None:
    """Selecting the counted positions before the vocabulary projection gives sft_loss exactly (value and grad)."""
    from rlhf_lightning.functional.losses import sft_loss, token_nll_loss

    torch.manual_seed(0)
    B, T, D, V = 3, 7, 5, 11
    hidden = torch.randn(B, T, D, requires_grad=True)
    head = torch.nn.Linear(D, V, bias=False)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.4
    full, _ = sft_loss(head(hidden), ids, mask)
    (g_full,) = torch.autograd.grad(full, hidden)
    selected, stats = token_nll_loss(head(hidden[:, :-1][mask[:, 1:]]), ids[:, 1:][mask[:, 1:]])
    (g_sel,) = torch.autograd.grad(selected, hidden)
    assert torch.allclose(full, selected, atol=1e-6) and torch.allclose(g_full, g_sel, atol=1e-6)
    assert stats["tokens"] == mask[:, 1:].sum()
    empty, _ = token_nll_loss(torch.zeros(0, V, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
