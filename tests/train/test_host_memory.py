"""keep_freed_memory: large blocks come from glibc's heap (reused by the next step), not from a fresh mmap each."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    import torch
    from tinylm.train.host_memory import keep_freed_memory

    class Info(ctypes.Structure):  # struct mallinfo2 (glibc 2.33+), fields in order
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    before = libc.mallinfo2().hblkhd  # bytes in mmap'd blocks
    block = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MB: over glibc's largest mmap threshold
    mapped = libc.mallinfo2().hblkhd - before
    del block
    heap_after_free = libc.mallinfo2().arena
    print(mapped, heap_after_free)
""")


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mapped, heap = map(int, out.stdout.split())
    return mapped, heap


def test_large_blocks_come_from_the_heap_and_stay():
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2  # noqa: B018
    except (OSError, AttributeError, TypeError):
        pytest.skip("not glibc 2.33+ (no mallinfo2)")
    mapped, _ = _probe("default")
    assert mapped >= 64 << 20  # glibc's default: a fresh mapping for the block, unmapped on free
    mapped, heap = _probe("keep")
    assert mapped == 0  # from the heap instead
    assert heap >= 64 << 20  # and still there after the free, for the next step


def test_opt_out(monkeypatch):
    from tinylm.train.host_memory import keep_freed_memory

    monkeypatch.setenv("TINYLM_SYSTEM_MALLOC", "1")
    assert keep_freed_memory() is False
