"""Build a model on the meta device and load its float weights with `assign=True` (no second copy, no random init).

Float loading only: a folder (`load_folder`) or a GGUF file (`load_gguf_file`), and the meta model + tensor source
a quantized build reads from (`load_folder_meta`, `load_gguf_meta`). Choosing between float, quantize-while-loading
and saved quantized folders is the loading layer's (tinylm/loading.py: `load_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm.config import ModelConfig, config_keys
from tinylm.errors import WeightsError
from tinylm.model.block_linear import place_blocks, placeable
from tinylm.model.transformer import CausalLM
from tinylm.weights import finite, name_maps, safetensors_io
from tinylm.weights.fit import check_config_fits
from tinylm.weights.sources import SafetensorsSource

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


def assign_weights(model: CausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                   check_finite: bool = True) -> CausalLM:
    """Move the checked tensors into the meta model, cast to `dtype`, tie the head, and put it on `device`.
    `check_finite`: refuse a tensor holding NaN or Inf (after the cast, which can overflow to Inf)."""
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy; the embedding is the truth
    tensors = {name: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
               for name, t in tensors.items()}
    if check_finite:
        for name, tensor in tensors.items():
            finite.check_finite(name, tensor)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [n for n in missing if not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise WeightsError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def folder_config(folder: Path) -> ModelConfig:
    """A folder's config.json, its sizes checked against the tensor shapes in the safetensors headers (no weight
    is read) before anything is built from it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder} has no config.json")
    config = ModelConfig.from_file(config_path)
    shapes = safetensors_io.stored_shapes(folder, lambda stored: module_name(config.model_type, stored))
    check_config_fits(config, shapes, str(config_path), config_keys(config.model_type))
    return config


def load_folder(folder: Path, dtype: torch.dtype, device: str, check_finite: bool = True) -> LoadedModel:
    """A Hugging Face folder: config.json + safetensors (single or sharded) + tokenizer files."""
    config = folder_config(folder)
    model = build_model(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    tensors = safetensors_io.load_checkpoint(folder, expected_shapes(model), optional,
                                             rename=lambda stored: module_name(config.model_type, stored))
    assign_weights(model, tensors, dtype, device, check_finite)
    return LoadedModel(model=model, tokenizer=folder_tokenizer(folder), source=folder, format="safetensors")


def folder_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    from tinylm.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def module_name(model_type: str, stored: str) -> str | None:
    """None for rotary tables some checkpoints carry as buffers: the model recomputes them."""
    return None if name_maps.is_computed_buffer(stored) else name_maps.to_module_name(model_type, stored)


def load_gguf_file(path: Path, dtype: torch.dtype, device: str, check_finite: bool = True,
                   blocks: bool = False) -> LoadedModel:
    """blocks (a float32 model on CPU): the file's Q4_0-Q8_0 and Q4_K-Q6_K linear weights stay the blocks it
    stores, in BlockLinear layers (tinylm/model/block_linear.py, bitwise the float32 product of the dequantized weight);
    their float32 weights are never built (a 1.1B-parameter Q4_1 file: ~1 GB resident instead of ~6 GB at the peak)."""
    from tinylm.weights.gguf import load_gguf
    from tinylm.weights.gguf_blocks import read_blocks

    stored = {}
    if blocks:
        if dtype != torch.float32:  # the blocks widen to float32 values: a model computing in another dtype differs
            raise ValueError(f"GGUF blocks compute in float32, not {dtype}")
        stored = read_blocks(path, keep=placeable)
    gguf_model = load_gguf(path, dtype=dtype, skip=frozenset(stored))
    model = build_model(gguf_model.config)  # load_gguf already checked every tensor's name and shape
    tensors = {**gguf_model.tensors, **place_blocks(model, stored)}  # scales and mins checked finite with the rest
    assign_weights(model, tensors, dtype, device, check_finite)
    return LoadedModel(model=model, tokenizer=gguf_model.tokenizer, source=path, format="gguf",
                       metadata=gguf_model.metadata)


def load_folder_meta(folder: Path):
    """(meta model, tensor source, tokenizer loader, metadata) of a float folder, for a streaming quantized load."""
    config = folder_config(folder)
    model = build_model(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    source = SafetensorsSource(folder, expected_shapes(model), optional,
                               rename=lambda stored: module_name(config.model_type, stored))
    return model, source, lambda: folder_tokenizer(folder), {}


def load_gguf_meta(path: Path):
    """(meta model, tensor source, tokenizer loader, metadata) of a GGUF file, for a streaming quantized load."""
    from tinylm.weights.gguf import open_gguf  # the gguf package is imported only for GGUF files
    from tinylm.weights.gguf_source import GGUFSource

    gguf_file = open_gguf(path)
    return build_model(gguf_file.config), GGUFSource(gguf_file), gguf_file.tokenizer, gguf_file.metadata
