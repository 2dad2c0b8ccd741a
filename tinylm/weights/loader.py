"""Build a model on the meta device and load its weights with `assign=True` (no second copy, no random init)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tinylm.config import ModelConfig
from tinylm.errors import WeightsError
from tinylm.model.transformer import CausalLM
from tinylm.weights import name_maps, safetensors_io

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object | None  # tinylm.tokenizer.Tokenizer
    source: Path
    format: str  # "safetensors" | "gguf"
    metadata: dict = field(default_factory=dict)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def expected_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build_model(config: ModelConfig) -> CausalLM:
    with torch.device("meta"):
        return CausalLM(config)


def assign_weights(model: CausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str) -> CausalLM:
    """Move the checked tensors into the meta model, cast to `dtype`, tie the head, and put it on `device`."""
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy; the embedding is the truth
    tensors = {name: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
               for name, t in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [n for n in missing if not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise WeightsError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def load_folder(folder: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    """A Hugging Face folder: config.json + safetensors (single or sharded) + tokenizer files."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json")
    config = ModelConfig.from_file(config_path)
    model = build_model(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    tensors = safetensors_io.load_checkpoint(folder, expected_shapes(model), optional,
                                             rename=lambda stored: module_name(config.model_type, stored))
    assign_weights(model, tensors, dtype, device)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from tinylm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=folder, format="safetensors")


def module_name(model_type: str, stored: str) -> str | None:
    """None for rotary tables some checkpoints carry as buffers: the model recomputes them."""
    return None if name_maps.is_computed_buffer(stored) else name_maps.to_module_name(model_type, stored)


def load_gguf_file(path: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    from tinylm.weights.gguf import load_gguf

    gguf_model = load_gguf(path, dtype=dtype)
    model = build_model(gguf_model.config)  # load_gguf already checked every tensor's name and shape
    assign_weights(model, gguf_model.tensors, dtype, device)
    return LoadedModel(model=model, tokenizer=gguf_model.tokenizer, source=path, format="gguf",
                       metadata=gguf_model.metadata)


def load_model(path: Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               quantize=None) -> LoadedModel:
    """A Hugging Face folder, a tinylm quantized folder or a .gguf file; `quantize` (a policy name such as "int8",
    "int4", "qkv-fp16", optionally with options, or a tinylm.quant.QuantPolicy) quantizes while loading."""
    torch_dtype = parse_dtype(dtype)
    if path.is_dir():
        from tinylm.quant.checkpoint import load_quantized_folder, quantization_config

        if quantization_config(path) is not None:
            return load_quantized_folder(path, torch_dtype, device, quantize)
        if quantize is not None and _quantizes_activations(quantize):
            return _smoothed(load_folder(path, torch_dtype, device), quantize)
        if quantize is not None:
            return _quantized(load_folder_meta(path), path, torch_dtype, device, quantize, "safetensors")
        return load_folder(path, torch_dtype, device)
    if path.suffix.lower() == ".gguf":
        if quantize is not None and _quantizes_activations(quantize):
            return _smoothed(load_gguf_file(path, torch_dtype, device), quantize)
        if quantize is not None:
            return _quantized(load_gguf_meta(path), path, torch_dtype, device, quantize, "gguf")
        return load_gguf_file(path, torch_dtype, device)
    raise WeightsError(f"{path}: expected a Hugging Face folder or a .gguf file")


def load_folder_meta(folder: Path):
    """(meta model, tensor source, tokenizer loader) of a float folder, for a streaming quantized load."""
    from tinylm.quant.sources import SafetensorsSource

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json")
    config = ModelConfig.from_file(config_path)
    model = build_model(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    source = SafetensorsSource(folder, expected_shapes(model), optional,
                               rename=lambda stored: module_name(config.model_type, stored))

    def tokenizer():
        if not (folder / "tokenizer.json").is_file():
            return None
        from tinylm.tokenizer import Tokenizer

        return Tokenizer.from_folder(folder)
    return model, source, tokenizer, {}


def load_gguf_meta(path: Path):
    from tinylm.quant.sources import GGUFSource
    from tinylm.weights.gguf import open_gguf

    gguf_file = open_gguf(path)
    return build_model(gguf_file.config), GGUFSource(gguf_file), gguf_file.tokenizer, gguf_file.metadata


def _quantizes_activations(quantize) -> bool:
    from tinylm.quant.policy import parse_policy

    return parse_policy(quantize).activations == "int8"


def _smoothed(loaded: LoadedModel, quantize) -> LoadedModel:
    """W8A8 policies: the float model is loaded whole, run once over the calibration text to measure its
    activation ranges (SmoothQuant, tinylm/quant/smooth.py), then quantized in place. Peak memory is the float
    model's, unlike the streaming path of weight-only policies."""
    from tinylm.quant.apply import quantize_model
    from tinylm.quant.policy import parse_policy
    from tinylm.quant.sample_text import CALIBRATION_SAMPLE

    policy = parse_policy(quantize)
    ids = loaded.tokenizer.encode(CALIBRATION_SAMPLE) if loaded.tokenizer is not None else None
    quantize_model(loaded.model, policy, ids[:loaded.model.config.max_position_embeddings] if ids else None)
    loaded.metadata = {**loaded.metadata, "quantization": policy.spec}
    return loaded


def _quantized(parts, path: Path, dtype: torch.dtype, device: str, quantize, fmt: str) -> LoadedModel:
    """Quantize while reading: one float tensor at a time, never a float copy of the whole model."""
    from tinylm.quant.apply import build_quantized
    from tinylm.quant.policy import parse_policy

    model, source, tokenizer, metadata = parts
    policy = parse_policy(quantize)
    try:
        build_quantized(model, policy, source, dtype, device)
    finally:
        source.close()
    model.config = replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    return LoadedModel(model=model, tokenizer=tokenizer(), source=path, format=fmt,
                       metadata={**metadata, "quantization": policy.spec})
