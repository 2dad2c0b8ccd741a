"""A GGUF file's Q4_0 / Q4_1 / Q4_K / Q5_0 / Q8_0 weights as blocks of 32 columns (tinylm/model/block_linear.py's
BlockWeight), for the float32 model that computes on them exactly: each weight is the float32 value gguf-py's
dequantize gives it. Scales and mins widened from f16 to float32 (exact); Q4_0's implicit -8 as mins = -8 d (exact);
Q4_K's sub-block scales d * sc and mins -(dmin * m) are exact float32 products (11 x 6 significant bits), so
sc * q + min rounds once as gguf-py's (d * sc) * q - dmin * m does; Q5_0's 5-bit codes q - 16 as int8 (d * c is
exact); llama.cpp's q/k row permutation undone on every part (blocks never span rows). Q5_1, Q6_K and the other
K-quants are not kept (their weights load as float and are stored in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import Q4_K, dequantize

from tinylm.model.block_linear import BLOCK, BlockWeight
from tinylm.weights.gguf import open_gguf
from tinylm.weights.gguf_source import f16_values

KINDS = (QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q5_0, QType.Q8_0)
SUPER_BLOCK = 256  # columns of a K-quant block (Q4_K: 8 sub-blocks of 32)


def read_blocks(path: str | Path) -> dict[str, BlockWeight]:
    """{parameter name (Hugging Face's): its blocks} for every 2-D Q4_0 / Q4_1 / Q4_K / Q5_0 / Q8_0 tensor of the
    file."""
    file = open_gguf(path)
    found = {}
    for name, tensor in file.tensors.items():
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        width = SUPER_BLOCK if tensor.tensor_type == QType.Q4_K else BLOCK
        if tensor.tensor_type not in KINDS or len(shape) != 2 or shape[1] % width:
            continue
        weight = blocks(tensor.tensor_type, tensor.data, shape)
        found[name] = BlockWeight(weight.bits, *(None if part is None else file.unpermute(name, part)
                                                 for part in (weight.codes, weight.scales, weight.mins)))
    return found


def blocks(qtype: QType, data: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """data: the tensor's raw blocks (N, row bytes) uint8 as the file stores them; shape (N, K)."""
    rows, cols = shape
    if qtype == QType.Q4_K:
        return _q4_k(np.asarray(data, dtype=np.uint8).reshape(rows, cols // SUPER_BLOCK, -1), shape)
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, cols // BLOCK, -1)  # (N, G, block bytes)
    scales = f16_values(raw[..., 0:2])
    if qtype == QType.Q5_0:
        return BlockWeight(8, _codes_of(dequantize(data, qtype).reshape(rows, -1, BLOCK), scales), scales)
    if qtype == QType.Q8_0:
        codes = np.array(raw[..., 2:], copy=True).view(np.int8).reshape(rows, cols)  # one copy, out of the map
        return BlockWeight(8, torch.from_numpy(codes), scales)
    offset = 4 if qtype == QType.Q4_1 else 2
    mins = f16_values(raw[..., 2:4]) if qtype == QType.Q4_1 else -8 * scales
    codes = np.array(raw[..., offset:], copy=True).reshape(rows, cols // 2)  # byte j: q_j low, q_j+16 high
    return BlockWeight(4, torch.from_numpy(codes), scales, mins)


def _q4_k(raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """raw (N, S, 144): per 256 columns f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins (unpacked by
    gguf-py's Q4_K.get_scale_min), then 128 bytes of codes: sub-block 2i in the low nibbles of bytes 32i..32i+31,
    2i + 1 in their high nibbles. -> 4-bit blocks of 32 in BlockWeight's nibble order."""
    rows, cols = shape
    d, dmin = f16_values(raw[..., 0:2]), f16_values(raw[..., 2:4])  # (N, S)
    sc, m = (torch.from_numpy(part.astype(np.float32)).reshape(rows, -1, 8)
             for part in Q4_K.get_scale_min(raw[..., 4:16].reshape(-1, 12)))
    scales = (d[..., None] * sc).reshape(rows, -1)  # (N, K / 32), exact products
    mins = -(dmin[..., None] * m).reshape(rows, -1)
    qs = raw[..., 16:].reshape(rows, -1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1, BLOCK)  # (N, K / 32, 32) in column order
    codes = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)  # byte j: q_j low, q_j+16 high
    return BlockWeight(4, torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols // 2)), scales, mins)


def _codes_of(values: np.ndarray, scales: torch.Tensor) -> torch.Tensor:
    """values (N, G, 32) = scales * c exactly (gguf-py's dequantized Q5_0: c = q - 16 in [-16, 15]) -> c as int8
    (N, G * 32): the division is exact, and a zero scale's block is all zeros whatever its codes."""
    scale = scales[..., None]
    codes = torch.where(scale != 0, torch.from_numpy(values) / torch.where(scale != 0, scale, 1), 0)
    return codes.round().to(torch.int8).reshape(values.shape[0], -1)
