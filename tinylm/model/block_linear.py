"""Linear layers on GGUF blocks kept as the file stores them (Q4_0 / Q4_1 / Q4_K / Q5_0 / Q5_1 / Q5_K / Q6_K / Q8_0,
which tinylm/weights/gguf_blocks.py puts in the forms below), computing exactly the float32 model.

A GGUF model's float32 weights are its blocks dequantized by gguf-py, in float32: w = d * q + m for Q4_1, d * (q - 8)
for Q4_0, d * q for Q8_0; the K-quants' sub-block scales d * sc and mins dmin * m are exact products, so they are
the same forms. BlockLinear keeps the blocks and widens them to those same float32 values inside the product
(tinylm::invariant_blocks_linear, tinylm/kernels/invariant_blocks.cpp), so its output is bitwise the batch-invariant
float32 product on the dequantized weight (InvariantLinear), while a decode step reads ~0.75 byte a weight (4 bits
with float32 scales and mins) or ~1.1-1.25 (8 bits) instead of 4, or 2 as bfloat16. Nothing is rounded: the model
is the file's, not a bfloat16 approximation of it.

Parts of one layer (BlockWeight), all rows (N) first:
  bits 4: codes (N, K / 2) uint8, per 32-column block 16 bytes, byte j = q_j (low nibble) | q_j+16 (high nibble);
          scales, mins (N, K / 32) float32, w = scales * q + mins (Q4_0: mins = -8 scales, exact).
  bits 8: codes (N, K) int8, scales (N, K / 32) float32, w = scales * q; with mins (N, K / 32), w = scales * q +
          mins (Q5_1, Q5_K); or scales (N, K / 16), one per 16 columns, w = scales * q rounded once (Q6_K).
Inference only, like fused projections: the loader builds the layers in the model before any weight is loaded
(place_blocks, from the parts tinylm/weights/gguf_blocks.py reads), so a block layer's float32 weight is never
built, and they are never saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm import kernels
from tinylm.errors import ConfigError
from tinylm.model.fuse import concat_biases
from tinylm.model.moe import is_routed_expert, routes_tokens

BLOCK = 32  # columns a block


def unpack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (..., K / 2) uint8, per 32 columns 16 bytes with q_j low and q_j+16 high -> (..., K) uint8."""
    nibbles = codes.reshape(*codes.shape[:-1], -1, BLOCK // 2)  # (..., G, 16)
    return torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).flatten(-2)


@dataclass
class BlockWeight:
    """One weight's blocks (see the module docstring for the layout)."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.bits == 4 else 1)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (N, K), or its rows `rows` (any shape of ids) -> (*rows.shape, K): the values the
        kernel widens to (d * q is exact where a min is added, so mul-then-add and fma agree)."""
        codes, scales, mins = self.codes, self.scales, self.mins
        if rows is not None:
            codes, scales = codes[rows], scales[rows]
            mins = None if mins is None else mins[rows]
        q = unpack_4bit(codes) if self.bits == 4 else codes  # (..., K) in column order
        q = q.reshape(*q.shape[:-1], scales.shape[-1], -1).float()  # (..., G, 32), or (..., 2G, 16) for Q6_K
        values = q * scales[..., None] if mins is None else q * scales[..., None] + mins[..., None]
        return values.flatten(-2)


class BlockLinear(nn.Module):
    """x (..., K) float32 -> (..., N) float32 over a BlockWeight, bitwise InvariantLinear on the dequantized weight.
    Other dtypes, devices or autograd take F.linear on the dequantized weight (correct, not batch invariant)."""

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bits = weight.bits
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("mins", weight.mins)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def blocks(self) -> BlockWeight:
        return BlockWeight(self.bits, self.codes, self.scales, self.mins)

    @property
    def form(self) -> tuple[int, bool, int]:
        """(bits, with mins, scales a row): layers of one form can be joined (concat_rows)."""
        return self.bits, self.mins is not None, self.scales.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """A 0-element float32 stand-in on the layer's device: code that reads `lm_head.weight.dtype` / `.device`
        keeps working. The weight itself: `blocks.dequantize()`."""
        return torch.empty(0, dtype=torch.float32, device=self.codes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_takes(x):
            rows = x.reshape(-1, self.in_features)  # (M, K)
            out = torch.ops.tinylm.invariant_blocks_linear(rows, self.codes, self.scales, self.mins, self.bits,
                                                           self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.blocks.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as float32 (..., K): the tied embedding's lookup."""
        return self.blocks.dequantize(ids)

    @classmethod
    def concat_rows(cls, layers: list[BlockLinear]) -> BlockLinear:
        """One layer over the rows of `layers` end to end (fused q/k/v, gate/up: tinylm/model/fuse.py)."""
        first = layers[0]
        if any(m.form != first.form or m.in_features != first.in_features for m in layers):
            raise ConfigError("concat_rows: the block layers differ in form or input features")
        mins = None if first.mins is None else torch.cat([m.mins for m in layers])
        weight = BlockWeight(first.bits, torch.cat([m.codes for m in layers]), torch.cat([m.scales for m in layers]),
                             mins)
        return cls(weight, concat_biases(layers))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"bias={self.bias is not None}"


class BlockEmbedding(nn.Module):
    """An embedding on blocks: ids (...) -> (..., C) float32 rows, dequantized as they are looked up (exactly the
    float32 table's rows). Tied to the head, it holds the head by reference (a tuple hides it from nn.Module's
    registration), so the blocks are stored once, as `lm_head.*`; untied (owned), its own blocks are `table.*`."""

    def __init__(self, table: BlockLinear, owned: bool = False) -> None:
        super().__init__()
        if owned:
            self.table = table
        self._table = (table,)
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self._table[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._table[0].lookup(ids)


EMBEDDING = "model.embed_tokens.weight"


def placeable(name: str) -> bool:
    """Whether the 2-D weight `name` (a parameter name) can live on blocks: a linear layer's, or the embedding (tied
    to the head or not). MoE routers and shared-expert gates stay float32, routed experts stacked float layers."""
    layer = name.removesuffix(".weight")
    return name.endswith(".weight") and not (routes_tokens(layer) or is_routed_expert(layer))


def place_blocks(model: nn.Module, blocks: dict[str, BlockWeight]) -> dict[str, torch.Tensor]:
    """Before `model`'s weights are loaded (built on the meta device): each linear layer whose weight is in `blocks`
    (by parameter name; every name `placeable`) becomes a BlockLinear on them, its bias still to load; the embedding
    a BlockEmbedding (a tied head: a BlockLinear on the embedding's blocks, which the embedding looks rows up in).
    Returns the blocks by state-dict name, to load with the other tensors (`load_state_dict(assign=True)` keeps
    these very tensors)."""
    buffers, tied = {}, model.config.tie_word_embeddings
    for name, weight in blocks.items():
        layer_name = "lm_head" if name == EMBEDDING and tied else name.removesuffix(".weight")
        layer = model.get_submodule(layer_name)
        if type(layer) not in (nn.Linear, nn.Embedding) or tuple(layer.weight.shape) != weight.shape:
            raise ConfigError(f"{name}: blocks of shape {weight.shape} do not fit {layer}")
        placed = BlockLinear(weight, getattr(layer, "bias", None))
        if name == EMBEDDING and not tied:  # its own blocks, only looked up
            model.model.embed_tokens = BlockEmbedding(placed, owned=True)
            layer_name = "model.embed_tokens.table"
        else:
            _set_module(model, layer_name, placed)
            if name == EMBEDDING:  # the tied head's blocks, which the embedding looks its rows up in
                model.model.embed_tokens = BlockEmbedding(placed)
        buffers.update({f"{layer_name}.{part}": t for part, t in placed.named_buffers()})
    return buffers


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _kernel_takes(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
            and kernels.available())
