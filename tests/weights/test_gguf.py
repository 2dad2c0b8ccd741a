"""GGUF reading: exact dequantization, llama.cpp's q/k permutation, config and tokenizer against transformers' GGUF
loader on the real SmolLM2 file, conversion to a Hugging Face folder, and one-line errors for broken files."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tinylm.errors import ConfigError, WeightsError
from tinylm.weights.convert import convert_gguf_to_hf
from tinylm.weights.gguf import load_gguf, read_gguf_config

HIDDEN, HEADS, KV_HEADS, INTER = 512, 4, 2, 768  # in_features: multiples of 256 (K-quant blocks); head_dim
# 128, the default transformers assumes for a qwen3 GGUF (its loader ignores attention.key_length)
HEAD_DIM = HIDDEN // HEADS
# K-quants: the package cannot quantize them, so blocks are random bytes with their f16 scales made finite.
# Block bytes and the offsets of the f16 scale fields (gguf/quants.py dequantize_blocks layouts).
K_BLOCKS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16)


def encode_tensor(values: np.ndarray, qtype: Q, rng) -> tuple[np.ndarray, Q | None]:
    """values (out, in) float32 -> (data for GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == Q.F32:
        return values, None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(values, qtype), qtype
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (values.shape[0], values.shape[1] // block, block_bytes), dtype=np.uint8)
    for offset in K_BLOCKS.get(qtype, (0, ()))[1]:
        scales = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(values.shape[0], -1), qtype


def decode_tensor(data: np.ndarray, raw: Q | None) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # random IQ4_NL blocks may hold NaN scales
        return np.asarray(data, np.float32) if raw is None else gguf.quants.dequantize(data, raw)


def tiny_tensors(arch: str, layers: int = 1, vocab: int = 260) -> dict[str, tuple[int, ...]]:
    """GGUF names -> numpy shapes (out, in) of a tiny model of `arch`."""
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(layers):
        shapes.update({f"blk.{i}.{k}": v for k, v in {
            "attn_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,), "attn_q.weight": (q, HIDDEN),
            "attn_k.weight": (kv, HIDDEN), "attn_v.weight": (kv, HIDDEN), "attn_output.weight": (HIDDEN, q),
            "ffn_gate.weight": (INTER, HIDDEN), "ffn_up.weight": (INTER, HIDDEN), "ffn_down.weight": (HIDDEN, INTER),
        }.items()})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (kv,), f"blk.{i}.attn_v.bias": (kv,)})
        if arch == "qwen3":
            shapes.update({f"blk.{i}.attn_q_norm.weight": (HEAD_DIM,), f"blk.{i}.attn_k_norm.weight": (HEAD_DIM,)})
    return shapes


def write_tiny(path, arch="llama", qtype=Q.F32, drop=(), extra=None, meta=None, values=None, seed=0, vocab=None):
    """Write a tiny GGUF; return {gguf name: float32 values as the file decodes them}.

    `vocab`: tokenizer.* metadata as {GGUFWriter method name without "add_": value}, e.g. {"token_list": [...]}.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in (vocab or {}).items():
        getattr(writer, f"add_{method}")(value)
    rows = len(vocab["token_list"]) if vocab else 260
    hparams = {"block_count": 1, "context_length": 128, "embedding_length": HIDDEN, "feed_forward_length": INTER,
               "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.dimension_count": HEAD_DIM}
    for key, value in hparams.items():
        writer.add_uint32(f"{arch}.{key}", value)
    if arch != "llama":  # llama files leave it out: the size then comes from token_embd's rows
        writer.add_uint32(f"{arch}.vocab_size", rows)
    if arch == "qwen3":  # as llama.cpp writes a Qwen3 head_dim (transformers ignores it and assumes 128)
        writer.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for key, value in (meta or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(f"{arch}.{key}", value)
    decoded = {}
    for name, shape in {**tiny_tensors(arch, vocab=rows), **(extra or {})}.items():
        if name in drop:
            continue
        full = (values or {}).get(name, rng.standard_normal(shape).astype(np.float32))
        data, raw = encode_tensor(full, qtype if len(shape) == 2 else Q.F32, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
        decoded[name] = decode_tensor(data, raw).reshape(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


# --- dequantization and layout on tiny files


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, *QUANTIZABLE, *K_BLOCKS], ids=lambda q: q.name)
def test_dequantization_is_exact(tmp_path, qtype):
    # qwen3: no q/k permutation, so every tensor must equal gguf.quants.dequantize bit for bit
    decoded = write_tiny(tmp_path / "m.gguf", "qwen3", qtype)
    model = load_gguf(tmp_path / "m.gguf")
    q_proj = model.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.shape == (HEADS * HEAD_DIM, HIDDEN) and q_proj.dtype == torch.float32
    assert torch.isfinite(q_proj).all()
    assert torch.equal(q_proj, torch.from_numpy(decoded["blk.0.attn_q.weight"]))
    assert torch.equal(model.tensors["model.layers.0.mlp.down_proj.weight"],
                       torch.from_numpy(decoded["blk.0.ffn_down.weight"]))
    assert torch.equal(model.tensors["model.embed_tokens.weight"], torch.from_numpy(decoded["token_embd.weight"]))
    assert load_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16).tensors["model.norm.weight"].dtype == torch.bfloat16


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_llama_qk_permutation_is_undone(tmp_path):
    rng = np.random.default_rng(1)
    hf_q = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    hf_k = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    values = {"blk.0.attn_q.weight": llama_cpp_permute(hf_q, HEADS),
              "blk.0.attn_k.weight": llama_cpp_permute(hf_k, KV_HEADS)}
    decoded = write_tiny(tmp_path / "m.gguf", "llama", values=values)
    tensors = load_gguf(tmp_path / "m.gguf").tensors
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(hf_q))
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(hf_k))
    v_proj = tensors["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(v_proj, torch.from_numpy(decoded["blk.0.attn_v.weight"]))
    assert not torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                           torch.from_numpy(values["blk.0.attn_q.weight"]))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_converts_to_a_folder_transformers_loads(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    write_tiny(tmp_path / "m.gguf", arch, Q.Q8_0)
    config = read_gguf_config(tmp_path / "m.gguf")
    assert (config.model_type, config.qkv_bias, config.o_bias) == (arch, arch == "qwen2", False)
    assert config.qk_norm == (arch == "qwen3") and config.tie_word_embeddings and config.head_dim == HEAD_DIM
    dest = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(dest)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_rope_scaling_metadata(tmp_path):
    write_tiny(tmp_path / "lin.gguf", meta={"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    assert read_gguf_config(tmp_path / "lin.gguf").rope_scaling == {"rope_type": "linear", "factor": 4.0}
    write_tiny(tmp_path / "yarn.gguf", "qwen3", meta={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0})
    assert read_gguf_config(tmp_path / "yarn.gguf").rope_scaling == {"rope_type": "yarn", "factor": 4.0}
    # Llama 3.1: llama.cpp stores per-frequency factors (factor 32, low 1, high 4, original context 8192)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    factors = []
    for wavelen in 2 * math.pi / inv_freq:
        smooth = (8192 / wavelen - 1) / 3
        factors.append(1.0 if wavelen < 2048 else 32.0 if wavelen > 8192 else 1 / ((1 - smooth) / 32 + smooth))
    freqs = np.array(factors, np.float32)
    write_tiny(tmp_path / "l3.gguf", extra={"rope_freqs.weight": freqs.shape}, values={"rope_freqs.weight": freqs})
    assert read_gguf_config(tmp_path / "l3.gguf").rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs" not in " ".join(load_gguf(tmp_path / "l3.gguf").tensors)
    write_tiny(tmp_path / "bad.gguf", extra={"rope_freqs.weight": freqs.shape}, values={"rope_freqs.weight": freqs * 3})
    with pytest.raises(ConfigError, match="rope_freqs"):
        read_gguf_config(tmp_path / "bad.gguf")


# --- tokenizers on tiny vocabularies


def byte_level_vocab(pre: str) -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "1 2", "12 3", "Ġ Ġ", "Ċ Ċ"]
    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + [m.replace(" ", "") for m in merges]
    return {"tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
            "token_types": [3, 3] + [1] * (len(tokens) - 2), "bos_token_id": 1, "eos_token_id": 0,
            "add_bos_token": False}


@pytest.mark.parametrize("pre", ["default", "qwen2", "llama-bpe"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    """The split regexes (GPT-2: digits in runs, Qwen2: one digit, Llama-3: up to three) against transformers'."""
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "t.gguf", "qwen2", vocab=byte_level_vocab(pre))
    ours = load_gguf(tmp_path / "t.gguf").tokenizer
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["the world 12345", "isn't  in\n\nthe world", "  the<|im_start|>world", "x  12"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>the") == [1, ours.token_to_id("t"), ours.token_to_id("he")]


def sentencepiece_vocab() -> dict:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "orld",
              "world", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {"tokenizer_model": "llama", "token_list": tokens, "token_types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "token_scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0}


def test_sentencepiece_tokenizer(tmp_path):
    """Llama-2 / TinyLlama style: "▁" spaces, merges from scores, byte fallback, BOS by default."""
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "t.gguf", "llama", vocab=sentencepiece_vocab())
    ours = load_gguf(tmp_path / "t.gguf").tokenizer
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    hello, world = ours.token_to_id("▁hello"), ours.token_to_id("▁world")
    assert ours.encode("hello world") == [1, hello, world]
    assert ours.encode("hello world", add_special_tokens=False) == [hello, world]
    for text in ["hello world", "world  hello", "héllo\nworld"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    # A leading space stays a "▁" of its own, as in llama.cpp and Llama-2's sentencepiece model (" hello" ->
    # [29871, 22172] there); transformers' GGUF tokenizer folds it into the prefix space.
    assert ours.encode(" hello") == [1, ours.token_to_id("▁"), hello]
    assert ours.decode(ours.encode(" hello")) == " hello"
    # After a special token llama.cpp adds the prefix space again (`is_prev_special`), as the legacy Llama-2
    # tokenizer.json does; transformers' GGUF tokenizer (Metaspace, prepend_scheme="first") does not.
    assert ours.encode("<s>hello") == [1, 1, hello]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


# --- the real model: SmolLM2-135M-Instruct Q4_1 against transformers' GGUF loader


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


TEXTS = ["Hello world!", "12345", "3.14159 and 1,000,000", "def f(x):\n    return x**2  # squared\n",
         "Café déjà vu, naïve façade", "emoji 🚀🦙 ok", "  leading spaces", "tab\tnew\n\nline",
         "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|><repo_name>x"]
# Spaces before a digit: SmolLM2's tokenizer.json splits digits out first (Digits(individual_digits=True)), so the
# spaces form their own piece ("  " -> "ĠĠ"); transformers' GGUF converter drops that pre-tokenizer and gives
# "Ġ", "Ġ1" -> two "Ġ" tokens.
SPACES_THEN_DIGITS = ["x  12", "    1 + 2", "total:   42"]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"}]


def test_smollm2_config(smol):
    c = smol.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.max_position_embeddings, c.rope_theta, c.rope_scaling, c.partial_rotary_factor) == (8192, 1e5, None, 1)
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.tie_word_embeddings and not (c.qkv_bias or c.qk_norm)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, [2], 2)
    assert "lm_head.weight" not in smol.tensors and smol.metadata["tokenizer.ggml.pre"] == "smollm"
    assert not any(len(v) > 64 for v in smol.metadata.values() if isinstance(v, list))


def test_smollm2_tokenizer_matches_transformers(smol, hf_tokenizer):
    import tokenizers

    ours = smol.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer.encode(text), text
    # transformers' backend with SmolLM2's own pre-tokenizer put back is the reference where the two differ
    fixed = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    fixed.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + SPACES_THEN_DIGITS:
        assert ours.encode(text) == fixed.encode(text).ids, text
    assert ours.encode("x  12") == [ours.token_to_id(t) for t in ("x", "ĠĠ", "1", "2")]
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.eos_token_ids == {2}


def test_smollm2_chat_template_matches_transformers(smol, hf_tokenizer):
    for prompt in (True, False):
        ref = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert smol.tokenizer.apply_chat_template(CHAT, add_generation_prompt=prompt) == ref
    assert smol.tokenizer.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")


def test_smollm2_state_dict_matches_transformers(smol, hf_model):
    ref = hf_model.state_dict()
    assert set(ref) - set(smol.tensors) == {"lm_head.weight"} and set(smol.tensors) <= set(ref)
    assert torch.equal(ref["lm_head.weight"], smol.tensors["model.embed_tokens.weight"])
    for name, tensor in smol.tensors.items():
        assert torch.equal(tensor, ref[name]), name


def test_convert_smollm2(tmp_path, smollm2_gguf, smol, hf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.weights.safetensors_io import verify_manifest

    dest = convert_gguf_to_hf(smollm2_gguf, tmp_path / "hf")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(dest).eval(), AutoTokenizer.from_pretrained(dest)
    ids = smol.tokenizer.encode("The capital of France is")
    assert tokenizer.encode("The capital of France is") == ids
    assert [tokenizer.encode(t) for t in SPACES_THEN_DIGITS] == [smol.tokenizer.encode(t) for t in SPACES_THEN_DIGITS]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, hf_model(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=0)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        smol.tokenizer.apply_chat_template(CHAT)
    listed = {line.split("  ", 1)[1] for line in (dest / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in dest.iterdir()} - {"SHA256SUMS"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= listed
    verify_manifest(dest)
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == 2


# --- broken files: one line, naming the problem


@pytest.fixture(scope="module")
def smol_bytes(smollm2_gguf):
    return smollm2_gguf.read_bytes()


def _patch(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(8, "little") + data[offset + 8:]


BROKEN = {
    "empty": lambda d: b"",
    "3 bytes": lambda d: d[:3],
    "header only": lambda d: d[:24],
    "cut in metadata": lambda d: d[:400],
    "cut in token list": lambda d: d[:1_000_000],
    "cut in tensor data": lambda d: d[:len(d) // 2],
    "last byte missing": lambda d: d[:-1],
    "flipped magic": lambda d: b"FUGG" + d[4:100_000],
    "garbage": lambda d: np.random.default_rng(0).bytes(4096),
    "magic then garbage": lambda d: b"GGUF" + np.random.default_rng(0).bytes(4096),
    "bad version": lambda d: d[:4] + (99).to_bytes(4, "little") + d[8:100_000],
    "huge kv count": lambda d: _patch(d[:2_000_000], 16, 2**62),
    "huge key length": lambda d: _patch(d, 24, 2**40),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_gives_one_line(tmp_path, smol_bytes, case):
    path = tmp_path / "broken.gguf"
    path.write_bytes(BROKEN[case](smol_bytes))
    with pytest.raises(WeightsError) as err:
        load_gguf(path)
    message = str(err.value)
    assert "\n" not in message and "broken.gguf" in message
    assert any(word in message for word in ("truncated", "not a GGUF", "corrupt")), message


def test_unknown_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_uint32("mamba.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for read in (load_gguf, read_gguf_config):
        with pytest.raises(ConfigError, match="'mamba'") as err:
            read(tmp_path / "m.gguf")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"drop": ("blk.0.ffn_up.weight",)}, "missing tensors model.layers.0.mlp.up_proj.weight"),
    ({"extra": {"blk.0.attn_foo.weight": (4, HIDDEN)}}, "unexpected tensor 'blk.0.attn_foo.weight'"),
    ({"extra": {"blk.1.attn_norm.weight": (HIDDEN,)}}, "unexpected tensor 'blk.1.attn_norm.weight'"),
    ({"extra": {"blk.0.attn_k.weight": (HEAD_DIM, HIDDEN)}}, "'blk.0.attn_k.weight' has shape (128, 512)"),
    ({"qtype": Q.IQ4_NL}, "type IQ4_NL"),
], ids=["missing", "unexpected", "extra layer", "shape", "type"])
def test_bad_tensors(tmp_path, kwargs, needle):
    write_tiny(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(WeightsError) as err:
        load_gguf(tmp_path / "m.gguf")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_convert_refuses_a_folder_with_other_files(tmp_path):
    write_tiny(tmp_path / "m.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="model-00001-of-00002"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
