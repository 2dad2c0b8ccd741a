"""One quantized copy of the embedding table that is also the tied output head (as the Nano compact 3B model,
NanoLLM-Qwen2.5-3B, stores its tied embedding and head).

The table (V, C) is stored as a quantized linear layer with V output channels: a lookup dequantizes only the rows
asked for, and the head runs the quantized matmul over the same bytes. The head keeps a plain reference to the
embedding (not a registered submodule), so the table is stored, counted and saved once.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.quant.linear import Int4Linear, Int8Linear, QuantLinearBase


class Int8Embedding(Int8Linear):
    """ids (...) -> (..., C): int8 rows, one scale per row (= per output channel of the tied head)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)


class Int4Embedding(Int4Linear):
    """ids (...) -> (..., C): 4-bit rows by groups of `group_size` features, read straight from the kernel layout."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)


EMBEDDINGS = {Int8Linear: Int8Embedding, Int4Linear: Int4Embedding}  # format class -> its embedding class


def as_embedding(table: QuantLinearBase) -> QuantLinearBase:
    """Re-class a quantized (V, C) layer as an embedding: same buffers, forward = lookup. A format with `lookup`
    that has no embedding class yet gets one, made once."""
    cls = type(table)
    if cls not in EMBEDDINGS and cls not in EMBEDDINGS.values():
        EMBEDDINGS[cls] = type(f"{cls.__name__}Embedding", (cls,), {"forward": cls.lookup, "__module__": __name__})
    table.__class__ = EMBEDDINGS.get(cls, cls)
    return table


class TiedHead(nn.Module):
    """The output head over the quantized embedding: x (..., C) -> logits (..., V) by the table's quantized matmul.

    Holds the embedding by reference (a tuple hides it from nn.Module's registration), so the table is stored,
    counted and saved once, as `model.embed_tokens.*`. A head bias (QED) is the head's own parameter.
    """

    def __init__(self, table: QuantLinearBase, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self._tied = (table,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(table.dtype), requires_grad=False)

    @property
    def table(self) -> QuantLinearBase:
        return self._tied[0]

    @property
    def weight(self) -> torch.Tensor:
        """0-element stand-in in the model dtype and device (code reads `lm_head.weight.dtype` / `.device`)."""
        return self.table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.table.matmul(x)
        return logits if self.bias is None else logits + self.bias
