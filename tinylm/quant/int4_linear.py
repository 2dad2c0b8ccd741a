"""Int4Linear: asymmetric 4-bit weights by groups (GGUF Q4_0 / Q4_1 blocks as stored) on tinylm's int4 x int8
kernel. (The overview of every quantized layer is tinylm/quant/linear.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.model.fuse import concat_biases
from tinylm.quant import int4pack
from tinylm.quant.formats import Bounds, LayerSpec, check_scales, expect, register, required, same_options
from tinylm.quant.linear_base import _DEQUANT_ROWS, QuantLinearBase, _part


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
