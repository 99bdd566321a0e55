"""Tiny random Hugging Face model folders for tests: a Llama-style and a GPT-2-style (ChatML template) model with their
own tokenizers, and a tokenizer-only folder with a Qwen-style template that inserts a default system prompt.

Everything is built from configs and saved to temporary folders; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = REPO_ROOT / "data" / "hh_rlhf" / "sft_train.jsonl"

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen-style: ChatML turns closed by <|im_end|> (the EOS), and a default system prompt when none is given
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _texts(limit: int = 400) -> list[str]:
    out = []
    with open(SFT_DATA, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i >= limit:
                break
            out.extend(m["content"] for m in json.loads(line)["messages"])
    return out


def _bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    return tok


def make_llama_folder(path: Path, hidden: int = 32, layers: int = 2, tie: bool = False) -> Path:
    """A random Llama (GQA: 4 query heads, 2 KV heads) with a BPE tokenizer whose pad is its UNK token."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    backend = _bpe(400, ["<unk>", "<s>", "</s>", *roles])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=roles,
    )
    tok.chat_template = LLAMA_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_gpt2_folder(path: Path) -> Path:
    """A random GPT-2 whose tokenizer has no pad and UNK == EOS (the adapter adds ``<|pad|>``), ChatML template."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = _bpe(360, ["<|endoftext|>", "<|im_start|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_qwen_tokenizer_folder(path: Path) -> Path:
    """Tokenizer files only: a BPE with ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad and :data:`QWEN_TEMPLATE`."""
    from transformers import PreTrainedTokenizerFast

    backend = _bpe(360, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(path)
    return path


def tiny_llama(vocab_size: int, max_positions: int = 256, attn: str = "sdpa", lora=None, **config_kwargs):
    """A random in-memory Llama (hidden 32, 2 layers, GQA 4/2, seeded) behind ``HFCausalLM``, no folder written;
    ``config_kwargs`` go to ``LlamaConfig`` (``pad_token_id``, ``tie_word_embeddings``, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_lightning.models.hf import HFCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        **config_kwargs,
    )
    config._attn_implementation = attn
    return HFCausalLM(LlamaForCausalLM(config), "in-memory", lora=lora)
