"""The one decoder: embeddings, a stack of blocks (mixer + FFN chosen per layer from the config), norm, LM head.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`) so weights load as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelConfig
from tinylm.errors import ContextLengthError
from tinylm.model.attention import Attention
from tinylm.model.deltanet import GatedDeltaNet
from tinylm.model.layers import MLP, RMSNorm
from tinylm.model.moe import SparseMoE
from tinylm.model.rotary import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V), or (B, k, V) with logits_to_keep=k
    loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    """Token mixer (softmax attention or Gated DeltaNet, per `config.layer_types`) + FFN (SwiGLU or MoE)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        norm_args = (config.hidden_size, config.rms_norm_eps, config.zero_centered_norm)
        self.input_layernorm = RMSNorm(*norm_args)
        self.is_linear = config.layer_type(layer_idx) == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(*norm_args)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x, cos, sin, mask, cache=None, pad_mask=None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, S) for attention; pad_mask (B, T) or None for DeltaNet -> (B, T, C)."""
        h = self.input_layernorm(x)
        if self.is_linear:
            x = x + self.linear_attn(h, pad_mask, cache)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.zero_centered_norm)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.rotary = RotaryEmbedding(config)
        self.activation_checkpointing = False  # training option (train.activation_checkpointing): less memory
        # bfloat16: float linear weights stored in bfloat16 once the batch-invariant kernels run them (a float32
        # model on a CPU without native bfloat16: half the bytes a decode step reads; tinylm/model/invariant.py)
        self.weight_dtype: torch.dtype | None = None
        self.tie_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (the final norm's): linear weights may be stored narrower, as
        bfloat16 weights of a float32 model (tinylm/model/invariant.py), or quantized."""
        return self.model.norm.weight.dtype

    def tie_weights(self) -> None:
        """The head's weight is the embedding's (a tied pair on GGUF blocks is tied by construction: place_blocks)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache=None, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids (B, T). attention_mask (B, past+T) with 1 for real tokens, 0 for padding (HF convention).

        Positions default to the count of real tokens before each one, so left- and right-padded rows give the
        same logits at real tokens as unpadded input.
        """
        x = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C) that lm_head maps to logits (training's chunked loss reads
        them and lm_head's weight, never the (B, T, V) logits)."""
        past = cache.length if cache is not None else 0
        batch, seq = input_ids.shape
        self._check_length(past + seq)
        packed = packed_segments(position_ids) if position_ids is not None and cache is None else None
        if position_ids is None:
            position_ids = _default_positions(attention_mask, past, seq, input_ids.device)
        x = self.model.embed_tokens(input_ids).to(self.dtype)  # (B, T, C): rows of a bfloat16 table widened
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = build_attention_mask(attention_mask, past, seq, x.device)
        if packed is not None:  # several sequences packed in a row: each attends only to itself
            same = packed[:, None, :, None] == packed[:, None, None, :]  # (B, 1, T, T)
            mask = same & (_causal(seq, x.device) if mask is None else mask)
        pad_mask = new_token_mask(attention_mask, seq, cache) if self.config.has_linear_layers else None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        # by index, not `for layer in layers`: iterating a ModuleList makes Dynamo guard on its dict's key order, a
        # guard a saved compiled step cannot load without the model itself (tinylm/engine/saved_steps.py)
        for index in range(len(self.model.layers)):
            layer = self.model.layers[index]
            if recompute:  # keep only each layer's input; its activations are recomputed in the backward
                x = checkpoint(layer, x, cos, sin, mask, None, pad_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, pad_mask)
        if cache is not None:
            cache.advance(seq)
        return self.model.norm(x)

    def _check_length(self, total: int) -> None:
        limit = self.config.max_position_embeddings
        if total > limit:
            raise ContextLengthError(
                f"sequence of {total} tokens exceeds the model's context of {limit} tokens"
            )


def _default_positions(attention_mask: torch.Tensor | None, past: int, seq: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1  # (B, past+T): index among the row's real tokens
    return positions.clamp(min=0)[:, -seq:]


def build_attention_mask(attention_mask: torch.Tensor | None, past: int, seq: int, device) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, past+T): causal AND key is a real token. None when plain causal suffices.

    Every query may always see itself, so a padding query never has an all-masked row (which gives NaN in SDPA
    and, through its K/V, could poison nothing else but would still trip NaN checks).
    """
    if attention_mask is None:
        if past == 0 or seq == 1:
            return None  # SDPA's is_causal (prefill) or no mask at all (one new token sees every key)
        attention_mask = torch.ones(1, past + seq, dtype=torch.bool, device=device)
    total = past + seq
    if attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {total}")
    query_pos = torch.arange(past, total, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    causal = key_pos <= query_pos  # (T, S)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    mask = mask | (key_pos == query_pos)[None]
    return mask[:, None]


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) index of the packed sequence each token belongs to, or None when every row is one sequence.

    As transformers' find_packed_sequence_indices: a sequence starts wherever a position is not the previous one
    plus 1 (SFT packing restarts positions at 0 for each example, tinylm/train/chat.py). Unlike transformers, the
    segments also apply next to a padding mask (right padding: the trainer's packed batches carry both)."""
    if position_ids.shape[-1] < 2:
        return None
    starts = torch.diff(position_ids, dim=-1) != 1  # (B, T - 1): token t + 1 starts a sequence
    if not bool(starts.any()):
        return None
    return torch.cat([torch.zeros_like(position_ids[..., :1]), starts.long().cumsum(-1)], dim=-1)


def _causal(seq: int, device) -> torch.Tensor:
    """(1, 1, T, T) bool: key at or before the query."""
    positions = torch.arange(seq, device=device)
    return (positions[None, :] <= positions[:, None])[None, None]


def new_token_mask(attention_mask: torch.Tensor | None, seq: int, cache) -> torch.Tensor | None:
    """The (B, T) real-token mask of the new tokens for DeltaNet inputs, or None when nothing is padding.

    A paged cache says so itself (`cache.new_tokens`): there a row may continue its context while its chunk is
    left-padded, and the key mask then marks the padding queries' key positions as real (they hold the row's
    earlier tokens). With a contiguous cache every row spans past + T positions, so the mask's last T columns
    are the new tokens'."""
    known = getattr(cache, "new_tokens", None)
    if known is not None:
        return known
    return padding_mask(attention_mask, seq)


def padding_mask(attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
    """The (B, T) mask of the new tokens for DeltaNet inputs, or None when nothing is padding.

    As transformers' create_recurrent_attention_mask: a 1-token step is never padding, an all-ones mask is none.
    """
    if attention_mask is None or seq == 1:
        return None
    current = attention_mask[:, -seq:]
    return None if bool(current.all()) else current


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face convention: predict labels[t+1] from position t; -100 ignored; mean over counted tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
