"""Batch-invariant inference (issue 21): a token's logits the same bits whatever else is in the batch, however its
prompt was split into chunks, and whether it was decoded or scored in a prefill.

PyTorch's CPU products and attention choose their algorithm by shape: oneDNN / MKL block the K axis differently
for 1, 2 or 16+ rows (bf16 moves to AMX tiles from 64 rows), SDPA splits keys by the number of queries, so the
same token's float32 sums are added in a different order in another batch. `use_batch_invariant(model)` swaps
each float nn.Linear for an InvariantLinear (tinylm::invariant_linear, tinylm/kernels/invariant_gemm.cpp: every
output element one fixed sequence of float32 operations over K) and tells the attention layers to attend through
tinylm::invariant_attention (keys in fixed blocks from each row's first key, the same for a prefill's queries and
a decode's one; tinylm/kernels/invariant_attention.cpp). Everything else the model computes is per row already:
norms reduce each row alone, elementwise ops do not mix rows.

A float32 model whose `weight_dtype` is bfloat16 (GGUF files and 16-bit checkpoints on CPUs without native
bfloat16, tinylm/llm_loading.py) also stores its linear weights in bfloat16 here: the kernels widen them exactly and
compute in float32.

In place and for good, like fused projections: the engine applies it when EngineConfig.batch_invariant is on, and
`llm.forward` then runs the same operations, so a pipeline can recompute bitwise what the engine sampled.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm import kernels
from tinylm.kernels.invariant import invariant_linear
from tinylm.model.block_linear import BlockLinear
from tinylm.model.moe import routes_tokens


class InvariantLinear(nn.Linear):
    """nn.Linear whose every output row is the same bits whatever other rows share the call. float_out (the output
    head): float32 results from bfloat16 inputs, the kernel's sums unrounded. bfloat16 logits keep 8 bits of
    mantissa (steps of 0.125 near 20): the built-in model's first answer token to "What is the capital of France?"
    and a runner-up were one such step apart, and either rounding could flip them."""

    float_out = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias, self.float_out)


def invariant_supported(model: nn.Module) -> tuple[bool, str]:
    """Whether `model` can run batch invariant here; the reason when not."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return False, f"the batch-invariant kernels run on CPU (the model is on {weight.device.type})"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return False, f"the batch-invariant kernels take float32 or bfloat16 (the model is {weight.dtype})"
    if not kernels.available():  # checked last: the first call builds the kernels
        return False, "tinylm's C++ kernels cannot be built here (no C++ compiler)"
    return True, ""


def use_batch_invariant(model: nn.Module) -> int:
    """Make `model` batch invariant in place: float linear layers (nn.Linear and its subclasses GemvLinear) become
    InvariantLinear (same parameters, tied ones stay tied), attention layers attend through the invariant kernel,
    RMSNorm and SwiGLU's product run tinylm's row kernels (tinylm/kernels/invariant_rows.cpp), and rotary reads
    cos / sin from a table computed once. Returns the number of linear layers swapped."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and _plain_float(module):
            module.__class__ = InvariantLinear
            count += 1
        elif hasattr(type(module), "batch_invariant"):  # the modules with an invariant form say so
            module.batch_invariant = True
    if isinstance(model.lm_head, InvariantLinear):
        model.lm_head.float_out = True
    if getattr(model, "weight_dtype", None) == torch.bfloat16 and model.dtype == torch.float32:
        store_compact(model)
    model.rotary.use_table(model.dtype, model.lm_head.weight.device)
    model.batch_invariant = True
    return count


def store_compact(model: nn.Module) -> None:
    """Store every float32 InvariantLinear's weight in bfloat16 while the model computes in float32 (the kernel widens
    it exactly: each product is bitwise the float32 product with the weight rounded to bfloat16 once). A GGUF file's
    Q4_0-Q8_0 and Q4_K-Q6_K layers are BlockLinear already, on the file's own blocks (placed by the loader,
    tinylm/model/block_linear.py: exact, ~0.75-1.25 bytes a weight): a batch-1 step of the default model reads 111 MB
    instead of 540 (270 in bfloat16). A tied embedding and head stay one weight (the embedding widens the bfloat16
    rows it looks up, CausalLM.hidden_states). Biases stay float32, and so do MoE routers and shared-expert gates
    (routes_tokens)."""
    for name, module in model.named_modules():
        if isinstance(module, InvariantLinear) and module.weight.dtype == torch.float32 and not routes_tokens(name):
            module.weight.data = module.weight.data.to(torch.bfloat16)


def weight_storage(model: nn.Module) -> str | None:
    """How store_compact stored this float32 model's linear weights, in words ("GGUF blocks", "bfloat16 weights",
    both joined by " + "), or None when they are in the compute dtype."""
    kinds = []
    if any(isinstance(m, BlockLinear) for m in model.modules()):
        kinds.append("GGUF blocks")
    if model.dtype == torch.float32 and any(isinstance(m, InvariantLinear) and m.weight.dtype == torch.bfloat16
                                           for m in model.modules()):
        kinds.append("bfloat16 weights")
    return " + ".join(kinds) or None


def _plain_float(layer: nn.Linear) -> bool:
    """An nn.Linear (or tinylm's GemvLinear) holding a float weight: quantized layers keep their own products."""
    from tinylm.model.gemv import GemvLinear  # noqa: PLC0415

    return type(layer) in (nn.Linear, GemvLinear, InvariantLinear) and layer.weight.dtype.is_floating_point
