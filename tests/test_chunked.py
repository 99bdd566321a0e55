"""Chunked LM-head log-probs / cross-entropy against the naive full-logits computation (values, gradients, bf16,
odd chunk sizes, autocast) and a deterministic memory check: the largest tensor any op creates in forward + backward
is counted by a dispatch mode, and must stay below the (N, V) logits that the naive path builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_lightning.functional.chunked import default_chunk_size, lm_head_logprobs, lm_head_nll_loss
from rlhf_lightning.functional.logprobs import logprobs_from_logits
from rlhf_lightning.functional.losses import token_nll_loss
from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.lm_head import linear_head, selected_logprobs


def _inputs(n: int = 23, d: int = 16, v: int = 97, dtype=torch.float64, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def _naive(hidden, weight, bias, targets, temperature=1.0):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _grads(out, *tensors):
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)  # a non-uniform upstream gradient
    return torch.autograd.grad((out * weights).sum(), [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 23, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_naive_values_and_gradients(chunk_size: int, bias: bool) -> None:
    hidden, weight, b, targets = _inputs(dtype=torch.float32, bias=bias)
    ref = _naive(hidden, weight, b, targets)
    got = lm_head_logprobs(hidden, weight, targets, b, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (23,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g_ref, g_got in zip(_grads(ref, hidden, weight, b), _grads(got, hidden, weight, b)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_with_temperature() -> None:
    hidden, weight, b, targets = _inputs(n=6, d=4, v=11, bias=True)
    fn = lambda h, w, bb: lm_head_logprobs(h, w, targets, bb, temperature=0.7, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-6, atol=1e-4)
    torch.testing.assert_close(
        fn(hidden, weight, b), torch.log_softmax((hidden @ weight.T + b) / 0.7, -1)[torch.arange(6), targets]
    )


def test_bf16_inputs_match_naive_bf16() -> None:
    hidden, weight, _, targets = _inputs(n=40, d=32, v=300, dtype=torch.float32)
    h16, w16 = (hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_())
    got = lm_head_logprobs(h16, w16, targets, chunk_size=9)
    ref = _naive(h16, w16, None, targets)  # bf16 matmul, float32 log-softmax: what the plain path computes
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    (g_h, g_w), (r_h, r_w) = _grads(got, h16, w16), _grads(ref, h16, w16)
    assert g_h.dtype == torch.bfloat16 and g_w.dtype == torch.bfloat16
    torch.testing.assert_close(g_h.float(), r_h.float(), rtol=0.05, atol=2e-2)
    torch.testing.assert_close(g_w.float(), r_w.float(), rtol=0.05, atol=2e-2)


def test_under_cpu_autocast_runs_in_bf16_and_returns_float32_grads() -> None:
    hidden, weight, _, targets = _inputs(n=30, d=32, v=200, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_head_logprobs(hidden, weight, targets, chunk_size=8)
        ref = logprobs_from_logits((hidden @ weight.T)[None], targets[None])[0]  # autocast bf16 matmul
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    g_h, g_w = _grads(got, hidden, weight)
    r_h, r_w = _grads(ref, hidden, weight)
    assert g_h.dtype == torch.float32 and g_w.dtype == torch.float32  # grads in the parameters' dtype
    torch.testing.assert_close(g_h, r_h, rtol=0.05, atol=2e-2)
    torch.testing.assert_close(g_w, r_w, rtol=0.05, atol=2e-2)


def test_nll_loss_equals_token_nll_loss_and_handles_no_tokens() -> None:
    hidden, weight, _, targets = _inputs(dtype=torch.float32)
    loss, stats = lm_head_nll_loss(hidden, weight, targets, chunk_size=6)
    ref, ref_stats = token_nll_loss(hidden @ weight.T, targets)
    torch.testing.assert_close(loss, ref)
    assert float(stats["tokens"]) == float(ref_stats["tokens"]) == 23
    empty, stats = lm_head_nll_loss(hidden[:0], weight, targets[:0])
    assert float(empty) == 0.0 and float(stats["tokens"]) == 0.0
    empty.backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) == 0.0


def test_frozen_weight_gets_no_gradient() -> None:
    hidden, weight, _, targets = _inputs(dtype=torch.float32)
    weight.requires_grad_(False)
    lm_head_logprobs(hidden, weight, targets, chunk_size=5).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_rejects_bad_shapes() -> None:
    hidden, weight, _, targets = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="weight"):
        lm_head_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        lm_head_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        lm_head_logprobs(hidden, weight, targets, chunk_size=0)
    assert default_chunk_size(1 << 30) == 1 and default_chunk_size(32_000) == 262


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(fn) -> int:
    hidden, weight, _, targets = _inputs(n=256, d=16, v=4096, dtype=torch.float32)
    with _LargestTensor() as mode:
        fn(hidden, weight, targets).sum().backward()
    return mode.largest


def test_chunked_never_creates_a_tokens_by_vocab_tensor() -> None:
    n, v = 256, 4096
    naive = _largest_tensor(lambda h, w, t: _naive(h, w, None, t))
    chunked = _largest_tensor(lambda h, w, t: lm_head_logprobs(h, w, t, chunk_size=32))
    assert naive >= n * v  # the check sees the full logits of the plain path (the test can fail)
    assert chunked <= max(32 * v, v * 16)  # one chunk's logits, or the (V, D) weight gradient
    assert chunked * 8 <= n * v


def test_selected_logprobs_uses_the_linear_head_of_the_built_in_gpt() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=300, n_embd=32, n_head=2, n_layer=1)
    ids = torch.randint(0, 300, (2, 12))
    assert linear_head(model) is model.lm_head and model.lm_head.weight is model.wte.weight  # tied
    hidden = model.hidden_states(ids)[:, :-1].reshape(-1, 32)
    targets = ids[:, 1:].reshape(-1)
    got = selected_logprobs(model, hidden, targets, chunk_size=5)
    (g_got,) = torch.autograd.grad(got.sum(), model.wte.weight)
    ref = selected_logprobs(model, model.hidden_states(ids)[:, :-1].reshape(-1, 32), targets, chunked=False)
    (g_ref,) = torch.autograd.grad(ref.sum(), model.wte.weight)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_a_wrapped_head_falls_back_to_the_module() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(8, 20, bias=False)

        def forward(self, x):
            return self.inner(x) * 2.0  # not what weight alone would give

    model = nn.Module()
    model.lm_head = Wrapped()
    assert linear_head(model) is None
    hidden, targets = torch.randn(5, 8), torch.randint(0, 20, (5,))
    ref = torch.log_softmax(model.lm_head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(selected_logprobs(model, hidden, targets), ref)
