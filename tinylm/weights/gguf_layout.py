"""llama.cpp's GGUF tensor layout of each family, both ways: which GGUF tensor holds which tinylm (Hugging Face)
tensor, and how the values change on the way.

Names come from the gguf package's TensorNameMap (the map llama.cpp's converter uses, per architecture); this module
adds what a name map cannot say, after llama.cpp's convert_hf_to_gguf.py:
- Llama: q/k rows of each head interleaved (`LlamaModel.permute`; undone by the reader, tinylm/weights/gguf.py).
- MoE (`Qwen2MoeModel`): the experts of a layer stacked in one tensor, ffn_{gate,up,down}_exps (E, out, in).
- Qwen3-Next (`Qwen3NextModel.modify_tensors`): RMSNorm weights stored as 1 + w (tinylm keeps zero-centred w),
  ssm_a = -exp(A_log), dt_bias as ssm_dt.bias, the conv kernel squeezed to (channels, kernel), and the fused
  projection in_proj_qkvz (rows per key head: [q, k, v-group, z-group]) split into attn_qkv (all q heads, all k
  heads, all v heads) and attn_gate (z). Older files keep it whole as ssm_in; both are read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError, WeightsError

# tinylm family -> the llama.cpp architecture it is written as
ARCH_OF_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
                  "qwen3_next": "qwen3next"}
# llama.cpp architecture -> the tinylm family it is read as (Qwen2-MoE: tinylm's MoE block with Qwen2's attention)
FAMILY_OF_ARCH = {**{arch: family for family, arch in ARCH_OF_FAMILY.items()}, "qwen2moe": "qwen3_moe"}
PERMUTED_QK = frozenset({"llama"})  # architectures whose q/k rows llama.cpp interleaves
SHIFTED_NORMS = frozenset({"qwen3next"})  # RMSNorm weights stored as 1 + w
# Architectures whose llama.cpp loader has no attn_output.bias (it refuses a file holding one; q/k/v biases it
# takes): checked against llama-cpp-python 0.3.36. An all-zero o_proj bias is left out for them, and read back.
LACKS_OUTPUT_BIAS = frozenset({"qwen3", "qwen3moe", "qwen3next"})
_ARCH_ENUM = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}

# The layer tensors tinylm's modules hold, as `{module}.{weight|bias}`; experts under their stacked name.
_LAYER_PARAMS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{s}" for p in "qkvo" for s in ("weight", "bias")),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    *(f"mlp.{p}_proj.{s}" for p in ("gate", "up", "down") for s in ("weight", "bias")),
    "mlp.gate.weight", "mlp.shared_expert_gate.weight",
    *(f"mlp.{e}.{p}_proj.weight" for e in ("experts", "shared_expert") for p in ("gate", "up", "down")),
    "linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight", "linear_attn.conv1d.weight",
    "linear_attn.dt_bias", "linear_attn.A_log", "linear_attn.norm.weight", "linear_attn.out_proj.weight",
)
_TOP_PARAMS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# Parameters that are not `{module}.{suffix}` in the name map's terms: (module it knows, GGUF suffix)
_PARAM_MODULES = {"linear_attn.dt_bias": ("linear_attn.dt_proj", ".bias"), "linear_attn.A_log": ("linear_attn.A_log", "")}
_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+\.weight)")
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_SPLIT_QKVZ = ("attn_qkv", "attn_gate")  # Qwen3-Next's in_proj_qkvz, split by today's converter


def export_arch(config: ModelConfig) -> str:
    if config.model_type not in ARCH_OF_FAMILY:
        raise ConfigError(f"llama.cpp has no architecture for the {config.model_type} family "
                          f"(GGUF export covers {', '.join(ARCH_OF_FAMILY)})")
    return ARCH_OF_FAMILY[config.model_type]


def gguf_name(arch: str, name: str) -> str | None:
    """A tinylm tensor name (experts stacked: `model.layers.3.mlp.experts.up_proj.weight`) -> its GGUF name."""
    tmap = _name_map(arch)
    for param, (module, suffix) in _PARAM_MODULES.items():
        if name.endswith("." + param):
            found = tmap.get_name(name[:-len(param)] + module)
            return None if found is None else found + suffix
    stem, _, suffix = name.rpartition(".")
    found = tmap.get_name(stem)
    return None if found is None else f"{found}.{suffix}"


@functools.cache
def _name_map(arch: str):
    # One block is enough: names are mapped with layer 0 and the index put back (see _reverse / gguf_name callers).
    return get_tensor_name_map(_ARCH_ENUM[arch], 1)


@functools.cache
def _reverse(arch: str) -> dict[str, str]:
    """GGUF name within a layer (`attn_q.weight`) or at the top -> the tinylm name (layer 0 for layer tensors)."""
    names = {}
    for param in _TOP_PARAMS + tuple(f"model.layers.0.{p}" for p in _LAYER_PARAMS):
        found = gguf_name(arch, param)
        if found is not None:
            names[found.removeprefix("blk.0.")] = param.removeprefix("model.layers.0.")
    return names


# --- tinylm -> GGUF (the writer)


def to_gguf(config: ModelConfig, tensors: dict[str, torch.Tensor], arch: str | None = None
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in torch layout) for every tensor of a tinylm state dict (HF names, the tied
    head left out by the caller). `arch`: the family's own (export_arch) unless given, e.g. "qwen2moe"."""
    arch = arch or export_arch(config)
    for name, tensor in _stack_experts(tensors).items():
        if arch in LACKS_OUTPUT_BIAS and name.endswith("self_attn.o_proj.bias") and not tensor.any():
            continue
        tensor = _export_value(arch, config, name, tensor.float())
        if arch == "qwen3next" and name.endswith("linear_attn.in_proj_qkvz.weight"):
            layer = name.split(".")[2]
            qkv, z = split_qkvz(config, tensor)
            yield f"blk.{layer}.attn_qkv.weight", qkv
            yield f"blk.{layer}.attn_gate.weight", z
            continue
        target = _layer_name(arch, name)
        if target is None:
            raise ConfigError(f"llama.cpp's {arch} architecture has no tensor for {name}")
        yield target, tensor


def _layer_name(arch: str, name: str) -> str | None:
    match = re.match(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None:
        return gguf_name(arch, name)
    found = gguf_name(arch, f"model.layers.0.{match[2]}")
    return None if found is None else f"blk.{match[1]}." + found.removeprefix("blk.0.")


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...experts.{j}.up_proj.weight` (out, in) for j = 0..E-1 -> `...experts.up_proj.weight` (E, out, in)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, tensor in tensors.items():
        match = _EXPERT.fullmatch(name)
        if match is None:
            out[name] = tensor
            continue
        stacked = f"{match[1]}.{match[3]}"
        out.setdefault(stacked, None)  # keeps the first expert's place in the order
        groups.setdefault(stacked, {})[int(match[2])] = tensor
    for stacked, experts in groups.items():
        out[stacked] = torch.stack([experts[j] for j in range(len(experts))])
    return out


def _export_value(arch: str, config: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    if arch in PERMUTED_QK and (name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias")):
        return permute_rows(t, config.num_attention_heads)
    if arch in PERMUTED_QK and (name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias")):
        return permute_rows(t, config.num_key_value_heads)
    if name.endswith("mlp.shared_expert_gate.weight"):
        return t.reshape(-1)  # (1, hidden) -> (hidden,): llama.cpp's ffn_gate_inp_shexp is a vector
    if arch not in SHIFTED_NORMS:
        return t
    if _is_shifted_norm(name):
        return t + 1
    if name.endswith("linear_attn.A_log"):
        return -torch.exp(t)
    if name.endswith("linear_attn.conv1d.weight"):
        return t.reshape(t.shape[0], t.shape[-1])  # (channels, 1, kernel) -> (channels, kernel)
    return t


def _is_shifted_norm(name: str) -> bool:
    """Zero-centred RMSNorms: every norm but the DeltaNet's gated one (Qwen3NextRMSNormGated keeps plain w)."""
    return name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half order of each q/k head -> llama.cpp's interleaved pairs (`LlamaModel.permute`).
    rows (heads * head_dim, ...) -> same shape."""
    return rows.reshape(heads, 2, -1, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def qkvz_order(config: ModelConfig) -> np.ndarray:
    """Row order that takes [attn_qkv rows; attn_gate rows] back to in_proj_qkvz rows.

    in_proj_qkvz (tinylm/model/deltanet.py) lays out each key head h as [q_h, k_h, v-group_h, z-group_h]; attn_qkv
    holds [q_0..q_H, k_0..k_H, v_0..v_H] and attn_gate [z_0..z_H]. Returns idx with qkvz = joined[idx]."""
    heads, dk = config.linear_num_key_heads, config.linear_key_head_dim
    dv = config.linear_num_value_heads // heads * config.linear_value_head_dim  # value rows per key head
    q, k, v, z = (np.arange(heads * d).reshape(heads, d) for d in (dk, dk, dv, dv))
    offsets = np.cumsum([0, heads * dk, heads * dk, heads * dv])
    parts = [q + offsets[0], k + offsets[1], v + offsets[2], z + offsets[3]]
    return np.concatenate(parts, axis=1).reshape(-1)  # (heads, dk + dk + dv + dv) flattened per head


def split_qkvz(config: ModelConfig, qkvz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj_qkvz (rows, hidden) -> (attn_qkv, attn_gate), the inverse of qkvz_order."""
    joined = torch.empty_like(qkvz)
    joined[torch.from_numpy(qkvz_order(config))] = qkvz
    gate_rows = config.linear_num_value_heads * config.linear_value_head_dim
    return joined[:-gate_rows].contiguous(), joined[-gate_rows:].contiguous()


# --- GGUF -> tinylm (the reader)


@dataclass
class TensorView:
    """Stands in for a GGUFReader tensor where a tinylm tensor is not one GGUF tensor as stored: one expert of a
    stacked tensor, a shifted norm, the joined q/k/v/z projection. Same attributes as the reader's tensors: `shape`
    in GGUF order (innermost first), `data` the raw blocks in torch order (rows first), read when asked for."""

    name: str
    tensor_type: QType
    shape: np.ndarray
    read: Callable[[], np.ndarray]

    @property
    def data(self) -> np.ndarray:
        return self.read()


def tinylm_names(arch: str, gguf_name_: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (experts: their stacked name);
    None for a name the architecture does not map."""
    reverse = _reverse(arch)
    match = _LAYER.fullmatch(gguf_name_)
    if match is None:
        return reverse.get(gguf_name_)
    param = reverse.get(match[2])
    return None if param is None else f"model.layers.{int(match[1])}.{param}"


def stored_shapes(arch: str, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tinylm name -> (GGUF name, torch shape) from names and shapes only (no data): what the size checks before
    the model is built compare with (tinylm/weights/fit.py). Stacked experts count as E tensors."""
    found = {}
    for name, shape in tensors.items():
        target = tinylm_names(arch, name)
        if target is None:
            continue
        stacked = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\w+\.weight)", target)
        if stacked and len(shape) == 3:
            found.update({f"{stacked[1]}.{j}.{stacked[2]}": (name, shape[1:]) for j in range(shape[0])})
        else:
            found[target] = (name, _tinylm_shape(target, tuple(shape)))
    return found


def _tinylm_shape(target: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a tensor stored squeezed: the conv kernel (channels, kernel) -> (channels, 1, kernel),
    the shared-expert gate (hidden,) -> (1, hidden)."""
    if target.endswith("linear_attn.conv1d.weight") and len(shape) == 2:
        return (shape[0], 1, shape[1])
    if target.endswith("mlp.shared_expert_gate.weight") and len(shape) == 1:
        return (1, shape[0])
    return shape


def views(arch: str, config: ModelConfig, tensors: list) -> dict[str, object]:
    """tinylm name -> the reader tensor (or a TensorView) it is read from; raises WeightsError for a GGUF tensor
    the architecture has no place for."""
    found: dict[str, object] = {}
    pairs: dict[str, dict[str, object]] = {}  # layer -> {"attn_qkv": tensor, "attn_gate": tensor}
    for tensor in tensors:
        match = _LAYER.fullmatch(tensor.name)
        if arch == "qwen3next" and match and match[2].removesuffix(".weight") in _SPLIT_QKVZ:
            pairs.setdefault(match[1], {})[match[2].removesuffix(".weight")] = tensor
            continue
        target = tinylm_names(arch, tensor.name)
        if target is None:
            raise WeightsError(f"unexpected tensor {tensor.name!r} for llama.cpp's {arch} architecture")
        found.update(_views_of(arch, config, target, tensor))
    for layer, pair in pairs.items():
        if set(pair) != set(_SPLIT_QKVZ):
            raise WeightsError(f"blk.{layer}: attn_qkv and attn_gate come together, the file has only "
                               f"{', '.join(pair)}")
        found[f"model.layers.{int(layer)}.linear_attn.in_proj_qkvz.weight"] = joined_qkvz(config, *pair.values())
    return found


def _views_of(arch: str, config: ModelConfig, target: str, tensor) -> dict[str, object]:
    stacked = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\w+\.weight)", target)
    if stacked:
        if len(tensor.shape) != 3:
            raise WeightsError(f"tensor {tensor.name!r} has {len(tensor.shape)} dims, stacked experts need 3")
        return {f"{stacked[1]}.{j}.{stacked[2]}": _expert(tensor, j) for j in range(int(tensor.shape[2]))}
    if arch in SHIFTED_NORMS and _is_shifted_norm(target):
        return {target: _float_view(tensor, lambda w: w - 1)}
    if arch in SHIFTED_NORMS and target.endswith("linear_attn.A_log"):
        with np.errstate(invalid="ignore", divide="ignore"):  # a positive ssm_a gives NaN, refused by the NaN scan
            return {target: _float_view(tensor, lambda a: np.log(-a))}
    if target.endswith("linear_attn.conv1d.weight") or target.endswith("mlp.shared_expert_gate.weight"):
        return {target: _reshaped(tensor, target)}
    return {target: tensor}


def zero_vector(name: str, size: int) -> TensorView:
    return TensorView(name, QType.F32, np.array([size]), lambda: np.zeros(size, np.float32))


def _expert(tensor, j: int) -> TensorView:
    """Expert j of a stacked (E, out, in) tensor: the raw blocks of its rows, no copy."""
    return TensorView(f"{tensor.name}[{j}]", tensor.tensor_type, tensor.shape[:2], lambda: tensor.data[j])


def _float_view(tensor, fix: Callable[[np.ndarray], np.ndarray]) -> TensorView:
    """A small float tensor with `fix` applied to its values (float32)."""
    def read() -> np.ndarray:
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        return fix(values).astype(np.float32)
    return TensorView(tensor.name, QType.F32, tensor.shape, read)


def _reshaped(tensor, target: str) -> TensorView:
    """The conv kernel (channels, kernel) -> (channels, 1, kernel); the shared-expert gate (hidden,) -> (1, hidden)."""
    shape = np.asarray(tensor.shape)
    if target.endswith("conv1d.weight"):
        gguf_shape = np.array([shape[0], 1, *shape[1:]])  # ne = (kernel, 1, channels)
        return TensorView(tensor.name, tensor.tensor_type, gguf_shape,
                          lambda: tensor.data.reshape(int(shape[-1]), 1, -1))
    gguf_shape = np.array([shape[0], 1]) if len(shape) == 1 else shape
    return TensorView(tensor.name, tensor.tensor_type, gguf_shape, lambda: tensor.data.reshape(1, -1))


def joined_qkvz(config: ModelConfig, qkv, gate) -> TensorView:
    """attn_qkv + attn_gate -> in_proj_qkvz: rows reordered as raw blocks (exact for every type, since blocks
    never span rows); two different types are joined as float32."""
    order = qkvz_order(config)
    rows = int(qkv.shape[1]) + int(gate.shape[1])
    if qkv.tensor_type == gate.tensor_type and len(qkv.shape) == len(gate.shape) == 2:
        return TensorView(qkv.name, qkv.tensor_type, np.array([qkv.shape[0], rows]),
                          lambda: np.concatenate([qkv.data, gate.data])[order])

    def read() -> np.ndarray:
        parts = [np.asarray(dequantize(t.data, t.tensor_type), np.float32) for t in (qkv, gate)]
        return np.concatenate(parts)[order]
    return TensorView(qkv.name, QType.F32, np.array([qkv.shape[0], rows]), read)
