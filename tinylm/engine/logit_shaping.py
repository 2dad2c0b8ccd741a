"""What a sequence's own history does to its next logits before they are sampled, in vLLM's order: logit_bias and
the min_tokens ban on stop tokens, then the repetition / presence / frequency penalties, then the structured-output
grammar's mask (tinylm/engine/structured.py).

The arithmetic is the sampler's (pure functions over (B, V) tensors, tinylm/engine/sampler.py); this module
gathers what each sequence contributes to it (its prompt, the tokens it generated, its parameters).
"""

from __future__ import annotations

import torch

from tinylm.engine import sampler
from tinylm.engine.sequence import Sequence
from tinylm.engine.structured import apply_masks, constraint_masks


def shape_logits(logits: torch.Tensor, seqs: list[Sequence], vocab_size: int, masks=None) -> torch.Tensor:
    """logits (B, V) at each sequence's last token -> the logits its sampling parameters ask to sample from.
    masks: the rows' structured-output masks when they were computed during the forward (prefetch_masks)."""
    params = [seq.params for seq in seqs]
    logits = sampler.apply_logit_bias(logits, params)
    logits = sampler.mask_tokens(logits, [banned_tokens(seq, vocab_size) for seq in seqs])
    if any(p.penalized for p in params):
        logits = sampler.apply_penalties(logits, params, *penalty_state(seqs, logits.shape[-1], logits.device))
    if masks is None:
        masks = constraint_masks([seq.constraint for seq in seqs], vocab_size)
    return apply_masks(logits, masks)


def shapes_logits(seq: Sequence) -> bool:
    """Whether shape_logits changes this sequence's next logits (penalties, logit_bias, the min_tokens ban)."""
    params = seq.params
    return params.penalized or bool(params.logit_bias) or len(seq.output_token_ids) < params.min_tokens


def banned_tokens(seq: Sequence, vocab_size: int) -> set[int]:
    """Token ids the next sample may not be: EOS and stop_token_ids while fewer than min_tokens are out."""
    if len(seq.output_token_ids) >= seq.params.min_tokens:
        return set()
    return {t for t in seq.stop.stop_token_ids if t < vocab_size}


def penalty_state(seqs: list[Sequence], vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) bool: token in the prompt; (B, V) int32: times generated so far."""
    prompt_mask = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(len(seqs), vocab, dtype=torch.int32, device=device)
    for row, seq in enumerate(seqs):
        prompt_mask[row, torch.tensor(seq.prompt_token_ids, device=device)] = True
        if seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, device=device)
            counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
    return prompt_mask, counts
