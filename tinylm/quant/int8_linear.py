"""Int8Linear: symmetric int8 weights, per output channel or per group of input features; float or int8 activations.
(The overview of every quantized layer is tinylm/quant/linear.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.errors import ConfigError
from tinylm.model.fuse import concat_biases
from tinylm.quant.formats import Bounds, LayerSpec, check_scales, expect, register, required, same_options
from tinylm.quant.int8_matmul import int8_gemm, int8_mm, kernel_sums, prepack
from tinylm.quant.linear_base import _DEQUANT_ROWS, QuantLinearBase, _aligned, _part, _same


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
        # The batched int8 product: tinylm's kernel on qweight itself (it needs the row sums), else oneDNN's
        # over a (handle, packed copy of qweight); made here, outside any traced code.
        self.weight_sums: torch.Tensor | None
        self.register_buffer("weight_sums", kernel_sums(self.qweight) if activations == "int8" else None,
                             persistent=False)
        self._packed = self._prepack()
        # One row inside a compiled graph: Inductor's reduction (_reduced_row) streams the weight at memory speed
        # on AVX-512, but its int8 -> float32 loop on AVX2 ran at ~2 GB/s (W8A8 batch-1 decode 15 tok/s, 0.83x
        # transformers float32, AVX2 EPYC): there the AVX2 kernel (tinylm/kernels/int8_gemm.cpp) takes it
        self.one_row_kernel = self.weight_sums is not None and kernels.int8_gemm_isa() == kernels.INT8_GEMM_AVX2
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
        return self.group_size is None and not self.use_rows_kernel and not self.one_row_kernel

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
        if torch.compiler.is_compiling() and flat.shape[0] == 1 and not self.one_row_kernel:
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
        """oneDNN's packed copy, for W8A8 layers that tinylm's kernel cannot run."""
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
