"""LoRA adapters for serving tests: PEFT folders written by tinylm's trainer code, and their merged models."""

from __future__ import annotations

from pathlib import Path

import torch

import tinylm
from tinylm.train.lora import MergedView, apply_lora, lora_modules, save_adapter
from tinylm.weights.export import export_hf_folder


def make_adapter(base: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """A random rank-4 adapter of q/v/down projections (B not zero, so it changes the outputs) in PEFT's layout,
    and the folder of the base model with it merged. Returns (adapter folder, merged folder)."""
    llm = tinylm.load(base)
    apply_lora(llm.model, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for module in lora_modules(llm.model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.5, generator=generator)
    save_adapter(llm.model, out, 4, 8, 0.0, str(base))
    merged = out.with_name(out.name + "-merged")
    export_hf_folder(MergedView(llm.model), merged, tokenizer=llm.tokenizer)
    return out, merged
