"""Rollout generation with a Hugging Face backbone: our batched loop (``models.generation.generate`` on
``models.hf.HFCausalLM`` and its DynamicCache wrapper) vs transformers' own ``model.generate``.

Prints one JSON object. Both run the same random Llama (built from a config, nothing downloaded) on the same
left-padded batch, greedy, for exactly ``--new-tokens`` steps (no EOS can end a row early), best of ``--repeats``.
``greedy_match`` says whether the two produced the same tokens. ``ours_no_cache`` (full recomputation per step) is
timed too, as the baseline the cache removes.

    python benchmarks/hf_generation.py [--hidden 256 --layers 4 --batch 8 --prompt-len 64 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.models.hf import HFCausalLM


def _prompts(batch: int, prompt_len: int, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P) with lengths spread over [3P/4, P]."""
    lengths = torch.linspace(prompt_len * 3 // 4, prompt_len, batch).long()
    ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        ids[i, prompt_len - n :] = torch.randint(3, vocab, (n,))
        mask[i, prompt_len - n :] = True
    return ids, mask


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip the slow no-cache run")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    pad = 0
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1),
        max_position_embeddings=args.prompt_len + args.new_tokens,
        pad_token_id=pad,
        bos_token_id=1,
        eos_token_id=None,
    )
    hf = LlamaForCausalLM(config).to(args.device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = pad
    model = HFCausalLM(hf, source="<random>").eval()
    ids, mask = _prompts(args.batch, args.prompt_len, args.vocab_size, pad)
    ids, mask = ids.to(args.device), mask.to(args.device)
    gen = GenerationArgs(max_new_tokens=args.new_tokens, do_sample=False)

    def ours(use_cache: bool = True):
        return generate(
            model, ids, mask, gen, eos_token_id=-1, pad_token_id=pad, use_cache=use_cache
        ).response_ids

    @torch.no_grad()
    def theirs():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask.long(),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
        return out[:, ids.shape[1] :]

    ours(), theirs()  # warm-up
    t_ours, a = _time(ours, args.repeats)
    t_hf, b = _time(theirs, args.repeats)
    result = {
        "device": args.device,
        "platform": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"random Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "ours_s": round(t_ours, 4),
        "hf_generate_s": round(t_hf, 4),
        "ours_tokens_per_s": round(args.batch * args.new_tokens / t_ours, 1),
        "hf_generate_tokens_per_s": round(args.batch * args.new_tokens / t_hf, 1),
        "hf_over_ours_time": round(t_hf / t_ours, 3),
        "greedy_match": bool(torch.equal(a, b)),
    }
    if not args.no_baseline:
        t_full, _ = _time(lambda: ours(use_cache=False), 1)
        result["ours_no_cache_s"] = round(t_full, 4)
        result["cache_speedup"] = round(t_full / t_ours, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
