"""Batch samplers: length bucketing (less padding) and a resumable, epoch-cycling stream for PPO prompts.

Length bucketing follows the usual "sortish" recipe (fairseq / AllenNLP ``BucketIterator``, torchtext's
``BucketIterator``): shuffle all indices, cut them into mega-chunks of ``batch_size * bucket_size_multiplier``, sort
each chunk by length, cut it into batches and shuffle the order of the batches. Batches hold similar lengths (little
padding) while the composition stays random at the scale of a chunk. ``bucket_size_multiplier=1`` is plain random
batching (each batch merely sorted inside), which is what the prompt stream uses by default.

Everything is deterministic given ``(seed, epoch)``: the permutation comes from a private ``torch.Generator`` seeded
from both, never from global RNG state, so a resumed run sees the same batches.

Resuming mid-epoch: ``LengthBucketBatchSampler.state_dict()`` is ``(epoch, position)``, the batches of the epoch
already yielded, and after ``load_state_dict`` the next pass over that epoch starts at ``position``.
:class:`ResumableDataLoader` (the SFT and preference train loaders) exposes that state counted on the consumer side
of the DataLoader (worker processes read ahead of the training loop), so Lightning saves it in every checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and restores it before the resumed epoch starts: the run continues
with the batch after the checkpoint's, and the batches it skips are the ones Lightning's loop counters
(``batch_progress``) record as done.

Distributed runs: the samplers shard by ``(num_replicas, rank)`` themselves. They cut *global* batches of
``batch_size * num_replicas`` rows exactly as one process with that batch size would (same permutation, same
length-sorted chunks), and rank ``r`` takes the ``r``-th slice of ``batch_size`` rows of each. So ``N`` ranks with
``batch_size`` b step on exactly the rows one process with ``batch_size`` ``N * b`` steps on (DESIGN.md: 2 ranks x b
behave as 1 rank x 2b). A short last global batch is padded by repeating its own rows up to a multiple of
``num_replicas`` (as ``DistributedSampler`` pads), so every rank gets a batch of the same size. Lightning cannot
inject its own distributed sampler into a custom batch sampler, so multi-device runs set
``Trainer(use_distributed_sampler=False)``; the DataModules pass ``world_size``/``global_rank`` in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochCyclingBatchSampler", "LengthBucketBatchSampler", "ResumableDataLoader", "padding_fraction"]

log = logging.getLogger(__name__)

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
        num_replicas, rank: data-parallel ranks; ``batch_size`` is per rank, and rank ``rank`` yields its slice of
            each global batch of ``batch_size * num_replicas`` rows (see the module notes).

    ``state_dict()`` / ``load_state_dict()`` save and restore the position within an epoch (see the module notes);
    every rank yields the same number of batches, so one rank's state resumes all of them.
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
        self._resume: tuple[int, int] | None = None  # (epoch, position) the next pass starts at, once
        self._pass = (0, 0)  # (epoch, first position) of the current pass
        self._yielded = 0  # batches the current pass has yielded
        # Lightning's _set_sampler_epoch calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler
        self.sampler = _EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this, through ``.sampler``, at each epoch start)."""
        self.epoch = epoch

    @property
    def global_batch_size(self) -> int:
        """Rows of one step over every rank: ``batch_size * num_replicas``."""
        return self.batch_size * self.num_replicas

    def _all_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: what one process with ``global_batch_size`` would yield."""
        n = len(self.lengths)
        if n == 0:
            return []
        size = self.global_batch_size
        g = _epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        chunk = size * self.bucket_size_multiplier
        batches: list[list[int]] = []
        for start in range(0, n, chunk):
            idx = order[start : start + chunk]
            # stable sort on -length: longest first, ties keep their (shuffled) order, so it is deterministic
            idx = idx[torch.sort(-self.lengths[idx], stable=True).indices]
            batches.extend(idx[i : i + size].tolist() for i in range(0, len(idx), size))
        # only the very last batch (end of the last chunk) can be short
        if self.drop_last and len(batches[-1]) < size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches this rank yields in ``epoch`` (default: the current one): its slice of each global batch."""
        batches = self._all_batches(self.epoch if epoch is None else epoch)
        if self.num_replicas == 1:
            return batches
        mine = []
        for batch in batches:
            short = -len(batch) % self.num_replicas  # a short last batch: pad with its own rows, cyclically
            batch = batch + [batch[i % len(batch)] for i in range(short)]
            per_rank = len(batch) // self.num_replicas
            mine.append(batch[self.rank * per_rank : (self.rank + 1) * per_rank])
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the pass starts at the first next(), after Lightning's set_epoch
        start = 0
        if self._resume is not None:
            (epoch, position), self._resume = self._resume, None
            start = position if epoch == self.epoch else 0  # a resume point of another epoch does not apply
        batches = self.epoch_batches(self.epoch)
        self._pass, self._yielded = (self.epoch, start), 0
        for batch in batches[start:]:
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        n, size = len(self.lengths), self.global_batch_size
        return n // size if self.drop_last else -(-n // size)

    def _layout(self) -> dict[str, Any]:
        """What decides the batches: a state saved under a different layout resumes a different order."""
        return {
            "seed": self.seed,
            "items": len(self.lengths),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "bucket_size_multiplier": self.bucket_size_multiplier,
            "num_replicas": self.num_replicas,
        }

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """``epoch`` and ``position`` (its batches already used) where iteration continues, plus the layout.

        Args:
            consumed: batches of the current pass actually used (a DataLoader with workers draws batches ahead of
                its consumer and passes its own count); default: the batches this sampler has yielded.
        """
        if self._resume is not None:  # restored, not yet iterated
            epoch, position = self._resume
        else:
            epoch, first = self._pass
            position = first + (self._yielded if consumed is None else consumed)
        if position >= len(self):  # the epoch is done: continue at the start of the next one
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, **self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at ``state_dict``'s epoch and position: the next pass over that epoch skips its first batches."""
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"sampler state: epoch and position must be >= 0, got {epoch}, {position}")
        mine = self._layout()
        changed = [k for k, v in mine.items() if k in state_dict and state_dict[k] != v]
        if changed:
            log.warning(
                "batch sampler resumed with different %s than the checkpoint: continuing at batch %d of epoch %d "
                "of a different order",
                ", ".join(changed),
                position,
                epoch,
            )
        self.epoch = epoch
        self._resume = (epoch, min(position, len(self)))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`LengthBucketBatchSampler` that Lightning saves and restores mid-epoch.

    Its ``state_dict()`` is the sampler's, with the position counted in batches this loader has handed out (what the
    training loop consumed; worker processes may have drawn more indices ahead). Lightning calls it when saving a
    checkpoint and calls ``load_state_dict()`` before the resumed epoch starts. Constructed like a DataLoader.
    """

    _handed_out = 0

    def __iter__(self) -> Iterator[Any]:
        # a generator: the underlying iterator (and the sampler's pass) starts at the first next(), after set_epoch
        self._handed_out = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def _sampler(self) -> LengthBucketBatchSampler:
        sampler = self.batch_sampler
        if not isinstance(sampler, LengthBucketBatchSampler):
            raise TypeError(
                f"ResumableDataLoader needs a LengthBucketBatchSampler as batch_sampler, got {type(sampler).__name__}"
            )
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """The sampler's epoch and position, counting the batches this loader has handed out."""
        return self._sampler().state_dict(consumed=self._handed_out)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue where ``state_dict`` (from :meth:`state_dict`) left off."""
        self._sampler().load_state_dict(state_dict)


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
