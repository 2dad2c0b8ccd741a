"""Qwen3-Next (the TinyStories Qwen3-Gated-MoE hybrid, `model_type: qwen3_next`): the hybrid's config.json keys <-> ModelConfig fields.

A config whose `layer_types` holds `linear_attention` is read as this hybrid whatever its `architectures` or
`model_type` says (the TinyStories Qwen3-Gated-MoE card names Qwen3MoeForCausalLM). Missing keys take transformers' Qwen3NextConfig
defaults, so tinylm builds the model transformers would build from the same file:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/configuration_qwen3_next.py
"""

from __future__ import annotations

from typing import Any

from tinylm.errors import ConfigError

MODEL_TYPE = "qwen3_next"
LAYER_TYPES = ("full_attention", "linear_attention")
# Qwen3NextConfig's defaults for the keys a hybrid needs (partial_rotary_factor is set apart: it may live in
# rope_parameters / rope_scaling).
_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 5632,
    "head_dim": 256,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10,
    "num_experts": 512,
    "norm_topk_prob": True,
    "max_position_embeddings": 32768,
}
_DEFAULT_PARTIAL_ROTARY = 0.25
# Most layers any config may claim (real models have under 200): the layer plan below is a list of this length, so
# it is bounded before it is built. ModelConfig applies the same bound to every config.
MAX_LAYERS = 4096
_LINEAR_SIZES = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                 "linear_num_value_heads")


def is_hybrid(data: dict[str, Any]) -> bool:
    layer_types = data.get("layer_types")
    return data.get("model_type") == MODEL_TYPE or (
        isinstance(layer_types, list) and "linear_attention" in layer_types
    )


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The config dict as Qwen3NextConfig reads it: model_type normalized, missing keys at their defaults."""
    data = {**_DEFAULTS, **{k: v for k, v in data.items() if v is not None}, "model_type": MODEL_TYPE}
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if "partial_rotary_factor" not in data and not (isinstance(rope, dict) and "partial_rotary_factor" in rope):
        data["partial_rotary_factor"] = _DEFAULT_PARTIAL_ROTARY
    if not data.get("layer_types"):
        # Older Qwen3-Next configs give the period of full-attention layers instead of the list.
        layers = data.get("num_hidden_layers")
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers <= MAX_LAYERS:
            raise ConfigError(f"num_hidden_layers must be an integer in 1..{MAX_LAYERS}, got {str(layers)[:60]}")
        interval = data.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"full_attention_interval must be a positive integer, got {interval!r}")
        data["layer_types"] = ["linear_attention" if (i + 1) % interval else "full_attention"
                               for i in range(layers)]
    return data


def hybrid_flags(data: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields for the hybrid's mechanisms (on top of the Qwen3-MoE ones)."""
    flags = {name: data[name] for name in _LINEAR_SIZES}
    flags.update(
        layer_types=list(data["layer_types"]),
        shared_expert_intermediate_size=data["shared_expert_intermediate_size"],
        attn_output_gate=True,  # Qwen3NextAttention: q_proj yields query and a sigmoid gate
        zero_centered_norm=True,  # Qwen3NextRMSNorm: weights stored as w, applied as (1 + w)
        qk_norm=True,
    )
    return flags


def hybrid_to_hf(config) -> dict[str, Any]:
    """The qwen3_next-only keys of config.json; refuses flags transformers' Qwen3-Next cannot express."""
    wrong = [name for name in ("attn_output_gate", "zero_centered_norm", "qk_norm") if not getattr(config, name)]
    if wrong:
        raise ConfigError(f"a qwen3_next config must set {', '.join(wrong)}")
    data = {name: getattr(config, name) for name in _LINEAR_SIZES}
    data.update(
        layer_types=list(config.layer_types) or ["full_attention"] * config.num_hidden_layers,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        # Always written: Qwen3NextConfig's default is 0.25, not 1.0.
        partial_rotary_factor=config.partial_rotary_factor,
    )
    return data


def check_layers(config) -> None:
    """Raise ConfigError, naming the field, for a layer plan or DeltaNet sizes the model cannot be built from."""
    types = config.layer_types
    if not types:
        return
    if len(types) != config.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(types)} entries but num_hidden_layers={config.num_hidden_layers}")
    unknown = sorted({t for t in types if t not in LAYER_TYPES})
    if unknown:
        raise ConfigError(f"layer_types holds unsupported {unknown}; supported: {', '.join(LAYER_TYPES)}")
    if "linear_attention" in types:
        for name in _LINEAR_SIZES:
            value = getattr(config, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer for linear_attention layers, got {value!r}")
        if config.linear_num_value_heads % config.linear_num_key_heads:
            raise ConfigError(f"linear_num_value_heads={config.linear_num_value_heads} is not a multiple of "
                              f"linear_num_key_heads={config.linear_num_key_heads}")
    size = config.shared_expert_intermediate_size
    if not isinstance(size, int) or size < 0:
        raise ConfigError(f"shared_expert_intermediate_size must be a non-negative integer, got {size!r}")
