"""Write a model as a Hugging Face folder: config.json, model.safetensors, tokenizer files,
generation_config.json, and a SHA256SUMS manifest over all of them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinylm.weights import name_maps, safetensors_io


def export_hf_folder(model, folder: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Save `model` (a tinylm CausalLM) so that transformers and tinylm both load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
             for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is stored once, as the hub checkpoints do
    state = {name_maps.to_checkpoint_name(config.model_type, name): t for name, t in state.items()}
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    return write_folder(folder, config, hf_config, state, tokenizer)


def write_folder(folder: Path, config, hf_config: dict, state: dict, tokenizer=None) -> Path:
    """Write a Hugging Face folder: config.json (`hf_config`), generation_config.json (from `config`), the
    tokenizer's files when there is one, then `state` as safetensors and the manifest over every file. Float
    export and both quantized layouts (tinylm's and compressed-tensors) write through it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder)
    safetensors_io.save_checkpoint(folder, state)  # writes the manifest last, over every file above
    return folder


def generation_config(config) -> dict:
    eos = config.eos_token_id
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
    }
