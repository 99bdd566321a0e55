"""Tests for batched generation: cache vs recomputation, padding invariance, EOS handling, sampling filters."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models.generation import GenerationArgs, generate, sample_next_token
from rlhf_lightning.models.gpt import GPT, create_model

V, PAD, EOS = 64, 0, 1


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=V).eval()


def _prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (B, P) and their mask, built from lengths."""
    p = max(lengths)
    ids = torch.full((len(lengths), p), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), p, dtype=torch.bool)
    g = torch.Generator().manual_seed(123)
    for i, n in enumerate(lengths):
        ids[i, p - n :] = torch.randint(2, V, (n,), generator=g)
        mask[i, p - n :] = True
    return ids, mask


def _full_forward_logprobs(model: GPT, out, prompt_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """One forward over the final sequences -> log-probs (B, R) of the response tokens."""
    mask = torch.cat([prompt_mask, out.response_mask], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(out.sequences, mask, position_ids=pos).float() / temperature
    p, r = prompt_mask.shape[1], out.response_ids.shape[1]
    logp = logits[:, p - 1 : p - 1 + r].log_softmax(-1)
    return logp.gather(-1, out.response_ids[..., None]).squeeze(-1)


def test_args_validation() -> None:
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=0.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
    ):
        with pytest.raises(ValueError):
            GenerationArgs(**{"max_new_tokens": 4, **bad})


def test_shapes_and_dtypes(model: GPT) -> None:
    ids, mask = _prompts([3, 7])
    out = generate(model, ids, mask, GenerationArgs(max_new_tokens=5), eos_token_id=EOS, pad_token_id=PAD)
    r = out.response_ids.shape[1]
    assert 1 <= r <= 5
    assert out.sequences.shape == (2, 7 + r) and out.response_mask.shape == (2, r)
    assert out.response_mask.dtype == torch.bool and out.logprobs is None
    assert torch.equal(out.sequences[:, :7], ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_logprobs_match_one_full_forward(model: GPT, temperature: float) -> None:
    ids, mask = _prompts([4, 11, 7])
    args = GenerationArgs(max_new_tokens=12, do_sample=False, temperature=temperature)
    out = generate(model, ids, mask, args, eos_token_id=EOS, pad_token_id=PAD, output_logprobs=True)
    full = _full_forward_logprobs(model, out, mask, temperature)
    torch.testing.assert_close(out.logprobs[out.response_mask], full[out.response_mask], atol=1e-5, rtol=0)


def test_sampled_logprobs_match_full_forward(model: GPT) -> None:
    ids, mask = _prompts([5, 2, 9, 6])
    g = torch.Generator().manual_seed(0)
    args = GenerationArgs(max_new_tokens=10, temperature=0.9)
    out = generate(
        model, ids, mask, args, eos_token_id=EOS, pad_token_id=PAD, generator=g, output_logprobs=True
    )
    full = _full_forward_logprobs(model, out, mask, 0.9)
    torch.testing.assert_close(out.logprobs[out.response_mask], full[out.response_mask], atol=1e-5, rtol=0)


def test_cache_and_recompute_give_same_greedy_sequences(model: GPT) -> None:
    ids, mask = _prompts([3, 8, 5])
    args = GenerationArgs(max_new_tokens=10, do_sample=False)
    a = generate(
        model, ids, mask, args, eos_token_id=EOS, pad_token_id=PAD, use_cache=True, output_logprobs=True
    )
    b = generate(
        model, ids, mask, args, eos_token_id=EOS, pad_token_id=PAD, use_cache=False, output_logprobs=True
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_batch_of_two_equals_two_batches_of_one(model: GPT) -> None:
    ids, mask = _prompts([4, 9])
    args = GenerationArgs(max_new_tokens=8, do_sample=False)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, output_logprobs=True)
    both = generate(model, ids, mask, args, **kw)
    for i in range(2):
        row_mask = mask[i]
        alone = generate(model, ids[i : i + 1, row_mask], mask[i : i + 1, row_mask], args, **kw)
        r = alone.response_ids.shape[1]
        assert torch.equal(both.response_ids[i, :r], alone.response_ids[0])
        assert torch.equal(both.response_mask[i, :r], alone.response_mask[0])
        assert not both.response_mask[i, r:].any()
        torch.testing.assert_close(both.logprobs[i, :r], alone.logprobs[0], atol=1e-5, rtol=0)


class _Scripted(torch.nn.Module):
    """A fake model whose greedy choice is scripted per row and step (to test EOS handling exactly)."""

    def __init__(self, script: torch.Tensor) -> None:
        super().__init__()
        self.script = script  # (B, steps)
        self.lm_head = torch.nn.Identity()

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        step = attention_mask.shape[1] - self.p if cache is None else cache.step
        if cache is not None:
            cache.step += 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], V), -1.0)
        logits[:, -1].scatter_(-1, self.script[:, step : step + 1], 1.0)
        return logits

    def new_cache(self, batch_size: int, max_len: int):
        return type("C", (), {"step": 0})()


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_truncation_and_mask(use_cache: bool) -> None:
    script = torch.tensor([[5, EOS, 7, 8, 9], [5, 6, 7, 8, 9], [EOS, 3, 3, 3, 3]])
    fake = _Scripted(script)
    ids, mask = _prompts([2, 3, 1])
    fake.p = ids.shape[1]
    args = GenerationArgs(max_new_tokens=5, do_sample=False)
    out = generate(fake, ids, mask, args, eos_token_id=EOS, pad_token_id=PAD, use_cache=use_cache)
    assert out.response_ids.tolist() == [[5, EOS, PAD, PAD, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]]
    assert out.response_mask.tolist() == [
        [True, True, False, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]


def test_stops_early_when_all_rows_finished() -> None:
    fake = _Scripted(torch.tensor([[5, EOS, 7, 8, 9], [EOS, 3, 3, 3, 3]]))
    ids, mask = _prompts([2, 3])
    fake.p = ids.shape[1]
    out = generate(fake, ids, mask, GenerationArgs(5, do_sample=False), eos_token_id=EOS, pad_token_id=PAD)
    assert out.response_ids.tolist() == [[5, EOS], [EOS, PAD]]
    assert out.response_mask.tolist() == [[True, True], [True, False]]


def test_top_k_one_and_tiny_top_p_equal_greedy(model: GPT) -> None:
    ids, mask = _prompts([6, 3])
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    greedy = generate(model, ids, mask, GenerationArgs(max_new_tokens=8, do_sample=False), **kw)
    g = torch.Generator().manual_seed(0)
    top_k = generate(model, ids, mask, GenerationArgs(max_new_tokens=8, top_k=1), generator=g, **kw)
    top_p = generate(model, ids, mask, GenerationArgs(max_new_tokens=8, top_p=1e-6), generator=g, **kw)
    assert torch.equal(top_k.sequences, greedy.sequences)
    assert torch.equal(top_p.sequences, greedy.sequences)


def test_sample_filters_keep_expected_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, GenerationArgs(1, top_k=2), g).tolist()) == {0, 1}
    assert set(sample_next_token(logits, GenerationArgs(1, top_p=0.75), g).tolist()) == {0, 1}
    assert set(sample_next_token(logits, GenerationArgs(1, top_p=0.85), g).tolist()) == {0, 1, 2}
    full = sample_next_token(logits, GenerationArgs(1), g)
    freq = torch.bincount(full, minlength=4) / full.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_bfloat16_model_generates() -> None:
    torch.manual_seed(0)
    m = create_model("tiny", vocab_size=V).to(torch.bfloat16).eval()
    ids, mask = _prompts([3, 6])
    out = generate(m, ids, mask, GenerationArgs(4), eos_token_id=EOS, pad_token_id=PAD, output_logprobs=True)
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()


def test_too_long_request_fails_clearly(model: GPT) -> None:
    ids, mask = _prompts([5])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(
            model, ids, mask, GenerationArgs(model.config.max_seq_len), eos_token_id=EOS, pad_token_id=PAD
        )


def test_generator_makes_sampling_reproducible_and_restores_train_mode(model: GPT) -> None:
    ids, mask = _prompts([5, 5])
    args = GenerationArgs(max_new_tokens=6)
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    model.train()
    try:
        a = generate(model, ids, mask, args, generator=torch.Generator().manual_seed(7), **kw)
        assert model.training
    finally:
        model.eval()
    b = generate(model, ids, mask, args, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.sequences, b.sequences)


def test_right_padded_prompts_are_refused(model: GPT) -> None:
    ids, mask = _prompts([3, 5])
    with pytest.raises(ValueError, match=r"generate: prompts must be left-padded.* row 0 "):
        generate(
            model, ids, mask.flip(1), GenerationArgs(max_new_tokens=2), eos_token_id=EOS, pad_token_id=PAD
        )


# ------------------------------------------------------------------------------ fixed-shape (static / compiled) decoding


def _tiny_llama(attn: str = "sdpa"):
    """A random tiny Llama (hidden 32, 2 layers, GQA 4/2) behind HFCausalLM."""
    from hf_folders import tiny_llama

    return tiny_llama(V, attn=attn, pad_token_id=PAD).eval()


@pytest.fixture(scope="module", params=["gpt", "llama", "llama-eager"])
def any_model(request, model: GPT):
    if request.param == "gpt":
        return model
    return _tiny_llama("eager" if request.param == "llama-eager" else "sdpa")


def _run(m, ids, mask, args, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    kw = {"eos_token_id": EOS, "pad_token_id": PAD, "output_logprobs": True, **kw}
    return generate(m, ids, mask, args, generator=g, **kw)


def _same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_static_cache_matches_default_and_recomputation(any_model, do_sample: bool) -> None:
    ids, mask = _prompts([3, 9, 5, 1])  # left-padded, one single-token prompt
    base = GenerationArgs(max_new_tokens=14, do_sample=do_sample, temperature=0.8)
    default = _run(any_model, ids, mask, base)
    recomputed = _run(any_model, ids, mask, base, use_cache=False)
    static = _run(any_model, ids, mask, GenerationArgs(**{**vars(base), "static_cache": True}))
    _same(static, default)
    _same(static, recomputed)
    full = _full_forward_logprobs(any_model, static, mask, 0.8)
    torch.testing.assert_close(
        static.logprobs[static.response_mask], full[static.response_mask], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_static_cache_eos_stopping_and_mask(any_model, check_every: int) -> None:
    ids, mask = _prompts([4, 7, 2])
    greedy = GenerationArgs(max_new_tokens=16, do_sample=False)
    free = _run(any_model, ids, mask, greedy, eos_token_id=V + 1)  # nothing stops
    # EOS := tokens that rows 0 and 1 produce early: every row stops at its first occurrence, some never do
    for eos in {int(free.response_ids[0, 2]), int(free.response_ids[1, 5])}:
        default = _run(any_model, ids, mask, greedy, eos_token_id=eos)
        args = GenerationArgs(max_new_tokens=16, do_sample=False, static_cache=True, check_every=check_every)
        static = _run(any_model, ids, mask, args, eos_token_id=eos)
        _same(static, default)
        for row, resp in zip(static.response_mask, static.response_ids, strict=True):
            n = int(row.sum())
            assert row[:n].all() and not row[n:].any()  # a prefix up to and including the first EOS
            hit = (resp == eos).nonzero()
            assert n == (int(hit[0]) + 1 if len(hit) else static.response_ids.shape[1])
            assert (resp[n:] == PAD).all()


def test_static_cache_all_rows_stop_before_check() -> None:
    """A one-row batch whose EOS is its first greedy token: R = 1 although the finished check only runs after
    ``check_every`` steps (the extra steps are cut off)."""
    torch.manual_seed(0)
    m = create_model("tiny", vocab_size=V).eval()
    ids, mask = _prompts([5])
    first = _run(m, ids, mask, GenerationArgs(max_new_tokens=1, do_sample=False), eos_token_id=V + 1)
    eos = int(first.response_ids[0, 0])
    out = _run(
        m, ids, mask, GenerationArgs(max_new_tokens=12, do_sample=False, static_cache=True), eos_token_id=eos
    )
    assert out.response_ids.tolist() == [[eos]] and out.response_mask.tolist() == [[True]]


def test_static_cache_bfloat16_and_two_shapes() -> None:
    torch.manual_seed(0)
    m = create_model("tiny", vocab_size=V).to(torch.bfloat16).eval()
    for lengths, n in (([3, 6], 4), ([2, 2, 8], 70)):  # the second needs a longer (and wider) cache
        ids, mask = _prompts(lengths)
        a = _run(m, ids, mask, GenerationArgs(n, do_sample=False))
        b = _run(m, ids, mask, GenerationArgs(n, do_sample=False, static_cache=True))
        assert torch.equal(a.sequences, b.sequences)
        assert b.logprobs.dtype == torch.float32 and torch.isfinite(b.logprobs).all()


def test_check_every_validation() -> None:
    with pytest.raises(ValueError, match="check_every"):
        GenerationArgs(4, check_every=0)
    assert GenerationArgs(4, compile=True).fast_decode and not GenerationArgs(4).fast_decode


def test_compile_failure_warns_and_falls_back(model: GPT, monkeypatch) -> None:
    import rlhf_lightning.models.generation as generation

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(generation, "_COMPILED_STEP", broken)
    ids, mask = _prompts([4, 6])
    args = GenerationArgs(max_new_tokens=6)
    expected = _run(model, ids, mask, args, seed=5)
    try:
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            got = _run(model, ids, mask, GenerationArgs(max_new_tokens=6, compile=True), seed=5)
        _same(got, expected)  # the generator's state was restored before the eager rerun
        assert model in generation._COMPILE_FAILED
    finally:
        generation._COMPILE_FAILED.discard(model)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt", "llama"])
def test_compiled_decode_matches_default(model: GPT, which: str) -> None:
    """torch.compile of the decode step (about a minute of inductor compilation on 2 CPU cores)."""
    m = model if which == "gpt" else _tiny_llama()
    ids, mask = _prompts([3, 9, 5])
    for do_sample in (False, True):
        base = GenerationArgs(max_new_tokens=12, do_sample=do_sample)
        with torch._dynamo.config.patch(error_on_recompile=False):
            fast = _run(m, ids, mask, GenerationArgs(**{**vars(base), "compile": True}), seed=2)
        _same(fast, _run(m, ids, mask, base, seed=2))
        assert m not in __import__("rlhf_lightning.models.generation").models.generation._COMPILE_FAILED


def test_static_cache_on_a_lora_reference_view() -> None:
    """PPO's reference of a LoRA policy (adapter switched off, no copy) decodes through the view's ``decode_step``:
    the same tokens as the default loop, and as the merged policy itself (its fresh adapter is zero)."""
    pytest.importorskip("peft")
    from rlhf_lightning.models.factory import LoRAArgs
    from rlhf_lightning.models.hf import HFCausalLM, reference_of

    base = _tiny_llama()
    policy = HFCausalLM(base.hf_model, source="<random>", lora=LoRAArgs(r=2)).eval()
    ref = reference_of(policy)
    ids, mask = _prompts([3, 6])
    args = GenerationArgs(max_new_tokens=6, do_sample=False)
    default = _run(ref, ids, mask, args)
    static = _run(ref, ids, mask, GenerationArgs(6, do_sample=False, static_cache=True))
    _same(static, default)
    _same(_run(policy, ids, mask, GenerationArgs(6, do_sample=False, static_cache=True)), default)
