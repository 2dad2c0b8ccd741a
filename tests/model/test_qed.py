"""QED (seed 004) against a reference forward written here from the model card's description."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tinylm
from tinylm.weights.export import export_hf_folder

CONFIG = {"model_type": "qed", "architectures": ["QEDForCausalLM"], "vocab_size": 96, "d_model": 48, "n_layers": 3,
          "n_heads": 4, "ffn_hidden_dim": 80, "max_seq_len": 24, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
          "dropout": 0.0, "tie_word_embeddings": True, "bias": False}


def _weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """QED's own tensor names: embed_tokens, layers.N.{input_norm, attention.*, post_attn_norm, mlp.*}, norm, lm_head."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = config["d_model"], config["ffn_hidden_dim"], config["vocab_size"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    w = {"embed_tokens.weight": rand(v, d, scale=1.0), "norm.weight": 1 + rand(d), "lm_head.bias": rand(v)}
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        w[p + "input_norm.weight"] = 1 + rand(d)
        w[p + "post_attn_norm.weight"] = 1 + rand(d)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"attention.{name}.weight"] = rand(d, d)
            if config["bias"]:
                w[p + f"attention.{name}.bias"] = rand(d)
        for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            w[p + f"mlp.{name}.weight"] = rand(*shape)
            if config["bias"]:
                w[p + f"mlp.{name}.bias"] = rand(shape[0])
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(v, d)
    return w


def reference_forward(w, config, input_ids, attention_mask=None, position_ids=None, labels=None):
    """The card: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); RMSNorm; lm_head with bias (tied weight)."""
    batch, seq = input_ids.shape
    if seq > config["max_seq_len"]:
        raise ValueError(f"total_seq_len {seq} > max_seq_len {config['max_seq_len']}")
    heads, d = config["n_heads"], config["d_model"]
    hd = d // heads
    if position_ids is None:
        position_ids = torch.arange(seq)[None].expand(batch, seq)
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(config["max_seq_len"]).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[position_ids][:, None], emb.sin()[position_ids][:, None]  # cos_cached[position_ids]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]) * weight

    def rot(x):
        return torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].to(torch.bool)
    x = w["embed_tokens.weight"][input_ids]
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_norm.weight"])
        q, k, v = (lin(h, p + f"attention.{n}").view(batch, seq, heads, hd).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
        x = x + lin(att.transpose(1, 2).reshape(batch, seq, d), p + "attention.o_proj")
        h = rms(x, w[p + "post_attn_norm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w.get("lm_head.weight", w["embed_tokens.weight"])
    logits = F.linear(rms(x, w["norm.weight"]), head, w["lm_head.bias"])
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    return logits, loss


def _save(tmp_path, config, weights, prefix=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    return tinylm.load(tmp_path, dtype="float32")


@pytest.mark.parametrize("overrides, prefix", [
    ({}, ""),
    ({}, "model."),
    ({"bias": True, "tie_word_embeddings": False}, ""),
])
def test_logits_and_loss_match_reference(tmp_path, overrides, prefix):
    config = {**CONFIG, **overrides}
    weights = _weights(config)
    llm = _save(tmp_path, config, weights, prefix)
    ids = torch.randint(0, config["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    ref_logits, ref_loss = reference_forward(weights, config, ids, labels=labels)
    out = llm.forward(ids, labels=labels)
    assert torch.allclose(out.logits, ref_logits, atol=1e-4)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)


def test_padding_masks_match_reference_at_real_tokens(tmp_path):
    weights = _weights(CONFIG)
    llm = _save(tmp_path, CONFIG, weights)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_logits, _ = reference_forward(weights, CONFIG, ids, attention_mask=mask, position_ids=positions)
    out = llm.forward(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(out.logits[real], ref_logits[real], atol=1e-4)
    alone = llm.forward(ids[0, 3:][None]).logits[0]
    assert torch.allclose(out.logits[0, 3:], alone, atol=1e-4)


def test_past_max_seq_len_is_a_value_error_with_both_numbers(tmp_path):
    llm = _save(tmp_path, CONFIG, _weights(CONFIG))
    ids = torch.zeros(1, 25, dtype=torch.long)
    with pytest.raises(ValueError, match="25 tokens exceeds the model's context of 24"):
        llm.forward(ids)
    with pytest.raises(ValueError):
        reference_forward(_weights(CONFIG), CONFIG, ids)


def test_greedy_generation_equals_reference_argmax_loop(tmp_path):
    weights = _weights(CONFIG)
    llm = _save(tmp_path, CONFIG, weights)
    ids = [3, 14, 15, 9, 26]
    out = llm.generate([ids], tinylm.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    seq = list(ids)
    for _ in range(10):  # the reference recomputes the whole sequence each step (no cache)
        logits, _ = reference_forward(weights, CONFIG, torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_export_writes_qed_names_and_reloads(tmp_path):
    llm = _save(tmp_path / "src", CONFIG, _weights(CONFIG))
    folder = export_hf_folder(llm.model, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "layers.0.attention.q_proj.weight" in names and "lm_head.bias" in names
    assert "lm_head.weight" not in names  # tied
    assert json.loads((folder / "config.json").read_text())["n_layers"] == 3
    ids = torch.arange(10)[None]
    assert torch.equal(tinylm.load(folder).forward(ids).logits, llm.forward(ids).logits)
