"""Masked reductions over token tensors: sum, mean, variance and whitening over the valid tokens only.

Every ``mask`` is a ``bool`` tensor broadcastable to ``x`` where ``True`` means "this token counts". Invalid
positions are removed with ``torch.where`` rather than multiplied by zero, so a NaN or inf sitting in padding can
never leak into a statistic.

Sources: the masked statistics and advantage whitening follow Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO" (arXiv 2403.17031), which whitens advantages over the valid tokens of the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_left_padded", "is_right_padded", "masked_mean", "masked_sum", "masked_var", "masked_whiten"]


def _check(x: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = counts), got {mask.dtype}")
    return mask.expand_as(x) if mask.shape != x.shape else mask


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is True.

    Shapes: ``x`` any shape, e.g. (B, R); ``mask`` bool, same shape (or broadcastable to it).
    Returns a scalar when ``dim`` is None, else ``x`` reduced along ``dim`` (e.g. (B,) for ``dim=1``).
    Source: Huang et al. 2024 (arXiv 2403.17031): padding never contributes to a statistic.
    """
    mask = _check(x, mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True.

    Shapes: ``x`` e.g. (B, R); ``mask`` bool, same shape. Returns a scalar when ``dim`` is None (mean over every
    valid token of the batch, a token-level mean), else the per-slice mean along ``dim`` (e.g. (B,) per row).
    A slice with no valid token gives 0 (not NaN), and its gradient is 0.
    Source: Huang et al. 2024 (arXiv 2403.17031).
    """
    mask = _check(x, mask)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is True (a scalar over the whole tensor).

    Shapes: ``x`` e.g. (B, R); ``mask`` bool, same shape. Returns a scalar.
    ``unbiased=True`` applies Bessel's correction n / (n - 1) over the n valid tokens; with n <= 1 the variance is
    0 rather than NaN (there is nothing to estimate).
    Source: Huang et al. 2024 (arXiv 2403.17031), whitening statistics over valid tokens only.
    """
    mask = _check(x, mask)
    mean = masked_mean(x, mask)
    centered = torch.where(mask, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    n = mask.sum().to(x.dtype)
    denom = (n - 1) if unbiased else n
    return (centered * centered).sum() / denom.clamp_min(1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its valid tokens; invalid positions become 0.

    Shapes: ``x`` e.g. advantages (B, R); ``mask`` bool (B, R). Returns a tensor shaped like ``x``:
    ``(x - mean) / sqrt(var + eps)`` on valid tokens, or ``(x - mean) / sqrt(var + eps) + mean`` when
    ``shift_mean`` is False (rescale only, keep the mean, as PPO implementations do for rewards), and 0 elsewhere.
    With ``shift_mean=True`` the valid tokens end with mean 0 and unbiased std 1 (up to ``eps``).
    ``moments=(mean, var)`` (scalars) whitens with those instead of the valid tokens' own, e.g. the moments of the
    whole data-parallel batch (``rlhf_lightning.distributed.global_masked_moments``).
    Source: Huang et al. 2024 (arXiv 2403.17031), "advantage whitening" over the valid tokens of the batch.
    """
    mask = _check(x, mask)
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask, unbiased=True))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def is_right_padded(mask: Tensor) -> bool:
    """True when every row of ``mask`` (B, T) is real tokens followed only by padding (or no padding)."""
    mask = mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def is_left_padded(mask: Tensor) -> bool:
    """True when every row of ``mask`` (B, T) is padding (if any) followed only by real tokens."""
    mask = mask.bool()
    return bool((mask[:, 1:] >= mask[:, :-1]).all())
