"""When freed heap memory goes back to the system (memory.py), in process."""

from __future__ import annotations

import ctypes

import pytest

from proxy import memory
from proxy.memory import HeapTrimmer

MIB = 1 << 20
BLOCK = 64 * 1024 - 64  # below the mmap threshold: from the heap


def test_a_trim_comes_after_a_wave_has_come_and_gone() -> None:
    trimmer = HeapTrimmer(16 * MIB)
    assert not trimmer.due(60 * MIB, 1 * MIB)  # the first look: the floor
    assert not trimmer.due(100 * MIB, 2 * MIB)  # the wave is on: RSS up, nothing free
    assert trimmer.due(100 * MIB, 30 * MIB)  # it went: its memory is free, still resident
    trimmer.trimmed(70 * MIB)
    assert not trimmer.due(70 * MIB, 30 * MIB)  # given back already: no trim every look
    assert not trimmer.due(80 * MIB, 30 * MIB)  # less than the threshold above the floor
    assert trimmer.due(90 * MIB, 20 * MIB)  # the free pages were used again, then freed


def test_no_trim_while_memory_is_in_use_or_rss_fell_by_itself() -> None:
    trimmer = HeapTrimmer(16 * MIB)
    assert not trimmer.due(100 * MIB, 40 * MIB)
    assert not trimmer.due(50 * MIB, 40 * MIB)  # RSS fell: the floor with it
    assert not trimmer.due(60 * MIB, 40 * MIB)
    assert trimmer.due(70 * MIB, 40 * MIB)


def test_freed_heap_memory_is_seen_and_given_back() -> None:
    if memory.free_heap_bytes() is None:
        pytest.skip("not glibc: nothing to give back")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(1280)]  # 80 MiB
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # resident
    resident, free = memory.resident_bytes(), memory.free_heap_bytes() or 0
    try:
        for block in blocks[::2]:  # holes between blocks in use: free() cannot trim them
            libc.free(block)
        assert (memory.free_heap_bytes() or 0) >= free + 32 * MIB
        assert memory.release_free_memory()
        assert memory.resident_bytes() <= resident - 32 * MIB
    finally:
        for block in blocks[1::2]:
            libc.free(block)
