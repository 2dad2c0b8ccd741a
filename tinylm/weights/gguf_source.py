"""A GGUF file as a TensorSource (tinylm/weights/sources.py): float tensors dequantized one at a time, and
llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks as integer values, scales and zeros that tinylm's int8 / int4 layers
(tinylm/quant/int8_linear.py, int4_linear.py) take as they are, with no requantization.

Block layouts as gguf-py decodes them (gguf/quants.py, `dequantize_blocks`), 32 weights per block:
  Q8_0: f16 d, 32 x int8 q                       w = d * q
  Q4_0: f16 d, 16 bytes (q_j low nibble, q_j+16 high)  w = d * (q - 8)
  Q4_1: f16 d, f16 m, 16 bytes as Q4_0            w = d * q + m
Int4Linear computes (q - 8) * scale + zero, so Q4_0 maps to (scale d, zero 0) and Q4_1 to (scale d, zero m + 8d):
both bit-exact in float32 whenever m + 8d is exact in float32, i.e. the exponents of m and 8d are within 13 of each
other (true of the real blocks we checked: tests compare with gguf.quants.dequantize, on the default model too). In
bfloat16 the kernel's scales and zeros are rounded to 8 significant bits, which f16 block scales do not fit: close,
not exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from tinylm.errors import WeightsError
from tinylm.model.block_linear import unpack_4bit
from tinylm.weights.gguf_blocks import blocks
from tinylm.weights.sources import Rows

NATIVE_TYPES = {QType.Q8_0: "int8", QType.Q4_0: "int4", QType.Q4_1: "int4"}


@dataclass
class NativeWeight:
    """Quantized values as stored: int8 q (N, K) with scales (N,) or (N, G); or int4 q (N, K) uint8 in [0, 15]
    with scales and zeros (N, G) such that w = (q - 8) * scale + zero."""

    kind: str  # "int8" | "int4"
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def group_size(self) -> int | None:
        """Input features per scale; None for one scale per output channel (scales (N,))."""
        return None if self.scales.dim() == 1 else self.q.shape[1] // self.scales.shape[1]

    def rows(self, fn) -> NativeWeight:
        """Apply a row permutation `fn` (a function of a (N, ...) tensor) to every part."""
        return NativeWeight(self.kind, fn(self.q), fn(self.scales), None if self.zeros is None else fn(self.zeros))


def decode(qtype: QType, data: np.ndarray, shape: tuple[int, int]) -> NativeWeight | None:
    """data: the tensor's raw blocks (N, row bytes) uint8; shape (N, K). None for types with no native layer."""
    if qtype not in NATIVE_TYPES:
        return None
    stored = blocks(qtype, data, shape)  # the bytes parsed once, as the float32 model's block layers take them
    if qtype == QType.Q8_0:
        return NativeWeight("int8", stored.codes, stored.scales)
    zeros = stored.mins + 8 * stored.scales if qtype == QType.Q4_1 else torch.zeros_like(stored.scales)
    return NativeWeight("int4", unpack_4bit(stored.codes), stored.scales, zeros)


class GGUFSource:
    """A GGUF file: float tensors dequantized one at a time; Q8_0 / Q4_0 / Q4_1 weights also as their blocks."""

    def __init__(self, gguf_file) -> None:  # tinylm.weights.gguf.GGUFFile
        self.file = gguf_file

    def get(self, name: str) -> torch.Tensor:
        return self.file.read(name)

    def rows(self, name: str) -> Rows | torch.Tensor:
        """Blocks never span rows, so row ranges dequantize on their own (q/k rows of llama files are permuted
        within each head: those small tensors are read whole)."""
        if self.file.permuted_qk and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            return self.get(name)
        tensor = self.file.tensors[name]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return Rows(shape, lambda a, b: self._read_rows(tensor, a, b))

    def _read_rows(self, tensor, start: int, stop: int) -> torch.Tensor:
        try:
            values = dequantize(tensor.data[start:stop], tensor.tensor_type)
        except Exception as exc:  # the gguf package raises many types; name the tensor instead
            raise WeightsError(f"{self.file.path.name}: cannot read tensor {tensor.name!r} ({exc})") from None
        return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(stop - start, -1)

    def native(self, name: str, scheme: str) -> NativeWeight | None:
        tensor = self.file.tensors.get(name)
        if tensor is None or NATIVE_TYPES.get(tensor.tensor_type) != scheme:  # decode only what will be kept
            return None
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = decode(tensor.tensor_type, tensor.data, shape)
        return None if weight is None else weight.rows(lambda rows: self.file.unpermute(name, rows))

    def saved(self, layer: str, names: tuple[str, ...]) -> None:
        return None

    def close(self) -> None:
        pass
