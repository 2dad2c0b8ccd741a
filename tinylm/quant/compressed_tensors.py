"""Quantized checkpoints in the compressed-tensors format (tinylm/quant/ct_layout.py), which transformers and vLLM
load: written from a model whose quantized layers are all Int8Linear (per channel or group) or all symmetric
Int4Linear, read back into those layers straight from the packed tensors (no float weight is ever built).

What the format can hold: weight-only integer Linear layers of one scheme (W8A16, W4A16), every other layer in the
model dtype, including the embedding and the head, since vLLM quantizes Linear layers only. A tinylm policy's
compressed form (`compressed_form`) therefore keeps the embedding and head in float; policies that mix schemes
(qkv-fp16: fp16 q/k/v beside int4) or quantize activations (w8a8, with SmoothQuant factors) cannot be written and
stay in tinylm's own layout (tinylm/quant/checkpoint.py). tinylm's int4 has float zero points, which the format
(integer zero points) cannot store: the compressed form quantizes int4 symmetrically instead (`quantize_compressed`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tinylm.errors import ConfigError, WeightsError
from tinylm.quant import ct_layout, int4pack
from tinylm.quant.apply import EMBEDDING, HEAD, build_quantized, layer_schemes
from tinylm.quant.chunked import ChunkedMLP
from tinylm.quant.ct_layout import WeightScheme
from tinylm.quant.formats import FLOAT, QuantFormat
from tinylm.quant.linear import Int4Linear, Int8Linear
from tinylm.quant.policy import QuantPolicy
from tinylm.weights import name_maps, safetensors_io
from tinylm.weights.export import write_folder
from tinylm.weights.sources import ModuleSource, SafetensorsSource, TensorSource

INTEGER_SCHEMES = ("int8", "int4")
_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_LOAD_OPTIONS = ("head_chunk", "mlp_chunk")  # chosen at load; a compressed-tensors folder has no place for them


def compressed_form(policy: QuantPolicy) -> QuantPolicy:
    """The policy as compressed-tensors stores it: the embedding and head in float. ConfigError (one line) when
    the policy mixes schemes, quantizes activations, or carries load-time options the folder cannot record."""
    schemes = sorted({policy.default, *(s for _, s in policy.overrides)} - {FLOAT})
    if policy.activations != "float":
        raise ConfigError(f"policy {policy.spec!r} quantizes activations with SmoothQuant factors, which "
                          "compressed-tensors cannot store; save it in tinylm's format (--format tinylm, the default)")
    if len(schemes) != 1 or schemes[0] not in INTEGER_SCHEMES:
        raise ConfigError(f"policy {policy.spec!r} mixes {' and '.join(schemes) or 'no'} layers; compressed-tensors "
                          "(as transformers and vLLM read it) holds one integer scheme, int8 or int4, for every "
                          "quantized Linear layer; save it in tinylm's format (--format tinylm, the default)")
    if any(getattr(policy, option) for option in _LOAD_OPTIONS):
        raise ConfigError(f"{' and '.join(_LOAD_OPTIONS)} are load-time options that a compressed-tensors folder "
                          "does not record; give them when loading it (tinylm.load(folder, quantize='int4:mlp_chunk="
                          "2048'))")
    return replace(policy, embedding=FLOAT)


def quantize_compressed(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Quantize a loaded float model in place to `compressed_form(policy)`: int8 layers as tinylm always makes them
    (symmetric), int4 layers symmetric by groups (ct_layout.symmetric_int4). Its float weights are released layer
    by layer."""
    policy = compressed_form(policy)
    dtype = model.model.norm.weight.dtype
    source = _SymmetricInt4(ModuleSource(model), layer_schemes(model, policy), policy.int4_group(),
                            policy.kernel_dtype_for(dtype))
    try:
        return build_quantized(model, policy, source, dtype, model.model.norm.weight.device)
    finally:
        source.close()


class _SymmetricInt4:
    """A float source whose int4 layers come already quantized, symmetrically: build_quantized takes a layer's
    `saved` tensors before quantizing its float weight itself (tinylm's int4 quantizer is asymmetric)."""

    def __init__(self, inner: TensorSource, schemes: dict[str, str], group_size: int, scale_dtype: torch.dtype):
        self.inner, self.schemes, self.group_size, self.scale_dtype = inner, schemes, group_size, scale_dtype

    def saved(self, layer: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        if self.schemes.get(layer) != "int4":
            return None
        q, scales = ct_layout.symmetric_int4(self.inner.rows(f"{layer}.weight"), self.group_size, self.scale_dtype)
        return {"qweight": int4pack.pack_portable(q), "scales": scales, "zeros": torch.zeros_like(scales)}

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def rows(self, name: str):
        return self.inner.rows(name)

    def native(self, name: str, scheme: str):
        return self.inner.native(name, scheme)

    def close(self) -> None:
        self.inner.close()


# --- writing


def save_compressed_tensors(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write a model quantized by `quantize_compressed` (or any model whose quantized layers fit the format, each
    checked) as a compressed-tensors folder: config.json, model.safetensors, tokenizer, SHA256SUMS."""
    if any(isinstance(m, ChunkedMLP) for m in model.modules()):
        raise ConfigError("save the model before mlp_chunk splits it: chunking is a load-time option")
    folder = Path(folder)
    config = model.config
    layers = _quantized_layers(model)
    scheme = _one_scheme(layers)
    rename = lambda name: name_maps.to_checkpoint_name(config.model_type, name)  # noqa: E731
    state = {}
    for name, module in layers.items():
        state.update({f"{rename(name)}.{part}": t for part, t in _layer_parts(name, module).items()})
        if module.bias is not None:
            state[f"{rename(name)}.bias"] = module.bias.detach()
    skipped = {f"{name}.{part}" for name in layers for part in (*type(layers[name]).state_names, "bias")}
    for name, tensor in model.state_dict().items():
        if name not in skipped and not (name == "lm_head.weight" and config.tie_word_embeddings):
            state[rename(name)] = tensor
    ignore = [rename(name) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(model.model.norm.weight.dtype).removeprefix("torch.")
    hf_config["quantization_config"] = ct_layout.config_for(scheme, ignore if HEAD in ignore else [HEAD, *ignore])
    return write_folder(folder, config, hf_config, state, tokenizer)


def _quantized_layers(model: nn.Module) -> dict[str, QuantFormat]:
    """Every quantized layer, each one the format can hold; ConfigError naming the first that it cannot."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantFormat)}
    for name, module in layers.items():
        if name in (EMBEDDING, HEAD) or not isinstance(module, (Int8Linear, Int4Linear)):
            raise ConfigError(f"{name} is stored as {type(module).__name__}; compressed-tensors holds int8 and int4 "
                              "Linear layers only (embedding and head in float): quantize with "
                              "tinylm.quant.compressed_tensors.quantize_compressed, or save in tinylm's format")
        if isinstance(module, Int8Linear) and (module.activations != "float" or module.input_scale is not None):
            raise ConfigError(f"{name} quantizes its activations; compressed-tensors W8A16 is weight-only")
    if not layers:
        raise ConfigError("the model has no quantized layers to write in compressed-tensors form")
    return layers


def _one_scheme(layers: dict[str, QuantFormat]) -> WeightScheme:
    found = {WeightScheme(8 if isinstance(m, Int8Linear) else 4, m.group_size, True, True) for m in layers.values()}
    if len(found) > 1:
        raise ConfigError("the quantized layers differ in scheme or group size; compressed-tensors holds one")
    return found.pop()


def _layer_parts(name: str, module: QuantFormat) -> dict[str, torch.Tensor]:
    if isinstance(module, Int8Linear):
        return ct_layout.int8_parts(module.qweight, module.scales)
    q, scales, zeros = module.portable_parts()
    # symmetric layers have zero = 0, up to the rounding of 16-bit (scale, min) pairs the layer may keep
    if bool((zeros.abs() > 1e-3 * scales.abs()).any()):
        raise ConfigError(f"{name} is int4 with zero points (tinylm's asymmetric int4); compressed-tensors stores "
                          "integer zero points only: quantize with quantize_compressed (symmetric int4)")
    return ct_layout.int4_parts(q, scales)


# --- reading


def open_folder(folder: Path, model: nn.Module, qc: dict, rename) -> tuple[QuantPolicy, CompressedSource]:
    """The policy a compressed-tensors folder stands for, and the source build_quantized fills `model` (meta) from.
    Which layers are quantized is read from the tensors the folder holds (X.weight_packed, or an int8 X.weight)."""
    ct_layout.little_endian()
    scheme = ct_layout.scheme_of(qc, f"{folder}/config.json")
    dtypes = {}  # module name -> stored dtype of its `weight_packed` / `weight` / `weight_scale`
    for path in safetensors_io.checkpoint_files(folder):
        for stored, entry in safetensors_io.read_header(path).items():
            name = rename(stored)
            if name is not None:
                dtypes[name] = entry["dtype"]
    layers = {n.rpartition(".")[0] for n, d in dtypes.items()
              if n.endswith(".weight_packed") or (n.endswith(".weight") and d == "I8")}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if EMBEDDING in layers or not layers <= set(linears):
        odd = sorted(layers - set(linears))
        raise ConfigError(f"{folder}: quantized tensors for {odd[0]}, which tinylm keeps in float (or is not a Linear "
                          "layer of this model)")
    if HEAD in layers:
        raise ConfigError(f"{folder}: a quantized lm_head beside a float embedding is not a tinylm policy")
    policy = _policy(scheme, layers, linears, dtypes, model.model.norm.weight.dtype)
    return policy, CompressedSource(folder, model, scheme, layers, rename)


def _policy(scheme: WeightScheme, layers: set[str], linears: list[str], dtypes: dict[str, str],
            model_dtype: torch.dtype) -> QuantPolicy:
    """Quantized Linear layers in the scheme, the rest (float Linear layers, embedding, head) in float; the kernels
    compute in the dtype the scales were stored in, so the layers reload as they were written."""
    floats = tuple((name, FLOAT) for name in linears if name not in layers and name != HEAD)
    stored = {dtypes.get(f"{n}.weight_scale") for n in layers}
    scale_dtype = _SCALE_DTYPES.get(stored.pop()) if len(stored) == 1 else None
    kernel = "model" if scale_dtype == model_dtype else "float32" if scale_dtype == torch.float32 else "auto"
    grouped = scheme.group_size
    return QuantPolicy(scheme.scheme, scheme.scheme, FLOAT, overrides=floats, kernel_dtype=kernel,
                       group_size=grouped if scheme.bits == 4 else None,
                       int8_group_size=grouped if scheme.bits == 8 else None)


class CompressedSource(SafetensorsSource):
    """A compressed-tensors folder: float tensors as in any checkpoint; each quantized layer's packed tensors
    handed over as the state its tinylm format reads (ct_layout.tinylm_state)."""

    def __init__(self, folder: Path, model: nn.Module, scheme: WeightScheme, layers: set[str], rename) -> None:
        self.scheme = scheme
        self.shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if name in layers}
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()
                    if not (name.endswith(".weight") and name.removesuffix(".weight") in layers)}
        optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        super().__init__(folder, expected, optional, rename, extra=self._is_packed)

    def _is_packed(self, name: str) -> bool:
        layer, _, part = name.rpartition(".")
        return layer in self.shapes and part in ct_layout.PARTS

    def saved(self, layer: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        if layer not in self.shapes:
            return None
        parts = {p: self.get(f"{layer}.{p}") for p in ct_layout.PARTS if f"{layer}.{p}" in self.found}
        try:
            return ct_layout.tinylm_state(parts, self.scheme, layer, self.shapes[layer])
        except RuntimeError as exc:  # a view of malformed data
            raise WeightsError(f"{layer}: cannot read compressed-tensors data ({exc})") from None
