"""A GGUF file's Q4_0 / Q4_1 / Q8_0 weights as their blocks (tinylm/model/block_linear.py's BlockWeight), for the
float32 model that computes on them exactly. Scales and mins widened from f16 to float32 (exact); Q4_0's implicit
-8 as mins = -8 d (exact); llama.cpp's q/k row permutation undone on every part (blocks never span rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from tinylm.model.block_linear import BLOCK, BlockWeight
from tinylm.weights.gguf import open_gguf
from tinylm.weights.gguf_source import f16_values

KINDS = (QType.Q4_0, QType.Q4_1, QType.Q8_0)


def read_blocks(path: str | Path) -> dict[str, BlockWeight]:
    """{parameter name (Hugging Face's): its blocks} for every 2-D Q4_0 / Q4_1 / Q8_0 tensor of the file."""
    file = open_gguf(path)
    found = {}
    for name, tensor in file.tensors.items():
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if tensor.tensor_type not in KINDS or len(shape) != 2 or shape[1] % BLOCK:
            continue
        weight = blocks(tensor.tensor_type, tensor.data, shape)
        found[name] = BlockWeight(weight.bits, *(None if part is None else file.unpermute(name, part)
                                                 for part in (weight.codes, weight.scales, weight.mins)))
    return found


def blocks(qtype: QType, data: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """data: the tensor's raw blocks (N, row bytes) uint8 as the file stores them; shape (N, K)."""
    rows, cols = shape
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, cols // BLOCK, -1)  # (N, G, block bytes)
    scales = f16_values(raw[..., 0:2])
    if qtype == QType.Q8_0:
        codes = np.array(raw[..., 2:], copy=True).view(np.int8).reshape(rows, cols)  # one copy, out of the map
        return BlockWeight(8, torch.from_numpy(codes), scales)
    offset = 4 if qtype == QType.Q4_1 else 2
    mins = f16_values(raw[..., 2:4]) if qtype == QType.Q4_1 else -8 * scales
    codes = np.array(raw[..., offset:], copy=True).reshape(rows, cols // 2)  # byte j: q_j low, q_j+16 high
    return BlockWeight(4, torch.from_numpy(codes), scales, mins)

