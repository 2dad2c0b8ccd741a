"""Each family's checkpoint tensor names <-> tinylm's module names (which are the Hugging Face ones).

Families that transformers knows store the module names as they are; only the others need a map here.
"""

from __future__ import annotations

import re

# QED-75M (its modeling_qed.py): module names at the top level, optionally under `model.`.
_QED_TO_MODULE = [
    (r"^(?:model\.)?embed_tokens\.", "model.embed_tokens."),
    (r"^(?:model\.)?layers\.(\d+)\.input_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^(?:model\.)?layers\.(\d+)\.attention\.", r"model.layers.\1.self_attn."),
    (r"^(?:model\.)?layers\.(\d+)\.post_attn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^(?:model\.)?layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^(?:model\.)?norm\.", "model.norm."),
    (r"^(?:model\.)?lm_head\.", "lm_head."),
]
_QED_TO_CHECKPOINT = [
    (r"^model\.embed_tokens\.", "embed_tokens."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.input_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attention."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.post_attn_norm."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^model\.norm\.", "norm."),
]
_TO_MODULE = {"qed": _QED_TO_MODULE}
# Tensors a family's checkpoints carry that the model does not run: Qwen3-Next's multi-token-prediction head
# (`mtp.*`), which transformers also skips (Qwen3NextPreTrainedModel._keys_to_ignore_on_load_unexpected).
_UNUSED = {"qwen3_next": re.compile(r"^mtp\.")}
_TO_CHECKPOINT = {"qed": _QED_TO_CHECKPOINT}
# Precomputed rotary tables some checkpoints carry as buffers; tinylm recomputes them.
_COMPUTED_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|inv_freq|cos_cached|sin_cached)$")


def is_computed_buffer(name: str) -> bool:
    return bool(_COMPUTED_BUFFERS.search(name))


def to_module_name(model_type: str, name: str) -> str | None:
    """A checkpoint tensor name -> the tinylm module name (unchanged for families transformers knows);
    None for a tensor the model does not use."""
    unused = _UNUSED.get(model_type)
    if unused is not None and unused.search(name):
        return None
    return _apply(_TO_MODULE.get(model_type, []), name)


def to_checkpoint_name(model_type: str, name: str) -> str:
    """A tinylm module name -> the family's own checkpoint name, for export."""
    return _apply(_TO_CHECKPOINT.get(model_type, []), name)


def _apply(rules: list[tuple[str, str]], name: str) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name
