"""Tiny, fast checkpoints for the malformed-file tests: a safetensors folder of any tinylm.tiny family (no tokenizer,
no manifest, so a changed byte reaches the header and weight checks) and a small GGUF with a byte-level BPE
vocabulary and F32 / F16 / Q8_0 tensors. Both load in a few milliseconds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.tiny import FAMILIES, init_weights
from tinylm.weights import safetensors_io
from tinylm.weights.export import export_hf_folder

# GGUF dims: small, and in_features multiples of 32 (Q8_0 blocks)
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TOKENS = ["<|endoftext|>"] + list(LETTERS) + [a + b for a, b in zip(LETTERS[::2], LETTERS[1::2])]
MERGES = [f"{a} {b}" for a, b in zip(LETTERS[::2], LETTERS[1::2])]
VOCAB = 64  # embedding rows; more than the tokenizer's 40 tokens, as real files often have


def tiny_folder(folder: Path, family: str = "llama", **config_changes) -> Path:
    """A safetensors folder (config.json + model.safetensors) of a tiny random `family` model."""
    config = ModelConfig.from_hf_dict({**FAMILIES[family], **config_changes})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = CausalLM(config)
    init_weights(model, seed=0)
    export_hf_folder(model, folder)
    (folder / safetensors_io.MANIFEST_NAME).unlink()
    return folder


def header(path: Path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def rewrite_header(path: Path, raw: bytes | dict) -> None:
    """Replace the safetensors header of `path` by `raw` (JSON bytes, or a dict to dump), keeping the data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(raw).encode() if isinstance(raw, dict) else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def gguf_tensors() -> dict[str, tuple[tuple[int, ...], Q]]:
    """GGUF name -> (numpy shape (out, in), type) of the tiny llama."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": ((VOCAB, HIDDEN), Q.F32), "output_norm.weight": ((HIDDEN,), Q.F32),
               "output.weight": ((VOCAB, HIDDEN), Q.F16)}
    for i in range(LAYERS):
        tensors.update({f"blk.{i}.{name}": spec for name, spec in {
            "attn_norm.weight": ((HIDDEN,), Q.F32), "ffn_norm.weight": ((HIDDEN,), Q.F32),
            "attn_q.weight": ((q, HIDDEN), Q.Q8_0), "attn_k.weight": ((kv, HIDDEN), Q.Q8_0),
            "attn_v.weight": ((kv, HIDDEN), Q.Q8_0), "attn_output.weight": ((HIDDEN, q), Q.Q8_0),
            "ffn_gate.weight": ((INTER, HIDDEN), Q.F16), "ffn_up.weight": ((INTER, HIDDEN), Q.F16),
            "ffn_down.weight": ((HIDDEN, INTER), Q.F16),
        }.items()})
    return tensors


def tiny_gguf(path: Path, values: dict[str, np.ndarray] | None = None, extra_kv=None) -> Path:
    """A tiny llama GGUF with a byte-level BPE tokenizer. `values`: GGUF name -> float32 values to store instead of
    random ones; `extra_kv(writer)` adds metadata."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": LAYERS, "context_length": 128, "embedding_length": HIDDEN,
                       "feed_forward_length": INTER, "attention.head_count": HEADS,
                       "attention.head_count_kv": KV_HEADS, "rope.dimension_count": HEAD_DIM}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3] + [1] * (len(TOKENS) - 1))
    writer.add_eos_token_id(0)
    if extra_kv is not None:
        extra_kv(writer)
    for name, (shape, qtype) in gguf_tensors().items():
        full = (values or {}).get(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
        if qtype == Q.F32:
            writer.add_tensor(name, full)
        elif qtype == Q.F16:
            writer.add_tensor(name, full.astype(np.float16))
        else:
            with np.errstate(invalid="ignore"):  # NaN values (the finiteness tests) do not cast to int8 cleanly
                writer.add_tensor(name, gguf.quants.quantize(full, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def kv_value_offset(path: Path, key: str) -> int:
    """Byte offset of the value of metadata `key` (for an array: of its item type, then its u64 length)."""
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key.encode()) + 4  # key length, key, value type


def tensor_info_offsets(path: Path, index: int) -> dict[str, int]:
    """Byte offsets of the fields of tensor info `index`: n_dims, dims (u64 each), type, offset."""
    tensor = gguf.GGUFReader(path).tensors[index]
    n_dims = tensor.field.offset + 8 + len(tensor.name.encode())
    dims = n_dims + 4
    type_ = dims + 8 * len(tensor.shape)
    return {"n_dims": n_dims, "dims": dims, "type": type_, "offset": type_ + 4}


def patch(path: Path, offset: int, value: int, size: int) -> Path:
    """Write `value` as a little-endian integer of `size` bytes at `offset`."""
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = value.to_bytes(size, "little")
    path.write_bytes(bytes(data))
    return path
