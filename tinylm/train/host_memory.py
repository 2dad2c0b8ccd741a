"""Host memory that a training step reuses instead of asking the kernel for it again.

PyTorch's CPU tensors come straight from malloc. glibc serves every block over 32 MB (the most M_MMAP_THRESHOLD can
be) with a fresh mmap and unmaps it on free, so each step's large temporaries (a loss chunk's (1024, 49152) float32
logits are 200 MB, attention's and the MLP's activations tens of MB) are new pages every step: the kernel zeroes
and maps them one 4 KB page fault at a time. On the QED-75M training shape (2 cores) that was 1.2-2.8 s a step with
most of the spread in system time, against 1.07 s steady with the pages kept (benchmarks/train.py, BENCHMARKS.md).
The same advice as PyTorch's CPU performance guide (a caching allocator such as jemalloc or tcmalloc), done here
with glibc's own switches so that nothing has to be preloaded: no mmap for large blocks (they come from the heap
and stay there for the next step) and the heap's top trimmed only past 2 GB free. The process keeps its peak: a
training run holds that much again at the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("tinylm.train")

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_AT = 2**31 - 1  # bytes free at the heap's top before glibc gives them back: the most mallopt takes
_OPT_OUT = "TINYLM_SYSTEM_MALLOC"  # set to 1 to leave glibc's defaults alone


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep freed memory for reuse.
    -> True when set (glibc, not opted out); False elsewhere (musl, macOS, Windows: nothing to do)."""
    if os.environ.get(_OPT_OUT, "") not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AT) == 1
    if not done:
        log.debug("mallopt refused the settings; glibc's defaults stay")
    return done


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt accepts and ignores these
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
