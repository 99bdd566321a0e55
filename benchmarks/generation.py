"""Generation throughput with the KV cache vs full recomputation, on the "small" preset (CPU by default).

Prints one JSON object. Both paths run the same left-padded batch (prompt lengths spread around ``--prompt-len``),
sample with the same seed, and only project the last position to the vocabulary, so the ratio isolates the cache.
EOS is an id the model can never sample, so every run decodes exactly ``--new-tokens`` steps. ``--modes`` also times
the fixed-shape decode loop (``static_cache``) and its compiled step (``compile``; the untimed warm-up call compiles),
each with ``<mode>_over_cache`` (its tokens/s over the default cached loop's) and ``<mode>_same_tokens``.

    python benchmarks/generation.py [--batch 8 --prompt-len 64 --new-tokens 64 --repeats 3]
        [--modes static_cache compile] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from rlhf_lightning.models.generation import GenerationArgs, generate
from rlhf_lightning.models.gpt import create_model


def _prompts(batch: int, prompt_len: int, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P): lengths spread over [3P/4, P], masks from lengths."""
    lengths = torch.linspace(prompt_len * 3 // 4, prompt_len, batch).long()
    ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        ids[i, prompt_len - n :] = torch.randint(2, vocab, (n,))
        mask[i, prompt_len - n :] = True
    return ids, mask


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes", nargs="*", default=["static_cache", "compile"], choices=["static_cache", "compile"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the slow no-cache run")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(a.seed)
    model = create_model(a.preset, vocab_size=a.vocab_size).to(a.device).eval()
    ids, mask = _prompts(a.batch, a.prompt_len, a.vocab_size, pad=0)
    ids, mask = ids.to(a.device), mask.to(a.device)
    args = GenerationArgs(max_new_tokens=a.new_tokens, temperature=1.0)
    # eos = vocab_size: never sampled, so every row decodes all new tokens in both runs.
    kw = dict(eos_token_id=a.vocab_size, pad_token_id=0)

    def run(use_cache: bool, mode: str | None = None) -> torch.Tensor:
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        gen = args if mode is None else dataclasses.replace(args, **{mode: True})
        out = generate(model, ids, mask, gen, generator=g, use_cache=use_cache, **kw)
        assert out.response_ids.shape == (a.batch, a.new_tokens)
        return out.response_ids

    results = {}
    reference = run(True)
    runs = {"cache": (True, None), **{m: (True, m) for m in a.modes}}
    if not a.no_baseline:
        runs["no_cache"] = (False, None)
    for key, (use_cache, mode) in runs.items():
        same = torch.equal(run(use_cache, mode), reference)  # warm-up (compilation for "compile")
        seconds = _time(lambda use_cache=use_cache, mode=mode: run(use_cache, mode), a.repeats)
        results[f"{key}_seconds"] = round(seconds, 4)
        results[f"{key}_tokens_per_s"] = round(a.batch * a.new_tokens / seconds, 1)
        if mode is not None:
            results[f"{key}_over_cache"] = round(results["cache_seconds"] / seconds, 3)
            results[f"{key}_same_tokens"] = same
    print(
        json.dumps(
            {
                "benchmark": "generation",
                "preset": a.preset,
                "parameters": model.num_parameters(),
                "device": a.device,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "batch": a.batch,
                "prompt_len": a.prompt_len,
                "new_tokens": a.new_tokens,
                "repeats_best_of": a.repeats,
                **results,
                **(
                    {}
                    if a.no_baseline
                    else {
                        "speedup_cache_vs_no_cache": round(
                            results["cache_tokens_per_s"] / results["no_cache_tokens_per_s"], 2
                        )
                    }
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
