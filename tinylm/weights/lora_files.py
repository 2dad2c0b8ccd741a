"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), read for a given model: which of
its Linear modules the adapter changes and their (A, B) matrices. Training (tinylm/train/lora.py) and serving
(tinylm/engine/lora.py) both read adapters through here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tinylm.errors import WeightsError
from tinylm.model.block_linear import BlockLinear
from tinylm.weights import name_maps

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterFile:
    r: int
    alpha: float
    dropout: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def peft_key(model_type: str, module: str, part: str) -> str:
    """The tensor name PEFT stores for `module`'s lora_A / lora_B."""
    stored = name_maps.to_checkpoint_name(model_type, f"{module}.weight").removesuffix(".weight")
    return f"base_model.model.{stored}.{part}.weight"


def read_adapter(folder: str | Path, model: nn.Module) -> AdapterFile:
    """The adapter in `folder`, matched against `model`'s Linear modules; WeightsError (one line) when it is not a
    plain LoRA adapter for this model."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder}: not a readable LoRA adapter ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or config.get("use_rslora") \
            or config.get("use_dora"):
        raise WeightsError(f"{folder}: only plain LoRA adapters are supported")
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{folder}: adapter_config.json needs integer r and numeric lora_alpha") from None
    model_type = model.config.model_type
    # A Linear already wrapped by an adapter layer (training's or serving's) is its `base_layer`
    linears = {n.removesuffix(".base_layer"): m for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, BlockLinear))}  # float layers, or on a GGUF file's blocks
    by_key = {peft_key(model_type, n, "lora_A"): n for n in linears}
    names = sorted({by_key.get(k.replace(".lora_B.", ".lora_A.")) for k in tensors} - {None})
    if r < 1 or len(names) * 2 != len(tensors):
        raise WeightsError(f"{folder}: adapter tensors do not match this model's modules")
    weights = {}
    for name in names:
        a, b = tensors[peft_key(model_type, name, "lora_A")], tensors[peft_key(model_type, name, "lora_B")]
        base = linears[name]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise WeightsError(f"{folder}: {name}'s adapter has shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                               f"the model needs ({r}, {base.in_features}) / ({base.out_features}, {r})")
        weights[name] = (a, b)
    return AdapterFile(r, alpha, float(config.get("lora_dropout", 0.0)), weights)
