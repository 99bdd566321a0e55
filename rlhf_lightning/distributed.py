"""Reductions across data-parallel ranks: the one place PPO's statistics become global.

DESIGN.md: "every statistic that normalises or steers is global", so two ranks with batch b behave as one rank with
batch 2b. Every function here is a no-op (or returns the local value) when ``torch.distributed`` is not initialised
or the world has one process, so the same code runs on one device, under Lightning's DDP (gloo on CPU, NCCL on GPUs),
and in unit tests that spawn gloo processes themselves.

Every function is a collective: every rank must call it, in the same order, with tensors of the same shape.

Moments are reduced as ``(count, sum, sum of squares)`` in float64, so ranks with different numbers of valid tokens
combine exactly (not as a mean of per-rank means).

:func:`shard_for_strategy` is the stages' FSDP2 hook: called from ``configure_model`` on each network, it applies
``fully_shard`` when the Trainer's strategy hands the module a device mesh (Lightning's ``ModelParallelStrategy``)
and does nothing otherwise (one device, DDP, DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_tensors",
    "all_reduce_sum",
    "average_gradients",
    "clip_grad_norm_",
    "global_masked_moments",
    "global_mean",
    "global_rank",
    "global_weighted_means",
    "no_backward_sync",
    "refuse_device_mesh",
    "shard_for_strategy",
    "world_size",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of data-parallel processes (1 without ``torch.distributed``)."""
    return dist.get_world_size() if _active() else 1


def global_rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if _active() else 0


def _on_backend_device(tensor: Tensor) -> Tensor:
    """``tensor`` where the process group can reduce it: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Element-wise sum of ``tensor`` over all ranks, as a new tensor on ``tensor``'s device (``tensor`` itself is
    left unchanged)."""
    if not _active():
        return tensor.detach().clone()
    out = _on_backend_device(tensor.detach()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_gather_tensors(tensor: Tensor) -> list[Tensor]:
    """``[tensor of rank 0, tensor of rank 1, ...]`` (every rank's tensor must have the same shape and dtype)."""
    if not _active():
        return [tensor.detach().clone()]
    local = _on_backend_device(tensor.detach()).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.to(tensor.device) for t in out]


def global_mean(x: Tensor) -> Tensor:
    """Mean of every element of ``x`` on every rank (ranks may hold different numbers of elements); 0 if none."""
    sums = all_reduce_sum(
        torch.stack([x.detach().double().sum(), x.new_tensor(x.numel(), dtype=torch.float64)])
    )
    return (sums[0] / sums[1].clamp_min(1)).to(x.dtype if x.is_floating_point() else torch.float32)


def global_weighted_means(means: dict[str, Tensor], weight: int) -> tuple[dict[str, Tensor], Tensor]:
    """``(global means, total weight)``: each scalar of ``means`` (this rank's mean over ``weight`` items, e.g.
    pairs) averaged over every rank's items, in one all-reduce; the total weight is float64. Ranks may hold different
    numbers of items (a mean of per-rank means would weight an item on a small rank more). Every rank must pass the
    same keys in the same order."""
    values = list(means.values())
    device = values[0].device if values else torch.device("cpu")
    local = torch.stack(
        [torch.tensor(float(weight), dtype=torch.float64, device=device)]
        + [v.detach().double().reshape(()) * weight for v in values]
    )
    total, *sums = all_reduce_sum(local).unbind()
    out = {k: (s / total.clamp_min(1)).to(v.dtype) for (k, v), s in zip(means.items(), sums)}
    return out, total


def global_masked_moments(
    x: Tensor, mask: Tensor | None = None, unbiased: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, count)`` of the entries of ``x`` where ``mask`` is True, over every rank.

    Shapes: ``x`` any shape, e.g. advantages (B, R); ``mask`` bool, broadcastable to ``x`` (None = all count).
    Returns three scalars: ``mean`` and ``var`` in ``x``'s dtype (``var`` with Bessel's correction when ``unbiased``;
    0 with fewer than two values, as :func:`rlhf_lightning.functional.masked.masked_var`) and ``count`` (float64).
    On one process this equals ``masked_mean`` / ``masked_var`` up to float rounding.
    """
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
    kept = torch.where(valid, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    local = torch.stack([valid.sum().double(), kept.sum(), (kept * kept).sum()])
    n, total, squares = all_reduce_sum(local).unbind()
    mean = total / n.clamp_min(1)
    m2 = (squares - n * mean * mean).clamp_min(0)
    var = m2 / ((n - 1) if unbiased else n).clamp_min(1)
    return mean.to(x.dtype), var.to(x.dtype), n


def token_mean_scale(local_tokens: Tensor) -> Tensor:
    """``world_size / (tokens on every rank)``: a rank that backpropagates ``scale * (sum of its per-token losses)``
    and then :func:`average_gradients` steps on the token mean over all ranks' tokens (a mean of per-rank token means
    would weight a token on a rank with few tokens more). On one process: ``1 / local_tokens``."""
    total = all_reduce_sum(local_tokens.detach().float().reshape(1)).clamp_min(1)
    return world_size() / total.squeeze(0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each ``.grad`` with its mean over ranks (one flat all-reduce). Parameters without a gradient are
    skipped, so every rank must have gradients on the same parameters (the same code path on every rank). Gradients
    of FSDP2-sharded parameters (DTensors) are skipped too: FSDP2's backward has already averaged them."""
    if not _active():
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2, same clip coefficient ``max_norm / (norm + 1e-6)`` capped at 1) for a
    mix of FSDP2-sharded (DTensor) and plain gradients, which torch's own refuses to combine; returns the total norm
    as a plain tensor. The norm of sharded gradients is over every rank's shards."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = []
    for sharded in (True, False):
        group = [g for g in grads if isinstance(g, DTensor) == sharded]
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    total = torch.stack(squares).sum().sqrt()
    coefficient = float((max_norm / (total + 1e-6)).clamp(max=1.0))
    for g in grads:
        g.mul_(coefficient)
    return total


@contextmanager
def no_backward_sync(module: object) -> Iterator[None]:
    """Switch off a ``DistributedDataParallel`` wrapper's gradient hooks for the backward passes inside the block
    (nothing to do for any other module): the caller all-reduces gradients itself (:func:`average_gradients`)."""
    parallel = torch.nn.parallel.DistributedDataParallel
    with module.no_sync() if isinstance(module, parallel) else nullcontext():
        yield


def refuse_device_mesh(device_mesh: object | None, stage: str) -> None:
    """Fail before training when a stage that does not shard its networks runs under FSDP2 (``device_mesh`` set):
    its ranks would train unsynchronised copies (ModelParallelStrategy adds no gradient averaging of its own)."""
    if device_mesh is not None:
        raise RuntimeError(
            f"{stage} does not shard its networks, so under FSDP2 (ModelParallelStrategy) its ranks would train "
            "unsynchronised copies; run it with DDP (configs/strategies/ddp_gpus.yaml or ddp_cpu.yaml)"
        )


def _layer_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The outermost ``ModuleList`` s under ``module``: a transformer's repeated blocks (``GPT.blocks``, a Hugging Face
    decoder's ``layers``), the units FSDP2 gathers one at a time."""
    found: list[torch.nn.ModuleList] = []

    def visit(m: torch.nn.Module) -> None:
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and len(child):
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


def shard_for_strategy(
    module: torch.nn.Module,
    device_mesh: object | None,
    forward_methods: Iterable[str] = ("hidden_states",),
    replicated: Iterable[torch.nn.Parameter] = (),
) -> torch.nn.Module:
    """Shard ``module`` with FSDP2 over ``device_mesh``'s data-parallel dimension; a no-op when ``device_mesh`` is None.

    ``device_mesh`` is the LightningModule's ``device_mesh``: set by Lightning's ``ModelParallelStrategy`` (the FSDP2
    strategy, ``configs/strategies/fsdp2.yaml``) before ``configure_model``, None under every other strategy. Each
    transformer block is sharded on its own (gathered for its forward and backward only), then the root takes the
    rest (embeddings, final norm, LM or scalar head). The stages call the backbone's ``hidden_states`` rather than
    ``forward``, so ``forward_methods`` that the module has are registered to gather the root's parameters too.
    Parameters, gradients and optimizer states are then split over the ranks; FSDP2 averages gradients over them as
    DDP does, so the global token-mean losses need no change. Tensor parallelism is not supported
    (``tensor_parallel_size`` must be 1).
    """
    if device_mesh is None:
        return module
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={device_mesh['tensor_parallel'].size()}: the stages shard with FSDP2 only; set "
            "the strategy's tensor_parallel_size to 1 (configs/strategies/fsdp2.yaml)"
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    backbone = getattr(module, "backbone", None)
    if isinstance(backbone, torch.nn.Module):  # a reward or value model: the backbone first, then the head
        shard_for_strategy(backbone, device_mesh)
    else:
        for layers in _layer_lists(module):
            for layer in layers:
                fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh, ignored_params=set(replicated) or None)
    for name in forward_methods:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return module
