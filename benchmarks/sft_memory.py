"""Peak memory and throughput of one SFT training step: chunked vs full LM-head cross-entropy, bf16 autocast vs fp32,
activation checkpointing on and off, at two vocabulary sizes. Prints JSON.

    python benchmarks/sft_memory.py                        # vocab 4k and 32k, the ``small`` preset, 4 x 256 tokens
    python benchmarks/sft_memory.py --vocab 32000 --steps 5 --device cuda

Each configuration runs in its own subprocess (``--worker``), so one run's allocations never inflate another's peak.
A step is ``SFTModule.loss`` (the stage's own code path: trunk, then the LM head over the assistant positions only)
plus its backward, the model's gradients included; no optimizer (its state is the same for every row here). Peak
memory: on CPU the growth of the process's peak RSS (``ru_maxrss``) from just before the first step, which counts the
first step's gradients and everything the steps hold at their high-water mark; on CUDA
``torch.cuda.max_memory_allocated`` over the steps. ``tokens_per_sec`` counts the non-padding tokens of the batch per
second of step time, after one warm-up step; on a shared CPU it is noisy, so compare rows of one run as ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [  # (name, chunked, bf16, gradient checkpointing)
    ("full_fp32", False, False, False),
    ("chunked_fp32", True, False, False),
    ("full_bf16", False, True, False),
    ("chunked_bf16", True, True, False),
    ("chunked_fp32_ckpt", True, False, True),
    ("chunked_bf16_ckpt", True, True, True),
]


def _worker(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from rlhf_lightning.models.gpt import create_model
    from rlhf_lightning.stages.sft import SFTModule
    from rlhf_lightning.types import SFTBatch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = (
        create_model(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 64)).to(device).train()
    )
    model.gradient_checkpointing = args.ckpt
    module = SFTModule(chunked_loss=args.chunked)
    module.model = model
    b, t = args.batch_size, args.seq_len
    ids = torch.randint(0, args.vocab, (b, t), device=device)
    attention = torch.ones(b, t, dtype=torch.bool, device=device)
    loss_mask = attention & (torch.arange(t, device=device)[None] >= t // 4)  # the last 3/4 are the reply
    batch = SFTBatch(input_ids=ids, attention_mask=attention, loss_mask=loss_mask)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = module.loss(batch)
        loss.backward()
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step()  # warm-up (gradients allocated here: counted in the peak, not in the timing)
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    step_s = sorted(times)[len(times) // 2]
    return {
        "peak_step_mib": round(peak_mib, 1),
        "step_s": round(step_s, 4),
        "tokens_per_sec": round(b * t / step_s, 1),
        "loss": round(loss, 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.vocab = args.vocab[0]
        out = _worker(args)
        print(json.dumps(out))
        return out

    common = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    common += ["--steps", str(args.steps), "--device", args.device]
    results: dict = {
        "settings": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "device": args.device,
            "peak": "cuda max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth",
        }
    }
    for vocab in args.vocab:
        rows = {}
        for name, chunked, bf16, ckpt in ROWS:
            if name not in args.rows:
                continue
            flags = ["--chunked"] * chunked + ["--bf16"] * bf16 + ["--ckpt"] * ckpt
            cmd = [sys.executable, __file__, "--worker", "--vocab", str(vocab), *common, *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                rows[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        full, chunked_row = rows.get("full_fp32", {}), rows.get("chunked_fp32", {})
        if "peak_step_mib" in full and "peak_step_mib" in chunked_row and chunked_row["peak_step_mib"] > 0:
            rows["full_over_chunked_peak"] = round(full["peak_step_mib"] / chunked_row["peak_step_mib"], 2)
        results[f"vocab_{vocab}"] = rows
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
