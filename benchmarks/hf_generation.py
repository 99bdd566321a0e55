"""Rollout generation with a Hugging Face backbone: our batched loop (``models.generation.generate`` on
``models.hf.HFCausalLM`` and its DynamicCache wrapper) vs transformers' own ``model.generate``.

Prints one JSON object. Both run the same random Llama (built from a config, nothing downloaded) on the same
left-padded batch, greedy, for exactly ``--new-tokens`` steps (no EOS can end a row early), best of ``--repeats``.
``greedy_match`` says whether the two produced the same tokens. ``ours_no_cache`` (full recomputation per step) is
timed too, as the baseline the cache removes. ``--modes`` times our loop once per decode mode: ``default`` (dynamic
cache), ``static_cache`` and ``compile`` (``GenerationArgs`` fields; the untimed warm-up call compiles), each with its
``<mode>_over_hf`` ratio (our new tokens/s over ``model.generate``'s; > 1 is ours faster). ``--folder`` runs a local HF
folder (e.g. SmolLM2-135M) instead of the random Llama, with random prompt ids.

    python benchmarks/hf_generation.py [--hidden 256 --layers 4 --batch 8 --prompt-len 64 --new-tokens 64]
        [--modes default static_cache compile] [--folder PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.models.hf import HFCausalLM

MODES = {"default": {}, "static_cache": {"static_cache": True}, "compile": {"compile": True}}


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
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=list(MODES), help="our decode modes to time"
    )
    parser.add_argument("--folder", default=None, help="a local HF model folder instead of the random Llama")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    pad = 0
    if args.folder:
        hf = AutoModelForCausalLM.from_pretrained(args.folder, local_files_only=True, dtype=torch.float32)
        args.vocab_size = hf.config.vocab_size
        pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
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
    if not args.folder:
        hf = LlamaForCausalLM(config)
    hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = pad
    model = HFCausalLM(hf, source=args.folder or "<random>").eval()
    ids, mask = _prompts(args.batch, args.prompt_len, args.vocab_size, pad)
    ids, mask = ids.to(args.device), mask.to(args.device)

    def ours(use_cache: bool = True, mode: str = "default"):
        gen = GenerationArgs(max_new_tokens=args.new_tokens, do_sample=False, **MODES[mode])
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

    theirs()  # warm-up
    results: dict[str, float] = {}
    outs = {}
    for mode in args.modes:
        ours(mode=mode)  # warm-up (compilation for "compile")
    t_hf, b = _time(theirs, args.repeats)
    for mode in args.modes:
        results[mode], outs[mode] = _time(lambda mode=mode: ours(mode=mode), args.repeats)
    t_hf = min(t_hf, _time(theirs, args.repeats)[0])  # HF timed before and after ours
    tokens = args.batch * args.new_tokens
    result = {
        "device": args.device,
        "platform": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.folder
        or f"random Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab_size}",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "hf_generate_s": round(t_hf, 4),
        "hf_generate_tokens_per_s": round(tokens / t_hf, 1),
    }
    for mode, seconds in results.items():
        result[f"{mode}_s"] = round(seconds, 4)
        result[f"{mode}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{mode}_over_hf"] = round(t_hf / seconds, 3)
        result[f"{mode}_greedy_match"] = bool(torch.equal(outs[mode], b))
    if not args.no_baseline:
        t_full, _ = _time(lambda: ours(use_cache=False), 1)
        result["ours_no_cache_s"] = round(t_full, 4)
        result["cache_speedup"] = round(t_full / results.get("default", t_full), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
