"""How a step runs fast without changing what it computes: compiled decoder layers, activation checkpointing, host
memory kept for reuse (host_memory.py).

Compilation is regional (torch.compile per decoder layer, the recipe PyTorch recommends for repeated blocks): every
layer has the same code, so one graph (forward and its backward, through AOTAutograd) serves them all, and compiling
takes seconds rather than the minutes a whole 22- or 32-layer model takes. The embedding, the final norm and the
chunked loss stay eager. A graph that fails to compile runs eagerly instead (torch._dynamo's suppress_errors) and the
run says so once.
"""

from __future__ import annotations

import logging

from torch import nn

from tinylm.train.host_memory import keep_freed_memory

log = logging.getLogger("tinylm.train")


def apply_speed_options(model: nn.Module, compile_layers: bool, activation_checkpointing: bool) -> list[str]:
    """Set the options on `model` (a tinylm CausalLM) in place; -> notes for the run log."""
    notes = []
    if keep_freed_memory():
        notes.append("glibc malloc keeps freed memory for the next step (no mmap per large block; "
                     "TINYLM_SYSTEM_MALLOC=1 leaves its defaults)")
    model.activation_checkpointing = activation_checkpointing
    if compile_layers:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that cannot compile falls back to eager
        for layer in model.model.layers:
            layer.compile(dynamic=None)  # dynamic shapes only after a second length is seen (SFT batches vary)
        notes.append(f"compiled {len(model.model.layers)} decoder layers with torch.compile "
                     f"(the first steps include compilation)")
    return notes

