"""4-bit weights for PyTorch's CPU kernel `_weight_int4pack_mm_for_cpu`: quantize, pack, and read back.

Convention (tinygemm's, kept by the CPU kernel): a weight is `(q - 8) * scale + zero`, q in [0, 15], one scale and
one zero per group of `group_size` consecutive input features; `scales_and_zeros` is (K / group, N, 2).

The kernel's packed layout depends on the CPU: `_convert_weight_to_int4pack_for_cpu` writes blocks of BLOCK_N
output rows (64 on AVX512, 32 on AVX2) as {N / BLOCK_N, K, BLOCK_N / 2} bytes, each byte holding row d and row
d + BLOCK_N / 2; a last partial block (and every block on other CPUs) pairs rows n, n + 1 instead
(aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel). Checkpoints therefore store a portable
layout (two consecutive input features per byte, low nibble first) and we repack at load. Reading rows back out of
the kernel layout (embedding lookups, dequantize, export) uses the layout detected once by packing a probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tinylm.errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts
ROW_MULTIPLE = 16  # the kernel needs N % 16 == 0; other N are padded with zero rows
_CHUNK_ROWS = 4096  # rows quantized / packed at a time: bounds temporaries for 150k-row embeddings


@dataclass(frozen=True)
class Layout:
    block: int  # BLOCK_N of the kernel
    blocked: bool  # full blocks pair row d with d + block/2 (AVX2/AVX512); else rows n, n+1


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> q (N, K) uint8 in [0, 15], scales (N, K/g) fp32, zeros (N, K/g) fp32.

    Asymmetric min/max per group, as gpt-fast's `get_group_qparams` (quantize.py): zero = min + 8 * scale.
    """
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group_size)
    zeros = torch.empty_like(scales)
    for start in range(0, rows, _CHUNK_ROWS):
        w = weight[start:start + _CHUNK_ROWS].float().reshape(-1, cols // group_size, group_size)  # (n, G, g)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q[start:start + _CHUNK_ROWS] = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(-1, cols)
        scales[start:start + _CHUNK_ROWS], zeros[start:start + _CHUNK_ROWS] = scale, low + 8 * scale
    return q, scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q (N, K) in [0, 15], scales/zeros (N, G) -> (N, K) float32, computed as the kernel does: (q - 8) * s + z."""
    rows, cols = q.shape
    groups = scales.shape[1]
    w = (q.float() - 8).reshape(rows, groups, cols // groups) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(rows, cols)


def pack_portable(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: feature 2i in the low nibble, 2i+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_portable(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def to_kernel(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15], N % 16 == 0 -> the CPU kernel's packed (N, K/2) uint8, packed in row chunks.

    Chunks start at multiples of 4096 rows (a multiple of every BLOCK_N), so they pack exactly as the whole would.
    """
    out = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8)
    for start in range(0, q.shape[0], _CHUNK_ROWS):
        chunk = q[start:start + _CHUNK_ROWS].to(torch.int32)
        out[start:start + _CHUNK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1)
    return out


def gather_rows(packed: torch.Tensor, rows: torch.Tensor, cols: int, layout: Layout | None = None) -> torch.Tensor:
    """Values (..., K) in [0, 15] of output rows `rows` (any shape, int64) of a kernel-packed (N, K/2) weight.

    Pure index arithmetic on tensors (no data-dependent Python branches), so it traces under torch.compile.
    """
    layout = layout or kernel_layout()
    total = packed.shape[0]
    block_start = rows.div(layout.block, rounding_mode="floor") * layout.block
    j = rows - block_start  # row inside its block
    size = (total - block_start).clamp(max=layout.block)  # rows in the block (a last block may be partial)
    full = size == layout.block if layout.blocked else torch.zeros_like(rows, dtype=torch.bool)
    half = layout.block // 2
    byte = torch.where(full, j % half, j // 2)
    shift = torch.where(full, (j >= half).long() * 4, (j % 2) * 4)
    k = torch.arange(cols, device=packed.device)
    offset = (block_start * (cols // 2) + byte)[..., None] + k * (size // 2)[..., None]  # (..., K)
    values = packed.reshape(-1)[offset].long()
    return ((values >> shift[..., None]) & 15).to(torch.uint8)


def from_kernel(packed: torch.Tensor, cols: int, layout: Layout | None = None) -> torch.Tensor:
    """The whole kernel-packed (N, K/2) weight -> (N, K) uint8 values, by reshapes (uint8 temporaries only)."""
    layout = layout or kernel_layout()
    rows, block = packed.shape[0], layout.block
    full = rows // block * block
    out = torch.empty(rows, cols, dtype=torch.uint8)
    for start in range(0, full, _CHUNK_ROWS):  # chunks of whole blocks: 4096 is a multiple of 32 and 64
        stop = min(start + _CHUNK_ROWS, full)
        blocks = packed[start:stop].reshape(-1, cols, block // 2)  # (blocks, K, B/2)
        out[start:stop] = _nibbles(blocks, layout.blocked).transpose(1, 2).reshape(-1, cols)
    if full < rows:  # a last partial block always pairs rows n, n+1
        tail = packed[full:].reshape(cols, (rows - full) // 2)  # (K, nb/2)
        out[full:] = _nibbles(tail, False).T
    return out


def _nibbles(data: torch.Tensor, blocked: bool) -> torch.Tensor:
    """(..., B/2) bytes -> (..., B) values: [low nibbles, high nibbles] (blocked) or interleaved pairs."""
    low, high = data & 15, data >> 4
    if blocked:
        return torch.cat([low, high], dim=-1)
    return torch.stack([low, high], dim=-1).flatten(-2)


@lru_cache(maxsize=1)
def kernel_layout() -> Layout:
    """The packed layout of this build and CPU, found once by packing a probe with full and partial blocks."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (2 * 64 + 16, 8), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for layout in (Layout(64, True), Layout(32, True), Layout(32, False), Layout(64, False)):
        if torch.equal(gather_rows(packed, torch.arange(probe.shape[0]), 8, layout), probe.to(torch.uint8)):
            return layout
    raise ConfigError("int4 weights: this CPU's packed layout is not one tinylm can read back; use int8")


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales, zeros (N, G) -> the kernel's (G, N, 2) in `dtype`."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


def check_shape(name: str, rows: int, cols: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if cols % group_size:
        raise ConfigError(f"int4 group size {group_size} does not divide in_features {cols} of {name}")


# --- tinylm's own tile layout for tinylm::int4_gemm (tinylm/kernels/int4_gemm.cpp): portable, the same on every CPU

TILE = 16  # output rows per tile


def to_tiles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15], N % 16 == 0, K % 8 == 0 -> (N, K/2) uint8 in tiles of 16 rows: per tile and
    8 features k0.., 64 bytes, byte 4r + t = q[r, k0 + t] | q[r, k0 + 4 + t] << 4."""
    rows, cols = q.shape
    parts = q.to(torch.uint8).reshape(rows // TILE, TILE, cols // 8, 2, 4)  # (tile, r, octet, low/high, t)
    lines = parts[:, :, :, 0] | (parts[:, :, :, 1] << 4)  # (tile, r, octet, t)
    return lines.transpose(1, 2).contiguous().reshape(rows, cols // 2)


def from_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_tiles`: (N, K/2) uint8 tiles -> (N, K) uint8 values."""
    rows, cols = tiles.shape[0], tiles.shape[1] * 2
    lines = tiles.reshape(rows // TILE, cols // 8, TILE, 4).transpose(1, 2)  # (tile, r, octet, t)
    return torch.stack([lines & 15, lines >> 4], dim=3).reshape(rows, cols)


def gather_tile_rows(tiles: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Values (..., K) uint8 of output rows `rows` (any shape, int64) of a tiled (N, K/2) weight; index arithmetic
    only, so it traces under torch.compile."""
    total, cols = tiles.shape[0], tiles.shape[1] * 2
    lines = tiles.reshape(total // TILE, cols // 8, TILE, 4)[rows // TILE, :, rows % TILE]  # (..., K/8, 4)
    return torch.stack([lines & 15, lines >> 4], dim=-2).flatten(-3)


def tile_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """scales, mins (N, G), N % 16 == 0 (w = scale * q + min) -> (N/16, G, 2, 16) float16, as the kernel reads."""
    rows, groups = scales.shape
    both = torch.stack([scales, mins], dim=-1).to(torch.float16)  # (N, G, 2)
    return both.reshape(rows // TILE, TILE, groups, 2).permute(0, 2, 3, 1).contiguous()


def untile_scales(tiled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N/16, G, 2, 16) float16 -> scales, mins (N, G) float32."""
    both = tiled.permute(0, 3, 1, 2).reshape(-1, tiled.shape[1], 2).float()  # (N, G, 2)
    return both[..., 0].contiguous(), both[..., 1].contiguous()
