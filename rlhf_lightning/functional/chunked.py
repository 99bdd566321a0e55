"""Token log-probs and cross-entropy through the LM head, chunked over tokens: no (N, V) float32 tensor is kept.

``lm_head_logprobs(hidden, weight, targets)`` equals ``log_softmax(hidden @ weight.T + bias)[n, targets[n]]`` for each
of N selected positions, but projects C tokens at a time (C = ``chunk_size``). The forward keeps only the (N,)
log-sum-exp per token; the backward recomputes each chunk's logits from ``hidden`` and ``weight`` and turns them into
``grad_z = g * (onehot(target) - softmax(z))`` one chunk at a time, so both passes hold at most a few (C, V) float32
buffers instead of the (N, V) logits (and their float32 copy, softmax and gradient) that the plain path keeps alive
between forward and backward. The cost is a second (C, D) x (D, V) matmul per chunk in the backward (the "recompute"
of activation checkpointing, here for the largest activation of a language model).

Precision: the matmuls run in the autocast dtype when autocast is on for the device (bf16-mixed), else in the
promoted dtype of ``hidden`` and ``weight``; the logits are upcast to float32 for log-sum-exp and softmax, and the
weight gradient is accumulated over chunks in float32, then cast to the weight's dtype.

Sources: the fused / chunked linear cross-entropy of Liger Kernel (Hsu et al. 2024, arXiv 2410.10989) and of
Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009); the logit-to-token
shift and temperature follow Huang et al. 2024 (arXiv 2403.17031).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_chunk_size", "lm_head_logprobs", "lm_head_nll_loss"]

_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in float32)


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits hold about 8M elements (32 MiB), at least 1."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float) -> Tensor:
    """(C, D) x (V, D) [+ (V,)] -> (C, V) logits in float32 (float64 for float64 inputs), divided by ``temperature``."""
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if temperature == 1.0 else z / temperature


class _LMHeadLogprobs(torch.autograd.Function):
    """Chunked ``log_softmax(h @ W.T + b)`` gathered at the targets; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, dtype):
        n = hidden.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                z = _chunk_logits(hidden[start:end].to(dtype), w, b, temperature)
                chunk_lse = torch.logsumexp(z, dim=-1)
                out[start:end] = z.gather(-1, targets[start:end, None]).squeeze(-1) - chunk_lse
                lse[start:end] = chunk_lse
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.temperature, ctx.dtype = chunk_size, temperature, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, chunk_size, temperature = ctx.dtype, ctx.chunk_size, ctx.temperature
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_b else None
        grad_out = grad_out.to(lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end].to(dtype)
                g_out = grad_out[start:end, None]  # (C, 1)
                # d logp / d z = onehot(target) - softmax(z), built in place in the recomputed logits buffer
                z = _chunk_logits(h, w, b, temperature)
                z.sub_(lse[start:end, None]).exp_().mul_(-g_out)
                z.scatter_add_(-1, targets[start:end, None], g_out)
                if temperature != 1.0:
                    z.div_(temperature)
                if need_b:
                    grad_b += z.sum(0)
                g = z.to(dtype)
                del z
                if need_h:
                    grad_h[start:end] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (g.T @ h).to(grad_w.dtype)
                del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def lm_head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-probability of each target token under ``softmax((hidden @ weight.T + bias) / temperature)``, chunked.

    Shapes: ``hidden`` (N, D) for the N positions whose next token counts (already selected: padding and prompt
    positions never reach the head); ``weight`` (V, D) (the LM head's, tied or not); ``bias`` (V,) or None;
    ``targets`` (N,) long. Returns (N,) float32 (float64 for float64 inputs). ``chunk_size`` tokens are projected at a time (None:
    :func:`default_chunk_size`); gradients flow to ``hidden``, ``weight`` and ``bias`` (see the module docstring).
    Source: chunked linear cross-entropy (Liger Kernel, arXiv 2410.10989; Wijmans et al. 2024, arXiv 2411.09009).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, D) and weight (V, D); got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"expected bias (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(hidden, weight)
    return _LMHeadLogprobs.apply(
        hidden, weight, bias, targets.long(), int(chunk_size), float(temperature), dtype
    )


def lm_head_nll_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean NLL of already-selected target tokens through the LM head, chunked: ``token_nll_loss`` without logits.

    Shapes: ``hidden`` (N, D), ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (N,). Returns the loss (0 with a
    zero gradient when N == 0) and detached stats ``{"loss", "tokens"}``, as ``functional.losses.token_nll_loss``.
    Source: as :func:`lm_head_logprobs`.
    """
    if targets.numel() == 0:
        loss = hidden.sum() * 0.0 + weight.sum() * 0.0
    else:
        loss = -lm_head_logprobs(hidden, weight, targets, bias, chunk_size=chunk_size).mean()
    tokens = torch.tensor(float(targets.numel()), device=hidden.device)
    return loss, {"loss": loss.detach(), "tokens": tokens}
