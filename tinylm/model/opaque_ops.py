"""Eager PyTorch code as opaque ops, for compiled batch-invariant decode (issue 21).

Batch invariance also asks that a token decoded by the compiled step gets the bits the eager prefill scores it
with. The products, norms, SwiGLU and attention are tinylm's own kernels, the same call eagerly and compiled.
What remains in the mixture-of-experts block (the router's softmax, its top-k renormalization, the shared expert's
sigmoid gate), in the attention's sigmoid output gate and in Gated DeltaNet's token mixing (softplus, exp, L2
norms, the recurrence, the gated norm) are element-wise and reduction ops Inductor would write its own loops for:
other exp / sigmoid code and other summation orders than ATen's, so other bits. Wrapped here as custom ops,
Inductor calls them as they are: the compiled step runs the very code the eager prefill runs.

Each op is a plain function first (what the eager forward calls) and a registered op second (what a compiled
forward calls: `torch.ops.tinylm.<name>`), so both paths share one body by construction. The sigmoid gate is here;
the experts' sum (`tinylm::invariant_experts`, tinylm/model/moe.py) and DeltaNet's mixing
(`tinylm::deltanet_mix`, tinylm/model/deltanet.py) sit beside the code they wrap.

Without gradients (inference: the engine, `llm.forward` for scoring) all three run as C++ kernels instead, the same
call eagerly and compiled (tinylm/kernels/deltanet_mix.cpp, invariant_experts.cpp, invariant_rows.cpp): one call
where the Python bodies cost 10-500 us each at batch 1. The Python forms stay for forwards that need gradients.
"""

from __future__ import annotations

import torch

from tinylm.kernels.invariant import kernels_take


def sigmoid_gate(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(gate), both (..., D) in the model's dtype (the attention's output gate, the MoE shared expert's
    gate with D broadcast from 1)."""
    return x * torch.sigmoid(gate)


@torch.library.custom_op("tinylm::sigmoid_gate", mutates_args=())
def _sigmoid_gate_op(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigmoid_gate(gate, x)


@_sigmoid_gate_op.register_fake
def _(gate, x):
    return torch.empty(torch.broadcast_shapes(gate.shape, x.shape), dtype=x.dtype, device=x.device)


def gate_by_sigmoid(gate: torch.Tensor, x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """x * sigmoid(gate): batch invariant and without gradients tinylm::invariant_sigmoid_gate (the same steps in
    C++, tinylm/kernels/invariant_rows.cpp: one call where the Python op costs ~10 us), else inside a compiled
    batch-invariant forward as the opaque op, else the plain function. gate (..., D) or (..., 1), x (..., D)."""
    if invariant and kernels_take(x, gate):
        rows = torch.ops.tinylm.invariant_sigmoid_gate(gate.reshape(-1, gate.shape[-1]), x.reshape(-1, x.shape[-1]))
        return rows.view(x.shape)
    if invariant and torch.compiler.is_compiling():
        return torch.ops.tinylm.sigmoid_gate(gate, x)
    return sigmoid_gate(gate, x)
