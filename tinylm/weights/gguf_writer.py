"""Hugging Face folder (or a model's float tensors) -> a GGUF file that llama.cpp and Ollama load: `tinylm convert
FOLDER OUT.gguf --outtype q8_0`.

Written with the gguf package: GGUFWriter for the file and its metadata keys, gguf.quants for the blocks (Q8_0,
Q5_0/Q5_1, Q4_0/Q4_1; the package cannot quantize K-quants, so neither can this). Tensor names and value changes
per architecture are tinylm/weights/gguf_layout.py's, the tokenizer's keys tinylm/weights/gguf_vocab.py's. As
llama.cpp's converter does, vectors (norms, biases), the routers and the DeltaNet conv kernel stay float32, and a
matrix whose rows do not split into whole blocks is written as F16.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import GGMLQuantizationType as QType
from gguf.quants import quantize

from tinylm.config import ModelConfig
from tinylm.errors import ConfigError, WeightsError
from tinylm.weights.gguf_layout import LACKS_OUTPUT_BIAS, export_arch, to_gguf
from tinylm.weights.gguf_vocab import add_tokenizer

# --outtype -> (type of the matrices, general.file_type)
OUTTYPES = {
    "f32": (QType.F32, LlamaFileType.ALL_F32), "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (QType.Q5_0, LlamaFileType.MOSTLY_Q5_0), "q5_1": (QType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0), "q4_1": (QType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
# Matrices kept in float32 whatever the outtype: the routers (small, and a rounding flips expert choices)
_FLOAT32_MATRICES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def convert_hf_to_gguf(source: str | Path, dest: str | Path, outtype: str = "f16") -> Path:
    """A float Hugging Face folder tinylm loads (a `tinylm train` output included) -> the GGUF file `dest`."""
    from tinylm.weights.loader import load_folder

    folder, dest = Path(source), Path(dest)
    _check_outtype(outtype)
    if dest.is_dir():
        raise FileExistsError(f"{dest} is a folder; give the path of the .gguf file to write")
    config_path = folder / "config.json"
    if config_path.is_file() and "quantization_config" in _read_json(config_path):
        raise WeightsError(f"{folder} is a quantized checkpoint; convert the float folder it was made from "
                           "(--outtype picks the GGUF quantization)")
    loaded = load_folder(folder, torch.float32, "cpu")
    tensors = dict(loaded.model.state_dict())
    if loaded.model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    return write_gguf(dest, loaded.model.config, tensors, loaded.tokenizer, outtype, name=folder.name)


def write_gguf(path: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Any,
               outtype: str = "f16", name: str | None = None, arch: str | None = None) -> Path:
    """Write `tensors` (tinylm / Hugging Face names, tied head left out) as GGUF, atomically. `arch`: the llama.cpp
    architecture, the family's own unless given (a MoE model with Qwen2's attention as "qwen2moe")."""
    qtype, file_type = _check_outtype(outtype)
    arch = arch or export_arch(config)
    for caveat in llama_cpp_caveats(arch, config, tensors):
        warnings.warn(caveat, stacklevel=2)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(str(partial), arch)
    try:  # into DEST.partial, renamed when complete: an interrupted export never leaves a truncated DEST
        writer.add_name(name or path.stem)
        add_hparams(writer, arch, config)
        writer.add_file_type(int(file_type))
        if qtype not in (QType.F32, QType.F16, QType.BF16):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        if tokenizer is not None:
            add_tokenizer(writer, tokenizer, config)
        _add_tensors(writer, arch, config, tensors, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return path


def llama_cpp_caveats(arch: str, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What llama.cpp's architecture cannot do as this model does: the file still round-trips in tinylm, but
    llama.cpp refuses it or computes something else (checked against llama-cpp-python 0.3.36)."""
    found = []
    if arch in LACKS_OUTPUT_BIAS and any(n.endswith("o_proj.bias") and t.any() for n, t in tensors.items()):
        found.append(f"llama.cpp's {arch} has no attn_output.bias, and this model's is not zero: llama.cpp will "
                     "refuse the file")
    if arch in ("qwen3moe", "qwen3next") and not config.norm_topk_prob:
        found.append(f"llama.cpp's {arch} renormalizes the chosen experts' weights and this model does not "
                     "(norm_topk_prob=false): llama.cpp's outputs will differ")
    if arch in ("qwen3moe",) and config.rotary_dim != config.head_dim:
        found.append(f"llama.cpp's {arch} rotates the whole head (partial_rotary_factor=1): it will refuse the file")
    if arch == "qwen3next" and config.linear_key_head_dim != config.linear_value_head_dim:
        found.append("llama.cpp's qwen3next assumes equal DeltaNet key and value head dims: it will refuse the file")
    return found


def _check_outtype(outtype: str) -> tuple[QType, LlamaFileType]:
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r} (K-quants: quantize an F16 "
                         "file with llama.cpp's llama-quantize)")
    return OUTTYPES[outtype]


def _add_tensors(writer: GGUFWriter, arch: str, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 qtype: QType) -> None:
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_factors(config))
    for gguf_name, tensor in to_gguf(config, tensors, arch):
        data, raw = encode(gguf_name, tensor.detach().cpu().numpy(), qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)


def encode(gguf_name: str, values: np.ndarray, qtype: QType) -> tuple[np.ndarray, QType | None]:
    """values float32 (torch layout) -> (data, raw_dtype) for GGUFWriter.add_tensor."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim < 2 or gguf_name.endswith(_FLOAT32_MATRICES) or qtype == QType.F32:
        return values, None
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype == QType.F16 or values.shape[-1] % block:  # rows that are not whole blocks: F16, as llama.cpp does
        return values.astype(np.float16), None
    return quantize(values, qtype), qtype


# --- metadata


def add_hparams(writer: GGUFWriter, arch: str, config: ModelConfig) -> None:
    """`{arch}.*` keys, as llama.cpp's loader reads them for the architecture."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_rope_scaling(writer, config)
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == "qwen3next":
        _add_deltanet(writer, config)


def _add_rope_scaling(writer: GGUFWriter, config: ModelConfig) -> None:
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind in ("default", "llama3"):  # llama3: the rope_freqs tensor carries it
        return
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"llama.cpp has no {kind!r} RoPE scaling (GGUF export writes linear, yarn and llama3)")
    writer.add_rope_scaling_type(RopeScalingType.LINEAR if kind == "linear" else RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))


def _add_deltanet(writer: GGUFWriter, config: ModelConfig) -> None:
    """Qwen3-Next's Gated DeltaNet sizes under llama.cpp's ssm.* keys, and its layer plan as an interval."""
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(config.linear_key_head_dim)
    writer.add_ssm_group_count(config.linear_num_key_heads)
    writer.add_ssm_time_step_rank(config.linear_num_value_heads)
    writer.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    writer.add_full_attention_interval(full_attention_interval(config))


def full_attention_interval(config: ModelConfig) -> int:
    """n such that layer i uses softmax attention exactly when (i + 1) % n == 0: the only plan llama.cpp's
    qwen3next reads (a plan of full attention everywhere is n = 1)."""
    kinds = [config.layer_type(i) for i in range(config.num_hidden_layers)]
    for n in range(1, len(kinds) + 2):
        if all((k == "full_attention") == ((i + 1) % n == 0) for i, k in enumerate(kinds)):
            return n
    raise ConfigError("llama.cpp's qwen3next needs a softmax attention layer every n layers; this model's "
                      f"layer_types {kinds} has no such period")


def llama3_factors(config: ModelConfig) -> np.ndarray:
    """Llama-3.1 RoPE scaling as llama.cpp stores it: one factor per rotary frequency (rotary_dim / 2,)."""
    s = config.rope_scaling
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    dim = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blend))
    return factors.astype(np.float32)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}
