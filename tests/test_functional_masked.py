"""Masked statistics: hand-worked numbers, padding never counts, whitening normalises valid tokens only."""

import math

import pytest
import torch

from rlhf_lightning.functional.masked import masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
M = torch.tensor([[True, True, True], [True, False, False]])


def test_masked_sum_and_mean_hand_numbers():
    # valid values 1, 2, 3, 4: sum 10, mean 10 / 4 = 2.5; per row: (1+2+3)/3 = 2, 4/1 = 4
    assert masked_sum(X, M).item() == 10.0
    assert masked_mean(X, M).item() == 2.5
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([6.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([2.0, 4.0]))


def test_masked_var_hand_numbers():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; unbiased 5 / 3, biased 5 / 4
    assert masked_var(X, M).item() == pytest.approx(5 / 3)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(5 / 4)
    torch.testing.assert_close(masked_var(X, M), torch.tensor([1.0, 2.0, 3.0, 4.0]).var())


def test_nan_and_inf_in_padding_do_not_leak():
    x = X.clone()
    x[1, 1], x[1, 2] = float("nan"), float("inf")
    assert masked_mean(x, M).item() == 2.5
    assert masked_var(x, M).item() == pytest.approx(5 / 3)
    out = masked_whiten(x, M)
    assert torch.isfinite(out).all()
    assert out[1, 1:].eq(0).all()


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(M)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    torch.testing.assert_close(masked_mean(X, empty, dim=1), torch.zeros(2))


def test_mask_must_be_bool():
    with pytest.raises(TypeError):
        masked_mean(X, M.float())


def test_whiten_ignores_padding_values_and_normalises_valid_tokens():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    lengths = torch.tensor([7, 3, 1, 5])
    mask = torch.arange(7) < lengths[:, None]
    out = masked_whiten(x, mask)
    changed = torch.where(mask, x, torch.randn(4, 7) * 1000)
    torch.testing.assert_close(masked_whiten(changed, mask), out)
    valid = out[mask]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert out[~mask].eq(0).all()


def test_whiten_hand_numbers_and_shift_mean_false():
    # valid 1, 2, 3, 4: mean 2.5, unbiased var 5/3, so 1 -> (1 - 2.5) / sqrt(5/3) = -1.1619
    out = masked_whiten(X, M, eps=0.0)
    s = math.sqrt(5 / 3)
    torch.testing.assert_close(out, torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]]))
    kept = masked_whiten(X, M, shift_mean=False, eps=0.0)
    torch.testing.assert_close(
        kept, torch.tensor([[-1.5 / s + 2.5, -0.5 / s + 2.5, 0.5 / s + 2.5], [1.5 / s + 2.5, 0, 0]])
    )
