"""The loading layer: a path and an optional quantization policy -> a LoadedModel, ready to run.

It sits above both the float loaders (tinylm/weights: read a folder or a GGUF file) and quantization
(tinylm/quant: layers, policies, checkpoints), and is the only place that picks between them:

  a tinylm quantized folder       quant.checkpoint.load_quantized_folder (its recorded policy; `quantize` may only
                                  change load-time options)
  no policy                       weights.loader.load_folder / load_gguf_file
  weight-only policy              quant.apply.build_quantized, one float tensor at a time from the file
  policy quantizing activations   the float model loaded whole, calibrated, then quantized (SmoothQuant)

The policy is parsed once, here (`parse_policy`); everything below receives the QuantPolicy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tinylm.errors import WeightsError
from tinylm.quant.apply import build_quantized, quantize_model
from tinylm.quant.checkpoint import load_quantized_folder, quantization_config
from tinylm.quant.policy import QuantPolicy, parse_policy
from tinylm.quant.sample_text import CALIBRATION_SAMPLE
from tinylm.weights import finite
from tinylm.weights.loader import (LoadedModel, folder_config, load_folder, load_folder_meta, load_gguf_file,
                                   load_gguf_meta, parse_dtype)


def load_model(path: Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               quantize: str | QuantPolicy | None = None, check_finite: bool = True,
               gguf_blocks: bool = False) -> LoadedModel:
    """A Hugging Face folder, a tinylm quantized folder or a .gguf file; `quantize` (a policy name such as "int8",
    "int4", "qkv-fp16", optionally with options, or a QuantPolicy) quantizes while loading. `gguf_blocks` (a .gguf
    file, float32 or a ValueError, no policy): its Q4_0-Q8_0 and Q4_K-Q6_K linear weights stay blocks
    (weights/loader.py load_gguf_file).

    `check_finite` (default True) refuses weights holding NaN or Inf with a WeightsError naming the first such
    tensor; a quantize-while-loading path checks each float tensor before quantizing it."""
    torch_dtype = parse_dtype(dtype)
    gguf = not path.is_dir() and path.suffix.lower() == ".gguf"
    if not path.is_dir() and not gguf:
        raise WeightsError(f"{path}: expected a Hugging Face folder or a .gguf file")
    policy = _parsed(quantize)
    if not gguf:
        return _load(path, False, torch_dtype, device, policy, check_finite, False)
    from tinylm.weights.gguf import forget_opened  # noqa: PLC0415 - the gguf package only for GGUF files

    try:
        return _load(path, True, torch_dtype, device, policy, check_finite, gguf_blocks)
    finally:  # the file's pages the load touched stay resident while its memory map is open: ~0.7 GB for 1.1B Q4_1
        forget_opened()


def _load(path: Path, gguf: bool, torch_dtype: torch.dtype, device: str, policy: QuantPolicy | None,
          check_finite: bool, gguf_blocks: bool) -> LoadedModel:
    if not gguf and quantization_config(path) is not None:
        return _saved_quantized(path, torch_dtype, device, policy, check_finite)
    if policy is None:
        if gguf_blocks:
            return load_gguf_file(path, torch_dtype, device, check_finite, blocks=True)
        return _float(path, gguf, torch_dtype, device, check_finite)
    if policy.activations == "int8":
        return _smoothed(_float(path, gguf, torch_dtype, device, check_finite), policy)
    parts = load_gguf_meta(path) if gguf else load_folder_meta(path)
    return _quantized(parts, path, torch_dtype, device, policy, "gguf" if gguf else "safetensors", check_finite)


def _parsed(quantize: str | QuantPolicy | None) -> QuantPolicy | None:
    """The policy, parsed once. A QuantPolicy given as an object counts as built in code: all its options are
    meant (`explicit=None`), even if it was parsed from a spec and then changed with `replace`."""
    if isinstance(quantize, QuantPolicy):
        return replace(quantize, explicit=None)
    return None if quantize is None else parse_policy(quantize)


def _float(path: Path, gguf: bool, dtype: torch.dtype, device: str, check_finite: bool) -> LoadedModel:
    loader = load_gguf_file if gguf else load_folder
    return loader(path, dtype, device, check_finite)


def _saved_quantized(path: Path, dtype: torch.dtype, device: str, policy: QuantPolicy | None,
                     check_finite: bool) -> LoadedModel:
    folder_config(path)  # sizes checked against the headers before the quantized loader builds the model
    loaded = load_quantized_folder(path, dtype, device, policy)
    if check_finite:  # that loader reads its own tensors: check what it built (float parts and scales)
        finite.check_model_finite(loaded.model)
    return loaded


def _smoothed(loaded: LoadedModel, policy: QuantPolicy) -> LoadedModel:
    """W8A8 policies: the float model is loaded whole, run once over the calibration text to measure its
    activation ranges (SmoothQuant, tinylm/quant/smooth.py), then quantized in place. Peak memory is the float
    model's, unlike the streaming path of weight-only policies."""
    ids = loaded.tokenizer.encode(CALIBRATION_SAMPLE) if loaded.tokenizer is not None else None
    quantize_model(loaded.model, policy, ids[:loaded.model.config.max_position_embeddings] if ids else None)
    loaded.metadata = {**loaded.metadata, "quantization": policy.spec}
    return loaded


def _quantized(parts, path: Path, dtype: torch.dtype, device: str, policy: QuantPolicy, fmt: str,
               check_finite: bool = True) -> LoadedModel:
    """Quantize while reading: one float tensor at a time, never a float copy of the whole model."""
    model, source, tokenizer, metadata = parts
    if check_finite:
        source = finite.FiniteSource(source)  # each float tensor checked as read, before it is quantized
    try:
        build_quantized(model, policy, source, dtype, device)
    finally:
        source.close()
    model.config = replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    return LoadedModel(model=model, tokenizer=tokenizer(), source=path, format=fmt,
                       metadata={**metadata, "quantization": policy.spec})
