"""ModelConfig: one dataclass for every family, built from config.json (transformers 4.x or 5.x) or GGUF metadata.

Differences between families are explicit flags (attention_bias, qk_norm, num_experts, ...), never name checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm import config_next
from tinylm.config_qed import QED_KEYS, qed_fields, qed_to_hf
from tinylm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "qed")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)

# Keys each RoPE scaling type needs, as transformers' modeling_rope_utils reads them.
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    # RoPE: base, scaling (normalized: {"rope_type": ..., factor, ...} or None) and the rotated fraction of head_dim.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    # Attention flags: biases on q/k/v (Qwen2) and on o (Llama/Qwen3 `attention_bias` covers all four).
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False  # QED: the output head has a bias even when its weight is tied to the embedding
    # Sparse MoE (Qwen3-MoE): 0 experts means every layer is a dense SwiGLU MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # > 0: a shared SwiGLU expert behind a sigmoid gate (Qwen3-Next)
    # Hybrid stacks (Qwen3-Next): each layer's token mixer, "full_attention" (softmax) or "linear_attention"
    # (Gated DeltaNet); empty means softmax attention everywhere.
    layer_types: list[str] = field(default_factory=list)
    attn_output_gate: bool = False  # q_proj also yields a per-channel gate: out * sigmoid(gate) before o_proj
    zero_centered_norm: bool = False  # RMSNorm weights stored as w and applied as (1 + w)
    # Gated DeltaNet sizes (linear_attention layers only).
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    # Token ids and the dtype the checkpoint was saved in (informational).
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)  # an int or list is accepted and normalized
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        self.eos_token_id = _as_id_list(self.eos_token_id)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture model_type={self.model_type!r}; tinylm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self._check_sizes()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (only {SUPPORTED_ACTIVATIONS})")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives an odd or empty rotary dim")
        self._check_rope_scaling()
        self._check_moe()
        config_next.check_layers(self)

    def _check_sizes(self) -> None:
        """Every size an integer within _SIZE_LIMITS: the weights are checked against these sizes later
        (tinylm.weights.fit), but a value such as num_hidden_layers=10**9 must never get as far as sizing a list."""
        for name in _SIZE_LIMITS:
            check_size(name, getattr(self, name))

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object, got {_short(self.rope_scaling)}")
        rope_type = self.rope_scaling.get("rope_type")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        missing = [k for k in _ROPE_REQUIRED[rope_type] if self.rope_scaling.get(k) is None]
        if missing:
            raise ConfigError(f"RoPE scaling {rope_type!r} needs {', '.join(missing)}")
        for key in _ROPE_NUMBERS:
            value = self.rope_scaling.get(key)
            if value is not None and not _positive_number(value):
                raise ConfigError(f"rope_scaling {key} must be a positive finite number, got {_short(value)}")

    def _check_moe(self) -> None:
        if not self.num_experts:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )
        if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
            raise ConfigError("a MoE config needs moe_intermediate_size > 0 and decoder_sparse_step > 0")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} are outside 0..{self.num_hidden_layers - 1}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, layer_idx: int) -> str:
        """The token mixer of layer `layer_idx`: "full_attention" or "linear_attention"."""
        return self.layer_types[layer_idx] if self.layer_types else "full_attention"

    @property
    def has_linear_layers(self) -> bool:
        return "linear_attention" in self.layer_types

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE rule: sparse unless listed in mlp_only_layers, every `decoder_sparse_step`-th layer."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a JSON object")
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Normalize a transformers config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        if config_next.is_hybrid(data):
            data = config_next.with_defaults(data)
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture model_type={model_type!r} (architectures={data.get('architectures')}); "
                f"tinylm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            fields = qed_fields(data) if model_type == "qed" else _hf_fields(data, model_type)
            for name in _SIZE_LIMITS.keys() & fields.keys():  # checked here to name the file's own key
                check_size(name, fields[name], config_keys(model_type).get(name))
            return cls(**fields)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise ConfigError(f"config.json for {model_type} is missing or has a bad field: "
                              f"{type(exc).__name__}: {_short(str(exc), 200)}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 4.x and 5.x both load (rope_theta + rope_scaling, the hub format).

        QED has no transformers class: its config.json uses QED's own keys."""
        if self.model_type == "qed":
            return qed_to_hf(self)
        data = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id or None,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype or "float32",
        }
        if self.partial_rotary_factor != 1.0:
            data["partial_rotary_factor"] = self.partial_rotary_factor
        data.update(_family_flags_to_hf(self))
        return data

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Bounds no model tinylm runs comes near (the largest real values are around a tenth of these or less); they stop a
# corrupt or mistyped config from sizing lists and tables before its weights are read. (low, high) inclusive.
_SIZE_LIMITS = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (0, 1 << 20),
    "num_hidden_layers": (1, config_next.MAX_LAYERS), "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12), "head_dim": (1, 1 << 14),
    "max_position_embeddings": (1, 1 << 24),  # Llama 4 Scout's 10M context fits
    "num_experts": (0, 1 << 14), "num_experts_per_tok": (0, 1 << 14), "moe_intermediate_size": (0, 1 << 20),
    "decoder_sparse_step": (0, config_next.MAX_LAYERS), "shared_expert_intermediate_size": (0, 1 << 20),
    "linear_conv_kernel_dim": (0, 1 << 10), "linear_key_head_dim": (0, 1 << 14), "linear_value_head_dim": (0, 1 << 14),
    "linear_num_key_heads": (0, 1 << 12), "linear_num_value_heads": (0, 1 << 12),
}
# rope_scaling values that are sizes or factors: a string or NaN here would fail deep inside the rotary maths.
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "attention_factor", "beta_fast", "beta_slow")


def check_size(field: str, value: Any, key: str | None = None) -> None:
    """Raise ConfigError, naming `key` (the file's name for `field`) and the value, unless it is in bounds."""
    low, high = _SIZE_LIMITS[field]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key or field} must be an integer in {low}..{high}, got {_short(value)}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def config_keys(model_type: str) -> dict[str, str]:
    """ModelConfig field -> the key a family's config.json calls it, for error messages (QED has its own keys)."""
    return QED_KEYS if model_type == "qed" else {}


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}


def _hf_fields(data: dict[str, Any], model_type: str) -> dict[str, Any]:
    heads = data["num_attention_heads"]
    rope_theta, rope_scaling, partial = _normalize_rope(data)
    fields = {
        "model_type": model_type,
        "vocab_size": data["vocab_size"],
        "hidden_size": data["hidden_size"],
        "intermediate_size": data["intermediate_size"],
        "num_hidden_layers": data["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": data.get("num_key_value_heads") or heads,
        "head_dim": data.get("head_dim") or data["hidden_size"] // heads,
        "max_position_embeddings": data.get("max_position_embeddings", 2048),
        "rms_norm_eps": data.get("rms_norm_eps", 1e-6),
        "hidden_act": data.get("hidden_act", "silu"),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "partial_rotary_factor": partial,
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", False)),
        "bos_token_id": data.get("bos_token_id"),
        "eos_token_id": data.get("eos_token_id"),
        "pad_token_id": data.get("pad_token_id"),
        "torch_dtype": data.get("torch_dtype") or data.get("dtype"),
    }
    fields.update(_family_flags_from_hf(data, model_type))
    return fields


def _family_flags_from_hf(data: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The per-family meaning of transformers' flags, from each family's modeling file."""
    bias = bool(data.get("attention_bias", False))
    if model_type == "qwen2":
        # modeling_qwen2: q/k/v always carry a bias, o_proj never does.
        flags = {"qkv_bias": True, "o_bias": False}
    else:
        flags = {"qkv_bias": bias, "o_bias": bias}
    flags["mlp_bias"] = bool(data.get("mlp_bias", False))
    flags["qk_norm"] = model_type in ("qwen3", "qwen3_moe", "qwen3_next")
    if model_type == "qwen2" and data.get("use_sliding_window"):
        raise ConfigError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    if model_type in ("qwen3_moe", "qwen3_next"):
        flags.update(
            num_experts=data.get("num_experts") or data.get("num_local_experts") or 0,
            num_experts_per_tok=data.get("num_experts_per_tok", 0),
            moe_intermediate_size=data.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(data.get("norm_topk_prob", False)),
            decoder_sparse_step=data.get("decoder_sparse_step", 1),
            mlp_only_layers=list(data.get("mlp_only_layers") or []),
        )
    if model_type == "qwen3_next":
        flags.update(config_next.hybrid_flags(data))
    return flags


def _family_flags_to_hf(config: ModelConfig) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if config.model_type == "qwen2":
        if config.o_bias or not config.qkv_bias:
            raise ConfigError("a qwen2 config must have q/k/v biases and no o_proj bias")
        data["use_sliding_window"] = False
    else:
        if config.qkv_bias != config.o_bias:
            raise ConfigError(f"{config.model_type} has one attention_bias flag for q/k/v/o")
        data["attention_bias"] = config.qkv_bias
    if config.model_type == "llama":
        data["mlp_bias"] = config.mlp_bias
    if config.model_type in ("qwen3_moe", "qwen3_next"):
        data.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=config.mlp_only_layers,
        )
    if config.model_type == "qwen3_next":
        data.update(config_next.hybrid_to_hf(config))
    return data


def _normalize_rope(data: dict[str, Any]) -> tuple[float, dict | None, float]:
    """Return (rope_theta, rope_scaling or None, partial_rotary_factor) from either config format."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported for this architecture")
    scaling = dict(params or data.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or data.get("rope_theta") or 10000.0
    partial = scaling.pop("partial_rotary_factor", None) or data.get("partial_rotary_factor") or 1.0
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return float(theta), None, float(partial)
    if rope_type in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", data.get("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **scaling}, float(partial)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
