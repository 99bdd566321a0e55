"""Tests for the built-in GPT: shapes, presets, masking, positions, KV cache, tying, checkpointing."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models.gpt import GPT, PRESETS, GPTConfig, create_model

V = 97


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=V).eval()


def _left_padded(lengths: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) with garbage on padding and a left-padding mask (B, T)."""
    ids = torch.randint(1, V, (len(lengths), t))
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = True
    return ids, mask


def test_shapes(model: GPT) -> None:
    ids = torch.randint(0, V, (3, 11))
    assert model(ids).shape == (3, 11, V)
    assert model.hidden_states(ids).shape == (3, 11, model.config.n_embd)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_configs(preset: str) -> None:
    config = GPTConfig(vocab_size=100, **PRESETS[preset])
    assert config.n_embd % config.n_head == 0


def test_create_model_overrides_and_errors() -> None:
    m = create_model("tiny", vocab_size=50, n_layer=1, tie_embeddings=False, mlp="gelu")
    assert m.config.n_layer == 1 and len(m.blocks) == 1 and m.config.vocab_size == 50
    with pytest.raises(ValueError, match="tiny"):
        create_model("nope", vocab_size=50)
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        create_model("tiny", vocab_size=50, n_layers=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_embd=64, n_head=3),
        dict(n_embd=60, n_head=20),
        dict(dropout=1.0),
        dict(n_layer=0),
        dict(mlp="relu"),
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=10, **{**PRESETS["tiny"], **kwargs})


def test_tied_embeddings_share_storage() -> None:
    tied = create_model("tiny", vocab_size=V)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = create_model("tiny", vocab_size=V, tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + V * tied.config.n_embd


def test_init_scales() -> None:
    torch.manual_seed(0)
    m = create_model("small", vocab_size=1000)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / (2 * m.config.n_layer) ** 0.5
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert m.blocks[0].mlp.down.weight.std().item() == pytest.approx(scaled, rel=0.05)


def test_causal(model: GPT) -> None:
    ids = torch.randint(0, V, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % V
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])


def test_left_padding_no_nan_and_matches_unpadded(model: GPT) -> None:
    ids, mask = _left_padded([4, 9], 9)
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    # The padded row's real positions equal the same tokens run alone; padding content is irrelevant.
    alone = model(ids[:1, 5:])
    torch.testing.assert_close(out[:1, 5:], alone, atol=1e-5, rtol=1e-5)
    other = ids.clone()
    other[0, :5] = 3
    torch.testing.assert_close(model(other, mask)[:1, 5:], alone, atol=1e-5, rtol=1e-5)


def test_all_true_mask_uses_same_result_as_no_mask(model: GPT) -> None:
    ids = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model(ids, torch.ones(2, 8, dtype=torch.bool)), model(ids))


def test_default_position_ids(model: GPT) -> None:
    ids, mask = _left_padded([3, 6], 6)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(ids, mask), model(ids, mask, position_ids=pos))


def test_right_padding_fast_path_matches_rows_alone(model: GPT) -> None:
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 4:] = False
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1, :4], model(ids[:1, :4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], model(ids[1:]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[5, 9, 2], [12, 12, 12]])
def test_cache_prefill_and_decode_match_full_forward(model: GPT, lengths: list[int]) -> None:
    ids, mask = _left_padded(lengths, 12)
    mask[:, 9:] = True  # the last 3 tokens are "generated" for every row
    full = model(ids, mask)
    cache = model.new_cache(3, 16)
    step_logits = [model(ids[:, :9], mask[:, :9], cache=cache)]
    for t in range(9, 12):
        step_logits.append(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache))  # HF-style full mask
    cached = torch.cat(step_logits, dim=1)
    assert cache.length == 12
    torch.testing.assert_close(cached[mask], full[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.n_real, mask.sum(-1))


def test_cache_overflow_and_max_len(model: GPT) -> None:
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError):
        model.new_cache(1, model.config.max_seq_len + 1)


def test_gradient_checkpointing_same_grads() -> None:
    torch.manual_seed(0)
    m = create_model("tiny", vocab_size=V, dropout=0.1).train()
    ids, mask = _left_padded([7, 10], 10)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        m.zero_grad()
        m.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        m(ids, mask)[mask].logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_small_preset_is_the_cpu_sized_model_it_claims_and_trains() -> None:
    """The "small" preset keeps the size its comment promises (~3.2M non-embedding parameters, CPU-sized) and one
    forward/backward reaches every parameter with finite gradients. Speed is measured in benchmarks/, not here."""
    torch.manual_seed(0)
    m = create_model("small", vocab_size=4096)
    non_embedding = sum(p.numel() for p in m.parameters()) - m.wte.weight.numel()
    assert 3_000_000 < non_embedding < 3_500_000
    m(torch.randint(0, 4096, (2, 32))).logsumexp(-1).mean().backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
