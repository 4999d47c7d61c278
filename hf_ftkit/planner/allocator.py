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

import bisect
from collections.abc import Iterable

MIB = 1 << 20
MIN_BLOCK = 512
SMALL_SIZE = MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


class _Block:
    __slots__ = ("size", "free", "prev", "next", "small")

    def __init__(self, size: int, small: bool) -> None:
        self.size = size
        self.free = True
        self.small = small
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Pool:
    """Free blocks of one pool, found by best fit (the smallest block that is large enough)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []  # sorted distinct sizes that have free blocks
        self.blocks: dict[int, dict[_Block, None]] = {}  # size -> free blocks, oldest first

    def add(self, block: _Block) -> None:
        group = self.blocks.get(block.size)
        if group is None:
            group = self.blocks[block.size] = {}
            bisect.insort(self.sizes, block.size)
        group[block] = None

    def remove(self, block: _Block) -> None:
        group = self.blocks[block.size]
        del group[block]
        if not group:
            del self.blocks[block.size]
            del self.sizes[bisect.bisect_left(self.sizes, block.size)]

    def best_fit(self, size: int) -> _Block | None:
        i = bisect.bisect_left(self.sizes, size)
        if i == len(self.sizes):
            return None
        block = next(iter(self.blocks[self.sizes[i]]))
        self.remove(block)
        return block


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
            self.peak_reserved = max(self.peak_reserved, self.reserved)
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
        self._live[key] = block
        self.allocated += block.size
        self.requested += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)

    def free(self, key: object, nbytes: int) -> None:
        block = self._live.pop(key)
        self.allocated -= block.size
        self.requested -= nbytes
        pool = self._pools[block.small]
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                pool.remove(neighbour)
                block.size += neighbour.size
                if neighbour is block.prev:
                    block.prev = neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        pool.add(block)


def replay(events: Iterable[tuple[object, int, bool]]) -> CachingAllocator:
    """Replay ``(key, nbytes, is_alloc)`` events; a key is freed with the size it was allocated with."""
    allocator = CachingAllocator()
    for key, nbytes, is_alloc in events:
        if is_alloc:
            allocator.malloc(key, nbytes)
        else:
            allocator.free(key, nbytes)
    return allocator
