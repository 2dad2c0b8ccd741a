"""What a run is built from: the model and tokenizer, the reference model (DPO), the optimizer and the schedule."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.model.transformer import CausalLM
from tinylm.train.config import OptimSection, TrainConfig, TrainConfigError


def load_tokenizer(spec: str | None, model_path: str | None):
    from tinylm.tiny import build_tokenizer
    from tinylm.tokenizer import Tokenizer

    if spec == "tiny":
        return build_tokenizer()
    folder = spec or model_path
    if folder is None:
        raise TrainConfigError("config: model.tokenizer is required for a new model (a folder, or \"tiny\")")
    if not (Path(folder) / "tokenizer.json").is_file():
        raise TrainConfigError(f"config: model.tokenizer: {folder} has no tokenizer.json")
    return Tokenizer.from_folder(folder)


def new_model_config(config: TrainConfig) -> ModelConfig:
    from tinylm.tiny import FAMILIES

    section = config.model
    if section.family is not None and section.family not in FAMILIES:
        raise TrainConfigError(f"config: model.family {section.family!r} is not one of {', '.join(FAMILIES)}")
    data = {**FAMILIES.get(section.family, {}), **section.config}
    try:
        return ModelConfig.from_hf_dict(data)
    except ConfigError as exc:
        raise TrainConfigError(f"config: model.config: {exc}") from None


def build_model(config: TrainConfig, device: torch.device) -> tuple[CausalLM, object]:
    """(model in float32 on `device`, tokenizer): loaded from model.path, or new from model.family/config."""
    section = config.model
    if section.path is not None:
        from tinylm.loading import load_model

        loaded = load_model(Path(section.path), dtype="float32", device=str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
        if section.tokenizer is not None or tokenizer is None:
            tokenizer = load_tokenizer(section.tokenizer, section.path)
    else:
        from tinylm.tiny import init_weights

        model = CausalLM(new_model_config(config))
        init_weights(model, section.init_seed, std=section.init_std)
        model.to(device)
        tokenizer = load_tokenizer(section.tokenizer, None)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainConfigError(f"config: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                               f"is {model.config.vocab_size}")
    for param in model.parameters():
        param.requires_grad_(True)
    return model.train(), tokenizer


def load_reference(config: TrainConfig, device: torch.device) -> CausalLM | None:
    """DPO's frozen reference: dpo.reference, else model.path; None under LoRA (the adapter-disabled model)."""
    path = config.dpo.reference or (None if config.lora else config.model.path)
    if path is None:
        return None
    from tinylm.loading import load_model

    reference = load_model(Path(path), dtype="float32", device=str(device)).model
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference.eval()


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from tinylm.cli_args import resolve_dtype  # "auto" there: bf16 where the CPU computes it natively (avx512_bf16/amx)

    # oneDNN runs bf16 products on AVX512_BF16 / AMX units only when torch dispatches its AVX-512 kernels
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    return "bf16" if vector and resolve_dtype("auto", "cpu") == "bfloat16" else "fp32"


def autocast(precision: str, device: torch.device):
    """bf16 autocast over fp32 master weights (matmuls in bf16, reductions and the loss in fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(model: nn.Module, optim: OptimSection) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over trainable parameters: matrices decay, vectors (norms, biases) do not. Returns the parameter
    names in the optimizer's order (saved with its state)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    rest = [(n, p) for n, p in named if p.dim() < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": optim.weight_decay},
              {"params": [p for _, p in rest], "weight_decay": 0.0}]
    # fused: one pass over each parameter's weight, gradient and moments instead of one per elementwise op; on a
    # CPU the step's optimizer part is memory-bound (transformers' Trainer also defaults to it from torch 2.8)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                  eps=optim.eps, fused=fused or None)
    return optimizer, [n for n, _ in decay + rest]


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Linear warmup over warmup_steps (step 0 already at lr/warmup), then cosine/linear decay to min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    if optim.schedule == "linear":
        return optim.min_lr + (optim.lr - optim.min_lr) * (1 - progress)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
