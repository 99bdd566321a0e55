"""Probe: resident memory of a PPO run per iteration (vs_trl.py's PPO row set-up, smaller: 2 layers, 6 iterations).

Prints, after each PPO iteration, the current RSS (/proc/self/statm) and ru_maxrss in MB. One variable at a time,
through environment switches:
    PROBE_PRECISION=bf16|32; PROBE_MKLDNN=0 (torch.backends.mkldnn.enabled = False); PROBE_TRIM=1 (glibc
    malloc_trim(0) after each iteration, RSS shown before and after); PROBE_ROUND=64 (every trimmed PPO forward's
    columns rounded up to a multiple, monkeypatched); PROBE_ITERS, PROBE_LAYERS, PROBE_NEW_TOKENS.
``import rlhf_lightning`` bounds the oneDNN caches (rlhf_lightning/onednn.py); the growth it removes comes back with
the libraries' defaults: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024``.
Usage: PYTHONPATH=$PWD python benchmarks/probes/ppo_rss.py  (about 30 s on an idle 2-core CPU)
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import vs_trl
from lightning.pytorch import Callback

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Report(Callback):
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.libc = ctypes.CDLL("libc.so.6") if os.environ.get("PROBE_TRIM") == "1" else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = rss_mb()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        print(
            f"iter {trainer.global_step:2d} rss {before:7.1f} MB"
            + (f" (after trim {rss_mb():7.1f})" if self.libc is not None else "")
            + f" maxrss {maxrss_mb():7.1f} MB  t {time.perf_counter() - self.start:5.1f}s",
            flush=True,
        )


def main() -> None:
    multiple = int(os.environ.get("PROBE_ROUND", "0"))
    if multiple:  # experiment: round every trimmed forward's columns up to a multiple (monkeypatched)
        import rlhf_lightning.stages.rollout as rollout

        exact = rollout.trimmed_span

        def rounded(query_mask, response_mask):
            p0, r = exact(query_mask, response_mask)
            P, R = query_mask.shape[-1], response_mask.shape[-1]
            extra = -((P - p0) + r) % multiple
            grow_r = min(extra, R - r)
            return max(0, p0 - (extra - grow_r)), r + grow_r

        rollout.trimmed_span = rounded
    if os.environ.get("PROBE_MKLDNN") == "0":
        torch.backends.mkldnn.enabled = False
    argv = [
        "--precision",
        os.environ.get("PROBE_PRECISION", "bf16"),
        "--layers",
        os.environ.get("PROBE_LAYERS", "2"),
        "--iterations",
        os.environ.get("PROBE_ITERS", "6"),
        "--max-new-tokens",
        os.environ.get("PROBE_NEW_TOKENS", "32"),
        "--rl-warmup",
        "1",
    ]
    args = vs_trl.build_parser().parse_args(argv)
    cache = Path(os.environ.get("PROBE_CACHE", "/tmp/ppo_rss_cache")) / f"l{args.layers}"
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / "llama"
    if not (folder / "config.json").exists():
        vs_trl.make_llama_folder(folder, args)
    if not (cache / "prompts.jsonl").exists():
        vs_trl.write_prompts(folder, cache / "prompts.jsonl", args.max_prompt_length)
    vs_trl._prepare(args, folder, str(cache))
    vs_trl._quiet()
    print(f"start rss {rss_mb():.1f} MB maxrss {maxrss_mb():.1f} MB", flush=True)
    # add our callback to the Trainer that _fit_online builds
    import lightning.pytorch as pl

    init = pl.Trainer.__init__

    def patched(self, *a, **k):
        k["callbacks"] = [*(k.get("callbacks") or []), Report()]
        init(self, *a, **k)

    pl.Trainer.__init__ = patched
    summary = vs_trl.ours_ppo(args, folder, str(cache))
    print("sec/iter", summary.get("sec_per_iteration"), f"final maxrss {maxrss_mb():.1f} MB")


if __name__ == "__main__":
    main()
