"""Batch samplers: length bucketing (less padding) and a resumable, epoch-cycling stream for PPO prompts.

Length bucketing follows the usual "sortish" recipe (fairseq / AllenNLP ``BucketIterator``, torchtext's
``BucketIterator``): shuffle all indices, cut them into mega-chunks of ``batch_size * bucket_size_multiplier``, sort
each chunk by length, cut it into batches and shuffle the order of the batches. Batches hold similar lengths (little
padding) while the composition stays random at the scale of a chunk. ``bucket_size_multiplier=1`` is plain random
batching (each batch merely sorted inside), which is what the prompt stream uses by default.

Everything is deterministic given ``(seed, epoch)``: the permutation comes from a private ``torch.Generator`` seeded
from both, never from global RNG state, so a resumed run sees the same batches.

Distributed runs: the samplers shard whole batches by ``(num_replicas, rank)`` themselves (the list of batches is
padded by repeating its head so every rank gets the same count, as ``DistributedSampler`` does). Lightning cannot
inject its own distributed sampler into a custom batch sampler, so multi-device runs set
``Trainer(use_distributed_sampler=False)``; the DataModules pass ``world_size``/``global_rank`` in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["EpochCyclingBatchSampler", "LengthBucketBatchSampler", "padding_fraction"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to mix seed and epoch into one generator seed


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * _MIX + epoch) % (2**63 - 1))
    return g


class _EpochForwarder:
    """Sits at ``batch_sampler.sampler``, where Lightning looks for ``set_epoch`` (it never calls the batch
    sampler's own), and forwards the epoch to the batch sampler."""

    def __init__(self, owner: LengthBucketBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices whose lengths are similar; every index exactly once per epoch.

    Args:
        lengths: token length of each dataset item (index ``i`` has length ``lengths[i]``).
        batch_size: items per batch.
        shuffle: shuffle the indices and the order of the batches (train). When False the indices keep dataset
            order: chunks are still sorted by length, and batches come in order, so ``bucket_size_multiplier=1``
            is plain sequential batching and a multiplier of at least ``len / batch_size`` sorts everything,
            longest first.
        seed: base seed; the permutation of epoch ``e`` depends only on ``(seed, e)``.
        drop_last: drop the one short batch (if any) instead of yielding it.
        bucket_size_multiplier: a chunk of ``batch_size * bucket_size_multiplier`` shuffled indices is sorted by
            length before batching. 1 = random batching; larger = less padding, less random composition.
        num_replicas, rank: shard whole batches across data-parallel ranks.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        bucket_size_multiplier: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.bucket_size_multiplier = bucket_size_multiplier
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # Lightning's _set_sampler_epoch calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler
        self.sampler = _EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this, through ``.sampler``, at each epoch start)."""
        self.epoch = epoch

    def _all_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if n == 0:
            return []
        g = _epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        chunk = self.batch_size * self.bucket_size_multiplier
        batches: list[list[int]] = []
        for start in range(0, n, chunk):
            idx = order[start : start + chunk]
            # stable sort on -length: longest first, ties keep their (shuffled) order, so it is deterministic
            idx = idx[torch.sort(-self.lengths[idx], stable=True).indices]
            batches.extend(idx[i : i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size))
        # only the very last batch (end of the last chunk) can be short
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches this rank yields in ``epoch`` (default: the current one)."""
        batches = self._all_batches(self.epoch if epoch is None else epoch)
        if self.num_replicas == 1 or not batches:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        else:
            short = -len(batches) % self.num_replicas
            batches = batches + [batches[i % len(batches)] for i in range(short)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.num_replicas == 1:
            return total
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)


class EpochCyclingBatchSampler(Sampler[list[int]]):
    """An endless stream of batches: epoch 0 of ``base``, then epoch 1, ... starting at a saved position.

    ``position`` counts batches from the very start of the stream (across epochs): position ``p`` is batch
    ``p % len(base)`` of epoch ``p // len(base)``. :meth:`resume_from` sets where the next iteration starts, which
    is how a checkpointed run continues with exactly the batch it would have seen next. The stream has no
    ``__len__`` (Lightning treats it as infinite: bound the run with ``max_steps``).
    """

    def __init__(self, base: LengthBucketBatchSampler, start_position: int = 0) -> None:
        if len(base) == 0:
            raise ValueError(
                "cannot cycle over an empty sampler (no full batch: fewer rows than batch_size?)"
            )
        self.base = base
        self.start_position = start_position

    @property
    def batches_per_epoch(self) -> int:
        return len(self.base)

    def resume_from(self, position: int) -> None:
        """Start the next iteration at stream ``position`` (batches already consumed)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.start_position = position

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = divmod(self.start_position, self.batches_per_epoch)
        while True:
            batches = self.base.epoch_batches(epoch)
            yield from batches[skip:]
            skip = 0
            epoch += 1


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded ``(B, T_max)`` cells that are padding, over all ``batches`` (0 = no padding)."""
    real = padded = 0
    for batch in batches:
        lens = [lengths[i] for i in batch]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return 1.0 - real / padded if padded else 0.0
