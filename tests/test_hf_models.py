"""Hugging Face backbones and tokenizers behind the project's protocols (tiny random Llama / GPT-2 folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_folders import make_gpt2_folder, make_llama_folder

from rlhf_lightning.models.factory import LoRAArgs, ModelArgs, build_model, model_from_spec, model_spec
from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.stages.tokenizer_link import same_tokenizer, tokenizer_from_payload, tokenizer_payload

transformers = pytest.importorskip("transformers")

CONV = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi, how are you?"},
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "Fine."},
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folder(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(request.param) / "model"
    return make_llama_folder(root) if request.param == "llama" else make_gpt2_folder(root)


def _tok(folder):
    from rlhf_lightning.tokenization_hf import HFChatTokenizer

    return HFChatTokenizer.from_pretrained(folder)


def _left_padded(tok, prompts):
    rows = [tok.render_prompt(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


def test_tokenizer_protocol_and_exact_assistant_mask(folder):
    tok = _tok(folder)
    assert tok.pad_id != tok.eos_id
    if folder.parent.name.startswith("gpt2"):  # no pad and UNK == EOS: a pad token is added
        assert tok.vocab_size == len(transformers.AutoTokenizer.from_pretrained(folder)) + 1
    ids, mask = tok.render(CONV)
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    # the mask is each reply plus its closing EOS (and whatever the template writes after it), in order
    replies = tok.decode(masked)
    assert "Hi, how are you?" in replies and "Fine." in replies and "Hello" not in replies
    assert masked.count(tok.eos_id) == 2
    # the prompt rendering is a prefix of the full conversation's tokens
    prompt = tok.render_prompt(CONV[:1])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    assert mask[len(prompt)]
    # checkpoints carry the tokenizer
    again = tokenizer_from_payload(tokenizer_payload(tok))
    assert same_tokenizer(tok, again) and again.render(CONV) == (ids, mask)


def test_cached_generation_equals_full_forward_with_left_padding(folder):
    tok = _tok(folder)
    model = build_model(ModelArgs(hf_path=str(folder)), tok.vocab_size).eval()
    ids, mask = _left_padded(tok, [CONV[:1], CONV[:3]])
    args = GenerationArgs(max_new_tokens=10, do_sample=False)
    kw = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, output_logprobs=True)
    cached = generate(model, ids, mask, args, **kw)
    full = generate(model, ids, mask, args, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.logprobs, full.logprobs, atol=1e-5, rtol=0)
    # a left-padded row sees the same hidden states as the row alone
    alone = torch.tensor([tok.render_prompt(CONV[:1])])
    with torch.no_grad():
        h_alone = model.hidden_states(alone)[0]
        h_pad = model.hidden_states(ids, mask)[0, mask[0]]
        logits_hf = model.hf_model(input_ids=alone).logits[0]
    torch.testing.assert_close(h_pad, h_alone, atol=1e-5, rtol=1e-5)
    # hidden states are the base model's final-norm output: lm_head of them gives transformers' own logits
    torch.testing.assert_close(model.lm_head(h_alone), logits_hf, atol=1e-5, rtol=1e-5)


def test_spec_round_trip_with_lora_and_adapter_disabled_is_the_base_model(folder):
    tok = _tok(folder)
    base = build_model(ModelArgs(hf_path=str(folder)), tok.vocab_size).eval()
    lora = build_model(ModelArgs(hf_path=str(folder), lora=LoRAArgs(r=4)), tok.vocab_size).eval()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ids = torch.tensor([tok.render(CONV)[0]])
    with torch.no_grad():
        adapted = lora(ids)
        with lora.adapter_disabled():
            disabled = lora(ids)
        plain = base(ids)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    torch.testing.assert_close(disabled, plain, atol=1e-5, rtol=1e-5)

    rebuilt = model_from_spec(model_spec(lora)).eval()
    rebuilt.load_state_dict(lora.state_dict())  # strict: same keys, nothing missing
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), adapted)


def test_reference_of_merges_the_adapter_and_disables_a_fresh_one(folder):
    from rlhf_lightning.models.hf import reference_of

    tok = _tok(folder)
    lora = build_model(ModelArgs(hf_path=str(folder), lora=LoRAArgs(r=4)), tok.vocab_size).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter (peft starts lora_B at 0)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ids = torch.tensor([tok.render(CONV)[0]])
    keys = set(lora.state_dict())
    with torch.no_grad():
        trained = lora(ids)
        reference = reference_of(lora)
        after, ref = lora(ids), reference(ids)
    assert reference.policy is lora and set(lora.state_dict()) == keys  # same module, same parameter names
    lora_b = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)  # the fresh adapter's update is exactly 0
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the fresh adapter trains
    assert torch.equal(after, ref)  # policy == reference exactly, and both are the trained model
    torch.testing.assert_close(ref, trained, atol=1e-5, rtol=1e-5)
    rebuilt = model_from_spec(model_spec(lora)).eval()
    rebuilt.load_state_dict(lora.state_dict())  # a checkpoint written after the merge rebuilds the same model
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), after)


def test_reference_view_generates_the_merged_model_replies(folder):
    """PPO's score calibration samples replies from the reference: ``generate`` on the adapter-disabled view runs (it
    reads ``training`` and ``new_cache``), leaves the policy's mode alone and gives the merged model's replies."""
    from rlhf_lightning.models.hf import reference_of

    tok = _tok(folder)
    lora = build_model(ModelArgs(hf_path=str(folder), lora=LoRAArgs(r=4)), tok.vocab_size).eval()
    reference = reference_of(lora)
    with torch.no_grad():  # the fresh adapter trains a little: policy and reference now differ
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ids, mask = _left_padded(tok, [CONV[:1], CONV[:3]])
    args = GenerationArgs(max_new_tokens=6, do_sample=False)
    kw = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    ref = generate(reference, ids, mask, args, **kw)
    with lora.adapter_disabled():
        merged = generate(lora, ids, mask, args, **kw)
    assert torch.equal(ref.response_ids, merged.response_ids)
    lora.train()
    generate(reference, ids, mask, args, **kw)
    assert lora.training  # the view's eval()/train() leave the policy's mode alone


def test_gradient_checkpointing_option(folder):
    tok = _tok(folder)
    model = build_model(ModelArgs(hf_path=str(folder), gradient_checkpointing=True), tok.vocab_size).train()
    assert model.gradient_checkpointing
    ids = torch.tensor([tok.render(CONV)[0]])
    model(ids).sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_reference_view_head_runs_without_the_adapter_when_lora_adapts_the_lm_head(folder):
    """``target_modules`` may name ``lm_head``: the reference view's head must then be the base head too, or the
    rollout's reference log-probs (``reference.lm_head(reference.hidden_states(...))``) carry the policy's adapter."""
    from rlhf_lightning.models.hf import reference_of

    tok = _tok(folder)
    lora_args = LoRAArgs(r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    lora = build_model(ModelArgs(hf_path=str(folder), lora=lora_args), tok.vocab_size).eval()
    reference = reference_of(lora)
    with torch.no_grad():  # the fresh adapter (head included) trains a little
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ids = torch.tensor([tok.render(CONV)[0]])
    with torch.no_grad():
        via_view = reference.lm_head(reference.hidden_states(ids))
        with lora.adapter_disabled():
            base = lora.lm_head(lora.hidden_states(ids))
        adapted_head = lora.lm_head(reference.hidden_states(ids))
    assert not torch.allclose(adapted_head, base, atol=1e-3)  # the head's adapter does change the logits
    torch.testing.assert_close(via_view, base)
