"""4-bit weights: quantize from float, the checkpoint's portable packing, and tinylm's kernel tiles.

Convention of checkpoints (tinygemm's, as gpt-fast writes them): a weight is `(q - 8) * scale + zero`, q in
[0, 15], one scale and one zero per group of `group_size` consecutive input features, stored two input features per
byte, low nibble first (`pack_portable`). The layer itself keeps w = scale * q + min (min = zero - 8 * scale; GGUF
Q4_1's own form, Q4_0's with min = -8 d) in the tiles tinylm::int4_gemm reads (tinylm/kernels/int4_gemm.cpp):
`to_tiles` / `tile_scales`, the same layout on every CPU.
"""

from __future__ import annotations

import torch

from tinylm.errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernel's activation blocks (32)
_CHUNK_ROWS = 4096  # rows quantized / packed at a time: bounds temporaries for 150k-row embeddings


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


def pack_portable(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: feature 2i in the low nibble, 2i+1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_portable(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


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
