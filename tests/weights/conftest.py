"""Tiny GGUF files written with the gguf package (all tensor types; K-quant blocks random with finite scales), for
the tests/weights/test_gguf*.py files: `from tests.weights.conftest import write_tiny`."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

HIDDEN, HEADS, KV_HEADS, INTER = 512, 4, 2, 768  # in_features: multiples of 256 (K-quant blocks); head_dim
# 128, the default transformers assumes for a qwen3 GGUF (its loader ignores attention.key_length)
HEAD_DIM = HIDDEN // HEADS
# K-quants: the package cannot quantize them, so blocks are random bytes with their f16 scales made finite.
# Block bytes and the offsets of the f16 scale fields (gguf/quants.py dequantize_blocks layouts).
K_BLOCKS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16)


def encode_tensor(values: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, Q | None]:
    """values (out, in) float32 -> (data for GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == Q.F32:
        return values, None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(values, qtype), qtype
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (values.shape[0], values.shape[1] // block, block_bytes), dtype=np.uint8)
    for offset in K_BLOCKS.get(qtype, (0, ()))[1]:
        scales = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(values.shape[0], -1), qtype


def decode_tensor(data: np.ndarray, raw: Q | None) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # random IQ4_NL blocks may hold NaN scales
        return np.asarray(data, np.float32) if raw is None else gguf.quants.dequantize(data, raw)


def tiny_tensors(arch: str, layers: int = 1, vocab: int = 260) -> dict[str, tuple[int, ...]]:
    """GGUF names -> numpy shapes (out, in) of a tiny model of `arch`."""
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(layers):
        shapes.update({f"blk.{i}.{k}": v for k, v in {
            "attn_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,), "attn_q.weight": (q, HIDDEN),
            "attn_k.weight": (kv, HIDDEN), "attn_v.weight": (kv, HIDDEN), "attn_output.weight": (HIDDEN, q),
            "ffn_gate.weight": (INTER, HIDDEN), "ffn_up.weight": (INTER, HIDDEN), "ffn_down.weight": (HIDDEN, INTER),
        }.items()})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)})
        if arch == "qwen3":
            shapes.update({f"blk.{i}.attn_q_norm.weight": (HEAD_DIM,), f"blk.{i}.attn_k_norm.weight": (HEAD_DIM,)})
    return shapes


def write_tiny(path, arch="llama", qtype=Q.F32, drop=(), extra=None, meta=None, values=None, seed=0, vocab=None,
               qtypes=None):
    """Write a tiny GGUF; return {gguf name: float32 values as the file decodes them}. `qtype`: the 2-D tensors'
    type, but those named in `qtypes` ({gguf name: type}, as llama.cpp's mixes: Q4_K_M's Q6_K attn_v / ffn_down).

    `vocab`: tokenizer.* metadata as {GGUFWriter method name without "add_": value}, e.g. {"token_list": [...]}.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in (vocab or {}).items():
        getattr(writer, f"add_{method}")(value)
    rows = len(vocab["token_list"]) if vocab else 260
    hparams = {"block_count": 1, "context_length": 128, "embedding_length": HIDDEN, "feed_forward_length": INTER,
               "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.dimension_count": HEAD_DIM}
    for key, value in hparams.items():
        writer.add_uint32(f"{arch}.{key}", value)
    if arch != "llama":  # llama files leave it out: the size then comes from token_embd's rows
        writer.add_uint32(f"{arch}.vocab_size", rows)
    if arch == "qwen3":  # as llama.cpp writes a Qwen3 head_dim (transformers ignores it and assumes 128)
        writer.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for key, value in (meta or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(f"{arch}.{key}", value)
    decoded = {}
    for name, shape in {**tiny_tensors(arch, vocab=rows), **(extra or {})}.items():
        if name in drop:
            continue
        full = (values or {}).get(name, rng.standard_normal(shape).astype(np.float32))
        data, raw = encode_tensor(full, (qtypes or {}).get(name, qtype) if len(shape) == 2 else Q.F32, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
        decoded[name] = decode_tensor(data, raw).reshape(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded
