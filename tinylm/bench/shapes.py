"""Named model shapes for `tinylm bench --shape NAME`: random weights in the dimensions of a real model, written
as a Hugging Face folder that tinylm and transformers both load. Speed depends on the shapes, not on the values."""

from __future__ import annotations

from pathlib import Path

import torch

from tinylm.config import ModelConfig

# SmolLM2-135M-Instruct, the built-in default model (its GGUF's metadata): 30 layers, d 576, 9 heads / 3 KV heads
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# TinyLlama 1.1B: 22 layers, d 2048, 32 heads (GQA 4 KV heads), SwiGLU 5632, vocab 32000, context 2048
TINYLLAMA_1_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
# The TinyStories Qwen3-Gated-MoE hybrid (Qwen3-Next family), as tests/model/test_qwen3_next.py builds it for parity: hidden 128, 6 layers
# alternating Gated DeltaNet / gated attention, 8 heads, 1 KV head, head_dim 32, 2 experts top-1 + shared expert,
# YaRN; the linear-attention heads are transformers' defaults scaled down. Only its context (256) is short.
QWEN3_NEXT_SEED_002 = dict(
    model_type="qwen3_next", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
    attention_bias=True, layer_types=["linear_attention", "full_attention"] * 3, num_experts=2,
    num_experts_per_tok=1, moe_intermediate_size=256, shared_expert_intermediate_size=128, decoder_sparse_step=1,
    norm_topk_prob=True, partial_rotary_factor=0.25, tie_word_embeddings=True, linear_num_key_heads=4,
    linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
    rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
    eos_token_id=2, pad_token_id=0)
# The "~100M" Qwen3-MoE of the former benchmarks/moe_decode.py (81M parameters, 25M active per token): hidden 512,
# 8 layers, 8 heads (2 K/V heads, head_dim 64), 8 experts of 768, top-2, untied head over the tiny tokenizer's 512
QWEN3_MOE_81M = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=512, intermediate_size=128, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=768, norm_topk_prob=True, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)

SHAPES: dict[str, dict] = {"smollm2-135m": SMOLLM2_135M, "tinyllama-1.1b": TINYLLAMA_1_1B,
                           "qwen3-next": QWEN3_NEXT_SEED_002, "moe": QWEN3_MOE_81M}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig.from_hf_dict(SHAPES[name])


def build_shape(name: str, folder: Path) -> Path:
    """folder/NAME: the shape with seeded random weights in bfloat16 and tinylm's tiny tokenizer (prompts are token
    ids, so the tokenizer does not matter). A complete folder from an earlier run is reused: TinyLlama's takes a
    minute and 2.2 GB to write."""
    from tinylm.model.transformer import CausalLM
    from tinylm.tiny import build_tokenizer, init_weights
    from tinylm.weights.export import export_hf_folder

    target = folder / name
    if (target / "SHA256SUMS").exists():  # export_hf_folder writes the manifest last: the folder is complete
        return target
    model = CausalLM(shape_config(name)).to(torch.bfloat16)  # halves the peak while the weights are drawn
    init_weights(model, seed=0)
    return export_hf_folder(model, target, tokenizer=build_tokenizer())
