"""Memory accounting for the memory report: bytes of weights, resident memory, and the peak over a stretch of work.

Resident figures come from /proc/self/status (Linux): VmRSS now, VmHWM the peak since the process started or since
`reset_peak()` (which writes 5 to /proc/self/clear_refs, the kernel's documented way to reset the peak).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, each storage counted once (a tied table is not counted twice)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and not tensor.is_meta:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def bytes_by_kind(model: nn.Module) -> dict[str, int]:
    """Bytes per storage dtype ("int8", "uint8" = packed int4, "bfloat16", ...), each storage once."""
    seen, kinds = set(), {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or tensor.is_meta:
            continue
        seen.add(storage.data_ptr())
        kind = str(tensor.dtype).removeprefix("torch.")
        kinds[kind] = kinds.get(kind, 0) + storage.nbytes()
    return kinds


def _status(field: str) -> int | None:
    """A /proc/self/status field in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def rss() -> int | None:
    return _status("VmRSS")


def peak_rss() -> int | None:
    return _status("VmHWM")


def reset_peak() -> bool:
    """Start a new peak (VmHWM := VmRSS); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS after a load shows what is still in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
