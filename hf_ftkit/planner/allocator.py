"""A model of PyTorch's CUDA caching allocator, replayed over a step's allocations and frees.

``torch.cuda.max_memory_reserved`` exceeds ``max_memory_allocated`` for two reasons this model
reproduces instead of assuming a flat percentage:

* block rounding: requests round up to 512 bytes; requests of 1 MiB or less come from 2 MiB
  segments, requests under 10 MiB from 20 MiB segments, larger ones from a segment rounded up to
  2 MiB; a large block is split only when more than 1 MiB would remain;
* the phase pattern: a freed block serves a later request only if it is at least as large, and
  free blocks merge only with their neighbours in the same segment, so blocks freed by one phase
  (activations) often cannot hold the next phase's tensors (gradients, optimizer states) and new
  segments are reserved beside them.

The rules are those the caching allocator documents in ``c10/cuda/CUDACachingAllocator.cpp``
(``kMinBlockSize``, ``kSmallSize``, ``kSmallBuffer``, ``kLargeBuffer``, ``kMinLargeAlloc``,
``kRoundLarge``, best fit by size, defaults: no ``max_split_size_mb``, no expandable segments).
The model never frees cached segments, so it gives the reserved peak of a run without memory
pressure; under pressure the real allocator releases whole free segments and retries, so a run
can fit in a little less than this. Pure Python, no torch.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable

MIB = 1 << 20
MIN_BLOCK = 512
SMALL_SIZE = MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


class _Block:
    __slots__ = ("size", "requested", "free", "prev", "next", "small")

    def __init__(self, size: int, small: bool) -> None:
        self.size = size
        self.requested = 0  # bytes the tensor in it asked for, while allocated
        self.free = True
        self.small = small
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Pool:
    """Free blocks of one pool, found by best fit (the smallest block that is large enough).

    ``sizes`` is the sorted list of distinct sizes that have free blocks; ``groups`` maps a size to its
    free blocks, oldest first."""

    __slots__ = ("sizes", "groups")

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.groups: dict[int, dict[_Block, None]] = {}

    def add(self, block: _Block) -> None:
        group = self.groups.get(block.size)
        if group is None:
            group = self.groups[block.size] = {}
            insort(self.sizes, block.size)
        group[block] = None

    def best_fit(self, size: int) -> _Block | None:
        """Take out the oldest free block of the smallest size that holds ``size``, if any."""
        i = bisect_left(self.sizes, size)
        if i == len(self.sizes):
            return None
        found = self.sizes[i]
        group = self.groups[found]
        block = next(iter(group))
        del group[block]
        if not group:
            del self.groups[found]
            del self.sizes[i]
        return block

    def remove(self, block: _Block) -> None:
        group = self.groups[block.size]
        del group[block]
        if not group:
            del self.groups[block.size]
            del self.sizes[bisect_left(self.sizes, block.size)]


def round_size(nbytes: int) -> int:
    """The size a request occupies: a multiple of 512 bytes, at least 512."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The segment ``cudaMalloc`` reserves for a request that no cached block can hold."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """Replays ``malloc``/``free`` and keeps the allocated and reserved peaks."""

    def __init__(self) -> None:
        self._pools = {True: _Pool(), False: _Pool()}
        self._live: dict[object, _Block] = {}
        self.allocated = 0  # bytes of live blocks (what max_memory_allocated counts)
        self.requested = 0  # bytes the tensors asked for
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_requested = 0
        self.peak_reserved = 0

    def malloc(self, key: object, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        block = pool.best_fit(size)
        if block is None:
            block = _Block(segment_size(size), small)
            self.reserved += block.size
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.add(rest)
        block.free = False
        block.requested = nbytes
        self._live[key] = block
        self.allocated += block.size
        self.requested += nbytes
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested

    def requested_by(self, key: object) -> int:
        """Bytes the live allocation ``key`` asked for."""
        return self._live[key].requested

    def free(self, key: object) -> None:
        block = self._live.pop(key)
        self.allocated -= block.size
        self.requested -= block.requested
        pool = self._pools[block.small]
        block.free = True
        before, after = block.prev, block.next
        if before is not None and before.free:  # merge with the free neighbour in the same segment
            pool.remove(before)
            block.size += before.size
            block.prev = before.prev
            if before.prev is not None:
                before.prev.next = block
        if after is not None and after.free:
            pool.remove(after)
            block.size += after.size
            block.next = after.next
            if after.next is not None:
                after.next.prev = block
        pool.add(block)


def replay(events: Iterable[tuple[object, int, bool]]) -> CachingAllocator:
    """Replay ``(key, nbytes, is_alloc)`` events; a free releases what its key allocated (its size is not read)."""
    allocator = CachingAllocator()
    malloc, free = allocator.malloc, allocator.free
    for key, nbytes, is_alloc in events:
        if is_alloc:
            malloc(key, nbytes)
        else:
            free(key)
    return allocator
