"""A GGUF file's Q4_0 / Q4_1 / Q4_K / Q5_0 / Q5_1 / Q5_K / Q6_K / Q8_0 weights as blocks of 32 columns
(tinylm/model/block_linear.py's BlockWeight), for the float32 model that computes on them exactly: each weight is the
float32 value gguf-py's dequantize gives it, and llama.cpp's q/k row permutation is undone on every part (blocks
never span rows).

Q4_0 / Q4_1 / Q8_0 are copied as stored (scales and mins widened from f16 to float32, exact; Q4_0's implicit -8 as
mins = -8 d), Q4_K's nibbles moved to that order. The others' integer codes come from gguf-py itself: dequantizing a
copy of the blocks whose scales are 1 and mins 0 gives the codes exactly (small integers), so their bit layouts are
not decoded here. Their scales are exact float32 products as gguf-py forms them (the K-quants' d * sc: 11 x 6 or 8
significant bits) and mins the negated dmin * m, so scale * q + min rounds once where gguf-py's (d * sc) * q - dmin *
m does (d * sc * q is exact for 4 and 5 bits). Q6_K keeps a scale per 16 columns (its sub-blocks) and rounds
d * sc * q once, as gguf-py does. Other types (Q2_K, Q3_K) load as float and are stored in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from gguf.quants import Q4_K, dequantize

from tinylm.model.block_linear import BLOCK, BlockWeight
from tinylm.weights.gguf import open_gguf
from tinylm.weights.gguf_reader import f16_values, torch_shape

KINDS = (QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q5_0, QType.Q5_1, QType.Q5_K, QType.Q6_K, QType.Q8_0)
# f16 value fields (byte offset) and byte runs set to make each type's scales 1 and mins 0 (see the docstring)
_UNIT_F16 = {QType.Q5_0: {0: 1.0}, QType.Q5_1: {0: 1.0, 2: 0.0}, QType.Q5_K: {0: 1.0, 2: 0.0},
             QType.Q6_K: {208: 1.0}}
# Q4_K / Q5_K: 12 bytes of 6-bit (scale, min) pairs at byte 4 (gguf-py's Q4_K.get_scale_min): all scales 1, mins 0;
# Q6_K: 16 int8 sub-block scales at byte 192
_UNIT_BYTES = {QType.Q5_K: (4, [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]), QType.Q6_K: (192, [1] * 16)}


def read_blocks(path: str | Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, BlockWeight]:
    """{parameter name (Hugging Face's): its blocks} for every 2-D Q4_0-Q8_0 and Q4_K-Q6_K tensor of the file whose
    name the caller keeps (the others are not decoded)."""
    file = open_gguf(path)
    found = {}
    for name, tensor in file.tensors.items():
        shape = torch_shape(tensor)
        kind = tensor.tensor_type
        if kind not in KINDS or len(shape) != 2 or shape[1] % GGML_QUANT_SIZES[kind][0] or not keep(name):
            continue
        weight = blocks(tensor.tensor_type, tensor.data, shape)
        found[name] = BlockWeight(weight.bits, *(None if part is None else file.unpermute(name, part)
                                                 for part in (weight.codes, weight.scales, weight.mins)))
    return found


def blocks(qtype: QType, data: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """data: the tensor's raw blocks (N, row bytes) uint8 as the file stores them; shape (N, K)."""
    rows, cols = shape
    if qtype == QType.Q4_K:  # the most common K-quant: its nibbles moved here (7x faster than dequantizing)
        return _q4_k(np.asarray(data, dtype=np.uint8).reshape(rows, -1, GGML_QUANT_SIZES[qtype][1]), shape)
    if qtype in _UNIT_F16:
        return _from_codes(qtype, np.asarray(data, dtype=np.uint8).reshape(rows, -1), shape)
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, cols // BLOCK, -1)  # (N, G, block bytes)
    scales = f16_values(raw[..., 0:2])
    if qtype == QType.Q8_0:
        codes = np.array(raw[..., 2:], copy=True).view(np.int8).reshape(rows, cols)  # one copy, out of the map
        return BlockWeight(8, torch.from_numpy(codes), scales)
    offset = 4 if qtype == QType.Q4_1 else 2
    mins = f16_values(raw[..., 2:4]) if qtype == QType.Q4_1 else -8 * scales
    codes = np.array(raw[..., offset:], copy=True).reshape(rows, cols // 2)  # byte j: q_j low, q_j+16 high
    return BlockWeight(4, torch.from_numpy(codes), scales, mins)


def _from_codes(qtype: QType, data: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """Q5_0, Q5_1, Q5_K, Q6_K: the codes gguf-py decodes with unit scales, and the blocks' own scales and mins.
    data (N, row bytes)."""
    rows = shape[0]
    raw = data.reshape(rows, -1, GGML_QUANT_SIZES[qtype][1])  # (N, blocks, block bytes)
    codes = _unit_codes(qtype, data)  # (N, K) int8
    if qtype in (QType.Q5_0, QType.Q5_1):
        scales = f16_values(raw[..., 0:2])  # (N, K / 32)
        mins = f16_values(raw[..., 2:4]) if qtype == QType.Q5_1 else None  # Q5_0's codes are q - 16 already
        return BlockWeight(8, codes, scales, mins)
    if qtype == QType.Q6_K:
        d = f16_values(raw[..., 208:210])  # (N, S)
        sc = torch.from_numpy(raw[..., 192:208].view(np.int8).astype(np.float32))  # (N, S, 16)
        return BlockWeight(8, codes, (d[..., None] * sc).reshape(rows, -1))  # (N, K / 16)
    return BlockWeight(8, codes, *_k_scales_mins(raw, rows))  # Q5_K


def _k_scales_mins(raw: np.ndarray, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks (N, S, bytes) -> scales d * sc and mins -(dmin * m), (N, K / 32) float32 each (exact)."""
    d, dmin = f16_values(raw[..., 0:2]), f16_values(raw[..., 2:4])  # (N, S)
    sc, m = (torch.from_numpy(part.astype(np.float32)).reshape(rows, -1, 8)
             for part in Q4_K.get_scale_min(raw[..., 4:16].reshape(-1, 12)))  # (N, S, 8) each
    return (d[..., None] * sc).reshape(rows, -1), -(dmin[..., None] * m).reshape(rows, -1)


def _q4_k(raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """Q4_K blocks (N, S, 144): after d, dmin and the 12 scale bytes, 128 bytes of codes: sub-block 2i in the low
    nibbles of bytes 32i .. 32i + 31, sub-block 2i + 1 in their high nibbles (gguf-py's Q4_K.dequantize_blocks) ->
    4-bit blocks of 32 in BlockWeight's nibble order."""
    rows, cols = shape
    qs = raw[..., 16:].reshape(rows, -1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1, BLOCK)  # (N, K / 32, 32) column order
    codes = np.ascontiguousarray(q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).reshape(rows, cols // 2)
    return BlockWeight(4, torch.from_numpy(codes), *_k_scales_mins(raw, rows))


def _unit_codes(qtype: QType, data: np.ndarray) -> torch.Tensor:
    """data (N, row bytes) -> the blocks' integer codes (N, K) int8, as gguf-py dequantizes a copy whose scales are 1
    and mins 0 (small integers: exact in float32)."""
    unit = np.array(data, copy=True).reshape(-1, GGML_QUANT_SIZES[qtype][1])  # (blocks, block bytes)
    for offset, value in _UNIT_F16[qtype].items():
        unit[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    if qtype in _UNIT_BYTES:
        offset, values = _UNIT_BYTES[qtype]
        unit[:, offset:offset + len(values)] = np.array(values, dtype=np.uint8)
    values = dequantize(unit.reshape(data.shape[0], -1), qtype)  # (N, K) float32 integers
    return torch.from_numpy(values).to(torch.int8)
