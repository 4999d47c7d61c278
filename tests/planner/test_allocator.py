"""The caching-allocator model follows the rules PyTorch's CUDACachingAllocator documents."""

from __future__ import annotations

from hf_ftkit.planner.allocator import MIB, CachingAllocator, replay, round_size, segment_size


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(512) == 2 * MIB  # small pool
    assert segment_size(5 * MIB) == 20 * MIB  # large pool, under 10 MiB
    assert segment_size(11 * MIB + 1) == 12 * MIB  # rounded to 2 MiB


def test_small_requests_share_a_two_mib_segment():
    a = replay([(i, 1000, True) for i in range(100)])
    assert a.reserved == 2 * MIB and a.allocated == 100 * 1024


def test_medium_requests_are_carved_from_one_twenty_mib_segment():
    a = replay([(1, 5 * MIB, True), (2, 5 * MIB, True), (3, 5 * MIB, True)])
    assert a.reserved == 20 * MIB


def test_freed_block_too_small_for_a_larger_request_stays_reserved():
    a = replay([(1, 100 * MIB, True), (1, 100 * MIB, False), (2, 101 * MIB, True)])
    assert a.reserved == 100 * MIB + 102 * MIB
    assert a.peak_requested == 101 * MIB


def test_free_neighbours_in_a_segment_merge():
    a = replay([(1, 5 * MIB, True), (2, 5 * MIB, True), (1, 5 * MIB, False), (2, 5 * MIB, False),
                (3, 19 * MIB, True)])
    assert a.reserved == 20 * MIB  # the two freed blocks and the tail merged into one 20 MiB block


def test_blocks_in_different_segments_never_merge():
    a = replay([(1, 12 * MIB, True), (2, 12 * MIB, True), (1, 12 * MIB, False), (2, 12 * MIB, False),
                (3, 20 * MIB, True)])
    assert a.reserved == 12 * MIB + 12 * MIB + 20 * MIB


def test_large_block_is_split_only_when_more_than_one_mib_remains():
    a = CachingAllocator()
    a.malloc("a", 12 * MIB)
    a.free("a")
    a.malloc("b", 11 * MIB + MIB // 2)  # 0.5 MiB would remain: the whole block is handed out
    assert a.allocated == 12 * MIB and a.reserved == 12 * MIB
    a.free("b")
    a.malloc("c", 4 * MIB)  # 8 MiB remain: split, and the rest serves the next request
    a.malloc("d", 8 * MIB)
    assert a.reserved == 12 * MIB and a.allocated == 12 * MIB


def test_best_fit_picks_the_smallest_block_that_holds_the_request():
    a = replay([(1, 40 * MIB, True), (2, 16 * MIB, True), (1, 40 * MIB, False), (2, 16 * MIB, False),
                (3, 14 * MIB, True), (4, 40 * MIB, True)])
    assert a.reserved == 56 * MIB  # 14 MiB went into the 16 MiB block, leaving 40 MiB whole for the next
