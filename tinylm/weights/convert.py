"""GGUF file -> Hugging Face folder that transformers and tinylm both load.

The folder holds config.json, generation_config.json, tokenizer.json + tokenizer_config.json (with the chat template),
model.safetensors with the dequantized weights, and a SHA256SUMS manifest over all of them, written last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinylm.weights import safetensors_io
from tinylm.weights.export import generation_config
from tinylm.weights.gguf import load_gguf

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files a conversion writes; anything else already in DEST stops it (a stale shard would be loaded beside ours).
_OUTPUTS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "model.safetensors", safetensors_io.MANIFEST_NAME}


def convert_gguf_to_hf(source: str | Path, dest: str | Path, dtype: str = "float32") -> Path:
    """Dequantize `source` into the Hugging Face folder `dest` (created if needed); return `dest`."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    dest = Path(dest)
    _check_dest(dest)
    model = load_gguf(source, dtype=_DTYPES[dtype])
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", {**model.config.to_hf_dict(), "torch_dtype": dtype})
    _write_json(dest / "generation_config.json", generation_config(model.config))
    if model.tokenizer is not None:
        model.tokenizer.save(dest)
    # model.safetensors last: save_checkpoint refreshes the manifest over every file in the folder
    safetensors_io.save_checkpoint(dest, model.tensors, metadata={"source": Path(source).name})
    return dest


def _check_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    others = sorted(p.name for p in dest.iterdir() if p.name not in _OUTPUTS) if dest.is_dir() else []
    if others:
        raise FileExistsError(f"{dest} already holds other files ({', '.join(others[:3])}); convert into an empty "
                              "or new folder")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
