"""What tinylm's quantized linear layers share (QuantLinearBase: shapes, dtypes, bias, the chunked matmul) and
the 16-bit float layer (HalfLinear). The integer formats are int8_linear.py and int4_linear.py; tinylm/quant/linear.py
is where all of them are imported and registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.errors import WeightsError
from tinylm.model.fuse import concat_biases
from tinylm.quant.formats import Bounds, LayerSpec, QuantFormat, expect, register, required, same_options

_DEQUANT_ROWS = 4096  # rows dequantized at a time by the grouped-int8 path: bounds its float temporaries


def _aligned(weight: torch.Tensor) -> torch.Tensor:
    """`weight`, copied when its data does not start on a 64-byte boundary. `_weight_int8pack_mm`'s AVX-512 path
    (torch 2.13, M > 1) uses aligned loads and segfaults otherwise; tensors read from a safetensors file, or a row
    chunk starting mid-row-block, can start anywhere. PyTorch's own allocations are 64-byte aligned."""
    if torch.compiler.is_compiling():  # data_ptr cannot be traced; whole buffers were aligned when built
        return weight
    return weight if weight.data_ptr() % 64 == 0 else weight.clone()


@register("fp16", "bf16")
class HalfLinear(QuantFormat):
    """A float linear layer stored in 16 bits (`fp16` / `bf16` schemes) whatever the model dtype: inputs are cast
    to the storage dtype and outputs back. The qkv-fp16 policy (the Nano compact 3B model's, NanoLLM-Qwen2.5-3B)
    keeps q/k/v so while the rest is quantized."""

    STORAGE = {"fp16": torch.float16, "bf16": torch.bfloat16}  # scheme -> storage dtype
    state_names = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().to(storage), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(storage), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    @classmethod
    def quantize(cls, weight, bias: torch.Tensor | None, spec: LayerSpec) -> HalfLinear:
        return cls(weight[:], bias, cls.STORAGE[spec.scheme])  # weight[:]: the whole (N, K), read at once

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bias: torch.Tensor | None, spec: LayerSpec) -> HalfLinear:
        (weight,) = required(state, spec.name, "weight")
        expect(spec.name, "weight", weight, spec.shape)
        if not weight.is_floating_point():
            raise WeightsError(f"{spec.name}.weight has dtype {weight.dtype}, expected a float dtype")
        return cls(weight, bias, cls.STORAGE[spec.scheme])

    def split_rows(self, bounds: Bounds) -> list[HalfLinear]:
        return [HalfLinear(self.weight[a:b], _part(self.bias, a, b), self.weight.dtype) for a, b in bounds]

    def split_cols(self, bounds: Bounds) -> list[HalfLinear]:
        biases = [self.bias] + [None] * (len(bounds) - 1)
        return [HalfLinear(self.weight[:, a:b].contiguous(), bias, self.weight.dtype)
                for (a, b), bias in zip(bounds, biases)]

    @classmethod
    def concat_rows(cls, layers: list[HalfLinear]) -> HalfLinear:
        same_options(layers, "storage")
        return cls(torch.cat([m.weight for m in layers]), concat_biases(layers), layers[0].weight.dtype)

    @property
    def storage(self) -> torch.dtype:
        return self.weight.dtype


class QuantLinearBase(QuantFormat):
    """What every integer layer shares: shapes, dtypes, bias, and a `.weight` stand-in."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, kernel_dtype: torch.dtype,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.kernel_dtype = dtype, kernel_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.row_chunk = 0  # > 0: output rows per chunk in matmul (policy option head_chunk)

    @property
    def weight(self) -> torch.Tensor:
        """A 0-element tensor in the model's dtype and device: code that reads `lm_head.weight.dtype` / `.device`
        keeps working. The integer weights are in `qweight`; `dequantize()` gives the float matrix."""
        return torch.empty(0, dtype=self.dtype, device=self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in the model dtype. With `row_chunk` > 0 (a chunked output head) the product is
        taken `row_chunk` output rows at a time, so a dequantizing path never holds more than one chunk of floats."""
        flat = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()  # (M, K); no-ops when it is
        rows, chunk = self.out_features, self.row_chunk
        if chunk and chunk < rows:
            y = torch.cat([self._mm(flat, slice(s, min(s + chunk, rows))) for s in range(0, rows, chunk)], dim=-1)
        else:
            y = self._mm(flat, slice(0, rows))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(self.dtype).reshape(*x.shape[:-1], rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}, kernel_dtype={self.kernel_dtype}")

    def options(self) -> dict:
        """The constructor's keyword options, which a piece (or a concatenation) of this layer keeps."""
        return {"dtype": self.dtype, "kernel_dtype": self.kernel_dtype}


def _part(tensor: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    """Entries [a, b) of a bias (or of an input_scale), or None."""
    return None if tensor is None else tensor[a:b]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
