"""`tinylm tiny ARCH OUT`: a tiny random checkpoint of any family, with a small working tokenizer.

For testing RL and inference pipelines without real weights (seeds 000 and 002): the folder holds config.json,
model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json with a ChatML template, and
transformers loads it for every family it knows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from tinylm.config import ModelConfig
from tinylm.model.transformer import CausalLM
from tinylm.tokenizer import Tokenizer
from tinylm.weights.export import export_hf_folder

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 512
_CORPUS = (
    "Once upon a time there was a little robot who loved to read. Every day it read a new story about the sea, "
    "the stars and the forest. The user asked: what is the capital of France? The assistant said: Paris. "
    "def add(a, b):\n    return a + b\nNumbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. Caf\u00e9, na\u00efve, \u6771\u4eac, \U0001F600."
)

_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
             bos_token_id=None, eos_token_id=2, pad_token_id=0)
FAMILIES: dict[str, dict] = {
    "llama": dict(_BASE, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(_BASE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, tie_word_embeddings=False),
    # The TinyStories Qwen3-Gated-MoE hybrid, shrunk: DeltaNet and gated attention alternate, top-1 MoE with a shared expert, YaRN.
    "qwen3_next": dict(_BASE, model_type="qwen3_next", num_hidden_layers=4, num_key_value_heads=1, head_dim=32,
                       layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
                       shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
                       attention_bias=True, partial_rotary_factor=0.25, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 128}),
    "qed": dict(model_type="qed", vocab_size=VOCAB_SIZE, d_model=64, n_layers=2, n_heads=4, ffn_hidden_dim=128,
                max_seq_len=512, rope_theta=10000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=True,
                eos_token_id=2, pad_token_id=0),
}


# Qwen2's pre-tokenization (its tokenizer.json's, and the one transformers 5's Qwen2Tokenizer builds): words, single
# digits, punctuation runs, newlines, spaces
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_tokenizer(arch: str = "llama") -> Tokenizer:
    """A byte-level BPE (like Qwen2/SmolLM2) trained on a short built-in text: ids 0..2 are the special tokens.

    For qwen2 it pre-tokenizes as Qwen2 does (NFC, then QWEN2_SPLIT): transformers 5 loads every qwen2 checkpoint's
    tokenizer through Qwen2Tokenizer, which imposes that pipeline whatever tokenizer.json says, so a tiny qwen2
    with GPT-2's pre-tokenizer would tokenize differently there (digits, spaces; `tinylm verify` reports it)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if arch == "qwen2":
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return Tokenizer(backend, chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     unk_token=None, extra_eos_token_ids=[0])


def init_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Deterministic init in transformers' style: normal(0, std) matrices, zero biases, norms at their identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("A_log"):  # DeltaNet decay rates: log of uniform(1, 16), as the reference inits them
                param.copy_(torch.empty(param.shape).uniform_(1, 16, generator=generator).log())
            elif name.endswith("dt_bias"):
                param.fill_(1.0)
            elif param.dim() == 1 and leaf == "weight" and "norm" in name:
                param.copy_(_norm_identity(model, name, param))
            elif leaf == "bias":
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _norm_identity(model: CausalLM, name: str, param: torch.Tensor) -> torch.Tensor:
    """The weight that makes a norm the plain RMSNorm: 0 for zero-centred (1 + w) norms, else 1."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return torch.zeros_like(param) if getattr(module, "zero_centered", False) else torch.ones_like(param)


def make_tiny(arch: str, out: str | Path, seed: int = 0) -> Path:
    if arch not in FAMILIES:
        raise ValueError(f"unknown family {arch!r}; choose one of {', '.join(FAMILIES)}")
    config = ModelConfig.from_hf_dict(FAMILIES[arch])
    model = CausalLM(config)
    init_weights(model, seed)
    if not all(math.isfinite(p.abs().max().item()) for p in model.parameters()):
        raise RuntimeError(f"tiny {arch}: non-finite initial weights")
    return export_hf_folder(model, out, tokenizer=build_tokenizer(arch))
