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
    assert not trimmer.due(1 * MIB, 60 * MIB)  # the first look
    assert not trimmer.due(2 * MIB, 61 * MIB)  # ordinary turnover
    assert not trimmer.due(0, 100 * MIB)  # a wave is on: the heap is full
    assert trimmer.due(30 * MIB, 100 * MIB)  # it went: its memory is free, still resident
    trimmer.trimmed(30 * MIB, 70 * MIB)
    assert not trimmer.due(30 * MIB, 70 * MIB)  # given back already: no trim at every look
    assert not trimmer.due(40 * MIB, 72 * MIB)  # less than the threshold freed since
    assert not trimmer.due(20 * MIB, 80 * MIB)  # a wave reuses the free pages (resident again)
    assert trimmer.due(36 * MIB, 80 * MIB)  # and frees them


def test_a_wave_between_two_looks_is_seen_by_the_rss_it_left() -> None:
    trimmer = HeapTrimmer(16 * MIB)
    assert trimmer.due(30 * MIB, 100 * MIB) is False  # the first look sets both marks
    trimmer.trimmed(30 * MIB, 70 * MIB)
    assert trimmer.due(30 * MIB, 95 * MIB)  # the heap looks the same, RSS does not
    trimmer.trimmed(30 * MIB, 70 * MIB)
    assert not trimmer.due(10 * MIB, 95 * MIB)  # too little free to be worth it


def test_a_trim_in_the_middle_of_a_wave_does_not_hide_its_end() -> None:
    trimmer = HeapTrimmer(16 * MIB)
    assert not trimmer.due(0, 60 * MIB)
    assert trimmer.due(20 * MIB, 90 * MIB)  # part of the wave left
    trimmer.trimmed(20 * MIB, 89 * MIB)
    assert trimmer.due(60 * MIB, 89 * MIB)  # the rest left


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
