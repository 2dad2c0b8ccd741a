"""Check a config's sizes against the tensors a file holds, before anything is built from the config.

A model is sized by its config (layers, experts, hidden size, heads, vocabulary), but only the tensors are the
truth. One flipped byte in a GGUF's block_count (2.3e9) or a mistyped num_hidden_layers would otherwise build a
meta model of a billion layers, a loop over them and a table sized by them, and exhaust the machine before a
single weight is compared. So every size is compared here with the shapes in the file's header (no weight is
read), and a mismatch is one WeightsError naming the tensor, the key and the value.

Tensors are given under module names (`model.layers.3.self_attn.q_proj.weight`) with the name the file uses, for
messages. A quantized checkpoint stores `X.qweight` (rows as `X.weight`, packed columns) instead of `X.weight`; only
its rows are compared. A tensor the file lacks is not checked here: the missing-tensor check names it later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tinylm.config import ModelConfig
from tinylm.errors import WeightsError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Stored:
    name: str  # as the file names it (`blk.0.attn_q.weight` in a GGUF)
    shape: tuple[int, ...]  # torch layout: (out_features, in_features)


def check_config_fits(config: ModelConfig, tensors: Mapping[str, Stored], where: str,
                      keys: Mapping[str, str] | None = None) -> None:
    """Raise WeightsError unless the layer and expert counts and every size of `config` match `tensors`.

    `where` names the file in messages; `keys` maps ModelConfig fields to the names the file uses for them
    (e.g. num_hidden_layers -> llama.block_count)."""
    fit = _Fit(config, tensors, where, keys or {})
    layers = fit.layer_count()
    fit.top()
    for i in sorted(layers):
        if config.layer_type(i) == "linear_attention":
            fit.deltanet(i)
        else:
            fit.attention(i)
        if config.is_moe_layer(i):
            fit.experts(i)
        else:
            fit.dense_mlp(f"model.layers.{i}.mlp", "intermediate_size")


class _Fit:
    def __init__(self, config: ModelConfig, tensors: Mapping[str, Stored], where: str, keys: Mapping[str, str]):
        self.config, self.tensors, self.where, self.keys = config, tensors, where, keys
        self.by_layer: dict[int, dict[int, str]] | None = None

    def value(self, *fields: str) -> str:
        """`llama.attention.head_count=4 x head_dim=128`: the settings a size comes from, as the file names them."""
        return " x ".join(f"{self.keys.get(f, f)}={getattr(self.config, f)}" for f in fields)

    def expect(self, name: str, axis: int, want: int, because: str) -> None:
        """Dim `axis` of tensor `name` must be `want`; a quantized `.qweight` stands in for `.weight` (rows only)."""
        stored = self.tensors.get(name)
        if stored is None and axis == 0 and name.endswith(".weight"):
            stored = self.tensors.get(name.removesuffix(".weight") + ".qweight")
        if stored is None:
            return
        if len(stored.shape) <= axis or stored.shape[axis] != want:
            what = {0: "rows", 1: "columns"}.get(axis, f"entries in dim {axis}")
            raise WeightsError(f"{self.where}: tensor {stored.name!r} has shape {stored.shape}, but {because} "
                               f"needs {want} {what}")

    def layer_count(self) -> set[int]:
        """The layer indices present must be exactly 0..num_hidden_layers-1."""
        first = {}  # layer index -> the file's name of its first tensor
        for name, stored in self.tensors.items():
            match = _LAYER.match(name)
            if match:
                first.setdefault(int(match[1]), stored.name)
        count = self.config.num_hidden_layers
        extra = sorted(i for i in first if i >= count)
        if extra:
            raise WeightsError(f"{self.where}: unexpected tensor {first[extra[0]]!r}: {self.value('num_hidden_layers')}"
                               f" but the weights hold layer {extra[0]} ({len(first)} layers in all)")
        if len(first) != count:
            gap = next(i for i in range(len(first) + 1) if i not in first)  # bounded by the layers present
            raise WeightsError(f"{self.where}: {self.value('num_hidden_layers')} but the weights hold {len(first)} "
                               f"layers: missing tensors model.layers.{gap}.*")
        return set(first)

    def top(self) -> None:
        """Vocabulary and hidden size from the embedding, the final norm and the head."""
        vocab, hidden = self.value("vocab_size"), self.value("hidden_size")
        self.expect("model.embed_tokens.weight", 0, self.config.vocab_size, vocab)
        self.expect("model.embed_tokens.weight", 1, self.config.hidden_size, hidden)
        self.expect("model.norm.weight", 0, self.config.hidden_size, hidden)
        self.expect("lm_head.weight", 0, self.config.vocab_size, vocab)
        self.expect("lm_head.weight", 1, self.config.hidden_size, hidden)

    def attention(self, i: int) -> None:
        c, p = self.config, f"model.layers.{i}.self_attn"
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        gate = 2 if c.attn_output_gate else 1  # gated attention: q_proj also yields the gate
        q_why, kv_why = self.value("num_attention_heads", "head_dim"), self.value("num_key_value_heads", "head_dim")
        self.expect(f"{p}.q_proj.weight", 0, gate * q_out, q_why + (" x 2 (output gate)" if gate == 2 else ""))
        self.expect(f"{p}.k_proj.weight", 0, kv_out, kv_why)
        self.expect(f"{p}.v_proj.weight", 0, kv_out, kv_why)
        self.expect(f"{p}.o_proj.weight", 1, q_out, q_why)
        self.expect(f"{p}.q_norm.weight", 0, c.head_dim, self.value("head_dim"))
        self.expect(f"{p}.k_norm.weight", 0, c.head_dim, self.value("head_dim"))
        self.hidden_in(f"{p}.q_proj.weight", f"{p}.o_proj.weight")
        self.expect(f"model.layers.{i}.input_layernorm.weight", 0, c.hidden_size, self.value("hidden_size"))

    def deltanet(self, i: int) -> None:
        """Gated DeltaNet (tinylm/model/deltanet.py): sizes of its projections, conv and norm."""
        c, p = self.config, f"model.layers.{i}.linear_attn"
        key_dim = c.linear_num_key_heads * c.linear_key_head_dim
        value_dim = c.linear_num_value_heads * c.linear_value_head_dim
        keys = self.value("linear_num_key_heads", "linear_key_head_dim")
        values = self.value("linear_num_value_heads", "linear_value_head_dim")
        self.expect(f"{p}.in_proj_qkvz.weight", 0, 2 * key_dim + 2 * value_dim, f"2 x {keys} + 2 x {values}")
        self.expect(f"{p}.in_proj_ba.weight", 0, 2 * c.linear_num_value_heads, self.value("linear_num_value_heads"))
        self.expect(f"{p}.conv1d.weight", 0, 2 * key_dim + value_dim, f"2 x {keys} + {values}")
        self.expect(f"{p}.conv1d.weight", 2, c.linear_conv_kernel_dim, self.value("linear_conv_kernel_dim"))
        self.expect(f"{p}.dt_bias", 0, c.linear_num_value_heads, self.value("linear_num_value_heads"))
        self.expect(f"{p}.A_log", 0, c.linear_num_value_heads, self.value("linear_num_value_heads"))
        self.expect(f"{p}.norm.weight", 0, c.linear_value_head_dim, self.value("linear_value_head_dim"))
        self.expect(f"{p}.out_proj.weight", 1, value_dim, values)
        self.hidden_in(f"{p}.in_proj_qkvz.weight", f"{p}.out_proj.weight")

    def hidden_in(self, reads: str, writes: str) -> None:
        """A layer that reads the hidden state has hidden_size columns; one that writes it, hidden_size rows."""
        self.expect(reads, 1, self.config.hidden_size, self.value("hidden_size"))
        self.expect(writes, 0, self.config.hidden_size, self.value("hidden_size"))

    def dense_mlp(self, p: str, size_field: str) -> None:
        size, why = getattr(self.config, size_field), self.value(size_field)
        self.expect(f"{p}.gate_proj.weight", 0, size, why)
        self.expect(f"{p}.up_proj.weight", 0, size, why)
        self.expect(f"{p}.down_proj.weight", 1, size, why)
        self.hidden_in(f"{p}.up_proj.weight", f"{p}.down_proj.weight")

    def experts(self, i: int) -> None:
        """A sparse MoE layer: its router and expert count match num_experts, each expert moe_intermediate_size."""
        c, p = self.config, f"model.layers.{i}.mlp"
        present = self.expert_indices(i)
        self.expect(f"{p}.gate.weight", 0, c.num_experts, self.value("num_experts"))
        for j in sorted(present)[:1]:  # one expert shows the size; the shape check after the build sees the rest
            self.dense_mlp(f"{p}.experts.{j}", "moe_intermediate_size")
        if c.shared_expert_intermediate_size:
            self.dense_mlp(f"{p}.shared_expert", "shared_expert_intermediate_size")

    def expert_indices(self, i: int) -> set[int]:
        """The expert indices layer `i` holds must be exactly 0..num_experts-1."""
        if self.by_layer is None:  # layer -> expert index -> the file's name of its first tensor, found once
            self.by_layer = {}
            for name, stored in self.tensors.items():
                match = _EXPERT.match(name)
                if match:
                    self.by_layer.setdefault(int(match[1]), {}).setdefault(int(match[2]), stored.name)
        first = self.by_layer.get(i, {})
        count = self.config.num_experts
        extra = sorted(j for j in first if j >= count)
        if extra:
            raise WeightsError(f"{self.where}: unexpected tensor {first[extra[0]]!r}: {self.value('num_experts')} but "
                               f"layer {i} holds expert {extra[0]}")
        if len(first) != count:
            gap = next(j for j in range(len(first) + 1) if j not in first)
            raise WeightsError(f"{self.where}: {self.value('num_experts')} but layer {i} holds {len(first)} experts: "
                               f"missing tensors model.layers.{i}.mlp.experts.{gap}.*")
        return set(first)
