"""Quantized checkpoints: a Hugging Face-shaped folder whose quantized layers store integer weights.

  config.json           the model config plus `quantization_config` {"quant_method": "tinylm", "policy": {...}}
  model.safetensors     float tensors as usual; a quantized layer `X` stores instead
                          X.qweight  int8 (N, K)                          int8: w = q * scale
                                     uint8 (N, K/2), 2 values per byte     int4: w = (q - 8) * scale + zero
                          X.scales   (N,) per channel or (N, K / group)
                          X.zeros    (N, K / group)                         (int4 only)
  tokenizer files, generation_config.json, SHA256SUMS over all of them

Which layers are quantized, and how, is read from which tensors exist (DESIGN principle 3); the policy recorded in
config.json supplies the options (chunking, kernel dtype). The int4 bytes are in a portable order (feature 2i low
nibble, 2i+1 high) and are packed for this CPU's kernel at load.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError, WeightsError
from tinylm.quant import int4pack
from tinylm.quant.apply import build_quantized
from tinylm.quant.chunked import ChunkedMLP
from tinylm.quant.gguf_blocks import NativeWeight
from tinylm.quant.policy import QuantPolicy, split_spec
from tinylm.quant.sources import SafetensorsSource
from tinylm.weights import name_maps, safetensors_io

QUANT_METHOD = "tinylm"
_RUNTIME_OPTIONS = ("head_chunk", "mlp_chunk", "kernel_dtype")  # may change at load; the rest is in the bytes


def save_quantized(model: nn.Module, folder: str | Path, policy: QuantPolicy, tokenizer=None) -> Path:
    """Write a quantized model (from `tinylm.load(..., quantize=...)`) as a folder `tinylm.load` reads back."""
    from tinylm.weights.export import generation_config

    if any(isinstance(m, ChunkedMLP) for m in model.modules()):
        raise ConfigError("save the model before mlp_chunk splits it: chunking is a load-time option of the policy")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = model.model.norm.weight.dtype
    state = {name_maps.to_checkpoint_name(config.model_type, name): t for name, t in model.state_dict().items()}
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": 1, "spec": policy.spec,
                                        "policy": policy.to_dict()}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    safetensors_io.save_checkpoint(folder, state)  # the manifest comes last, over every file above
    return folder


def quantization_config(folder: Path) -> dict | None:
    """The folder's `quantization_config` when it is a tinylm quantized checkpoint, else None."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def load_quantized_folder(folder: Path, dtype: torch.dtype, device: str, quantize=None):
    """Load a tinylm quantized checkpoint; `quantize` may only change the policy's load-time options."""
    from tinylm.weights.loader import LoadedModel, build_model, module_name

    config = ModelConfig.from_file(folder / "config.json")
    policy = _policy(folder, quantization_config(folder), quantize)
    model = build_model(config)
    source = CheckpointSource(folder, model, lambda stored: module_name(config.model_type, stored))
    try:
        build_quantized(model, policy, source, dtype, device)
    finally:
        source.close()
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from tinylm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=folder, format="safetensors",
                       metadata={"quantization": policy.spec})


def _policy(folder: Path, qc: dict, quantize) -> QuantPolicy:
    """The recorded policy, with the load-time options `quantize` names explicitly."""
    if not isinstance(qc.get("policy"), dict):
        raise ConfigError(f"{folder}/config.json: quantization_config has no policy")
    policy = QuantPolicy.from_dict(qc["policy"])
    if quantize is None:
        return policy
    if isinstance(quantize, QuantPolicy):
        name, options = quantize.name, {k: getattr(quantize, k) for k in _RUNTIME_OPTIONS}
    else:
        name, options = split_spec(quantize)
    fixed = sorted(set(options) - set(_RUNTIME_OPTIONS))
    if name != policy.name or fixed:
        raise ConfigError(f"{folder} is already quantized with policy {policy.spec!r}; load it without quantize, or "
                          f"with quantize='{policy.name}:...' to change only {', '.join(_RUNTIME_OPTIONS)}")
    return replace(policy, **options)


class CheckpointSource(SafetensorsSource):
    """A quantized folder: float tensors as in any checkpoint, and each quantized layer's stored integers."""

    def __init__(self, folder: Path, model: nn.Module, rename) -> None:
        layers = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        self.quantized = _quantized_entries(folder, layers, rename)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()
                    if not (name.endswith(".weight") and name.removesuffix(".weight") in self.quantized)}
        optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        super().__init__(folder, expected, optional, rename, extra=lambda name: _is_quant(name, self.quantized))

    def native(self, name: str, scheme: str) -> NativeWeight | None:
        layer = name.removesuffix(".weight")
        if layer not in self.quantized:
            return None  # (a stored layer of another kind than the recorded policy says fails in takes_as_is)
        rows, cols = self.quantized[layer]
        q, scales = self._read(f"{layer}.qweight"), self._read(f"{layer}.scales")
        if q.dtype == torch.int8:
            _expect(layer, "qweight", q, (rows, cols))
            _check_scales(layer, scales, rows, cols)
            smoothing = self.get(f"{layer}.input_scale").float() if f"{layer}.input_scale" in self.found else None
            if smoothing is not None:
                _expect(layer, "input_scale", smoothing, (cols,))
            return NativeWeight("int8", q, scales.float(), input_scale=smoothing)
        zeros = self._read(f"{layer}.zeros")
        _expect(layer, "qweight", q, (rows, cols // 2))
        _check_scales(layer, scales, rows, cols, int4=True)
        _expect(layer, "zeros", zeros, tuple(scales.shape))
        return NativeWeight("int4", int4pack.unpack_portable(q), scales.float(), zeros.float())

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.found:
            raise WeightsError(f"quantized checkpoint: missing tensor {name}")
        return self.get(name)


def _quantized_entries(folder: Path, layers: dict, rename) -> dict[str, tuple[int, int]]:
    """Layers stored quantized (they have a `qweight`) -> their float (rows, cols)."""
    quantized = {}
    for path in safetensors_io.checkpoint_files(folder):
        for stored, entry in safetensors_io.read_header(path).items():
            name = rename(stored) or ""
            layer, _, suffix = name.rpartition(".")
            if suffix == "qweight":
                if layer not in layers:
                    raise WeightsError(f"{path.name}: quantized tensor {stored!r} belongs to no layer of this model")
                if entry["dtype"] not in ("I8", "U8"):
                    raise WeightsError(f"{path.name}: {stored!r} has dtype {entry['dtype']}, expected I8 or U8")
                quantized[layer] = layers[layer]
    return quantized


def _is_quant(name: str | None, quantized: dict) -> bool:
    layer, _, suffix = (name or "").rpartition(".")
    return layer in quantized and suffix in ("qweight", "scales", "zeros", "input_scale")


def _expect(layer: str, part: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise WeightsError(f"{layer}.{part} has shape {tuple(tensor.shape)}, the config needs {tuple(shape)}")


def _check_scales(layer: str, scales: torch.Tensor, rows: int, cols: int, int4: bool = False) -> None:
    groups = scales.shape[1] if scales.dim() == 2 else 1
    bad = scales.dim() not in (1, 2) or scales.shape[0] != rows or cols % groups or not scales.is_floating_point()
    if bad or (int4 and (scales.dim() != 2 or cols // groups not in int4pack.GROUP_SIZES)):
        raise WeightsError(f"{layer}.scales has shape {tuple(scales.shape)} and dtype {scales.dtype}, which do not "
                           f"fit a ({rows}, {cols}) weight")
