"""Build a model on the meta device and load its weights with `assign=True` (no second copy, no random init)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError, WeightsError
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
                                             rename=lambda stored: _module_name(config.model_type, stored))
    assign_weights(model, tensors, dtype, device)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from tinylm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(model=model, tokenizer=tokenizer, source=folder, format="safetensors")


def _module_name(model_type: str, stored: str) -> str | None:
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
               quantize: str | None = None) -> LoadedModel:
    if quantize is not None:
        raise ConfigError(f"quantize={quantize!r}: weight-only quantization is not implemented yet")
    torch_dtype = parse_dtype(dtype)
    if path.is_dir():
        return load_folder(path, torch_dtype, device)
    if path.suffix.lower() == ".gguf":
        return load_gguf_file(path, torch_dtype, device)
    raise WeightsError(f"{path}: expected a Hugging Face folder or a .gguf file")
