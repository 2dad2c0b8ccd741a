"""The compressed-tensors layout (llm-compressor's checkpoints, which transformers and vLLM load): its config and its
packed tensors, translated to and from tinylm's Int8Linear / Int4Linear state. No dependency on the
`compressed-tensors` package: the layout below was read from its 0.20.1 source (compressors/pack_quantized,
compressors/naive_quantized, quantization/quant_config.py) and the tests check it against the package.

  config.json  quantization_config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed", "ignore": ["lm_head", ...],
               "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                   "weights": {"num_bits": 8 | 4, "type": "int", "symmetric": true, "strategy": "channel" | "group",
                               "group_size": null | G, "dynamic": false},
                   "input_activations": null, "output_activations": null}}}
  X.weight_packed      int32 (N, ceil(K * bits / 32)): each value v in [-2^(bits-1), 2^(bits-1)) stored as
                       v + 2^(bits-1), element i of a row at bits [i * bits, (i + 1) * bits) of the row read as
                       little-endian words, padded with zeros. For 4 bits these are the bytes of tinylm's portable
                       int4 layout (feature 2i low nibble), for 8 bits one byte per value.
  X.weight_scale       (N, 1) per channel or (N, K / G) per group, a float dtype: w = (v - zero_point) * scale
  X.weight_shape       int64 (2,): [N, K]
  X.weight_zero_point  int32 (ceil(N * bits / 32), K / G), packed like weight_packed along dim 0: asymmetric only
                       (read into Int4Linear, never written: tinylm's own int4 zero points are floats)
  naive-quantized / int-quantized (read only): X.weight int8 (N, K) holds v itself.

tinylm's int4 weight is (q - 8) * scale + zero with q in [0, 15], so q = v + 8 and zero = -zero_point * scale.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinylm.errors import ConfigError, WeightsError
from tinylm.quant import int4pack
from tinylm.quant.formats import expect

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
UNPACKED = ("naive-quantized", "int-quantized")  # the weight as int8 values, one per element
PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight")
_CHUNK_ROWS = 4096  # rows quantized at a time: bounds the float temporaries


@dataclass(frozen=True)
class WeightScheme:
    """One config group's weights: what tinylm needs to read its tensors."""

    bits: int  # 8 (Int8Linear) or 4 (Int4Linear)
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    packed: bool  # pack-quantized (weight_packed) or naive (weight int8)

    @property
    def scheme(self) -> str:
        return "int8" if self.bits == 8 else "int4"


def config_for(scheme: WeightScheme, ignore: list[str]) -> dict:
    """The quantization_config of a model whose Linear layers all use `scheme`, except the `ignore`d ones."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
               "group_size": scheme.group_size, "strategy": "channel" if scheme.group_size is None else "group",
               "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": PACKED}
    return {"config_groups": {"group_0": group}, "quant_method": QUANT_METHOD, "kv_cache_scheme": None,
            "format": PACKED, "quantization_status": "compressed", "global_compression_ratio": None,
            "ignore": ignore}


def scheme_of(qc: dict, where: str) -> WeightScheme:
    """The one weight-only integer scheme of a compressed-tensors config, or a one-line ConfigError saying what
    tinylm cannot run (activation quantization, floating-point or several schemes, KV-cache quantization)."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{where}: compressed-tensors quantization_config has no config_groups")
    if qc.get("kv_cache_scheme") or qc.get("quantization_status", "compressed") != "compressed":
        raise ConfigError(f"{where}: tinylm reads compressed-tensors weight-only checkpoints (quantization_status "
                          "'compressed', no kv_cache_scheme)")
    schemes = {_group_scheme(name, group, qc.get("format"), where) for name, group in groups.items()}
    if len(schemes) > 1:
        raise ConfigError(f"{where}: compressed-tensors groups with different weight schemes; tinylm reads one "
                          "integer scheme for every quantized Linear layer")
    return schemes.pop()


def _group_scheme(name: str, group: object, top_format: object, where: str) -> WeightScheme:
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ConfigError(f"{where}: compressed-tensors group {name!r} has no weights scheme")
    w, fmt = group["weights"], group.get("format") or top_format
    if group.get("targets") != ["Linear"] or group.get("input_activations") or group.get("output_activations"):
        raise ConfigError(f"{where}: compressed-tensors group {name!r} is not weight-only over Linear layers "
                          "(tinylm reads W8A16 and W4A16 checkpoints)")
    strategy, bits, group_size = w.get("strategy"), w.get("num_bits"), w.get("group_size")
    symmetric = w.get("symmetric", True)
    ok = (w.get("type", "int") == "int" and not w.get("dynamic") and fmt in (PACKED, *UNPACKED)
          and ((bits == 8 and symmetric and strategy in ("channel", "group"))
               or (bits == 4 and strategy == "group" and group_size in int4pack.GROUP_SIZES)))
    if not ok or (strategy == "group") != isinstance(group_size, int):
        raise ConfigError(f"{where}: compressed-tensors group {name!r} ({bits}-bit {w.get('type')} "
                          f"{strategy}, group_size {group_size}, symmetric {symmetric}, format {fmt}) is not one "
                          "tinylm runs: int8 symmetric per channel or group, int4 by groups of 32, 64, 128 or 256")
    return WeightScheme(bits, group_size if strategy == "group" else None, bool(symmetric), fmt == PACKED)


# --- tensors


def little_endian() -> None:
    """The packed words are read as bytes: right on little-endian hosts only."""
    if sys.byteorder != "little":
        raise ConfigError("compressed-tensors packed weights are read byte-wise; this host is big-endian")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values (N, K) uint8 in [0, 2^bits) -> int32 (N, ceil(K * bits / 32)), compressed-tensors' pack_to_int32."""
    little_endian()
    per_word = 32 // bits
    values = F.pad(values, (0, -values.shape[1] % per_word))  # zero padding, as compressed-tensors pads
    data = int4pack.pack_portable(values) if bits == 4 else values
    return data.contiguous().view(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 (N, W) -> uint8 (N, cols) values in [0, 2^bits): a view of the words' bytes for 8 bits."""
    little_endian()
    data = packed.contiguous().view(torch.uint8)
    return (int4pack.unpack_portable(data) if bits == 4 else data)[:, :cols]


def symmetric_int4(weight, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float (or a Rows reader) -> q (N, K) uint8 in [0, 15] (v = q - 8), scales (N, K / g).

    Symmetric by groups (zero = 0), as compressed-tensors' W4A16: scale = max(max / 7, -min / 8) so both ends of
    the group fit v in [-8, 7] without clipping. The scale is rounded to `scale_dtype` (the kernel's) before the
    values are chosen, so they are the best ones for the scale the layer keeps."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group_size, dtype=scale_dtype)
    for start in range(0, rows, _CHUNK_ROWS):
        w = weight[start:start + _CHUNK_ROWS].float().reshape(-1, cols // group_size, group_size)  # (n, G, g)
        scale = torch.maximum(w.amax(-1) / 7, -w.amin(-1) / 8).clamp(min=1e-8).to(scale_dtype).float()
        v = (w / scale[..., None]).round().clamp(-8, 7)
        q[start:start + _CHUNK_ROWS] = (v + 8).to(torch.uint8).reshape(-1, cols)
        scales[start:start + _CHUNK_ROWS] = scale
    return q, scales


def int8_parts(qweight: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Int8Linear's qweight (N, K) int8 and scales (N,) or (N, G) -> the layer's compressed-tensors tensors."""
    unsigned = qweight.view(torch.uint8) ^ 128  # v + 128 (flipping the sign bit)
    return {"weight_packed": pack_rows(unsigned, 8), "weight_scale": scales.reshape(scales.shape[0], -1),
            "weight_shape": torch.tensor(list(qweight.shape))}


def int4_parts(q: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric Int4Linear values q (N, K) in [0, 15] and scales (N, G) -> compressed-tensors tensors."""
    return {"weight_packed": pack_rows(q, 4), "weight_scale": scales.contiguous(),
            "weight_shape": torch.tensor(list(q.shape))}


def tinylm_state(parts: dict[str, torch.Tensor], scheme: WeightScheme, layer: str, shape: tuple[int, int]
                 ) -> dict[str, torch.Tensor]:
    """A layer's compressed-tensors tensors -> the state its format's `from_state` reads (Int8Linear: qweight,
    scales; Int4Linear: qweight in the portable layout, scales, zeros). Integer temporaries only: no float weight."""
    rows, cols = shape
    values = _values(parts, scheme, layer, shape)  # (N, K) uint8, v + 2^(bits-1)
    scales = parts.get("weight_scale")
    if scales is None:
        raise WeightsError(f"compressed-tensors checkpoint: missing tensor {layer}.weight_scale")
    groups = 1 if scheme.group_size is None else cols // scheme.group_size
    expect(layer, "weight_scale", scales, (rows, groups))
    if not scales.is_floating_point():
        raise WeightsError(f"{layer}.weight_scale has dtype {scales.dtype}, expected a float dtype")
    if scheme.bits == 8:
        return {"qweight": (values ^ 128).view(torch.int8), "scales": scales[:, 0] if groups == 1 else scales}
    zeros = torch.zeros_like(scales) if scheme.symmetric else -_zero_points(parts, layer, rows, groups) * scales
    return {"qweight": int4pack.pack_portable(values), "scales": scales, "zeros": zeros}


def _values(parts: dict[str, torch.Tensor], scheme: WeightScheme, layer: str, shape: tuple[int, int]
            ) -> torch.Tensor:
    rows, cols = shape
    offset = 1 << (scheme.bits - 1)
    if not scheme.packed:
        weight = parts["weight"] if "weight" in parts else _missing(layer, "weight")
        expect(layer, "weight", weight, shape, torch.int8)
        if scheme.bits == 4 and bool(((weight < -8) | (weight > 7)).any()):
            raise WeightsError(f"{layer}.weight holds values outside the int4 range [-8, 7]")
        return (weight.to(torch.int16) + offset).to(torch.uint8)
    packed = parts["weight_packed"] if "weight_packed" in parts else _missing(layer, "weight_packed")
    expect(layer, "weight_packed", packed, (rows, -(-cols * scheme.bits // 32)), torch.int32)
    stored_shape = parts.get("weight_shape")
    if stored_shape is not None and [int(v) for v in stored_shape.reshape(-1)] != [rows, cols]:
        raise WeightsError(f"{layer}.weight_shape is {stored_shape.tolist()}, the config needs {[rows, cols]}")
    return unpack_rows(packed, scheme.bits, cols)


def _zero_points(parts: dict[str, torch.Tensor], layer: str, rows: int, groups: int) -> torch.Tensor:
    """weight_zero_point int32 (ceil(N / 8), G), packed along rows -> (N, G) float zero points in [-8, 7]."""
    packed = parts["weight_zero_point"] if "weight_zero_point" in parts else _missing(layer, "weight_zero_point")
    expect(layer, "weight_zero_point", packed, (-(-rows // 8), groups), torch.int32)
    return unpack_rows(packed.t(), 4, rows).t().float() - 8


def _missing(layer: str, part: str):
    raise WeightsError(f"compressed-tensors checkpoint: missing tensor {layer}.{part}")
