"""Quantized checkpoints: a Hugging Face-shaped folder whose quantized layers store integer weights.

  config.json           the model config plus `quantization_config` {"tinylm_format": 2, "spec": ..., "policy": {...},
                        and a refusal for other tools, see REFUSAL below}
  model.safetensors     float tensors as usual; a quantized layer `X` stores instead of X.weight its format's
                        `state()` (tinylm/quant/formats.py), for the built-in formats:
                          X.qweight  int8 (N, K)                          int8: w = q * scale
                                     uint8 (N, K/2), 2 values per byte     int4: w = (q - 8) * scale + zero
                          X.scales   (N,) per channel or (N, K / group)
                          X.zeros    (N, K / group)                         (int4 only)
                          X.input_scale (K,)                                (smoothed W8A8 int8 only)
                          X.weight   float16 / bfloat16 (N, K)              (fp16 / bf16)
  tokenizer files, generation_config.json, SHA256SUMS over all of them

The policy recorded in config.json names each layer's scheme (from the config, DESIGN principle 3), hence its
format class, which reads back its own tensors (`from_state`, each checked) and supplies the load-time options
(chunking, kernel dtype). The int4 bytes are in a portable order (feature 2i low nibble, 2i+1 high) and are packed
for this CPU's kernel at load.

Other tools must refuse such a folder rather than run it with random weights (transformers 5 skips a
quantization_config whose quant_method it does not know, with a warning, and initializes the missing `weight`s).
The config therefore names a method transformers and vLLM both know, "fp8", with an `activation_scheme` both
validate before reading any weight and reject, quoting it (lowercased): transformers 5.25 raises "ValueError:
Activation scheme of this folder (tinylm's own quantized layout, policy qkv-fp16: load it with tinylm.load; ...)
not supported" (FineGrainedFP8Config.post_init); vLLM's Fp8Config checks the same key ("Unsupported activation
scheme ...", from its source, not run here). tinylm knows its folders by `tinylm_format`. Folders of
format 1 (quant_method "tinylm", before the refusal) still load.

compressed-tensors folders (tinylm/quant/compressed_tensors.py) load here too, into the same layers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.quant import compressed_tensors, ct_layout
from tinylm.quant.apply import build_quantized, layer_schemes
from tinylm.quant.chunked import ChunkedMLP
from tinylm.quant.formats import format_class
from tinylm.quant.policy import QuantPolicy
from tinylm.weights import name_maps
from tinylm.weights.export import write_folder
from tinylm.weights.loader import LoadedModel, build_model, folder_tokenizer, module_name
from tinylm.weights.sources import SafetensorsSource

FORMAT_VERSION = 2  # 1: quant_method "tinylm" (transformers ignored it and loaded random weights)
LEGACY_QUANT_METHOD = "tinylm"
REFUSAL_METHOD = "fp8"  # a method transformers and vLLM know, so that they validate the config and refuse it
_RUNTIME_OPTIONS = ("head_chunk", "mlp_chunk", "kernel_dtype")  # may change at load; the rest is in the bytes


def save_quantized(model: nn.Module, folder: str | Path, policy: QuantPolicy, tokenizer=None) -> Path:
    """Write a quantized model (from `tinylm.load(..., quantize=...)`) as a folder `tinylm.load` reads back. Each
    quantized layer's tensors are its format's `state()` (the layer's state dict)."""
    if any(isinstance(m, ChunkedMLP) for m in model.modules()):
        raise ConfigError("save the model before mlp_chunk splits it: chunking is a load-time option of the policy")
    folder = Path(folder)
    config = model.config
    dtype = model.model.norm.weight.dtype
    state = {name_maps.to_checkpoint_name(config.model_type, name): t for name, t in model.state_dict().items()}
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config["quantization_config"] = {**refusal(policy), "tinylm_format": FORMAT_VERSION, "spec": policy.spec,
                                        "policy": policy.to_dict()}
    return write_folder(folder, config, hf_config, state, tokenizer)


def refusal(policy: QuantPolicy) -> dict:
    """The quantization_config keys that make transformers and vLLM refuse the folder with a readable error (see
    the module docstring); the sentence reads on after their "Activation scheme " and before " not supported"."""
    return {"quant_method": REFUSAL_METHOD,
            "activation_scheme": f"of this folder (tinylm's own quantized layout, policy {policy.spec}: load it with "
                                 "tinylm.load; `tinylm quantize --format compressed-tensors` writes int8 and int4 "
                                 "policies in a form transformers and vLLM read)"}


def quantization_config(folder: Path) -> dict | None:
    """The folder's `quantization_config` when it is a tinylm quantized checkpoint or a compressed-tensors one,
    else None."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(qc, dict):
        return None
    ours = "tinylm_format" in qc or qc.get("quant_method") in (LEGACY_QUANT_METHOD, ct_layout.QUANT_METHOD)
    return qc if ours else None


def load_quantized_folder(folder: Path, dtype: torch.dtype, device: str, given: QuantPolicy | None = None
                          ) -> LoadedModel:
    """Load a tinylm quantized checkpoint or a compressed-tensors one, straight into quantized layers; a `given`
    policy may only change the recorded one's load-time options."""
    config = ModelConfig.from_file(folder / "config.json")
    qc = quantization_config(folder)
    model = build_model(config)
    rename = lambda stored: module_name(config.model_type, stored)  # noqa: E731
    compressed = qc.get("quant_method") == ct_layout.QUANT_METHOD
    if compressed:
        recorded, source = compressed_tensors.open_folder(folder, model, qc, rename)
    else:
        recorded = _recorded_policy(folder, qc)
        source = CheckpointSource(folder, model, layer_schemes(model, recorded), rename)
    try:
        policy = _with_load_options(folder, recorded, given)
        build_quantized(model, policy, source, dtype, device)
    finally:
        source.close()
    layout = ct_layout.QUANT_METHOD if compressed else "tinylm"
    return LoadedModel(model=model, tokenizer=folder_tokenizer(folder), source=folder, format="safetensors",
                       metadata={"quantization": policy.spec, "quantization_layout": layout})


def _recorded_policy(folder: Path, qc: dict) -> QuantPolicy:
    if not isinstance(qc.get("policy"), dict):
        raise ConfigError(f"{folder}/config.json: quantization_config has no policy")
    return QuantPolicy.from_dict(qc["policy"])


def _with_load_options(folder: Path, policy: QuantPolicy, given: QuantPolicy | None) -> QuantPolicy:
    """The recorded policy, with the load-time options `given` names explicitly (all of them for a policy built
    in code, the ones its spec wrote for a parsed one)."""
    if given is None:
        return policy
    named = _RUNTIME_OPTIONS if given.explicit is None else sorted(given.explicit)
    fixed = sorted(set(named) - set(_RUNTIME_OPTIONS))
    if given.name != policy.name or fixed:
        raise ConfigError(f"{folder} is already quantized with policy {policy.spec!r}; load it without quantize, or "
                          f"with quantize='{policy.name}:...' to change only {', '.join(_RUNTIME_OPTIONS)}")
    return replace(policy, **{k: getattr(given, k) for k in named})


class CheckpointSource(SafetensorsSource):
    """A quantized folder: float tensors as in any checkpoint, and each quantized layer's saved tensors, under
    the names its format's `state_names` lists."""

    def __init__(self, folder: Path, model: nn.Module, schemes: dict[str, str], rename) -> None:
        """`schemes`: layer name -> scheme of every layer stored quantized (tinylm.quant.apply.layer_schemes)."""
        self.state_names = {layer: format_class(scheme).state_names for layer, scheme in schemes.items()}
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()
                    if not (name.endswith(".weight") and name.removesuffix(".weight") in self.state_names)}
        optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        super().__init__(folder, expected, optional, rename, extra=self._is_saved_state)

    def _is_saved_state(self, name: str) -> bool:
        layer, _, part = name.rpartition(".")
        return part in self.state_names.get(layer, ())

    def saved(self, layer: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        if layer not in self.state_names:
            return None
        return {n: self.get(f"{layer}.{n}") for n in names if f"{layer}.{n}" in self.found}
