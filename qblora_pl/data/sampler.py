"""Training-order samplers: a seeded, length-grouped, resumable shuffle; its per-rank share; eval order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

class LengthGroupedSampler(Sampler[int]):
    """Training order: a shuffle seeded by ``seed + epoch``, optionally grouped by length.

    Grouping follows Hugging Face's ``LengthGroupedSampler``: shuffle, cut into mega-batches of
    ``mega_batch_mult * batch_size``, sort each by length (longest first) and move the longest
    example of the epoch into the first batch, so an out-of-memory error shows at step 0.
    Consecutive ``batch_size`` slices then hold similar lengths and need little padding. Unlike
    Hugging Face, the batches (after the first) are then shuffled as wholes.

    The order depends only on ``(seed, epoch)``; Lightning calls ``set_epoch`` at every epoch
    start. ``resume(epoch, samples_done)`` skips the first ``samples_done`` indices of that
    epoch's order once, for resuming from a mid-epoch checkpoint.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, group_by_length: bool = True,
                 mega_batch_mult: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples) to skip on the next __iter__

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch = epoch
        self._skip = (epoch, samples_done)

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int | None = None) -> list[int]:
        """The full index order of ``epoch`` (default: the current one)."""
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length or not perm:
            return perm
        size = self.mega_batch_mult * self.batch_size
        megabatches = [sorted(perm[i : i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(perm), size)]
        longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        grouped = [i for megabatch in megabatches for i in megabatch]
        # Shuffle whole batches (not within them) so lengths do not run long-to-short inside each
        # mega-batch, which would put a saw-tooth into the loss curve. The first batch (longest
        # example) stays first; a short last batch stays last so the DataLoader's cuts still align.
        bs = self.batch_size
        batches = [grouped[i : i + bs] for i in range(0, len(grouped), bs)]
        middle_end = len(batches) - 1 if len(batches[-1]) < bs else len(batches)
        middle = batches[1:middle_end]
        shuffled = [middle[k] for k in torch.randperm(len(middle), generator=generator).tolist()]
        batches = batches[:1] + shuffled + batches[middle_end:]
        return [i for batch in batches for i in batch]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            order = order[skip[1] :]
        yield from order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])


class RankShareSampler(DistributedSampler):
    """Rank ``r`` of ``W``'s share of another sampler's order: ``order[r::W]``.

    With ``batch_size / W`` examples per rank, global batch ``i`` is then exactly batch ``i`` of
    a one-device run (``order[i*B : (i+1)*B]``), split over the ranks - so length grouping and the
    training order survive multi-device training. Lightning's own replacement
    (``DistributedSamplerWrapper``) reshuffles the wrapped order for training; being a
    ``DistributedSampler`` this one is left in place. An order not divisible by ``W`` is padded
    with its first indices, as ``DistributedSampler`` does.
    """

    def __init__(self, sampler: Sampler[int], num_replicas: int, rank: int) -> None:  # noqa: D107
        # DistributedSampler.__init__ wants a dataset and a process group; only its type is needed.
        self.sampler, self.num_replicas, self.rank, self.epoch = sampler, num_replicas, rank, 0

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        order += order[: (-len(order)) % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)


class LengthSortedSampler(Sampler[int]):
    """Evaluation order: longest first (ties in index order), so batches need little padding."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.indices = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

