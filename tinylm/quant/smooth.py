"""SmoothQuant for W8A8 (policy option activations=int8): move activation outliers into the weights.

Quantizing a layer's input per token to int8 loses the small features of any token that also has a large one;
in small LLMs a few input features (set by RMSNorm weights, or SwiGLU products) are 10-100x the rest. SmoothQuant
(Xiao et al., 2023) divides each input feature j by s_j and multiplies weight column j by s_j, which leaves the
float product unchanged and balances the two ranges: s_j = max|x_j|^alpha / max|W_j|^(1 - alpha).
max|x_j| comes from one forward pass of the float model over a fixed calibration text (not the quality gate's
text). Layers that read the same input (q/k/v, gate/up) share one s, so they can still be fused into one product.

On the default model, per-token W8A8 without smoothing fails the int8 gate (KL 0.034, perplexity +5.7%); with it,
it passes (BENCHMARKS.md, issue 5). alpha = 0.6 was chosen there among 0.4-0.7: the paper's default 0.5 fell
just under the gate's top-1 limit with bfloat16 activations (0.929), 0.6 passed in bfloat16 and float32.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.model.attention import Attention
from tinylm.model.layers import MLP

ALPHA = 0.6
_TINY = 1e-5  # floor for weight maxima and factors: no division by zero
_UNSEEN = 1e-3  # a feature whose calibration max is below this share of its layer's median was never active


@torch.inference_mode()
def input_maxima(model: nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """max |x_j| over every token of `ids`, per input feature of every nn.Linear of a float model: name -> (K,)."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if x.shape[0]:  # an expert that no token was routed to sees nothing
                seen = x.abs().amax(dim=0).float()
                maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def sibling_groups(model: nn.Module) -> list[list[str]]:
    """Names of linear layers that read the same input: each attention's q/k/v, each SwiGLU's gate/up; every
    other linear layer on its own."""
    grouped, groups = set(), []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            groups.append([f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"])
        elif isinstance(module, MLP) and getattr(module, "gate_up_proj", None) is None:
            groups.append([f"{name}.gate_proj", f"{name}.up_proj"])
        else:
            continue
        grouped.update(groups[-1])
    return groups + [[n] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in grouped]


def input_scales(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """name -> input_scale (K,) = 1 / s for every calibrated linear layer of a float model (siblings share it).
    The tied output head's factor is keyed by the head's name: its weight is the embedding table."""
    scales = {}
    for group in sibling_groups(model):
        if group[0] not in maxima:
            continue  # never ran (an unused expert): left unsmoothed
        weight_max = torch.stack([model.get_submodule(n).weight.detach().abs().amax(dim=0).float() for n in group])
        seen = maxima[group[0]]
        s = seen ** alpha / weight_max.amax(dim=0).clamp(min=_TINY) ** (1 - alpha)
        # a feature calibration never saw active keeps s = 1: a tiny s would blow it up 1/s-fold, and ruin that
        # token's quantization, the day it does show up
        s = torch.where(seen > _UNSEEN * seen.median(), s, torch.ones_like(s))
        for name in group:
            scales[name] = 1 / s.clamp(min=_TINY)
    return scales


def calibrate(model: nn.Module, ids: list[int], alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """The input scales of every linear layer of a float model, from one forward pass over `ids`."""
    return input_scales(model, input_maxima(model, ids), alpha)
