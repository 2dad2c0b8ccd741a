"""LoRA applied from the outside: targeted nn.Linear modules are swapped for a LoRALinear that wraps them.

The wrapper keeps PEFT's structure (`base_layer`, `lora_A`, `lora_B`, scaling = alpha / r, dropout on the input of A,
A initialized as PEFT's kaiming-uniform and B at zero), so adapters save in PEFT's layout
(`base_model.model.<module>.lora_A.weight`, peft/utils/save_and_load.py) and load with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tinylm.errors import WeightsError
from tinylm.weights.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_key, read_adapter



class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft LoraLayer.reset_lora_parameters
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in): what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def targeted(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list: the module name equals a target or ends with `.target`; "all-linear" is every
    Linear except the output head."""
    if "all-linear" in targets:
        return name != "lm_head"
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str],
               seed: int = 0) -> list[str]:
    """Freeze `model` and wrap each targeted Linear; return the wrapped module names (raises if none matched)."""
    for param in model.parameters():
        param.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and targeted(n, targets)]
    if not names:
        raise WeightsError(f"lora.target_modules {targets} match no Linear module of this model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, LoRALinear(getattr(owner, leaf), r, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's forward (DPO's reference under LoRA, as PEFT's disable_adapter)."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged into its base weight (the model is not changed)."""
    state = {}
    for key, tensor in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    for name, module in lora_modules(model).items():
        weight = module.base_layer.weight
        state[f"{name}.weight"] = (weight.float() + module.delta_weight()).to(weight.dtype).detach()
    return state


class MergedView:
    """What export_hf_folder needs from a model (config, state_dict) with the adapters merged in."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self._model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self._model)


def save_adapter(model: nn.Module, folder: Path, r: int, alpha: float, dropout: float,
                 base_model: str | None) -> None:
    """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes them."""
    modules = lora_modules(model)
    model_type = model.config.model_type
    tensors = {}
    for name, module in modules.items():
        tensors[peft_key(model_type, name, "lora_A")] = module.lora_A.weight.detach().contiguous()
        tensors[peft_key(model_type, name, "lora_B")] = module.lora_B.weight.detach().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    leaves = sorted({name.rpartition(".")[2] for name in modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": leaves, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, folder: Path, trainable: bool = False) -> list[str]:
    """Apply a PEFT LoRA adapter folder to a tinylm model (wrapping the modules it names); return their names."""
    adapter = read_adapter(folder, model)
    names = sorted(adapter.weights)
    apply_lora(model, adapter.r, adapter.alpha, adapter.dropout, names)
    for name, module in lora_modules(model).items():
        a, b = adapter.weights[name]
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
        module.lora_A.weight.requires_grad_(trainable)
        module.lora_B.weight.requires_grad_(trainable)
    return names
