"""Quantized linear layers on PyTorch's CPU kernels; activations stay floating point unless asked otherwise.

Int8Linear: symmetric int8, one scale per output channel, on tinylm::int8_rows (tinylm/kernels/int8_rows.cpp:
float32 activations against the stored int8 rows, one fixed float sequence per output, any row count; without a
C++ toolchain `torch.ops.aten._weight_int8pack_mm`, as gpt-fast's WeightOnlyInt8Linear); or one scale per group
of input features (GGUF Q8_0 blocks, exact), run by dequantizing row chunks. With `activations="int8"` (per
channel only) each input row is also quantized to int8 on the fly, one scale per token (W8A8 dynamic, as vLLM's int8
w8a8), and several rows multiply in int8 with exact int32 sums: up to 16 rows on tinylm's AVX-512 VNNI kernel over the stored weight (tinylm/kernels/int8_gemm.cpp; the default model's
products at 16 rows: 5.7 ms from memory, against 7.9 on oneDNN's prepacked weight), more rows on oneDNN's
`_int_mm`; without VNNI or a C++ toolchain, on oneDNN over a prepacked copy of the weight (int8_matmul.py). Int4Linear:
asymmetric 4-bit by groups (GGUF Q4_0 / Q4_1 blocks as stored) on tinylm's int4 x int8 kernel
(tinylm/kernels/int4_gemm.cpp: activations quantized per block of 32 as llama.cpp's Q8_0, exact int32 sums). Both keep
checkpoint-readable names (`qweight`, `scales`, `zeros`, `bias`), and both can also return dequantized rows
(`lookup`), which is how one quantized copy serves as the embedding and the tied output head. HalfLinear: a float
layer stored in 16 bits.

Each class is a format (tinylm/quant/formats.py): it builds itself from float weights, GGUF blocks or saved
tensors, splits and joins its rows, and says what it saves; `@register` names its schemes for policies.

`kernel_dtype` is the dtype the kernel computes in; `dtype` is the model's, which outputs are cast back to.
Forward passes have no data-dependent Python branches and no host syncs, so torch.compile can trace them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.errors import ConfigError, WeightsError
from tinylm.model.fuse import concat_biases
from tinylm.quant import int4pack
from tinylm.quant.formats import (Bounds, LayerSpec, QuantFormat, check_scales, expect, register, required,
                                  same_options)
from tinylm.quant.int8_matmul import int8_gemm, int8_mm, prepack, vnni_sums

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


@register("int8")
class Int8Linear(QuantLinearBase):
    """qweight (N, K) int8; scales (N,) per channel, or (N, K / group_size) per group. `activations`: "float"
    (weight-only) or "int8" (inputs quantized per token too; per-channel weights only). `input_scale` (K,) or None:
    SmoothQuant's per-feature factor, applied to inputs before they are quantized; the stored weight was divided
    by it (tinylm/quant/smooth.py), so the float layer is W = dequantized qweight * input_scale."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype, kernel_dtype: torch.dtype | None = None, activations: str = "float",
                 input_scale: torch.Tensor | None = None) -> None:
        from tinylm import kernels

        super().__init__(qweight.shape[1], qweight.shape[0], dtype, kernel_dtype or dtype, bias)
        self.group_size = None if scales.dim() == 1 else qweight.shape[1] // scales.shape[1]
        if activations not in ("float", "int8") or (activations == "int8" and self.group_size is not None):
            raise ValueError(f"Int8Linear: activations must be 'float', or 'int8' with per-channel scales; "
                             f"got {activations!r} (group size {self.group_size})")
        self.activations = activations
        if input_scale is not None and activations != "int8":
            raise ValueError("Int8Linear: input_scale (smoothing) goes with activations='int8'")
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().contiguous())
        self.register_buffer("qweight", _aligned(qweight.to(torch.int8).contiguous()))
        self.register_buffer("scales", scales.to(self.kernel_dtype).contiguous())
        # The batched int8 product: tinylm's VNNI kernel on qweight itself (it needs the row sums), else oneDNN's
        # over a (handle, packed copy of qweight); made here, outside any traced code.
        self.weight_sums: torch.Tensor | None
        self.register_buffer("weight_sums", vnni_sums(self.qweight) if activations == "int8" else None,
                             persistent=False)
        self._packed = self._prepack()
        # weight-only, per channel: tinylm::int8_rows for every row count (int8_rows.cpp: one float32 sequence per
        # output element, so batch invariant; faster than oneDNN's int8-weight product at 1-128 rows here)
        self.use_rows_kernel = (activations == "float" and self.group_size is None and self.in_features % 16 == 0
                                and kernels.available())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int | None = None,
                   dtype: torch.dtype, kernel_dtype: torch.dtype | None = None, activations: str = "float",
                   input_scale: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric: scale = max|w| / 127 per output channel (or per group of input features), q = round(w / s).
        With `input_scale` the quantized matrix is w / input_scale (each input feature's column divided)."""
        rows, cols = weight.shape
        group = group_size or cols
        q = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(rows, cols // group)
        divisor = None if input_scale is None else input_scale.float()
        for start in range(0, rows, _DEQUANT_ROWS):  # fp32 temporaries for a row chunk only
            w = weight[start:start + _DEQUANT_ROWS].float()
            w = (w if divisor is None else w / divisor).reshape(-1, cols // group, group)  # (n, G, g)
            scale = (w.abs().amax(dim=-1) / 127).clamp(min=1e-10)
            q[start:start + _DEQUANT_ROWS] = (w / scale[..., None]).round().clamp(-128, 127).reshape(-1, cols)
            scales[start:start + _DEQUANT_ROWS] = scale
        return cls(q, scales if group_size else scales[:, 0], bias, dtype=dtype, kernel_dtype=kernel_dtype,
                   activations=activations, input_scale=input_scale)

    @property
    def compiled_int_rows(self) -> bool:
        """True when a compiled batch-1 product is a reduction over integer weight rows (`_reduced_row`: one scale
        per row); the compiled decode step reads it to pick its Inductor settings (tinylm/engine/compiled.py)."""
        return self.group_size is None and not self.use_rows_kernel

    def options(self) -> dict:
        return {**super().options(), "activations": self.activations}

    # --- the format protocol (tinylm/quant/formats.py)

    state_names = ("qweight", "scales", "input_scale")  # input_scale: smoothed W8A8 layers only

    @classmethod
    def check(cls, name: str, shape: tuple[int, int], policy) -> None:
        group = policy.int8_group_size
        if group and shape[1] % group:
            raise ConfigError(f"int8 group size {group} does not divide in_features {shape[1]} of {name}")

    @classmethod
    def quantize(cls, weight, bias: torch.Tensor | None, spec: LayerSpec) -> Int8Linear:
        return cls.from_float(weight, bias, group_size=spec.policy.int8_group_size, dtype=spec.dtype,
                              kernel_dtype=spec.kernel_dtype, activations=spec.activations,
                              input_scale=spec.input_scale)

    @classmethod
    def from_native(cls, native, bias: torch.Tensor | None, spec: LayerSpec) -> Int8Linear | None:
        """GGUF Q8_0 blocks, exactly, when the policy keeps int8 groups of their size (int8_group_size=32)."""
        if native.kind != "int8" or native.group_size != spec.policy.int8_group_size:
            return None
        return cls(native.q, native.scales, bias, dtype=spec.dtype, kernel_dtype=spec.kernel_dtype,
                   activations=spec.activations)

    def state(self) -> dict[str, torch.Tensor]:
        state = {"qweight": self.qweight, "scales": self.scales}
        return state if self.input_scale is None else {**state, "input_scale": self.input_scale}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bias: torch.Tensor | None, spec: LayerSpec) -> Int8Linear:
        """qweight int8 (N, K), scales (N,) or (N, G), input_scale (K,) if smoothed."""
        (rows, cols), layer = spec.shape, spec.name
        q, scales = required(state, layer, "qweight", "scales")
        expect(layer, "qweight", q, (rows, cols), torch.int8)
        check_scales(layer, scales, rows, cols)
        smoothing = state.get("input_scale")
        if smoothing is not None:
            expect(layer, "input_scale", smoothing, (cols,))
            smoothing = smoothing.float()
        return cls(q, scales.float(), bias, dtype=spec.dtype, kernel_dtype=spec.kernel_dtype,
                   activations=spec.activations, input_scale=smoothing)

    def split_rows(self, bounds: Bounds) -> list[Int8Linear]:
        """Row pieces are views of qweight (no copy)."""
        return [Int8Linear(self.qweight[a:b], self.scales[a:b], _part(self.bias, a, b), **self.options(),
                           input_scale=self.input_scale) for a, b in bounds]

    def split_cols(self, bounds: Bounds) -> list[Int8Linear]:
        group, biases = self.group_size, [self.bias] + [None] * (len(bounds) - 1)
        scales = (lambda a, b: self.scales) if group is None else (lambda a, b: self.scales[:, a // group:b // group])
        return [Int8Linear(self.qweight[:, a:b], scales(a, b), bias, **self.options(),
                           input_scale=_part(self.input_scale, a, b)) for (a, b), bias in zip(bounds, biases)]

    @classmethod
    def concat_rows(cls, layers: list[Int8Linear]) -> Int8Linear:
        same_options(layers, "group_size", "activations")
        first = layers[0]
        if not all(_same(m.input_scale, first.input_scale) for m in layers):
            raise ConfigError("concat_rows: the int8 layers are smoothed differently")
        return cls(torch.cat([m.qweight for m in layers]), torch.cat([m.scales for m in layers]),
                   concat_biases(layers), **first.options(), input_scale=first.input_scale)

    def _mm(self, flat: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.activations == "int8":
            return self._mm_int8_activations(flat, rows)
        if self.use_rows_kernel and flat.device.type == "cpu":  # (M, rows) float32
            whole = rows == slice(0, self.out_features)  # no slices: eager decode pays ~5 us each
            q, scales = (self.qweight, self.scales) if whole else (self.qweight[rows], self.scales[rows])
            return torch.ops.tinylm.int8_rows(flat.float(), q, scales.float())
        if self.group_size is None and torch.compiler.is_compiling() and flat.shape[0] == 1:
            return self._reduced_row(flat.float(), rows).to(flat.dtype)
        if self.group_size is None:
            return torch.ops.aten._weight_int8pack_mm(flat, _aligned(self.qweight[rows]), self.scales[rows])
        chunks = []  # grouped scales: no fused kernel; dequantize a bounded number of rows at a time
        for start in range(rows.start, rows.stop, _DEQUANT_ROWS):
            part = slice(start, min(start + _DEQUANT_ROWS, rows.stop))
            chunks.append(F.linear(flat, self._dequant(self.qweight[part], self.scales[part], flat.dtype)))
        return torch.cat(chunks, dim=-1)

    def _mm_int8_activations(self, flat: torch.Tensor, rows: slice) -> torch.Tensor:
        """W8A8: flat (M, K) -> (M, N). Each row x is quantized symmetrically, x ~ q_x * s_x with s_x = max|x| / 127
        (one scale per token, so a row's result never depends on the other rows of the batch); the int8 products
        are summed exactly in int32, then scaled by s_x and the weight's per-channel scale."""
        x = flat.float() if self.input_scale is None else flat.float() * self.input_scale  # (M, K), smoothed
        x_scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-10)  # (M, 1)
        xq = (x / x_scale).round().clamp(-127, 127)  # (M, K) integers, in float
        if torch.compiler.is_compiling() and flat.shape[0] == 1:
            # sums of int products, exact in fp32 while below 2^24 (|q_x q_w| <= 127^2: K up to 1040 at worst)
            y = self._reduced_row(xq, rows)
        elif self.weight_sums is not None and (rows.stop - rows.start) % 16 == 0:
            y = int8_gemm((xq + 128).to(torch.uint8), self.qweight[rows], self.weight_sums[rows],
                          self.scales[rows].float())
        elif rows == slice(0, self.out_features):
            y = int8_mm((xq + 128).to(torch.uint8), self.qweight, self.scales.float(), self._packed_handle())
        else:  # a row chunk of the chunked head: no packed copy of it
            y = torch._int_mm(xq.to(torch.int8), self.qweight[rows].t()).float() * self.scales[rows].float()
        return (y * x_scale).to(flat.dtype)

    def _reduced_row(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """One row inside a compiled graph, x (1, K) float32 -> (1, N) float32: a reduction over the weight rows
        that Inductor streams faster than the kernels read small matrices (tinylm/model/gemv.py; compiled.py
        stores its input first)."""
        return ((x * self.qweight[rows].float()).sum(dim=-1) * self.scales[rows].float())[None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations={self.activations}"

    # The packed weight is an opaque oneDNN tensor that cannot be copied or pickled: copies repack their own.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._packed = self._prepack()

    def _prepack(self) -> tuple[int, torch.Tensor | None] | None:
        """oneDNN's packed copy, for W8A8 layers that tinylm's VNNI kernel cannot run."""
        return prepack(self.qweight) if self.activations == "int8" and self.weight_sums is None else None

    def _packed_handle(self) -> int:
        """The handle of this layer's oneDNN-packed weight (tinylm/quant/int8_matmul.py); torch.compile reads it
        as a constant."""
        return self._packed[0]

    def _dequant(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """q (..., K), scales (...,) or (..., G) -> (..., K) in `dtype`."""
        if self.group_size is None:
            return (q.to(dtype) * scales[..., None].to(dtype))
        grouped = q.reshape(*q.shape[:-1], -1, self.group_size).to(dtype) * scales[..., None].to(dtype)
        return grouped.reshape(q.shape)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows: ids (...) -> (..., K) in the model dtype."""
        rows = self._dequant(self.qweight[ids], self.scales[ids], self.kernel_dtype)
        return (rows if self.input_scale is None else rows * self.input_scale).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) matrix the layer stands for (the smoothing undone)."""
        w = self._dequant(self.qweight, self.scales.float(), torch.float32)
        return w if self.input_scale is None else w * self.input_scale


@register("int4")
class Int4Linear(QuantLinearBase):
    """4-bit weights by groups, w = scale * q + min (q in [0, 15]), in tinylm's tile layout (int4pack.to_tiles):
    qweight (N_pad, K/2) uint8, scales_mins (N_pad/16, G, 2, 16) float16. N_pad = N rounded up to 16; padded rows
    are zero and cut from outputs.

    Products run on tinylm::int4_gemm (tinylm/kernels/int4_gemm.cpp): each input row is quantized to int8 in
    blocks of 32 features (as llama.cpp's Q8_0) and multiplied in exact int32 sums, one fixed float sequence per
    output element, so a row's result does not depend on the batch. With `kernel_dtype` float32 (a policy's
    `kernel_dtype=model` on a float32 model: float arithmetic asked for), or without the kernels (no C++
    toolchain), the weight is dequantized a bounded number of rows at a time and multiplied in `kernel_dtype`:
    the float product of the dequantized weight, to float rounding."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None = None, *, dtype: torch.dtype, kernel_dtype: torch.dtype | None = None,
                 mins: torch.Tensor | None = None) -> None:
        """q (N, K) values in [0, 15]; scales, zeros (N, G): weight = (q - 8) * scale + zero (tinygemm's and
        tinylm's checkpoint convention), or, with `mins` (and zeros None), weight = scale * q + min as stored."""
        from tinylm import kernels

        rows, cols = q.shape
        super().__init__(cols, rows, dtype, kernel_dtype or dtype, bias)
        self.group_size = cols // scales.shape[1]
        mins = zeros.float() - 8 * scales.float() if mins is None else mins
        pad = -rows % int4pack.TILE
        if pad:
            q = torch.cat([q, q.new_zeros(pad, cols)])
            scales, mins = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, mins))
        self.register_buffer("qweight", int4pack.to_tiles(q))
        self.register_buffer("scales_mins", int4pack.tile_scales(scales.float(), mins.float()))
        # decided here, outside any traced code
        self.use_kernel = self.kernel_dtype != torch.float32 and kernels.available()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int,
                   dtype: torch.dtype, kernel_dtype: torch.dtype | None = None) -> Int4Linear:
        q, scales, zeros = int4pack.quantize_int4(weight, group_size)
        return cls(q, scales, zeros, bias, dtype=dtype, kernel_dtype=kernel_dtype)

    def _mm(self, flat: torch.Tensor, rows: slice) -> torch.Tensor:
        """flat (M, K) -> (M, rows) float32 (the kernel, CPU) or kernel_dtype (the fallback)."""
        start, stop = rows.start, rows.stop
        if not self.use_kernel or start % int4pack.TILE or flat.device.type != "cpu":
            return self._mm_dequantized(flat, rows)
        if start == 0 and stop == self.qweight.shape[0]:  # the whole layer, no padding: no slices (eager decode
            return torch.ops.tinylm.int4_gemm(flat.float(), self.qweight, self.scales_mins)  # pays ~5 us each)
        tiles = slice(start // int4pack.TILE, -(-stop // int4pack.TILE))  # a last partial tile: cut below
        y = torch.ops.tinylm.int4_gemm(flat.float(), self.qweight[tiles.start * int4pack.TILE:
                                                                   tiles.stop * int4pack.TILE],
                                       self.scales_mins[tiles])
        return y[:, :stop - start]

    def _mm_dequantized(self, flat: torch.Tensor, rows: slice) -> torch.Tensor:
        chunks = []  # a bounded number of rows dequantized at a time
        for start in range(rows.start, rows.stop, _DEQUANT_ROWS):
            part = torch.arange(start, min(start + _DEQUANT_ROWS, rows.stop), device=flat.device)
            chunks.append(F.linear(flat, self._rows(part).to(flat.dtype)))
        return torch.cat(chunks, dim=-1)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., K) float32 dequantized rows, as the kernel sees them: scale * q + min."""
        q = int4pack.gather_tile_rows(self.qweight, ids)  # (..., K)
        sm = self.scales_mins[ids // int4pack.TILE, :, :, ids % int4pack.TILE].float()  # (..., G, 2)
        w = q.float().unflatten(-1, (-1, self.group_size)) * sm[..., :1] + sm[..., 1:]
        return w.flatten(-2)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows: ids (...) -> (..., K) in the model dtype; reads only those rows' bytes."""
        return self._rows(ids).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        return self._rows(torch.arange(self.out_features, device=self.qweight.device))

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (N, K) uint8 in [0, 15], scales (N, G), mins (N, G)) float32, without the padding rows."""
        scales, mins = int4pack.untile_scales(self.scales_mins)
        n = self.out_features
        return int4pack.from_tiles(self.qweight)[:n], scales[:n], mins[:n]

    def portable_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (N, K) uint8 in [0, 15], scales (N, G), zeros (N, G)): the checkpoint convention (q - 8) * s + z."""
        q, scales, mins = self.parts()
        return q, scales, mins + 8 * scales

    # --- the format protocol (tinylm/quant/formats.py)

    state_names = ("qweight", "scales", "zeros")

    @classmethod
    def check(cls, name: str, shape: tuple[int, int], policy) -> None:
        int4pack.check_shape(name, shape[0], shape[1], policy.int4_group())

    @classmethod
    def quantize(cls, weight, bias: torch.Tensor | None, spec: LayerSpec) -> Int4Linear:
        return cls.from_float(weight, bias, group_size=spec.policy.int4_group(), dtype=spec.dtype,
                              kernel_dtype=spec.kernel_dtype)

    @classmethod
    def from_native(cls, native, bias: torch.Tensor | None, spec: LayerSpec) -> Int4Linear | None:
        """GGUF Q4_0 / Q4_1 blocks, exactly, unless the policy asks for another group size."""
        if native.kind != "int4" or spec.policy.group_size not in (None, native.group_size):
            return None
        return cls(native.q, native.scales, native.zeros, bias, dtype=spec.dtype, kernel_dtype=spec.kernel_dtype)

    def state(self) -> dict[str, torch.Tensor]:
        """The checkpoint layout (qweight (N, K/2), 2 values per byte, low nibble first; scales, zeros (N, G),
        w = (q - 8) * scale + zero), which other tools read; the tiles are this kernel's own."""
        q, scales, zeros = self.portable_parts()
        return {"qweight": int4pack.pack_portable(q), "scales": scales, "zeros": zeros}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bias: torch.Tensor | None, spec: LayerSpec) -> Int4Linear:
        (rows, cols), layer = spec.shape, spec.name
        q, scales, zeros = required(state, layer, "qweight", "scales", "zeros")
        expect(layer, "qweight", q, (rows, cols // 2), torch.uint8)
        check_scales(layer, scales, rows, cols, int4pack.GROUP_SIZES)
        expect(layer, "zeros", zeros, tuple(scales.shape))
        return cls(int4pack.unpack_portable(q), scales.float(), zeros.float(), bias, dtype=spec.dtype,
                   kernel_dtype=spec.kernel_dtype)

    def split_rows(self, bounds: Bounds) -> list[Int4Linear]:
        """Pieces retiled from the values (scales and mins as stored: no rounding on the way)."""
        q, scales, mins = self.parts()
        return [Int4Linear(q[a:b], scales[a:b], None, _part(self.bias, a, b), **self.options(), mins=mins[a:b])
                for a, b in bounds]

    def split_cols(self, bounds: Bounds) -> list[Int4Linear]:
        (q, s, m), g = self.parts(), self.group_size
        biases = [self.bias] + [None] * (len(bounds) - 1)
        return [Int4Linear(q[:, a:b], s[:, a // g:b // g], None, bias, **self.options(), mins=m[:, a // g:b // g])
                for (a, b), bias in zip(bounds, biases)]

    @classmethod
    def concat_rows(cls, layers: list[Int4Linear]) -> Int4Linear:
        same_options(layers, "group_size")
        q, s, m = (torch.cat([layer.parts()[i] for layer in layers]) for i in range(3))
        return cls(q, s, None, concat_biases(layers), **layers[0].options(), mins=m)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        names = ["qweight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        fresh = Int4Linear(int4pack.unpack_portable(state_dict[prefix + "qweight"]), state_dict[prefix + "scales"],
                           state_dict[prefix + "zeros"], state_dict.get(prefix + "bias"), dtype=self.dtype,
                           kernel_dtype=self.kernel_dtype)
        self.qweight, self.scales_mins, self.bias = fresh.qweight, fresh.scales_mins, fresh.bias


def _part(tensor: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    """Entries [a, b) of a bias (or of an input_scale), or None."""
    return None if tensor is None else tensor[a:b]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
