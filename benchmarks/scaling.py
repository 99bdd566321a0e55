"""Data-parallel scaling of the SFT training step on CPU: 1 process vs N gloo processes, the same global batch.

Prints one JSON object. Every arm runs the SFT stage's step (``SFTModule.loss``: trunk, LM head on assistant targets,
token-mean NLL; backward; AdamW) on the same data, tokenizer, seed and initial weights, for a fixed number of steps of
the same global batch: with N processes each takes its 1/N of every batch's rows, and gradients are averaged by
``DistributedDataParallel`` over gloo (as Lightning's ``strategy: ddp`` does on CPU). The machine's cores are split
evenly: ``torch.set_num_threads(cores // processes)``. Throughput is samples (conversations) per second of wall time
between two barriers around the timed steps (after ``--warmup`` untimed steps); the scaling ratio is the N-process
samples/s over the 1-process samples/s (N would be perfect scaling). Each rank's loss is its own rows' token mean (DDP
averages the ranks' gradients), so the last loss printed, rank 0's, is a sanity check, not the arms' shared loss.

    python benchmarks/scaling.py [--preset small --global-batch 16 --steps 10 --warmup 2 --processes 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.models.factory import ModelArgs, build_model
from rlhf_lightning.stages.sft import SFTModule
from rlhf_lightning.tokenization import ChatTokenizer

REPO = Path(__file__).resolve().parents[1]


class _StageLoss(torch.nn.Module):
    """The SFT stage's loss as a module's ``forward``, so DDP's gradient hooks see the forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.stage = SFTModule()
        self.stage.model = model

    def forward(self, batch) -> torch.Tensor:
        return self.stage.loss(batch)[0]


def _rows(batch, rank: int, world: int):
    """This rank's contiguous share of a batch's rows."""
    n = len(batch.input_ids) // world
    return type(batch)(
        **{f.name: getattr(batch, f.name)[rank * n : (rank + 1) * n] for f in dataclasses.fields(batch)}
    )


def _run(
    rank: int, world: int, port: int, args: argparse.Namespace, batches: list, vocab: int, out: str
) -> None:
    torch.set_num_threads(max(1, args.cores // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(args.seed)
    module = _StageLoss(build_model(ModelArgs(preset=args.preset, dropout=0.0), vocab).train())
    step_fn = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    start = 0.0
    for step, batch in enumerate(batches[: args.warmup + args.steps]):
        if step == args.warmup:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        loss = step_fn(_rows(batch, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "final_loss": loss.item()}))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "hh_rlhf" / "sft_train.jsonl"))
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--global-batch", type=int, default=16, help="rows per optimizer step over all processes"
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per arm")
    parser.add_argument("--processes", type=int, default=2, help="the multi-process arm (the other arm is 1)")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="threads split over the processes"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.global_batch % args.processes:
        parser.error(
            f"--global-batch {args.global_batch} must divide evenly over --processes {args.processes}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        dm = SFTDataModule(
            train_path=args.data,
            tokenizer_path=str(Path(tmp) / "tokenizer.json"),
            max_length=args.max_length,
            batch_size=args.global_batch,
            seed=args.seed,
        )
        dm.prepare_data()
        dm.setup("fit")
        vocab = ChatTokenizer.from_file(Path(tmp) / "tokenizer.json").vocab_size
        # whole batches only: every rank gets the same number of rows
        batches = [b for b in dm.train_dataloader() if len(b.input_ids) == args.global_batch]
        if len(batches) < args.warmup + args.steps:
            parser.error(f"the data gives {len(batches)} full batches; lower --steps or --global-batch")

        result = {
            "benchmark": "scaling",
            "device": "cpu",
            "backend": "gloo",
            "cpu": platform.processor() or platform.machine(),
            "cores": args.cores,
            "torch": torch.__version__,
            "preset": args.preset,
            "global_batch": args.global_batch,
            "max_length": args.max_length,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
        }
        samples = args.global_batch * args.steps
        for world in (1, args.processes):
            out = str(Path(tmp) / f"world{world}.json")
            if world == 1:
                _run(0, 1, 0, args, batches, vocab, out)
            else:
                mp.spawn(_run, args=(world, _free_port(), args, batches, vocab, out), nprocs=world, join=True)
            timing = json.loads(Path(out).read_text())
            result[f"processes_{world}"] = {
                "threads_per_process": max(1, args.cores // world),
                "seconds": round(timing["seconds"], 2),
                "samples_per_sec": round(samples / timing["seconds"], 2),
                "samples_per_sec_per_process": round(samples / timing["seconds"] / world, 2),
                "last_loss_rank0": round(timing["final_loss"], 4),  # rank 0's rows only: a sanity check
            }
    one, many = result["processes_1"], result[f"processes_{args.processes}"]
    result["scaling_ratio"] = round(many["samples_per_sec"] / one["samples_per_sec"], 2)
    result["scaling_efficiency"] = round(result["scaling_ratio"] / args.processes, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
