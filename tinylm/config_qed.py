"""QED (QED-75M, `model_type: qed`): its own config.json keys <-> ModelConfig fields.

QED-75M's modeling_qed.py is remote code with no transformers class; its config uses n_layers, d_model, n_heads,
ffn_hidden_dim, max_seq_len and one `bias` flag for every internal linear layer. The head always has a bias.
"""

from __future__ import annotations

from typing import Any


# ModelConfig field -> QED's config.json key, so that errors name the key the file has.
QED_KEYS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads", "num_key_value_heads": "n_heads", "intermediate_size": "ffn_hidden_dim",
            "max_position_embeddings": "max_seq_len"}


def qed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a QED config.json. KeyError names a missing required key."""
    heads = data["n_heads"]
    bias = bool(data.get("bias", False))
    return {
        "model_type": "qed",
        "vocab_size": data["vocab_size"],
        "hidden_size": data["d_model"],
        "intermediate_size": data["ffn_hidden_dim"],
        "num_hidden_layers": data["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # no GQA in QED
        "head_dim": data["d_model"] // heads,
        "max_position_embeddings": data.get("max_seq_len", 8192),
        "rms_norm_eps": data.get("rms_norm_eps", 1e-5),
        "rope_theta": float(data.get("rope_theta", 10000.0)),
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bias,
        "tie_word_embeddings": bool(data.get("tie_word_embeddings", True)),
        "lm_head_bias": True,
        "bos_token_id": data.get("bos_token_id"),
        "eos_token_id": data.get("eos_token_id"),  # ModelConfig normalizes an int or list
        "pad_token_id": data.get("pad_token_id"),
        "torch_dtype": data.get("torch_dtype") or data.get("dtype"),
    }


def qed_to_hf(config) -> dict[str, Any]:
    """A QED config.json (the keys QED's own code reads) for a ModelConfig of model_type qed."""
    eos = config.eos_token_id
    return {
        "architectures": ["QEDForCausalLM"],
        "model_type": "qed",
        "vocab_size": config.vocab_size,
        "d_model": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "ffn_hidden_dim": config.intermediate_size,
        "max_seq_len": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "dropout": 0.0,
        "bias": config.qkv_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.torch_dtype or "float32",
    }

