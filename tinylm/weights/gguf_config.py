"""A GGUF file's metadata -> tinylm's ModelConfig: the `{arch}.*` keys of llama, qwen2, qwen3, qwen2moe, qwen3moe and
qwen3next files (sizes checked against ModelConfig's bounds, naming the GGUF key), the features its tensors show
(biases, q/k norms, a separate head), mixture-of-experts and Gated DeltaNet sizes, and RoPE scaling (linear, yarn,
and Llama 3.1's rope_freqs factors). Every malformed value becomes a one-line ConfigError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from tinylm.config import ModelConfig, check_size
from tinylm.errors import ConfigError
from tinylm.weights import gguf_layout as layout
from tinylm.weights.fit import Stored, check_config_fits
from tinylm.weights.gguf_reader import torch_shape, wrap_errors

ARCHITECTURES = tuple(layout.FAMILY_OF_ARCH)
ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 RoPE factors: read into config.rope_scaling, not a weight


def config_from_metadata(reader: GGUFReader, meta: dict, path: Path, dtype: str | None) -> ModelConfig:
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ConfigError(f"{path.name}: GGUF architecture {arch_name!r} is not supported "
                          f"(tinylm reads {', '.join(ARCHITECTURES)})")
    shapes = {t.name: torch_shape(t) for t in reader.tensors}
    hp = _Hparams(meta, arch_name, path)
    heads, hidden = hp.size("attention.head_count"), hp.size("embedding_length")
    head_dim = hp.size("attention.key_length", hidden // heads)
    rotary_dim, theta = hp.size("rope.dimension_count", head_dim), float(hp.get("rope.freq_base", 10000.0))
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    eos = [_opt_int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot", "eom")]
    layers = hp.size("block_count")
    family = _family_fields(hp, arch_name, layers, shapes)
    config = ModelConfig(
        model_type=layout.FAMILY_OF_ARCH[arch_name],
        vocab_size=hp.size("vocab_size", shapes.get("token_embd.weight", (0,))[0]),
        hidden_size=hidden, intermediate_size=hp.size("feed_forward_length", 0 if family else None),
        num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=hp.size("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=hp.size("context_length"),
        rms_norm_eps=_decimal(hp.get("attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=theta,
        partial_rotary_factor=rotary_dim / head_dim, rope_scaling=_rope_scaling(hp, freqs, theta, rotary_dim, path),
        **_flags_from_tensors(set(shapes)), **family,
        bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=list(dict.fromkeys(i for i in eos if i is not None)),  # eos, then end-of-turn / end-of-message
        pad_token_id=_opt_int(meta.get("tokenizer.ggml.padding_token_id")), torch_dtype=dtype,
    )
    # Before anything is sized by it (expected_shapes builds every layer and expert): a flipped byte of
    # block_count or expert_count must not size a meta model.
    stored = {name: Stored(*entry) for name, entry in layout.stored_shapes(arch_name, shapes).items()}
    check_config_fits(config, stored, path.name, {f: f"{arch_name}.{k}" for f, k in _SIZE_KEYS.items()})
    return config


def _flags_from_tensors(names: set[str]) -> dict[str, bool]:
    """Features the weights show: biases, q/k norms, a separate output head (principle: detect from tensors)."""
    def has(suffix: str) -> bool:
        return any(n.endswith(suffix) for n in names)
    return {"qkv_bias": has(".attn_q.bias"), "o_bias": has(".attn_output.bias"), "mlp_bias": has(".ffn_up.bias"),
            "qk_norm": has(".attn_q_norm.weight"), "tie_word_embeddings": "output.weight" not in names}


def _family_fields(hp: _Hparams, arch: str, layers: int, shapes: dict) -> dict[str, Any]:
    """The mixture-of-experts and Gated DeltaNet fields of qwen2moe / qwen3moe / qwen3next files ({} otherwise)."""
    if not hp.get("expert_count"):
        return {}
    shared = shapes.get("blk.0.ffn_up_shexp.weight", (0,))[0]  # older qwen2moe files lack the length key
    fields = {"num_experts": hp.size("expert_count"), "num_experts_per_tok": hp.size("expert_used_count"),
              "moe_intermediate_size": hp.size("expert_feed_forward_length"),
              "shared_expert_intermediate_size": hp.size("expert_shared_feed_forward_length", shared),
              # llama.cpp renormalizes the top-k weights for qwen3moe / qwen3next (build_moe_ffn norm_w), not qwen2moe
              "norm_topk_prob": arch != "qwen2moe"}
    if arch == "qwen3next":
        fields.update(_deltanet_fields(hp, layers))
    return fields


def _deltanet_fields(hp: _Hparams, layers: int) -> dict[str, Any]:
    """llama.cpp's ssm.* keys -> the Gated DeltaNet sizes; its layer plan: softmax attention every n-th layer."""
    interval = hp.int("full_attention_interval", 4)
    if not 0 < interval <= layers:
        raise ConfigError(f"{hp.path.name}: GGUF metadata {hp.arch}.full_attention_interval={interval} is not in "
                          f"1..{layers}")
    value_heads, inner = hp.size("ssm.time_step_rank"), hp.int("ssm.inner_size")
    if inner <= 0 or inner % value_heads:
        raise ConfigError(f"{hp.path.name}: GGUF metadata {hp.arch}.ssm.inner_size={inner} is not a multiple of "
                          f"{hp.arch}.ssm.time_step_rank={value_heads}")
    return {"layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
            "linear_conv_kernel_dim": hp.size("ssm.conv_kernel"), "linear_key_head_dim": hp.size("ssm.state_size"),
            "linear_num_key_heads": hp.size("ssm.group_count"), "linear_num_value_heads": value_heads,
            "linear_value_head_dim": inner // value_heads, "attn_output_gate": True, "zero_centered_norm": True}


# ModelConfig field -> the `{arch}.` key it is read from, for messages and bounds.
_SIZE_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
              "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
              "max_position_embeddings": "context_length", "num_experts": "expert_count",
              "num_experts_per_tok": "expert_used_count", "moe_intermediate_size": "expert_feed_forward_length",
              "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
              "linear_conv_kernel_dim": "ssm.conv_kernel", "linear_key_head_dim": "ssm.state_size",
              "linear_num_key_heads": "ssm.group_count", "linear_num_value_heads": "ssm.time_step_rank"}
_FIELDS = {key: field for field, key in _SIZE_KEYS.items()} | {"rope.dimension_count": "head_dim"}


class _Hparams:
    """`{arch}.key` lookups with one-line errors for missing or mistyped values."""

    def __init__(self, meta: dict, arch: str, path: Path):
        self.meta, self.arch, self.path = meta, arch, path

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value (some converters write head counts so)
        if value is None:
            raise ConfigError(f"{self.path.name}: GGUF metadata lacks {self.arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path.name}: GGUF metadata {self.arch}.{key}={value!r} is not an integer")
        return value

    def size(self, key: str, default: int | None = None) -> int:
        """An integer that sizes the model, within ModelConfig's bounds (checked here to name the GGUF key)."""
        value = self.int(key, default)
        try:
            check_size(_FIELDS[key], value, f"{self.arch}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{self.path.name}: GGUF metadata {exc}") from None
        return value


def _rope_scaling(hp: _Hparams, freqs, theta: float, rotary_dim: int, path: Path) -> dict | None:
    """`{arch}.rope.scaling.*` (linear, yarn) or a rope_freqs tensor (llama3) -> HF rope_scaling."""
    if freqs is not None:
        values = wrap_errors(path, f"tensor {ROPE_FREQS!r}", dequantize, freqs.data, freqs.tensor_type)
        return _llama3_scaling(np.asarray(values, np.float64).ravel(), theta, rotary_dim, path)
    kind = hp.get("rope.scaling.type", "none")
    factor = hp.get("rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        optional = {"original_max_position_embeddings": "rope.scaling.original_context_length",
                    "attention_factor": "rope.scaling.yarn_attn_factor", "beta_fast": "rope.scaling.yarn_beta_fast",
                    "beta_slow": "rope.scaling.yarn_beta_slow"}
        scaling.update({k: hp.get(key) for k, key in optional.items() if hp.get(key) is not None})
        return scaling
    raise ConfigError(f"{path.name}: GGUF RoPE scaling type {kind!r} is not supported (linear, yarn, llama3)")


def _llama3_scaling(freqs: np.ndarray, theta: float, rotary_dim: int, path: Path) -> dict:
    """Recover Llama-3.1 `rope_scaling` from the per-frequency factors llama.cpp stores instead.

    convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) writes factor 1 for short wavelengths, `factor` for
    long ones and a smooth blend between, with original_max_position_embeddings read as 8192. Every Llama 3.x uses
    low_freq_factor=1, high_freq_factor=4; we check the factors match that rule exactly rather than guess.
    """
    if freqs.shape != ((rotary_dim + 1) // 2,):  # before np.arange below is sized by the metadata's rotary_dim
        raise ConfigError(f"{path.name}: {ROPE_FREQS} holds {freqs.size} RoPE factors, the rotary dim "
                          f"{rotary_dim} needs {(rotary_dim + 1) // 2}")
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    wavelen, old_ctx = 2 * math.pi / inv_freq, 8192
    smooth = (old_ctx / wavelen - 1.0) / (4.0 - 1.0)
    blend = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    expect = np.where(wavelen < old_ctx / 4.0, 1.0, np.where(wavelen > old_ctx / 1.0, scaling["factor"], blend))
    if freqs.shape != expect.shape or not np.allclose(freqs, expect, rtol=1e-4):
        raise ConfigError(f"{path.name}: {ROPE_FREQS} holds RoPE factors that do not follow Llama-3 scaling")
    return scaling


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07):
    the value config.json had."""
    return float(str(np.float32(value)))


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
