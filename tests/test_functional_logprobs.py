"""Log-probs / entropy from logits against log_softmax + gather; response slicing; EOS truncation; length masks."""

import math

import pytest
import torch

from rlhf_lightning.functional.logprobs import (
    entropy_from_logits,
    logprobs_from_logits,
    response_logprobs,
    sequence_lengths_to_mask,
    truncate_after_eos,
)


def naive_logprobs(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprobs_match_log_softmax_gather(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    out = logprobs_from_logits(logits, labels, temperature)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, naive_logprobs(logits, labels, temperature))


def test_logprobs_hand_numbers():
    # logits [0, ln 2, ln 3] -> softmax [1, 2, 3] / 6; label 2 -> log(3/6) = log 0.5
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]]])
    out = logprobs_from_logits(logits, torch.tensor([[2]]))
    assert out.item() == pytest.approx(math.log(0.5), abs=1e-6)
    # temperature 2 halves the logits: [0, ln 2 / 2, ln 3 / 2] -> weights 1, sqrt 2, sqrt 3; label 0 -> -log(1+√2+√3)
    out_t = logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0)
    assert out_t.item() == pytest.approx(-math.log(1 + math.sqrt(2) + math.sqrt(3)), abs=1e-6)


def test_logprobs_bf16_logits_are_upcast():
    torch.manual_seed(1)
    logits = (torch.randn(2, 4, 50) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4))
    out = logprobs_from_logits(logits, labels, 0.9)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logprobs(logits.float(), labels, 0.9))


@pytest.mark.parametrize("block_elements", [1, 7, 11 * 5, 11 * 5 * 2 + 3])
def test_blockwise_paths_match_single_block(block_elements):
    # blocks of single tokens, partial rows, whole rows, and several rows must all stitch back identically
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    out = logprobs_from_logits(logits, labels, block_elements=block_elements)
    ref = naive_logprobs(logits, labels)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(
        entropy_from_logits(logits, block_elements=block_elements), entropy_from_logits(logits)
    )
    (g,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref)


def test_entropy_matches_definition():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 9) * 2
    for temperature in (1.0, 0.5):
        p = torch.softmax(logits / temperature, -1)
        expected = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(entropy_from_logits(logits, temperature), expected)
    # uniform over V = 9 -> ln 9
    assert entropy_from_logits(torch.zeros(1, 1, 9)).item() == pytest.approx(math.log(9), abs=1e-6)


def test_response_logprobs_off_by_one():
    torch.manual_seed(4)
    B, P, R, V = 2, 3, 4, 7
    seq = torch.randint(0, V, (B, P + R))
    logits = torch.randn(B, P + R, V)
    out = response_logprobs(logits, seq, P, temperature=0.8)
    assert out.shape == (B, R)
    full = torch.log_softmax(logits / 0.8, -1)
    for b in range(B):
        for j in range(R):
            # logits at position P - 1 + j predict token P + j
            assert out[b, j].item() == pytest.approx(full[b, P - 1 + j, seq[b, P + j]].item(), abs=1e-5)
    with pytest.raises(ValueError):
        response_logprobs(logits, seq, 0)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), 0.0)


def test_truncate_after_eos():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 6, 2, 7, 2],  # EOS at 2: keep 5 6 2, then pad
            [2, 9, 9, 9, 9],  # EOS first: only the EOS counts
            [5, 6, 7, 8, 9],  # no EOS: all kept, did not end with EOS
            [5, 6, 7, 8, 2],  # EOS at the last position
        ]
    )
    out = truncate_after_eos(ids, eos, pad)
    assert out.ids.tolist() == [[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 6, 7, 8, 2]]
    assert out.mask.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
        [True] * 5,
    ]
    assert out.ended_with_eos.tolist() == [True, True, False, True]
    assert out.mask.dtype == torch.bool
    with pytest.raises(ValueError):
        truncate_after_eos(ids, eos_id=2, pad_id=2)


def test_sequence_lengths_to_mask():
    lengths = torch.tensor([0, 2, 4])
    assert sequence_lengths_to_mask(lengths, 4).tolist() == [
        [False] * 4,
        [True, True, False, False],
        [True] * 4,
    ]
    assert sequence_lengths_to_mask(lengths, 4, left_padded=True).tolist() == [
        [False] * 4,
        [False, False, True, True],
        [True] * 4,
    ]
    with pytest.raises(ValueError):
        sequence_lengths_to_mask(torch.tensor([5]), 4)
